//! vm-memory interop: one [`GmemRegion`] per RAM range, held in vm-memory's
//! own [`GuestRegionCollection`], so device code written against
//! `vm_memory::Bytes` works on guest_memfd memory unchanged. gmem re-exports
//! the vm-memory it implements as `gmem::vm_memory`.
//!
//! This answers vm-memory#315 the way its maintainers suggested there: a
//! wrapper region type that implements `GuestMemoryRegion` and owns its
//! guest_memfd next to the host memory, managed by a
//! `GuestRegionCollection` (vm-memory#312). What it adds is the private
//! state: a slice of a range that is private to the guest is refused with
//! [`Error::Private`], carried inside
//! `GuestMemoryError::IOError`, instead of faulting.
//!
//! ```
//! use gmem::memory::{Layout, MemoryManager};
//! use gmem::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
//! let hv = gmem::Backend::Soft.open().unwrap();
//! let mm = MemoryManager::new(&*hv, Layout::builder().memory(4 << 30).build().unwrap()).unwrap();
//! let mem = mm.guest_memory(); // GuestRegionCollection<GmemRegion>
//! assert_eq!(mem.num_regions(), 2);
//! mem.write_obj(1u64, GuestAddress(1 << 32)).unwrap();
//! ```

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::RwLock;
use rangemap::RangeSet;
use vm_memory::bitmap::BS;
use vm_memory::{
    AtomicAccess, Bytes, GuestMemoryError, GuestMemoryRegion, GuestRegionCollection, GuestUsize,
    MemoryRegionAddress, ReadVolatile, VolatileSlice, WriteVolatile,
};

use super::account;
use super::addr::{GmemOffset, GuestAddress, GuestRange, HostAddress};
use super::file::GmemFile;
use super::Error;
use crate::hypervisor::HostMemory;

/// Guest RAM as vm-memory sees it: the regions of a
/// [`MemoryManager`](super::MemoryManager), by guest physical address.
///
/// ```
/// use gmem::memory::{Layout, MemoryManager};
/// use gmem::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
/// let hv = gmem::Backend::Soft.open().unwrap();
/// let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
/// let mem = mm.guest_memory();
/// mem.write_obj(0xfeed_u32, GuestAddress(0x100)).unwrap();
/// assert_eq!(mem.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 0xfeed);
/// assert_eq!(mem.num_regions(), 1);
/// ```
pub type GuestRegions = GuestRegionCollection<GmemRegion>;

/// Where a RAM range's shared bytes live in the host.
#[derive(Clone)]
pub(crate) struct HostView {
    pub(crate) mem: Arc<dyn HostMemory>,
    /// Offset of the range's first byte in `mem`.
    pub(crate) offset: u64,
    /// `mem` maps the range's guest_memfd (else: separate anonymous memory).
    pub(crate) is_file: bool,
}

/// One RAM range: its host memory, its guest_memfd and offset, and the
/// VM's private ranges. Implements vm-memory's `GuestMemoryRegion` and
/// `Bytes`.
///
/// ```
/// use gmem::memory::{GuestAddress, Layout, MemoryManager};
/// use gmem::vm_memory::GuestMemoryBackend;
/// let hv = gmem::Backend::Soft.open().unwrap();
/// let mm = MemoryManager::new(&*hv, Layout::builder().memory(4 << 30).build().unwrap()).unwrap();
/// let high = mm.guest_memory().find_region(GuestAddress(1 << 32)).unwrap();
/// assert_eq!(high.range().len, 1 << 30);
/// assert_eq!(high.file_offset_of(GuestAddress(1 << 32)).unwrap().0, 3 << 30);
/// ```
pub struct GmemRegion {
    pub(crate) range: GuestRange,
    pub(crate) host: HostView,
    pub(crate) file: Option<(Arc<GmemFile>, GmemOffset)>,
    /// Private guest physical ranges of the whole VM (shared by regions).
    pub(crate) private: Arc<RwLock<RangeSet<u64>>>,
}

impl std::fmt::Debug for GmemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmemRegion")
            .field("range", &self.range)
            .field("host", &self.host_address())
            .field("file", &self.file.as_ref().map(|(_, o)| *o))
            .finish()
    }
}

impl GmemRegion {
    /// The guest physical range.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # use gmem::vm_memory::GuestMemoryBackend;
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let region = mm.guest_memory().iter().next().unwrap();
    /// assert_eq!(region.range().len, 1 << 20);
    /// ```
    pub fn range(&self) -> GuestRange {
        self.range
    }

    /// Where the range's shared bytes start in the VMM's address space.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # use gmem::vm_memory::GuestMemoryBackend;
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let region = mm.guest_memory().iter().next().unwrap();
    /// assert_ne!(region.host_address().0, 0);
    /// ```
    pub fn host_address(&self) -> HostAddress {
        HostAddress(self.host.mem.addr() + self.host.offset)
    }

    /// The guest_memfd backing the range, if any.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # use gmem::vm_memory::GuestMemoryBackend;
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let region = mm.guest_memory().iter().next().unwrap();
    /// assert_eq!(region.file().unwrap().size(), 1 << 20);
    /// ```
    pub fn file(&self) -> Option<&GmemFile> {
        self.file.as_ref().map(|(f, _)| f.as_ref())
    }

    /// The file offset that backs guest physical `gpa`, if the range has a
    /// file and holds `gpa`.
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager};
    /// # use gmem::vm_memory::GuestMemoryBackend;
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let region = mm.guest_memory().iter().next().unwrap();
    /// assert_eq!(region.file_offset_of(GuestAddress(0x3000)).unwrap().0, 0x3000);
    /// assert!(region.file_offset_of(GuestAddress(2 << 20)).is_none());
    /// ```
    pub fn file_offset_of(&self, gpa: GuestAddress) -> Option<GmemOffset> {
        let (_, base) = self.file.as_ref()?;
        self.range
            .contains(gpa)
            .then(|| GmemOffset(base.0 + (gpa.0 - self.range.start.0)))
    }

    /// `piece` (inside the range) as file offset and length.
    pub(crate) fn file_piece(&self, piece: &GuestRange) -> Option<(&GmemFile, GmemOffset, u64)> {
        let (file, base) = self.file.as_ref()?;
        let off = base.0 + (piece.start.0 - self.range.start.0);
        Some((file.as_ref(), GmemOffset(off), piece.len))
    }

    /// `piece` (inside the range) as an offset into the host memory.
    pub(crate) fn host_offset(&self, piece: &GuestRange) -> u64 {
        self.host.offset + (piece.start.0 - self.range.start.0)
    }

    /// Frees the guest_memfd pages of `piece`.
    pub(crate) fn punch(&self, piece: &GuestRange) -> Result<(), Error> {
        match self.file_piece(piece) {
            Some((file, off, len)) => file.punch_hole(off, len),
            None => Ok(()),
        }
    }

    /// Frees the separate host memory of `piece` (none when the host view
    /// is the file's own mapping: punching the file frees that).
    pub(crate) fn discard_host(&self, piece: &GuestRange) -> Result<(), Error> {
        if self.host.is_file {
            return Ok(());
        }
        account::discard_host(
            self.host.mem.as_ref(),
            self.host_offset(piece),
            piece.len,
            false,
        )
    }

    /// Bytes of `piece` held by the file and by the separate host memory.
    pub(crate) fn held(&self, piece: &GuestRange) -> Result<(u64, u64), Error> {
        let file = match self.file_piece(piece) {
            Some((file, off, len)) => file.held_in(off, len)?,
            None => 0,
        };
        let host = if self.host.is_file {
            0
        } else {
            account::resident_bytes(self.host.mem.as_ref(), self.host_offset(piece), piece.len)?
        };
        Ok((file, host))
    }

    /// The private part of `[start, start + len)`, if any.
    pub(crate) fn private_part(private: &RangeSet<u64>, piece: &GuestRange) -> Option<GuestRange> {
        let r = piece.start.0..piece.bound();
        private
            .overlapping(&r)
            .next()
            .map(|p| GuestRange::from_bounds(p.start.max(r.start), p.end.min(r.end)))
    }

    /// A volatile slice of `[offset, offset + count)` of the range's shared
    /// bytes, after the caller checked the range is in bounds and shared.
    pub(crate) fn slice_unchecked(&self, offset: u64, count: usize) -> VolatileSlice<'_> {
        let ptr = (self.host.mem.addr() + self.host.offset + offset) as *mut u8;
        // SAFETY: [ptr, ptr + count) lies inside the host mapping (the
        // caller checked offset + count <= the range's length, and the
        // mapping covers the range), which lives as long as `self` holds
        // its Arc; the memory is shared with the guest, so every access
        // through the slice is volatile, as VolatileSlice requires.
        unsafe { VolatileSlice::new(ptr, count) }
    }

    /// The checks of [`GuestMemoryRegion::get_slice`], as a typed error.
    pub(crate) fn check_slice(&self, offset: u64, count: usize) -> Result<(), Error> {
        let piece = GuestRange::new(
            GuestAddress(self.range.start.0.saturating_add(offset)),
            count as u64,
        );
        if offset
            .checked_add(count as u64)
            .is_none_or(|end| end > self.range.len)
        {
            return Err(Error::Unbacked { range: piece });
        }
        if count == 0 {
            return Ok(());
        }
        if let Some(range) = Self::private_part(&self.private.read(), &piece) {
            return Err(Error::Private { range });
        }
        Ok(())
    }
}

/// A typed error inside vm-memory's error type.
fn to_vm_memory(e: Error) -> GuestMemoryError {
    match e {
        Error::Unbacked { .. } => GuestMemoryError::InvalidBackendAddress,
        e => GuestMemoryError::IOError(io::Error::new(io::ErrorKind::PermissionDenied, e)),
    }
}

impl GuestMemoryRegion for GmemRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.range.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.range.start
    }

    fn bitmap(&self) -> BS<'_, Self::B> {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> vm_memory::GuestMemoryResult<*mut u8> {
        self.check_slice(addr.0, 1).map_err(to_vm_memory)?;
        Ok((self.host.mem.addr() + self.host.offset + addr.0) as *mut u8)
    }

    /// Refuses a slice that touches private memory: its bytes are not the
    /// guest's (split backing) or fault on touch (in-place backing).
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::GuestMemoryResult<VolatileSlice<'_, BS<'_, Self::B>>> {
        self.check_slice(offset.0, count).map_err(to_vm_memory)?;
        Ok(self.slice_unchecked(offset.0, count))
    }
}

/// Every access goes through [`GmemRegion::get_slice`] over exactly the
/// bytes it touches, so a private page refuses only what reaches it.
impl Bytes<MemoryRegionAddress> for GmemRegion {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<usize, Self::E> {
        let n = buf
            .len()
            .min(self.range.len.saturating_sub(addr.0) as usize);
        Ok(self.get_slice(addr, n)?.write(&buf[..n], 0)?)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<usize, Self::E> {
        let n = buf
            .len()
            .min(self.range.len.saturating_sub(addr.0) as usize);
        Ok(self.get_slice(addr, n)?.read(&mut buf[..n], 0)?)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<(), Self::E> {
        Ok(self.get_slice(addr, buf.len())?.write_slice(buf, 0)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<(), Self::E> {
        Ok(self.get_slice(addr, buf.len())?.read_slice(buf, 0)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        Ok(self
            .get_slice(addr, count)?
            .read_volatile_from(0, src, count)?)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        Ok(self
            .get_slice(addr, count)?
            .read_exact_volatile_from(0, src, count)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        Ok(self
            .get_slice(addr, count)?
            .write_volatile_to(0, dst, count)?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        Ok(self
            .get_slice(addr, count)?
            .write_all_volatile_to(0, dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<(), Self::E> {
        Ok(self.get_slice(addr, size_of::<T>())?.store(val, 0, order)?)
    }

    fn load<T: AtomicAccess>(
        &self,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<T, Self::E> {
        Ok(self.get_slice(addr, size_of::<T>())?.load(0, order)?)
    }
}
