//! What every contract test uses: fixtures, request builders, guest
//! accesses, capability checks that skip, and errno assertions.

use std::fmt::Display;
pub use std::os::fd::AsRawFd;

pub use gmem::uapi::*;
pub use gmem::{
    Errno, Error, GuestLoop, GuestMemfd, GuestOp, HostFault, HostMemory, Hypervisor, LoopExit,
    MapKind, Result, Vcpu, VcpuExit, Vm,
};

/// The page size, as the spec writes it.
pub const P: u64 = PAGE_SIZE;
/// Guest memory of the tests starts here: below the KVM backend's own guest
/// setup at [0xE000_0000, 0xE040_0000).
pub const GPA: u64 = 0x1000_0000;
/// The address of the last page of the 64-bit space.
pub const LAST_PAGE: u64 = !(P - 1);
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
pub const PRIVATE: u64 = KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;
/// `KVM_MEMORY_EXIT_FLAG_PRIVATE`.
pub const EXIT_PRIVATE: u64 = KVM_MEMORY_EXIT_FLAG_PRIVATE as u64;
/// `KVM_X86_SW_PROTECTED_VM`.
pub const SW_PROTECTED: u64 = KVM_X86_SW_PROTECTED_VM as u64;
/// `KVM_X86_DEFAULT_VM`.
pub const DEFAULT: u64 = KVM_X86_DEFAULT_VM as u64;
/// Both guest_memfd creation flags.
pub const MMAP_SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// Records that the test skips, and why: the binary prints one summary
/// of the skips when it exits.
pub fn skip(reason: impl Display) {
    crate::skips::skip(reason);
}

/// Unwraps a result the test needs, naming the step on failure.
#[track_caller]
pub fn ok<T>(r: Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// The error of a request that must fail.
#[track_caller]
pub fn refused<T>(r: Result<T>) -> Error {
    match r {
        Ok(_) => panic!("the request succeeded; it must be refused"),
        Err(e) => e,
    }
}

/// Asserts that `r` failed with `errno`; on the software backend also that
/// rule `rule` refused it (the KVM backend says `kernel`).
#[track_caller]
pub fn assert_refused<T>(hv: &dyn Hypervisor, r: Result<T>, errno: Errno, rule: &str) {
    let err = refused(r);
    assert_eq!(err.errno, errno, "wrong errno: {err}");
    if hv.name() == "soft" {
        // A rule that changed between releases says which side it is on:
        // `BIND-5 before 7.2`.
        let id = err.rule.split(' ').next().unwrap_or_default();
        assert_eq!(id, rule, "refused by the wrong rule: {err}");
    }
}

/// A default VM.
pub fn default_vm(hv: &dyn Hypervisor) -> Box<dyn Vm> {
    ok(hv.create_vm(DEFAULT), "KVM_CREATE_VM(default)")
}

/// A VM with private memory (SW_PROTECTED), or `None` (a recorded
/// skip) when the backend lacks that VM type.
pub fn private_vm(hv: &dyn Hypervisor) -> Option<Box<dyn Vm>> {
    if hv.check_extension(KVM_CAP_VM_TYPES) & (1 << SW_PROTECTED) == 0 {
        skip(format!(
            "the {} backend lacks VM type sw_protected (KVM_CAP_VM_TYPES)",
            hv.name()
        ));
        return None;
    }
    Some(ok(
        hv.create_vm(SW_PROTECTED),
        "KVM_CREATE_VM(sw_protected)",
    ))
}

/// A VM with private memory whose attributes support PRIVATE, or `None`
/// (a recorded skip).
pub fn private_vm_with_attributes(hv: &dyn Hypervisor) -> Option<Box<dyn Vm>> {
    let vm = private_vm(hv)?;
    if vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) as u64 & PRIVATE == 0 {
        skip(format!(
            "the {} backend lacks memory attribute PRIVATE (KVM_CAP_MEMORY_ATTRIBUTES)",
            hv.name()
        ));
        return None;
    }
    Some(vm)
}

/// Does the backend have `KVM_SET_MEMORY_ATTRIBUTES` at all? Skips if not.
pub fn has_attributes_ioctl(hv: &dyn Hypervisor) -> bool {
    let has = hv.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) != 0;
    if !has {
        skip(format!(
            "the {} backend lacks KVM_SET_MEMORY_ATTRIBUTES (KVM_CAP_MEMORY_ATTRIBUTES 0)",
            hv.name()
        ));
    }
    has
}

/// Does `vm` accept guest_memfd creation `flags`? Skips if not.
pub fn has_gmem_flags(vm: &dyn Vm, flags: u64) -> bool {
    let supported = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
    let has = supported & flags == flags;
    if !has {
        skip(format!(
            "guest_memfd flags {flags:#x} not supported (KVM_CAP_GUEST_MEMFD_FLAGS {supported:#x})"
        ));
    }
    has
}

/// The number of address spaces of `vm` (`KVM_CAP_MULTI_ADDRESS_SPACE`, 0
/// meaning one).
pub fn address_spaces(vm: &dyn Vm) -> u32 {
    vm.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE).max(1) as u32
}

/// `KVM_CREATE_GUEST_MEMFD` arguments.
pub fn create_args(size: u64, flags: u64) -> kvm_create_guest_memfd {
    kvm_create_guest_memfd {
        size,
        flags,
        ..Default::default()
    }
}

/// A guest_memfd the test needs.
pub fn gmem(vm: &dyn Vm, size: u64, flags: u64) -> Box<dyn GuestMemfd> {
    ok(
        vm.create_guest_memfd(create_args(size, flags)),
        "KVM_CREATE_GUEST_MEMFD",
    )
}

/// Host memory the test needs.
pub fn host(hv: &dyn Hypervisor, size: u64) -> Box<dyn HostMemory> {
    ok(hv.host_memory(size), "host memory")
}

/// A guest_memfd slot request with `userspace_addr` 0.
pub fn gmem_slot(
    slot: u32,
    gpa: u64,
    size: u64,
    file: &dyn GuestMemfd,
    offset: u64,
) -> kvm_userspace_memory_region2 {
    guest_memfd_region(slot, gpa, size, file.as_raw_fd(), offset)
}

/// A guest_memfd slot request whose shared side is `host`.
pub fn gmem_slot_with_host(
    slot: u32,
    gpa: u64,
    size: u64,
    file: &dyn GuestMemfd,
    offset: u64,
    host: &dyn HostMemory,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        userspace_addr: host.addr(),
        ..gmem_slot(slot, gpa, size, file, offset)
    }
}

/// An ordinary slot request over host memory at `userspace_addr`.
pub fn plain_slot(
    slot: u32,
    gpa: u64,
    size: u64,
    userspace_addr: u64,
) -> kvm_userspace_memory_region2 {
    user_region(slot, gpa, size, userspace_addr)
}

/// A delete request (memory_size 0).
pub fn delete_slot(slot: u32) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        ..Default::default()
    }
}

/// Installs a slot the test needs.
#[track_caller]
pub fn set_slot(vm: &dyn Vm, region: kvm_userspace_memory_region2) {
    ok(
        vm.set_user_memory_region2(region),
        "KVM_SET_USER_MEMORY_REGION2",
    );
}

/// `KVM_SET_MEMORY_ATTRIBUTES` over `[gpa, gpa + size)`.
pub fn set_attributes(vm: &dyn Vm, gpa: u64, size: u64, attributes: u64) -> Result<()> {
    vm.set_memory_attributes(kvm_memory_attributes {
        address: gpa,
        size,
        attributes,
        flags: 0,
    })
}

/// vCPU 0 of `vm`.
pub fn vcpu(vm: &dyn Vm) -> Box<dyn Vcpu> {
    ok(vm.create_vcpu(0), "KVM_CREATE_VCPU")
}

/// The memory fault exit a test expects for an access in page `gpa`.
pub fn memory_fault(gpa: u64, private: bool) -> VcpuExit {
    VcpuExit::MemoryFault {
        flags: if private { EXIT_PRIVATE } else { 0 },
        gpa: gpa & !(P - 1),
        size: P,
    }
}

/// Guest loads and stores in one call each.
pub trait GuestAccess {
    /// The guest loads `size` bytes at `gpa`: how the run ended.
    fn load(&mut self, gpa: u64, size: u8) -> VcpuExit;
    /// The guest stores `value` at `gpa`: how the run ended.
    fn store(&mut self, gpa: u64, size: u8, value: u64) -> VcpuExit;
    /// A load that must complete: the value.
    fn load_ok(&mut self, gpa: u64, size: u8) -> u64 {
        match self.load(gpa, size) {
            VcpuExit::Done(v) => v,
            exit => panic!("guest load at {gpa:#x} exited with {exit:?}"),
        }
    }
    /// A store that must complete.
    fn store_ok(&mut self, gpa: u64, size: u8, value: u64) {
        match self.store(gpa, size, value) {
            VcpuExit::Done(_) => {}
            exit => panic!("guest store at {gpa:#x} exited with {exit:?}"),
        }
    }
}

impl GuestAccess for Box<dyn Vcpu> {
    fn load(&mut self, gpa: u64, size: u8) -> VcpuExit {
        ok(self.run(GuestOp::Read { gpa, size }), "KVM_RUN (load)")
    }

    fn store(&mut self, gpa: u64, size: u8, value: u64) -> VcpuExit {
        ok(
            self.run(GuestOp::Write { gpa, size, value }),
            "KVM_RUN (store)",
        )
    }
}

/// Host reads of a mapping that must not fault.
pub fn host_read(mem: &dyn HostMemory, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    if let Err(f) = mem.read(offset, &mut buf) {
        panic!("host read at {offset:#x}: {f}");
    }
    buf
}

/// Host writes to a mapping that must not fault.
pub fn host_write(mem: &dyn HostMemory, offset: u64, bytes: &[u8]) {
    if let Err(f) = mem.write(offset, bytes) {
        panic!("host write at {offset:#x}: {f}");
    }
}

/// Binds slot `slot` at `gpa` to `[offset, offset + size)` of `file` (made
/// with MMAP | INIT_SHARED) with `userspace_addr` at the file's own host
/// mapping of that range, which it returns.
///
/// The guest then reaches the file however the kernel serves a
/// guest_memfd-only slot: from the file (FAULT-3) or, as kernel 6.18.44
/// does, from `userspace_addr`. Tests whose subject is not FAULT-3 bind
/// this way, so that only the FAULT-3 tests show that departure. The
/// mapping keeps the file alive (LIFE-7): tests of release do not use it.
pub fn bind_through_own_mapping(
    vm: &dyn Vm,
    slot: u32,
    gpa: u64,
    size: u64,
    file: &dyn GuestMemfd,
    offset: u64,
) -> Box<dyn HostMemory> {
    let mapping = ok(file.mmap(offset as i64, size, MapKind::Shared), "mmap");
    set_slot(
        vm,
        kvm_userspace_memory_region2 {
            userspace_addr: mapping.addr(),
            ..gmem_slot(slot, gpa, size, file, offset)
        },
    );
    mapping
}

/// A default VM and a file of `size` bytes with `flags`, or `None` (a
/// recorded skip) when the VM does not accept those flags.
pub fn file_with_flags(
    hv: &dyn Hypervisor,
    size: u64,
    flags: u64,
) -> Option<(Box<dyn Vm>, Box<dyn GuestMemfd>)> {
    let vm = default_vm(hv);
    if !has_gmem_flags(&*vm, flags) {
        return None;
    }
    let file = gmem(&*vm, size, flags);
    Some((vm, file))
}

/// A default VM and a MMAP | INIT_SHARED file of `size` bytes, or `None`
/// (a recorded skip).
pub fn shared_file(hv: &dyn Hypervisor, size: u64) -> Option<(Box<dyn Vm>, Box<dyn GuestMemfd>)> {
    file_with_flags(hv, size, MMAP_SHARED)
}
