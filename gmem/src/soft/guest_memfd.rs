//! guest_memfd files: creation, bindings, fallocate, host mappings and
//! release (docs/spec.md, sections 1, 2, 4 and 7).
//!
//! Three objects, as in the kernel:
//! - `GmemInode`: the memory. A tmpfs memfd holds the pages, so they are
//!   real host memory, allocated on first touch and returned to the host
//!   when a hole is punched. It also holds the binding map, under the
//!   file's invalidate lock.
//! - `GmemFile`: the open file. It pins the VM; the VM's memslots do not
//!   pin it. When its last reference goes (the fd handle and every host
//!   mapping), `release` unbinds every slot and invalidates (LIFE-5, INVAL-2).
//! - [`SoftGuestMemfd`]: the fd the user holds.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::{Mutex, RwLock};
use rangemap::{RangeMap, RangeSet};

use super::host::{RegionKind, SoftHostMemory};
use super::invalidate::InvalidateCause;
use super::mempolicy::Policies;
use super::tlb::run_around;
use super::vm::VmInner;
use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{GuestMemfd, HostMemory, MapKind, Pin, Stat};
use crate::refuse;
use crate::uapi::{
    kvm_memory_attributes2, page_aligned, FALLOC_FL_KEEP_SIZE, FALLOC_FL_MODE_MASK,
    FALLOC_FL_PUNCH_HOLE, FALLOC_FL_WRITE_ZEROES, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT, PAGE_SIZE, TASK_SIZE_MAX,
};

/// Which memslot a bound file range belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BindingRef {
    pub(crate) as_id: u16,
    pub(crate) slot: u16,
    pub(crate) base_gfn: u64,
}

/// The binding map: file index range -> memslot. Lives under the file's
/// invalidate lock (the kernel's `filemap_invalidate_lock`).
pub(crate) type Bindings = RangeMap<u64, BindingRef>;

/// The inode: size, flags, pages and bindings.
pub(crate) struct GmemInode {
    pub(crate) size: u64,
    pub(crate) flags: u64,
    store: OwnedFd,
    /// Held for reading by guest accesses and allocation, for writing by
    /// punch hole, bind, unbind and release: an access never sees a page
    /// that is being freed (INVAL-5).
    pub(crate) invalidate_lock: RwLock<Bindings>,
    /// Mappings of the store through which guest accesses go, by window
    /// number; see [`GmemInode::page`].
    windows: Mutex<BTreeMap<u64, Mmap>>,
    /// In-place conversion (profile `next`): attributes belong to the file.
    pub(crate) in_place: bool,
    /// With `in_place`, the private page indices (CONV-1); taken after the
    /// invalidate lock.
    private: RwLock<RangeSet<u64>>,
    /// Long-term references on pages, by index (CONV-5).
    pins: Mutex<BTreeMap<u64, u32>>,
    /// NUMA policies by page index, since 6.19 (`gmem_inode.policy`,
    /// NUMA-2); taken after a mapping's own.
    pub(crate) policy: Option<Mutex<Policies>>,
}

/// Bytes of the page store one guest-access window maps: address space
/// only until pages are touched, and large, so that one cached translation
/// covers a VM's RAM.
const WINDOW_SIZE: u64 = 1 << 30;

impl GmemInode {
    pub(crate) fn init_shared(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0
    }

    /// Is page `index` private to the guest? Only in-place conversion
    /// tracks this per page (`kvm_gmem_is_private_mem`).
    pub(crate) fn is_private(&self, index: u64) -> bool {
        self.in_place && self.private.read().contains(&index)
    }

    /// The indices around `index`, inside `within`, that are private or
    /// shared as `index` is: what one cached translation may cover. All of
    /// `within` without in-place conversion.
    pub(crate) fn private_run(&self, index: u64, within: Range<u64>) -> Range<u64> {
        if !self.in_place {
            return within;
        }
        let set = self.private.read();
        run_around(
            index,
            within,
            set.get(&index).cloned(),
            |r| set.overlapping(&r).next_back().map(|r| r.end),
            |r| set.overlapping(&r).next().map(|r| r.start),
        )
    }

    /// The first private page of `indices`, if any.
    pub(crate) fn first_private(&self, indices: Range<u64>) -> Option<u64> {
        if !self.in_place || indices.is_empty() {
            return None;
        }
        let private = self.private.read();
        private
            .overlapping(&indices)
            .next()
            .map(|r| r.start.max(indices.start))
    }

    /// Takes a long-term reference on `indices`.
    pub(crate) fn pin(self: &Arc<Self>, indices: Range<u64>) -> Result<SoftPin> {
        if let Some(index) = self.first_private(indices.clone()) {
            refuse!(
                EFAULT,
                "CONV-6",
                "page {index:#x} is private: the host cannot reference it"
            );
        }
        let mut pins = self.pins.lock();
        for i in indices.clone() {
            *pins.entry(i).or_default() += 1;
        }
        Ok(SoftPin {
            inode: Some(self.clone()),
            indices,
        })
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES2` once the arguments are checked
    /// (`__kvm_gmem_set_attributes`). The caller holds the file, so its
    /// bindings can be invalidated.
    fn set_private(
        &self,
        file: &GmemFile,
        indices: Range<u64>,
        private: bool,
    ) -> std::result::Result<(), u64> {
        let bindings = self.invalidate_lock.write();
        let mut set = self.private.write();
        let unchanged = if private {
            set.gaps(&indices).next().is_none()
        } else {
            !set.overlaps(&indices)
        };
        if unchanged {
            return Ok(());
        }
        if private {
            // Host mappings are zapped first, then any page still
            // referenced stops the conversion before anything changed.
            let pins = self.pins.lock();
            if let Some((index, _)) = pins.range(indices.clone()).next() {
                return Err(*index);
            }
        }
        for (range, b) in bindings.overlapping(indices.clone()) {
            let gfns = index_to_gfns(range, b, indices.clone());
            file.vm
                .invalidations
                .invalidate(b.as_id, b.slot, gfns, InvalidateCause::Attributes);
        }
        if private {
            set.insert(indices);
        } else {
            set.remove(indices);
        }
        Ok(())
    }

    /// The allocated pages of `indices`, as runs (`SEEK_DATA` and
    /// `SEEK_HOLE` on the page store): what any mapping of the file can map.
    pub(crate) fn allocated(&self, indices: Range<u64>) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let end = indices.end.min(self.size >> PAGE_SHIFT);
        let mut at = indices.start;
        let seek = |from: u64, whence: i32| -> Option<u64> {
            let from = i64::try_from(from << PAGE_SHIFT).ok()?;
            // SAFETY: lseek on the store this inode owns; it moves the file
            // offset of that fd only, which nothing else uses.
            let r = unsafe { libc::lseek(self.store.as_raw_fd(), from, whence) };
            (r >= 0).then_some(r as u64 >> PAGE_SHIFT)
        };
        while at < end {
            // ENXIO: no data from here to the end.
            let Some(data) = seek(at, libc::SEEK_DATA).filter(|d| *d < end) else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            runs.push(data..hole.max(data + 1));
            at = hole.max(data + 1);
        }
        runs
    }

    pub(crate) fn supports_mmap(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_MMAP != 0
    }

    /// The host address of page `index` in a window mapping of the page
    /// store, and the file indices that window maps contiguously. Guest
    /// accesses go through windows: a hole is allocated, zeroed, on first
    /// touch, reads included (FAULT-5), and an aligned access is one load or
    /// store, as on hardware. The address stays valid while the inode lives:
    /// windows are made on first use and unmapped only with the inode; punch
    /// hole empties them as it empties any mapping of the file.
    pub(crate) fn page(&self, index: u64) -> Result<(*mut u8, Range<u64>)> {
        // Only a binding accepted before 7.2 (BIND-4, signed offsets) can
        // name an index past the end; the page store has no page there.
        if index >= self.size >> PAGE_SHIFT {
            return Err(Error::new(
                Errno::EFAULT,
                "BIND-4",
                format!(
                    "guest access to page {index:#x}: past the end of the {:#x}-byte file (a binding only releases before 7.2 accept)",
                    self.size
                ),
            ));
        }
        let pos = index << PAGE_SHIFT;
        let n = pos / WINDOW_SIZE;
        let mut windows = self.windows.lock();
        let window = match windows.entry(n) {
            std::collections::btree_map::Entry::Occupied(w) => w.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let start = n * WINDOW_SIZE;
                let len = WINDOW_SIZE.min(self.size - start);
                v.insert(Mmap::shared(self.store.as_fd(), start as i64, len)?)
            }
        };
        let first = (n * WINDOW_SIZE) >> PAGE_SHIFT;
        let pages = window.len() >> PAGE_SHIFT;
        // SAFETY: index lies in this window (pos / WINDOW_SIZE == n and the
        // window reaches the end of the file, which holds index).
        let p = unsafe { window.as_ptr().add((pos - n * WINDOW_SIZE) as usize) };
        Ok((p, first..first + pages))
    }

    fn fallocate_store(&self, mode: i32, offset: i64, len: i64) -> Result<()> {
        // SAFETY: fallocate on an fd we own; no memory is passed.
        if unsafe { libc::fallocate(self.store.as_raw_fd(), mode, offset, len) } != 0 {
            return Err(Error::last_os_error(format_args!(
                "fallocate mode={mode:#x} offset={offset:#x} len={len:#x} on the page store"
            )));
        }
        Ok(())
    }
}

/// The open file. Holds the VM (LIFE-2).
pub(crate) struct GmemFile {
    pub(crate) inode: Arc<GmemInode>,
    pub(crate) vm: Arc<VmInner>,
}

impl GmemFile {
    /// Punch hole: invalidate every binding overlapping the range, then free
    /// the pages (FALLOC-4, INVAL-1). Host mappings of the range lose their
    /// pages with the store's own punch. `MADV_REMOVE` comes here too
    /// (MMAP-7).
    pub(crate) fn punch_hole(&self, offset: i64, len: i64) -> Result<()> {
        let start = offset as u64 >> PAGE_SHIFT;
        let end = (offset as u64).saturating_add(len as u64) >> PAGE_SHIFT;
        let bindings = self.inode.invalidate_lock.write();
        for (range, b) in bindings.overlapping(start..end) {
            let gfns = index_to_gfns(range, b, start..end);
            self.vm
                .invalidations
                .invalidate(b.as_id, b.slot, gfns, InvalidateCause::PunchHole);
        }
        self.inode
            .fallocate_store(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, len)
    }

    fn allocate(&self, offset: i64, len: i64) -> Result<()> {
        if (offset as u64).saturating_add(len as u64) > self.inode.size {
            refuse!(
                EINVAL,
                "FALLOC-3",
                "allocating offset {offset:#x} + len {len:#x} reaches past the end of the {:#x}-byte file",
                self.inode.size
            );
        }
        let _shared = self.inode.invalidate_lock.read();
        self.inode.fallocate_store(FALLOC_FL_KEEP_SIZE, offset, len)
    }
}

/// The gfns of binding `b` (file index range `range`) that lie in `indices`.
fn index_to_gfns(range: &Range<u64>, b: &BindingRef, indices: Range<u64>) -> Range<u64> {
    let first = range.start.max(indices.start);
    let last = range.end.min(indices.end);
    b.base_gfn + (first - range.start)..b.base_gfn + (last - range.start)
}

impl Drop for GmemFile {
    /// `kvm_gmem_release`: every slot bound to the file forgets it and its
    /// whole range is invalidated; the slots stay (LIFE-5, INVAL-2).
    fn drop(&mut self) {
        let mut state = self.vm.state.write();
        let mut bindings = self.inode.invalidate_lock.write();
        for (range, b) in bindings.iter() {
            if let Some(slot) = state.memslot_mut(b.as_id, b.slot) {
                if let Some(g) = slot.gmem.as_mut() {
                    g.file = None;
                }
            }
            let gfns = index_to_gfns(range, b, range.clone());
            self.vm
                .invalidations
                .invalidate(b.as_id, b.slot, gfns, InvalidateCause::Release);
        }
        bindings.clear();
    }
}

/// Which open files are soft guest_memfds (the kernel's `file->f_op ==
/// &kvm_gmem_fops` check), by the page store's (st_dev, st_ino): an fd
/// names a file, so a dup of the user's fd finds the same guest_memfd.
static GMEM_FDS: LazyLock<Mutex<HashMap<FileKey, Weak<GmemFile>>>> =
    LazyLock::new(Default::default);

/// (st_dev, st_ino) of an open file.
type FileKey = (u64, u64);

/// The [`FileKey`] of `fd`, or `None` if it is not open.
fn file_key(fd: RawFd) -> Option<FileKey> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer we pass on success.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// `fget` for binding: EBADF for a closed fd, EINVAL for an fd that is not
/// a guest_memfd (BIND-1, BIND-2). Checked in that order, as the kernel does.
pub(crate) fn fget(fd: u32) -> Result<Arc<GmemFile>> {
    let Ok(raw) = RawFd::try_from(fd) else {
        refuse!(
            EBADF,
            "BIND-1",
            "guest_memfd {fd} is not an open file descriptor"
        );
    };
    // SAFETY: F_GETFD only reads the descriptor table entry.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        refuse!(
            EBADF,
            "BIND-1",
            "guest_memfd {fd} is not an open file descriptor"
        );
    }
    let Some(key) = file_key(raw) else {
        refuse!(
            EBADF,
            "BIND-1",
            "guest_memfd {fd} is not an open file descriptor"
        );
    };
    match GMEM_FDS.lock().get(&key).and_then(Weak::upgrade) {
        Some(file) => Ok(file),
        None => refuse!(EINVAL, "BIND-2", "fd {fd} is not a guest_memfd"),
    }
}

/// A guest_memfd fd owned by the user. Dropping it closes the fd; the file
/// lives on while host mappings hold it (LIFE-7).
pub struct SoftGuestMemfd {
    fd: OwnedFd,
    key: FileKey,
    file: Arc<GmemFile>,
}

impl SoftGuestMemfd {
    /// `kvm_gmem_create`, after the flag and size checks.
    pub(crate) fn create(vm: &Arc<VmInner>, size: u64, flags: u64) -> Result<Self> {
        let store = memfd("gmem-soft:guest_memfd", libc::MFD_CLOEXEC)?;
        // SAFETY: ftruncate/fchmod on the memfd we just created.
        if unsafe { libc::ftruncate(store.as_raw_fd(), size as i64) } != 0 {
            return Err(Error::last_os_error(format_args!(
                "sizing the page store to {size:#x}"
            )));
        }
        // SAFETY: as above.
        unsafe { libc::fchmod(store.as_raw_fd(), 0o600) };
        // The user's fd: a dup of the store without close-on-exec (CREATE-5).
        // SAFETY: F_DUPFD returns a new descriptor that we take ownership of
        // right away, or -1.
        let raw = unsafe { libc::fcntl(store.as_raw_fd(), libc::F_DUPFD, 0) };
        if raw < 0 {
            return Err(Error::last_os_error("dup of the page store"));
        }
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let inode = Arc::new(GmemInode {
            size,
            flags,
            store,
            invalidate_lock: RwLock::new(RangeMap::new()),
            windows: Mutex::default(),
            in_place: vm.profile.in_place_conversion(),
            private: RwLock::new(RangeSet::new()),
            pins: Mutex::default(),
            policy: vm.profile.shared_mempolicy().then(Mutex::default),
        });
        // Every page starts private unless the file is INIT_SHARED
        // (`kvm_gmem_init_inode`).
        if inode.in_place && flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
            inode.private.write().insert(0..size >> PAGE_SHIFT);
        }
        let file = Arc::new(GmemFile {
            inode,
            vm: vm.clone(),
        });
        let Some(key) = file_key(raw) else {
            return Err(Error::last_os_error("fstat of the page store"));
        };
        GMEM_FDS.lock().insert(key, Arc::downgrade(&file));
        Ok(SoftGuestMemfd { fd, key, file })
    }
}

impl SoftGuestMemfd {
    /// Bytes of host memory the file's pages hold now: grows as pages are
    /// allocated or touched, shrinks when holes are punched (FALLOC-4).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills the buffer we pass on success.
        if unsafe { libc::fstat(self.file.inode.store.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(Error::last_os_error("fstat of the page store"));
        }
        // SAFETY: fstat returned 0, so the struct is initialised.
        Ok(unsafe { st.assume_init() }.st_blocks as u64 * 512)
    }
}

impl Drop for SoftGuestMemfd {
    fn drop(&mut self) {
        let mut fds = GMEM_FDS.lock();
        if fds
            .get(&self.key)
            .is_some_and(|f| f.ptr_eq(&Arc::downgrade(&self.file)))
        {
            fds.remove(&self.key);
        }
        // Then the fd closes and the file reference goes, in field order.
    }
}

impl AsRawFd for SoftGuestMemfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl GuestMemfd for SoftGuestMemfd {
    fn size(&self) -> u64 {
        self.file.inode.size
    }

    fn flags(&self) -> u64 {
        self.file.inode.flags
    }

    /// `fallocate(2)`: `vfs_fallocate` (fs/open.c), then guest_memfd's own
    /// `kvm_gmem_fallocate`, every check in their order (FALLOC-1,
    /// FALLOC-2). The generic checks come first, so an offset plus length
    /// that overflows is EFBIG even in a mode guest_memfd refuses.
    fn fallocate(&self, mode: i32, offset: i64, len: i64) -> Result<()> {
        // vfs_fallocate, in order.
        if offset < 0 || len <= 0 {
            refuse!(
                EINVAL,
                "FALLOC-2",
                "fallocate offset {offset:#x} len {len:#x}: offset must be >= 0 and len > 0 (vfs_fallocate)"
            );
        }
        if mode & !(FALLOC_FL_MODE_MASK | FALLOC_FL_KEEP_SIZE) != 0 {
            refuse!(
                EOPNOTSUPP,
                "FALLOC-1",
                "fallocate mode {mode:#x} has bits no file system knows (vfs_fallocate)"
            );
        }
        // One mode at a time (ALLOCATE_RANGE is no bit): PUNCH_HOLE needs
        // KEEP_SIZE, the modes that change the size refuse it.
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let mode_ok = match mode & FALLOC_FL_MODE_MASK {
            0 | libc::FALLOC_FL_UNSHARE_RANGE | libc::FALLOC_FL_ZERO_RANGE => true,
            FALLOC_FL_PUNCH_HOLE => keep_size,
            libc::FALLOC_FL_COLLAPSE_RANGE
            | libc::FALLOC_FL_INSERT_RANGE
            | FALLOC_FL_WRITE_ZEROES => !keep_size,
            _ => false,
        };
        if !mode_ok {
            refuse!(
                EOPNOTSUPP,
                "FALLOC-1",
                "fallocate mode {mode:#x} is not one mode with a KEEP_SIZE it accepts (vfs_fallocate)"
            );
        }
        // EBADF (not open for writing), EPERM (append-only, immutable),
        // ETXTBSY (swap file), the LSM's and fanotify's answers, then ESPIPE,
        // EISDIR and ENODEV by file type: a guest_memfd is opened O_RDWR
        // (CREATE-5), has none of those inode flags and is a regular file
        // (CREATE-4), so it passes each.
        //
        // The file system's largest size (`s_maxbytes`) is MAX_LFS_FILESIZE
        // (2^63 - 1) on guest_memfd's pseudo file system (`init_pseudo`), so
        // only a sum that overflows is past it.
        if offset.checked_add(len).is_none() {
            refuse!(
                EFBIG,
                "FALLOC-2",
                "fallocate offset {offset:#x} + len {len:#x} passes the largest file size 2^63 - 1 (vfs_fallocate)"
            );
        }
        // kvm_gmem_fallocate, in order.
        if !keep_size {
            refuse!(
                EOPNOTSUPP,
                "FALLOC-1",
                "fallocate mode {mode:#x} lacks KEEP_SIZE: a guest_memfd never changes size (kvm_gmem_fallocate)"
            );
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0 {
            refuse!(
                EOPNOTSUPP,
                "FALLOC-1",
                "fallocate mode {mode:#x}: guest_memfd knows only allocate and punch hole (kvm_gmem_fallocate)"
            );
        }
        if !page_aligned(offset as u64) || !page_aligned(len as u64) {
            refuse!(
                EINVAL,
                "FALLOC-2",
                "fallocate offset {offset:#x} len {len:#x} is not page aligned (kvm_gmem_fallocate)"
            );
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            self.file.punch_hole(offset, len)
        } else {
            self.file.allocate(offset, len)
        }
    }

    /// `mmap(2)`: the generic checks of the mmap system call and `do_mmap`
    /// (mm/mmap.c) in their order, then `kvm_gmem_mmap`'s own (MMAP-1, MMAP-2).
    fn mmap(&self, offset: i64, len: u64, kind: MapKind) -> Result<Box<dyn HostMemory>> {
        // The offset reaches the kernel as an unsigned long.
        let off = offset as u64;
        if !page_aligned(off) {
            refuse!(EINVAL, "MMAP-2", "mmap offset {off:#x} is not page aligned");
        }
        if len == 0 {
            refuse!(EINVAL, "MMAP-2", "mmap length 0");
        }
        let Some(len_aligned) = len.checked_next_multiple_of(PAGE_SIZE) else {
            refuse!(
                ENOMEM,
                "MMAP-2",
                "mmap length {len:#x} overflows when rounded up to a page"
            );
        };
        let pgoff = off >> PAGE_SHIFT;
        if pgoff.checked_add(len_aligned >> PAGE_SHIFT).is_none() {
            refuse!(
                EOVERFLOW,
                "MMAP-2",
                "mmap offset {off:#x} + length {len:#x} overflows"
            );
        }
        if len_aligned > TASK_SIZE_MAX {
            refuse!(
                ENOMEM,
                "MMAP-2",
                "mmap length {len:#x} does not fit the user address space"
            );
        }
        // file_mmap_ok: a regular file maps at most MAX_LFS_FILESIZE bytes
        // of file offsets.
        let max_file = i64::MAX as u64;
        if len_aligned > max_file || pgoff > (max_file - len_aligned) >> PAGE_SHIFT {
            refuse!(
                EOVERFLOW,
                "MMAP-2",
                "mmap offset {off:#x} + length {len:#x} passes the largest file offset"
            );
        }
        let inode = &self.file.inode;
        if !inode.supports_mmap() {
            refuse!(
                ENODEV,
                "MMAP-1",
                "the guest_memfd was created without MMAP (flags {:#x})",
                inode.flags
            );
        }
        if kind == MapKind::Private {
            refuse!(
                EINVAL,
                "MMAP-2",
                "a private (copy-on-write) mapping of a guest_memfd"
            );
        }
        let mmap = Mmap::shared(inode.store.as_fd(), offset, len)?;
        let kind = RegionKind::GuestMemfd {
            inode: inode.clone(),
            offset: off,
            vm_policy: Mutex::default(),
        };
        Ok(Box::new(SoftHostMemory::new(
            &self.file.vm.host,
            mmap,
            kind,
            Some(self.file.clone()),
        )))
    }

    fn stat(&self) -> Result<Stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills the buffer we pass on success.
        if unsafe { libc::fstat(self.file.inode.store.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(Error::last_os_error("fstat"));
        }
        // SAFETY: fstat returned 0, so the struct is initialised.
        let st = unsafe { st.assume_init() };
        Ok(Stat {
            ino: st.st_ino,
            size: st.st_size,
            blksize: st.st_blksize,
            blocks: 0,
            mode: st.st_mode,
        })
    }

    fn read(&self, _buf: &mut [u8]) -> Result<usize> {
        refuse!(EINVAL, "FILE-1", "read(2) of a guest_memfd");
    }

    fn write(&self, _buf: &[u8]) -> Result<usize> {
        refuse!(EINVAL, "FILE-1", "write(2) of a guest_memfd");
    }

    fn pread(&self, _buf: &mut [u8], offset: i64) -> Result<usize> {
        refuse!(
            ESPIPE,
            "FILE-1",
            "pread(2) at {offset:#x} of a guest_memfd: it cannot seek"
        );
    }

    fn pwrite(&self, _buf: &[u8], offset: i64) -> Result<usize> {
        refuse!(
            ESPIPE,
            "FILE-1",
            "pwrite(2) at {offset:#x} of a guest_memfd: it cannot seek"
        );
    }

    fn lseek(&self, offset: i64, whence: i32) -> Result<u64> {
        refuse!(
            ESPIPE,
            "FILE-1",
            "lseek(2) to {offset:#x} (whence {whence}) of a guest_memfd"
        );
    }

    fn ftruncate(&self, len: i64) -> Result<()> {
        refuse!(
            EINVAL,
            "FILE-2",
            "ftruncate to {len:#x}: a guest_memfd's size is fixed at {:#x}",
            self.file.inode.size
        );
    }

    /// `kvm_gmem_set_attributes`, checks in its order.
    fn set_memory_attributes2(&self, attrs: &mut kvm_memory_attributes2) -> Result<()> {
        let inode = &self.file.inode;
        if !inode.in_place {
            refuse!(
                ENOTTY,
                "CONV-1",
                "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd: in-place conversion is not in release {} (next, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)",
                self.file.vm.profile.release()
            );
        }
        if attrs.flags != 0 || attrs.reserved.iter().any(|r| *r != 0) {
            refuse!(
                EINVAL,
                "CONV-2",
                "flags {:#x} and reserved words must be 0",
                attrs.flags
            );
        }
        let private = KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;
        if !self.file.vm.has_private_mem {
            refuse!(EINVAL, "CONV-2", "the VM has no private memory");
        }
        if attrs.attributes & !private != 0 {
            refuse!(
                EINVAL,
                "CONV-2",
                "attributes {:#x}: only PRIVATE ({private:#x}) is supported",
                attrs.attributes
            );
        }
        let (offset, size) = (attrs.offset, attrs.size);
        if size == 0 || offset.checked_add(size).is_none() {
            refuse!(
                EINVAL,
                "CONV-3",
                "offset {offset:#x} size {size:#x}: size is 0 or the range wraps"
            );
        }
        if !page_aligned(offset) || !page_aligned(size) {
            refuse!(
                EINVAL,
                "CONV-3",
                "offset {offset:#x} size {size:#x} is not page aligned"
            );
        }
        if offset + size > inode.size {
            refuse!(
                EINVAL,
                "CONV-3",
                "offset {offset:#x} + size {size:#x} reaches past the end of the {:#x}-byte file",
                inode.size
            );
        }
        let indices = offset >> PAGE_SHIFT..(offset + size) >> PAGE_SHIFT;
        inode
            .set_private(&self.file, indices, attrs.attributes != 0)
            .map_err(|index| {
                attrs.error_offset = index << PAGE_SHIFT;
                Error::new(
                    Errno::EAGAIN,
                    "CONV-5",
                    format!(
                        "page at offset {:#x} is still referenced by the host; release it and retry",
                        attrs.error_offset
                    ),
                )
            })
    }

    fn ioctl(&self, request: u64) -> Result<i32> {
        // do_vfs_ioctl (fs/ioctl.c) answers a few requests for every file
        // before the file's own ioctl is asked; the request is an unsigned
        // int there. FIONREAD and FIOQSIZE are not among them for an
        // anonymous inode (IS_ANON_FILE), so guest_memfd gets those.
        let cmd = request as u32;
        match u64::from(cmd) {
            libc::FIOCLEX | libc::FIONCLEX => {
                let cloexec = u64::from(cmd) == libc::FIOCLEX;
                // SAFETY: F_GETFD/F_SETFD on our own open fd touch only its flags.
                let ok = unsafe {
                    let flags = libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFD);
                    let flags = if cloexec {
                        flags | libc::FD_CLOEXEC
                    } else {
                        flags & !libc::FD_CLOEXEC
                    };
                    flags >= 0 && libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFD, flags) == 0
                };
                if !ok {
                    return Err(Error::last_os_error(format_args!("ioctl {cmd:#x}")));
                }
                Ok(0)
            }
            // FIGETBSZ is _IO(0x00, 2).
            libc::FIONBIO | libc::FIOASYNC | 2 => refuse!(
                EFAULT,
                "FILE-1",
                "ioctl {cmd:#x} reads or writes its argument, and 0 is not user memory"
            ),
            _ => refuse!(
                ENOTTY,
                "FILE-1",
                "ioctl {request:#x} is not a guest_memfd ioctl"
            ),
        }
    }
}

/// Pages of a guest_memfd referenced by the host; dropping it releases
/// them. A pin of anonymous memory holds nothing guest_memfd cares about.
pub struct SoftPin {
    inode: Option<Arc<GmemInode>>,
    indices: Range<u64>,
}

impl SoftPin {
    /// A pin of memory that is not guest_memfd's.
    pub(crate) fn unrelated() -> Self {
        SoftPin {
            inode: None,
            indices: 0..0,
        }
    }
}

impl Pin for SoftPin {}

impl Drop for SoftPin {
    fn drop(&mut self) {
        let Some(inode) = &self.inode else { return };
        let mut pins = inode.pins.lock();
        for i in self.indices.clone() {
            if let Some(n) = pins.get_mut(&i) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&i);
                }
            }
        }
    }
}

/// A fresh memfd.
pub(crate) fn memfd(name: &str, flags: u32) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(name).expect("memfd names have no NUL");
    // SAFETY: memfd_create reads the NUL-terminated name; the returned fd is
    // taken over right away.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if raw < 0 {
        return Err(Error::last_os_error("memfd_create"));
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}
