//! VM creation to the first guest access, with 1 GiB of guest_memfd bound
//! (through the file's own host mapping, which both backends serve).

use std::time::{Duration, Instant};

use super::{bind_shared_file, bytes, median, Row, Scale, Target, Unit};
use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestOp, Hypervisor, VcpuExit};
use crate::uapi::KVM_X86_DEFAULT_VM;
use crate::Backend;

/// Where the memory is bound: 4 GiB, clear of the KVM backend's setup region.
const GPA: u64 = 1 << 32;

/// One VM from creation to its first guest access; the time it took.
pub fn once(hv: &dyn Hypervisor, size: u64) -> Result<Duration> {
    let t = Instant::now();
    let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64)?;
    let (_file, _map) = bind_shared_file(vm.as_ref(), GPA, size)?;
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
