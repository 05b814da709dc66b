//! criterion benches of the figures `gmem bench` reports, on the same code
//! (`gmem::bench`): each group times ours and its baseline side by side.
//! `cargo bench -p gmem --bench soft_path`; `gmem bench` prints the ratios.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gmem::bench::access::{Access, AccessThreads, Pattern};
use gmem::bench::convert::{per_page, Conversions, TOP};
use gmem::bench::falloc::Fallocate;
use gmem::bench::kvm::{touch_once, touch_size, OneAccess};
use gmem::bench::populate::{Populate, PopulatePair, BACKINGS};
use gmem::bench::{bytes, start, Pair, Threads};
use gmem::Backend;

const GIB: u64 = 1 << 30;

/// Soft guest accesses against raw loads: hot, sequential and random over
/// 1 GiB, 1 and 2 threads, each cell timed as `gmem bench` times the cells
/// of its figures (the hot ones at 1 and 2 threads are those of the
/// scaling figure, `gmem::bench::compare_scaling`).
fn access(c: &mut Criterion) {
    let mut access = Access::new(GIB, 2).expect("1 GiB of soft guest memory");
    let mut g = c.benchmark_group("access");
    for pattern in [Pattern::Hot, Pattern::Sequential, Pattern::Random] {
        let mut cells = AccessThreads {
            access: &mut access,
            pattern,
        };
        for threads in [1, 2] {
            let name = format!("{}/{threads}t", pattern.name());
            g.bench_function(format!("{name}/ours"), |b| {
                b.iter_custom(|iters| cells.ours(threads, iters))
            });
            g.bench_function(format!("{name}/raw"), |b| {
                b.iter_custom(|iters| cells.baseline(threads, iters))
            });
        }
    }
    g.finish();
}

/// Conversions of 4 KiB and 1 TiB, and the per-page map over 1 GiB.
fn conversion(c: &mut Criterion) {
    let conv = Conversions::new().expect("a 1 TiB slot");
    let mut g = c.benchmark_group("conversion");
    g.bench_function("4KiB/ours", |b| {
        b.iter_custom(|iters| conv.convert(4096, iters))
    });
    g.bench_function("1TiB/ours", |b| {
        b.iter_custom(|iters| conv.convert(TOP, iters))
    });
    g.sample_size(10);
    g.bench_function("1GiB/per_page_map", |b| {
        b.iter_custom(|iters| per_page(GIB, iters))
    });
    g.finish();
}

/// fallocate allocate and punch of 1 GiB, ours and a raw memfd, on each
/// backend that opens here.
fn fallocate(c: &mut Criterion) {
    let mut g = c.benchmark_group("fallocate_1GiB");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for backend in [Backend::Soft, Backend::Kvm] {
        let Ok(f) = Fallocate::new(backend, GIB) else {
            eprintln!(
                "skip: fallocate on {}: backend not available",
                backend.name()
            );
            continue;
        };
        for (name, ours) in [("ours", true), ("raw", false)] {
            for (i, what) in ["allocate", "punch"].iter().enumerate() {
                g.bench_function(format!("{}/{what}/{name}", backend.name()), |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| f.round(ours).expect("fallocate")[i])
                            .sum()
                    })
                });
            }
        }
    }
    g.finish();
}

/// VM creation to the first guest access with 1 GiB bound; one KVM guest
/// access against raw KVM_SET_REGS + KVM_RUN; guest first touch of 1 GiB.
fn vm_and_kvm(c: &mut Criterion) {
    let mut g = c.benchmark_group("vm");
    g.sample_size(10);
    for backend in [Backend::Soft, Backend::Kvm] {
        let Ok(hv) = backend.open() else {
            eprintln!("skip: {}: backend not available", backend.name());
            continue;
        };
        g.bench_function(format!("{}/start_1GiB", backend.name()), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| start::once(hv.as_ref(), GIB).expect("first access"))
                    .sum()
            })
        });
        let size = touch_size(hv.as_ref(), GIB).map_or(0, |(size, _)| size);
        for (name, gmem) in [("guest_memfd", true), ("anonymous", false)] {
            let id = format!("{}/first_touch_{}/{name}", backend.name(), bytes(size));
            g.bench_function(id.replace(' ', ""), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| touch_once(hv.as_ref(), size, gmem).expect("touch loop"))
                        .sum()
                })
            });
        }
    }
    if let Ok(mut one) = OneAccess::new() {
        g.bench_function("kvm/access/ours", |b| {
            b.iter_custom(|iters| one.ours(iters))
        });
        g.bench_function("kvm/access/raw", |b| {
            b.iter_custom(|iters| black_box(one.baseline(iters)))
        });
    } else {
        eprintln!("skip: kvm access: /dev/kvm not available");
    }
    g.finish();
}

/// A soft guest loop filling 1 GiB through the memory manager's
/// guest_memfd and split backings, against the same words stored from the
/// host into the same memory: fresh memory (discarded before each fill,
/// untimed) and a refill, 1 and 2 vCPUs. A fill's time leaves out what its
/// threads waited for a core (`gmem::bench::populate`).
fn populate(c: &mut Criterion) {
    let mut g = c.benchmark_group("populate_1GiB");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (mode, name) in BACKINGS {
        let mut populate = Populate::new(mode, GIB, 2).expect("1 GiB through the memory manager");
        for (kind, fresh) in [("fresh", true), ("refill", false)] {
            for threads in [1, 2] {
                let mut pair = PopulatePair {
                    populate: &mut populate,
                    threads,
                    fresh,
                };
                let id = format!("{name}/{kind}/{threads}t");
                g.bench_function(format!("{id}/ours"), |b| {
                    b.iter_custom(|iters| pair.ours(iters))
                });
                g.bench_function(format!("{id}/raw"), |b| {
                    b.iter_custom(|iters| pair.baseline(iters))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, access, conversion, fallocate, vm_and_kvm, populate);
criterion_main!(benches);
