//! The software backend.

use std::os::fd::{AsRawFd, RawFd};

use crate::error::{Errno, Error, Result};
use crate::hypervisor::{HostMemory, Hypervisor, Vm};

/// The software hypervisor.
#[derive(Debug)]
pub struct SoftHypervisor {
    _private: (),
}

impl SoftHypervisor {
    /// A new software hypervisor.
    pub fn new() -> Result<Self> {
        Ok(SoftHypervisor { _private: () })
    }
}

impl AsRawFd for SoftHypervisor {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

impl Hypervisor for SoftHypervisor {
    fn name(&self) -> &'static str {
        "soft"
    }
    fn check_extension(&self, _cap: u32) -> i64 {
        0
    }
    fn create_vm(&self, _vm_type: u64) -> Result<Box<dyn Vm>> {
        Err(Error::new(Errno::ENOSYS, "kernel", "not yet"))
    }
    fn host_memory(&self, _size: u64) -> Result<Box<dyn HostMemory>> {
        Err(Error::new(Errno::ENOSYS, "kernel", "not yet"))
    }
}
