//! `gmem run` and `gmem map`: what they print and their exit codes.

use std::process::{Command, Output};

fn gmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("runs gmem")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn run_on_the_soft_backend_populates_verifies_converts_and_discards() {
    let o = gmem(&["run", "--backend", "soft", "--memory", "2M", "--vcpus", "2"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    for label in [
        "layout", "backing", "set-up", "populate", "verify", "convert", "discard", "exits",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(label)),
            "no `{label}` line:\n{out}"
        );
    }
    assert!(out.contains("split: VM type sw_protected"), "{out}");
    assert!(out.contains("0 wrong"), "{out}");
    assert!(out.contains("hypercall 1"), "{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 100), "{out}");
}

#[test]
fn run_with_a_bad_size_or_profile_fails_and_says_why() {
    let o = gmem(&["run", "--backend", "soft", "--memory", "1000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("(gmem-layout, EINVAL)"),
        "{}",
        text(&o.stderr)
    );
    let o = gmem(&["run", "--backend", "kvm", "--profile", "next"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("software backend"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn map_prints_the_layout_and_writes_the_svg() {
    let svg = std::env::temp_dir().join(format!("gmem-map-test-{}.svg", std::process::id()));
    let o = gmem(&[
        "map",
        "--backend",
        "soft",
        "--memory",
        "5G",
        "--private",
        "0x40000000:1G",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(
        out.contains("2 ranges, 2 memslots, 1 guest_memfd file"),
        "{out}"
    );
    assert!(
        out.contains("[0xc0000000, 0x100000000)") && out.contains("hole"),
        "{out}"
    );
    assert!(out.contains("private (guest_memfd)"), "{out}");
    let picture = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(picture.starts_with("<svg") && picture.contains("memslot 1"));
}
