//! The scenario corpus (`scenarios/`) on the backends: every scenario passes
//! on the software backend, and on the KVM backend (where `/dev/kvm` works)
//! every line has its upstream outcome or a departure recorded for the
//! running kernel.

use std::io::Write;
use std::path::PathBuf;

use gmem::scenario::{collect_files, kernel_release, render, BackendSlot, Checker, Departures};
use gmem::Backend;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn check_corpus_on(backend: Backend) -> Result<(), String> {
    let hv = backend.open().map_err(|e| e.to_string())?;
    let departures = Departures::load(&corpus().join("departures.toml")).unwrap();
    let checker = Checker {
        backends: vec![BackendSlot {
            name: backend.name().to_string(),
            hv: Ok(hv.as_ref()),
        }],
        departures,
        release: kernel_release(),
        corpus: Some(corpus()),
    };
    let files = collect_files(&corpus()).unwrap();
    assert!(files.len() > 40, "the corpus has {} files", files.len());
    let report = checker.check_files(&files, |_, _, _| {});
    let text = render(&report);
    assert!(!report.failed(), "{text}");
    Ok(())
}

#[test]
fn corpus_passes_on_the_soft_backend() {
    check_corpus_on(Backend::Soft).unwrap();
}

/// Each release profile passes the corpus as that release behaves: lines
/// with an outcome per release (`=> EINVAL | 7.2: EEXIST`) are held to the
/// profile's release.
#[test]
fn corpus_passes_on_every_release_profile() {
    for release in gmem::Release::ALL {
        let hv = gmem::soft::SoftHypervisor::with_profile(release).unwrap();
        let checker = Checker {
            backends: vec![BackendSlot {
                name: format!("soft {release}"),
                hv: Ok(&hv),
            }],
            departures: Departures::default(),
            release: kernel_release(),
            corpus: Some(corpus()),
        };
        let report = checker.check_files(&collect_files(&corpus()).unwrap(), |_, _, _| {});
        assert!(!report.failed(), "profile {release}:\n{}", render(&report));
    }
}

#[test]
fn corpus_passes_on_kvm_or_departs_as_recorded() {
    if !std::path::Path::new("/dev/kvm").exists() {
        // Straight to stderr: the harness captures println! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "skip: /dev/kvm does not exist (corpus_passes_on_kvm_or_departs_as_recorded)"
        );
        return;
    }
    // Where /dev/kvm exists, failing to open it is a failure, not a skip.
    check_corpus_on(Backend::Kvm).unwrap();
}

#[test]
fn departures_file_parses() {
    Departures::load(&corpus().join("departures.toml")).unwrap();
}
