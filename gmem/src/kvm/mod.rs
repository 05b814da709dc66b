//! The KVM backend: the contract on the running kernel through `/dev/kvm`.
//!
//! - [`KvmHypervisor`] (this file): `/dev/kvm`, capabilities, VM creation.
//! - [`vm`]: VMs and memslots, with the backend's reserved setup region.
//! - [`guest_memfd`]: guest_memfd files; every file operation is the real
//!   system call.
//! - [`memory`]: host memory and mappings this backend hands out, and the
//!   check that keeps memslots from exposing other process memory.
//! - [`vcpu`] and [`guest`]: a 64-bit vCPU running generated guest code:
//!   one `KVM_RUN` per guest access (ring 0), one guest loop per GiB of a
//!   range (ring 3), page tables built once and only ever extended.
//! - `watchdog`: the run bound, one thread for the process.
//! - `sigbus`: host accesses that the kernel answers with SIGBUS become
//!   typed errors.
//!
//! Every kernel refusal comes back as an [`Error`] with the kernel's errno,
//! rule `kernel`, and a message naming the ioctl and its values. The
//! backend's own refusals use rule `KVM-SETUP` (its reserved setup slot and
//! range, guest operations its guest code cannot perform) and `gmem-safety`
//! (memslot userspace ranges that would expose process memory, see
//! [`memory`]).
//!
//! What the backend adds to a VM: memslots [`guest::SETUP_SLOT`] (32700)
//! and [`guest::DOORBELL_SLOT`] (32701, read-only) covering guest physical
//! `[0xE000_0000, 0xE040_0000)`, bound when the VM is created (so a user
//! slot can never silently overlap them: overlaps are EEXIST, the slot ids
//! EINVAL), and `KVM_CAP_EXIT_HYPERCALL` enabled for `KVM_HC_MAP_GPA_RANGE`
//! where the kernel offers it.
//!
//! # How long a run may take
//!
//! - A guest operation ([`crate::hypervisor::Vcpu::run`]) ends as
//!   [`crate::hypervisor::VcpuExit::Timeout`] after [`vcpu::RUN_TIMEOUT`]
//!   (1 s).
//! - A hypercall that does not complete ends sooner: a vCPU found at the
//!   `vmcall`/`vmmcall` instruction [`vcpu::HYPERCALL_CHECK`] (3 ms) into the
//!   run, and still there after its thread has spent
//!   [`vcpu::HYPERCALL_RECHECK`] (2 ms) more CPU time in the run, is
//!   reported as `Timeout` with the rip of that instruction. A hypercall
//!   that KVM handles takes microseconds and one it forwards exits at once,
//!   so only a hypercall the kernel never finishes stays there (FAULT-8).
//! - A guest loop ([`crate::hypervisor::Vcpu::run_loop`]) runs as long as it
//!   advances: it ends as `Timeout` only when its address did not move for
//!   [`vcpu::LOOP_STALL`] (1 s), with `done` the bytes completed.
//!
//! # Where the running kernel departs from upstream
//!
//! The backend reports what the kernel does; it never corrects it. Where a
//! kernel departs from upstream, `scenarios/departures.toml` describes the
//! behaviour once, with a probe that shows it (`gmem caps` lists the probes'
//! results), and `gmem check`, the corpus and the contract suite report the
//! lines and tests it accounts for as departing (docs/conformance.md).
//! Kernel 6.18.44 (our machines, `kvm_pvm`) shows:
//!
//! - FAULT-3: a guest access through a slot bound to a MMAP | INIT_SHARED
//!   guest_memfd is served from the slot's `userspace_addr`, not from the
//!   file: pointing it at other memory shows that memory. A VMM gets the
//!   upstream behaviour by setting `userspace_addr` to the file's own host
//!   mapping.
//! - FAULT-3-unmapped: an access served from a `userspace_addr` the host
//!   cannot fault in (nothing mapped there, or a guest_memfd mapping whose
//!   page is not shared with the host or lies past the file's end) exits as
//!   MMIO; upstream fails `KVM_RUN` with EFAULT.
//! - FAULT-6: after the file is released under a live slot, a guest access
//!   is served from `userspace_addr` (or exits as MMIO), never as a memory
//!   fault.
//! - FAULT-8: the `KVM_HC_MAP_GPA_RANGE` hypercall never exits to the VMM;
//!   the vCPU stays at the `vmcall`/`vmmcall`, and the backend reports it as
//!   [`crate::hypervisor::VcpuExit::Timeout`] with that rip within a few
//!   milliseconds (see above).

pub mod guest;
pub mod guest_memfd;
pub mod memory;
mod sigbus;
pub mod vcpu;
pub mod vm;
mod watchdog;

use std::os::fd::{AsRawFd, RawFd};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{Errno, Error, Result};
use crate::hypervisor::{HostMemory, Hypervisor, Vm};
use crate::kvm::memory::AnonMemory;
use crate::kvm::vm::{describe_type, KvmVm};
use crate::uapi::KVM_CAP_VM_TYPES;

/// `/dev/kvm` (closed on drop), with what every VM's vCPUs need from it.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
    cpuid: CpuId,
    /// The guest's MAXPHYADDR (CPUID 0x8000_0008 as KVM supports it).
    phys_bits: u8,
    /// AMD-style CPU: the hypercall instruction is `vmmcall`, not `vmcall`.
    amd: bool,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`. Fails with the kernel's errno (ENOENT when there is
    /// no such device, EACCES without permission, ...).
    pub fn open() -> Result<Self> {
        Self::open_path(c"/dev/kvm")
    }

    /// Opens the KVM device at `path` (normally `/dev/kvm`).
    pub fn open_path(path: &std::ffi::CStr) -> Result<Self> {
        let kvm = Kvm::new_with_path(path).map_err(|e| {
            Error::new(
                Errno::from_raw(e.errno()),
                "kernel",
                format!("open {} failed: {e}", path.to_string_lossy()),
            )
        })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| {
                Error::new(
                    Errno::from_raw(e.errno()),
                    "kernel",
                    "KVM_GET_SUPPORTED_CPUID refused",
                )
            })?;
        let phys_bits = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map_or(36, |e| (e.eax & 0xff) as u8);
        Ok(KvmHypervisor {
            kvm,
            cpuid,
            phys_bits,
            amd: host_is_amd(),
        })
    }

    /// The guest's physical address width in bits (MAXPHYADDR).
    pub fn phys_bits(&self) -> u8 {
        self.phys_bits
    }
}

/// Is the host CPU AMD-style (AMD or Hygon)? Decides the hypercall
/// instruction of the guest code.
fn host_is_amd() -> bool {
    // CPUID leaf 0 exists on every x86-64 CPU.
    let r = core::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
}

impl AsRawFd for KvmHypervisor {
    fn as_raw_fd(&self) -> RawFd {
        self.kvm.as_raw_fd()
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn check_extension(&self, cap: u32) -> i64 {
        i64::from(self.kvm.check_extension_raw(cap.into()).max(0))
    }

    fn create_vm(&self, vm_type: u64) -> Result<Box<dyn Vm>> {
        let fd = self.kvm.create_vm_with_type(vm_type).map_err(|e| {
            let types = self.check_extension(KVM_CAP_VM_TYPES);
            let what = format!("KVM_CREATE_VM {} refused", describe_type(vm_type));
            let errno = Errno::from_raw(e.errno());
            match vm_type {
                0..64 if types & (1 << vm_type) == 0 => Error::new(
                    errno,
                    "CAP-2",
                    format!("{what}: not supported by this host (KVM_CAP_VM_TYPES is {types:#x})"),
                ),
                _ => Error::new(errno, "kernel", what),
            }
        })?;
        Ok(Box::new(KvmVm::new(
            fd,
            vm_type,
            self.cpuid.clone(),
            self.phys_bits,
            self.amd,
        )?))
    }

    fn host_memory(&self, size: u64) -> Result<Box<dyn HostMemory>> {
        Ok(Box::new(AnonMemory::new(size)?))
    }
}
