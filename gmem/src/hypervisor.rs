//! The contract: what a hypervisor, a VM, a guest_memfd and a vCPU do.
//!
//! Each trait follows the uAPI call by call (`KVM_CREATE_VM`,
//! `KVM_CREATE_GUEST_MEMFD`, `KVM_SET_USER_MEMORY_REGION2`, ...), taking the
//! kernel's own structs, so that a reader who knows KVM recognises every call.
//! Two backends implement it: [`crate::soft`], the executable specification,
//! and [`crate::kvm`], the running kernel. Nothing outside those two folders
//! names a backend.
//!
//! Every handle owns what it stands for: dropping a [`Vm`] closes the VM fd,
//! dropping a [`GuestMemfd`] closes the file, dropping a [`HostMemory`] unmaps.

use std::os::fd::AsRawFd;

use crate::error::Result;
use crate::error::{Errno, Error};
use crate::madvise::Advice;
use crate::mempolicy::{MbindFlags, MemPolicy};
use crate::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_memory_attributes2, kvm_pre_fault_memory,
    kvm_userspace_memory_region, kvm_userspace_memory_region2,
};

/// `/dev/kvm`: capabilities and VM creation.
pub trait Hypervisor: AsRawFd + Send + Sync {
    /// Short backend name for reports: `soft` or `kvm`.
    fn name(&self) -> &'static str;

    /// `KVM_CHECK_EXTENSION` on the system fd: 0 when unsupported.
    fn check_extension(&self, cap: u32) -> i64;

    /// The kernel release whose behaviour this backend follows, when it is
    /// known by construction (a software profile). A running kernel says
    /// `None`: which release it follows is measured, not assumed.
    fn release(&self) -> Option<crate::Release> {
        None
    }

    /// `KVM_CREATE_VM` with a machine type (`KVM_X86_DEFAULT_VM`, ...).
    fn create_vm(&self, vm_type: u64) -> Result<Box<dyn Vm>>;

    /// The VMM's own memory: `size` bytes of anonymous, private, lazily
    /// allocated host memory, the kind ordinary memslots point at.
    fn host_memory(&self, size: u64) -> Result<Box<dyn HostMemory>>;
}

/// A VM fd.
pub trait Vm: AsRawFd + Send + Sync {
    /// The machine type it was created with.
    fn vm_type(&self) -> u64;

    /// `KVM_CHECK_EXTENSION` on the VM fd: per-VM answers (CAP-3).
    fn check_extension(&self, cap: u32) -> i64;

    /// `KVM_ENABLE_CAP` (e.g. `KVM_CAP_EXIT_HYPERCALL` with the hypercall mask).
    fn enable_cap(&self, cap: u32, arg0: u64) -> Result<()>;

    /// `KVM_CREATE_GUEST_MEMFD`: a new file bound to this VM (CREATE-*).
    fn create_guest_memfd(&self, args: kvm_create_guest_memfd) -> Result<Box<dyn GuestMemfd>>;

    /// `KVM_SET_USER_MEMORY_REGION` (the 32-byte v1 struct).
    fn set_user_memory_region(&self, region: kvm_userspace_memory_region) -> Result<()>;

    /// `KVM_SET_USER_MEMORY_REGION2`: create, move, change or delete a
    /// memslot, binding it to a guest_memfd range with `KVM_MEM_GUEST_MEMFD`
    /// (SLOT-*, BIND-*). `guest_memfd` is an fd number, as in the kernel.
    fn set_user_memory_region2(&self, region: kvm_userspace_memory_region2) -> Result<()>;

    /// `KVM_SET_MEMORY_ATTRIBUTES` (ATTR-*).
    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<()>;

    /// `KVM_CREATE_VCPU`.
    fn create_vcpu(&self, id: u64) -> Result<Box<dyn Vcpu>>;
}

/// A guest_memfd file.
pub trait GuestMemfd: AsRawFd + Send + Sync {
    /// Size given at creation; it never changes (FILE-2).
    fn size(&self) -> u64;

    /// Creation flags (`GUEST_MEMFD_FLAG_*`).
    fn flags(&self) -> u64;

    /// `fallocate(2)`: allocate (`KEEP_SIZE`) or punch a hole
    /// (`KEEP_SIZE | PUNCH_HOLE`) (FALLOC-*).
    fn fallocate(&self, mode: i32, offset: i64, len: i64) -> Result<()>;

    /// `mmap(2)` of `len` bytes at file `offset` (MMAP-*). The mapping keeps
    /// the file alive after its fd is closed (LIFE-7).
    fn mmap(&self, offset: i64, len: u64, kind: MapKind) -> Result<Box<dyn HostMemory>>;

    /// `fstat(2)`.
    fn stat(&self) -> Result<Stat>;

    /// `read(2)`: refused (FILE-1).
    fn read(&self, buf: &mut [u8]) -> Result<usize>;
    /// `write(2)`: refused (FILE-1).
    fn write(&self, buf: &[u8]) -> Result<usize>;
    /// `pread(2)`: refused (FILE-1).
    fn pread(&self, buf: &mut [u8], offset: i64) -> Result<usize>;
    /// `pwrite(2)`: refused (FILE-1).
    fn pwrite(&self, buf: &[u8], offset: i64) -> Result<usize>;
    /// `lseek(2)`: refused (FILE-1).
    fn lseek(&self, offset: i64, whence: i32) -> Result<u64>;
    /// `ftruncate(2)`: refused (FILE-2).
    fn ftruncate(&self, len: i64) -> Result<()>;
    /// An ioctl guest_memfd does not know: refused (FILE-1).
    fn ioctl(&self, request: u64) -> Result<i32>;

    /// `KVM_SET_MEMORY_ATTRIBUTES2` on the file (in-place conversion,
    /// CONV-*): make `[offset, offset + size)` private or shared. On
    /// `EAGAIN` the kernel writes the offset of a page that is still
    /// referenced to `attrs.error_offset`. Backends without in-place
    /// conversion refuse with `ENOTTY`, as a kernel without the ioctl does.
    fn set_memory_attributes2(&self, attrs: &mut kvm_memory_attributes2) -> Result<()> {
        let _ = attrs;
        Err(Error::new(
            Errno::ENOTTY,
            "CONV-1",
            "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd: not supported by this backend (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)",
        ))
    }
}

/// `MAP_SHARED` or `MAP_PRIVATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// `MAP_SHARED`: the only kind guest_memfd accepts.
    Shared,
    /// `MAP_PRIVATE` (copy-on-write): refused by guest_memfd (MMAP-2).
    Private,
}

/// What `fstat` reports of a guest_memfd (CREATE-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Inode number: distinct per file.
    pub ino: u64,
    /// `st_size`: the size given at creation.
    pub size: i64,
    /// `st_blksize`: the page size.
    pub blksize: i64,
    /// `st_blocks` as the kernel reports it: guest_memfd does not account
    /// its pages there, so it stays 0 however much memory the file holds.
    pub blocks: i64,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
}

/// Host memory: the VMM's anonymous memory, or a host mapping of a
/// guest_memfd. Its address can be given to a memslot as `userspace_addr`.
/// Dropping it unmaps it.
pub trait HostMemory: Send + Sync {
    /// The userspace address of the first byte.
    fn addr(&self) -> u64;

    /// The length of the mapping in bytes: what the kernel's VMA covers,
    /// the length asked for rounded up to a whole page (`do_mmap`). Every
    /// byte of it may be accessed (MMAP-2).
    fn len(&self) -> u64;

    /// Is the mapping empty? (Never: mmap refuses length 0.)
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at `offset` into the mapping. On SIGBUS the
    /// bytes before the first faulting page have been read into `buf`, as a
    /// CPU's copy would have read them (MMAP-3).
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), HostFault>;

    /// Writes `buf` at `offset` into the mapping. On SIGBUS the bytes before
    /// the first faulting page have been stored (MMAP-3).
    fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), HostFault>;

    /// Takes a long-term reference on the pages of `[offset, offset + len)`
    /// (what `get_user_pages(FOLL_LONGTERM)` does for a device or an
    /// IOMMU), held until the returned handle is dropped. A page made
    /// private while referenced is refused with `EAGAIN` (CONV-5).
    fn pin(&self, offset: u64, len: u64) -> Result<Box<dyn Pin>> {
        let _ = (offset, len);
        Err(Error::new(
            Errno::ENOTTY,
            "CONV-5",
            "pinning host pages is not supported by this backend",
        ))
    }

    /// `mbind(2)` on `[offset, offset + len)`: the NUMA policy of those
    /// pages (NUMA-1). Through a guest_memfd mapping it is the mapping's own
    /// before 6.19 and the file's, by file offset, since (NUMA-2). A range
    /// leaving the mapping is refused with `EFAULT`. The default asks the
    /// running kernel.
    fn mbind(&self, offset: u64, len: u64, policy: MemPolicy, flags: MbindFlags) -> Result<()> {
        crate::mempolicy::mbind(self.addr(), self.len(), offset, len, policy, flags)
    }

    /// `get_mempolicy(2)` with `MPOL_F_ADDR` at `offset`: the policy of
    /// that page as the kernel reports it (NUMA-3). The default asks the
    /// running kernel.
    fn get_mempolicy(&self, offset: u64) -> Result<MemPolicy> {
        crate::mempolicy::get_mempolicy(self.addr(), self.len(), offset)
    }

    /// `madvise(2)` on `[offset, offset + len)`. Through a guest_memfd
    /// mapping: `Collapse` is EINVAL (MMAP-6), `Remove` punches a hole in
    /// the file (MMAP-7), `DontNeed` only unmaps, the file keeps its pages
    /// (MMAP-8), the populate advice faults pages in as touches would
    /// (MMAP-9). A range leaving the mapping is refused with `ENOMEM`
    /// (MMAP-8). The default asks the running kernel.
    fn madvise(&self, offset: u64, len: u64, advice: Advice) -> Result<()> {
        crate::madvise::madvise(self.addr(), self.len(), offset, len, advice)
    }
}

/// A long-term reference on host pages; dropping it releases them.
pub trait Pin: Send + Sync {}

/// A host access the kernel would answer with a signal, as a typed error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFault {
    /// The kernel raises SIGBUS: past the end of the file (MMAP-3), or
    /// memory that is not shared with the host (MMAP-4).
    #[error("SIGBUS at mapping offset {offset:#x}: {reason} ({rule})")]
    Sigbus {
        /// Offset into the mapping of the first byte that faulted.
        offset: u64,
        /// The rule that makes it fault.
        rule: &'static str,
        /// Why.
        reason: String,
    },
    /// The access leaves the mapping: SIGSEGV in a real process.
    #[error(
        "access of {len} bytes at offset {offset:#x} leaves the {size:#x}-byte mapping (SIGSEGV)"
    )]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: u64,
        /// The mapping's length.
        size: u64,
    },
}

/// A vCPU fd. Each [`Vcpu::run`] runs guest code that performs one operation;
/// each [`Vcpu::run_loop`] runs one guest loop over a whole range.
pub trait Vcpu: Send {
    /// `KVM_RUN` until the guest completes `op` or exits to the VMM.
    fn run(&mut self, op: GuestOp) -> Result<VcpuExit>;

    /// `KVM_PRE_FAULT_MEMORY` (PREFAULT-*): map `range` as a guest read
    /// fault would, allocating guest_memfd pages. `range` is updated to
    /// what remains; the call fails only when no page was processed.
    /// Backends without it refuse with `ENOTTY`.
    fn pre_fault_memory(&mut self, range: &mut kvm_pre_fault_memory) -> Result<()> {
        let _ = range;
        Err(Error::new(
            Errno::ENOTTY,
            "PREFAULT-1",
            "KVM_PRE_FAULT_MEMORY: not supported by this backend (KVM_CAP_PRE_FAULT_MEMORY)",
        ))
    }

    /// Runs `op` as one guest loop: the guest walks the whole range in one
    /// run and exits to the VMM only when it is done or when an access
    /// cannot complete (MMIO, memory fault). On such an exit
    /// [`LoopExit::done`] says how many bytes of the range were completed
    /// first; the VMM handles the exit and resumes at `gpa + done`.
    ///
    /// The default performs the loop one [`Vcpu::run`] per word; backends
    /// override it with a real guest loop.
    fn run_loop(&mut self, op: GuestLoop) -> Result<LoopExit> {
        op.check()?;
        let (gpa, len) = op.range();
        let step = op.step();
        let mut mismatches = 0u64;
        let mut off = 0;
        while off < len {
            let (exit, differs) = op.run_step(self, gpa + off)?;
            if !matches!(exit, VcpuExit::Done(_)) {
                return Ok(LoopExit { done: off, exit });
            }
            mismatches += differs;
            off += step;
        }
        Ok(LoopExit {
            done: len,
            exit: VcpuExit::Done(mismatches),
        })
    }
}

/// A guest loop over `[gpa, gpa + len)`: what a guest does to populate or
/// verify gigabytes without one run per access.
///
/// The pattern of [`GuestLoop::Fill`] and [`GuestLoop::Verify`] is
/// [`GuestLoop::pattern`]: every 8-byte word holds its own guest physical
/// address xor a seed, so a word written to the wrong place is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestLoop {
    /// Store `pattern(addr, seed)` into every 8-byte word of the range.
    /// Completes with `Done(0)`.
    Fill {
        /// First guest physical address (8-byte aligned).
        gpa: u64,
        /// Bytes (a multiple of 8).
        len: u64,
        /// Xored into every word's address.
        seed: u64,
    },
    /// Load every 8-byte word and compare it with `pattern(addr, seed)`.
    /// Completes with `Done(n)`, n the number of words that differ.
    Verify {
        /// First guest physical address (8-byte aligned).
        gpa: u64,
        /// Bytes (a multiple of 8).
        len: u64,
        /// The seed the range was filled with.
        seed: u64,
    },
    /// One access to the first word of every page of the range (page
    /// aligned): a load, or with `write` an atomic add of 0 that keeps the
    /// contents but faults the page in writable. Completes with `Done(0)`.
    Touch {
        /// First guest physical address (page aligned).
        gpa: u64,
        /// Bytes (a multiple of the page size).
        len: u64,
        /// Fault pages in for writing.
        write: bool,
    },
}

impl GuestLoop {
    /// The word [`GuestLoop::Fill`] stores at guest physical `addr`.
    pub const fn pattern(addr: u64, seed: u64) -> u64 {
        addr ^ seed
    }

    /// `(gpa, len)` of the range.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            GuestLoop::Fill { gpa, len, .. }
            | GuestLoop::Verify { gpa, len, .. }
            | GuestLoop::Touch { gpa, len, .. } => (gpa, len),
        }
    }

    /// Bytes between two accesses of the loop: 8, or a page for `Touch`.
    pub fn step(&self) -> u64 {
        match self {
            GuestLoop::Touch { .. } => crate::uapi::PAGE_SIZE,
            _ => 8,
        }
    }

    /// The same loop over `[gpa + done, end)`: what is left after an exit.
    pub fn rest(&self, done: u64) -> GuestLoop {
        let mut op = *self;
        match &mut op {
            GuestLoop::Fill { gpa, len, .. }
            | GuestLoop::Verify { gpa, len, .. }
            | GuestLoop::Touch { gpa, len, .. } => {
                let done = done.min(*len);
                *gpa += done;
                *len -= done;
            }
        }
        op
    }

    /// The loop's access at `at` as single [`Vcpu::run`] operations: the
    /// exit, and 1 when a verify finds a word that differs from the
    /// pattern.
    pub(crate) fn run_step<V: Vcpu + ?Sized>(
        &self,
        vcpu: &mut V,
        at: u64,
    ) -> Result<(VcpuExit, u64)> {
        let read = GuestOp::Read { gpa: at, size: 8 };
        Ok(match *self {
            GuestLoop::Fill { seed, .. } => (
                vcpu.run(GuestOp::Write {
                    gpa: at,
                    size: 8,
                    value: GuestLoop::pattern(at, seed),
                })?,
                0,
            ),
            GuestLoop::Verify { seed, .. } => match vcpu.run(read)? {
                VcpuExit::Done(v) => (
                    VcpuExit::Done(v),
                    u64::from(v != GuestLoop::pattern(at, seed)),
                ),
                exit => (exit, 0),
            },
            GuestLoop::Touch { write: false, .. } => (vcpu.run(read)?, 0),
            GuestLoop::Touch { write: true, .. } => match vcpu.run(read)? {
                VcpuExit::Done(v) => (
                    vcpu.run(GuestOp::Write {
                        gpa: at,
                        size: 8,
                        value: v,
                    })?,
                    0,
                ),
                exit => (exit, 0),
            },
        })
    }

    /// Refuses a range the loop cannot walk: unaligned to its step, or
    /// wrapping (EINVAL).
    pub fn check(&self) -> Result<()> {
        let (gpa, len) = self.range();
        let step = self.step();
        if gpa % step != 0 || len % step != 0 {
            return Err(crate::error::Error::new(
                crate::error::Errno::EINVAL,
                "gmem-loop",
                format!(
                    "guest loop over gpa {gpa:#x} len {len:#x}: both must be multiples of {step}"
                ),
            ));
        }
        if gpa.checked_add(len).is_none() {
            return Err(crate::error::Error::new(
                crate::error::Errno::EINVAL,
                "gmem-loop",
                format!("guest loop over gpa {gpa:#x} len {len:#x} wraps the address space"),
            ));
        }
        Ok(())
    }
}

/// How a [`Vcpu::run_loop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopExit {
    /// Bytes of the range completed before `exit`: the whole length when
    /// the loop finished.
    pub done: u64,
    /// `Done` when the loop finished (with its result), else the exit that
    /// stopped it at `gpa + done`.
    pub exit: VcpuExit,
}

/// What the guest does in one [`Vcpu::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestOp {
    /// Load `size` (1, 2, 4 or 8) bytes at guest physical address `gpa`.
    Read {
        /// Guest physical address.
        gpa: u64,
        /// Access width in bytes.
        size: u8,
    },
    /// Store the low `size` bytes of `value` at `gpa`.
    Write {
        /// Guest physical address.
        gpa: u64,
        /// Access width in bytes.
        size: u8,
        /// The value stored.
        value: u64,
    },
    /// `KVM_HC_MAP_GPA_RANGE`: the guest asks to convert `npages` pages at
    /// `gpa`; `attributes` holds `KVM_MAP_GPA_RANGE_ENCRYPTED` for private.
    MapGpaRange {
        /// First guest physical address.
        gpa: u64,
        /// Number of 4 KiB pages.
        npages: u64,
        /// The hypercall's attribute word.
        attributes: u64,
    },
}

/// How one [`Vcpu::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest completed the operation: the value loaded, or for a
    /// hypercall the value the guest got back (0, or `KVM_ENOSYS`).
    Done(u64),
    /// `KVM_EXIT_MEMORY_FAULT` (KVM_RUN failed with EFAULT) (FAULT-7).
    MemoryFault {
        /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` iff the access was private.
        flags: u64,
        /// Page-aligned guest physical address.
        gpa: u64,
        /// Bytes: one page.
        size: u64,
    },
    /// `KVM_EXIT_MMIO`: no memslot at the address (FAULT-2).
    Mmio {
        /// Guest physical address of the access.
        gpa: u64,
        /// Store (true) or load.
        is_write: bool,
        /// Access width.
        len: u8,
        /// The value stored (0 for a load).
        data: u64,
    },
    /// `KVM_EXIT_HYPERCALL` for `KVM_HC_MAP_GPA_RANGE` (FAULT-8).
    Hypercall {
        /// Hypercall number.
        nr: u64,
        /// First guest physical address.
        gpa: u64,
        /// Number of pages.
        npages: u64,
        /// Attribute word.
        attributes: u64,
    },
    /// The guest did not exit within the run's time bound (KVM backend).
    Timeout {
        /// Guest instruction pointer when the vCPU was kicked out.
        rip: u64,
    },
}
