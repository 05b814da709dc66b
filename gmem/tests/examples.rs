//! The examples run to the end, and what they print fits 100 columns (on
//! the software backend, and for `vmm` on this kernel where `/dev/kvm`
//! exists).

use std::path::PathBuf;
use std::process::Command;

#[path = "common/skips.rs"]
mod skips;

/// Builds the examples with the profile of this test binary and returns
/// the folder that holds them.
fn built_examples() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/examples-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "-q",
            "-p",
            "gmem",
            "--example",
            "vmm",
            "--example",
            "demo",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("running cargo build");
    assert!(status.success(), "cargo build of the examples failed");
    profile_dir.join("examples")
}

/// The lines of `out` longer than 100 columns.
fn too_wide(out: &str) -> Vec<(usize, &str)> {
    out.lines()
        .enumerate()
        .filter(|(_, l)| l.chars().count() > 100)
        .map(|(i, l)| (i + 1, l))
        .collect()
}

/// Runs example `name` with `args`; its stdout.
fn run(dir: &std::path::Path, name: &str, args: &[&str]) -> String {
    let out = Command::new(dir.join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running example {name}: {e}"));
    assert!(
        out.status.success(),
        "example {name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the examples print UTF-8")
}

#[test]
fn examples_print_lines_within_100_columns() {
    let dir = built_examples();
    let mut runs = vec![("demo", vec![]), ("vmm", vec![])];
    if std::path::Path::new("/dev/kvm").exists() {
        runs.push(("vmm", vec!["kvm"]));
    } else {
        skips::skip("no /dev/kvm: the vmm example ran on the software backend only");
    }

    for (name, args) in runs {
        let out = run(&dir, name, &args);

        assert!(out.lines().count() > 5, "{name} printed:\n{out}");
        let wide = too_wide(&out);
        assert!(
            wide.is_empty(),
            "{name} {args:?} prints lines over 100 columns: {wide:#?}"
        );
    }
}

#[test]
fn a_wide_line_is_found() {
    let text = format!("short\n{}\nfine", "x".repeat(101));

    assert_eq!(too_wide(&text), [(2, "x".repeat(101).as_str())]);
    assert!(too_wide(&"y".repeat(100)).is_empty());
}
