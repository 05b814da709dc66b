//! fallocate of a whole file, allocate then punch, against the same calls
//! on a raw memfd of the same size.
//!
//! Ours: a guest_memfd of the backend, bound to a memslot with a vCPU (so
//! that punch hole invalidates as in use). The ratio is raw time / our
//! time: 1.0 is as fast as the raw memfd.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use super::{bytes, median, timed, Row, Scale, Target, Unit};
use crate::error::{Error, Result};
use crate::hypervisor::Vcpu;
use crate::uapi::{
    guest_memfd_region, kvm_create_guest_memfd, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    KVM_X86_DEFAULT_VM,
};
use crate::Backend;

const PUNCH: i32 = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
/// Where the file is bound: 4 GiB, clear of the KVM backend's setup region.
const GPA: u64 = 1 << 32;

fn raw_memfd(size: u64) -> Result<OwnedFd> {
    // SAFETY: memfd_create reads the NUL-terminated name; the fd returned is
    // owned right away.
    let fd = unsafe { libc::memfd_create(c"gmem-bench:raw".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::last_os_error("memfd_create"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ftruncate on the memfd just created.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) } != 0 {
        return Err(Error::last_os_error("ftruncate of the raw memfd"));
    }
    Ok(fd)
}

fn raw_fallocate(fd: &OwnedFd, mode: i32, len: u64) -> Result<()> {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    if unsafe { libc::fallocate(fd.as_raw_fd(), mode, 0, len as i64) } != 0 {
        return Err(Error::last_os_error("fallocate on the raw memfd"));
    }
    Ok(())
}

/// A guest_memfd of a backend, bound to a memslot with a vCPU, and a raw
/// memfd of the same size.
pub struct Fallocate {
    size: u64,
    raw: OwnedFd,
    _vcpu: Box<dyn Vcpu>,
    file: Box<dyn crate::GuestMemfd>,
    _vm: Box<dyn crate::Vm>,
    _hv: Box<dyn crate::Hypervisor>,
}

impl Fallocate {
    /// Sets up `size` bytes of each (nothing allocated yet).
    pub fn new(backend: Backend, size: u64) -> Result<Fallocate> {
        let hv = backend.open()?;
        let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64)?;
        let file = vm.create_guest_memfd(kvm_create_guest_memfd {
            size,
            ..Default::default()
        })?;
        vm.set_user_memory_region2(guest_memfd_region(0, GPA, size, file.as_raw_fd(), 0))?;
        Ok(Fallocate {
            size,
            raw: raw_memfd(size)?,
            _vcpu: vm.create_vcpu(0)?,
            file,
            _vm: vm,
            _hv: hv,
        })
    }

    /// Allocates the whole file then punches it all: the two times, on
    /// ours or on the raw memfd.
    pub fn round(&self, ours: bool) -> Result<[Duration; 2]> {
        let size = self.size;
        Ok(if ours {
            [
                timed(|| self.file.fallocate(FALLOC_FL_KEEP_SIZE, 0, size as i64))?,
                timed(|| self.file.fallocate(PUNCH, 0, size as i64))?,
            ]
        } else {
            [
                timed(|| raw_fallocate(&self.raw, FALLOC_FL_KEEP_SIZE, size))?,
                timed(|| raw_fallocate(&self.raw, PUNCH, size))?,
            ]
        })
    }
}

/// The allocate and punch rows of `backend`.
pub fn run(backend: Backend, scale: Scale) -> Result<Vec<Row>> {
    let size = scale.big();
    let f = Fallocate::new(backend, size)?;
    let (mut ours, mut base) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut ratio = [Vec::new(), Vec::new()];
    // A warm-up round of each, not counted.
    f.round(true)?;
    f.round(false)?;
    for round in 0..scale.rounds() {
        let (o, b) = if round % 2 == 0 {
            let o = f.round(true)?;
            (o, f.round(false)?)
        } else {
            let b = f.round(false)?;
            (f.round(true)?, b)
        };
        for i in 0..2 {
            ours[i].push(o[i].as_secs_f64());
            base[i].push(b[i].as_secs_f64());
            ratio[i].push(b[i].as_secs_f64() / o[i].as_secs_f64());
        }
    }
    drop(f);
    let name = backend.name();
    Ok(["allocate", "punch"]
        .iter()
        .enumerate()
        .map(|(i, what)| {
            let mut row = Row::new(
                &format!("{name}.fallocate.{what}"),
                &format!("fallocate {what} {} ({name})", bytes(size)),
                median(&mut ours[i]),
                Some((median(&mut base[i]), "the same on a raw memfd")),
                Some(median(&mut ratio[i])),
                Unit::Seconds,
                Target::AtLeast(0.95),
            );
            row.note = Some("ratio = raw time / our time".into());
            row
        })
        .collect())
}
