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
    collect_files, render, BackendSlot, Checker, Departures, Limits, Outcome, Source,
};
use gmem::Backend;

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

fn check_corpus_on(backend: Backend) {
    let hv = backend.open().unwrap();
    let checker = Checker::new(
        vec![BackendSlot {
            name: backend.name().to_string(),
            hv: Ok(hv.as_ref()),
        }],
        Departures::builtin(),
        Limits::new(BUDGET),
    );
    let report = checker.check_sources(&sources(), |_, _, _| {});
    let text = render(&report);
    assert!(!report.failed(), "{text}");
}

#[test]
fn corpus_passes_on_the_soft_backend() {
    check_corpus_on(Backend::Soft);
}

#[test]
fn corpus_passes_on_kvm_or_departs_by_a_probed_behaviour() {
    if skips::no_kvm("the corpus on the kvm backend") {
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
    let checker = Checker::new(
        vec![BackendSlot {
            name: backend.name().to_string(),
            hv: Ok(hv.as_ref()),
        }],
        Departures::builtin(),
        Limits::new(BUDGET),
    );
    let before = mem_available().unwrap();
    let report = checker.check_sources(
        &[Source {
            name: "terabyte.gmem".into(),
            text: Ok(TERABYTE.into()),
        }],
        |_, _, _| {},
    );
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
    if skips::no_kvm("the over-budget scenario on the kvm backend") {
        return;
    }
    over_budget_keeps_memory(Backend::Kvm);
}
