//! gmem: KVM's guest_memfd system in Rust.
//!
//! # For VMM authors: start with [`memory`]
//!
//! [`memory::MemoryManager`] gives a VM its RAM on guest_memfd: laid out
//! around the 32-bit hole, on the backing the host offers, converted
//! between private and shared without holding memory twice, discarded,
//! measured by the kernel, and reached by devices through vm-memory.
//!
//! ```
//! use gmem::memory::{GuestAddress, Layout, MemoryManager};
//! let hv = gmem::Backend::Soft.open()?; // or Backend::Kvm: /dev/kvm
//! let mm = MemoryManager::new(&*hv, Layout::builder().memory(4 << 20).build()?)?;
//! mm.write(GuestAddress(0x1000), b"boot")?;
//! println!("{}: {}", mm.backing().mode, mm.held()?);
//! # Ok::<(), gmem::memory::Error>(())
//! ```
//!
//! vm-memory is re-exported as [`gmem::vm_memory`](vm_memory), the version
//! the manager's regions implement, so device code needs no dependency of
//! its own: `use gmem::vm_memory::Bytes;`.
//!
//! Beneath the manager, for those who need the kernel's own calls:
//!
//! - [`hypervisor`]: the contract (`Hypervisor`, `Vm`, `GuestMemfd`, `Vcpu`),
//!   after the uAPI call by call, with its two backends: [`kvm`], the
//!   running kernel through `/dev/kvm`, and [`soft`], the software backend,
//!   the executable specification.
//! - [`error`]: errors with the kernel's errno, the rule and the values.
//! - [`uapi`]: the KVM ABI, kvm-bindings plus the constants it lacks.
//! - [`host`]: owned host mappings, unmapped on drop.
//! - [`mempolicy`]: NUMA memory policy of host mappings (`mbind`).
//! - [`madvise`]: advice on host mappings (`madvise`).
//! - [`release`]: the kernel releases whose guest_memfd behaviour differs.
//! - [`rules`]: the rule ids errors cite and tests name.
//!
//! # Tooling behind the `gmem` command
//!
//! Public so the command line and the tests can use them, but not API a VMM
//! needs:
//!
//! - [`scenario`]: scenario files and the conformance runner (`gmem check`).
//! - [`fuzz`]: random scenarios run on both backends, differences minimized
//!   (`gmem fuzz`).
//! - [`bench`](mod@bench): performance figures, each against a baseline in
//!   the same run (`gmem bench`).
//!
//! The rules cited in errors and tests (`SLOT-7`, `BIND-4`, ...) are those of
//! the project's specification, `docs/spec.md`, which defines each id with
//! the kernel source it comes from.

#![deny(missing_docs)]

pub mod bench;
pub mod error;
pub mod fuzz;
pub mod host;
pub mod hypervisor;
pub mod kvm;
pub mod madvise;
pub mod memory;
pub mod mempolicy;
pub mod release;
pub mod rules;
pub mod scenario;
pub mod soft;
pub mod uapi;

pub use error::{Errno, Error, Result};
pub use hypervisor::{
    GuestLoop, GuestMemfd, GuestOp, HostFault, HostMemory, Hypervisor, LoopExit, MapKind, Pin,
    Stat, Vcpu, VcpuExit, Vm,
};
pub use madvise::Advice;
pub use mempolicy::{MbindFlags, MemPolicy, ModeFlags, MpolMode, NodeMask};
pub use release::Release;
/// vm-memory, the version [`memory::GmemRegion`] implements: device code
/// written against `gmem::vm_memory::{Bytes, GuestMemory, ...}` works on
/// [`memory::MemoryManager::guest_memory`] without pinning vm-memory itself.
///
/// ```
/// use gmem::vm_memory::{Bytes, GuestAddress};
/// # let hv = gmem::Backend::Soft.open().unwrap();
/// # let layout = gmem::memory::Layout::builder().memory(1 << 20).build().unwrap();
/// # let mm = gmem::memory::MemoryManager::new(&*hv, layout).unwrap();
/// mm.guest_memory().write_obj(0xabcd_u16, GuestAddress(0x10)).unwrap();
/// ```
pub use vm_memory;

/// Which implementation of the contract to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The in-process software implementation.
    Soft,
    /// The running kernel through `/dev/kvm`.
    Kvm,
}

impl Backend {
    /// Opens the backend: `/dev/kvm` for [`Backend::Kvm`].
    pub fn open(self) -> Result<Box<dyn Hypervisor>> {
        match self {
            Backend::Soft => Ok(Box::new(soft::SoftHypervisor::new()?)),
            Backend::Kvm => Ok(Box::new(kvm::KvmHypervisor::open()?)),
        }
    }

    /// `soft` or `kvm`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Soft => "soft",
            Backend::Kvm => "kvm",
        }
    }
}
