//! `madvise(2)` on host mappings, with the advice a VMM gives guest memory
//! as a typed value (MMAP-6..MMAP-9, docs/spec.md section 4).
//!
//! What the kernel does with advice on a guest_memfd mapping follows from
//! what the mapping is: a shared mapping of a pseudo-filesystem file whose
//! page cache holds only order-0, unevictable folios. So huge-page collapse
//! is refused (MMAP-6, `madvise_collapse` in mm/khugepaged.c), `MADV_REMOVE`
//! punches the file (MMAP-7, `madvise_remove` in mm/madvise.c calls
//! `vfs_fallocate`), `MADV_DONTNEED` only unmaps (MMAP-8) and the populate
//! advice faults pages in as touches would (MMAP-9).

use std::fmt;
use std::str::FromStr;

use crate::error::{Errno, Error, Result};
use crate::uapi::{page_aligned, PAGE_SIZE};

/// The `MADV_*` advice that matters to a VMM's guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Advice {
    /// `MADV_HUGEPAGE`: back the range with huge pages where possible.
    Hugepage,
    /// `MADV_NOHUGEPAGE`: never back the range with huge pages.
    NoHugepage,
    /// `MADV_COLLAPSE` (6.1): collapse the range into huge pages now.
    Collapse,
    /// `MADV_WILLNEED`: read the range ahead.
    WillNeed,
    /// `MADV_COLD` (5.4): the range may be reclaimed first.
    Cold,
    /// `MADV_PAGEOUT` (5.4): reclaim the range now.
    Pageout,
    /// `MADV_DONTNEED`: unmap the range from this mapping.
    DontNeed,
    /// `MADV_FREE` (4.5): free private anonymous pages lazily.
    Free,
    /// `MADV_REMOVE`: free the range and its backing store (punch a hole).
    Remove,
    /// `MADV_POPULATE_READ` (5.14): fault the range in readable.
    PopulateRead,
    /// `MADV_POPULATE_WRITE` (5.14): fault the range in writable.
    PopulateWrite,
}

impl Advice {
    /// Every advice, in `MADV_*` order.
    pub const ALL: [Advice; 11] = [
        Advice::WillNeed,
        Advice::DontNeed,
        Advice::Free,
        Advice::Remove,
        Advice::Hugepage,
        Advice::NoHugepage,
        Advice::Cold,
        Advice::Pageout,
        Advice::PopulateRead,
        Advice::PopulateWrite,
        Advice::Collapse,
    ];

    /// `collapse`, `dontneed`, ...: the names scenarios use.
    pub fn name(self) -> &'static str {
        match self {
            Advice::Hugepage => "hugepage",
            Advice::NoHugepage => "nohugepage",
            Advice::Collapse => "collapse",
            Advice::WillNeed => "willneed",
            Advice::Cold => "cold",
            Advice::Pageout => "pageout",
            Advice::DontNeed => "dontneed",
            Advice::Free => "free",
            Advice::Remove => "remove",
            Advice::PopulateRead => "populate_read",
            Advice::PopulateWrite => "populate_write",
        }
    }

    /// The `MADV_*` value.
    pub fn raw(self) -> libc::c_int {
        match self {
            Advice::Hugepage => libc::MADV_HUGEPAGE,
            Advice::NoHugepage => libc::MADV_NOHUGEPAGE,
            Advice::Collapse => libc::MADV_COLLAPSE,
            Advice::WillNeed => libc::MADV_WILLNEED,
            Advice::Cold => libc::MADV_COLD,
            Advice::Pageout => libc::MADV_PAGEOUT,
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Free => libc::MADV_FREE,
            Advice::Remove => libc::MADV_REMOVE,
            Advice::PopulateRead => libc::MADV_POPULATE_READ,
            Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
        }
    }

    /// The names, for help texts.
    pub fn names() -> String {
        Advice::ALL.map(Advice::name).join(", ")
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Advice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Advice::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("`{s}` is not an advice; advice: {}", Advice::names()))
    }
}

/// The checks of `madvise_should_skip` (mm/madvise.c) for the range of
/// `len` bytes at `offset` of the mapping of `map_len` bytes at `addr`, in
/// their order: an unaligned start or a range whose end wraps is EINVAL, a
/// length of 0 does nothing (`None`); then gmem refuses a range leaving the
/// mapping with ENOMEM, the kernel's errno for an unmapped range, before the
/// call could reach memory the mapping does not own (MMAP-8). Returns the
/// length rounded up to pages.
pub(crate) fn check(
    addr: u64,
    map_len: u64,
    offset: u64,
    len: u64,
    advice: Advice,
) -> Result<Option<u64>> {
    if !page_aligned(offset) {
        return Err(Error::new(
            Errno::EINVAL,
            "MMAP-8",
            format!("madvise({advice}) at offset {offset:#x}: not page aligned"),
        ));
    }
    let aligned = len.checked_next_multiple_of(PAGE_SIZE);
    let Some(end) = aligned
        .and_then(|l| offset.checked_add(l))
        .filter(|end| addr.checked_add(*end).is_some())
    else {
        return Err(Error::new(
            Errno::EINVAL,
            "MMAP-8",
            format!("madvise({advice}) of {len:#x} bytes at offset {offset:#x} wraps"),
        ));
    };
    if len == 0 {
        return Ok(None);
    }
    if end > map_len {
        return Err(Error::new(
            Errno::ENOMEM,
            "MMAP-8",
            format!(
                "madvise({advice}) of {len:#x} bytes at offset {offset:#x} leaves the {map_len:#x}-byte mapping"
            ),
        ));
    }
    Ok(Some(end - offset))
}

/// `madvise(2)` on `[offset, offset + len)` of the mapping of `map_len`
/// bytes at `addr`, by the running kernel, after [`check`].
pub(crate) fn madvise(
    addr: u64,
    map_len: u64,
    offset: u64,
    len: u64,
    advice: Advice,
) -> Result<()> {
    match check(addr, map_len, offset, len, advice)? {
        Some(len) => raw(addr + offset, len, advice),
        None => Ok(()),
    }
}

/// The system call on `[addr, addr + len)`, which the caller has checked
/// lies in one mapping it owns.
pub(crate) fn raw(addr: u64, len: u64, advice: Advice) -> Result<()> {
    // SAFETY: the range lies inside a mapping the caller owns (checked by
    // the caller); advice changes that mapping's pages or page tables only,
    // which every access of this crate tolerates (copies, never references).
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice.raw()) };
    if r != 0 {
        return Err(Error::last_os_error(format_args!(
            "madvise({advice}) of {len:#x} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_parses_as_it_prints() {
        for a in Advice::ALL {
            assert_eq!(a.name().parse::<Advice>(), Ok(a));
        }
        assert_eq!(Advice::Collapse.raw(), 25);
        assert!("squash".parse::<Advice>().unwrap_err().contains("collapse"));
    }

    #[test]
    fn arguments_are_checked_in_the_kernels_order() {
        let p = PAGE_SIZE;
        let at = 0x7f00_0000_0000;
        assert_eq!(check(at, 4 * p, p, 1, Advice::DontNeed), Ok(Some(p)));
        assert_eq!(
            check(at, 4 * p, 0, 4 * p, Advice::Collapse),
            Ok(Some(4 * p))
        );
        assert_eq!(check(at, 4 * p, 8 * p, 0, Advice::Collapse), Ok(None));
        for (offset, len, errno) in [
            (1, 0, Errno::EINVAL),
            (1, p, Errno::EINVAL),
            (0, u64::MAX, Errno::EINVAL),
            (u64::MAX - p + 1, p, Errno::EINVAL),
            (0, u64::MAX - at, Errno::EINVAL),
            (0, 4 * p + 1, Errno::ENOMEM),
            (4 * p, 1, Errno::ENOMEM),
        ] {
            let e = check(at, 4 * p, offset, len, Advice::Remove).unwrap_err();
            assert_eq!((e.errno, e.rule), (errno, "MMAP-8"), "{offset:#x} {len:#x}");
        }
    }
}
