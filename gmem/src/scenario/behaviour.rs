//! Kernel behaviours that depart from upstream, as an executable model.
//!
//! A kernel that departs from upstream does so in a few ways, each a change
//! to one decision of the guest fault path: where a guest_memfd-only slot
//! is served from, what a slot whose file was released does, what a
//! `userspace_addr` the host cannot fault in gives, whether a hypercall
//! exits. Each is an [`Effect`]. [`Emulated`] is the software backend with a
//! set of effects applied: running a scenario on it gives, line by line,
//! what a kernel with those behaviours gives, including what follows from
//! them (a guest write that went to `userspace_addr` instead of the file
//! shows up later in a host read of either). That is what makes a departure's matcher precise: a line
//! is explained by a set of behaviours exactly when the kernel's outcome is
//! the one this model predicts from the line's operation and the state the
//! scenario built before it.
//!
//! Only default VMs (no private memory) are modelled: every effect concerns
//! shared accesses. On a VM with private memory [`Emulated`] is the software
//! backend unchanged.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::error::{Errno, Error, Result};
use crate::hypervisor::{
    GuestMemfd, GuestOp, HostFault, HostMemory, Hypervisor, MapKind, Pin, Stat, Vcpu, VcpuExit, Vm,
};
use crate::mempolicy::{MbindFlags, MemPolicy};
use crate::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_memory_attributes2, kvm_pre_fault_memory,
    kvm_userspace_memory_region, kvm_userspace_memory_region2, region2_from_v1,
    GUEST_MEMFD_FLAG_MMAP, KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY, KVM_X86_DEFAULT_VM, PAGE_SHIFT,
    PAGE_SIZE,
};

/// One change to the fault path that a departing kernel makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// A guest_memfd-only slot (its file has `GUEST_MEMFD_FLAG_MMAP` and is
    /// open) is served from `userspace_addr` like an ordinary slot, not
    /// from the file (upstream: FAULT-3).
    GmemOnlyViaUserspaceAddr,
    /// After the file of a guest_memfd-only slot is released, an access is
    /// served from `userspace_addr` instead of exiting with a memory fault
    /// (upstream: FAULT-6).
    ReleasedViaUserspaceAddr,
    /// An access served from a `userspace_addr` the host cannot fault in
    /// exits as MMIO, instead of failing `KVM_RUN` with EFAULT (upstream:
    /// FAULT-3; `hva_to_pfn` gives `KVM_PFN_ERR_FAULT`,
    /// `kvm_handle_error_pfn` a bare -EFAULT). Cannot fault in: nothing is
    /// mapped there (address 0, memory unmapped under the slot), or the
    /// page fault of the mapping there raises SIGBUS: a guest_memfd page not
    /// shared with the host (MMAP-4, CONV-6) or past the end of the file
    /// (MMAP-3). Exactly the accesses the software backend answers with
    /// that EFAULT.
    UnfaultableUserspaceAddrIsMmio,
    /// `KVM_HC_MAP_GPA_RANGE` never completes: the vCPU stays at the
    /// hypercall (upstream: FAULT-8, an exit or a return to the guest).
    HypercallNeverExits,
}

impl Effect {
    /// Every effect, in a fixed order.
    pub const ALL: [Effect; 4] = [
        Effect::GmemOnlyViaUserspaceAddr,
        Effect::ReleasedViaUserspaceAddr,
        Effect::UnfaultableUserspaceAddrIsMmio,
        Effect::HypercallNeverExits,
    ];

    /// The name a departures file uses for it.
    pub fn name(self) -> &'static str {
        match self {
            Effect::GmemOnlyViaUserspaceAddr => "gmem_only_via_userspace_addr",
            Effect::ReleasedViaUserspaceAddr => "released_via_userspace_addr",
            Effect::UnfaultableUserspaceAddrIsMmio => "unfaultable_userspace_addr_is_mmio",
            Effect::HypercallNeverExits => "hypercall_never_exits",
        }
    }

    /// The effect of that name. `unmapped_userspace_addr_is_mmio`, the
    /// name of `unfaultable_userspace_addr_is_mmio` when the model knew only
    /// unmapped addresses, is still read.
    pub fn from_name(name: &str) -> Option<Effect> {
        if name == "unmapped_userspace_addr_is_mmio" {
            return Some(Effect::UnfaultableUserspaceAddrIsMmio);
        }
        Effect::ALL.into_iter().find(|e| e.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Effect`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Effects(u8);

impl Effects {
    /// No effect: the model is upstream.
    pub const NONE: Effects = Effects(0);

    /// Does the set hold `e`?
    pub fn contains(self, e: Effect) -> bool {
        self.0 & e.bit() != 0
    }

    /// The set with `e` added.
    pub fn with(self, e: Effect) -> Effects {
        Effects(self.0 | e.bit())
    }

    /// The set with `e` removed.
    pub fn without(self, e: Effect) -> Effects {
        Effects(self.0 & !e.bit())
    }

    /// Is the set empty?
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The effects in the set.
    pub fn iter(self) -> impl Iterator<Item = Effect> {
        Effect::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

impl FromIterator<Effect> for Effects {
    fn from_iter<I: IntoIterator<Item = Effect>>(iter: I) -> Self {
        iter.into_iter().fold(Effects::NONE, Effects::with)
    }
}

/// The software backend with `effects` applied: what a kernel with those
/// behaviours does.
pub struct Emulated {
    inner: Box<dyn Hypervisor>,
    shared: Arc<Shared>,
}

/// Host memory handed out: address, length, the memory while it lives.
type Region = (u64, u64, Weak<dyn HostMemory>);

/// What every handle of one [`Emulated`] sees.
struct Shared {
    effects: Effects,
    /// Host memory handed out, by address: a `userspace_addr` resolves only
    /// to these, as in the software backend.
    regions: Mutex<Vec<Region>>,
    /// Open guest_memfds by fd number, to resolve a bind request's fd.
    files: Mutex<Vec<(RawFd, Weak<FileTag>)>>,
}

/// Stands for a file while its fd or a host mapping of it is open: when the
/// last [`Arc`] goes, the file is released (LIFE-5).
struct FileTag {
    mmap: bool,
}

impl Emulated {
    /// `inner` (the software backend) with `effects` applied.
    pub fn new(inner: Box<dyn Hypervisor>, effects: Effects) -> Self {
        Emulated {
            inner,
            shared: Arc::new(Shared {
                effects,
                regions: Mutex::new(Vec::new()),
                files: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The effects applied.
    pub fn effects(&self) -> Effects {
        self.shared.effects
    }
}

impl Shared {
    fn register(&self, mem: &Arc<dyn HostMemory>) {
        let mut regions = self.regions.lock();
        regions.retain(|(_, _, w)| w.strong_count() > 0);
        regions.push((mem.addr(), mem.len(), Arc::downgrade(mem)));
    }

    /// The host memory covering `[hva, hva + len)` and the offset into it.
    fn lookup(&self, hva: u64, len: u64) -> Option<(Arc<dyn HostMemory>, u64)> {
        let regions = self.regions.lock();
        regions.iter().find_map(|(addr, size, w)| {
            let off = hva.checked_sub(*addr)?;
            (off.checked_add(len)? <= *size)
                .then(|| w.upgrade())
                .flatten()
                .map(|m| (m, off))
        })
    }

    fn file(&self, fd: u32) -> Option<Weak<FileTag>> {
        let files = self.files.lock();
        files
            .iter()
            .rev()
            .find(|(f, w)| *f as u32 == fd && w.strong_count() > 0)
            .map(|(_, w)| w.clone())
    }
}

impl AsRawFd for Emulated {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Hypervisor for Emulated {
    fn name(&self) -> &'static str {
        "model"
    }

    fn check_extension(&self, cap: u32) -> i64 {
        self.inner.check_extension(cap)
    }

    fn release(&self) -> Option<crate::Release> {
        self.inner.release()
    }

    fn create_vm(&self, vm_type: u64) -> Result<Box<dyn Vm>> {
        let vm = self.inner.create_vm(vm_type)?;
        Ok(Box::new(EmVm {
            inner: vm,
            modelled: vm_type == KVM_X86_DEFAULT_VM as u64,
            slots: Arc::new(Mutex::new(Vec::new())),
            shared: self.shared.clone(),
        }))
    }

    fn host_memory(&self, size: u64) -> Result<Box<dyn HostMemory>> {
        let mem: Arc<dyn HostMemory> = Arc::from(self.inner.host_memory(size)?);
        self.shared.register(&mem);
        Ok(Box::new(EmMem { mem, _file: None }))
    }
}

/// Host memory: the software backend's, registered for hva lookups.
struct EmMem {
    mem: Arc<dyn HostMemory>,
    /// A mapping of a file keeps it alive (LIFE-7).
    _file: Option<Arc<FileTag>>,
}

impl HostMemory for EmMem {
    fn addr(&self) -> u64 {
        self.mem.addr()
    }
    fn len(&self) -> u64 {
        self.mem.len()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), HostFault> {
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), HostFault> {
        self.mem.write(offset, buf)
    }
    fn pin(&self, offset: u64, len: u64) -> Result<Box<dyn Pin>> {
        self.mem.pin(offset, len)
    }
    fn mbind(&self, offset: u64, len: u64, policy: MemPolicy, flags: MbindFlags) -> Result<()> {
        self.mem.mbind(offset, len, policy, flags)
    }
    fn get_mempolicy(&self, offset: u64) -> Result<MemPolicy> {
        self.mem.get_mempolicy(offset)
    }
}

/// What the model knows of a memslot: enough to decide where an access goes.
struct Slot {
    slot: u32,
    base_gfn: u64,
    npages: u64,
    flags: u32,
    userspace_addr: u64,
    /// The bound file, and whether it has MMAP (then the slot is
    /// guest_memfd-only, BIND-6).
    file: Option<(Weak<FileTag>, bool)>,
}

struct EmVm {
    inner: Box<dyn Vm>,
    /// Default VMs only: see the module doc.
    modelled: bool,
    slots: Arc<Mutex<Vec<Slot>>>,
    shared: Arc<Shared>,
}

impl EmVm {
    fn record(&self, r: &kvm_userspace_memory_region2) {
        let mut slots = self.slots.lock();
        let old = slots.iter().position(|s| s.slot == r.slot);
        let old = old.map(|i| slots.remove(i));
        if r.memory_size == 0 {
            return;
        }
        let file = if r.flags & KVM_MEM_GUEST_MEMFD != 0 {
            self.shared
                .file(r.guest_memfd)
                .map(|w| {
                    let mmap = w.upgrade().is_some_and(|t| t.mmap);
                    (w, mmap)
                })
                // A change to an existing slot keeps its binding.
                .or(old.and_then(|o| o.file))
        } else {
            None
        };
        slots.push(Slot {
            slot: r.slot,
            base_gfn: r.guest_phys_addr >> PAGE_SHIFT,
            npages: r.memory_size >> PAGE_SHIFT,
            flags: r.flags,
            userspace_addr: r.userspace_addr,
            file,
        });
    }
}

impl AsRawFd for EmVm {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Vm for EmVm {
    fn vm_type(&self) -> u64 {
        self.inner.vm_type()
    }

    fn check_extension(&self, cap: u32) -> i64 {
        self.inner.check_extension(cap)
    }

    fn enable_cap(&self, cap: u32, arg0: u64) -> Result<()> {
        self.inner.enable_cap(cap, arg0)
    }

    fn create_guest_memfd(&self, args: kvm_create_guest_memfd) -> Result<Box<dyn GuestMemfd>> {
        let file = self.inner.create_guest_memfd(args)?;
        let tag = Arc::new(FileTag {
            mmap: file.flags() & GUEST_MEMFD_FLAG_MMAP != 0,
        });
        {
            let mut files = self.shared.files.lock();
            files.retain(|(_, w)| w.strong_count() > 0);
            files.push((file.as_raw_fd(), Arc::downgrade(&tag)));
        }
        Ok(Box::new(EmFile {
            inner: file,
            tag,
            shared: self.shared.clone(),
        }))
    }

    fn set_user_memory_region(&self, region: kvm_userspace_memory_region) -> Result<()> {
        self.inner.set_user_memory_region(region)?;
        self.record(&region2_from_v1(region));
        Ok(())
    }

    fn set_user_memory_region2(&self, region: kvm_userspace_memory_region2) -> Result<()> {
        self.inner.set_user_memory_region2(region)?;
        self.record(&region);
        Ok(())
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<()> {
        self.inner.set_memory_attributes(attributes)
    }

    fn create_vcpu(&self, id: u64) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(EmVcpu {
            inner: self.inner.create_vcpu(id)?,
            modelled: self.modelled,
            slots: self.slots.clone(),
            shared: self.shared.clone(),
        }))
    }
}

struct EmFile {
    inner: Box<dyn GuestMemfd>,
    tag: Arc<FileTag>,
    shared: Arc<Shared>,
}

impl AsRawFd for EmFile {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl GuestMemfd for EmFile {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn flags(&self) -> u64 {
        self.inner.flags()
    }
    fn fallocate(&self, mode: i32, offset: i64, len: i64) -> Result<()> {
        self.inner.fallocate(mode, offset, len)
    }
    fn mmap(&self, offset: i64, len: u64, kind: MapKind) -> Result<Box<dyn HostMemory>> {
        let mem: Arc<dyn HostMemory> = Arc::from(self.inner.mmap(offset, len, kind)?);
        self.shared.register(&mem);
        Ok(Box::new(EmMem {
            mem,
            _file: Some(self.tag.clone()),
        }))
    }
    fn stat(&self) -> Result<Stat> {
        self.inner.stat()
    }
    fn read(&self, buf: &mut [u8]) -> Result<usize> {
        self.inner.read(buf)
    }
    fn write(&self, buf: &[u8]) -> Result<usize> {
        self.inner.write(buf)
    }
    fn pread(&self, buf: &mut [u8], offset: i64) -> Result<usize> {
        self.inner.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: i64) -> Result<usize> {
        self.inner.pwrite(buf, offset)
    }
    fn lseek(&self, offset: i64, whence: i32) -> Result<u64> {
        self.inner.lseek(offset, whence)
    }
    fn ftruncate(&self, len: i64) -> Result<()> {
        self.inner.ftruncate(len)
    }
    fn ioctl(&self, request: u64) -> Result<i32> {
        self.inner.ioctl(request)
    }
    fn set_memory_attributes2(&self, attrs: &mut kvm_memory_attributes2) -> Result<()> {
        self.inner.set_memory_attributes2(attrs)
    }
}

struct EmVcpu {
    inner: Box<dyn Vcpu>,
    modelled: bool,
    slots: Arc<Mutex<Vec<Slot>>>,
    shared: Arc<Shared>,
}

impl EmVcpu {
    /// The exit of a shared access that a departing kernel handles
    /// differently from upstream; `None` when the software backend's own
    /// answer stands.
    fn departed(&self, gpa: u64, size: u8, value: Option<u64>) -> Result<Option<VcpuExit>> {
        let effects = self.shared.effects;
        let len = u64::from(size);
        let last = gpa.saturating_add(len.saturating_sub(1));
        if len == 0 || gpa >> PAGE_SHIFT != last >> PAGE_SHIFT {
            return Ok(None);
        }
        let gfn = gpa >> PAGE_SHIFT;
        let slots = self.slots.lock();
        // The vCPU runs in address space 0.
        let Some(slot) = slots
            .iter()
            .find(|s| s.slot >> 16 == 0 && gfn >= s.base_gfn && gfn - s.base_gfn < s.npages)
        else {
            return Ok(None);
        };
        // Upstream serves a guest_memfd-only slot from its file (FAULT-3),
        // or exits with a memory fault once the file is gone (FAULT-6);
        // every other shared access from userspace_addr.
        let redirected = match &slot.file {
            Some((file, true)) => effects.contains(if file.strong_count() > 0 {
                Effect::GmemOnlyViaUserspaceAddr
            } else {
                Effect::ReleasedViaUserspaceAddr
            }),
            _ => false,
        };
        if !redirected {
            // Served from userspace_addr upstream too, or from the file: the
            // software backend's answer, which `run` adjusts where the host
            // cannot fault the address in.
            return Ok(None);
        }
        let hva = slot
            .userspace_addr
            .wrapping_add((gfn - slot.base_gfn) << PAGE_SHIFT)
            .wrapping_add(gpa & (PAGE_SIZE - 1));
        let write = value.is_some();
        let mmio = mmio_exit(gpa, size, value);
        if write && slot.flags & KVM_MEM_READONLY != 0 {
            return Ok(Some(mmio));
        }
        // What the host cannot fault in is EFAULT upstream, as for an
        // ordinary slot, and MMIO with the effect.
        let unfaultable = |why: &str| {
            if effects.contains(Effect::UnfaultableUserspaceAddrIsMmio) {
                Ok(Some(mmio))
            } else {
                Err(Error::new(
                    Errno::EFAULT,
                    "FAULT-3",
                    format!("gpa {gpa:#x} is served from hva {hva:#x}, which the host cannot fault in: {why}"),
                ))
            }
        };
        let Some((mem, off)) = self.shared.lookup(hva, len) else {
            return unfaultable("no host memory is mapped there");
        };
        drop(slots);
        let mut bytes = value.unwrap_or(0).to_le_bytes();
        let buf = &mut bytes[..size as usize];
        let done = match value {
            Some(_) => mem.write(off, buf),
            None => mem.read(off, buf),
        };
        match done {
            Ok(()) => Ok(Some(VcpuExit::Done(if write {
                0
            } else {
                u64::from_le_bytes(bytes)
            }))),
            Err(fault) => unfaultable(&fault.to_string()),
        }
    }

    /// The software backend's answer to an access that no effect redirects,
    /// with the effect on what the host cannot fault in applied: the
    /// backend's EFAULT for it (FAULT-3, the only EFAULT a shared access of
    /// a default VM gives without a memory-fault exit) becomes MMIO.
    fn undeparted(&mut self, op: GuestOp, gpa: u64, size: u8) -> Result<VcpuExit> {
        let value = match op {
            GuestOp::Write { value, .. } => Some(value),
            _ => None,
        };
        let one_page =
            size != 0 && gpa >> PAGE_SHIFT == gpa.saturating_add(u64::from(size) - 1) >> PAGE_SHIFT;
        match self.inner.run(op) {
            Err(e)
                if one_page
                    && e.errno == Errno::EFAULT
                    && e.rule == "FAULT-3"
                    && self
                        .shared
                        .effects
                        .contains(Effect::UnfaultableUserspaceAddrIsMmio) =>
            {
                Ok(mmio_exit(gpa, size, value))
            }
            r => r,
        }
    }
}

/// The MMIO exit of an access.
fn mmio_exit(gpa: u64, size: u8, value: Option<u64>) -> VcpuExit {
    VcpuExit::Mmio {
        gpa,
        is_write: value.is_some(),
        len: size,
        data: value.unwrap_or(0),
    }
}

impl Vcpu for EmVcpu {
    fn run(&mut self, op: GuestOp) -> Result<VcpuExit> {
        let effects = self.shared.effects;
        match op {
            GuestOp::MapGpaRange { .. } if effects.contains(Effect::HypercallNeverExits) => {
                Ok(VcpuExit::Timeout { rip: 0 })
            }
            GuestOp::Read { gpa, size } if self.modelled => match self.departed(gpa, size, None)? {
                Some(exit) => Ok(exit),
                None => self.undeparted(op, gpa, size),
            },
            GuestOp::Write { gpa, size, value } if self.modelled => {
                match self.departed(gpa, size, Some(value))? {
                    Some(exit) => Ok(exit),
                    None => self.undeparted(op, gpa, size),
                }
            }
            _ => self.inner.run(op),
        }
    }

    fn pre_fault_memory(&mut self, range: &mut kvm_pre_fault_memory) -> Result<()> {
        self.inner.pre_fault_memory(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{parse, run, Outcome};
    use crate::Backend;

    fn outcomes(effects: Effects, text: &str) -> Vec<Option<Outcome>> {
        let hv = Emulated::new(Backend::Soft.open().unwrap(), effects);
        let sc = parse("t.gmem", text).unwrap();
        run(&hv, &sc).lines.into_iter().map(|l| l.actual).collect()
    }

    const GMEM_ONLY: &str = "\
vm = create_vm
h = host_memory size=8K
host_write h offset=0 byte=0xbb len=8K
g = create_guest_memfd vm size=8K flags=mmap|init_shared
m = mmap g
set_memory_region vm slot=1 gpa=0x100000 size=8K flags=guest_memfd userspace=h guest_memfd=g
guest_write vm gpa=0x101000 byte=0xcc
guest_read vm gpa=0x100000
host_read m offset=4K
host_read h offset=4K
close m
close g
guest_read vm gpa=0x101000
";

    fn byte(v: u64) -> Option<Outcome> {
        Some(Outcome::Value {
            value: v,
            hex: true,
        })
    }

    #[test]
    fn without_effects_the_model_is_the_software_backend() {
        let o = outcomes(Effects::NONE, GMEM_ONLY);
        assert_eq!(o[7], byte(0));
        assert_eq!(o[8], byte(0xcc));
        assert_eq!(o[9], byte(0xbb));
        assert_eq!(
            o[12],
            Some(Outcome::MemoryFault {
                gpa: 0x101000,
                size: 4096,
                flags: 0
            })
        );
    }

    #[test]
    fn gmem_only_via_userspace_addr_sends_guest_accesses_to_the_host_memory() {
        let o = outcomes(
            Effects::NONE.with(Effect::GmemOnlyViaUserspaceAddr),
            GMEM_ONLY,
        );
        assert_eq!(o[7], byte(0xbb), "read from h");
        assert_eq!(o[8], byte(0), "the file never saw the write");
        assert_eq!(o[9], byte(0xcc), "h did");
        assert!(
            matches!(o[12], Some(Outcome::MemoryFault { .. })),
            "released: FAULT-6 stands without its own effect"
        );
    }

    #[test]
    fn released_via_userspace_addr_reads_the_host_memory_after_release() {
        let o = outcomes(
            Effects::NONE.with(Effect::ReleasedViaUserspaceAddr),
            GMEM_ONLY,
        );
        assert_eq!(o[7], byte(0), "the live file is upstream's");
        assert_eq!(o[12], byte(0xbb));
    }

    #[test]
    fn an_unmapped_userspace_addr_is_efault_upstream_and_mmio_with_the_effect() {
        let text = "vm = create_vm\nset_memory_region vm slot=1 gpa=0x100000 size=4K userspace=0\nguest_write vm gpa=0x100008 byte=7\n";
        assert_eq!(
            outcomes(Effects::NONE, text)[2],
            Some(Outcome::Errno {
                errno: Errno::EFAULT
            })
        );
        assert_eq!(
            outcomes(
                Effects::NONE.with(Effect::UnfaultableUserspaceAddrIsMmio),
                text
            )[2],
            Some(Outcome::Mmio {
                gpa: 0x100008,
                write: Some(true)
            })
        );
    }

    /// Every address the host cannot fault in: guest_memfd memory not
    /// shared with it (MMAP-4), past the end of the file (MMAP-3), a private
    /// page of another VM's file under in-place conversion (CONV-6), and
    /// host memory closed under the slot. Where it can, the effect changes
    /// nothing.
    const UNFAULTABLE: &str = "\
vm = create_vm
g = create_guest_memfd vm size=4K flags=mmap
m = mmap g
set_memory_region vm slot=1 gpa=0x100000 size=4K userspace=m
guest_read vm gpa=0x100000
g2 = create_guest_memfd vm size=4K flags=mmap|init_shared
m2 = mmap g2 size=8K
set_memory_region vm slot=2 gpa=0x200000 size=8K flags=readonly userspace=m2
guest_read vm gpa=0x200000
guest_read vm gpa=0x201000
guest_write vm gpa=0x201000 byte=1
p = create_vm type=sw_protected
g3 = create_guest_memfd p size=4K flags=mmap
m3 = mmap g3
set_memory_region vm slot=3 gpa=0x300000 size=4K userspace=m3
guest_write vm gpa=0x300000 byte=2
h = host_memory size=4K
set_memory_region vm slot=4 gpa=0x400000 size=4K userspace=h
guest_write vm gpa=0x400000 byte=3
close h
h2 = host_memory size=4K
guest_read vm gpa=0x400000
";

    #[test]
    fn what_the_host_cannot_fault_in_is_efault_upstream_and_mmio_with_the_effect() {
        let run = |effects: Effects| {
            let hv = crate::soft::SoftHypervisor::with_profile(crate::Release::Next).unwrap();
            let hv = Emulated::new(Box::new(hv), effects);
            let sc = parse("t.gmem", UNFAULTABLE).unwrap();
            let r = run(&hv, &sc);
            r.lines.into_iter().map(|l| l.actual).collect::<Vec<_>>()
        };
        let upstream = run(Effects::NONE);
        let kernel = run(Effects::NONE.with(Effect::UnfaultableUserspaceAddrIsMmio));
        let efault = Some(Outcome::Errno {
            errno: Errno::EFAULT,
        });
        let mmio = |gpa, write| {
            Some(Outcome::Mmio {
                gpa,
                write: Some(write),
            })
        };
        for (i, gpa, write) in [
            (4, 0x100000, false),
            (9, 0x201000, false),
            (15, 0x300000, true),
            (21, 0x400000, false),
        ] {
            assert_eq!(upstream[i], efault, "line {}", i + 1);
            assert_eq!(kernel[i], mmio(gpa, write), "line {}", i + 1);
        }
        // Faultable, or MMIO upstream already (a write to a read-only slot).
        for i in [8, 10, 18] {
            assert_eq!(upstream[i], kernel[i], "line {}", i + 1);
        }
        assert_eq!(kernel[8], byte(0));
        assert_eq!(kernel[10], mmio(0x201000, true));
    }

    #[test]
    fn a_hypercall_that_never_exits_times_out() {
        let text = "vm = create_vm\nguest_map_gpa_range vm gpa=0x100000 pages=1 shared\n";
        assert_eq!(
            outcomes(Effects::NONE.with(Effect::HypercallNeverExits), text)[1],
            Some(Outcome::Timeout)
        );
    }

    #[test]
    fn effect_names_round_trip() {
        for e in Effect::ALL {
            assert_eq!(Effect::from_name(e.name()), Some(e));
        }
        assert_eq!(
            Effect::from_name("unmapped_userspace_addr_is_mmio"),
            Some(Effect::UnfaultableUserspaceAddrIsMmio),
            "the name it had"
        );
        let all: Effects = Effect::ALL.into_iter().collect();
        assert_eq!(all.iter().count(), 4);
        assert!(!all
            .without(Effect::HypercallNeverExits)
            .contains(Effect::HypercallNeverExits));
    }
}
