//! One type per address space, so that a guest physical address is never
//! taken for a file offset or a host address: [`GuestAddress`] (vm-memory's)
//! for guest physical addresses, [`GmemOffset`] for offsets into a
//! guest_memfd, [`HostAddress`] for the VMM's own virtual addresses, and
//! [`GuestRange`] for a run of guest physical memory.
//!
//! ```
//! use gmem::memory::{GmemOffset, GuestAddress, GuestRange};
//! let ram = GuestRange::new(GuestAddress(0x10_0000), 0x2000);
//! assert!(ram.contains(GuestAddress(0x10_1fff)));
//! let offset = GmemOffset(0x4000); // a file offset, never taken for a gpa
//! assert_eq!(offset.to_string(), "0x4000");
//! ```

use std::fmt;

pub use vm_memory::GuestAddress;

use crate::uapi::page_aligned;

/// A byte offset into a guest_memfd file (the kernel's `pgoff` times the
/// page size): where a memslot's first page lives in its file.
///
/// ```
/// use gmem::memory::GmemOffset;
/// let off = GmemOffset(0x20_0000);
/// assert_eq!(off.to_string(), "0x200000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GmemOffset(pub u64);

/// A virtual address in the VMM's own address space (a memslot's
/// `userspace_addr`, or where a host mapping starts).
///
/// ```
/// use gmem::memory::HostAddress;
/// assert_eq!(HostAddress(0x7f00_0000_0000).to_string(), "0x7f0000000000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostAddress(pub u64);

impl fmt::Display for GmemOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// `len` bytes of guest physical memory from `start`. A plain value: every
/// operation that takes one checks it (alignment, wrapping, being RAM) and
/// says what is wrong.
///
/// ```
/// use gmem::memory::{GuestAddress, GuestRange};
/// let r = GuestRange::new(GuestAddress(0x1000), 0x2000);
/// assert_eq!(r.end(), Some(GuestAddress(0x3000)));
/// assert_eq!(r.to_string(), "[0x1000, 0x3000)");
/// assert!(r.is_page_aligned());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    /// First guest physical address.
    pub start: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// The range `[start, start + len)`.
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, GuestRange};
    /// assert_eq!(GuestRange::new(GuestAddress(0), 4096).len, 4096);
    /// ```
    pub const fn new(start: GuestAddress, len: u64) -> Self {
        GuestRange { start, len }
    }

    /// The range `[start, end)`; empty when `end <= start`.
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, GuestRange};
    /// let r = GuestRange::from_bounds(0x1000, 0x3000);
    /// assert_eq!(r, GuestRange::new(GuestAddress(0x1000), 0x2000));
    /// ```
    pub const fn from_bounds(start: u64, end: u64) -> Self {
        GuestRange {
            start: GuestAddress(start),
            len: end.saturating_sub(start),
        }
    }

    /// One past the last byte, or `None` when the range wraps the 64-bit
    /// address space.
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, GuestRange};
    /// assert_eq!(GuestRange::new(GuestAddress(u64::MAX), 2).end(), None);
    /// ```
    pub fn end(&self) -> Option<GuestAddress> {
        self.start.0.checked_add(self.len).map(GuestAddress)
    }

    /// Do both ends fall on page boundaries?
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, GuestRange};
    /// assert!(!GuestRange::new(GuestAddress(0x1000), 0x800).is_page_aligned());
    /// ```
    pub fn is_page_aligned(&self) -> bool {
        page_aligned(self.start.0) && page_aligned(self.len)
    }

    /// Does the range hold `gpa`?
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, GuestRange};
    /// let r = GuestRange::new(GuestAddress(0x1000), 0x1000);
    /// assert!(r.contains(GuestAddress(0x1fff)) && !r.contains(GuestAddress(0x2000)));
    /// ```
    pub fn contains(&self, gpa: GuestAddress) -> bool {
        gpa.0 >= self.start.0 && gpa.0 - self.start.0 < self.len
    }

    /// The part of `self` that lies in `other`, if any.
    ///
    /// ```
    /// use gmem::memory::GuestRange;
    /// let a = GuestRange::from_bounds(0x1000, 0x4000);
    /// let b = GuestRange::from_bounds(0x3000, 0x8000);
    /// assert_eq!(a.intersect(&b), Some(GuestRange::from_bounds(0x3000, 0x4000)));
    /// ```
    pub fn intersect(&self, other: &GuestRange) -> Option<GuestRange> {
        let start = self.start.0.max(other.start.0);
        let end = self.bound().min(other.bound());
        (start < end).then(|| GuestRange::from_bounds(start, end))
    }

    /// The end, saturated at `u64::MAX` (for ranges already checked).
    pub(crate) fn bound(&self) -> u64 {
        self.start.0.saturating_add(self.len)
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "[{:#x}, {:#x})", self.start.0, end.0),
            None => write!(f, "[{:#x}, +{:#x})", self.start.0, self.len),
        }
    }
}

/// Bytes as people read them: `1 GiB`, `384 MiB`, `12 KiB`, `512 B`.
///
/// ```
/// assert_eq!(gmem::memory::human_bytes(3 << 29), "1.5 GiB");
/// assert_eq!(gmem::memory::human_bytes(4096), "4 KiB");
/// ```
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut v = n as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_range_shows_its_length() {
        let r = GuestRange::new(GuestAddress(u64::MAX - 0xfff), 0x2000);
        assert_eq!(r.to_string(), "[0xfffffffffffff000, +0x2000)");
        assert_eq!(r.end(), None);
    }

    #[test]
    fn disjoint_ranges_do_not_intersect() {
        let a = GuestRange::from_bounds(0, 0x1000);
        let b = GuestRange::from_bounds(0x1000, 0x2000);
        assert_eq!(a.intersect(&b), None);
    }
}
