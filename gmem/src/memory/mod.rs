//! Guest memory for VMM authors: RAM on guest_memfd, laid out, converted,
//! discarded, measured and reached by devices, on either backend.
//!
//! ```
//! use gmem::memory::{BackingRequest, GuestAddress, GuestRange, Layout, MemoryManager, PageState};
//! let hv = gmem::Backend::Soft.open()?;
//! let layout = Layout::builder()
//!     .memory(8 << 20)
//!     .backing(BackingRequest::Best)
//!     .build()?;
//! let mm = MemoryManager::new(&*hv, layout)?;
//! println!("{}: {}", mm.backing().mode, mm.backing().reason);
//!
//! mm.write(GuestAddress(0x1000), b"boot")?;          // device access to shared memory
//! let range = GuestRange::new(GuestAddress(0x10_0000), 1 << 20);
//! mm.convert(range, PageState::Private)?;            // the shared copy is freed
//! mm.discard(range)?;                                // balloon: the memory goes back
//! assert_eq!(mm.held_in(range)?.total(), 0);         // measured by the kernel
//! # Ok::<(), gmem::memory::Error>(())
//! ```
//!
//! - [`addr`]: one type per address space ([`GuestAddress`], [`GmemOffset`],
//!   [`HostAddress`]) and [`GuestRange`].
//! - [`layout`]: [`Layout`] and its builder: RAM ranges around the 32-bit
//!   hole, memslots, which file and offset backs each.
//! - [`backing`]: the [`BackingMode`] chosen from the host's capabilities,
//!   with the reason.
//! - [`file`](mod@file): [`GmemFile`], a guest_memfd owned from birth, flags
//!   negotiated.
//! - [`manager`]: [`MemoryManager`]: conversions, discard, accounting,
//!   device access, vCPU exits that ask for conversions.
//! - [`region`]: vm-memory interop, [`GmemRegion`] in a
//!   `GuestRegionCollection`. vm-memory itself is re-exported as
//!   [`gmem::vm_memory`](crate::vm_memory): device code uses it without
//!   pinning a vm-memory version of its own.
//!
//! Every method takes the guest address first (`mm.write(gpa, buf)`,
//! `mm.store(gpa, value, order)`); vm-memory's own `Bytes` methods on
//! [`MemoryManager::guest_memory`] keep vm-memory's order.
//! - `account`: how memory held is measured (`cachestat`, `mincore`).
//!
//! Every error says what was wrong with which values, the rule that
//! refused it and the errno: `guest range [0xc0000000, 0xc0001000) is not
//! guest RAM (gmem-unbacked, EFAULT)`. The contract's own refusals keep
//! their spec rule (`CREATE-1`, `SLOT-7`, ...).

mod account;
pub mod addr;
pub mod backing;
pub mod file;
pub mod layout;
pub mod manager;
pub mod region;

pub use addr::{human_bytes, GmemOffset, GuestAddress, GuestRange, HostAddress};
pub use backing::{Backing, BackingMode, BackingRequest};
pub use file::{FileAccess, GmemFile};
pub use layout::{
    FilePolicy, Layout, LayoutBuilder, Memslot, RamRange, HIGH_RAM_START, LOW_RAM_END,
    MAX_SLOT_BYTES,
};
pub use manager::{Conversion, ExitCounts, Held, LoopRun, MemoryManager, PageState};
pub use region::{GmemRegion, GuestRegions};

use crate::error::{errno_name, Errno};
use crate::hypervisor::VcpuExit;

/// What the memory manager refuses, and why.
///
/// ```
/// use gmem::memory::{Error, GuestAddress, GuestRange};
/// let e = Error::Unbacked { range: GuestRange::new(GuestAddress(0xC000_0000), 0x1000) };
/// assert_eq!(e.to_string(), "guest range [0xc0000000, 0xc0001000) is not guest RAM (gmem-unbacked, EFAULT)");
/// assert_eq!(e.errno(), gmem::Errno::EFAULT);
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The contract (the kernel, or the software backend) refused a call:
    /// its errno, rule and values.
    #[error(transparent)]
    Hypervisor(#[from] crate::Error),
    /// The layout cannot be built as given (gmem-layout, EINVAL).
    #[error("{0} (gmem-layout, EINVAL)")]
    Layout(String),
    /// A range given to an operation is malformed (gmem-range, EINVAL).
    #[error("{what} {range}: {why} (gmem-range, EINVAL)")]
    Range {
        /// The operation.
        what: &'static str,
        /// The range as given.
        range: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A host access to memory that is private to the guest
    /// (gmem-private, EACCES).
    #[error("guest range {range} is private to the guest: the host may not touch it until it is converted to shared (gmem-private, EACCES)")]
    Private {
        /// The private part of the access.
        range: GuestRange,
    },
    /// An access or operation outside guest RAM (gmem-unbacked, EFAULT).
    #[error("guest range {range} is not guest RAM (gmem-unbacked, EFAULT)")]
    Unbacked {
        /// The part that is not RAM.
        range: GuestRange,
    },
    /// What the backing, or the host, cannot do (gmem-backing, EOPNOTSUPP).
    #[error("{what}: {why} (gmem-backing, EOPNOTSUPP)")]
    Unsupported {
        /// What was asked.
        what: String,
        /// Why it cannot be done, with the capability values.
        why: String,
    },
    /// A vCPU exit the manager cannot resolve (gmem-exit, EFAULT).
    #[error("vCPU exit {exit:?}: {why} (gmem-exit, EFAULT)")]
    Exit {
        /// The exit.
        exit: VcpuExit,
        /// Why it cannot be handled.
        why: String,
    },
}

impl Error {
    pub(crate) fn layout(message: impl Into<String>) -> Error {
        Error::Layout(message.into())
    }

    /// The errno a kernel would give.
    ///
    /// ```
    /// let e = gmem::memory::Error::Layout("no RAM".into());
    /// assert_eq!(e.errno(), gmem::Errno::EINVAL);
    /// ```
    pub fn errno(&self) -> Errno {
        match self {
            Error::Hypervisor(e) => e.errno,
            Error::Layout(_) | Error::Range { .. } => Errno::EINVAL,
            Error::Private { .. } => Errno::EACCES,
            Error::Unbacked { .. } | Error::Exit { .. } => Errno::EFAULT,
            Error::Unsupported { .. } => Errno::EOPNOTSUPP,
        }
    }

    /// The rule that refused it.
    ///
    /// ```
    /// let e = gmem::memory::Error::Layout("no RAM".into());
    /// assert_eq!(e.rule(), "gmem-layout");
    /// ```
    pub fn rule(&self) -> &'static str {
        match self {
            Error::Hypervisor(e) => e.rule,
            Error::Layout(_) => "gmem-layout",
            Error::Range { .. } => "gmem-range",
            Error::Private { .. } => "gmem-private",
            Error::Unbacked { .. } => "gmem-unbacked",
            Error::Unsupported { .. } => "gmem-backing",
            Error::Exit { .. } => "gmem-exit",
        }
    }

    /// The errno's name: `EINVAL`.
    ///
    /// ```
    /// let e = gmem::memory::Error::Layout("no RAM".into());
    /// assert_eq!(e.errno_name(), "EINVAL");
    /// ```
    pub fn errno_name(&self) -> String {
        errno_name(self.errno())
    }
}
