//! The KVM figures: one guest access on the KVM backend against the floor
//! (a raw `KVM_SET_REGS` + `KVM_RUN` of the same load, with kvm-ioctls and
//! nothing else), and guest first touch of 1 GiB on guest_memfd against
//! anonymous memory in one guest loop ([`Vcpu::run_loop`]) on each backend.
//! Where `/dev/kvm` cannot be opened the KVM rows say why.

use std::hint::black_box;
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};

use super::{bytes, compare, median, time, Pair, Row, Scale, Target, Unit};
use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{GuestLoop, GuestOp, HostMemory, Hypervisor, MapKind, Vcpu, VcpuExit};
use crate::uapi::{
    guest_memfd_region, kvm_create_guest_memfd, kvm_userspace_memory_region2, user_region,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_X86_DEFAULT_VM,
};
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
/// pages, and a 64-bit vCPU whose code is `mov rax, [rdi]; out 0x4d, al`.
/// One access is `KVM_SET_REGS` + `KVM_RUN`.
pub struct RawKvm {
    vcpu: VcpuFd,
    _vm: VmFd,
    _mem: Mmap,
}

const RAW_PML4: u64 = 0x1000;
const RAW_CODE: u64 = 0x10000;
const RAW_DATA: u64 = 0x20000;
const RAW_PORT: u16 = 0x4d;

impl RawKvm {
    /// Opens `/dev/kvm` and builds the VM.
    pub fn new() -> Result<RawKvm> {
        let kvm = Kvm::new().map_err(|e| kernel(e, "open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(|e| kernel(e, "KVM_CREATE_VM"))?;
        let mem = Mmap::anonymous(4 << 20)?;
        let w = |at: u64, v: &[u8]| mem.write(at, v).expect("inside the 4 MiB");
        // GDT: null, 64-bit code, data.
        for (i, d) in [0u64, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff]
            .iter()
            .enumerate()
        {
            w(8 * i as u64, &d.to_le_bytes());
        }
        // PML4 -> PDPT -> PD with two present, writable 2 MiB pages.
        w(RAW_PML4, &(0x2000u64 | 3).to_le_bytes());
        w(0x2000, &(0x3000u64 | 3).to_le_bytes());
        w(0x3000, &0x83u64.to_le_bytes());
        w(0x3008, &(0x20_0000u64 | 0x83).to_le_bytes());
        // mov rax, [rdi]; out 0x4d, al; hlt
        w(RAW_CODE, &[0x48, 0x8b, 0x07, 0xe6, RAW_PORT as u8, 0xf4]);
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
        let mut sregs = vcpu.get_sregs().map_err(|e| kernel(e, "KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = 0;
        sregs.gdt.limit = 23;
        sregs.cr0 = 0x8005_0033;
        sregs.cr4 = 0x20;
        sregs.efer = 0x500;
        sregs.cr3 = RAW_PML4;
        vcpu.set_sregs(&sregs)
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
            Ok(KvmExit::IoOut(RAW_PORT, _)) => Ok(()),
            Ok(other) => Err(Error::new(
                Errno::EIO,
                "bench",
                format!("raw KVM guest exited with {other:?}"),
            )),
            Err(e) => Err(kernel(e, "KVM_RUN")),
        }
    }
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
    /// A KVM backend VM with 2 MiB of host memory at [`GPA`] and its vCPU,
    /// and the raw VM.
    pub fn new() -> Result<OneAccess> {
        let hv = Backend::Kvm.open()?;
        let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64)?;
        let mem = hv.host_memory(2 << 20)?;
        vm.set_user_memory_region2(user_region(0, GPA, mem.len(), mem.addr()))?;
        Ok(OneAccess {
            cpu: vm.create_vcpu(0)?,
            raw: RawKvm::new()?,
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
/// touch within [`TOUCH_BUDGET`], judged by a probe of `big / 64`; and the
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
