//! Where guest RAM goes: ranges of guest physical memory, the memslots that
//! cover them and the guest_memfd file and offset that back each slot.
//!
//! The default layout is the x86 one VMMs use: RAM from 0 up to
//! [`LOW_RAM_END`], the 32-bit hole above it (MMIO, and the KVM backend's
//! own setup region at [0xE000_0000, 0xE040_0000)), and the rest of RAM from
//! [`HIGH_RAM_START`] (4 GiB).
//!
//! ```
//! use gmem::memory::{Layout, HIGH_RAM_START};
//! let layout = Layout::builder().memory(4 << 30).build()?;
//! assert_eq!(layout.ranges()[1].range.start.0, HIGH_RAM_START);
//! assert_eq!(layout.holes().len(), 1); // the 32-bit hole
//! # Ok::<(), gmem::memory::Error>(())
//! ```

use super::addr::{GmemOffset, GuestAddress, GuestRange};
use super::backing::BackingRequest;
use super::Error;
use crate::uapi::{KVM_MEM_MAX_NR_PAGES, KVM_USER_MEM_SLOTS, PAGE_SIZE};

/// End of RAM below the 32-bit hole in the default layout (3 GiB).
///
/// ```
/// use gmem::memory::{Layout, LOW_RAM_END};
/// let layout = Layout::builder().memory(4 << 30).build().unwrap();
/// assert_eq!(layout.ranges()[0].range.len, LOW_RAM_END);
/// ```
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of RAM above the 32-bit hole in the default layout (4 GiB).
///
/// ```
/// use gmem::memory::{Layout, HIGH_RAM_START};
/// let layout = Layout::builder().memory(4 << 30).build().unwrap();
/// assert_eq!(layout.ranges()[1].range.start.0, HIGH_RAM_START);
/// ```
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The most bytes one memslot may hold (`KVM_MEM_MAX_NR_PAGES` pages).
///
/// ```
/// use gmem::memory::{GuestAddress, Layout, MAX_SLOT_BYTES};
/// let layout = Layout::builder().ram(GuestAddress(0), 2 * MAX_SLOT_BYTES).build().unwrap();
/// assert_eq!(layout.slots().len(), 2);
/// ```
pub const MAX_SLOT_BYTES: u64 = KVM_MEM_MAX_NR_PAGES * PAGE_SIZE;

/// How many guest_memfd files back the RAM ranges
/// ([`LayoutBuilder::file_per_range`] chooses).
///
/// ```
/// use gmem::memory::FilePolicy;
/// assert_eq!(FilePolicy::default(), FilePolicy::PerVm);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilePolicy {
    /// One file for the whole VM; each range at the next offset (the way
    /// a VMM keeps one fd to hand to a device process).
    #[default]
    PerVm,
    /// One file per RAM range, each from offset 0.
    PerRange,
}

/// One range of guest RAM and where it lives in its file.
///
/// ```
/// use gmem::memory::{GuestAddress, Layout};
/// let layout = Layout::builder().memory(1 << 30).build().unwrap();
/// let ram = &layout.ranges()[0];
/// assert_eq!((ram.range.start, ram.range.len), (GuestAddress(0), 1 << 30));
/// assert_eq!((ram.file, ram.offset.0), (0, 0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// The guest physical range.
    pub range: GuestRange,
    /// Index of its guest_memfd in [`Layout::files`].
    pub file: usize,
    /// Offset of its first byte in that file.
    pub offset: GmemOffset,
}

/// One memslot of the layout: `KVM_SET_USER_MEMORY_REGION2` with these
/// values binds it.
///
/// ```
/// use gmem::memory::Layout;
/// let layout = Layout::builder().memory(4 << 30).build().unwrap();
/// let slots = layout.slots();
/// assert_eq!(slots.len(), 2);
/// assert_eq!((slots[1].id, slots[1].offset.0), (1, 3 << 30));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    /// Slot id (address space 0).
    pub id: u32,
    /// The guest physical range it covers.
    pub range: GuestRange,
    /// Index of the RAM range it belongs to.
    pub ram: usize,
    /// Index of its guest_memfd in [`Layout::files`].
    pub file: usize,
    /// `guest_memfd_offset`.
    pub offset: GmemOffset,
}

/// A validated layout: RAM ranges, their memslots and files, and the
/// backing the VMM asked for. Build one with [`Layout::builder`].
///
/// ```
/// use gmem::memory::Layout;
/// let layout = Layout::builder().memory(5 << 30).build().unwrap();
/// assert_eq!(layout.size(), 5 << 30);
/// assert_eq!(layout.files(), &[5 << 30]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    ranges: Vec<RamRange>,
    slots: Vec<Memslot>,
    files: Vec<u64>,
    request: BackingRequest,
}

/// Builds a [`Layout`]: either a RAM size placed around the 32-bit hole
/// ([`LayoutBuilder::memory`]) or explicit ranges ([`LayoutBuilder::ram`]).
///
/// ```
/// use gmem::memory::{BackingRequest, GuestAddress, Layout};
/// let layout = Layout::builder()
///     .ram(GuestAddress(0), 64 << 20)
///     .ram(GuestAddress(1 << 32), 64 << 20)
///     .file_per_range(true)
///     .backing(BackingRequest::Shared)
///     .build()
///     .unwrap();
/// assert_eq!(layout.files(), &[64 << 20, 64 << 20]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct LayoutBuilder {
    memory: Option<u64>,
    ram: Vec<GuestRange>,
    files: FilePolicy,
    request: BackingRequest,
}

impl Layout {
    /// A builder with no RAM yet, one file per VM and
    /// [`BackingRequest::Shared`].
    ///
    /// ```
    /// let err = gmem::memory::Layout::builder().build().unwrap_err();
    /// assert_eq!(err.rule(), "gmem-layout");
    /// ```
    pub fn builder() -> LayoutBuilder {
        LayoutBuilder::default()
    }

    /// The RAM ranges, by guest physical address.
    ///
    /// ```
    /// let layout = gmem::memory::Layout::builder().memory(4 << 30).build().unwrap();
    /// assert_eq!(layout.ranges()[1].range.start.0, 1 << 32);
    /// ```
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// The memslots, by id: one per RAM range, more where a range holds
    /// more than [`MAX_SLOT_BYTES`].
    ///
    /// ```
    /// let layout = gmem::memory::Layout::builder().memory(1 << 20).build().unwrap();
    /// assert_eq!(layout.slots()[0].id, 0);
    /// ```
    pub fn slots(&self) -> &[Memslot] {
        &self.slots
    }

    /// The size of each guest_memfd file.
    ///
    /// ```
    /// let layout = gmem::memory::Layout::builder().memory(1 << 20).build().unwrap();
    /// assert_eq!(layout.files(), &[1 << 20]);
    /// ```
    pub fn files(&self) -> &[u64] {
        &self.files
    }

    /// Total RAM in bytes.
    ///
    /// ```
    /// let layout = gmem::memory::Layout::builder().memory(3 << 20).build().unwrap();
    /// assert_eq!(layout.size(), 3 << 20);
    /// ```
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.range.len).sum()
    }

    /// The gaps between RAM ranges, from guest physical 0 to the end of RAM.
    ///
    /// ```
    /// use gmem::memory::{GuestRange, Layout};
    /// let layout = Layout::builder().memory(4 << 30).build().unwrap();
    /// assert_eq!(layout.holes(), vec![GuestRange::from_bounds(0xC000_0000, 1 << 32)]);
    /// ```
    pub fn holes(&self) -> Vec<GuestRange> {
        let mut holes = Vec::new();
        let mut at = 0;
        for r in &self.ranges {
            if r.range.start.0 > at {
                holes.push(GuestRange::from_bounds(at, r.range.start.0));
            }
            at = r.range.bound();
        }
        holes
    }

    /// What the VMM asked of the backing.
    ///
    /// ```
    /// use gmem::memory::{BackingRequest, Layout};
    /// let layout = Layout::builder().memory(1 << 20).build().unwrap();
    /// assert_eq!(layout.request(), BackingRequest::Shared);
    /// ```
    pub fn request(&self) -> BackingRequest {
        self.request
    }
}

impl LayoutBuilder {
    /// `bytes` of RAM placed the default way: up to [`LOW_RAM_END`] from 0,
    /// the rest from [`HIGH_RAM_START`].
    ///
    /// ```
    /// let layout = gmem::memory::Layout::builder().memory(2 << 30).build().unwrap();
    /// assert_eq!(layout.ranges().len(), 1);
    /// ```
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = Some(bytes);
        self
    }

    /// A RAM range at `start` (page aligned, `len` a page multiple); give
    /// ranges in any order, they must not overlap.
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, Layout};
    /// let layout = Layout::builder().ram(GuestAddress(0x10_0000), 1 << 20).build().unwrap();
    /// assert_eq!(layout.holes().len(), 1);
    /// ```
    pub fn ram(mut self, start: GuestAddress, len: u64) -> Self {
        self.ram.push(GuestRange::new(start, len));
        self
    }

    /// One guest_memfd per RAM range instead of one per VM.
    ///
    /// ```
    /// let layout = gmem::memory::Layout::builder()
    ///     .memory(4 << 30)
    ///     .file_per_range(true)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layout.files().len(), 2);
    /// ```
    pub fn file_per_range(mut self, yes: bool) -> Self {
        self.files = if yes {
            FilePolicy::PerRange
        } else {
            FilePolicy::PerVm
        };
        self
    }

    /// What the backing must offer (default: [`BackingRequest::Shared`]).
    ///
    /// ```
    /// use gmem::memory::{BackingRequest, Layout};
    /// let layout = Layout::builder().memory(1 << 20).backing(BackingRequest::Best).build().unwrap();
    /// assert_eq!(layout.request(), BackingRequest::Best);
    /// ```
    pub fn backing(mut self, request: BackingRequest) -> Self {
        self.request = request;
        self
    }

    /// Checks the ranges and plans slots and files (rule `gmem-layout`,
    /// EINVAL): at least one range, page aligned, not empty, not wrapping,
    /// not overlapping, at most [`KVM_USER_MEM_SLOTS`] slots.
    ///
    /// ```
    /// use gmem::memory::{GuestAddress, Layout};
    /// let err = Layout::builder()
    ///     .ram(GuestAddress(0), 2 << 20)
    ///     .ram(GuestAddress(1 << 20), 2 << 20)
    ///     .build()
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("overlap"), "{err}");
    /// ```
    pub fn build(self) -> Result<Layout, Error> {
        let mut ranges = match (self.memory, self.ram.is_empty()) {
            (Some(_), false) => {
                return Err(Error::layout(
                    "give either a RAM size or RAM ranges, not both",
                ))
            }
            (None, true) => return Err(Error::layout("the layout has no RAM")),
            (Some(bytes), true) => default_ranges(bytes)?,
            (None, false) => self.ram,
        };
        ranges.sort_by_key(|r| r.start.0);
        for r in &ranges {
            if r.len == 0 {
                return Err(Error::layout(format!(
                    "RAM range at {:#x} is empty",
                    r.start.0
                )));
            }
            if !r.is_page_aligned() {
                return Err(Error::layout(format!(
                    "RAM range {r} is not page aligned (start and length must be multiples of {PAGE_SIZE:#x})"
                )));
            }
            if r.end().is_none() {
                return Err(Error::layout(format!(
                    "RAM range {r} wraps the guest physical address space"
                )));
            }
        }
        for w in ranges.windows(2) {
            if w[0].bound() > w[1].start.0 {
                return Err(Error::layout(format!(
                    "RAM ranges {} and {} overlap",
                    w[0], w[1]
                )));
            }
        }
        let (ranges, files) = place_in_files(&ranges, self.files);
        let slots = plan_slots(&ranges)?;
        Ok(Layout {
            ranges,
            slots,
            files,
            request: self.request,
        })
    }
}

/// `bytes` of RAM around the 32-bit hole.
fn default_ranges(bytes: u64) -> Result<Vec<GuestRange>, Error> {
    if bytes == 0 || bytes % PAGE_SIZE != 0 {
        return Err(Error::layout(format!(
            "RAM size {bytes:#x} must be a positive multiple of the page size"
        )));
    }
    let low = bytes.min(LOW_RAM_END);
    let mut ranges = vec![GuestRange::new(GuestAddress(0), low)];
    if bytes > low {
        ranges.push(GuestRange::new(GuestAddress(HIGH_RAM_START), bytes - low));
    }
    Ok(ranges)
}

/// Gives each range its file and offset.
fn place_in_files(ranges: &[GuestRange], policy: FilePolicy) -> (Vec<RamRange>, Vec<u64>) {
    let mut files: Vec<u64> = Vec::new();
    let placed = ranges
        .iter()
        .map(|r| {
            let (file, offset) = match policy {
                FilePolicy::PerRange => {
                    files.push(r.len);
                    (files.len() - 1, 0)
                }
                FilePolicy::PerVm => {
                    if files.is_empty() {
                        files.push(0);
                    }
                    let at = files[0];
                    files[0] += r.len;
                    (0, at)
                }
            };
            RamRange {
                range: *r,
                file,
                offset: GmemOffset(offset),
            }
        })
        .collect();
    (placed, files)
}

/// One slot per range, split where a range exceeds [`MAX_SLOT_BYTES`].
fn plan_slots(ranges: &[RamRange]) -> Result<Vec<Memslot>, Error> {
    let mut slots = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let mut done = 0;
        while done < r.range.len {
            let len = (r.range.len - done).min(MAX_SLOT_BYTES);
            if slots.len() as u32 >= KVM_USER_MEM_SLOTS {
                return Err(Error::layout(format!(
                    "the layout needs more than {KVM_USER_MEM_SLOTS} memslots"
                )));
            }
            slots.push(Memslot {
                id: slots.len() as u32,
                range: GuestRange::new(GuestAddress(r.range.start.0 + done), len),
                ram: i,
                file: r.file,
                offset: GmemOffset(r.offset.0 + done),
            });
            done += len;
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gmem-layout: the default hole covers the KVM backend's setup region.
    #[test]
    fn default_hole_covers_the_kvm_setup_region() {
        let layout = Layout::builder().memory(8 << 30).build().unwrap();
        let hole = layout.holes()[0];
        let setup = GuestRange::from_bounds(0xE000_0000, 0xE040_0000);
        assert_eq!(hole.intersect(&setup), Some(setup));
    }

    /// gmem-layout: a range larger than a memslot takes several slots, at
    /// consecutive file offsets.
    #[test]
    fn huge_range_is_split_into_slots_at_consecutive_offsets() {
        let len = MAX_SLOT_BYTES + (2 << 20);
        let layout = Layout::builder()
            .ram(GuestAddress(1 << 40), len)
            .build()
            .unwrap();
        let slots = layout.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].range.len, MAX_SLOT_BYTES);
        assert_eq!(slots[1].range.start.0, (1 << 40) + MAX_SLOT_BYTES);
        assert_eq!(slots[1].offset.0, MAX_SLOT_BYTES);
        assert_eq!(slots[1].range.len, 2 << 20);
    }

    /// gmem-layout: one file per VM puts each range at the end of the one before.
    #[test]
    fn one_file_per_vm_places_ranges_back_to_back() {
        let layout = Layout::builder()
            .ram(GuestAddress(1 << 32), 8 << 20)
            .ram(GuestAddress(0), 4 << 20)
            .build()
            .unwrap();
        let r = layout.ranges();
        assert_eq!((r[0].range.start.0, r[0].offset.0), (0, 0));
        assert_eq!((r[1].range.start.0, r[1].offset.0), (1 << 32, 4 << 20));
        assert_eq!(layout.files(), &[12 << 20]);
    }

    /// gmem-layout: malformed ranges are refused with what is wrong.
    #[test]
    fn malformed_ranges_are_refused() {
        for (start, len, why) in [
            (0x1000, 0, "empty"),
            (0x800, 0x1000, "not page aligned"),
            (u64::MAX - 0xfff, 0x2000, "wraps"),
        ] {
            let err = Layout::builder()
                .ram(GuestAddress(start), len)
                .build()
                .unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
            assert_eq!(err.errno(), crate::Errno::EINVAL);
        }
        let err = Layout::builder().memory(0x800).build().unwrap_err();
        assert!(err.to_string().contains("multiple of the page size"));
    }
}
