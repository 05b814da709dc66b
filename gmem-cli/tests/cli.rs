//! The `gmem` binary: exit codes, what it says, and what it reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../gmem/tests/common/skips.rs"]
mod skips;

fn gmem_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs gmem")
}

fn gmem(args: &[&str]) -> Output {
    gmem_in(Path::new(env!("CARGO_TARGET_TMPDIR")), args)
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// The output with every run of white space as one space: reports wrap
/// at 100 columns, and where a line breaks depends on the paths in it.
fn words(o: &[u8]) -> String {
    text(o).split_whitespace().collect::<Vec<_>>().join(" ")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)))
}

/// Every line of `out` fits 100 columns; `what` printed it.
fn assert_fits_100_columns(out: &str, what: &str) {
    for l in out.lines() {
        let n = l.chars().count();
        assert!(n <= 100, "{what}: {n} columns: {l}");
    }
}

/// A folder of its own under cargo's temporary folder for tests (not /tmp),
/// removed when the test ends.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{test}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn file(&self, name: &str, body: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PASSING: &str = "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_read g => EINVAL\n";

#[test]
fn check_of_a_passing_file_exits_zero_and_prints_the_table() {
    let d = Dir::new("pass");
    let p = d.file("pass.gmem", PASSING);
    let o = gmem(&["check", "--backend", "soft", &p]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("pass"));
}

#[test]
fn check_of_a_failing_file_exits_one_with_line_expected_and_actual() {
    let d = Dir::new("fail");
    let p = d.file(
        "fail.gmem",
        "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_read g => ESPIPE\n",
    );
    let o = gmem(&["check", "--backend", "soft", &p]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(out.contains("fail.gmem:3"), "{out}");
    assert!(
        out.contains("expected: ESPIPE") && out.contains("actual:   EINVAL"),
        "{out}"
    );
}

#[test]
fn a_file_that_does_not_parse_is_an_input_error_reported_once() {
    let d = Dir::new("parse");
    let p = d.file("bad.gmem", "vm = create_vm\nfrob vm\n");
    // Text: the header names the real line; exit 2.
    let o = gmem(&["check", "--backend", "both", &p]);
    assert_eq!(o.status.code(), Some(2));
    let out = text(&o.stdout);
    assert_eq!(out.matches("parse error").count(), 1, "{out}");
    assert!(
        words(&o.stdout).contains("bad.gmem:2:1: parse error: expected an operation"),
        "{out}"
    );
    // JSON: one object per error, counted once for both backends.
    let o = gmem(&["check", "--backend", "both", "--json", &p]);
    assert_eq!(o.status.code(), Some(2));
    let v = json(&o);
    assert_eq!(v["summary"]["parse_errors"], 1);
    assert_eq!(v["summary"]["unparsed_files"], 1);
    let e = &v["scenarios"][0]["parse_errors"][0];
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(e["expected"], "an operation");
    assert_eq!(e["found"], "frob", "the token, without backticks");
    assert!(e["file"].as_str().unwrap().ends_with("bad.gmem"));
    assert!(e["hint"].as_str().unwrap().contains("create_guest_memfd"));
    assert_eq!(v["scenarios"][0]["results"].as_array().unwrap().len(), 0);
}

#[test]
fn an_empty_scenario_file_is_an_error() {
    let d = Dir::new("empty");
    let p = d.file("empty.gmem", "# nothing\n");
    let o = gmem(&["check", "--backend", "soft", &p]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        words(&o.stdout).contains("expected at least one operation"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn a_departures_file_that_does_not_exist_is_an_error() {
    let d = Dir::new("departures");
    let p = d.file("pass.gmem", PASSING);
    let missing = format!("{}/no-such-departures.toml", d.path());
    let o = gmem(&["check", "--backend", "soft", "--departures", &missing, &p]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("no-such-departures.toml"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn each_file_runs_once_through_symlink_loops_and_repeated_paths() {
    let d = Dir::new("loops");
    let p = d.file("a.gmem", PASSING);
    std::os::unix::fs::symlink(".", d.0.join("loop")).unwrap();
    std::os::unix::fs::symlink("a.gmem", d.0.join("b.gmem")).unwrap();
    let o = gmem(&[
        "check",
        "--backend",
        "soft",
        "--json",
        d.path(),
        &p,
        d.path(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(json(&o)["summary"]["files"], 1);
}

#[test]
fn a_path_that_does_not_exist_is_an_error() {
    let o = gmem(&["check", "--backend", "soft", "/no/such/scenario.gmem"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("no such file or folder"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn the_built_in_corpus_runs_from_any_folder() {
    // The test's own folder has no scenarios/: the corpus is in the binary.
    let d = Dir::new("anywhere");
    let o = gmem_in(&d.0, &["check", "--backend", "soft", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v = json(&o);
    assert!(
        v["summary"]["files"].as_u64().unwrap() > 40,
        "{}",
        v["summary"]
    );
    assert_eq!(v["summary"]["failed"], 0);
}

#[test]
fn check_json_has_the_schema_the_kernel_and_summary_counts() {
    let d = Dir::new("json");
    let a = d.file("a.gmem", PASSING);
    let b = d.file("b.gmem", "require vm_type:5\nvm = create_vm\n");
    let o = gmem(&["check", "--backend", "soft", "--json", &a, &b]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v = json(&o);
    assert_eq!(v["schema"], "gmem-check/2");
    assert!(v["kernel"]["release"].is_string() && v["kernel"]["kvm"].is_string());
    let s = &v["summary"];
    assert_eq!(
        (
            s["files"].as_u64(),
            s["passed"].as_u64(),
            s["skipped"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(s["failed"], 0);
    assert!(v["max_memory"].as_u64().unwrap() > 0);
}

#[test]
fn a_scenario_over_the_memory_budget_fails_with_over_budget() {
    let d = Dir::new("budget");
    let p = d.file(
        "terabyte.gmem",
        "vm = create_vm\ng = create_guest_memfd vm size=1T\nfallocate g mode=allocate offset=0 len=1T\n",
    );
    let o = gmem(&["check", "--backend", "soft", "--max-memory", "64M", &p]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(out.contains("actual:   over budget"), "{out}");
    assert!(
        words(&o.stdout).contains("memory budget of 64 MiB"),
        "{out}"
    );
    let o = gmem(&[
        "check",
        "--backend",
        "soft",
        "--max-memory",
        "64M",
        "--json",
        &p,
    ]);
    assert_eq!(json(&o)["summary"]["over_budget_lines"], 1);
}

#[test]
fn max_memory_help_states_the_default() {
    let o = gmem(&["check", "--help"]);
    let out = text(&o.stdout);
    assert!(out.contains("MemAvailable"), "{out}");
    let o = gmem(&["check", "--max-memory", "lots"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn check_rows_fit_100_columns() {
    let o = gmem(&["check", "--backend", "soft"]);
    assert!(o.status.success());
    assert_fits_100_columns(&text(&o.stdout), "gmem check");
}

#[test]
fn check_on_kvm_alone_without_kvm_is_an_error_that_says_so() {
    let d = Dir::new("kvm");
    let p = d.file("kvm.gmem", "vm = create_vm\n");
    let o = gmem(&["check", "--backend", "kvm", &p]);
    if Path::new("/dev/kvm").exists() {
        assert!(o.status.success(), "{}", text(&o.stderr));
        return;
    }
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("kvm backend not available: "), "{err}");
}

#[test]
fn caps_exits_zero_whether_or_not_kvm_works_and_names_the_kernel() {
    let o = gmem(&["caps"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("kvm backend not available") || out.contains("what it means for a VMM"),
        "{out}"
    );
    assert!(out.contains("kernel:"), "{out}");
}

#[test]
fn caps_json_is_keyed_by_capability_name() {
    let o = gmem(&["caps", "--backend", "soft", "--json"]);
    assert!(o.status.success());
    let v = json(&o);
    assert_eq!(v["backend"], "soft");
    assert_eq!(v["capabilities"]["guest_memfd"], 1);
    assert_eq!(v["capabilities"]["nr_memslots"], 32764);
    assert_eq!(v["vm_types"]["sw_protected"]["vm_type"], 1);
    assert_eq!(
        v["vm_types"]["sw_protected"]["capabilities"]["memory_attributes"],
        8
    );
    assert_eq!(v["set_memory_attributes"], "present");
    // The software backend is upstream: no probe shows a departure.
    assert_eq!(v["departures"]["FAULT-3"]["probe"], "not_shown");
    assert!(v["kernel"]["kvm"].is_string());
    assert!(v["meaning"]["guest_memfd"]
        .as_str()
        .unwrap()
        .starts_with("available"));
}

#[test]
fn caps_lines_fit_100_columns() {
    for backend in ["soft", "kvm"] {
        let o = gmem(&["caps", "--backend", backend]);
        assert_fits_100_columns(&text(&o.stdout), &format!("gmem caps --backend {backend}"));
    }
}

/// Reads at most the limit: a device is refused, not read until memory
/// runs out.
#[test]
fn check_refuses_a_device_as_a_scenario_and_as_a_departures_file() {
    let o = gmem(&["check", "--backend", "soft", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(2));
    let out = words(&o.stdout);
    assert!(
        out.contains("/dev/zero: cannot be read: a device, not a regular file"),
        "{out}"
    );

    let d = Dir::new("zero-departures");
    let p = d.file("pass.gmem", PASSING);
    let o = gmem(&[
        "check",
        "--backend",
        "soft",
        "--departures",
        "/dev/zero",
        &p,
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("--departures /dev/zero: a device, not a regular file"),
        "{err}"
    );
}

#[test]
fn a_missing_departures_file_names_the_path_and_the_errno() {
    let o = gmem(&["check", "--departures", "/no/such/departures.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("/no/such/departures.toml: No such file or directory (ENOENT)"),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
}

#[test]
fn check_with_a_profile_on_kvm_alone_is_refused() {
    let o = gmem(&["check", "--backend", "kvm", "--profile", "next"]);
    assert_eq!(o.status.code(), Some(2));
    let err = words(&o.stderr);
    assert!(
        err.contains("--profile next runs the software backend"),
        "{err}"
    );
}

#[test]
fn check_refuses_a_budget_no_scenario_can_run_in() {
    for budget in ["0", "4K"] {
        let o = gmem(&["check", "--backend", "soft", "--max-memory", budget]);
        assert_eq!(o.status.code(), Some(2), "{budget}");
        let err = words(&o.stderr);
        assert!(err.contains("give at least 1 MiB"), "{err}");
    }
}

#[test]
fn check_json_of_bad_input_is_a_json_error_object() {
    let o = gmem(&[
        "check",
        "--backend",
        "soft",
        "--json",
        "/no/such/scenario.gmem",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let v = json(&o);
    assert_eq!(v["schema"], "gmem-check/2");
    assert_eq!(v["error"]["kind"], "paths");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/no/such/scenario.gmem"));

    let o = gmem(&["check", "--json", "--max-memory", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(json(&o)["error"]["kind"], "arguments");
}

/// KVM-SETUP: a scenario that uses the KVM backend's reserved slot skips on
/// kvm, naming the rule and both reserved slots; it is no kernel failure.
#[test]
fn a_line_the_kvm_backend_cannot_run_skips_the_scenario_there() {
    // Without /dev/kvm the verdict is still tested on a model in gmem's
    // report tests.
    if skips::no_kvm() {
        return;
    }
    let d = Dir::new("kvm-setup");
    let p = d.file(
        "slot.gmem",
        "vm = create_vm\n\
         g = create_guest_memfd vm size=8K flags=mmap|init_shared\n\
         set_memory_region vm slot=32700 gpa=0x100000 size=8K flags=guest_memfd guest_memfd=g\n\
         guest_write vm gpa=0x100000 byte=0x55\n",
    );
    let o = gmem(&["check", "--backend", "kvm", &p]);
    assert!(o.status.success(), "{}", text(&o.stdout));
    let out = words(&o.stdout);
    assert!(out.contains("skip [1]"), "{out}");
    assert!(
        out.contains("the kvm backend cannot run line 3: slot 32700 is reserved"),
        "{out}"
    );
    assert!(
        out.contains("32701") && out.contains("(KVM-SETUP, EINVAL)"),
        "{out}"
    );
    assert!(!out.contains("Failures"), "{out}");
}

#[test]
fn failures_after_an_over_budget_line_say_they_may_follow_from_it() {
    let d = Dir::new("after-budget");
    let p = d.file(
        "after.gmem",
        "vm = create_vm\n\
         g = create_guest_memfd vm size=2M\n\
         fallocate g mode=allocate offset=0 len=1004K\n\
         g2 = create_guest_memfd vm size=4K\n\
         fallocate g2 mode=allocate offset=0 len=4K\n",
    );
    let args = ["check", "--backend", "soft", "--max-memory", "1M"];
    let o = gmem(&[&args[..], &[&p]].concat());
    assert_eq!(o.status.code(), Some(1));
    let out = words(&o.stdout);
    assert!(
        out.contains("may follow from line 4, which was not performed (over budget)"),
        "{out}"
    );
    let o = gmem(&[&args[..], &["--json", &p]].concat());
    let v = json(&o);
    let kinds: Vec<&str> = v["scenarios"][0]["results"][0]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["over_budget", "after_over_budget"]);
    assert_eq!(v["summary"]["after_over_budget_lines"], 1);
}

#[test]
fn the_summary_counts_files_that_do_not_parse_and_their_errors() {
    let d = Dir::new("two-errors");
    let p = d.file("bad.gmem", "frob\nfrob\n");
    let o = gmem(&["check", "--backend", "soft", "--json", &p]);
    assert_eq!(o.status.code(), Some(2));
    let s = &json(&o)["summary"];
    assert_eq!(
        (s["unparsed_files"].as_u64(), s["parse_errors"].as_u64()),
        (Some(1), Some(2))
    );
}

#[test]
fn a_host_write_over_the_limit_shows_the_length_as_written() {
    let d = Dir::new("len");
    let p = d.file(
        "len.gmem",
        "h = host_memory size=4G\nhost_write h offset=0 byte=1 len=2G\n",
    );
    let o = gmem(&["check", "--backend", "soft", &p]);
    assert_eq!(o.status.code(), Some(2));
    let out = words(&o.stdout);
    assert!(out.contains("found `2G`"), "{out}");
    assert!(!out.contains("2147483648"), "{out}");
}

#[test]
fn no_departures_block_when_nothing_departs() {
    let d = Dir::new("no-departures");
    let p = d.file("pass.gmem", PASSING);
    let o = gmem(&["check", &p]);
    assert!(o.status.success(), "{}", text(&o.stdout));
    assert!(
        !text(&o.stdout).contains("Departures"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn failures_under_a_long_path_fit_100_columns() {
    let d = Dir::new("long-path");
    let deep = d.0.join("a-folder-with-a-rather-long-name".repeat(3));
    std::fs::create_dir_all(&deep).unwrap();
    let p = deep.join("fail.gmem");
    std::fs::write(
        &p,
        "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_read g => ESPIPE\n",
    )
    .unwrap();
    let o = gmem(&["check", "--backend", "soft", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(out.contains("Failures:"), "{out}");
    assert_fits_100_columns(&out, "gmem check");
}

#[test]
fn caps_json_has_a_schema_and_identifier_keys() {
    let o = gmem(&["caps", "--backend", "soft", "--json"]);
    assert!(o.status.success());
    let v = json(&o);
    assert_eq!(v["schema"], "gmem-caps/1");
    for (k, text) in v["meaning"].as_object().unwrap() {
        assert!(!k.contains(' '), "{k}");
        assert!(!text.as_str().unwrap().contains("above"), "{k}: {text}");
    }
    assert!(v["meaning"]["guest_conversion_requests"].is_string());
}

#[test]
fn fuzz_summary_lines_fit_100_columns() {
    let d = Dir::new("fuzz");
    let o = gmem(&[
        "fuzz",
        "--backend",
        "soft",
        "--runs",
        "20",
        "--seed",
        "1",
        "--out",
        d.path(),
    ]);
    assert_fits_100_columns(&text(&o.stdout), "gmem fuzz");
    assert!(text(&o.stdout).contains("operations reached"));
}

#[test]
fn bench_help_says_quick_does_not_judge() {
    let o = gmem(&["bench", "--help"]);
    let out = words(&o.stdout);
    assert!(out.contains("not judged against the targets"), "{out}");
}

#[test]
fn every_help_fits_100_columns() {
    for cmd in ["check", "run", "map", "caps", "bench", "fuzz"] {
        let o = gmem(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd}");
        assert_fits_100_columns(&text(&o.stdout), &format!("gmem {cmd} --help"));
    }
}
