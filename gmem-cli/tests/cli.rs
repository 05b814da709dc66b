//! The `gmem` binary: exit codes and what it says.

use std::io::Write;
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

fn scenario(name: &str, body: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gmem-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn check_of_a_passing_file_exits_zero_and_prints_the_table() {
    let p = scenario(
        "pass.gmem",
        "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_read g => EINVAL\n",
    );
    let o = gmem(&["check", "--backend", "soft", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("pass"));
}

#[test]
fn check_of_a_failing_file_exits_one_with_line_expected_and_actual() {
    let p = scenario(
        "fail.gmem",
        "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_read g => ESPIPE\n",
    );
    let o = gmem(&["check", "--backend", "soft", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(out.contains("fail.gmem:3"), "{out}");
    assert!(
        out.contains("expected: ESPIPE") && out.contains("actual:   EINVAL"),
        "{out}"
    );
}

#[test]
fn check_of_a_file_that_does_not_parse_names_line_and_column() {
    let p = scenario("bad.gmem", "vm = create_vm\nfrob vm\n");
    let o = gmem(&["check", "--backend", "soft", "--json", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let detail = v["scenarios"][0]["results"][0]["problems"][0]["detail"]
        .as_str()
        .unwrap();
    assert!(
        detail.contains("bad.gmem:2:1: expected an operation"),
        "{detail}"
    );
}

#[test]
fn check_on_kvm_alone_without_kvm_is_an_error_that_says_so() {
    let p = scenario("kvm.gmem", "vm = create_vm\n");
    let o = gmem(&["check", "--backend", "kvm", p.to_str().unwrap()]);
    let err = text(&o.stderr);
    if o.status.success() {
        let _ = writeln!(
            std::io::stderr(),
            "kvm backend available: not-available path skipped"
        );
        return;
    }
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("kvm backend not available: "), "{err}");
}

#[test]
fn caps_exits_zero_whether_or_not_kvm_works() {
    let o = gmem(&["caps"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("kvm backend not available") || out.contains("what it means for a VMM"),
        "{out}"
    );
}

#[test]
fn caps_of_the_soft_backend_as_json() {
    let o = gmem(&["caps", "--backend", "soft", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backend"], "soft");
    assert_eq!(v["vm_types"][1]["name"], "sw_protected");
    assert_eq!(v["set_memory_attributes"], "present");
}
