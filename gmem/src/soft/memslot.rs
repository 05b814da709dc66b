//! Memslots of one address space: by id and by gfn.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::guest_memfd::GmemInode;
use super::host::HostPin;

/// A memslot's guest_memfd binding.
#[derive(Clone)]
pub(crate) struct GmemBinding {
    /// The bound file's memory; `None` once the file was released: the
    /// slot stays but has forgotten the file (LIFE-5).
    pub(crate) file: Option<Arc<GmemInode>>,
    /// File index of the slot's first page.
    pub(crate) pgoff: u64,
    /// Bound to a file with MMAP: every access goes to the file (FAULT-3).
    pub(crate) gmem_only: bool,
}

/// One memslot.
pub(crate) struct Memslot {
    pub(crate) id: u16,
    pub(crate) base_gfn: u64,
    pub(crate) npages: u64,
    pub(crate) flags: u32,
    pub(crate) userspace_addr: u64,
    pub(crate) gmem: Option<GmemBinding>,
    /// The host mapping the userspace range lies in, held while the slot
    /// lives (rule gmem-safety).
    pub(crate) _host: Option<HostPin>,
}

impl Memslot {
    pub(crate) fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }
}

/// The memslots of one address space.
#[derive(Default)]
pub(crate) struct Memslots {
    by_id: BTreeMap<u16, Memslot>,
    /// base gfn -> slot id. Slots never overlap, so the last slot starting
    /// at or below a gfn is the only one that can hold it.
    by_gfn: BTreeMap<u64, u16>,
}

impl Memslots {
    pub(crate) fn get(&self, id: u16) -> Option<&Memslot> {
        self.by_id.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: u16) -> Option<&mut Memslot> {
        self.by_id.get_mut(&id)
    }

    /// The slot holding `gfn`.
    pub(crate) fn find(&self, gfn: u64) -> Option<&Memslot> {
        let (_, id) = self.by_gfn.range(..=gfn).next_back()?;
        let slot = &self.by_id[id];
        (gfn < slot.end_gfn()).then_some(slot)
    }

    /// A slot other than `except` overlapping `[start, end)`
    /// (`kvm_check_memslot_overlap`).
    pub(crate) fn overlapping(&self, except: u16, start: u64, end: u64) -> Option<&Memslot> {
        self.by_gfn
            .range(..end)
            .rev()
            .map(|(_, id)| &self.by_id[id])
            .find(|s| s.id != except)
            .filter(|s| s.end_gfn() > start)
    }

    /// Slots intersecting `[start, end)`.
    pub(crate) fn intersecting(&self, start: u64, end: u64) -> impl Iterator<Item = &Memslot> {
        let first = self.find(start).map_or(start, |s| s.base_gfn);
        self.by_gfn
            .range(first..end)
            .map(|(_, id)| &self.by_id[id])
            .filter(move |s| s.end_gfn() > start)
    }

    pub(crate) fn insert(&mut self, slot: Memslot) {
        self.by_gfn.insert(slot.base_gfn, slot.id);
        self.by_id.insert(slot.id, slot);
    }

    pub(crate) fn remove(&mut self, id: u16) -> Option<Memslot> {
        let slot = self.by_id.remove(&id)?;
        self.by_gfn.remove(&slot.base_gfn);
        Some(slot)
    }

    /// Every slot, by id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.by_id.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}
