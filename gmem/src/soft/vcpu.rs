//! The guest fault path (docs/spec.md, section 6): where a guest access is served
//! from, and the exits it produces.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::vm::VmInner;
use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestOp, Vcpu, VcpuExit};
use crate::refuse;

/// What a hypercall with bad arguments returns to the guest (negated).
const KVM_EINVAL: u64 = 22;
use crate::uapi::{
    kvm_pre_fault_memory, KVM_ENOSYS, KVM_HC_MAP_GPA_RANGE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_MEM_READONLY, PAGE_SHIFT, PAGE_SIZE,
};

/// A software vCPU: performs each [`GuestOp`] as the guest would.
pub struct SoftVcpu {
    vm: Arc<VmInner>,
}

impl SoftVcpu {
    pub(crate) fn new(vm: Arc<VmInner>) -> Self {
        SoftVcpu { vm }
    }

    /// One access that stays inside one page. `None` means it completed.
    fn access_page(&self, gpa: u64, buf: &mut [u8], write: bool) -> Result<Option<VcpuExit>> {
        let gfn = gpa >> PAGE_SHIFT;
        let offset = gpa & (PAGE_SIZE - 1);
        let state = self.vm.state.read();
        // FAULT-1: private iff the VM has private memory and the gfn is PRIVATE.
        let private = self.vm.is_private(&state, gfn);
        let memory_fault = |private: bool| {
            Some(VcpuExit::MemoryFault {
                flags: if private {
                    KVM_MEMORY_EXIT_FLAG_PRIVATE as u64
                } else {
                    0
                },
                gpa: gfn << PAGE_SHIFT,
                size: PAGE_SIZE,
            })
        };
        let mmio = || {
            let mut data = [0u8; 8];
            if write {
                data[..buf.len()].copy_from_slice(buf);
            }
            Some(VcpuExit::Mmio {
                gpa,
                is_write: write,
                len: buf.len() as u8,
                data: u64::from_le_bytes(data),
            })
        };
        // FAULT-2: no slot.
        let Some(slot) = state.memslots[0].find(gfn) else {
            return Ok(if private { memory_fault(true) } else { mmio() });
        };
        let gmem_only = slot.gmem.as_ref().is_some_and(|g| g.gmem_only);
        if private || gmem_only {
            // FAULT-3: served from the file. FAULT-4: no binding; FAULT-6:
            // the file was released.
            let Some((inode, pgoff)) = slot
                .gmem
                .as_ref()
                .and_then(|g| Some((g.file.as_ref()?, g.pgoff)))
            else {
                return Ok(memory_fault(private));
            };
            let index = gfn - slot.base_gfn + pgoff;
            let _invalidate = inode.invalidate_lock.read();
            inode.guest_access(index, offset, buf, write)?;
            return Ok(None);
        }
        if write && slot.flags & KVM_MEM_READONLY != 0 {
            return Ok(mmio());
        }
        let hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT) + offset;
        // No host memory at the hva (or memory the host may not touch): as
        // __kvm_mmu_faultin_pfn (arch/x86/kvm/mmu/mmu.c), whose
        // __kvm_faultin_pfn -> hva_to_pfn (virt/kvm/kvm_main.c) gives
        // KVM_PFN_ERR_FAULT, and kvm_handle_error_pfn returns a bare -EFAULT:
        // KVM_RUN fails with EFAULT and no memory-fault exit is prepared.
        let unmapped = || {
            Error::new(
                Errno::EFAULT,
                "FAULT-3",
                format!("gpa {gpa:#x} is served from hva {hva:#x}, where no host memory is mapped"),
            )
        };
        let (region, off) = self
            .vm
            .host
            .lookup(hva, buf.len() as u64)
            .ok_or_else(unmapped)?;
        let done = if write {
            region.write(off, buf)
        } else {
            region.read(off, buf)
        };
        drop(state);
        done.map(|()| None).map_err(|_| unmapped())
    }

    fn access(&self, gpa: u64, size: u8, value: Option<u64>) -> Result<VcpuExit> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            refuse!(
                EINVAL,
                "FAULT-3",
                "guest access width {size} is not 1, 2, 4 or 8"
            );
        }
        let Some(last) = gpa.checked_add(size as u64 - 1) else {
            refuse!(
                EINVAL,
                "FAULT-3",
                "guest access at {gpa:#x} wraps the address space"
            );
        };
        let write = value.is_some();
        let mut bytes = value.unwrap_or(0).to_le_bytes();
        let buf = &mut bytes[..size as usize];
        // An access that crosses a page is two accesses, as on hardware.
        let split = if gpa >> PAGE_SHIFT != last >> PAGE_SHIFT {
            (PAGE_SIZE - (gpa & (PAGE_SIZE - 1))) as usize
        } else {
            buf.len()
        };
        let (first, second) = buf.split_at_mut(split);
        if let Some(exit) = self.access_page(gpa, first, write)? {
            return Ok(exit);
        }
        if !second.is_empty() {
            if let Some(exit) = self.access_page(gpa + split as u64, second, write)? {
                return Ok(exit);
            }
        }
        Ok(VcpuExit::Done(if write {
            0
        } else {
            u64::from_le_bytes(bytes)
        }))
    }
}

impl Vcpu for SoftVcpu {
    /// `kvm_vcpu_pre_fault_memory` and `kvm_arch_vcpu_pre_fault_memory`:
    /// each page is faulted in as a guest read would fault it.
    fn pre_fault_memory(&mut self, range: &mut kvm_pre_fault_memory) -> Result<()> {
        if range.flags != 0 {
            refuse!(
                EINVAL,
                "PREFAULT-1",
                "KVM_PRE_FAULT_MEMORY flags {:#x} must be 0",
                range.flags
            );
        }
        let (gpa, size) = (range.gpa, range.size);
        if gpa & (PAGE_SIZE - 1) != 0
            || size & (PAGE_SIZE - 1) != 0
            || gpa.checked_add(size).is_none_or(|end| end <= gpa)
        {
            refuse!(
                EINVAL,
                "PREFAULT-1",
                "gpa {gpa:#x} size {size:#x}: both must be page aligned, size not 0, the range not wrapping"
            );
        }
        let full = range.size;
        while range.size > 0 {
            let mut byte = [0u8];
            let failed = match self.access_page(range.gpa, &mut byte, false)? {
                None => None,
                Some(VcpuExit::Mmio { .. }) => Some(Error::new(
                    Errno::ENOENT,
                    "PREFAULT-4",
                    format!("gpa {:#x} is outside every memslot", range.gpa),
                )),
                Some(exit) => Some(Error::new(
                    Errno::EFAULT,
                    "PREFAULT-5",
                    format!("gpa {:#x} cannot be mapped: {exit:?}", range.gpa),
                )),
            };
            if let Some(e) = failed {
                // PREFAULT-3: success once any page was processed.
                return if range.size == full { Err(e) } else { Ok(()) };
            }
            range.gpa += PAGE_SIZE;
            range.size -= PAGE_SIZE;
        }
        Ok(())
    }

    fn run(&mut self, op: GuestOp) -> Result<VcpuExit> {
        match op {
            GuestOp::Read { gpa, size } => self.access(gpa, size, None),
            GuestOp::Write { gpa, size, value } => self.access(gpa, size, Some(value)),
            GuestOp::MapGpaRange {
                gpa,
                npages,
                attributes,
            } => {
                // FAULT-8: exits only when userspace asked for it; x86.c
                // checks that before the arguments.
                let mask = self.vm.exit_hypercall.load(Ordering::Acquire);
                if mask & (1 << KVM_HC_MAP_GPA_RANGE) == 0 {
                    return Ok(VcpuExit::Done(KVM_ENOSYS.wrapping_neg()));
                }
                // Then the range: unaligned, empty or wrapping is
                // -KVM_EINVAL to the guest; any other range exits.
                let wraps = (gpa >> PAGE_SHIFT).checked_add(npages).is_none();
                if gpa & (PAGE_SIZE - 1) != 0 || npages == 0 || wraps {
                    return Ok(VcpuExit::Done(KVM_EINVAL.wrapping_neg()));
                }
                Ok(VcpuExit::Hypercall {
                    nr: KVM_HC_MAP_GPA_RANGE,
                    gpa,
                    npages,
                    attributes,
                })
            }
        }
    }
}
