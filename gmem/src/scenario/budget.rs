//! The memory budget of a scenario run.
//!
//! guest_memfd pages are file pages: neither `ulimit -v` nor an RSS limit
//! stops a three-line scenario from asking for a terabyte. So the runner
//! accounts, before each operation, what the operation could make the
//! scenario hold, and does not perform one that would take the run past its
//! budget: the line's outcome is [`Outcome::OverBudget`](super::Outcome),
//! which no expectation accepts.
//!
//! What is counted, per run (everything is released when the run ends):
//! - file pages: `fallocate` allocate, host accesses through a mapping of
//!   the file, guest accesses through a slot bound to it; released by punch
//!   hole and when the file is released (its fd and every mapping closed);
//! - host memory pages: host accesses, and guest accesses served from it;
//!   released when the handle is closed;
//! - per object: a fixed cost for each file, VM and vCPU, and for each
//!   memslot the kernel's per-page metadata (rmap, dirty bitmap);
//! - attributes set to non-zero, at the size of the kernel's xarray entries.
//!
//! A guest access is charged to both places it could touch (the file and
//! `userspace_addr`): a departing kernel may serve it from either.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use rangemap::RangeSet;

use crate::uapi::PAGE_SIZE;

/// What a scenario run may make the machine hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes: the most a run's files, host memory and kernel objects may
    /// hold at once.
    pub max_memory: u64,
}

/// The share of `MemAvailable` a run may use by default.
pub const DEFAULT_SHARE: u64 = 4;

/// The budget when `MemAvailable` cannot be read.
pub const FALLBACK_MAX_MEMORY: u64 = 256 << 20;

/// What a VM costs the budget on a running kernel ([`Costs`]).
pub const KERNEL_VM_COST: u64 = Costs::KERNEL.vm;

/// The smallest budget `gmem check` takes: a VM, a vCPU, a file and a few
/// pages on a kernel ([`Costs`]) fit with room to spare; below it every
/// scenario would be over budget at its first lines.
pub const MIN_MAX_MEMORY: u64 = 1 << 20;

impl Limits {
    /// A budget of `max_memory` bytes.
    pub fn new(max_memory: u64) -> Self {
        Limits { max_memory }
    }

    /// The default: a quarter of the memory available now
    /// ([`mem_available`]), or 256 MiB when that cannot be read.
    pub fn for_this_machine() -> Self {
        Limits::new(mem_available().map_or(FALLBACK_MAX_MEMORY, |m| m / DEFAULT_SHARE))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::for_this_machine()
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes in binary units for messages: `1.0 TiB`, `256 MiB`, `12 KiB`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} bytes", self.0)
        } else if v.fract() == 0.0 {
            write!(f, "{v:.0} {}", UNITS[u])
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

/// Fixed costs of kernel objects, per backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Costs {
    pub(crate) file: u64,
    pub(crate) vm: u64,
    pub(crate) vcpu: u64,
    /// Memslot metadata per 4 KiB page of the slot.
    pub(crate) slot_per_page: u64,
    /// Memslot metadata per page with dirty logging on (`log_dirty`).
    pub(crate) slot_dirty_per_page: u64,
    /// Per page whose attributes are not 0.
    pub(crate) attribute_per_page: u64,
}

impl Costs {
    /// The running kernel: a VM and a vCPU measured at about 50 and 35 KiB
    /// here (memory cgroup), doubled and rounded up; a memslot's rmap is 8
    /// bytes a page on kernels that allocate it (shadow paging), its dirty
    /// bitmap two bits; the attribute xarray about 9 bytes an entry.
    const KERNEL: Costs = Costs {
        file: 4 << 10,
        vm: 128 << 10,
        vcpu: 64 << 10,
        slot_per_page: 8,
        slot_dirty_per_page: 1,
        attribute_per_page: 16,
    };

    /// The software backend: files are memfds, slots and attributes are
    /// ranges.
    const SOFT: Costs = Costs {
        file: 4 << 10,
        vm: 16 << 10,
        vcpu: 4 << 10,
        slot_per_page: 0,
        slot_dirty_per_page: 0,
        attribute_per_page: 0,
    };

    pub(crate) fn for_backend(name: &str) -> Costs {
        match name {
            "soft" | "model" => Costs::SOFT,
            _ => Costs::KERNEL,
        }
    }
}

/// Whose pages a charge falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    /// A guest_memfd, by the runner's id for it.
    File(u64),
    /// Host memory, by the runner's id for it.
    Mem(u64),
}

/// What an operation could make the run hold, before it is performed.
#[derive(Debug, Default)]
pub(crate) struct Charge {
    pages: Vec<(Owner, Range<u64>)>,
    fixed: u64,
    what: Vec<String>,
}

impl Charge {
    /// Pages `range` (page indices) of `owner`.
    pub(crate) fn pages(mut self, owner: Owner, range: Range<u64>) -> Self {
        if range.start < range.end {
            self.pages.push((owner, range));
        }
        self
    }

    /// The page ranges charged, by owner.
    pub(crate) fn ranges(self) -> Vec<(Owner, Range<u64>)> {
        self.pages
    }

    /// A fixed number of bytes for an object, described for messages.
    pub(crate) fn fixed(mut self, bytes: u64, what: impl Into<String>) -> Self {
        self.fixed = self.fixed.saturating_add(bytes);
        self.what.push(what.into());
        self
    }
}

/// The pages of `[offset, offset + len)`, clipped to `[0, limit)` bytes.
pub(crate) fn page_range(offset: u64, len: u64, limit: u64) -> Range<u64> {
    let end = offset.saturating_add(len).min(limit);
    if offset >= end {
        return 0..0;
    }
    offset / PAGE_SIZE..end.div_ceil(PAGE_SIZE)
}

/// A run's account.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    held: u64,
    pages: HashMap<Owner, RangeSet<u64>>,
}

/// Why an operation was not performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OverBudget {
    pub(crate) more: u64,
    pub(crate) held: u64,
    pub(crate) limit: u64,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not performed: it could make the scenario hold {} more, {} in all, over its \
             memory budget of {}",
            Bytes(self.more),
            Bytes(self.held.saturating_add(self.more)),
            Bytes(self.limit)
        )
    }
}

fn new_pages(set: Option<&RangeSet<u64>>, range: &Range<u64>) -> u64 {
    let covered: u64 = set.map_or(0, |s| {
        s.overlapping(range)
            .map(|r| r.end.min(range.end) - r.start.max(range.start))
            .sum()
    });
    (range.end - range.start) - covered
}

impl Budget {
    pub(crate) fn new(limits: &Limits) -> Self {
        Budget {
            limit: limits.max_memory,
            held: 0,
            pages: HashMap::new(),
        }
    }

    /// Bytes `charge` would add: pages not held yet, each once.
    fn cost(&self, charge: &Charge) -> u64 {
        let mut wanted: HashMap<Owner, RangeSet<u64>> = HashMap::new();
        for (owner, range) in &charge.pages {
            wanted.entry(*owner).or_default().insert(range.clone());
        }
        let pages: u64 = wanted
            .iter()
            .flat_map(|(owner, set)| set.iter().map(|r| new_pages(self.pages.get(owner), r)))
            .fold(0, u64::saturating_add);
        charge.fixed.saturating_add(pages.saturating_mul(PAGE_SIZE))
    }

    /// Refuses `charge` if it would take the run past its budget.
    pub(crate) fn check(&self, charge: &Charge) -> Result<(), OverBudget> {
        let more = self.cost(charge);
        if self.held.saturating_add(more) > self.limit {
            return Err(OverBudget {
                more,
                held: self.held,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Records `charge` as held.
    pub(crate) fn commit(&mut self, charge: Charge) {
        self.held = self.held.saturating_add(self.cost(&charge));
        for (owner, range) in charge.pages {
            self.pages.entry(owner).or_default().insert(range);
        }
    }

    /// Gives back pages `range` of `owner` (punch hole).
    pub(crate) fn release_pages(&mut self, owner: Owner, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let Some(set) = self.pages.get_mut(&owner) else {
            return;
        };
        let held = (range.end - range.start) - new_pages(Some(set), &range);
        set.remove(range);
        self.held = self.held.saturating_sub(held.saturating_mul(PAGE_SIZE));
    }

    /// Gives back every page of `owner` (closed memory, released file).
    pub(crate) fn release(&mut self, owner: Owner) {
        if let Some(set) = self.pages.remove(&owner) {
            let pages: u64 = set.iter().map(|r| r.end - r.start).sum();
            self.held = self.held.saturating_sub(pages.saturating_mul(PAGE_SIZE));
        }
    }

    /// Gives back fixed bytes.
    pub(crate) fn release_fixed(&mut self, bytes: u64) {
        self.held = self.held.saturating_sub(bytes);
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Owner = Owner::File(1);

    #[test]
    fn pages_are_charged_once_and_released_by_range() {
        let mut b = Budget::new(&Limits::new(16 * PAGE_SIZE));
        b.commit(Charge::default().pages(F, 0..4));
        b.commit(Charge::default().pages(F, 2..6).pages(F, 3..5));
        assert_eq!(b.held(), 6 * PAGE_SIZE);
        b.release_pages(F, 5..100);
        assert_eq!(b.held(), 5 * PAGE_SIZE);
        b.release(F);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_charge_past_the_limit_is_refused_and_says_by_how_much() {
        let b = Budget::new(&Limits::new(16 * PAGE_SIZE));
        let tib = page_range(0, 1 << 40, 1 << 40);
        let e = b.check(&Charge::default().pages(F, tib)).unwrap_err();
        assert_eq!(e.more, 1 << 40);
        assert!(e.to_string().contains("1 TiB more"), "{e}");
        assert!(e.to_string().contains("64 KiB"), "{e}");
    }

    #[test]
    fn the_smallest_budget_holds_a_vm_a_vcpu_a_file_and_a_page_on_a_kernel() {
        let k = Costs::KERNEL;
        let b = Budget::new(&Limits::new(MIN_MAX_MEMORY));
        let charge = Charge::default()
            .fixed(k.vm, "a VM")
            .fixed(k.vcpu, "a vCPU")
            .fixed(k.file, "a file")
            .pages(F, 0..1);
        assert!(b.check(&charge).is_ok());
        assert_eq!(KERNEL_VM_COST, k.vm);
    }

    #[test]
    fn page_ranges_clip_to_the_object() {
        assert_eq!(page_range(0, 1, 8192), 0..1);
        assert_eq!(page_range(4095, 2, 8192), 0..2);
        assert_eq!(page_range(8192, 1, 8192), 0..0);
    }

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(Bytes(1 << 40).to_string(), "1 TiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1.5 GiB");
        assert_eq!(Bytes(12).to_string(), "12 bytes");
    }
}
