//! A guest_memfd file of the running kernel. Every file operation is the
//! real system call, so the kernel's own errnos are what the caller sees.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{GuestMemfd, HostMemory, MapKind, Stat};
use crate::kvm::memory::GmemMapping;

/// A guest_memfd fd, owned: closed on drop. The file holds a reference on
/// its VM (LIFE-2); this handle holds nothing else.
#[derive(Debug)]
pub struct KvmGuestMemfd {
    fd: OwnedFd,
    size: u64,
    flags: u64,
}

impl KvmGuestMemfd {
    pub(crate) fn new(fd: OwnedFd, size: u64, flags: u64) -> Self {
        KvmGuestMemfd { fd, size, flags }
    }

    fn syscall_error(&self, what: std::fmt::Arguments<'_>) -> Error {
        Error::new(
            Errno::last(),
            "kernel",
            format!("{what} on a guest_memfd of {:#x} bytes refused", self.size),
        )
    }

    /// The result of a syscall returning a count, or the kernel's errno.
    fn check(&self, ret: isize, what: std::fmt::Arguments<'_>) -> Result<usize> {
        if ret < 0 {
            Err(self.syscall_error(what))
        } else {
            Ok(ret as usize)
        }
    }
}

impl AsRawFd for KvmGuestMemfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl GuestMemfd for KvmGuestMemfd {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> u64 {
        self.flags
    }

    fn fallocate(&self, mode: i32, offset: i64, len: i64) -> Result<()> {
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let ret = unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, offset, len) };
        self.check(
            ret as isize,
            format_args!("fallocate mode={mode:#x} offset={offset:#x} len={len:#x}"),
        )
        .map(drop)
    }

    fn mmap(&self, offset: i64, len: u64, kind: MapKind) -> Result<Box<dyn HostMemory>> {
        let what = |e: Error| {
            Error::new(
                e.errno,
                "kernel",
                format!(
                    "mmap ({}) of {len:#x} bytes at offset {offset:#x} of a guest_memfd of \
                     {:#x} bytes refused",
                    if kind == MapKind::Shared {
                        "MAP_SHARED"
                    } else {
                        "MAP_PRIVATE"
                    },
                    self.size
                ),
            )
        };
        match kind {
            MapKind::Shared => {
                let map = Mmap::shared(self.fd.as_fd(), offset, len).map_err(what)?;
                let file_offset = u64::try_from(offset).unwrap_or(0);
                Ok(Box::new(GmemMapping::new(
                    map,
                    file_offset,
                    self.size,
                    self.flags,
                )))
            }
            MapKind::Private => {
                // The kernel refuses MAP_PRIVATE (MMAP-2); ask it anyway so
                // its errno is observed, and never keep what it gives.
                let Ok(ulen) = usize::try_from(len) else {
                    return Err(what(Error::new(Errno::ENOMEM, "kernel", "")));
                };
                // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED)
                // cannot alias Rust memory; it is unmapped right away.
                let ptr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        ulen,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE,
                        self.fd.as_raw_fd(),
                        offset,
                    )
                };
                if ptr == libc::MAP_FAILED {
                    return Err(what(Error::new(Errno::last(), "kernel", "")));
                }
                // SAFETY: unmaps exactly the mapping created above.
                unsafe { libc::munmap(ptr, ulen) };
                Err(Error::new(
                    Errno::EINVAL,
                    "MMAP-2",
                    "the kernel accepted a MAP_PRIVATE mapping of a guest_memfd (unmapped \
                     again); guest_memfd mappings must be shared",
                ))
            }
        }
    }

    fn stat(&self) -> Result<Stat> {
        // SAFETY: an all-zero stat is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one stat into the buffer we pass.
        let ret = unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) };
        self.check(ret as isize, format_args!("fstat"))?;
        Ok(Stat {
            ino: st.st_ino,
            size: st.st_size,
            blksize: st.st_blksize,
            blocks: st.st_blocks,
            mode: st.st_mode,
        })
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize> {
        // SAFETY: read writes at most buf.len() bytes into buf.
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        self.check(ret, format_args!("read of {} bytes", buf.len()))
    }

    fn write(&self, buf: &[u8]) -> Result<usize> {
        // SAFETY: write reads at most buf.len() bytes from buf.
        let ret = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        self.check(ret, format_args!("write of {} bytes", buf.len()))
    }

    fn pread(&self, buf: &mut [u8], offset: i64) -> Result<usize> {
        // SAFETY: pread writes at most buf.len() bytes into buf.
        let ret = unsafe {
            libc::pread(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.check(
            ret,
            format_args!("pread of {} bytes at {offset:#x}", buf.len()),
        )
    }

    fn pwrite(&self, buf: &[u8], offset: i64) -> Result<usize> {
        // SAFETY: pwrite reads at most buf.len() bytes from buf.
        let ret =
            unsafe { libc::pwrite(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
        self.check(
            ret,
            format_args!("pwrite of {} bytes at {offset:#x}", buf.len()),
        )
    }

    fn lseek(&self, offset: i64, whence: i32) -> Result<u64> {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let ret = unsafe { libc::lseek(self.fd.as_raw_fd(), offset, whence) };
        self.check(
            ret as isize,
            format_args!("lseek offset={offset:#x} whence={whence}"),
        )
        .map(|n| n as u64)
    }

    fn ftruncate(&self, len: i64) -> Result<()> {
        // SAFETY: ftruncate on an fd we own; no memory is passed.
        let ret = unsafe { libc::ftruncate(self.fd.as_raw_fd(), len) };
        self.check(ret as isize, format_args!("ftruncate len={len:#x}"))
            .map(drop)
    }

    fn ioctl(&self, request: u64) -> Result<i32> {
        // SAFETY: the argument is 0: an ioctl the file does not know fails
        // without touching memory. A known one given 0 for a pointer gets
        // EFAULT from copy_from_user, never a write into our memory: the
        // page at address 0 is never mapped (mmap_min_addr).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, 0usize) };
        self.check(ret as isize, format_args!("ioctl {request:#x}"))
            .map(|n| n as i32)
    }
}
