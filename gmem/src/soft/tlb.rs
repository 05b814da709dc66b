//! The per-vCPU translation cache: what the kernel's stage-2 page tables are
//! to a hardware vCPU, a small set of gfn ranges, each uniform in
//! private/shared state, with the host address they map to and their
//! permission.
//!
//! A guest access that hits the cache takes no lock and writes no cache
//! line another thread writes: it bumps its own vCPU's access epoch (a cache
//! line only that vCPU writes), compares the VM's `mmu_invalidate_seq` with
//! the sequence the cache was filled at (a line only invalidators write),
//! loads or stores through the cached host address, and bumps its epoch
//! again. A miss, or a sequence that moved, takes the fault path
//! (`soft::vcpu`) under the VM's locks, which performs the access and fills
//! the cache.
//!
//! # Why a cached translation is never used after an invalidation
//!
//! This is the kernel's MMU-notifier retry (`mmu_invalidate_seq` and
//! `mmu_invalidate_retry_gfn()` in `virt/kvm/kvm_main.c`, checked by
//! `is_page_fault_stale()` in `arch/x86/kvm/mmu/mmu.c`), plus what the
//! kernel gets from the MMU lock and from zapping the page tables before the
//! pages go: a sequence check alone cannot stop a store that read the old
//! sequence and lands after the invalidation. So each vCPU has an *access
//! epoch*, odd while an access is between its sequence check and its last
//! byte (SRCU-like: the invalidator waits out the readers that may hold an
//! old translation, each reader writes only its own counter).
//!
//! The vCPU (reader), per access:
//! 1. `epoch += 1` (now odd); a light barrier;
//! 2. load `mmu_invalidate_seq`; unequal to the cache's: give up (step 4),
//!    flush the cache and take the fault path;
//! 3. load or store through the cached address;
//! 4. `epoch += 1` (now even), a release store.
//!
//! A guest loop is one such access per chunk of up to [`LOOP_CHUNK`] bytes
//! of one cached entry: the steps hold for every load and store of the
//! chunk, as for the one of a single access.
//!
//! The invalidator ([`super::invalidate`]), with the locks that keep the fault
//! path out of the range held, before it changes anything a translation
//! points at (frees pages, converts, unbinds, unmaps):
//! 1. `mmu_invalidate_seq += 1`; a heavy barrier;
//! 2. for every vCPU: if its epoch is odd, wait until it changes.
//!
//! The light and heavy barriers are `membarrier(2)`'s asymmetric fence
//! (`MEMBARRIER_CMD_PRIVATE_EXPEDITED`, see `kernel/sched/membarrier.c`):
//! together they order like two `SeqCst` fences, with the cost on the rare
//! side (the invalidator issues the system call, which runs a full barrier
//! on every CPU running a thread of the process) and only a compiler fence
//! on the hot side. Where the system call is missing both are `SeqCst`
//! fences. So in the store-buffering pattern above, either the reader's
//! step 2 sees the new sequence (it does not touch the cached address), or
//! the invalidator's step 2 sees the odd epoch and waits until step 4, whose
//! release store makes the access happen before anything the invalidator
//! does next. An access that begins after the invalidator's heavy barrier
//! sees the new sequence. The fault path runs with the epoch even, under the
//! VM's slots lock and the file's invalidate lock, which every invalidator
//! holds for writing, so an invalidator never waits for a vCPU that waits
//! for it.
//!
//! A cache entry is filled by the fault path under those locks, tagged with
//! the sequence read *before* the translation was looked up: an invalidation
//! that raced the fill leaves the entry already stale. Any invalidation of
//! the VM flushes a vCPU's whole cache (at its next access), as
//! `kvm_mmu_zap_all_fast()` would; invalidations are rare next to accesses.
//!
//! Host memory that an ordinary slot points at is covered the same way: its
//! unmapping invalidates every slot whose `userspace_addr` range it overlaps
//! before the memory is unmapped (`kvm_mmu_notifier_invalidate_range_start`).
//! The pages go, or give way to an inaccessible reservation of the same
//! addresses while a slot points there (gmem-safety), only with the last
//! reference to the mapping, which a fault path in progress holds: after
//! the invalidation no cached entry and no new fill can reach them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) use barrier::heavy;

use crate::uapi::{PAGE_SHIFT, PAGE_SIZE};

/// One vCPU's access epoch, alone on its cache lines (128 bytes: the
/// adjacent-line prefetcher pairs lines), so that bumping it never writes a
/// line another thread writes.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct AccessEpoch {
    epoch: AtomicU64,
}

impl AccessEpoch {
    /// Waits until the access in progress (if any) on this vCPU ends. The
    /// caller bumped `mmu_invalidate_seq` and issued the heavy barrier.
    pub(crate) fn wait_out(&self) {
        let seen = self.epoch.load(Ordering::Acquire);
        if seen & 1 == 0 {
            return;
        }
        let mut spins = 0u32;
        while self.epoch.load(Ordering::Acquire) == seen {
            // An access is a handful of instructions, unless its thread was
            // preempted mid-way: then give the core back.
            spins += 1;
            if spins < 128 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The vCPU's side of its epoch: only this vCPU writes it.
///
/// A single access marks itself with plain stores (1 on entry, 0 on exit),
/// never a read-modify-write: a counter would chain every access to the
/// last through store-to-load forwarding, which costs more than the rest
/// of the access. A guest loop marks each chunk it walks (up to
/// [`LOOP_CHUNK`] bytes) with a fresh odd count (`2n + 1`, then `2n + 2`),
/// which it can afford once per chunk. Either way the invalidator waits
/// until the value it saw changes, which means that the access it saw has
/// ended.
pub(crate) struct Reader {
    shared: Arc<AccessEpoch>,
    /// Chunks walked by guest loops so far.
    chunks: u64,
}

/// Bytes a guest loop walks under one epoch and one cache lookup: 16
/// pages. The lookup and the epoch cost about as much as storing a few
/// hundred bytes, so paying them once a page would slow a loop over memory
/// in the cache by a quarter; and an invalidation waits out at most one
/// chunk in progress (microseconds of stores, or 16 page faults on fresh
/// memory).
pub(crate) const LOOP_CHUNK: u64 = 16 * PAGE_SIZE;

impl Reader {
    pub(crate) fn new() -> Self {
        barrier::init();
        Reader {
            shared: Arc::default(),
            chunks: 0,
        }
    }

    /// What the invalidator waits on.
    pub(crate) fn epoch(&self) -> &Arc<AccessEpoch> {
        &self.shared
    }

    /// Steps 1 and 2 for one access: enters it and loads the sequence to
    /// check.
    #[inline(always)]
    pub(crate) fn begin(&mut self, seq: &AtomicU64) -> u64 {
        self.shared.epoch.store(1, Ordering::Relaxed);
        barrier::light();
        seq.load(Ordering::Acquire)
    }

    /// Step 4 for one access.
    #[inline(always)]
    pub(crate) fn end(&mut self) {
        self.shared.epoch.store(0, Ordering::Release);
    }

    /// Steps 1 and 2 for one chunk of a guest loop.
    #[inline(always)]
    pub(crate) fn begin_chunk(&mut self, seq: &AtomicU64) -> u64 {
        self.chunks += 1;
        self.shared
            .epoch
            .store(2 * self.chunks + 1, Ordering::Relaxed);
        barrier::light();
        seq.load(Ordering::Acquire)
    }

    /// Step 4 for one chunk of a guest loop.
    #[inline(always)]
    pub(crate) fn end_chunk(&mut self) {
        self.shared
            .epoch
            .store(2 * self.chunks + 2, Ordering::Release);
    }
}

/// One cached translation: `npages` gfns from `gfn`, contiguous in host
/// memory from `hva`, all with the same permission and private/shared
/// state. Filled only by the fault path; see the module docs for why it is
/// never used after an invalidation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Translation {
    pub(crate) gfn: u64,
    pub(crate) npages: u64,
    pub(crate) hva: *mut u8,
    pub(crate) writable: bool,
}

impl Translation {
    const EMPTY: Translation = Translation {
        gfn: 0,
        npages: 0,
        hva: std::ptr::null_mut(),
        writable: false,
    };

    /// The host address of byte `gpa`, which lies in this entry.
    #[inline(always)]
    pub(crate) fn hva_of(&self, gpa: u64) -> *mut u8 {
        let off = ((gpa >> PAGE_SHIFT) - self.gfn) << PAGE_SHIFT | (gpa & (PAGE_SIZE - 1));
        self.hva.wrapping_add(off as usize)
    }
}

/// Entries per vCPU. An entry covers a whole run of uniform memory (up to a
/// memslot or a 1 GiB window), so a few cover a VM's RAM.
const ENTRIES: usize = 8;

/// The cache: private to its vCPU, never touched by another thread.
pub(crate) struct Tlb {
    /// `mmu_invalidate_seq` when the entries were filled.
    pub(crate) seq: u64,
    /// The page that hit last, checked before the entries: its gfn
    /// (`u64::MAX` for none), host address and permission.
    page_gfn: u64,
    page_hva: *mut u8,
    page_writable: bool,
    entries: [Translation; ENTRIES],
    /// Where the next fill goes (round robin).
    next: usize,
}

// SAFETY: the raw host addresses are plain data while cached; they are
// dereferenced only by the owning vCPU under the epoch protocol above, on
// whichever thread the vCPU runs.
unsafe impl Send for Tlb {}

impl Tlb {
    pub(crate) fn new() -> Self {
        Tlb {
            seq: u64::MAX,
            page_gfn: u64::MAX,
            page_hva: std::ptr::null_mut(),
            page_writable: false,
            entries: [Translation::EMPTY; ENTRIES],
            next: 0,
        }
    }

    /// The host address of byte `gpa`, if an entry holds its gfn and
    /// allows the access.
    #[inline(always)]
    pub(crate) fn lookup(&mut self, gpa: u64, write: bool) -> Option<*mut u8> {
        if gpa >> PAGE_SHIFT == self.page_gfn && (self.page_writable || !write) {
            return Some(self.page_hva.wrapping_add((gpa & (PAGE_SIZE - 1)) as usize));
        }
        self.lookup_slow(gpa, write)
    }

    #[inline(never)]
    fn lookup_slow(&mut self, gpa: u64, write: bool) -> Option<*mut u8> {
        let gfn = gpa >> PAGE_SHIFT;
        let e = self.entry(gfn, write)?;
        self.page_gfn = gfn;
        self.page_hva = e.hva_of(gfn << PAGE_SHIFT);
        self.page_writable = e.writable;
        Some(e.hva_of(gpa))
    }

    /// The host address of byte `gpa` and the bytes from there to the end
    /// of the entry that holds it, if an entry holds its gfn and allows the
    /// access: what a guest loop may walk through one lookup.
    pub(crate) fn lookup_run(&self, gpa: u64, write: bool) -> Option<(*mut u8, u64)> {
        let e = self.entry(gpa >> PAGE_SHIFT, write)?;
        let end = (e.gfn + e.npages) << PAGE_SHIFT;
        Some((e.hva_of(gpa), end.wrapping_sub(gpa)))
    }

    /// The entry that holds `gfn` and allows the access.
    #[inline(always)]
    fn entry(&self, gfn: u64, write: bool) -> Option<Translation> {
        self.entries
            .iter()
            .find(|e| gfn.wrapping_sub(e.gfn) < e.npages && (e.writable || !write))
            .copied()
    }

    /// Forgets every entry.
    pub(crate) fn flush(&mut self) {
        self.page_gfn = u64::MAX;
        self.entries = [Translation::EMPTY; ENTRIES];
    }

    /// Caches the gfns in `gfns`, which the host maps contiguously around
    /// `gfn`, whose page is at `page`; filled while `mmu_invalidate_seq` was
    /// `seq`. Nothing when `gfns` ends at or before `gfn` (the host memory
    /// is not cacheable there).
    pub(crate) fn insert(
        &mut self,
        seq: u64,
        gfn: u64,
        page: *mut u8,
        gfns: Range<u64>,
        writable: bool,
    ) {
        if gfns.end <= gfn {
            return;
        }
        if seq != self.seq {
            self.flush();
            self.seq = seq;
        }
        self.entries[self.next] = Translation {
            gfn: gfns.start,
            npages: gfns.end - gfns.start,
            hva: page.wrapping_sub(((gfn - gfns.start) << PAGE_SHIFT) as usize),
            writable,
        };
        self.next = (self.next + 1) % ENTRIES;
    }
}

/// The run around `at`, inside `within`, that one cached translation may
/// cover: the stored range that holds `at` (`holding`), or else the gap
/// between the stored ranges on either side. `last_end(r)` is the end of the
/// last stored range overlapping `r`, `first_start(r)` the start of the
/// first.
pub(crate) fn run_around(
    at: u64,
    within: Range<u64>,
    holding: Option<Range<u64>>,
    last_end: impl Fn(Range<u64>) -> Option<u64>,
    first_start: impl Fn(Range<u64>) -> Option<u64>,
) -> Range<u64> {
    if let Some(r) = holding {
        return r.start.max(within.start)..r.end.min(within.end);
    }
    let lo = if within.start < at {
        last_end(within.start..at).map_or(within.start, |end| end.max(within.start))
    } else {
        within.start
    };
    let hi = if at + 1 < within.end {
        first_start(at + 1..within.end).map_or(within.end, |start| start.min(within.end))
    } else {
        within.end
    };
    lo..hi
}

/// Loads `size` bytes at `p` (little endian, zero-extended). An aligned
/// access of 2, 4 or 8 bytes is one load, as on hardware.
///
/// # Safety
/// `[p, p + size)` is mapped host memory that stays mapped for the call.
#[inline(always)]
pub(crate) unsafe fn load(p: *const u8, size: usize) -> u64 {
    // SAFETY (all arms): the caller guarantees the range is mapped; each
    // wide arm checks its alignment. Volatile: other threads and mappings
    // write the same memory.
    unsafe {
        match size {
            8 if p.cast::<u64>().is_aligned() => p.cast::<u64>().read_volatile(),
            4 if p.cast::<u32>().is_aligned() => p.cast::<u32>().read_volatile().into(),
            2 if p.cast::<u16>().is_aligned() => p.cast::<u16>().read_volatile().into(),
            _ => {
                let mut v = [0u8; 8];
                for (i, b) in v.iter_mut().enumerate().take(size) {
                    *b = p.add(i).read_volatile();
                }
                u64::from_le_bytes(v)
            }
        }
    }
}

/// Stores the low `size` bytes of `value` at `p`; see [`load`].
///
/// # Safety
/// `[p, p + size)` is mapped, writable host memory that stays mapped for
/// the call.
#[inline(always)]
pub(crate) unsafe fn store(p: *mut u8, size: usize, value: u64) {
    // SAFETY: as in `load`.
    unsafe {
        match size {
            8 if p.cast::<u64>().is_aligned() => p.cast::<u64>().write_volatile(value),
            4 if p.cast::<u32>().is_aligned() => p.cast::<u32>().write_volatile(value as u32),
            2 if p.cast::<u16>().is_aligned() => p.cast::<u16>().write_volatile(value as u16),
            _ => {
                for (i, b) in value.to_le_bytes().iter().enumerate().take(size) {
                    p.add(i).write_volatile(*b);
                }
            }
        }
    }
}

/// The asymmetric fence pair: [`light`] on the vCPUs' hot path, [`heavy`]
/// in invalidations.
mod barrier {
    use std::sync::atomic::{compiler_fence, fence, AtomicBool, Ordering};
    use std::sync::Once;

    /// `MEMBARRIER_CMD_QUERY` and friends (`include/uapi/linux/membarrier.h`).
    const CMD_QUERY: libc::c_int = 0;
    const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    /// Set once, before the first vCPU is registered with an invalidation
    /// list, and never cleared: an invalidator reads it after taking that
    /// list's lock, so it sees what every listed vCPU saw.
    static EXPEDITED: AtomicBool = AtomicBool::new(false);

    fn membarrier(cmd: libc::c_int) -> libc::c_long {
        // SAFETY: membarrier(2) takes two integers and touches no memory
        // of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) }
    }

    /// Registers the process for expedited private barriers, once.
    pub(super) fn init() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let cmds = membarrier(CMD_QUERY);
            let wanted = (CMD_PRIVATE_EXPEDITED | CMD_REGISTER_PRIVATE_EXPEDITED) as libc::c_long;
            if cmds >= 0
                && cmds & wanted == wanted
                && membarrier(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
            {
                EXPEDITED.store(true, Ordering::SeqCst);
            }
        });
    }

    /// The vCPU's side: a compiler fence when the heavy side is a
    /// membarrier, else a full fence.
    #[inline(always)]
    pub(super) fn light() {
        if EXPEDITED.load(Ordering::Relaxed) {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }

    /// The invalidator's side: a full barrier on every CPU that runs a
    /// thread of this process.
    pub(crate) fn heavy() {
        if EXPEDITED.load(Ordering::SeqCst) && membarrier(CMD_PRIVATE_EXPEDITED) == 0 {
            return;
        }
        fence(Ordering::SeqCst);
    }
}
