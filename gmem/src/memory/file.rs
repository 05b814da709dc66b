//! A guest_memfd file as a VMM holds it: created with flags negotiated
//! against `KVM_CAP_GUEST_MEMFD_FLAGS`, owned from birth (closed on drop),
//! with typed offsets and the memory it holds measured by the kernel.
//!
//! ```
//! use gmem::memory::{FileAccess, GmemFile, GmemOffset};
//! let hv = gmem::Backend::Soft.open()?;
//! let vm = hv.create_vm(0)?;
//! let file = GmemFile::create(&*vm, 1 << 20, FileAccess::Shared)?;
//! file.allocate(GmemOffset(0), 8192)?;
//! assert_eq!(file.held()?, 8192);
//! # Ok::<(), gmem::memory::Error>(())
//! ```

use std::fmt;

use super::account;
use super::addr::GmemOffset;
use super::Error;
use crate::error::Errno;
use crate::hypervisor::{GuestMemfd, HostMemory, MapKind, Vm};
use crate::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes2, page_aligned, FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
};

/// What the host may do with a file's memory: the three meaningful
/// combinations of the creation flags.
///
/// ```
/// use gmem::memory::FileAccess;
/// assert_eq!(FileAccess::Shared.flags(), 0b11);
/// assert_eq!(FileAccess::Shared.to_string(), "MMAP | INIT_SHARED");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileAccess {
    /// No flags: only the guest reaches the memory (private memory of a
    /// confidential VM).
    GuestOnly,
    /// `MMAP`: the host may map the file; pages start private to the
    /// guest and fault (SIGBUS) on a host touch until made shared.
    Mappable,
    /// `MMAP | INIT_SHARED`: the host maps the file and touches every page.
    Shared,
}

impl FileAccess {
    /// The `KVM_CREATE_GUEST_MEMFD` flags.
    ///
    /// ```
    /// assert_eq!(gmem::memory::FileAccess::GuestOnly.flags(), 0);
    /// ```
    pub fn flags(self) -> u64 {
        match self {
            FileAccess::GuestOnly => 0,
            FileAccess::Mappable => GUEST_MEMFD_FLAG_MMAP,
            FileAccess::Shared => GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        }
    }

    /// Can the host map the file?
    ///
    /// ```
    /// assert!(gmem::memory::FileAccess::Mappable.can_map());
    /// ```
    pub fn can_map(self) -> bool {
        self != FileAccess::GuestOnly
    }
}

impl fmt::Display for FileAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileAccess::GuestOnly => "guest only",
            FileAccess::Mappable => "MMAP",
            FileAccess::Shared => "MMAP | INIT_SHARED",
        })
    }
}

/// A guest_memfd file, owned: closing it is dropping it.
///
/// ```
/// use gmem::memory::{FileAccess, GmemFile, GmemOffset};
/// let hv = gmem::Backend::Soft.open().unwrap();
/// let vm = hv.create_vm(0).unwrap();
/// let file = GmemFile::create(&*vm, 2 << 20, FileAccess::Shared).unwrap();
/// let map = file.map().unwrap();
/// map.write(0, &[1; 4096]).unwrap();
/// assert_eq!(file.held().unwrap(), 4096);
/// file.punch_hole(GmemOffset(0), 4096).unwrap();
/// assert_eq!(file.held().unwrap(), 0);
/// ```
pub struct GmemFile {
    file: Box<dyn GuestMemfd>,
    access: FileAccess,
}

impl fmt::Debug for GmemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GmemFile")
            .field("size", &self.file.size())
            .field("access", &self.access)
            .finish()
    }
}

impl GmemFile {
    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes on `vm`, after checking that
    /// the VM offers guest_memfd and the flags `access` needs (CREATE-1,
    /// EINVAL, with the VM's `KVM_CAP_GUEST_MEMFD_FLAGS`): the same refusal
    /// on every backend, before the kernel is asked.
    ///
    /// ```
    /// use gmem::memory::{FileAccess, GmemFile};
    /// let hv = gmem::Backend::Soft.open().unwrap();
    /// let private_vm = hv.create_vm(gmem::uapi::KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    /// let err = GmemFile::create(&*private_vm, 4096, FileAccess::Shared).unwrap_err();
    /// assert_eq!(err.rule(), "CREATE-1");
    /// ```
    pub fn create(vm: &dyn Vm, size: u64, access: FileAccess) -> Result<GmemFile, Error> {
        if vm.check_extension(KVM_CAP_GUEST_MEMFD) <= 0 {
            return Err(crate::Error::new(
                Errno::EOPNOTSUPP,
                "CAP-1",
                "guest_memfd is not supported by this host (KVM_CAP_GUEST_MEMFD 0)",
            )
            .into());
        }
        let supported = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
        let flags = access.flags();
        if flags & !supported != 0 {
            return Err(crate::Error::new(
                Errno::EINVAL,
                "CREATE-1",
                format!(
                    "a {access} guest_memfd needs flags {flags:#x}; this VM offers \
                     {supported:#x} (KVM_CAP_GUEST_MEMFD_FLAGS)"
                ),
            )
            .into());
        }
        let file = vm.create_guest_memfd(kvm_create_guest_memfd {
            size,
            flags,
            ..Default::default()
        })?;
        Ok(GmemFile { file, access })
    }

    /// The size given at creation.
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 8192, FileAccess::Shared).unwrap();
    /// assert_eq!(file.size(), 8192);
    /// ```
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// What the host may do with the memory.
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 4096, FileAccess::GuestOnly).unwrap();
    /// assert_eq!(file.access(), FileAccess::GuestOnly);
    /// ```
    pub fn access(&self) -> FileAccess {
        self.access
    }

    /// Frees `[offset, offset + len)`: the pages go back to the host, every
    /// guest and host mapping of them is zapped, and the next touch reads
    /// zeros (FALLOC-4).
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile, GmemOffset};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 8192, FileAccess::Shared).unwrap();
    /// assert!(file.punch_hole(GmemOffset(1), 4096).is_err());
    /// ```
    pub fn punch_hole(&self, offset: GmemOffset, len: u64) -> Result<(), Error> {
        self.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, len)
    }

    /// Allocates `[offset, offset + len)` ahead of the guest's first touch.
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile, GmemOffset};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 8192, FileAccess::GuestOnly).unwrap();
    /// file.allocate(GmemOffset(0), 8192).unwrap();
    /// assert_eq!(file.held().unwrap(), 8192);
    /// ```
    pub fn allocate(&self, offset: GmemOffset, len: u64) -> Result<(), Error> {
        self.fallocate(FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn fallocate(&self, mode: i32, offset: GmemOffset, len: u64) -> Result<(), Error> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset.0), i64::try_from(len)) else {
            return Err(crate::Error::new(
                Errno::EINVAL,
                "FALLOC-2",
                format!("offset {offset} len {len:#x} do not fit fallocate's off_t"),
            )
            .into());
        };
        Ok(self.file.fallocate(mode, off, n)?)
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES2` on the file: makes `[offset, offset +
    /// len)` private or shared in place (CONV-*). The page contents stay;
    /// a page still referenced (pinned) refuses going private with
    /// `EAGAIN`, and the error names its offset (CONV-5).
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile, GmemOffset};
    /// let hv = gmem::soft::SoftHypervisor::with_profile(gmem::Release::Next).unwrap();
    /// let vm = gmem::Hypervisor::create_vm(&hv, gmem::uapi::KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    /// let file = GmemFile::create(&*vm, 8192, FileAccess::Shared).unwrap();
    /// file.set_private(GmemOffset(0), 4096, true).unwrap();
    /// let map = file.map().unwrap();
    /// assert!(map.read(0, &mut [0]).is_err() && map.read(4096, &mut [0]).is_ok());
    /// ```
    pub fn set_private(&self, offset: GmemOffset, len: u64, private: bool) -> Result<(), Error> {
        let mut attrs = kvm_memory_attributes2::new(offset.0, len, private);
        self.file
            .set_memory_attributes2(&mut attrs)
            .map_err(|mut e| {
                if e.errno == Errno::EAGAIN {
                    e.message += &format!(
                        ": the page at file offset {:#x} is still referenced (pinned)",
                        attrs.error_offset
                    );
                }
                Error::from(e)
            })
    }

    /// A shared host mapping of the whole file (MMAP-*): unmapped when the
    /// returned handle is dropped; it keeps the file alive meanwhile.
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 4096, FileAccess::GuestOnly).unwrap();
    /// assert_eq!(file.map().err().unwrap().rule(), "MMAP-1");
    /// ```
    pub fn map(&self) -> Result<Box<dyn HostMemory>, Error> {
        if !self.access.can_map() {
            return Err(crate::Error::new(
                Errno::ENODEV,
                "MMAP-1",
                "a guest-only guest_memfd (created without MMAP) cannot be mapped",
            )
            .into());
        }
        Ok(self.file.mmap(0, self.size(), MapKind::Shared)?)
    }

    /// Bytes of memory the file holds now, as the kernel counts its page
    /// cache (`cachestat(2)`: `st_blocks` stays 0 for guest_memfd).
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 1 << 20, FileAccess::GuestOnly).unwrap();
    /// assert_eq!(file.held().unwrap(), 0);
    /// ```
    pub fn held(&self) -> Result<u64, Error> {
        self.held_in(GmemOffset(0), self.size())
    }

    /// Bytes the file holds in `[offset, offset + len)`.
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile, GmemOffset};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 1 << 20, FileAccess::GuestOnly).unwrap();
    /// file.allocate(GmemOffset(0), 4096).unwrap();
    /// assert_eq!(file.held_in(GmemOffset(4096), 4096).unwrap(), 0);
    /// ```
    pub fn held_in(&self, offset: GmemOffset, len: u64) -> Result<u64, Error> {
        if len == 0 || !page_aligned(offset.0) || !page_aligned(len) {
            return Err(Error::Range {
                what: "measuring",
                range: format!("file offset {offset} len {len:#x}"),
                why: "not page aligned or empty",
            });
        }
        account::file_bytes(self.file.as_ref(), offset.0, len)
    }

    /// The contract's handle, for conformance-style work that needs the raw
    /// calls (fd number, fallocate modes, stat).
    ///
    /// ```
    /// # use gmem::memory::{FileAccess, GmemFile};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let vm = hv.create_vm(0).unwrap();
    /// let file = GmemFile::create(&*vm, 4096, FileAccess::Shared).unwrap();
    /// assert_eq!(file.guest_memfd().flags(), 3);
    /// ```
    pub fn guest_memfd(&self) -> &dyn GuestMemfd {
        self.file.as_ref()
    }
}
