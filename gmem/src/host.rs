//! Owned host mappings, shared by both backends: anonymous memory for the
//! VMM's RAM and shared file mappings. A [`Mmap`] is unmapped on drop.
//!
//! A mapping covers whole pages: the kernel's VMA for `mmap(addr, len)` is
//! `[addr, addr + PAGE_ALIGN(len))` (mm/mmap.c: `do_mmap`), so every byte
//! of the last page can be touched. [`Mmap::len`] is that length, and it
//! bounds every access.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};
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
    /// room, and the caller maps as usual (and sees the kernel's errors).
    fn map_hpage_aligned(fd: BorrowedFd<'_>, offset: i64, len: u64) -> Option<Result<Mmap>> {
        let ulen = usize::try_from(len.checked_next_multiple_of(PAGE_SIZE)?).ok()?;
        let hpage = HPAGE_SIZE as usize;
        let Ok(reserved) = Self::map(
            ulen.checked_add(hpage)? as u64,
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
        // Map the file at the first huge-page boundary of the reservation,
        // into a hole made for it, without replacing whatever might take the
        // hole first; then give back the slack on both sides.
        let aligned = start.next_multiple_of(hpage);
        give_back(aligned, ulen);
        // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping: it fails
        // with EEXIST if the hole is no longer free.
        let ptr = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                fd.as_raw_fd(),
                offset,
            )
        };
        let errno = nix::errno::Errno::last();
        give_back(start, aligned - start);
        give_back(aligned + ulen, start + total - (aligned + ulen));
        if ptr == libc::MAP_FAILED {
            return (errno != nix::errno::Errno::EEXIST).then(|| {
                Err(Error::kernel(
                    errno,
                    format_args!("mmap of {len:#x} bytes at offset {offset:#x}"),
                ))
            });
        }
        Some(Ok(Mmap {
            ptr: NonNull::new(ptr.cast()).expect("a mapping at a non-null hint is not NULL"),
            len: ulen,
        }))
    }

    fn map(len: u64, flags: i32, fd: Option<BorrowedFd<'_>>, offset: i64) -> Result<Mmap> {
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
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os_error(format_args!(
                "mmap of {len:#x} bytes at offset {offset:#x}"
            )));
        }
        Ok(Mmap {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns NULL without MAP_FIXED"),
            len: ulen,
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
        // SAFETY: unmaps exactly the region mmap gave us; no reference into
        // it outlives self (only copies are handed out).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
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
}
