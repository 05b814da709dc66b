//! The KVM backend's guest path against raw KVM, measured in the same run.
//!
//! - `access`: one guest access through [`Vcpu::run`] (ring 0, one
//!   `KVM_RUN`) against a raw `KVM_SET_REGS` + `KVM_RUN` of a guest that
//!   does the same load and exits (`out`, ring 0; [`RawKvm`], the baseline
//!   of `gmem bench`), and, to show why single accesses do not run at
//!   ring 3 here, the same raw run exiting from ring 3 (an MMIO store).
//! - `loops`: fill and verify of a guest_memfd (MMAP | INIT_SHARED, the slot
//!   pointing at the file's own mapping) in guest loops, against the host
//!   filling the same mapping with the same pattern.
//! - first touch: a guest loop touching 1 GiB of fresh guest_memfd against
//!   1 GiB of fresh anonymous memory, freed after each round.
//!
//! Before criterion's own figures, the bench prints in-run ratios (ours
//! over the baseline, rounds interleaved, median and range), which are what
//! the project's targets are stated in. Needs /dev/kvm; without it, it says
//! so and does nothing. `cargo bench -p gmem --bench kvm_path`.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use gmem::bench::bind_shared_file;
use gmem::bench::kvm::RawKvm;
use gmem::kvm::KvmHypervisor;
use gmem::uapi::*;
use gmem::{GuestLoop, GuestOp, HostMemory, Hypervisor, Vcpu, VcpuExit, Vm};

const GUEST_GPA: u64 = 0x1000_0000;
const LOOP_BYTES: u64 = 256 << 20;
const TOUCH_BYTES: u64 = 1 << 30;
const SEED: u64 = 0x5eed_0000_0000_0000;

/// A VM with `mem` at `GUEST_GPA` (slot 0) and vCPU 0.
fn gmem_guest(hv: &KvmHypervisor) -> (Box<dyn Vm>, Box<dyn HostMemory>, Box<dyn Vcpu>) {
    let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64).unwrap();
    let mem = hv.host_memory(2 << 20).unwrap();
    vm.set_user_memory_region2(user_region(0, GUEST_GPA, 2 << 20, mem.addr()))
        .unwrap();
    let cpu = vm.create_vcpu(0).unwrap();
    (vm, mem, cpu)
}

fn read8(cpu: &mut Box<dyn Vcpu>) {
    let exit = cpu
        .run(GuestOp::Read {
            gpa: GUEST_GPA + 0x100,
            size: 8,
        })
        .unwrap();
    assert!(matches!(exit, VcpuExit::Done(_)), "{exit:?}");
}

/// A VM whose slot 0 at `gpa` is a fresh `size`-byte MMAP | INIT_SHARED
/// guest_memfd bound through its own mapping (the mapping is returned; the
/// file lives as long as it does).
fn gmem_file(hv: &KvmHypervisor, size: u64) -> (Box<dyn Vm>, Box<dyn HostMemory>) {
    let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64).unwrap();
    let (_, map) = bind_shared_file(vm.as_ref(), GUEST_GPA, size).unwrap();
    (vm, map)
}

fn run_loop(cpu: &mut Box<dyn Vcpu>, op: GuestLoop) -> u64 {
    let exit = cpu.run_loop(op).unwrap();
    let (_, len) = op.range();
    assert_eq!(exit.done, len, "{exit:?}");
    match exit.exit {
        VcpuExit::Done(n) => n,
        other => panic!("{op:?} ended with {other:?}"),
    }
}

/// The host writes the fill pattern into `map`, word by word.
fn host_fill(map: &dyn HostMemory, gpa: u64) {
    let words = (map.len() / 8) as usize;
    let p = map.addr() as *mut u64;
    for i in 0..words {
        let at = gpa + 8 * i as u64;
        // SAFETY: i < words: inside the live shared mapping, which nothing
        // else touches meanwhile.
        unsafe { p.add(i).write_volatile(GuestLoop::pattern(at, SEED)) };
    }
}

/// Median, min and max of `ratios`.
fn summary(mut ratios: Vec<f64>) -> String {
    ratios.sort_by(f64::total_cmp);
    format!(
        "median {:.2}x (range {:.2}..{:.2}, {} rounds)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len()
    )
}

fn time(n: u32, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed()
}

/// In-run ratios, rounds of ours and of the baseline interleaved.
fn ratios(hv: &KvmHypervisor) {
    let mut raw0 = RawKvm::new(false).unwrap();
    let mut raw3 = RawKvm::new(true).unwrap();
    let (_vm, _mem, mut cpu) = gmem_guest(hv);
    let (mut access, mut ring3) = (Vec::new(), Vec::new());
    for round in 0..15 {
        let n = 400;
        let (ours, raw, r3);
        if round % 2 == 0 {
            ours = time(n, || read8(&mut cpu));
            raw = time(n, || raw0.access().unwrap());
            r3 = time(n, || raw3.access().unwrap());
        } else {
            r3 = time(n, || raw3.access().unwrap());
            raw = time(n, || raw0.access().unwrap());
            ours = time(n, || read8(&mut cpu));
        }
        access.push(ours.as_secs_f64() / raw.as_secs_f64());
        ring3.push(r3.as_secs_f64() / raw.as_secs_f64());
    }
    println!(
        "one guest access (8-byte read) / raw KVM_SET_REGS + KVM_RUN: {}",
        summary(access)
    );
    println!(
        "raw run exiting from ring 3 / raw run exiting from ring 0:    {}",
        summary(ring3)
    );

    // Instructions per second of the verify loop (9 per word), run at ring
    // 3 below 2^47 and at ring 0 above it, on memory the cache holds.
    let (native, interpreted) = (1u64 << 20, 64u64 << 10);
    let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64).unwrap();
    let low = hv.host_memory(native).unwrap();
    let high = hv.host_memory(interpreted).unwrap();
    vm.set_user_memory_region2(user_region(0, GUEST_GPA, native, low.addr()))
        .unwrap();
    vm.set_user_memory_region2(user_region(1, 1 << 47, interpreted, high.addr()))
        .unwrap();
    let mut cpu = vm.create_vcpu(0).unwrap();
    let rate = |cpu: &mut Box<dyn Vcpu>, gpa: u64, len: u64, rounds: u32| {
        let op = GuestLoop::Verify { gpa, len, seed: 0 };
        run_loop(cpu, op);
        let t = time(rounds, || {
            run_loop(cpu, op);
        });
        (len / 8 * 9 * u64::from(rounds)) as f64 / t.as_secs_f64()
    };
    let ring3 = rate(&mut cpu, GUEST_GPA, native, 200);
    let ring0 = rate(&mut cpu, 1 << 47, interpreted, 3);
    println!(
        "guest loop instructions per second: ring 3 {:.0} M/s, ring 0 {:.1} M/s",
        ring3 / 1e6,
        ring0 / 1e6
    );
    drop((cpu, vm, low, high));

    let (_vm, map) = gmem_file(hv, LOOP_BYTES);
    let mut cpu = _vm.create_vcpu(0).unwrap();
    let fill = GuestLoop::Fill {
        gpa: GUEST_GPA,
        len: LOOP_BYTES,
        seed: SEED,
    };
    let verify = GuestLoop::Verify {
        gpa: GUEST_GPA,
        len: LOOP_BYTES,
        seed: SEED,
    };
    run_loop(&mut cpu, fill);
    let (mut fills, mut verifies, mut gbs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        let host = time(1, || host_fill(&*map, GUEST_GPA));
        let guest = time(1, || {
            run_loop(&mut cpu, fill);
        });
        let check = time(1, || assert_eq!(run_loop(&mut cpu, verify), 0));
        fills.push(guest.as_secs_f64() / host.as_secs_f64());
        verifies.push(check.as_secs_f64() / host.as_secs_f64());
        gbs.push((
            LOOP_BYTES as f64 / guest.as_secs_f64() / 1e9,
            LOOP_BYTES as f64 / check.as_secs_f64() / 1e9,
        ));
    }
    gbs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (fill_gbs, _) = gbs[gbs.len() / 2];
    gbs.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (_, verify_gbs) = gbs[gbs.len() / 2];
    println!(
        "guest fill of 256 MiB guest_memfd / host fill of its mapping:  {} ({fill_gbs:.1} GB/s)",
        summary(fills)
    );
    println!(
        "guest verify of 256 MiB guest_memfd / host fill of its mapping: {} ({verify_gbs:.1} GB/s)",
        summary(verifies)
    );
    drop((cpu, map));

    let touch = GuestLoop::Touch {
        gpa: GUEST_GPA,
        len: TOUCH_BYTES,
        write: true,
    };
    let mut first = Vec::new();
    let (mut gmem_s, mut anon_s) = (Vec::new(), Vec::new());
    for round in 0..7 {
        let touch_gmem = || {
            let (vm, map) = gmem_file(hv, TOUCH_BYTES);
            let mut cpu = vm.create_vcpu(0).unwrap();
            let t = time(1, || {
                run_loop(&mut cpu, touch);
            });
            drop((cpu, vm, map));
            t
        };
        let touch_anon = || {
            let vm = hv.create_vm(KVM_X86_DEFAULT_VM as u64).unwrap();
            let mem = hv.host_memory(TOUCH_BYTES).unwrap();
            vm.set_user_memory_region2(user_region(0, GUEST_GPA, TOUCH_BYTES, mem.addr()))
                .unwrap();
            let mut cpu = vm.create_vcpu(0).unwrap();
            let t = time(1, || {
                run_loop(&mut cpu, touch);
            });
            drop((cpu, vm, mem));
            t
        };
        let (gmem, anon) = if round % 2 == 0 {
            let g = touch_gmem();
            (g, touch_anon())
        } else {
            let a = touch_anon();
            (touch_gmem(), a)
        };
        gmem_s.push(gmem.as_secs_f64());
        anon_s.push(anon.as_secs_f64());
        first.push(gmem.as_secs_f64() / anon.as_secs_f64());
    }
    gmem_s.sort_by(f64::total_cmp);
    anon_s.sort_by(f64::total_cmp);
    println!(
        "guest first touch of 1 GiB: guest_memfd median {:.3} s, anonymous median {:.3} s",
        gmem_s[gmem_s.len() / 2],
        anon_s[anon_s.len() / 2]
    );
    println!(
        "guest first touch of 1 GiB, guest_memfd / anonymous memory:    {}",
        summary(first)
    );
}

fn access(c: &mut Criterion) {
    let Some(hv) = kvm() else { return };
    let mut g = c.benchmark_group("access");
    g.measurement_time(Duration::from_secs(2));
    let mut raw0 = RawKvm::new(false).unwrap();
    g.bench_function("raw_set_regs_run_ring0", |b| {
        b.iter(|| raw0.access().unwrap())
    });
    let mut raw3 = RawKvm::new(true).unwrap();
    g.bench_function("raw_set_regs_run_ring3", |b| {
        b.iter(|| raw3.access().unwrap())
    });
    let (_vm, _mem, mut cpu) = gmem_guest(&hv);
    g.bench_function("gmem_read8", |b| b.iter(|| read8(&mut cpu)));
    g.bench_function("gmem_write8", |b| {
        b.iter(|| {
            cpu.run(GuestOp::Write {
                gpa: GUEST_GPA + 0x100,
                size: 8,
                value: 1,
            })
            .unwrap()
        })
    });
    g.finish();
}

fn loops(c: &mut Criterion) {
    let Some(hv) = kvm() else { return };
    let (vm, map) = gmem_file(&hv, LOOP_BYTES);
    let mut cpu = vm.create_vcpu(0).unwrap();
    let mut g = c.benchmark_group("loops");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(LOOP_BYTES));
    let fill = GuestLoop::Fill {
        gpa: GUEST_GPA,
        len: LOOP_BYTES,
        seed: SEED,
    };
    g.bench_function("guest_fill_256MiB_guest_memfd", |b| {
        b.iter(|| run_loop(&mut cpu, fill))
    });
    g.bench_function("guest_verify_256MiB_guest_memfd", |b| {
        b.iter(|| {
            run_loop(
                &mut cpu,
                GuestLoop::Verify {
                    gpa: GUEST_GPA,
                    len: LOOP_BYTES,
                    seed: SEED,
                },
            )
        })
    });
    g.bench_function("host_fill_256MiB_mapping", |b| {
        b.iter(|| host_fill(&*map, GUEST_GPA))
    });
    g.finish();
}

fn kvm() -> Option<KvmHypervisor> {
    if !Path::new("/dev/kvm").exists() {
        return None;
    }
    Some(KvmHypervisor::open().expect("/dev/kvm exists but does not open"))
}

criterion_group!(benches, access, loops);

fn main() {
    let Some(hv) = kvm() else {
        println!("kvm_path: /dev/kvm does not exist; nothing to measure");
        return;
    };
    ratios(&hv);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
