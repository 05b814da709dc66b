//! A parsed scenario: requirements, then one [`Line`] per operation, each
//! with the [`Outcome`] it must have.

use std::fmt;

use serde::Serialize;

use crate::error::{errno_name, Errno};
use crate::madvise::Advice;
use crate::mempolicy::{MbindFlags, MemPolicy};
use crate::uapi::{KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MEMORY_EXIT_FLAG_PRIVATE};
use crate::Release;

/// One `.gmem` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The path it was read from, as given.
    pub path: String,
    /// What a backend must support for the scenario to run (`require` lines).
    pub requires: Vec<Requirement>,
    /// The operations, in order.
    pub lines: Vec<Line>,
}

/// One capability named on a `require` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Line number (1-based).
    pub line: usize,
    /// What is required.
    pub kind: RequireKind,
}

/// What a `require` line asks of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequireKind {
    /// `vm_type:default|sw_protected`: bit `n` of `KVM_CAP_VM_TYPES`.
    VmType(u64),
    /// `memory_attributes`: `KVM_CAP_MEMORY_ATTRIBUTES` is not 0.
    MemoryAttributes,
    /// `guest_memfd_flag:mmap|init_shared`: the flag is in `KVM_CAP_GUEST_MEMFD_FLAGS`.
    GuestMemfdFlag(u64),
    /// `exit_hypercall`: `KVM_CAP_EXIT_HYPERCALL` has `KVM_HC_MAP_GPA_RANGE`.
    ExitHypercall,
    /// `address_spaces:N`: `KVM_CAP_MULTI_ADDRESS_SPACE` (0 means 1) is at least N.
    AddressSpaces(u64),
    /// Any capability by name (`pre_fault_memory`): not 0.
    Cap(u32),
}

impl fmt::Display for RequireKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequireKind::VmType(t) => write!(f, "vm_type:{}", crate::uapi::vm_type_name(*t)),
            RequireKind::MemoryAttributes => f.write_str("memory_attributes"),
            RequireKind::GuestMemfdFlag(1) => f.write_str("guest_memfd_flag:mmap"),
            RequireKind::GuestMemfdFlag(2) => f.write_str("guest_memfd_flag:init_shared"),
            RequireKind::GuestMemfdFlag(n) => write!(f, "guest_memfd_flag:{n:#x}"),
            RequireKind::ExitHypercall => f.write_str("exit_hypercall"),
            RequireKind::AddressSpaces(n) => write!(f, "address_spaces:{n}"),
            RequireKind::Cap(c) => match crate::uapi::CAPS.iter().find(|(_, n)| n == c) {
                Some((name, _)) => f.write_str(name),
                None => write!(f, "capability {c}"),
            },
        }
    }
}

/// One operation line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Line number (1-based).
    pub line: usize,
    /// The line as written, without its comment.
    pub text: String,
    /// `NAME = ...`: the handle the operation's result is bound to.
    pub bind: Option<String>,
    /// What to do.
    pub op: Op,
    /// What must happen (`ok` when the line gives no outcome): on the
    /// oldest release, and on every release when `since` is empty.
    pub expect: Outcome,
    /// `=> OLD | 7.2: NEW`: the outcome from each release on that differs
    /// from the one before, in release order.
    pub since: Vec<(Release, Outcome)>,
}

impl Line {
    /// The outcome this line expects on `release`.
    pub fn expect_on(&self, release: Release) -> Outcome {
        self.since
            .iter()
            .rev()
            .find(|(r, _)| *r <= release)
            .map_or(self.expect, |(_, o)| *o)
    }

    /// Does `actual` meet the line's expectation? On a backend that follows
    /// a known release, that release's outcome; on a running kernel, whose
    /// release is measured rather than known, any release's (a check then
    /// holds all such lines to one release: `report::hold_to_one_release`).
    pub fn accepts(&self, release: Option<Release>, actual: &Outcome) -> bool {
        match release {
            Some(r) => self.expect_on(r).accepts(actual),
            None => !self.releases_matching(actual).is_empty(),
        }
    }

    /// The releases whose outcome `actual` meets.
    pub fn releases_matching(&self, actual: &Outcome) -> Vec<Release> {
        Release::ALL
            .into_iter()
            .filter(|r| self.expect_on(*r).accepts(actual))
            .collect()
    }
}

/// An operation and its arguments, numbers already parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `create_vm [type=...]`.
    CreateVm {
        /// Machine type.
        vm_type: u64,
    },
    /// `create_guest_memfd VM size=N [flags=...] [reserved=N]`.
    CreateGuestMemfd {
        /// The VM handle.
        vm: String,
        /// File size.
        size: u64,
        /// Creation flags.
        flags: u64,
        /// Written to every `reserved[]` word (extension; CREATE-3).
        reserved: u64,
    },
    /// `host_memory size=N`.
    HostMemory {
        /// Bytes.
        size: u64,
    },
    /// `mmap G [offset=N] [size=N] [private]`.
    Mmap {
        /// The guest_memfd handle.
        gmem: String,
        /// File offset.
        offset: i64,
        /// Length; the file size when absent.
        size: Option<u64>,
        /// `MAP_PRIVATE` instead of `MAP_SHARED`.
        private: bool,
    },
    /// `set_memory_region ...` and `delete_memory_region ...`.
    SetMemoryRegion(Region),
    /// `set_memory_attributes VM gpa=N size=N attributes=... [flags=N]`.
    SetMemoryAttributes {
        /// The VM handle.
        vm: String,
        /// First guest physical address.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// Attribute word.
        attributes: u64,
        /// Flags word (must be 0).
        flags: u64,
    },
    /// `fallocate G mode=... offset=N len=N`.
    Fallocate {
        /// The guest_memfd handle.
        gmem: String,
        /// `fallocate` mode bits.
        mode: i32,
        /// Offset.
        offset: i64,
        /// Length.
        len: i64,
    },
    /// `host_write M offset=N byte=N [len=N]`.
    HostWrite {
        /// Host memory or mapping handle.
        mem: String,
        /// Offset into it.
        offset: u64,
        /// The byte written.
        byte: u8,
        /// How many bytes (default 1).
        len: u64,
    },
    /// `host_read M offset=N`.
    HostRead {
        /// Host memory or mapping handle.
        mem: String,
        /// Offset into it.
        offset: u64,
    },
    /// `guest_write VM gpa=N byte=N`.
    GuestWrite {
        /// The VM handle.
        vm: String,
        /// Guest physical address.
        gpa: u64,
        /// The byte stored.
        byte: u8,
    },
    /// `guest_read VM gpa=N`.
    GuestRead {
        /// The VM handle.
        vm: String,
        /// Guest physical address.
        gpa: u64,
    },
    /// `guest_map_gpa_range VM gpa=N pages=N private|shared`.
    GuestMapGpaRange {
        /// The VM handle.
        vm: String,
        /// First guest physical address.
        gpa: u64,
        /// Number of pages.
        pages: u64,
        /// Convert to private (else shared).
        private: bool,
    },
    /// `file_read G`, `file_write G`, ... on a guest_memfd.
    File {
        /// The guest_memfd handle.
        gmem: String,
        /// Which call.
        op: FileOp,
    },
    /// `stat G`.
    Stat {
        /// The guest_memfd handle.
        gmem: String,
    },
    /// `same_inode G1 G2 => 0|1` (extension; CREATE-4).
    SameInode {
        /// First guest_memfd handle.
        a: String,
        /// Second guest_memfd handle.
        b: String,
    },
    /// `check_extension [VM] CAP`.
    CheckExtension {
        /// On this VM's fd; on the system fd when absent.
        vm: Option<String>,
        /// Capability number.
        cap: u32,
    },
    /// `pre_fault VM gpa=N size=N [flags=N]`: `KVM_PRE_FAULT_MEMORY`; the
    /// outcome is the size left (PREFAULT-*).
    PreFault {
        /// The VM handle (its vCPU 0 makes the call).
        vm: String,
        /// First guest physical address.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// Flags word (must be 0).
        flags: u64,
    },
    /// `set_memory_attributes2 G offset=N size=N attributes=private|shared
    /// [flags=N]`: `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd (CONV-*).
    SetMemoryAttributes2 {
        /// The guest_memfd handle.
        gmem: String,
        /// File offset.
        offset: u64,
        /// Bytes.
        size: u64,
        /// Attribute word.
        attributes: u64,
        /// Flags word (must be 0).
        flags: u64,
    },
    /// `P = pin M offset=N len=N`: a long-term reference on the pages,
    /// dropped by `close P` (CONV-5).
    Pin {
        /// Host memory or mapping handle.
        mem: String,
        /// Offset into it.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `mbind M [offset=N] [size=N] policy=MODE[|FLAG].. [nodes=LIST]
    /// [flags=strict|move|move_all]`; the size defaults to the rest of the
    /// mapping (NUMA-*).
    Mbind {
        /// Host memory or mapping handle.
        mem: String,
        /// Offset into it.
        offset: u64,
        /// Bytes.
        size: Option<u64>,
        /// The policy.
        policy: MemPolicy,
        /// `MPOL_MF_*`.
        flags: MbindFlags,
    },
    /// `get_mempolicy M [offset=N] => POLICY` (NUMA-*).
    GetMempolicy {
        /// Host memory or mapping handle.
        mem: String,
        /// Offset into it.
        offset: u64,
    },
    /// `madvise M [offset=N] [size=N] advice=ADVICE`; the size defaults to
    /// the rest of the mapping (MMAP-6..MMAP-9).
    Madvise {
        /// Host memory or mapping handle.
        mem: String,
        /// Offset into it.
        offset: u64,
        /// Bytes.
        size: Option<u64>,
        /// The advice.
        advice: Advice,
    },
    /// `close X`: drops the handle.
    Close {
        /// The handle.
        handle: String,
    },
}

/// Which plain file call a `file_*` operation makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// `read(2)` of one byte.
    Read,
    /// `write(2)` of one byte.
    Write,
    /// `pread(2)` of one byte at offset 0.
    Pread,
    /// `pwrite(2)` of one byte at offset 0 (extension).
    Pwrite,
    /// `lseek(2)` to 0, `SEEK_SET`.
    Lseek,
    /// `ftruncate(2)`.
    Ftruncate(i64),
    /// An ioctl with this request number (extension; FILE-1).
    Ioctl(u64),
}

/// The arguments of `KVM_SET_USER_MEMORY_REGION(2)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The VM handle.
    pub vm: String,
    /// Slot id (bits 0-15 of the slot word).
    pub slot: u32,
    /// Address-space id (bits 16-31).
    pub as_id: u32,
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes; 0 deletes.
    pub size: u64,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// `userspace_addr`: a handle's address or a raw number.
    pub userspace: Userspace,
    /// Added to `userspace`.
    pub userspace_offset: u64,
    /// The `guest_memfd` field.
    pub guest_memfd: FdRef,
    /// `guest_memfd_offset`.
    pub offset: u64,
    /// Use the 32-byte v1 ioctl (`ioctl=v1`, extension; SLOT-1).
    pub v1: bool,
}

/// What `userspace=` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Userspace {
    /// Host memory or a mapping: its address.
    Handle(String),
    /// A raw address.
    Addr(u64),
}

/// What `guest_memfd=` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdRef {
    /// A guest_memfd handle (its fd) or a VM handle (the VM fd).
    Handle(String),
    /// A number that is not an open fd.
    Closed,
    /// The hypervisor's (`/dev/kvm`) fd.
    Kvm,
    /// A plain memfd owned by the runner.
    Memfd,
    /// A raw number (extension: `guest_memfd=-1`).
    Raw(u32),
}

/// An outcome, as written after `=>` or as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Success (`ok`, or no outcome written). Expected, it also accepts a
    /// value or a stat: the operation must merely succeed.
    Ok,
    /// Failure with this errno.
    Errno {
        /// The errno, by number.
        #[serde(serialize_with = "ser_errno")]
        errno: Errno,
    },
    /// A number: the byte read, a capability's value, a hypercall's return.
    Value {
        /// The value.
        value: u64,
        /// Shown in hex (bytes) or decimal.
        #[serde(skip)]
        hex: bool,
    },
    /// The host access raised SIGBUS.
    Sigbus,
    /// `exit memory_fault gpa=N size=N flags=private|shared`.
    MemoryFault {
        /// Guest physical address.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// Exit flags (`KVM_MEMORY_EXIT_FLAG_PRIVATE`).
        flags: u64,
    },
    /// `exit mmio gpa=N [read|write]`.
    Mmio {
        /// Guest physical address.
        gpa: u64,
        /// `Some(true)` for a store; `None` (expected only) accepts either.
        write: Option<bool>,
    },
    /// `exit hypercall gpa=N pages=N attributes=private|shared`.
    Hypercall {
        /// First guest physical address.
        gpa: u64,
        /// Pages.
        pages: u64,
        /// Attribute word (`KVM_MAP_GPA_RANGE_ENCRYPTED` for private).
        attributes: u64,
    },
    /// `size=N blksize=N [blocks=N] [mode=N]`: a stat; absent fields match anything.
    Stat {
        /// `st_size`.
        size: Option<i64>,
        /// `st_blksize`.
        blksize: Option<i64>,
        /// `st_blocks` (extension).
        blocks: Option<i64>,
        /// `st_mode` (extension).
        mode: Option<u32>,
    },
    /// The guest never exited within the run's bound (extension: `timeout`).
    Timeout,
    /// What a hypercall returned to the guest without exiting:
    /// `-KVM_ENOSYS`, `-KVM_EINVAL`, `0` (as `kvm_para.h` names them).
    HypercallReturn {
        /// The value in the guest's rax.
        value: u64,
    },
    /// The runner did not perform the operation: it could have taken the
    /// scenario past its memory budget. Never the outcome of a kernel, and
    /// no expectation accepts it.
    OverBudget,
    /// `bind|static nodes=0-1`: a NUMA policy, as `get_mempolicy` reports it.
    Policy {
        /// The policy.
        #[serde(serialize_with = "ser_display")]
        policy: MemPolicy,
    },
}

/// The hypercall error codes of `include/uapi/linux/kvm_para.h`, negated
/// in a hypercall's return value.
const KVM_HC_ERRNOS: &[(&str, u64)] = &[
    ("KVM_ENOSYS", 1000),
    ("KVM_EFAULT", 14),
    ("KVM_EINVAL", 22),
    ("KVM_E2BIG", 7),
    ("KVM_EPERM", 1),
    ("KVM_EOPNOTSUPP", 95),
];

/// The value of `-KVM_ENOSYS` and the like, as a hypercall returns it.
pub fn hypercall_return_from_name(name: &str) -> Option<u64> {
    let bare = name.strip_prefix('-')?;
    KVM_HC_ERRNOS
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, v)| v.wrapping_neg())
}

fn hypercall_return_name(value: u64) -> String {
    match KVM_HC_ERRNOS
        .iter()
        .find(|(_, v)| v.wrapping_neg() == value)
    {
        Some((n, _)) => format!("-{n}"),
        None => (value as i64).to_string(),
    }
}

fn ser_display<S: serde::Serializer>(
    v: &impl fmt::Display,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_errno<S: serde::Serializer>(e: &Errno, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&errno_name(*e))
}

impl Outcome {
    /// Does an observed outcome satisfy this expected one?
    pub fn accepts(&self, actual: &Outcome) -> bool {
        use Outcome::*;
        match (self, actual) {
            (_, OverBudget) | (OverBudget, _) => false,
            (Ok, Ok | Value { .. } | Stat { .. } | HypercallReturn { .. } | Policy { .. }) => true,
            (
                Value { value: a, .. } | HypercallReturn { value: a },
                Value { value: b, .. } | HypercallReturn { value: b },
            ) => a == b,
            (Mmio { gpa: a, write: w }, Mmio { gpa: b, write: v }) => {
                a == b && (w.is_none() || w == v)
            }
            (
                Stat {
                    size,
                    blksize,
                    blocks,
                    mode,
                },
                Stat {
                    size: s2,
                    blksize: b2,
                    blocks: k2,
                    mode: m2,
                },
            ) => {
                fn m<T: PartialEq>(e: &Option<T>, a: &Option<T>) -> bool {
                    e.is_none() || e == a
                }
                m(size, s2) && m(blksize, b2) && m(blocks, k2) && m(mode, m2)
            }
            (a, b) => a == b,
        }
    }

    /// Is this a failure of the operation rather than a result of it?
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            Outcome::Ok
                | Outcome::Value { .. }
                | Outcome::Stat { .. }
                | Outcome::HypercallReturn { .. }
                | Outcome::Policy { .. }
        )
    }
}

fn priv_word(f: &mut fmt::Formatter<'_>, v: u64, private: u64) -> fmt::Result {
    match v {
        0 => f.write_str("shared"),
        v if v == private => f.write_str("private"),
        v => write!(f, "{v:#x}"),
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Errno { errno } => f.write_str(&errno_name(*errno)),
            Outcome::Value { value, hex: true } => write!(f, "{value:#04x}"),
            Outcome::Value { value, hex: false } => write!(f, "{value}"),
            Outcome::Sigbus => f.write_str("sigbus"),
            Outcome::MemoryFault { gpa, size, flags } => {
                write!(f, "exit memory_fault gpa={gpa:#x} size={size} flags=")?;
                priv_word(f, *flags, KVM_MEMORY_EXIT_FLAG_PRIVATE as u64)
            }
            Outcome::Mmio { gpa, write } => {
                write!(f, "exit mmio gpa={gpa:#x}")?;
                match write {
                    Some(true) => f.write_str(" write"),
                    Some(false) => f.write_str(" read"),
                    None => Ok(()),
                }
            }
            Outcome::Hypercall {
                gpa,
                pages,
                attributes,
            } => {
                write!(f, "exit hypercall gpa={gpa:#x} pages={pages} attributes=")?;
                priv_word(f, *attributes, KVM_MAP_GPA_RANGE_ENCRYPTED)
            }
            Outcome::Stat {
                size,
                blksize,
                blocks,
                mode,
            } => {
                let mut parts = Vec::new();
                if let Some(s) = size {
                    parts.push(format!("size={s}"));
                }
                if let Some(b) = blksize {
                    parts.push(format!("blksize={b}"));
                }
                if let Some(b) = blocks {
                    parts.push(format!("blocks={b}"));
                }
                if let Some(m) = mode {
                    parts.push(format!("mode={m:#o}"));
                }
                f.write_str(&parts.join(" "))
            }
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::HypercallReturn { value } => f.write_str(&hypercall_return_name(*value)),
            Outcome::OverBudget => f.write_str("over budget"),
            Outcome::Policy { policy } => write!(f, "{policy}"),
        }
    }
}
