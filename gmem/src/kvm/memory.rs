//! Host memory handed out by the KVM backend, and the rules that keep
//! memslots from pointing the guest at memory Rust owns.
//!
//! `Vm::set_user_memory_region*` are safe functions, yet the kernel lets the
//! guest read and write whatever `userspace_addr` points at, for as long as
//! the slot lives. To keep them sound, a slot's userspace range must be
//!
//! - address 0 (no userspace memory), or
//! - inside one mapping this backend handed out ([`AnonMemory`],
//!   [`GmemMapping`]: they register themselves here), or
//! - entirely unmapped in this process (`/proc/self/maps`); the backend then
//!   reserves the range with an inaccessible (`PROT_NONE`) mapping so that
//!   nothing else can be mapped there while the slot lives. A guest access
//!   finds no memory there, exactly as if it were unmapped.
//!
//! Anything else (the heap, a stack, the binary, another library's mapping,
//! a range straddling ours and something else) is refused with EFAULT (rule
//! `gmem-safety`). Requests the kernel refuses anyway (address or size not
//! page aligned, wrapping) reach the kernel unchecked, so its errno is seen.
//!
//! Each accepted slot holds a pin on its range until the slot is deleted
//! or the VM and all its vCPUs are gone. When the owner drops a pinned
//! mapping, the pages are replaced in place (`MAP_FIXED`, atomically) with an
//! inaccessible anonymous mapping: the file it mapped is released as the user
//! asked, but the addresses stay reserved until the last pin goes, so the
//! guest can never reach memory that was reused for something else.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Errno, Error, Result};
use crate::host::{Mmap, Reservation};
use crate::hypervisor::{HostFault, HostMemory};
use crate::kvm::sigbus;
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, PAGE_SIZE};

/// An address range the backend answers for.
#[derive(Debug)]
struct Region {
    end: u64,
    /// A handle ([`Registered`]) still owns the mapping.
    held: bool,
    /// Memslots whose userspace range lies in it.
    pins: usize,
    /// Once no handle owns it: the inaccessible mapping that keeps the
    /// addresses while a memslot points there, unmapped with the region.
    reserved: Option<Reservation>,
}

/// Every region, by start address. Regions never overlap.
static REGIONS: Mutex<BTreeMap<u64, Region>> = Mutex::new(BTreeMap::new());

fn regions() -> MutexGuard<'static, BTreeMap<u64, Region>> {
    REGIONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// An [`Mmap`] registered as handed out for as long as it lives.
#[derive(Debug)]
pub(crate) struct Registered(ManuallyDrop<Mmap>);

impl Registered {
    pub(crate) fn new(map: Mmap) -> Self {
        let region = Region {
            end: map.addr() + map.len(),
            held: true,
            pins: 0,
            reserved: None,
        };
        regions().insert(map.addr(), region);
        Registered(ManuallyDrop::new(map))
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
        let addr = self.0.addr();
        let mut all = regions();
        let pinned = all.get(&addr).is_some_and(|r| r.pins > 0);
        if !pinned {
            all.remove(&addr);
            // SAFETY: dropped exactly once, here; nothing else refers to it.
            unsafe { ManuallyDrop::drop(&mut self.0) };
            return;
        }
        // A memslot still points here: give the pages up but keep the
        // addresses (see the module comment). If even that fails, keep the
        // mapping itself: a leak, never a dangling slot.
        // SAFETY: dropped exactly once, here; nothing else refers to it.
        let map = unsafe { ManuallyDrop::take(&mut self.0) };
        let reserved = map.into_reservation().map_err(std::mem::forget).ok();
        if let Some(r) = all.get_mut(&addr) {
            r.held = false;
            r.reserved = reserved;
        }
    }
}

/// A memslot's hold on the region its userspace range lies in. Dropping it
/// lets the region go once its owner has dropped it too.
#[derive(Debug)]
pub(crate) struct Pin {
    start: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut all = regions();
        let Some(r) = all.get_mut(&self.start) else {
            return;
        };
        r.pins -= 1;
        if r.pins == 0 && !r.held {
            // Its reservation goes with it.
            all.remove(&self.start);
        }
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

/// Checks a memslot's userspace range `[addr, addr + size)` against the
/// rules of the module comment and pins it. `None`: nothing to pin (address
/// 0, a delete, or a request the kernel refuses by itself).
pub(crate) fn pin_userspace_range(what: &str, addr: u64, size: u64) -> Result<Option<Pin>> {
    if addr == 0 || size == 0 || addr % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
        return Ok(None);
    }
    let Some(end) = addr.checked_add(size) else {
        return Ok(None);
    };
    let refuse = |why: String| {
        Error::new(
            Errno::EFAULT,
            "gmem-safety",
            format!(
                "{what}: userspace_addr range [{addr:#x}, {end:#x}) {why}; the guest would read and write it"
            ),
        )
    };
    let mut all = regions();
    // Inside one region of ours?
    if let Some((&start, r)) = all.range_mut(..=addr).next_back() {
        if end <= r.end {
            r.pins += 1;
            return Ok(Some(Pin { start }));
        }
    }
    // Otherwise it must be entirely unmapped: reserve it.
    for (m_start, m_end) in process_mappings()? {
        let (lo, hi) = (m_start.max(addr), m_end.min(end));
        if lo < hi {
            return Err(refuse(format!(
                "covers process memory [{lo:#x}, {hi:#x}) that is not one host memory or                  mapping handed out by the KVM backend"
            )));
        }
    }
    let reserved = usize::try_from(size)
        .map_err(|_| Errno::ENOMEM)
        .and_then(|len| Reservation::map(addr as usize, len, false));
    match reserved {
        Ok(reserved) => {
            let region = Region {
                end,
                held: false,
                pins: 1,
                reserved: Some(reserved),
            };
            all.insert(addr, region);
            Ok(Some(Pin { start: addr }))
        }
        Err(Errno::EEXIST) => Err(refuse("was mapped by someone else meanwhile".into())),
        // Not a user range at all (past TASK_SIZE): the kernel refuses it.
        Err(_) => Ok(None),
    }
}

/// The VMM's anonymous memory ([`crate::hypervisor::Hypervisor::host_memory`]).
#[derive(Debug)]
pub struct AnonMemory(Registered);

impl AnonMemory {
    /// `size` bytes of private anonymous memory.
    pub fn new(size: u64) -> Result<Self> {
        Ok(AnonMemory(Registered::new(Mmap::host_memory(size)?)))
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
