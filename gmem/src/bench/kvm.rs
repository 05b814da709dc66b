//! The KVM figures: one guest access on the KVM backend against the floor
//! (a raw `KVM_SET_REGS` + `KVM_RUN` of the same load, with kvm-ioctls and
//! nothing else), and guest first touch of 1 GiB on guest_memfd against
//! anonymous memory in one guest loop ([`Vcpu::run_loop`]) on each backend.
//! Where `/dev/kvm` cannot be opened the KVM rows say why.

use std::hint::black_box;
use std::time::Duration;

use iced_x86::code_asm::{al, qword_ptr, rax, rdi, CodeAssembler};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};

use super::{bind_shared_file, bytes, compare, median, time, Pair, Row, Scale, Target, Unit};
use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{GuestLoop, GuestOp, HostMemory, Hypervisor, Vcpu, VcpuExit};
use crate::kvm::guest::{long_mode_sregs, GDT_ENTRIES};
use crate::uapi::{user_region, KVM_X86_DEFAULT_VM};
use crate::Backend;

/// Where guest memory is bound: 4 GiB, clear of the backend's setup region.
const GPA: u64 = 1 << 32;

fn kernel(e: kvm_ioctls::Error, what: &str) -> Error {
    Error::new(
        Errno::from_raw(e.errno()),
        "kernel",
        format!("{what} refused"),
    )
}

/// The raw baseline: a VM with 4 MiB at gpa 0 identity-mapped by 2 MiB
/// pages, and a 64-bit vCPU whose code loads from `[rdi]` and exits: at
/// ring 0 with `out 0x4d, al`, at ring 3 (which may not do port I/O) with a
/// store to the unbacked page at 4 MiB (an MMIO exit). One access is
/// `KVM_SET_REGS` + `KVM_RUN`, with kvm-ioctls and nothing else.
pub struct RawKvm {
    vcpu: VcpuFd,
    _vm: VmFd,
    _mem: Mmap,
}

const RAW_SIZE: u64 = 4 << 20;
const RAW_PML4: u64 = 0x1000;
const RAW_CODE: u64 = 0x10000;
const RAW_DATA: u64 = 0x20000;
const RAW_PORT: u16 = 0x4d;
/// The first address past the raw VM's memory: a store there is MMIO.
const RAW_MMIO: u64 = RAW_SIZE;

impl RawKvm {
    /// Opens `/dev/kvm` and builds the VM; its vCPU runs at ring 3 when
    /// `user`, else at ring 0.
    pub fn new(user: bool) -> Result<RawKvm> {
        let kvm = Kvm::new().map_err(|e| kernel(e, "open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(|e| kernel(e, "KVM_CREATE_VM"))?;
        let mem = Mmap::anonymous(RAW_SIZE)?;
        let w = |at: u64, v: &[u8]| mem.write(at, v).expect("inside the 4 MiB");
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            w(8 * i as u64, &d.to_le_bytes());
        }
        // PML4 -> PDPT -> PD with three present, writable, user 2 MiB pages:
        // the memory and the MMIO page past it.
        w(RAW_PML4, &(0x2000u64 | 7).to_le_bytes());
        w(0x2000, &(0x3000u64 | 7).to_le_bytes());
        for (i, page) in [0, 0x20_0000, RAW_MMIO].into_iter().enumerate() {
            w(0x3000 + 8 * i as u64, &(page | 0x87).to_le_bytes());
        }
        w(RAW_CODE, &raw_code(user)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.len(),
            userspace_addr: mem.addr(),
        };
        // SAFETY: the slot points at our own anonymous mapping, which this
        // struct keeps until after the VM fd is closed (field order).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| kernel(e, "KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| kernel(e, "KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kernel(e, "KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| kernel(e, "KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(|e| kernel(e, "KVM_GET_SREGS"))?;
        vcpu.set_sregs(&long_mode_sregs(sregs, 0, RAW_PML4, user))
            .map_err(|e| kernel(e, "KVM_SET_SREGS"))?;
        Ok(RawKvm {
            vcpu,
            _vm: vm,
            _mem: mem,
        })
    }

    /// One guest load: `KVM_SET_REGS` and one `KVM_RUN`.
    pub fn access(&mut self) -> Result<()> {
        let regs = kvm_regs {
            rip: RAW_CODE,
            rdi: RAW_DATA,
            rsp: 0x30000,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| kernel(e, "KVM_SET_REGS"))?;
        match self.vcpu.run() {
            Ok(KvmExit::IoOut(RAW_PORT, _) | KvmExit::MmioWrite(RAW_MMIO, _)) => Ok(()),
            Ok(other) => Err(Error::new(
                Errno::EIO,
                "bench",
                format!("raw KVM guest exited with {other:?}"),
            )),
            Err(e) => Err(kernel(e, "KVM_RUN")),
        }
    }
}

/// `mov rax, [rdi]`, then the exit: `out 0x4d, al`, or at ring 3 a store
/// to [`RAW_MMIO`].
fn raw_code(user: bool) -> Result<Vec<u8>> {
    let asm = |e: iced_x86::IcedError| {
        Error::new(
            Errno::EINVAL,
            "bench",
            format!("assembling the raw guest: {e}"),
        )
    };
    let mut a = CodeAssembler::new(64).map_err(asm)?;
    a.mov(rax, qword_ptr(rdi)).map_err(asm)?;
    if user {
        a.mov(qword_ptr(RAW_MMIO), rax).map_err(asm)?;
    } else {
        a.out(RAW_PORT as u32, al).map_err(asm)?;
    }
    a.assemble(RAW_CODE).map_err(asm)
}

/// One guest load on the KVM backend against the raw floor.
pub struct OneAccess {
    cpu: Box<dyn Vcpu>,
    raw: RawKvm,
    _mem: Box<dyn HostMemory>,
    _vm: Box<dyn crate::Vm>,
    _hv: Box<dyn Hypervisor>,
}

impl OneAccess {
    /// A KVM backend VM with 2 MiB of host memory at 4 GiB and its vCPU,
    /// and the raw VM.
    pub fn new() -> Result<OneAccess> {
        let hv = Backend::Kvm.open()?;
        let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64)?;
        let mem = hv.host_memory(2 << 20)?;
        vm.set_user_memory_region2(user_region(0, GPA, mem.len(), mem.addr()))?;
        Ok(OneAccess {
            cpu: vm.create_vcpu(0)?,
            raw: RawKvm::new(false)?,
            _mem: mem,
            _vm: vm,
            _hv: hv,
        })
    }
}

impl Pair for OneAccess {
    fn ours(&mut self, iters: u64) -> Duration {
        time(|| {
            for _ in 0..iters {
                let exit = self.cpu.run(GuestOp::Read { gpa: GPA, size: 8 });
                assert!(
                    matches!(exit, Ok(VcpuExit::Done(_))),
                    "kvm guest access: {exit:?}"
                );
                black_box(exit.ok());
            }
        })
    }

    fn baseline(&mut self, iters: u64) -> Duration {
        time(|| {
            for _ in 0..iters {
                self.raw.access().expect("raw KVM access");
            }
        })
    }
}

/// The row for one KVM guest access.
pub fn access(scale: Scale) -> Vec<Row> {
    let id = "kvm.access";
    let figure = "kvm guest access, 8 bytes";
    let target = Target::AtMost(1.3);
    let measured = (|| -> Result<Row> {
        let mut pair = OneAccess::new()?;
        let c = compare(&mut pair, scale.iters(2000), scale.rounds());
        Ok(Row::new(
            id,
            figure,
            c.ours,
            Some((c.baseline, "raw KVM_SET_REGS + KVM_RUN")),
            Some(c.ratio),
            Unit::Seconds,
            target,
        ))
    })();
    vec![measured.unwrap_or_else(|e| Row::skipped(id, figure, target, e.to_string()))]
}

/// Guest first touch of `size` bytes in one [`Vcpu::run_loop`]: of a fresh
/// guest_memfd bound through its own mapping (`gmem`), or of fresh
/// anonymous host memory. The time of the loop alone.
pub fn touch_once(hv: &dyn Hypervisor, size: u64, gmem: bool) -> Result<Duration> {
    let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64)?;
    let (_file, _mem): (Option<Box<dyn crate::GuestMemfd>>, Box<dyn HostMemory>) = if gmem {
        let (file, map) = bind_shared_file(vm.as_ref(), GPA, size)?;
        (Some(file), map)
    } else {
        let mem = hv.host_memory(size)?;
        vm.set_user_memory_region2(user_region(0, GPA, size, mem.addr()))?;
        (None, mem)
    };
    let mut cpu = vm.create_vcpu(0)?;
    let mut exit = Ok(crate::LoopExit {
        done: 0,
        exit: VcpuExit::Done(0),
    });
    let took = time(|| {
        exit = cpu.run_loop(GuestLoop::Touch {
            gpa: GPA,
            len: size,
            write: true,
        })
    });
    match exit? {
        crate::LoopExit { done, .. } if done == size => Ok(took),
        other => Err(Error::new(
            Errno::EIO,
            "bench",
            format!("touch loop ended early: {other:?}"),
        )),
    }
}

/// How long one first-touch loop may take before the figure is measured
/// on less memory: a KVM `run_loop` that is still one run per access needs
/// about a minute for 1 GiB.
const TOUCH_BUDGET: f64 = 10.0;

/// The size to measure first touch on, `big` or less: what one loop can
/// touch within `TOUCH_BUDGET` (10 s), judged by a probe of `big / 64`; and the
/// time `big` would take.
pub fn touch_size(hv: &dyn Hypervisor, big: u64) -> Result<(u64, f64)> {
    let probe = big / 64;
    let projected = touch_once(hv, probe, true)?.as_secs_f64() * 64.0;
    Ok((
        if projected > TOUCH_BUDGET {
            probe * 4
        } else {
            big
        },
        projected,
    ))
}

/// First touch rows, one per backend.
pub fn first_touch(scale: Scale) -> Vec<Row> {
    [Backend::Soft, Backend::Kvm]
        .into_iter()
        .map(|backend| {
            let name = backend.name();
            let id = format!("{name}.first_touch");
            let mut figure = format!(
                "first touch of {} in one guest loop ({name})",
                bytes(scale.big())
            );
            let measured = (|| -> Result<Row> {
                let hv = backend.open()?;
                let (size, projected) = touch_size(hv.as_ref(), scale.big())?;
                let (size, rounds, note) = if size < scale.big() {
                    figure = format!("first touch of {} in one guest loop ({name})", bytes(size));
                    let note = format!(
                        "{} would take about {projected:.0} s here: measured on {}",
                        bytes(scale.big()),
                        bytes(size)
                    );
                    (size, 1, Some(note))
                } else {
                    (scale.big(), scale.rounds().min(3), None)
                };
                let (mut g, mut a, mut r) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..rounds {
                    let tg = touch_once(hv.as_ref(), size, true)?.as_secs_f64();
                    let ta = touch_once(hv.as_ref(), size, false)?.as_secs_f64();
                    g.push(tg);
                    a.push(ta);
                    r.push(tg / ta);
                }
                let mut row = Row::new(
                    &id,
                    &figure,
                    median(&mut g),
                    Some((
                        median(&mut a),
                        "anonymous memory, same loop; ours: guest_memfd",
                    )),
                    Some(median(&mut r)),
                    Unit::Seconds,
                    Target::None,
                );
                row.note = note;
                Ok(row)
            })();
            measured.unwrap_or_else(|e| Row::skipped(&id, &figure, Target::None, e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_guest_loads_and_exits_at_ring_0_and_ring_3() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        for user in [false, true] {
            let mut raw = RawKvm::new(user).expect("the raw VM");

            let first = raw.access();
            let second = raw.access();

            assert!(
                first.is_ok() && second.is_ok(),
                "user {user}: {first:?} {second:?}"
            );
        }
    }
}
