//! The software backend: every rule of the spec in-process, with real
//! memory, safe for concurrent vCPUs. It needs no `/dev/kvm` and no
//! privileges, and it is the executable specification the KVM backend is
//! compared with.
//!
//! - [`vm`]: memslots, bindings, attributes, capabilities; the lock order.
//! - `memslot`: the memslots of one address space, by id and by gfn.
//! - [`guest_memfd`]: the file, its pages (a tmpfs memfd), fallocate, mmap,
//!   release.
//! - [`vcpu`]: the guest fault path.
//! - `tlb`: the per-vCPU translation cache, and why it is never used after
//!   an invalidation.
//! - [`invalidate`]: the one invalidation path and its observers.
//! - [`host`]: the host mappings a memslot's `userspace_addr` may name.
//! - [`profile`]: which kernel release the backend behaves as.
//! - `mempolicy`: NUMA policy of guest_memfd mappings, per mapping or per
//!   file as the release keeps it.

pub mod guest_memfd;
pub mod host;
pub mod invalidate;
mod mempolicy;
mod memslot;
pub mod profile;
mod tlb;
pub mod vcpu;
pub mod vm;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

pub use guest_memfd::SoftGuestMemfd;
pub use host::SoftHostMemory;
pub use invalidate::{InvalidateCause, Invalidation, InvalidationObserver};
pub use profile::Profile;
pub use vcpu::SoftVcpu;
pub use vm::SoftVm;

use crate::error::Result;
use crate::host::Mmap;
use crate::hypervisor::{HostMemory, Hypervisor, Vm};
use crate::refuse;

/// The software hypervisor: what `/dev/kvm` is to the KVM backend.
pub struct SoftHypervisor {
    host: Arc<host::HostRegistry>,
    fd: OwnedFd,
    profile: Profile,
}

impl SoftHypervisor {
    /// A new software hypervisor. Its only host resource is a placeholder
    /// fd, so that "the hypervisor's fd" exists as it does for `/dev/kvm`.
    pub fn new() -> Result<Self> {
        Self::with_profile(crate::Release::DEFAULT)
    }

    /// A software hypervisor that behaves as kernel `release` does
    /// (`docs/releases.md`).
    pub fn with_profile(release: crate::Release) -> Result<Self> {
        Ok(SoftHypervisor {
            host: Arc::default(),
            fd: guest_memfd::memfd("gmem-soft:kvm", libc::MFD_CLOEXEC)?,
            profile: Profile::new(release),
        })
    }

    /// The release profile it runs.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// `KVM_CREATE_VM`, returning the concrete VM (for observers and
    /// introspection).
    pub fn create_soft_vm(&self, vm_type: u64) -> Result<SoftVm> {
        SoftVm::create(&self.host, self.profile, vm_type)
    }

    /// Host memory, returning the concrete handle (with its raw pointer).
    pub fn create_host_memory(&self, size: u64) -> Result<SoftHostMemory> {
        if size == 0 {
            refuse!(EINVAL, "MMAP-2", "host memory of size 0");
        }
        let mmap = Mmap::host_memory(size)?;
        Ok(SoftHostMemory::new(
            &self.host,
            mmap,
            host::RegionKind::Anonymous,
            None,
        ))
    }
}

impl AsRawFd for SoftHypervisor {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Hypervisor for SoftHypervisor {
    fn name(&self) -> &'static str {
        "soft"
    }

    fn check_extension(&self, cap: u32) -> i64 {
        vm::check_extension(self.profile, None, cap)
    }

    fn release(&self) -> Option<crate::Release> {
        Some(self.profile.release())
    }

    fn create_vm(&self, vm_type: u64) -> Result<Box<dyn Vm>> {
        Ok(Box::new(self.create_soft_vm(vm_type)?))
    }

    fn host_memory(&self, size: u64) -> Result<Box<dyn HostMemory>> {
        Ok(Box::new(self.create_host_memory(size)?))
    }
}
