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
fn run_with_a_bad_size_or_profile_is_bad_input_and_says_why() {
    let o = gmem(&["run", "--backend", "soft", "--memory", "1000"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--memory 1000 bytes: RAM must be a positive multiple of 4 KiB"),
        "{}",
        text(&o.stderr)
    );
    let o = gmem(&["run", "--backend", "kvm", "--profile", "next"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("software backend"),
        "{}",
        text(&o.stderr)
    );
}

/// The output with every run of white space as one space.
fn words(o: &[u8]) -> String {
    text(o).split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn run_and_map_exit_2_for_bad_input() {
    for (args, says) in [
        (
            &["run", "--backend", "soft", "--vcpus", "0"][..],
            "--vcpus 0",
        ),
        (
            &["run", "--backend", "soft", "--memory", "0"],
            "--memory 0 bytes",
        ),
        (
            &["map", "--ram", "0:1G", "--ram", "0x1000:1G"],
            "overlap (gmem-layout, EINVAL)",
        ),
        (
            &["map", "--memory", "100T"],
            "100 TiB of RAM cannot be set up on this host",
        ),
        (
            &["map", "--memory", "1G", "--private", "0x1_0000_0000:4K"],
            "is not guest RAM",
        ),
        (
            &[
                "run",
                "--backend",
                "soft",
                "--profile",
                "6.18",
                "--backing",
                "in-place",
            ],
            "no in-place backing on the soft backend",
        ),
    ] {
        let o = gmem(args);
        let err = words(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("Mode("), "no Debug names: {err}");
        for l in text(&o.stderr).lines() {
            assert!(l.chars().count() <= 100, "{l}");
        }
    }
}

#[test]
fn run_refuses_more_memory_than_its_guard_before_allocating() {
    let o = gmem(&[
        "run",
        "--backend",
        "soft",
        "--memory",
        "64M",
        "--max-memory",
        "32M",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = words(&o.stderr);
    assert!(
        err.contains("--memory 64 MiB is more than this run may populate: --max-memory is 32 MiB"),
        "{err}"
    );
    // The default guard is a share of MemAvailable: 100 TiB is over it,
    // refused up front with no fd number in sight.
    let o = gmem(&["run", "--memory", "100T"]);
    assert_eq!(o.status.code(), Some(2));
    let err = words(&o.stderr);
    assert!(
        err.contains("--memory 100 TiB is more than this run may populate"),
        "{err}"
    );
    assert!(err.contains("of MemAvailable"), "{err}");
    let o = gmem(&["run", "--help"]);
    let help = words(&o.stdout);
    assert!(help.contains("[default: 1/2 of MemAvailable"), "{help}");
    assert!(help.contains("K, M, G or T"), "{help}");
    assert!(!help.contains("not offered yet"), "{help}");
}

#[test]
fn ram_and_private_take_underscores_and_call_an_address_an_address() {
    let o = gmem(&["map", "--ram", "0x1_0000_0000:1G"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("[0x100000000, 0x140000000)"));
    let o = gmem(&["map", "--ram", "zz:1G"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        words(&o.stderr).contains("`zz` is not an address"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn map_svg_to_a_missing_folder_names_the_path_and_errno() {
    let o = gmem(&["map", "--svg", "/no/such/folder/map.svg"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("--svg /no/such/folder/map.svg: No such file or directory (ENOENT)"),
        "{err}"
    );
}

#[test]
fn map_svg_shows_a_private_page_inside_gigabytes() {
    let svg = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gmem-map-page-{}.svg", std::process::id()));
    let o = gmem(&[
        "map",
        "--ram",
        "0:2G",
        "--ram",
        "0x100000000:2G",
        "--private",
        "0x100001000:4K",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let picture = std::fs::read_to_string(&svg).unwrap_or_default();
    let _ = std::fs::remove_file(&svg);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The page has room for its label; the addresses around it are
    // staggered into two rows (y 260 and 273 below the bar at 200).
    assert!(picture.contains(">4 KiB</text>"), "{picture}");
    let y_of = |a: &str| {
        let at = picture.find(&format!(">{a}</text>")).expect(a);
        let tag = &picture[picture[..at].rfind("<text").unwrap()..at];
        let y = tag.split("y=\"").nth(1).unwrap();
        y[..y.find('"').unwrap()].to_string()
    };
    assert_ne!(y_of("0x100000000"), y_of("0x100001000"));
    assert_ne!(y_of("0x100001000"), y_of("0x100002000"));
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
