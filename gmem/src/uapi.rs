//! The KVM ABI that gmem speaks: structs and constants from kvm-bindings,
//! plus, in this one place, what kvm-bindings 0.14 lacks.

pub use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_pre_fault_memory,
    kvm_userspace_memory_region, kvm_userspace_memory_region2, KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS, KVM_CAP_PRE_FAULT_MEMORY,
    KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES, KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM, KVM_X86_SNP_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM,
};

/// Page size: every size and offset of the guest_memfd ABI is counted in these.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`]: gfn = gpa >> PAGE_SHIFT.
pub const PAGE_SHIFT: u32 = 12;

/// `KVM_CREATE_GUEST_MEMFD` flag (6.18): the file may be mmapped by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `KVM_CREATE_GUEST_MEMFD` flag (6.18): pages start shared with the host.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `KVM_CHECK_EXTENSION`: the guest_memfd flags this VM (or host) accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// `KVM_CHECK_EXTENSION`: the attributes `KVM_SET_MEMORY_ATTRIBUTES2` accepts
/// on a guest_memfd (in-place conversion, kvm-x86 series v8; not released).
pub const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: u32 = 250;

/// `KVM_SET_MEMORY_ATTRIBUTES2`, a guest_memfd ioctl: set attributes of a
/// range of file offsets (in-place conversion, CONV-*).
pub const KVM_SET_MEMORY_ATTRIBUTES2: u64 =
    iowr(0xd2, std::mem::size_of::<kvm_memory_attributes2>());

/// `KVM_PRE_FAULT_MEMORY`, a vCPU ioctl (kvm-ioctls has no wrapper).
pub const KVM_PRE_FAULT_MEMORY: u64 = iowr(0xd5, std::mem::size_of::<kvm_pre_fault_memory>());

/// `_IOWR(KVMIO, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    const KVMIO: u64 = 0xAE;
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// The argument of `KVM_SET_MEMORY_ATTRIBUTES2` (in/out).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvm_memory_attributes2 {
    /// File offset of the range (the `address` of the VM ioctl's layout).
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// `KVM_MEMORY_ATTRIBUTE_PRIVATE` or 0.
    pub attributes: u64,
    /// Must be 0.
    pub flags: u64,
    /// Out: on `EAGAIN`, the offset of the page that is still referenced.
    pub error_offset: u64,
    /// Must be 0.
    pub reserved: [u64; 11],
}

impl kvm_memory_attributes2 {
    /// `size` bytes at file `offset` made private (or shared).
    pub fn new(offset: u64, size: u64, private: bool) -> Self {
        kvm_memory_attributes2 {
            offset,
            size,
            attributes: if private {
                KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
            } else {
                0
            },
            ..Default::default()
        }
    }
}

/// The hypercall a guest makes to ask for a private/shared conversion.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// Attribute bit of `KVM_HC_MAP_GPA_RANGE`'s third argument: make it private.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// Page-size field of that argument: 4 KiB.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_4K: u64 = 0;
/// What a hypercall returns to the guest when KVM does not handle it.
pub const KVM_ENOSYS: u64 = 1000;
/// What a hypercall with bad arguments returns to the guest (negated).
pub const KVM_EINVAL: u64 = 22;

/// `KVM_SET_USER_MEMORY_REGION`'s request number, `_IOW(KVMIO, 0x46, struct
/// kvm_userspace_memory_region)`: kvm-ioctls keeps its own private.
pub const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;

/// User memslots per address space on x86 (`KVM_USER_MEM_SLOTS`).
pub const KVM_USER_MEM_SLOTS: u32 = 32764;
/// Most pages one memslot may hold (`KVM_MEM_MAX_NR_PAGES`).
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// Flags `KVM_SET_USER_MEMORY_REGION` (v1) accepts.
pub const KVM_SET_USER_MEMORY_REGION_V1_FLAGS: u32 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;
/// End of the x86-64 user address range with 4-level paging (`TASK_SIZE_MAX`).
pub const TASK_SIZE_MAX: u64 = (1 << 47) - PAGE_SIZE;

/// `fallocate` mode bits (from linux/falloc.h).
pub const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
/// Deallocate the range; must be combined with KEEP_SIZE.
pub const FALLOC_FL_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
/// Write zeroes to the range, allocating it (6.17; libc lacks it).
pub const FALLOC_FL_WRITE_ZEROES: i32 = 0x80;
/// Every `fallocate` mode `vfs_fallocate` knows; one at a time, plus
/// KEEP_SIZE (`include/linux/falloc.h`, 6.17 and later). ALLOCATE_RANGE is
/// no bit at all.
pub const FALLOC_FL_MODE_MASK: i32 = FALLOC_FL_PUNCH_HOLE
    | libc::FALLOC_FL_COLLAPSE_RANGE
    | libc::FALLOC_FL_ZERO_RANGE
    | libc::FALLOC_FL_INSERT_RANGE
    | libc::FALLOC_FL_UNSHARE_RANGE
    | FALLOC_FL_WRITE_ZEROES;

/// The names of the VM types of x86 (`KVM_X86_*_VM`), for reports.
pub fn vm_type_name(vm_type: u64) -> &'static str {
    match vm_type as u32 {
        KVM_X86_DEFAULT_VM => "default",
        KVM_X86_SW_PROTECTED_VM => "sw_protected",
        KVM_X86_SEV_VM => "sev",
        KVM_X86_SEV_ES_VM => "sev_es",
        KVM_X86_SNP_VM => "snp",
        KVM_X86_TDX_VM => "tdx",
        _ => "unknown",
    }
}

/// Capabilities by name, as scenarios and `gmem caps` write them.
pub const CAPS: &[(&str, u32)] = &[
    ("user_memory2", KVM_CAP_USER_MEMORY2),
    ("memory_fault_info", KVM_CAP_MEMORY_FAULT_INFO),
    ("memory_attributes", KVM_CAP_MEMORY_ATTRIBUTES),
    ("guest_memfd", KVM_CAP_GUEST_MEMFD),
    ("vm_types", KVM_CAP_VM_TYPES),
    ("pre_fault_memory", KVM_CAP_PRE_FAULT_MEMORY),
    (
        "guest_memfd_memory_attributes",
        KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES,
    ),
    ("guest_memfd_flags", KVM_CAP_GUEST_MEMFD_FLAGS),
    ("exit_hypercall", KVM_CAP_EXIT_HYPERCALL),
    ("nr_memslots", KVM_CAP_NR_MEMSLOTS),
    ("multi_address_space", KVM_CAP_MULTI_ADDRESS_SPACE),
];

/// The number of a capability named in [`CAPS`].
pub fn cap_from_name(name: &str) -> Option<u32> {
    CAPS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// A `KVM_SET_USER_MEMORY_REGION2` request binding `slot` at
/// `guest_phys_addr` to `memory_size` bytes of the guest_memfd `guest_memfd`
/// from `guest_memfd_offset`, with `userspace_addr` 0.
pub fn guest_memfd_region(
    slot: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    guest_memfd: std::os::fd::RawFd,
    guest_memfd_offset: u64,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr,
        memory_size,
        guest_memfd_offset,
        guest_memfd: guest_memfd as u32,
        ..Default::default()
    }
}

/// A `KVM_SET_USER_MEMORY_REGION2` request for an ordinary slot over host
/// memory at `userspace_addr`.
pub fn user_region(
    slot: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        guest_phys_addr,
        memory_size,
        userspace_addr,
        ..Default::default()
    }
}

/// A `KVM_SET_USER_MEMORY_REGION` request as the v2 request the kernel
/// reads it into: v1 is v2's prefix, the rest zero (`kvm_vm_ioctl`,
/// virt/kvm/kvm_main.c).
pub fn region2_from_v1(region: kvm_userspace_memory_region) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot: region.slot,
        flags: region.flags,
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.userspace_addr,
        ..Default::default()
    }
}

/// A request deleting `slot` (memory_size 0).
pub fn delete_region(slot: u32) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        ..Default::default()
    }
}

/// Page-aligned?
pub const fn page_aligned(x: u64) -> bool {
    x & (PAGE_SIZE - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ABI layouts the spec gives (sections 2, 3, 5).
    #[test]
    fn uapi_struct_sizes_match_the_spec() {
        assert_eq!(std::mem::size_of::<kvm_create_guest_memfd>(), 64);
        assert_eq!(std::mem::size_of::<kvm_userspace_memory_region2>(), 160);
        assert_eq!(std::mem::size_of::<kvm_memory_attributes>(), 32);
        assert_eq!(KVM_MEMORY_ATTRIBUTE_PRIVATE, 1 << 3);
        assert_eq!(KVM_MEM_GUEST_MEMFD, 1 << 2);
        assert_eq!(FALLOC_FL_MODE_MASK, 0xfa);
        assert_eq!(std::mem::size_of::<kvm_memory_attributes2>(), 128);
        assert_eq!(std::mem::size_of::<kvm_pre_fault_memory>(), 64);
        assert_eq!(KVM_SET_MEMORY_ATTRIBUTES2, 0xC080_AED2);
    }

    #[test]
    fn capability_numbers_match_cap_1() {
        assert_eq!(cap_from_name("guest_memfd_flags"), Some(244));
        assert_eq!(cap_from_name("user_memory2"), Some(231));
        assert_eq!(cap_from_name("exit_hypercall"), Some(201));
        assert_eq!(cap_from_name("nope"), None);
    }
}
