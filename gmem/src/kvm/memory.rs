//! Host memory handed out by the KVM backend, and the check that keeps
//! memslots from pointing the guest at memory Rust owns.
//!
//! `Vm::set_user_memory_region*` are safe functions, yet the kernel will let
//! the guest read and write whatever `userspace_addr` points at. To keep them
//! sound, a slot's userspace range must be made of
//!
//! - address 0 (no userspace memory), or
//! - memory this backend handed out and still holds ([`AnonMemory`],
//!   [`GmemMapping`]: they register themselves here while they live), or
//! - addresses not mapped in this process at all (`/proc/self/maps`): the
//!   guest then gets EFAULT from `KVM_RUN` rather than anybody's memory.
//!
//! Anything else (the heap, a stack, the binary, another library's mapping)
//! is refused with EFAULT (rule `gmem-safety`). Known limits, as with any VMM:
//! a slot outlives the mapping it was created on, and an address range that
//! was unmapped at check time may be mapped by someone else later; the user
//! must delete slots before dropping their memory.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{HostFault, HostMemory};
use crate::kvm::sigbus;
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, PAGE_SIZE};

/// Live mappings handed out by this backend: start -> end.
static HANDED_OUT: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());

fn handed_out() -> std::sync::MutexGuard<'static, BTreeMap<u64, u64>> {
    HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner())
}

/// An [`Mmap`] registered as "handed out" for as long as it lives.
#[derive(Debug)]
pub(crate) struct Registered(Mmap);

impl Registered {
    pub(crate) fn new(map: Mmap) -> Self {
        handed_out().insert(map.addr(), map.addr() + map.len());
        Registered(map)
    }
}

impl std::ops::Deref for Registered {
    type Target = Mmap;
    fn deref(&self) -> &Mmap {
        &self.0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Unregistered before the munmap (the field drops after this body):
        // in between, the range is mapped but not ours, hence refused.
        handed_out().remove(&self.0.addr());
    }
}

/// The mapped ranges of this process, from `/proc/self/maps`.
fn process_mappings() -> Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(|e| {
        Error::new(
            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            "gmem-safety",
            format!("cannot read /proc/self/maps to check a userspace_addr: {e}"),
        )
    })?;
    let mut out = Vec::new();
    for line in text.lines() {
        let range = line.split_whitespace().next().unwrap_or("");
        let mut parts = range.split('-');
        if let (Some(a), Some(b)) = (parts.next(), parts.next()) {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                out.push((a, b));
            }
        }
    }
    Ok(out)
}

/// Refuses a memslot whose userspace range `[addr, addr + size)` covers
/// memory of this process that this backend did not hand out (see the
/// module comment). Requests the kernel refuses anyway (unaligned, wrapping,
/// empty) are let through so that the kernel's errno is observed.
pub(crate) fn check_userspace_range(what: &str, addr: u64, size: u64) -> Result<()> {
    if addr == 0 || size == 0 || addr % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
        return Ok(());
    }
    let Some(end) = addr.checked_add(size) else {
        return Ok(());
    };
    let ours = handed_out();
    for (m_start, m_end) in process_mappings()? {
        let (lo, hi) = (m_start.max(addr), m_end.min(end));
        if lo >= hi {
            continue;
        }
        // [lo, hi) is mapped in this process: it must lie in one mapping we
        // handed out (ours never overlap each other).
        let covered = ours
            .range(..=lo)
            .next_back()
            .is_some_and(|(_, &o_end)| hi <= o_end);
        if !covered {
            return Err(Error::new(
                Errno::EFAULT,
                "gmem-safety",
                format!(
                    "{what}: userspace_addr range [{addr:#x}, {end:#x}) covers process memory \
                     [{lo:#x}, {hi:#x}) that is not host memory or a mapping handed out by the \
                     KVM backend; the guest would write into it"
                ),
            ));
        }
    }
    Ok(())
}

/// The VMM's anonymous memory ([`crate::hypervisor::Hypervisor::host_memory`]).
#[derive(Debug)]
pub struct AnonMemory(Registered);

impl AnonMemory {
    /// `size` bytes of private anonymous memory.
    pub fn new(size: u64) -> Result<Self> {
        Ok(AnonMemory(Registered::new(Mmap::anonymous(size)?)))
    }
}

impl HostMemory for AnonMemory {
    fn addr(&self) -> u64 {
        self.0.addr()
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), HostFault> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), HostFault> {
        self.0.write(offset, buf)
    }
}

/// A shared host mapping of a guest_memfd. The kernel's mapping holds its
/// own reference on the file, so the file outlives the fd handle for as long
/// as this mapping lives (LIFE-7); nothing else needs to be kept.
#[derive(Debug)]
pub struct GmemMapping {
    map: Registered,
    /// File offset of the mapping's first byte.
    file_offset: u64,
    /// The file's size and creation flags, to say why an access faulted.
    file_size: u64,
    file_flags: u64,
}

impl GmemMapping {
    pub(crate) fn new(map: Mmap, file_offset: u64, file_size: u64, file_flags: u64) -> Self {
        GmemMapping {
            map: Registered::new(map),
            file_offset,
            file_size,
            file_flags,
        }
    }

    fn fault(&self, addr: usize) -> HostFault {
        let offset = (addr as u64).wrapping_sub(self.map.addr());
        let file_pos = self.file_offset.saturating_add(offset);
        if file_pos >= self.file_size {
            HostFault::Sigbus {
                offset,
                rule: "MMAP-3",
                reason: format!(
                    "file offset {file_pos:#x} is past the end of the {:#x}-byte guest_memfd",
                    self.file_size
                ),
            }
        } else if self.file_flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
            HostFault::Sigbus {
                offset,
                rule: "MMAP-4",
                reason: format!(
                    "the guest_memfd (flags {:#x}) was created without INIT_SHARED: its memory \
                     is private to the guest",
                    self.file_flags
                ),
            }
        } else {
            HostFault::Sigbus {
                offset,
                rule: "kernel",
                reason: format!("the kernel refused the host access at file offset {file_pos:#x}"),
            }
        }
    }
}

impl HostMemory for GmemMapping {
    fn addr(&self) -> u64 {
        self.map.addr()
    }
    fn len(&self) -> u64 {
        self.map.len()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), HostFault> {
        self.map.check_range(offset, buf.len())?;
        // offset fits: checked against the mapping's usize length above.
        let src = self.map.as_ptr().wrapping_add(offset as usize);
        // SAFETY: [src, src + len) lies in our live mapping (checked above)
        // and may only fault with SIGBUS, which the guard turns into Err;
        // buf is a distinct, writable Rust buffer of the same length.
        unsafe { sigbus::guarded_copy(buf.as_mut_ptr(), src, buf.len(), src as usize) }
            .map_err(|addr| self.fault(addr))
    }
    fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), HostFault> {
        self.map.check_range(offset, buf.len())?;
        let dst = self.map.as_ptr().wrapping_add(offset as usize);
        // SAFETY: as in read, with the roles of the two buffers swapped.
        unsafe { sigbus::guarded_copy(dst, buf.as_ptr(), buf.len(), dst as usize) }
            .map_err(|addr| self.fault(addr))
    }
}
