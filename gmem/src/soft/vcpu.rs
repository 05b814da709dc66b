//! The guest fault path (docs/spec.md, section 6): where a guest access is
//! served from, and the exits it produces.
//!
//! An access first tries the vCPU's translation cache (`soft/tlb.rs`),
//! which takes no lock. A miss takes `SoftVcpu::fault_in`, the
//! kernel's page fault: under the VM's slots lock (and the file's
//! invalidate lock for guest_memfd memory) it decides where the gfn is
//! served from (FAULT-1..6), performs the access, and caches the run of
//! gfns that share that answer. Exits (MMIO, memory faults) are never
//! cached: they are answered again each time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::tlb::{self, Reader, Tlb, LOOP_CHUNK};
use super::vm::VmInner;
use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestLoop, GuestOp, LoopExit, Vcpu, VcpuExit};
use crate::refuse;
use crate::uapi::{
    kvm_pre_fault_memory, KVM_EINVAL, KVM_ENOSYS, KVM_HC_MAP_GPA_RANGE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_READONLY, PAGE_SHIFT, PAGE_SIZE,
};

/// A software vCPU: performs each [`GuestOp`] as the guest would.
pub struct SoftVcpu {
    vm: Arc<VmInner>,
    reader: Reader,
    tlb: Tlb,
}

impl SoftVcpu {
    pub(crate) fn new(vm: Arc<VmInner>) -> Self {
        let reader = Reader::new();
        vm.invalidations.add_reader(reader.epoch());
        SoftVcpu {
            vm,
            reader,
            tlb: Tlb::new(),
        }
    }

    /// An access inside one page through the translation cache: the value
    /// loaded (0 for a store), or `None` when the cache cannot serve it.
    #[inline(always)]
    fn cached(&mut self, gpa: u64, size: usize, value: Option<u64>) -> Option<u64> {
        let p = self.tlb.lookup(gpa, value.is_some())?;
        let seq = self.reader.begin(self.vm.invalidations.seq_atomic());
        if seq != self.tlb.seq {
            self.reader.end();
            self.tlb.flush();
            return None;
        }
        let v = match value {
            Some(v) => {
                // SAFETY: the entry was filled at the current sequence and
                // the epoch is odd: no invalidation has completed since, and
                // none completes before `end` (see `super::tlb`), so the
                // page is mapped, and writable if the entry says so.
                unsafe { tlb::store(p, size, v) };
                0
            }
            // SAFETY: as above.
            None => unsafe { tlb::load(p, size) },
        };
        self.reader.end();
        Some(v)
    }

    /// A guest load or store through the cache, if it can serve it: a valid
    /// width, inside one page, a cached translation. The first thing
    /// [`Vcpu::run`] tries, small enough to stay cheap behind `dyn Vcpu`.
    #[inline(always)]
    fn cached_op(&mut self, op: &GuestOp) -> Option<u64> {
        let (gpa, size, value) = match *op {
            GuestOp::Read { gpa, size } => (gpa, size, None),
            GuestOp::Write { gpa, size, value } => (gpa, size, Some(value)),
            GuestOp::MapGpaRange { .. } => return None,
        };
        // A page crossing (or wrapping) access and a bad width take the
        // full path, which splits or refuses them.
        if !matches!(size, 1 | 2 | 4 | 8) || (gpa & (PAGE_SIZE - 1)) + size as u64 > PAGE_SIZE {
            return None;
        }
        self.cached(gpa, size as usize, value)
    }

    /// Everything [`Vcpu::run`] does that the cache did not: the checks,
    /// the fault path, hypercalls.
    #[inline(never)]
    fn run_slow(&mut self, op: GuestOp) -> Result<VcpuExit> {
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

    /// The fault path for an access that stays inside one page: performs it
    /// under the VM's locks and caches the translation. `None` means it
    /// completed.
    fn fault_in(&mut self, gpa: u64, buf: &mut [u8], write: bool) -> Result<Option<VcpuExit>> {
        let gfn = gpa >> PAGE_SHIFT;
        let offset = gpa & (PAGE_SIZE - 1);
        let state = self.vm.state.read();
        // Read before anything the translation depends on: an invalidation
        // after this leaves the entry stale (mmu_invalidate_seq snapshot).
        let seq = self.vm.invalidations.seq();
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
        // The gfns that share this one's slot and attributes; with in-place
        // conversion, the file's private/shared state of their pages too.
        let mut run = state.attribute_run(gfn, slot.base_gfn..slot.end_gfn());
        if let Some((inode, pgoff)) = slot
            .gmem
            .as_ref()
            .and_then(|g| Some((g.file.as_ref()?, g.pgoff)))
        {
            let to_index = |gfn: u64| gfn - slot.base_gfn + pgoff;
            let indices = inode.private_run(to_index(gfn), to_index(run.start)..to_index(run.end));
            run = indices.start - pgoff + slot.base_gfn..indices.end - pgoff + slot.base_gfn;
        }
        // The gfns of the run that the host memory holding gfn's page maps
        // contiguously: `before` pages below it and `after` from it on.
        let around = |before: u64, after: u64| {
            run.start.max(gfn.saturating_sub(before))..run.end.min(gfn.saturating_add(after))
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
            let (page, window) = inode.page(index)?;
            // SAFETY: the window is mapped while the inode lives, which the
            // slot holds under the slots lock; the invalidate lock keeps
            // punch hole out for the access, which stays inside the page.
            unsafe { copy(page.add(offset as usize), buf, write) };
            let gfns = around(index - window.start, window.end - index);
            self.tlb.insert(seq, gfn, page, gfns, true);
            return Ok(None);
        }
        let writable = slot.flags & KVM_MEM_READONLY == 0;
        if write && !writable {
            return Ok(mmio());
        }
        let hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT) + offset;
        // An hva the host cannot fault in: nothing mapped there, or a mapping
        // whose page fault raises SIGBUS (a guest_memfd page not shared with
        // the host, MMAP-4 and CONV-6, or past the end of the file, MMAP-3).
        // As __kvm_mmu_faultin_pfn (arch/x86/kvm/mmu/mmu.c): hva_to_pfn
        // (virt/kvm/kvm_main.c) finds no VMA, or GUP fails with EFAULT (mm/gup.c
        // faultin_page: VM_FAULT_SIGBUS) on a VMA that is neither VM_IO nor
        // VM_PFNMAP, and gives KVM_PFN_ERR_FAULT; kvm_handle_error_pfn
        // returns a bare -EFAULT: KVM_RUN fails with EFAULT and no
        // memory-fault exit is prepared.
        let unfaultable = |why: &dyn std::fmt::Display| {
            Error::new(
                Errno::EFAULT,
                "FAULT-3",
                format!(
                    "gpa {gpa:#x} is served from hva {hva:#x}, which the host cannot fault in: {why}"
                ),
            )
        };
        let (region, off) = self
            .vm
            .host
            .lookup(hva, buf.len() as u64)
            .ok_or_else(|| unfaultable(&"no host memory is mapped there"))?;
        let done = if write {
            region.write(off, buf)
        } else {
            region.read(off, buf)
        };
        done.map_err(|f| unfaultable(&f))?;
        // Cache the whole pages of the mapping around this one. The pointer
        // outlives `region`: unmapping invalidates first (`soft::host`).
        let page_off = off - offset;
        let before = page_off >> PAGE_SHIFT;
        let after = (region.cacheable_len().max(page_off) - page_off) >> PAGE_SHIFT;
        let page = region.mmap.as_ptr().wrapping_add(page_off as usize);
        self.tlb
            .insert(seq, gfn, page, around(before, after), writable);
        drop(state);
        Ok(None)
    }

    /// A guest load or store that the cache did not serve ([`Vcpu::run`]
    /// tried it first): the checks, then the fault path for each page.
    fn access(&mut self, gpa: u64, size: u8, value: Option<u64>) -> Result<VcpuExit> {
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
        if let Some(exit) = self.fault_in(gpa, first, write)? {
            return Ok(exit);
        }
        if !second.is_empty() {
            if let Some(exit) = self.fault_in(gpa + split as u64, second, write)? {
                return Ok(exit);
            }
        }
        Ok(VcpuExit::Done(if write {
            0
        } else {
            u64::from_le_bytes(bytes)
        }))
    }

    /// The start of `[at, at + len)` of a guest loop through the
    /// translation cache, up to the end of the cached entry and at most a
    /// [`LOOP_CHUNK`] under one epoch: the bytes done and the words that
    /// differ (for a verify), or `None` when the cache cannot serve `at`.
    fn loop_cached(&mut self, op: GuestLoop, at: u64, len: u64) -> Option<(u64, u64)> {
        let (p, room) = self.tlb.lookup_run(at, loop_writes(op))?;
        let len = len.min(room).min(LOOP_CHUNK - (at & (LOOP_CHUNK - 1)));
        let seq = self.reader.begin_chunk(self.vm.invalidations.seq_atomic());
        if seq != self.tlb.seq {
            self.reader.end_chunk();
            self.tlb.flush();
            return None;
        }
        let words = (0..len).step_by(8);
        let pages = (0..len).step_by(PAGE_SIZE as usize);
        // SAFETY (all arms): as in `cached`: the entry is current and the
        // epoch odd until `end_chunk`, so `[p, p + len)` (inside the entry,
        // contiguous host memory, 8-byte aligned, page aligned for a touch)
        // stays mapped, and writable when the loop writes.
        let differ = match op {
            GuestLoop::Fill { seed, .. } => {
                for i in words {
                    unsafe { tlb::store(p.add(i as usize), 8, GuestLoop::pattern(at + i, seed)) };
                }
                0
            }
            GuestLoop::Verify { seed, .. } => words
                .filter(|&i| unsafe { tlb::load(p.add(i as usize), 8) } != GuestLoop::pattern(at + i, seed))
                .count() as u64,
            GuestLoop::Touch { write: false, .. } => {
                for i in pages {
                    unsafe { tlb::load(p.add(i as usize), 8) };
                }
                0
            }
            GuestLoop::Touch { write: true, .. } => {
                for i in pages {
                    // An atomic add of 0, as the guest's own loop does: the
                    // page is faulted in writable and a concurrent store is
                    // never lost. In assembly, because the compiler turns an
                    // add of 0 into a load (or drops it).
                    unsafe {
                        std::arch::asm!(
                            "lock add qword ptr [{p}], 0",
                            p = in(reg) p.add(i as usize),
                            options(nostack)
                        )
                    };
                }
                0
            }
        };
        self.reader.end_chunk();
        Some((len, differ))
    }

    /// The rest of a page of a guest loop (`[at, at + len)`), whose first
    /// step took the fault path and left nothing in the cache: memory that
    /// is never cached (host memory reached through a guest_memfd mapping,
    /// `Region::cacheable_len`). One more pass of the fault path does all
    /// of it, not one per word. The words that differ (for a verify), or
    /// `None` when that pass did not complete (an exit or an error, which
    /// can only come from a change since the first step: what decides
    /// where an access goes is the same for a whole page); the words are
    /// then taken one at a time, which gives the exit or error at its word,
    /// and store again alike whatever a fill had stored.
    fn loop_uncached(&mut self, op: GuestLoop, at: u64, len: u64) -> Option<u64> {
        let mut page = [0u8; PAGE_SIZE as usize];
        let buf = &mut page[..len as usize];
        let (write, seed) = match op {
            GuestLoop::Fill { seed, .. } => (true, seed),
            GuestLoop::Verify { seed, .. } => (false, seed),
            // One access per page: the first step was all of it.
            GuestLoop::Touch { .. } => return Some(0),
        };
        if write {
            for (i, w) in buf.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&GuestLoop::pattern(at + 8 * i as u64, seed).to_le_bytes());
            }
        }
        match self.fault_in(at, buf, write) {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return None,
        }
        if write {
            return Some(0);
        }
        Some(
            buf.chunks_exact(8)
                .enumerate()
                .filter(|(i, w)| {
                    u64::from_le_bytes((*w).try_into().expect("8 bytes"))
                        != GuestLoop::pattern(at + 8 * *i as u64, seed)
                })
                .count() as u64,
        )
    }
}

/// Does guest loop `op` store (and so need a writable translation)?
fn loop_writes(op: GuestLoop) -> bool {
    !matches!(
        op,
        GuestLoop::Verify { .. } | GuestLoop::Touch { write: false, .. }
    )
}

/// Copies between `buf` and guest memory at `p`: in one access when `buf`
/// is a single access (8 bytes or less), else word by word (the rest of a
/// guest loop's page, see [`SoftVcpu::loop_uncached`]).
///
/// # Safety
/// `[p, p + buf.len())` is mapped (and writable for a write) for the call.
unsafe fn copy(p: *mut u8, buf: &mut [u8], write: bool) {
    if buf.len() > 8 {
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            // SAFETY: the chunk lies inside `buf`, so `p + 8i` and its
            // length lie inside the caller's range.
            unsafe { copy(p.add(8 * i), chunk, write) };
        }
        return;
    }
    let mut v = [0u8; 8];
    if write {
        v[..buf.len()].copy_from_slice(buf);
        // SAFETY: the caller's guarantee.
        unsafe { tlb::store(p, buf.len(), u64::from_le_bytes(v)) };
    } else {
        // SAFETY: the caller's guarantee.
        let loaded = unsafe { tlb::load(p, buf.len()) };
        buf.copy_from_slice(&loaded.to_le_bytes()[..buf.len()]);
    }
}

impl Drop for SoftVcpu {
    fn drop(&mut self) {
        self.vm.invalidations.remove_reader(self.reader.epoch());
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
            let failed = match self.fault_in(range.gpa, &mut byte, false)? {
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

    // Inlined into callers that hold the concrete type, so that an access
    // of a known width folds down to the cache check and one load or store.
    #[inline(always)]
    fn run(&mut self, op: GuestOp) -> Result<VcpuExit> {
        match self.cached_op(&op) {
            Some(v) => Ok(VcpuExit::Done(v)),
            None => self.run_slow(op),
        }
    }

    /// One call walks the range through the translation cache, up to
    /// `LOOP_CHUNK` (16 pages) at a time. A page the cache cannot serve takes its
    /// first step through the fault path (which fills the cache, or ends the
    /// loop with its exit); in memory the cache never holds, the rest of
    /// that page takes one more pass.
    fn run_loop(&mut self, op: GuestLoop) -> Result<LoopExit> {
        op.check()?;
        let (gpa, len) = op.range();
        let step = op.step();
        let mut differ = 0u64;
        let mut off = 0;
        while off < len {
            let at = gpa + off;
            if let Some((done, n)) = self.loop_cached(op, at, len - off) {
                differ += n;
                off += done;
                continue;
            }
            let in_page = (PAGE_SIZE - (at & (PAGE_SIZE - 1))).min(len - off);
            // One step as single accesses, through the fault path, which
            // fills the cache for the next steps.
            match op.run_step(self, at)? {
                (VcpuExit::Done(_), n) => differ += n,
                (exit, _) => return Ok(LoopExit { done: off, exit }),
            }
            off += step;
            // Memory the cache does not hold after the fault path ran:
            // the rest of the page in one more pass, not a pass per word.
            let rest = in_page.saturating_sub(step);
            if rest > 0 && self.tlb.lookup(gpa + off, loop_writes(op)).is_none() {
                if let Some(n) = self.loop_uncached(op, gpa + off, rest) {
                    differ += n;
                    off += rest;
                }
            }
        }
        Ok(LoopExit {
            done: len,
            exit: VcpuExit::Done(differ),
        })
    }
}
