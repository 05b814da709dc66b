//! One summary per test binary of what was skipped and why, and of the
//! tests that depart from upstream on this kernel, printed once when the
//! binary exits instead of a line per test.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::Write;
use std::sync::{Mutex, Once};

/// Reason → the tests skipped for it.
static SKIPPED: Mutex<BTreeMap<String, Vec<String>>> = Mutex::new(BTreeMap::new());
/// Behaviours → the tests that depart by them.
static DEPARTED: Mutex<BTreeMap<String, Vec<String>>> = Mutex::new(BTreeMap::new());
static AT_EXIT: Once = Once::new();

fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

fn record(map: &Mutex<BTreeMap<String, Vec<String>>>, key: String) {
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" function with no arguments;
        // it runs once, at process exit, after the test harness is done.
        unsafe { libc::atexit(print_summary) };
    });
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(key).or_default().push(test_name());
}

/// Records that the running test skipped, and why.
pub fn skip(reason: impl Display) {
    record(&SKIPPED, reason.to_string());
}

/// Records that the running test departs from upstream by `behaviours`
/// (its failure is the kernel's, as the probes show).
#[allow(dead_code)]
pub fn departs(behaviours: impl Display) {
    record(&DEPARTED, behaviours.to_string());
}

/// Skips (recording why) when `/dev/kvm` does not exist: true if skipped.
#[allow(dead_code)]
pub fn no_kvm() -> bool {
    let missing = !std::path::Path::new("/dev/kvm").exists();
    if missing {
        skip("/dev/kvm does not exist");
    }
    missing
}

extern "C" fn print_summary() {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => s,
        })
        .unwrap_or_default();
    let mut out = String::new();
    let summarise = |out: &mut String, map: &Mutex<BTreeMap<String, Vec<String>>>, what: &str| {
        let m = map.lock().unwrap_or_else(|e| e.into_inner());
        let n: usize = m.values().map(Vec::len).sum();
        if n == 0 {
            return;
        }
        out.push_str(&format!(
            "{binary}: {n} {} {what}:\n",
            if n == 1 { "test" } else { "tests" }
        ));
        for (reason, tests) in m.iter() {
            out.push_str(&format!("  {:>4}  {reason}\n", tests.len()));
        }
    };
    summarise(&mut out, &SKIPPED, "skipped");
    summarise(
        &mut out,
        &DEPARTED,
        "depart from upstream, by behaviours this kernel's probes show",
    );
    let _ = std::io::stderr().write_all(out.as_bytes());
}
