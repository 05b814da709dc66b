//! Invalidation: the one path every zap of guest mappings goes through
//! (INVAL-1..5), and the observers that rely on it.
//!
//! The kernel zaps its stage-2 page tables and bumps `mmu_invalidate_seq`;
//! here the "page tables" are the vCPUs' translation caches
//! (`soft/tlb.rs`): the bump makes every cached translation stale, and the
//! invalidation then waits out the guest accesses that may have checked the
//! sequence just before it, so that when it returns no access can still
//! use the old translation. Observers (a test that records what was zapped)
//! are called after that, with the VM's locks held, exactly where the
//! kernel zaps: they must only record or drop state, never call back into
//! the VM.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::tlb::{heavy, AccessEpoch};

/// Why a gfn range was invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidateCause {
    /// fallocate punched a hole in a bound file range (INVAL-1).
    PunchHole,
    /// The last reference to a bound file went away (INVAL-2).
    Release,
    /// Memory attributes changed (INVAL-3).
    Attributes,
    /// A memslot was deleted (INVAL-4).
    SlotDelete,
    /// A memslot moved to a new base gfn: its old range goes.
    SlotMove,
    /// Host memory that a memslot's `userspace_addr` range points at was
    /// unmapped (the kernel's MMU notifier).
    HostUnmap,
}

/// One zapped range: guest mappings of `gfns` in address space `as_id`,
/// which lie in memslot `slot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// Address space id.
    pub as_id: u16,
    /// Memslot id the range lies in.
    pub slot: u16,
    /// The gfns, half-open.
    pub gfns: Range<u64>,
    /// What caused it.
    pub cause: InvalidateCause,
}

/// Something that caches guest translations and must forget them.
pub trait InvalidationObserver: Send + Sync {
    /// Called for every zapped range, under the VM's locks.
    fn invalidate(&self, invalidation: &Invalidation);
}

/// The per-VM invalidation notifier (the kernel's MMU notifier plumbing).
#[derive(Default)]
pub(crate) struct Invalidations {
    /// `mmu_invalidate_seq`: written only by invalidations, on its own
    /// cache lines so that the vCPUs reading it share them undisturbed.
    seq: SeqLine,
    /// The access epoch of every vCPU (the SRCU readers).
    readers: Mutex<Vec<Arc<AccessEpoch>>>,
    observers: Mutex<Vec<Weak<dyn InvalidationObserver>>>,
}

#[repr(align(128))]
#[derive(Default)]
struct SeqLine(AtomicU64);

impl Invalidations {
    /// Zaps `gfns` of `slot`: bumps the sequence and tells every observer.
    pub(crate) fn invalidate(
        &self,
        as_id: u16,
        slot: u16,
        gfns: Range<u64>,
        cause: InvalidateCause,
    ) {
        if gfns.is_empty() {
            return;
        }
        self.seq.0.fetch_add(1, Ordering::SeqCst);
        {
            let readers = self.readers.lock();
            if !readers.is_empty() {
                // Pairs with the vCPUs' light barrier (see `super::tlb`).
                heavy();
                for r in readers.iter() {
                    r.wait_out();
                }
            }
        }
        let inv = Invalidation {
            as_id,
            slot,
            gfns,
            cause,
        };
        let mut observers = self.observers.lock();
        observers.retain(|o| match o.upgrade() {
            Some(o) => {
                o.invalidate(&inv);
                true
            }
            None => false,
        });
    }

    /// Adds an observer; it is dropped from the list when it is freed.
    pub(crate) fn register(&self, observer: &Arc<dyn InvalidationObserver>) {
        self.observers.lock().push(Arc::downgrade(observer));
    }

    /// How many invalidations happened so far (`mmu_invalidate_seq`): a
    /// cached translation taken at sequence `s` is stale once this moves.
    pub(crate) fn seq(&self) -> u64 {
        self.seq.0.load(Ordering::Acquire)
    }

    /// The sequence itself, for the vCPUs' check.
    pub(crate) fn seq_atomic(&self) -> &AtomicU64 {
        &self.seq.0
    }

    /// Adds a vCPU whose accesses invalidations must wait out.
    pub(crate) fn add_reader(&self, epoch: &Arc<AccessEpoch>) {
        self.readers.lock().push(epoch.clone());
    }

    /// Removes a vCPU that is going away.
    pub(crate) fn remove_reader(&self, epoch: &Arc<AccessEpoch>) {
        self.readers.lock().retain(|r| !Arc::ptr_eq(r, epoch));
    }
}
