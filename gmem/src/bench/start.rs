//! VM creation to the first guest access, with 1 GiB of guest_memfd bound
//! (through the file's own host mapping, which both backends serve).

use std::time::{Duration, Instant};

use super::{bytes, median, Row, Scale, Target, Unit};
use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestOp, Hypervisor, MapKind, VcpuExit};
use crate::uapi::{
    guest_memfd_region, kvm_create_guest_memfd, kvm_userspace_memory_region2,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_X86_DEFAULT_VM,
};
use crate::Backend;

/// Where the memory is bound: 4 GiB, clear of the KVM backend's setup region.
const GPA: u64 = 1 << 32;

/// One VM from creation to its first guest access; the time it took.
pub fn once(hv: &dyn Hypervisor, size: u64) -> Result<Duration> {
    let t = Instant::now();
    let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64)?;
    let file = vm.create_guest_memfd(kvm_create_guest_memfd {
        size,
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        ..Default::default()
    })?;
    let map = file.mmap(0, size, MapKind::Shared)?;
    vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        userspace_addr: map.addr(),
        ..guest_memfd_region(0, GPA, size, file.as_raw_fd(), 0)
    })?;
    let mut cpu = vm.create_vcpu(0)?;
    let exit = cpu.run(GuestOp::Read { gpa: GPA, size: 8 })?;
    let took = t.elapsed();
    if exit != VcpuExit::Done(0) {
        return Err(Error::new(
            Errno::EIO,
            "bench",
            format!("first guest access ended with {exit:?}"),
        ));
    }
    Ok(took)
}

/// A row per backend.
pub fn run(scale: Scale) -> Vec<Row> {
    let size = 1 << 30;
    [Backend::Soft, Backend::Kvm]
        .into_iter()
        .map(|backend| {
            let id = format!("{}.start", backend.name());
            let figure = format!(
                "VM creation to first access, {} bound ({})",
                bytes(size),
                backend.name()
            );
            let target = Target::Under(0.010);
            let measured = backend.open().and_then(|hv| {
                let mut v = (0..scale.rounds())
                    .map(|_| once(hv.as_ref(), size).map(|d| d.as_secs_f64()))
                    .collect::<Result<Vec<_>>>()?;
                Ok(median(&mut v))
            });
            match measured {
                Ok(t) => Row::new(&id, &figure, t, None, None, Unit::Seconds, target),
                Err(e) => Row::skipped(&id, &figure, target, e.to_string()),
            }
        })
        .collect()
}
