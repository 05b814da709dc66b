//! Memory held, measured by the kernel rather than by bookkeeping.
//!
//! - A guest_memfd file: `st_blocks` is 0 whatever it holds (the kernel
//!   never counts its folios in the inode's blocks), but its pages are
//!   page-cache folios of the file's mapping
//!   (virt/kvm/guest_memfd.c, `kvm_gmem_get_folio` through
//!   `filemap_grab_folio`; `kvm_gmem_punch_hole` removes them with
//!   `truncate_inode_pages_range`). `cachestat(2)` (Linux 6.5,
//!   mm/filemap.c `filemap_cachestat`) counts exactly those folios, for any
//!   range of the file, without mapping it. On the software backend the fd
//!   names the tmpfs memfd that holds the pages, so the same call measures
//!   real memory there too.
//! - Host memory (a mapping): `mincore(2)` says which pages are resident.
//!   For private anonymous memory that is what the process holds; for a
//!   shared file mapping it reports the file's page cache (mm/mincore.c
//!   `mincore_page`), which is why dropping a shared mapping's page table
//!   entries (`MADV_DONTNEED`) frees nothing that `mincore` or `cachestat`
//!   would stop counting.

use std::os::fd::AsRawFd;

use super::Error;
use crate::error::Errno;
use crate::hypervisor::{GuestMemfd, HostMemory};
use crate::uapi::PAGE_SIZE;

/// `cachestat(2)`: 451 in the unified syscall table of every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` (include/uapi/linux/mman.h).
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` (include/uapi/linux/mman.h).
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Bytes of page cache that `fd` holds in `[off, off + len)`.
pub(crate) fn cachestat(fd: &impl AsRawFd, off: u64, len: u64) -> Result<u64, Errno> {
    let range = CachestatRange { off, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat`
    // into `stat`, both live for the call; the fd is borrowed.
    let ret = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if ret != 0 {
        return Err(Errno::last());
    }
    Ok(stat.nr_cache * PAGE_SIZE)
}

/// Bytes of `file` held in `[off, off + len)`.
pub(crate) fn file_bytes(file: &dyn GuestMemfd, off: u64, len: u64) -> Result<u64, Error> {
    struct Fd(i32);
    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> i32 {
            self.0
        }
    }
    cachestat(&Fd(file.as_raw_fd()), off, len).map_err(|errno| {
        crate::Error::new(
            errno,
            "gmem-account",
            format!(
                "cachestat of guest_memfd range [{off:#x}, +{len:#x}) failed; the kernel needs \
                 cachestat(2) (Linux 6.5) to measure guest_memfd"
            ),
        )
        .into()
    })
}

/// Bytes of `[offset, offset + len)` of `mem` that are resident.
pub(crate) fn resident_bytes(mem: &dyn HostMemory, offset: u64, len: u64) -> Result<u64, Error> {
    if len == 0 {
        return Ok(0);
    }
    let pages = len.div_ceil(PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    let addr = mem.addr() + offset;
    if offset.checked_add(len).is_none_or(|end| end > mem.len()) || addr % PAGE_SIZE != 0 {
        return Err(Error::Range {
            what: "measuring",
            range: format!("host range [{addr:#x}, +{len:#x})"),
            why: "not page aligned or outside its mapping",
        });
    }
    // SAFETY: mincore only reads page tables of [addr, addr + len), which
    // lies inside `mem`, a live mapping; it writes one byte per page into
    // `vec`, which has that many.
    let ret = unsafe {
        libc::mincore(
            addr as *mut libc::c_void,
            len as usize,
            vec.as_mut_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(crate::Error::last_os_error(format_args!(
            "mincore of host range [{addr:#x}, +{len:#x})"
        ))
        .into());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE)
}

/// Gives the host pages of `[offset, offset + len)` of `mem` back.
/// Private anonymous memory is freed by `MADV_DONTNEED`; a shared mapping
/// is not (its pages stay in the file: firecracker#6167), so it takes
/// `MADV_REMOVE`, which punches the range out of the file.
pub(crate) fn discard_host(
    mem: &dyn HostMemory,
    offset: u64,
    len: u64,
    shared: bool,
) -> Result<(), Error> {
    let addr = mem.addr() + offset;
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: [addr, addr + len) lies inside `mem`, guest memory that no
    // Rust reference points into (all access is volatile, through copies);
    // dropping its contents is what the caller asked for.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if ret != 0 {
        return Err(crate::Error::last_os_error(format_args!(
            "madvise({}) of host range [{addr:#x}, +{len:#x})",
            if shared {
                "MADV_REMOVE"
            } else {
                "MADV_DONTNEED"
            }
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Mmap;

    #[test]
    fn cachestat_counts_a_memfds_pages() {
        let fd = crate::soft::guest_memfd::memfd("account-test", libc::MFD_CLOEXEC).unwrap();
        // SAFETY: sizing the memfd we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 1 << 20) }, 0);
        let map = Mmap::shared(std::os::fd::AsFd::as_fd(&fd), 0, 1 << 20).unwrap();
        map.write(0, &[1; 8192]).unwrap();
        assert_eq!(cachestat(&fd, 0, 1 << 20).unwrap(), 8192);
        assert_eq!(cachestat(&fd, 4096, 4096).unwrap(), 4096);
        assert_eq!(cachestat(&fd, 8192, 8192).unwrap(), 0);
    }
}
