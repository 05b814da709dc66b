//! gmem: KVM's guest_memfd system in Rust.
//!
//! - [`hypervisor`]: the contract (`Hypervisor`, `Vm`, `GuestMemfd`, `Vcpu`).
//! - [`uapi`]: the KVM ABI, kvm-bindings plus the constants it lacks.
//! - [`error`]: errors with the kernel's errno, the rule and the values.
//! - [`host`]: owned host mappings, unmapped on drop.
//! - [`soft`]: the software backend, the executable specification.
//! - [`kvm`]: the same contract on the running kernel through `/dev/kvm`.
//! - [`scenario`]: scenario files and the conformance runner.
//! - [`memory`]: the memory manager VMMs embed: RAM on guest_memfd, laid
//!   out, converted, discarded, measured, and vm-memory interop.
//! - [`release`]: the kernel releases whose guest_memfd behaviour differs.
//! - [`rules`]: the rule ids errors cite and tests name.
//! - [`mempolicy`]: NUMA memory policy of host mappings (`mbind`).
//! - [`madvise`]: advice on host mappings (`madvise`).
//! - [`fuzz`]: random scenarios run on both backends, differences minimized.
//! - [`bench`](mod@bench): performance figures, each against a baseline in the same run.
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
