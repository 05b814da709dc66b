//! The scenario corpus (`scenarios/`) on the backends: every scenario passes
//! on the software backend, and on the KVM backend (where `/dev/kvm` exists)
//! every line has its upstream outcome or departs by a behaviour the
//! kernel's probes show; a scenario asking for more memory than the budget
//! leaves the machine's memory alone.

#[path = "common/skips.rs"]
mod skips;

use std::path::PathBuf;

use gmem::scenario::budget::mem_available;
use gmem::scenario::{
    collect_files, render, BackendSlot, CheckReport, Checker, Departures, Limits, Outcome, Source,
};
use gmem::{Backend, Hypervisor};

/// Every test here stays within this: a few hundred MiB at most.
const BUDGET: u64 = 256 << 20;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn sources() -> Vec<Source> {
    let files = collect_files(&corpus()).unwrap();
    assert!(files.len() > 40, "the corpus has {} files", files.len());
    files
        .iter()
        .map(|f| {
            let name = f.strip_prefix(corpus()).unwrap().display().to_string();
            Source::read(f, name)
        })
        .collect()
}

/// A checker of `hv` alone, under the name `name` and [`BUDGET`].
fn checker<'a>(
    name: impl Into<String>,
    hv: &'a dyn Hypervisor,
    departures: Departures,
) -> Checker<'a> {
    Checker::new(
        vec![BackendSlot {
            name: name.into(),
            hv: Ok(hv),
        }],
        departures,
        Limits::new(BUDGET),
    )
}

/// `checker`'s report on the one scenario `text`, named `name`.
fn check_text(checker: &Checker, name: &str, text: &str) -> CheckReport {
    checker.check_sources(
        &[Source {
            name: name.into(),
            text: Ok(text.into()),
        }],
        |_, _, _| {},
    )
}

fn check_corpus_on(backend: Backend) {
    let hv = backend.open().unwrap();
    let checker = checker(backend.name(), hv.as_ref(), Departures::builtin());
    let report = checker.check_sources(&sources(), |_, _, _| {});
    let text = render(&report);
    assert!(!report.failed(), "{text}");
}

#[test]
fn corpus_passes_on_the_soft_backend() {
    check_corpus_on(Backend::Soft);
}

/// Each release profile passes the corpus as that release behaves: lines
/// with an outcome per release (`=> EINVAL | 7.2: EEXIST`) are held to the
/// profile's release.
#[test]
fn corpus_passes_on_every_release_profile() {
    for release in gmem::Release::ALL {
        let hv = gmem::soft::SoftHypervisor::with_profile(release).unwrap();
        let checker = checker(format!("soft {release}"), &hv, Departures::default());
        let report = checker.check_sources(&sources(), |_, _, _| {});
        assert!(!report.failed(), "profile {release}:\n{}", render(&report));
    }
}

#[test]
fn corpus_passes_on_kvm_or_departs_by_a_probed_behaviour() {
    if skips::no_kvm() {
        return;
    }
    // Where /dev/kvm exists, failing to open it is a failure, not a skip.
    check_corpus_on(Backend::Kvm);
}

#[test]
fn departures_file_parses() {
    Departures::load(&corpus().join("departures.toml")).unwrap();
}

/// A terabyte guest_memfd, allocated: the line is not performed.
const TERABYTE: &str = "\
vm = create_vm
g = create_guest_memfd vm size=1T
fallocate g mode=allocate offset=0 len=1T
";

/// Runs [`TERABYTE`] on `backend` and measures `MemAvailable` around it.
fn over_budget_keeps_memory(backend: Backend) {
    let hv = backend.open().unwrap();
    let checker = checker(backend.name(), hv.as_ref(), Departures::builtin());
    let before = mem_available().unwrap();
    let report = check_text(&checker, "terabyte.gmem", TERABYTE);
    let after = mem_available().unwrap();
    let line = &report.scenarios[0].results[0].lines[2];
    assert_eq!(
        line.actual,
        Some(Outcome::OverBudget),
        "{}",
        render(&report)
    );
    assert!(!line.passed);
    assert!(report.failed(), "over budget is never a pass");
    assert_eq!(report.summary.over_budget_lines, 1);
    // Other engineers' builds move MemAvailable by some hundreds of MiB;
    // performing the line would have taken all of it.
    let lost = before.saturating_sub(after);
    assert!(
        lost < 1 << 30,
        "MemAvailable fell by {} MiB ({before} -> {after})",
        lost >> 20
    );
}

#[test]
fn a_terabyte_fallocate_is_over_budget_on_soft_and_the_machine_keeps_its_memory() {
    over_budget_keeps_memory(Backend::Soft);
}

#[test]
fn a_terabyte_fallocate_is_over_budget_on_kvm_and_the_machine_keeps_its_memory() {
    if skips::no_kvm() {
        return;
    }
    over_budget_keeps_memory(Backend::Kvm);
}

/// The selftest test_guest_memfd_guest (guest_memfd_test.c) as a user would
/// write it: a MMAP | INIT_SHARED file bound with userspace_addr 0, the
/// host fills it, the guest reads it and writes it back. The corpus has no
/// such file; then a slot whose file is released.
const USER_SCENARIOS: [(&str, &str, &str); 2] = [
    (
        "test_guest_memfd_guest.gmem",
        "FAULT-3",
        "\
vm = create_vm
g = create_guest_memfd vm size=4K flags=mmap|init_shared
set_memory_region vm slot=1 gpa=0x1_0000_0000 size=4K flags=guest_memfd userspace=0 guest_memfd=g
m = mmap g
host_write m offset=0 byte=0xaa len=4K
close m
guest_read vm gpa=0x1_0000_0000 => 0xaa
guest_write vm gpa=0x1_0000_0fff byte=0xff
m2 = mmap g
host_read m2 offset=0xfff => 0xff
",
    ),
    (
        "released.gmem",
        "FAULT-6",
        "\
vm = create_vm
h = host_memory size=8K
g = create_guest_memfd vm size=8K flags=mmap|init_shared
set_memory_region vm slot=7 gpa=0x2_0000_0000 size=8K flags=guest_memfd userspace=h guest_memfd=g
close g
guest_write vm gpa=0x2_0000_1000 byte=3 => exit memory_fault gpa=0x2_0000_1000 size=4096 flags=shared
",
    ),
];

#[test]
fn a_user_scenario_that_hits_a_probed_behaviour_departs_as_that_behaviour() {
    if skips::no_kvm() {
        return;
    }
    let hv = Backend::Kvm.open().unwrap();
    let checker = checker("kvm", hv.as_ref(), Departures::builtin());
    let shown = checker.probes(0).unwrap().shown();
    for (name, behaviour, text) in USER_SCENARIOS {
        let report = check_text(&checker, name, text);
        let result = &report.scenarios[0].results[0];
        if shown.contains(&behaviour) {
            match &result.verdict {
                gmem::scenario::Verdict::Departs(ids) => {
                    assert!(ids.iter().any(|i| i == behaviour), "{name}: {ids:?}")
                }
                v => panic!("{name}: {v:?}\n{}", render(&report)),
            }
        } else {
            assert!(!report.failed(), "{name}:\n{}", render(&report));
        }
    }
}

#[test]
fn the_user_scenarios_pass_on_the_soft_backend() {
    let hv = Backend::Soft.open().unwrap();
    let checker = checker("soft", hv.as_ref(), Departures::builtin());
    for (name, _, text) in USER_SCENARIOS {
        let report = check_text(&checker, name, text);
        assert!(!report.failed(), "{name}:\n{}", render(&report));
    }
}
