//! A software VM: memslots and bindings (docs/spec.md, section 3), memory attributes
//! (section 5) and capabilities (section 8).
//!
//! Lock order, as in the kernel (INVAL-5):
//! 1. `VmInner::state`, the slots lock (`kvm->slots_lock`; guest accesses
//!    hold it for reading, as the kernel's fault path holds SRCU);
//! 2. `GmemInode::invalidate_lock` of a file (`filemap_invalidate_lock`);
//! 3. the invalidation observer list (the MMU lock: leaf).
//!
//! Punch hole takes only 2 then 3. A `GmemFile` must never be dropped while
//! 1 or 2 is held, because its release takes both: callers that resolve an
//! fd to a file hold the reference in a variable declared before the guard.

use std::collections::HashSet;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rangemap::RangeMap;

use super::guest_memfd::{fget, memfd, GmemFile, SoftGuestMemfd};
use super::host::HostRegistry;
use super::invalidate::{InvalidateCause, InvalidationObserver, Invalidations};
use super::memslot::{GmemBinding, Memslot, Memslots};
use super::profile::Profile;
use super::tlb::run_around;
use super::vcpu::SoftVcpu;
use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestMemfd, Vcpu, Vm};
use crate::refuse;
use crate::uapi::*;

/// The largest gfn a memslot may reach on x86 (`kvm_mmu_max_gfn`, 52-bit
/// physical addresses).
const MAX_GFN: u64 = (1 << (52 - PAGE_SHIFT)) - 1;

/// Highest vCPU id + 1 (`KVM_MAX_VCPU_IDS` on x86).
const KVM_MAX_VCPU_IDS: u64 = 4096;
/// Address spaces of an x86 VM without private memory: normal and SMM.
pub(crate) const KVM_MAX_NR_ADDRESS_SPACES: u16 = 2;

/// What the slots lock protects: memslots and the attribute map.
pub(crate) struct VmState {
    pub(crate) memslots: Vec<Memslots>,
    /// gfn ranges with non-zero attributes; everything else is shared
    /// (ATTR-3). Stored by range, so a conversion costs the same for 4 KiB
    /// and for 1 TiB (ATTR-6).
    pub(crate) attributes: RangeMap<u64, u64>,
}

impl VmState {
    pub(crate) fn memslot_mut(&mut self, as_id: u16, id: u16) -> Option<&mut Memslot> {
        self.memslots.get_mut(as_id as usize)?.get_mut(id)
    }

    pub(crate) fn attributes(&self, gfn: u64) -> u64 {
        self.attributes.get(&gfn).copied().unwrap_or(0)
    }

    /// The gfns around `gfn`, inside `within`, whose attributes are those of
    /// `gfn`: what one cached translation may cover.
    pub(crate) fn attribute_run(&self, gfn: u64, within: Range<u64>) -> Range<u64> {
        let map = &self.attributes;
        run_around(
            gfn,
            within,
            map.get_key_value(&gfn).map(|(r, _)| r.clone()),
            |r| map.overlapping(r).next_back().map(|(r, _)| r.end),
            |r| map.overlapping(r).next().map(|(r, _)| r.start),
        )
    }
}

/// The VM object: lives while its handle, a vCPU or a guest_memfd holds it
/// (LIFE-1).
pub(crate) struct VmInner {
    pub(crate) vm_type: u64,
    pub(crate) profile: Profile,
    pub(crate) has_private_mem: bool,
    pub(crate) nr_as: u16,
    pub(crate) state: RwLock<VmState>,
    pub(crate) invalidations: Invalidations,
    pub(crate) host: Arc<HostRegistry>,
    /// Hypercalls that exit to userspace (`KVM_CAP_EXIT_HYPERCALL`).
    pub(crate) exit_hypercall: AtomicU64,
    vcpu_ids: Mutex<HashSet<u64>>,
}

impl VmInner {
    /// Is a guest access to `gfn` private (FAULT-1)? The VM's attribute,
    /// or with in-place conversion the attribute of the file page the gfn
    /// is bound to (`kvm_gmem_is_private_gfn`, CONV-8).
    pub(crate) fn is_private(&self, state: &VmState, gfn: u64) -> bool {
        if !self.has_private_mem {
            return false;
        }
        if !self.profile.in_place_conversion() {
            return state.attributes(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE as u64 != 0;
        }
        state.memslots[0].find(gfn).is_some_and(|slot| {
            slot.gmem.as_ref().is_some_and(|g| {
                g.file
                    .as_ref()
                    .is_some_and(|f| f.is_private(gfn - slot.base_gfn + g.pgoff))
            })
        })
    }

    /// Capability answers for this VM (CAP-1, CAP-3).
    pub(crate) fn check_extension(&self, cap: u32) -> i64 {
        check_extension(self.profile, Some(self), cap)
    }

    /// Host addresses `hvas` are being unmapped: invalidates every slot
    /// whose `userspace_addr` range overlaps them and that is served from
    /// there (`kvm_mmu_notifier_invalidate_range_start`). guest_memfd-only
    /// slots never are (FAULT-3).
    pub(crate) fn invalidate_hvas(&self, hvas: &Range<u64>) {
        let state = self.state.read();
        for (as_id, slots) in state.memslots.iter().enumerate() {
            for slot in slots.iter() {
                if slot.gmem.as_ref().is_some_and(|g| g.gmem_only) {
                    continue;
                }
                let start = slot.userspace_addr;
                let end = start + (slot.npages << PAGE_SHIFT);
                if start >= hvas.end || hvas.start >= end {
                    continue;
                }
                let first = (start.max(hvas.start) - start) >> PAGE_SHIFT;
                let last = (end.min(hvas.end) - start).div_ceil(PAGE_SIZE);
                self.invalidations.invalidate(
                    as_id as u16,
                    slot.id,
                    slot.base_gfn + first..slot.base_gfn + last,
                    InvalidateCause::HostUnmap,
                );
            }
        }
    }
}

/// Capability answers, system-wide (`vm` None) or for a VM (CAP-1, CAP-3),
/// as `profile`'s release gives them.
pub(crate) fn check_extension(profile: Profile, vm: Option<&VmInner>, cap: u32) -> i64 {
    let private = vm.is_none_or(|v| v.has_private_mem);
    // With in-place conversion PRIVATE lives in guest_memfd, not in the VM
    // (`kvm_supported_vm_mem_attributes`), and private VMs may create
    // INIT_SHARED files.
    let in_place = profile.in_place_conversion();
    match cap {
        KVM_CAP_USER_MEMORY2 | KVM_CAP_MEMORY_FAULT_INFO | KVM_CAP_GUEST_MEMFD => 1,
        KVM_CAP_PRE_FAULT_MEMORY => 1,
        KVM_CAP_MEMORY_ATTRIBUTES if private && !in_place => KVM_MEMORY_ATTRIBUTE_PRIVATE as i64,
        KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES if private && in_place => {
            KVM_MEMORY_ATTRIBUTE_PRIVATE as i64
        }
        KVM_CAP_VM_TYPES => 1 << KVM_X86_DEFAULT_VM | 1 << KVM_X86_SW_PROTECTED_VM,
        KVM_CAP_GUEST_MEMFD_FLAGS => match vm {
            Some(v) if v.has_private_mem && !in_place => GUEST_MEMFD_FLAG_MMAP as i64,
            _ => (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) as i64,
        },
        KVM_CAP_EXIT_HYPERCALL => 1 << KVM_HC_MAP_GPA_RANGE,
        KVM_CAP_NR_MEMSLOTS => KVM_USER_MEM_SLOTS as i64,
        KVM_CAP_MULTI_ADDRESS_SPACE => vm.map_or(KVM_MAX_NR_ADDRESS_SPACES, |v| v.nr_as) as i64,
        _ => 0,
    }
}

/// A software VM handle: dropping it drops the handle's reference only.
pub struct SoftVm {
    pub(crate) inner: Arc<VmInner>,
    fd: OwnedFd,
}

impl SoftVm {
    pub(crate) fn create(
        host: &Arc<HostRegistry>,
        profile: Profile,
        vm_type: u64,
    ) -> Result<SoftVm> {
        let has_private_mem = match vm_type as u32 {
            _ if vm_type > u32::MAX as u64 => {
                refuse!(EINVAL, "CAP-2", "VM type {vm_type:#x} is not a VM type")
            }
            KVM_X86_DEFAULT_VM => false,
            KVM_X86_SW_PROTECTED_VM => true,
            t => refuse!(
                EINVAL,
                "CAP-2",
                "VM type {t} ({}) is not supported by the software backend",
                vm_type_name(vm_type)
            ),
        };
        let nr_as = if has_private_mem {
            1
        } else {
            KVM_MAX_NR_ADDRESS_SPACES
        };
        let inner = Arc::new(VmInner {
            vm_type,
            profile,
            has_private_mem,
            nr_as,
            state: RwLock::new(VmState {
                memslots: (0..nr_as).map(|_| Memslots::default()).collect(),
                attributes: RangeMap::new(),
            }),
            invalidations: Invalidations::default(),
            host: host.clone(),
            exit_hypercall: AtomicU64::new(0),
            vcpu_ids: Mutex::new(HashSet::new()),
        });
        host.add_vm(&inner);
        Ok(SoftVm {
            inner,
            fd: memfd("gmem-soft:vm", libc::MFD_CLOEXEC)?,
        })
    }

    /// Registers an observer of every invalidation of this VM's guest
    /// mappings; it stays registered while the `Arc` lives.
    pub fn register_invalidation_observer(&self, observer: &Arc<dyn InvalidationObserver>) {
        self.inner.invalidations.register(observer);
    }

    /// `mmu_invalidate_seq`: bumped by every invalidation.
    pub fn invalidate_seq(&self) -> u64 {
        self.inner.invalidations.seq()
    }

    /// The attributes of `gfn` (`kvm_get_memory_attributes`).
    pub fn memory_attributes(&self, gfn: u64) -> u64 {
        self.inner.state.read().attributes(gfn)
    }

    /// How many ranges the attribute map stores (ATTR-6: by range).
    pub fn attribute_ranges(&self) -> usize {
        self.inner.state.read().attributes.iter().count()
    }

    /// Number of memslots in address space `as_id`.
    pub fn nr_memslots(&self, as_id: u16) -> usize {
        self.inner
            .state
            .read()
            .memslots
            .get(as_id as usize)
            .map_or(0, Memslots::len)
    }

    /// `KVM_CREATE_VCPU`, returning the concrete vCPU (no dynamic dispatch
    /// on its accesses).
    pub fn create_soft_vcpu(&self, id: u64) -> Result<SoftVcpu> {
        if id >= KVM_MAX_VCPU_IDS {
            refuse!(EINVAL, "LIFE-1", "vCPU id {id} >= {KVM_MAX_VCPU_IDS}");
        }
        if !self.inner.vcpu_ids.lock().insert(id) {
            refuse!(EEXIST, "LIFE-1", "vCPU {id} already exists");
        }
        Ok(SoftVcpu::new(self.inner.clone()))
    }

    /// `KVM_CREATE_GUEST_MEMFD` (CREATE-1, CREATE-2), returning the concrete
    /// file (for [`SoftGuestMemfd::allocated_bytes`]).
    pub fn create_soft_guest_memfd(&self, args: kvm_create_guest_memfd) -> Result<SoftGuestMemfd> {
        let supported = self.inner.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
        if args.flags & !supported != 0 {
            refuse!(
                EINVAL,
                "CREATE-1",
                "guest_memfd flags {:#x} are not a subset of this VM's supported {supported:#x}",
                args.flags
            );
        }
        let size = args.size as i64;
        if size <= 0 || !page_aligned(args.size) {
            refuse!(
                EINVAL,
                "CREATE-2",
                "guest_memfd size {size:#x} must be > 0 and a multiple of the page size"
            );
        }
        SoftGuestMemfd::create(&self.inner, args.size, args.flags)
    }

    fn set_memory_region(&self, mem: &kvm_userspace_memory_region2) -> Result<()> {
        let id = mem.slot as u16;
        let as_id = (mem.slot >> 16) as u16;
        // Resolve the fd before taking the slots lock, and keep the
        // reference alive until after it is released (lock order above).
        let file = (mem.flags & KVM_MEM_GUEST_MEMFD != 0).then(|| fget(mem.guest_memfd));
        if id as u32 >= KVM_USER_MEM_SLOTS {
            refuse!(
                EINVAL,
                "SLOT-2",
                "slot id {id} >= {KVM_USER_MEM_SLOTS} user memslots"
            );
        }
        let mut state = self.inner.state.write();
        self.check_region(mem, as_id)?;
        let slots = &mut state.memslots[as_id as usize];
        let npages = mem.memory_size >> PAGE_SHIFT;
        let base_gfn = mem.guest_phys_addr >> PAGE_SHIFT;
        if mem.memory_size == 0 {
            let Some(old) = slots.remove(id) else {
                refuse!(
                    EINVAL,
                    "SLOT-10",
                    "deleting slot {id} (as {as_id}) that does not exist"
                );
            };
            self.unbind(&old, as_id);
            self.inner.invalidations.invalidate(
                as_id,
                id,
                old.base_gfn..old.end_gfn(),
                InvalidateCause::SlotDelete,
            );
            return Ok(());
        }
        if let Some(old) = slots.get(id) {
            if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
                refuse!(
                    EINVAL,
                    "SLOT-11",
                    "slot {id} exists: guest_memfd slots can only be created and deleted"
                );
            }
            if old.gmem.is_some() {
                refuse!(
                    EINVAL,
                    "SLOT-11",
                    "slot {id} is a guest_memfd slot: it can only be deleted"
                );
            }
            if mem.userspace_addr != old.userspace_addr || npages != old.npages {
                refuse!(
                    EINVAL,
                    "SLOT-11",
                    "slot {id} exists with userspace_addr {:#x} size {:#x}: neither can change (asked {:#x}, {:#x})",
                    old.userspace_addr,
                    old.npages << PAGE_SHIFT,
                    mem.userspace_addr,
                    mem.memory_size
                );
            }
            if (mem.flags ^ old.flags) & KVM_MEM_READONLY != 0 {
                refuse!(
                    EINVAL,
                    "SLOT-11",
                    "slot {id}: READONLY cannot be changed on an existing slot"
                );
            }
            if base_gfn == old.base_gfn {
                // A flags-only change, or a no-op.
                slots.get_mut(id).expect("slot exists").flags = mem.flags;
                return Ok(());
            }
        }
        if let Some(other) = slots.overlapping(id, base_gfn, base_gfn + npages) {
            refuse!(
                EEXIST,
                "SLOT-12",
                "gfns [{base_gfn:#x}, {:#x}) overlap slot {} at [{:#x}, {:#x})",
                base_gfn + npages,
                other.id,
                other.base_gfn,
                other.end_gfn()
            );
        }
        let mut new = Memslot {
            id,
            base_gfn,
            npages,
            flags: mem.flags,
            userspace_addr: mem.userspace_addr,
            gmem: None,
            _host: self.inner.host.pin(mem.userspace_addr, mem.memory_size),
        };
        if let Some(file) = &file {
            new.gmem = Some(self.bind(file, &new, as_id, mem.guest_memfd_offset)?);
        }
        // kvm_arch_prepare_memory_region (arch/x86/kvm/x86.c), after the
        // bind: a created or moved slot must end at or below
        // kvm_mmu_max_gfn(), the gfn of a 52-bit physical address (a host
        // with TDP uses its own MAXPHYADDR, which is lower). The binding is
        // undone (BIND-6).
        let last_gfn = base_gfn + npages - 1;
        if last_gfn > MAX_GFN {
            self.unbind(&new, as_id);
            refuse!(
                EINVAL,
                "SLOT-9",
                "slot ends at gfn {last_gfn:#x}, past the largest gfn {MAX_GFN:#x} (52-bit guest physical addresses)"
            );
        }
        if let Some(old) = slots.remove(id) {
            self.inner.invalidations.invalidate(
                as_id,
                id,
                old.base_gfn..old.end_gfn(),
                InvalidateCause::SlotMove,
            );
        }
        slots.insert(new);
        drop(state);
        drop(file);
        Ok(())
    }

    /// The ordered checks of `kvm_set_memory_region` that need no slot
    /// (SLOT-3..SLOT-9).
    fn check_region(&self, mem: &kvm_userspace_memory_region2, as_id: u16) -> Result<()> {
        let mut valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY;
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            valid &= !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY);
        }
        if mem.flags & !valid != 0 {
            refuse!(
                EINVAL,
                "SLOT-3",
                "memslot flags {:#x}: bits {:#x} are not allowed{}",
                mem.flags,
                mem.flags & !valid,
                if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
                    " with GUEST_MEMFD"
                } else {
                    ""
                }
            );
        }
        if !page_aligned(mem.memory_size) {
            refuse!(
                EINVAL,
                "SLOT-4",
                "memory_size {:#x} is not a multiple of the page size",
                mem.memory_size
            );
        }
        if !page_aligned(mem.guest_phys_addr) {
            refuse!(
                EINVAL,
                "SLOT-5",
                "guest_phys_addr {:#x} is not page aligned",
                mem.guest_phys_addr
            );
        }
        if !page_aligned(mem.userspace_addr) {
            refuse!(
                EINVAL,
                "SLOT-6",
                "userspace_addr {:#x} is not page aligned",
                mem.userspace_addr
            );
        }
        if mem
            .userspace_addr
            .checked_add(mem.memory_size)
            .is_none_or(|end| end >= TASK_SIZE_MAX)
        {
            refuse!(
                EINVAL,
                "SLOT-6",
                "userspace range [{:#x}, +{:#x}) is not a valid user range (ends at or past {TASK_SIZE_MAX:#x})",
                mem.userspace_addr,
                mem.memory_size
            );
        }
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            if !page_aligned(mem.guest_memfd_offset) {
                refuse!(
                    EINVAL,
                    "SLOT-7",
                    "guest_memfd_offset {:#x} is not page aligned",
                    mem.guest_memfd_offset
                );
            }
            if mem
                .guest_memfd_offset
                .checked_add(mem.memory_size)
                .is_none()
            {
                refuse!(
                    EINVAL,
                    "SLOT-7",
                    "guest_memfd_offset {:#x} + memory_size {:#x} wraps",
                    mem.guest_memfd_offset,
                    mem.memory_size
                );
            }
        }
        if as_id >= self.inner.nr_as {
            refuse!(
                EINVAL,
                "SLOT-8",
                "address space {as_id} >= this VM's {} address spaces",
                self.inner.nr_as
            );
        }
        if mem.guest_phys_addr.checked_add(mem.memory_size).is_none() {
            refuse!(
                EINVAL,
                "SLOT-9",
                "guest_phys_addr {:#x} + memory_size {:#x} wraps",
                mem.guest_phys_addr,
                mem.memory_size
            );
        }
        if mem.memory_size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES {
            refuse!(
                EINVAL,
                "SLOT-9",
                "memory_size {:#x} is more than {KVM_MEM_MAX_NR_PAGES:#x} pages",
                mem.memory_size
            );
        }
        Ok(())
    }

    /// `kvm_gmem_bind` (BIND-*), with the slots lock held.
    fn bind(
        &self,
        file: &Result<Arc<GmemFile>>,
        slot: &Memslot,
        as_id: u16,
        offset: u64,
    ) -> Result<GmemBinding> {
        let file = file.as_ref().map_err(Clone::clone)?;
        if !Arc::ptr_eq(&file.vm, &self.inner) {
            refuse!(EINVAL, "BIND-3", "the guest_memfd belongs to another VM");
        }
        let size = slot.npages << PAGE_SHIFT;
        let inode = &file.inode;
        // SLOT-7 ruled out a u64 wrap. Before 7.2 the sum was a signed
        // loff_t: one that went negative passed the size check.
        let unsigned = self.inner.profile.unsigned_bind_offsets();
        let past_end = if unsigned {
            offset + size > inode.size
        } else {
            (offset as i64) < 0 || ((offset + size) as i64) > inode.size as i64
        };
        if past_end {
            let rule = if unsigned {
                "BIND-4 since 7.2"
            } else {
                "BIND-4"
            };
            return Err(Error::new(
                Errno::EINVAL,
                rule,
                format!(
                    "guest_memfd_offset {offset:#x} + memory_size {size:#x} is past the end of the {:#x}-byte file",
                    inode.size
                ),
            ));
        }
        let start = offset >> PAGE_SHIFT;
        let indices = start..start + slot.npages;
        let mut bindings = inode.invalidate_lock.write();
        if let Some((r, b)) = bindings.overlapping(indices.clone()).next() {
            let (errno, rule) = self.inner.profile.bound_range_errno();
            return Err(Error::new(
                errno,
                rule,
                format!(
                    "file pages [{:#x}, {:#x}) are already bound: pages [{:#x}, {:#x}) belong to slot {}",
                    indices.start, indices.end, r.start, r.end, b.slot
                ),
            ));
        }
        bindings.insert(
            indices,
            super::guest_memfd::BindingRef {
                as_id,
                slot: slot.id,
                base_gfn: slot.base_gfn,
            },
        );
        Ok(GmemBinding {
            file: Some(inode.clone()),
            pgoff: start,
            // With in-place conversion every guest_memfd slot is served
            // from the file (KVM_MEMSLOT_GMEM_ONLY, CONV-8).
            gmem_only: inode.supports_mmap() || inode.in_place,
        })
    }

    /// `kvm_gmem_unbind`: the file range is free again; memory is untouched
    /// (LIFE-4).
    fn unbind(&self, slot: &Memslot, _as_id: u16) {
        if let Some(GmemBinding {
            file: Some(inode),
            pgoff,
            ..
        }) = &slot.gmem
        {
            inode
                .invalidate_lock
                .write()
                .remove(*pgoff..pgoff + slot.npages);
        }
    }

    fn set_attributes(&self, attrs: &kvm_memory_attributes) -> Result<()> {
        let supported = self.inner.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) as u64;
        if attrs.flags != 0 {
            refuse!(
                EINVAL,
                "ATTR-1",
                "memory attributes flags {:#x} must be 0",
                attrs.flags
            );
        }
        if attrs.attributes & !supported != 0 {
            refuse!(
                EINVAL,
                "ATTR-1",
                "attributes {:#x} are not supported by this VM (supported: {supported:#x})",
                attrs.attributes
            );
        }
        if attrs.size == 0 || attrs.address.checked_add(attrs.size).is_none() {
            refuse!(
                EINVAL,
                "ATTR-2",
                "address {:#x} size {:#x}: size is 0 or the range wraps",
                attrs.address,
                attrs.size
            );
        }
        if !page_aligned(attrs.address) || !page_aligned(attrs.size) {
            refuse!(
                EINVAL,
                "ATTR-2",
                "address {:#x} size {:#x} is not page aligned",
                attrs.address,
                attrs.size
            );
        }
        let gfns = attrs.address >> PAGE_SHIFT..(attrs.address + attrs.size) >> PAGE_SHIFT;
        let mut state = self.inner.state.write();
        if range_has(&state.attributes, &gfns, attrs.attributes) {
            return Ok(());
        }
        for (as_id, slots) in state.memslots.iter().enumerate() {
            for slot in slots.intersecting(gfns.start, gfns.end) {
                let zap = gfns.start.max(slot.base_gfn)..gfns.end.min(slot.end_gfn());
                self.inner.invalidations.invalidate(
                    as_id as u16,
                    slot.id,
                    zap,
                    InvalidateCause::Attributes,
                );
            }
        }
        if attrs.attributes == 0 {
            state.attributes.remove(gfns);
        } else {
            state.attributes.insert(gfns, attrs.attributes);
        }
        Ok(())
    }
}

/// Does every gfn of `gfns` already have attributes `value`?
fn range_has(map: &RangeMap<u64, u64>, gfns: &Range<u64>, value: u64) -> bool {
    if value == 0 {
        !map.overlaps(gfns)
    } else {
        map.gaps(gfns).next().is_none() && map.overlapping(gfns).all(|(_, v)| *v == value)
    }
}

impl AsRawFd for SoftVm {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Vm for SoftVm {
    fn vm_type(&self) -> u64 {
        self.inner.vm_type
    }

    fn check_extension(&self, cap: u32) -> i64 {
        self.inner.check_extension(cap)
    }

    fn enable_cap(&self, cap: u32, arg0: u64) -> Result<()> {
        match cap {
            KVM_CAP_EXIT_HYPERCALL => {
                let valid = 1u64 << KVM_HC_MAP_GPA_RANGE;
                if arg0 & !valid != 0 {
                    refuse!(
                        EINVAL,
                        "FAULT-8",
                        "hypercall mask {arg0:#x} has bits outside {valid:#x}"
                    );
                }
                self.inner.exit_hypercall.store(arg0, Ordering::Release);
                Ok(())
            }
            _ => refuse!(
                EINVAL,
                "CAP-1",
                "capability {cap} cannot be enabled on the software backend"
            ),
        }
    }

    fn create_guest_memfd(&self, args: kvm_create_guest_memfd) -> Result<Box<dyn GuestMemfd>> {
        Ok(Box::new(self.create_soft_guest_memfd(args)?))
    }

    fn set_user_memory_region(&self, region: kvm_userspace_memory_region) -> Result<()> {
        if region.flags & !KVM_SET_USER_MEMORY_REGION_V1_FLAGS != 0 {
            refuse!(
                EINVAL,
                "SLOT-1",
                "KVM_SET_USER_MEMORY_REGION flags {:#x}: only LOG_DIRTY_PAGES and READONLY are accepted",
                region.flags
            );
        }
        self.set_memory_region(&region2_from_v1(region))
    }

    fn set_user_memory_region2(&self, region: kvm_userspace_memory_region2) -> Result<()> {
        self.set_memory_region(&region)
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<()> {
        self.set_attributes(&attributes)
    }

    fn create_vcpu(&self, id: u64) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_soft_vcpu(id)?))
    }
}
