//! The fuzzer's generator on fixed seeds, as a test (`gmem fuzz` is the
//! long run).
//!
//! On the software backend alone, every program runs without a panic,
//! without leaving an fd or a mapping behind (LIFE-8), with the same
//! outcomes twice, and in agreement with the fuzzer's model of files,
//! mappings and host memory (CREATE-1, CREATE-2, CREATE-4, FILE-1, FILE-2,
//! FALLOC-1..FALLOC-4, MMAP-1..MMAP-4, LIFE-7). Where `/dev/kvm` exists the
//! same generator drives both backends: the KVM backend neither panics nor
//! hangs nor leaks on any program (differences from the kernel are what
//! `gmem fuzz` reports; they are not failures here).
//!
//! Seeds whose programs once showed a fault `gmem fuzz` found (and that is
//! fixed) run again, each named with what it showed: on the software
//! backend against the model, and on both backends where the running kernel
//! is one `scenarios/departures.toml` records (there every difference is
//! known, so none may remain).
//!
//! One test in its own binary: the leak check counts the whole process's
//! fds and mappings.

use std::sync::Arc;

#[path = "common/skips.rs"]
mod skips;

use gmem::fuzz::coverage::OPERATIONS;
use gmem::fuzz::exec::{FindingKind, Verdict};
use gmem::fuzz::{Campaign, Config, Limits, Mode};
use gmem::scenario::{run, Departures, KernelId};
use gmem::{Backend, Release};

const SOFT_PROGRAMS: u64 = 400;
const NEXT_PROGRAMS: u64 = 200;
const KVM_PROGRAMS: u64 = 60;

/// Software backend against the model (`gmem fuzz --backend soft --seed N
/// --runs 1`): programs that found a fault of the software backend.
const SOFT_REGRESSIONS: [(u64, &str); 2] = [
    (
        1028,
        "a mapping closed under a slot, then host memory: the guest must not reach it (gmem-safety)",
    ),
    (
        1178,
        "host memory closed under a slot, then more: the slot still finds nothing (FAULT-3)",
    ),
];

/// Both backends (`gmem fuzz --backend both --seed N --runs 1`), on a
/// kernel whose departures are recorded: programs that found a difference
/// on ours, each fixed where it belonged.
const KVM_REGRESSIONS: [(u64, &str); 4] = [
    (
        1159,
        "a slot over a guest_memfd mapping the host cannot fault in: EFAULT upstream, MMIO here (FAULT-3-unmapped)",
    ),
    (
        1322,
        "host memory closed under a slot, then more: its addresses stay reserved on both backends",
    ),
    (
        9570,
        "mbind strict over a touched guest_memfd page: EIO (NUMA-4)",
    ),
    (
        1023,
        "MADV_COLLAPSE on host memory: a VMA of its own, so placement does not decide",
    ),
];

fn fail_on_finding(c: &mut Campaign, seed: u64, accept_differences: bool) {
    if let Verdict::Found(f) = c.run_seed(seed) {
        if accept_differences && matches!(f.kind, FindingKind::Difference { .. }) {
            return;
        }
        panic!(
            "seed {seed}: {}\n{}",
            f.summary(),
            gmem::fuzz::print(&f.program)
        );
    }
}

#[test]
fn fixed_seed_programs_run_cleanly() {
    // The software backend against the model.
    let mut c = Campaign::new(Config {
        mode: Mode::Soft,
        ..Config::default()
    })
    .expect("the software backend opens");
    for seed in 0..SOFT_PROGRAMS {
        fail_on_finding(&mut c, seed, false);
    }
    for (seed, what) in SOFT_REGRESSIONS {
        eprintln!("regression seed {seed}: {what}");
        fail_on_finding(&mut c, seed, false);
    }
    // The newest profile has the operations 6.18 lacks (in-place
    // conversion, pins); between them every operation is generated.
    let mut next = Campaign::new(Config {
        mode: Mode::Soft,
        soft_release: Release::Next,
        ..Config::default()
    })
    .expect("the software backend opens");
    for seed in 0..NEXT_PROGRAMS {
        fail_on_finding(&mut next, seed, false);
    }
    let missed: Vec<&str> = OPERATIONS
        .iter()
        .copied()
        .filter(|o| !c.coverage.ops.contains_key(o) && !next.coverage.ops.contains_key(o))
        .collect();
    assert_eq!(missed, Vec::<&str>::new(), "every operation is generated");

    // The same program gives the same outcomes on a fresh backend.
    // (Details such as inode numbers may differ; outcomes may not.)
    let soft = Backend::Soft.open().unwrap();
    let outcomes = |sc: &Arc<gmem::scenario::Scenario>| {
        run(soft.as_ref(), sc)
            .lines
            .into_iter()
            .map(|l| l.actual)
            .collect::<Vec<_>>()
    };
    for seed in 0..20 {
        let sc = Arc::new(c.program(seed));
        assert_eq!(outcomes(&sc), outcomes(&sc), "seed {seed}");
    }

    // Both backends, where the kernel's is there.
    if skips::no_kvm() {
        return;
    }
    let mut c = Campaign::new(Config {
        mode: Mode::Both,
        limits: Limits {
            // A hypercall that never exits costs a whole run bound.
            hypercall_share: 0.0,
            ..Limits::default()
        },
        ..Config::default()
    })
    .expect("/dev/kvm exists, so the KVM backend opens");
    for seed in 0..KVM_PROGRAMS {
        fail_on_finding(&mut c, seed, true);
    }

    let kernel = KernelId::running();
    let recorded = Departures::builtin()
        .behaviours
        .iter()
        .any(|b| b.seen_on.contains(&kernel));
    if !recorded {
        skips::skip(format!(
            "the regression seeds on both backends need a kernel departures.toml records \
             (this is {kernel})"
        ));
        return;
    }
    let mut c = Campaign::new(Config::default()).expect("the KVM backend opens");
    for (seed, what) in KVM_REGRESSIONS {
        eprintln!("regression seed {seed}: {what}");
        fail_on_finding(&mut c, seed, false);
    }
}
