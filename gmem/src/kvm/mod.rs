//! The KVM backend: the contract on the running kernel through `/dev/kvm`.

use std::os::fd::{AsRawFd, RawFd};

use crate::error::{Errno, Error, Result};
use crate::hypervisor::{HostMemory, Hypervisor, Vm};

/// `/dev/kvm`.
#[derive(Debug)]
pub struct KvmHypervisor {
    _private: (),
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`.
    pub fn open() -> Result<Self> {
        Err(Error::new(
            Errno::ENODEV,
            "kernel",
            "the KVM backend is not available yet",
        ))
    }
}

impl AsRawFd for KvmHypervisor {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }
    fn check_extension(&self, _cap: u32) -> i64 {
        0
    }
    fn create_vm(&self, _vm_type: u64) -> Result<Box<dyn Vm>> {
        Err(Error::new(
            Errno::ENODEV,
            "kernel",
            "the KVM backend is not available yet",
        ))
    }
    fn host_memory(&self, _size: u64) -> Result<Box<dyn HostMemory>> {
        Err(Error::new(
            Errno::ENODEV,
            "kernel",
            "the KVM backend is not available yet",
        ))
    }
}
