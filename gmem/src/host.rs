//! Owned host mappings, shared by both backends: anonymous memory for the
//! VMM's RAM and shared file mappings. A [`Mmap`] is unmapped on drop.
//!
//! A mapping covers whole pages: the kernel's VMA for `mmap(addr, len)` is
//! `[addr, addr + PAGE_ALIGN(len))` (mm/mmap.c: `do_mmap`), so every byte
//! of the last page can be touched. [`Mmap::len`] is that length, and it
//! bounds every access.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::{Errno, Error, Result};
use crate::hypervisor::HostFault;
use crate::uapi::PAGE_SIZE;

/// A PMD-mapped huge page on x86-64.
const HPAGE_SIZE: u64 = 2 << 20;

/// One `mmap(2)` region, owned: unmapped when dropped.
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    /// The length asked for, rounded up to a whole page: what the VMA
    /// covers.
    len: usize,
    /// Bytes of inaccessible guard pages owned on each side
    /// ([`Mmap::host_memory`]), unmapped with the region.
    guard: usize,
}

// SAFETY: the mapping is plain memory with no thread affinity; every access
// goes through volatile copies that tolerate concurrent writers.
unsafe impl Send for Mmap {}
// SAFETY: as above; &Mmap only hands out copies, never references into it.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// `len` bytes of private anonymous memory, allocated on first touch.
    pub fn anonymous(len: u64) -> Result<Mmap> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )
    }

    /// `len` bytes of private anonymous memory for the VMM (`host_memory`
    /// of either backend), in a VMA of its own. The kernel merges adjacent
    /// anonymous mappings of the same flags into one VMA (`vma_merge_new_range`,
    /// mm/vma.c), and a merged mapping shares its neighbour's state: the
    /// `anon_vma` a written page gives it, and the extent `MADV_COLLAPSE`
    /// checks huge-page alignment against (`__thp_vma_allowable_orders`,
    /// mm/huge_memory.c, refuses a VMA without an `anon_vma` and one with no
    /// whole huge page), so what advice does would depend on where the memory
    /// happened to land. An inaccessible guard page on each side keeps it
    /// alone, and memory of at least a huge page starts on a huge-page
    /// boundary, as `__get_unmapped_area` (mm/mmap.c) places anonymous
    /// memory whose length is a multiple of one; here for every such length,
    /// so that where the huge pages fall never depends on placement either.
    pub fn host_memory(len: u64) -> Result<Mmap> {
        let page = PAGE_SIZE as usize;
        let align = if len >= HPAGE_SIZE {
            HPAGE_SIZE as usize
        } else {
            page
        };
        let Some((map_len, total)) = usize::try_from(len)
            .ok()
            .filter(|l| *l > 0)
            .and_then(|l| l.checked_next_multiple_of(page))
            .and_then(|m| Some((m, m.checked_add(2 * page + (align - page))?)))
        else {
            // Zero or too long: the kernel's own answer.
            return Self::anonymous(len);
        };
        let reserved = Self::map_prot(
            total as u64,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )?;
        let base = reserved.addr() as usize;
        let start = (base + page).next_multiple_of(align);
        // SAFETY: MAP_FIXED over [start, start + map_len), which lies inside
        // the reservation just made, which nothing but this function knows.
        let ptr = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os_error(format_args!(
                "mmap of {len:#x} bytes of host memory"
            )));
        }
        // From here on the reservation is given back piece by piece: the
        // slack before the lower guard page and after the upper one.
        std::mem::forget(reserved);
        let (lo, hi) = (start - page, start + map_len + page);
        for (at, n) in [(base, lo - base), (hi, base + total - hi)] {
            if n > 0 {
                // SAFETY: [at, at + n) is slack of the reservation, unused.
                unsafe { libc::munmap(at as *mut libc::c_void, n) };
            }
        }
        Ok(Mmap {
            ptr: NonNull::new(ptr.cast())
                .expect("a fixed mapping inside a reservation is not NULL"),
            len: map_len,
            guard: page,
        })
    }

    /// Gives the pages back but keeps the addresses: the mapping (and its
    /// guard pages) is replaced, atomically (`MAP_FIXED`), by an inaccessible
    /// anonymous one, which the returned [`Reservation`] owns. A guest that
    /// still reaches these addresses finds nothing there, and no later
    /// mapping can land on them while the reservation lives. If the kernel
    /// refuses, the mapping comes back unchanged (`Err`): keeping the memory
    /// is a leak, never a dangling address.
    pub fn into_reservation(self) -> std::result::Result<Reservation, Mmap> {
        let start = self.addr() as usize - self.guard;
        let len = self.len + 2 * self.guard;
        match Reservation::map(start, len, true) {
            Ok(r) => {
                // The reservation owns the range now.
                std::mem::forget(self);
                Ok(r)
            }
            Err(_) => Err(self),
        }
    }

    /// A `MAP_SHARED` mapping of `len` bytes of `fd` from `offset`. One of
    /// at least a huge page from a huge-page-aligned offset starts at a
    /// huge-page-aligned address, as `thp_get_unmapped_area` places
    /// anonymous memory: only then can huge-page advice (`MADV_COLLAPSE`,
    /// MMAP-6) act on the file at all, so only then does refusing it mean
    /// anything.
    pub fn shared(fd: BorrowedFd<'_>, offset: i64, len: u64) -> Result<Mmap> {
        if len >= HPAGE_SIZE && offset as u64 % HPAGE_SIZE == 0 {
            if let Some(m) = Self::map_hpage_aligned(fd, offset, len) {
                return m;
            }
        }
        Self::map(len, libc::MAP_SHARED, Some(fd), offset)
    }

    /// The mapping of [`Mmap::shared`] inside a reservation of `len` plus a
    /// huge page, at its first huge-page boundary; `None` when there is no
    /// room for the reservation, and the caller maps as usual (and sees the
    /// kernel's errors).
    fn map_hpage_aligned(fd: BorrowedFd<'_>, offset: i64, len: u64) -> Option<Result<Mmap>> {
        let ulen = usize::try_from(len.checked_next_multiple_of(PAGE_SIZE)?).ok()?;
        let hpage = HPAGE_SIZE as usize;
        // An inaccessible reservation of the length plus a huge page, which
        // only this function knows of.
        let Ok(reserved) = Self::map_prot(
            ulen.checked_add(hpage)? as u64,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        ) else {
            return None;
        };
        let start = reserved.addr() as usize;
        let total = reserved.len;
        // From here on the reservation is unmapped piece by piece.
        std::mem::forget(reserved);
        let give_back = |at: usize, n: usize| {
            if n > 0 {
                // SAFETY: [at, at + n) lies inside the reservation, which
                // nothing but this function knows of.
                unsafe { libc::munmap(at as *mut libc::c_void, n) };
            }
        };
        // Map the file over the reservation at its first huge-page
        // boundary: MAP_FIXED replaces our own pages atomically, so no other
        // thread's mapping can take the place in between; then give back
        // the slack on both sides.
        let aligned = start.next_multiple_of(hpage);
        // SAFETY: [aligned, aligned + ulen) lies inside the reservation
        // (it is a huge page longer than ulen), which nothing else uses.
        let ptr = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            let errno = nix::errno::Errno::last();
            give_back(start, total);
            return Some(Err(Error::kernel(
                errno,
                format_args!("mmap of {len:#x} bytes at offset {offset:#x}"),
            )));
        }
        give_back(start, aligned - start);
        give_back(aligned + ulen, start + total - (aligned + ulen));
        Some(Ok(Mmap {
            ptr: NonNull::new(ptr.cast()).expect("a mapping at a non-null hint is not NULL"),
            len: ulen,
            guard: 0,
        }))
    }

    fn map(len: u64, flags: i32, fd: Option<BorrowedFd<'_>>, offset: i64) -> Result<Mmap> {
        Self::map_prot(len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset)
    }

    fn map_prot(
        len: u64,
        prot: i32,
        flags: i32,
        fd: Option<BorrowedFd<'_>>,
        offset: i64,
    ) -> Result<Mmap> {
        // The kernel maps whole pages (`do_mmap`: `len = PAGE_ALIGN(len)`,
        // ENOMEM when that wraps).
        let pages = len.checked_next_multiple_of(PAGE_SIZE);
        let Some(Ok(ulen)) = pages.map(usize::try_from) else {
            return Err(Error::new(
                nix::errno::Errno::ENOMEM,
                "kernel",
                format!("mmap length {len:#x} does not fit the address space"),
            ));
        };
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED) cannot
        // alias memory Rust already owns; failure is checked below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), ulen, prot, flags, raw_fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os_error(format_args!(
                "mmap of {len:#x} bytes at offset {offset:#x}"
            )));
        }
        Ok(Mmap {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns NULL without MAP_FIXED"),
            len: ulen,
            guard: 0,
        })
    }

    /// The address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Raw pointer to the first byte, for device access and interop.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes: what the kernel's VMA covers, the length asked for
    /// rounded up to a whole page. Every byte of it may be accessed.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Never true: mmap refuses length 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `[offset, offset + len)` lies inside the mapping.
    pub fn check_range(&self, offset: u64, len: usize) -> std::result::Result<(), HostFault> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(HostFault::OutOfRange {
                offset,
                len: len as u64,
                size: self.len(),
            }),
        }
    }

    /// Copies out of the mapping. The caller has made sure the pages can be
    /// touched without a signal (anonymous memory always can). An aligned
    /// access of 2, 4 or 8 bytes is one load, as a CPU's would be: a
    /// concurrent store is seen whole or not at all.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), HostFault> {
        self.check_range(offset, buf.len())?;
        // SAFETY: in bounds (checked above) of a live mapping we own;
        // volatile because the guest or another mapping may write it.
        let p = unsafe { self.as_ptr().add(offset as usize) };
        match buf.len() {
            // SAFETY (all arms): p is in bounds and aligned to the width.
            8 if p.cast::<u64>().is_aligned() => {
                buf.copy_from_slice(&unsafe { p.cast::<u64>().read_volatile() }.to_ne_bytes())
            }
            4 if p.cast::<u32>().is_aligned() => {
                buf.copy_from_slice(&unsafe { p.cast::<u32>().read_volatile() }.to_ne_bytes())
            }
            2 if p.cast::<u16>().is_aligned() => {
                buf.copy_from_slice(&unsafe { p.cast::<u16>().read_volatile() }.to_ne_bytes())
            }
            // A long copy of whole aligned words (a page of a guest loop):
            // word by word, 8 times fewer accesses than byte by byte.
            n if n % 8 == 0 && p.cast::<u64>().is_aligned() => {
                for (i, w) in buf.chunks_exact_mut(8).enumerate() {
                    // SAFETY: p + 8i is in bounds (checked above), aligned.
                    let v = unsafe { p.cast::<u64>().add(i).read_volatile() };
                    w.copy_from_slice(&v.to_ne_bytes());
                }
            }
            _ => {
                for (i, b) in buf.iter_mut().enumerate() {
                    // SAFETY: p + i is in bounds (checked above).
                    *b = unsafe { p.add(i).read_volatile() };
                }
            }
        }
        Ok(())
    }

    /// Copies into the mapping; see [`Mmap::read`].
    pub fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), HostFault> {
        self.check_range(offset, buf.len())?;
        // SAFETY: in bounds (checked above) of a live, writable mapping.
        let p = unsafe { self.as_ptr().add(offset as usize) };
        match buf.len() {
            // SAFETY (all arms): p is in bounds and aligned to the width.
            8 if p.cast::<u64>().is_aligned() => unsafe {
                p.cast::<u64>()
                    .write_volatile(u64::from_ne_bytes(buf.try_into().expect("8 bytes")))
            },
            4 if p.cast::<u32>().is_aligned() => unsafe {
                p.cast::<u32>()
                    .write_volatile(u32::from_ne_bytes(buf.try_into().expect("4 bytes")))
            },
            2 if p.cast::<u16>().is_aligned() => unsafe {
                p.cast::<u16>()
                    .write_volatile(u16::from_ne_bytes(buf.try_into().expect("2 bytes")))
            },
            n if n % 8 == 0 && p.cast::<u64>().is_aligned() => {
                for (i, w) in buf.chunks_exact(8).enumerate() {
                    let v = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
                    // SAFETY: p + 8i is in bounds (checked above), aligned.
                    unsafe { p.cast::<u64>().add(i).write_volatile(v) };
                }
            }
            _ => {
                for (i, b) in buf.iter().enumerate() {
                    // SAFETY: p + i is in bounds (checked above).
                    unsafe { p.add(i).write_volatile(*b) };
                }
            }
        }
        Ok(())
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        let start = self.ptr.as_ptr().wrapping_sub(self.guard);
        // SAFETY: unmaps exactly the region mmap gave us and its guard
        // pages; no reference into it outlives self (only copies are handed
        // out).
        unsafe { libc::munmap(start.cast(), self.len + 2 * self.guard) };
    }
}

/// Addresses kept inaccessible (`PROT_NONE`), so that nothing else is
/// mapped there: a guest access finds no memory, a host access would fault.
/// Unmapped on drop.
#[derive(Debug)]
pub struct Reservation {
    addr: usize,
    len: usize,
}

impl Reservation {
    /// Reserves `[addr, addr + len)`: over what is there (`replace`, which
    /// the caller owns and gives up), or only where nothing is mapped
    /// (`MAP_FIXED_NOREPLACE`, `EEXIST` otherwise). The errno on failure.
    pub(crate) fn map(addr: usize, len: usize, replace: bool) -> std::result::Result<Self, Errno> {
        let fixed = if replace {
            libc::MAP_FIXED
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
        // SAFETY: the range is either a mapping the caller owns and gives up
        // (replace), or unmapped (NOREPLACE refuses anything else): no
        // memory Rust uses is touched.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        if p as usize != addr {
            // A kernel without MAP_FIXED_NOREPLACE placed it elsewhere.
            // SAFETY: unmaps the mapping just created, which nobody uses.
            unsafe { libc::munmap(p, len) };
            return Err(Errno::EEXIST);
        }
        Ok(Reservation { addr, len })
    }

    /// The first address reserved.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Bytes reserved.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Never true: a reservation covers at least a page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: an inaccessible mapping only this value knows of.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn anonymous_memory_reads_zero_and_keeps_writes() {
        let m = Mmap::anonymous(8192).unwrap();
        let mut b = [1u8; 2];
        m.read(4095, &mut b).unwrap();
        assert_eq!(b, [0, 0]);
        m.write(4095, &[7, 8]).unwrap();
        m.read(4095, &mut b).unwrap();
        assert_eq!(b, [7, 8]);
    }

    #[test]
    fn huge_page_sized_file_mappings_start_on_a_huge_page() {
        let fd = crate::soft::guest_memfd::memfd("gmem-test", libc::MFD_CLOEXEC).unwrap();
        // SAFETY: ftruncate on the memfd just made.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 8 << 20) }, 0);
        for (offset, len, aligned) in [
            (0, HPAGE_SIZE, true),
            (2 << 20, 3 << 20, true),
            (0, HPAGE_SIZE - 4096, false),
            (4096, HPAGE_SIZE, false),
        ] {
            let maps: Vec<Mmap> = (0..4)
                .map(|_| Mmap::shared(fd.as_fd(), offset, len).unwrap())
                .collect();
            let all = maps.iter().all(|m| m.addr() % HPAGE_SIZE == 0);
            assert!(!aligned || all, "{offset:#x} {len:#x}");
            maps[0].write(len - 1, &[7]).unwrap();
            let mut b = [0];
            maps[3].read(len - 1, &mut b).unwrap();
            assert_eq!(b, [7]);
        }
    }

    #[test]
    fn a_mapping_covers_its_length_rounded_up_to_a_page() {
        let m = Mmap::anonymous(1).unwrap();
        assert_eq!(m.len(), 4096);
        m.write(4095, &[9]).unwrap();
        let mut b = [0];
        m.read(4095, &mut b).unwrap();
        assert_eq!(b, [9]);
        assert!(matches!(
            m.write(4096, &[0]),
            Err(HostFault::OutOfRange { size: 4096, .. })
        ));
        assert!(Mmap::anonymous(u64::MAX).is_err());
    }

    #[test]
    fn access_past_the_mapping_is_out_of_range() {
        let m = Mmap::anonymous(4096).unwrap();
        assert!(matches!(
            m.write(4095, &[0, 0]),
            Err(HostFault::OutOfRange { .. })
        ));
        assert!(matches!(
            m.read(u64::MAX, &mut [0]),
            Err(HostFault::OutOfRange { .. })
        ));
    }

    /// The VMAs of this process covering any of `[addr, addr + len)`.
    fn vmas(addr: u64, len: u64) -> Vec<(u64, u64)> {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                let (a, b) = (
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                );
                (a < addr + len && b > addr).then_some((a, b))
            })
            .collect()
    }

    /// gmem-host: host memory is a VMA of its own, whatever its neighbours,
    /// and starts on a huge page from a huge page's length on.
    #[test]
    fn host_memory_is_a_vma_of_its_own() {
        for len in [4096, 5000, HPAGE_SIZE, HPAGE_SIZE + 4096, 3 * HPAGE_SIZE] {
            let maps: Vec<Mmap> = (0..3).map(|_| Mmap::host_memory(len).unwrap()).collect();
            for m in &maps {
                m.write(0, &[1]).unwrap();
                let end = m.addr() + len.next_multiple_of(PAGE_SIZE);
                assert_eq!(vmas(m.addr(), m.len()), [(m.addr(), end)], "{len:#x}");
                assert!(len < HPAGE_SIZE || m.addr() % HPAGE_SIZE == 0, "{len:#x}");
            }
        }
        assert!(Mmap::host_memory(0).is_err());
    }

    /// gmem-safety: a reservation keeps the addresses of a mapping, guard
    /// pages included: nothing else can be mapped there.
    #[test]
    fn a_reservation_keeps_the_addresses() {
        let m = Mmap::host_memory(8192).unwrap();
        m.write(0, &[1]).unwrap();
        let (addr, lo) = (m.addr(), m.addr() - 4096);
        let r = m.into_reservation().unwrap();
        assert_eq!((r.addr(), r.len()), (lo, 4 * 4096));
        assert_eq!(vmas(addr, 8192).len(), 1);
        assert_eq!(
            Reservation::map(addr as usize, 4096, false).unwrap_err(),
            Errno::EEXIST
        );
    }
}
