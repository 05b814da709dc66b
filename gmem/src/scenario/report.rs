//! Conformance reports: scenarios run on one or two backends, departures
//! applied, disagreements between backends, and the text table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ast::Outcome;
use super::departures::{Departure, Departures};
use super::parse::parse;
use super::run::{run, LineResult, ScenarioRun};
use crate::hypervisor::Hypervisor;

/// The verdict of one scenario on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// Every line had its expected outcome.
    Pass,
    /// At least one line did not (or a recorded departure is stale).
    Fail,
    /// Not run: a requirement was not met, or the backend is not available.
    Skip(String),
    /// Every line that differed matches a departure recorded for this
    /// kernel; the explanations.
    Departs(Vec<String>),
}

impl Verdict {
    /// The table cell: `pass`, `fail`, `skip: reason`, `departs: explanation`.
    pub fn cell(&self) -> String {
        match self {
            Verdict::Pass => "pass".into(),
            Verdict::Fail => "FAIL".into(),
            Verdict::Skip(r) => format!("skip: {r}"),
            Verdict::Departs(e) => format!("departs: {}", e.join("; ")),
        }
    }
}

/// What kind of problem a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The outcome differs from the expectation.
    Mismatch,
    /// A departure is recorded for this kernel but the line now behaves as
    /// upstream (or no longer exists): the record must go.
    StaleDeparture,
    /// The file does not parse.
    Parse,
}

/// One failing line (or file) of a scenario on a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What went wrong.
    pub kind: ProblemKind,
    /// Line number (0 for the whole file).
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// Expected outcome.
    pub expected: String,
    /// Actual outcome.
    pub actual: String,
    /// The backend's message, or the parse error.
    pub detail: Option<String>,
}

/// A line whose difference a recorded departure explains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DepartureSeen {
    /// Line number.
    pub line: usize,
    /// Expected (upstream) outcome.
    pub expected: String,
    /// What this kernel did.
    pub actual: String,
    /// The recorded explanation.
    pub explanation: String,
}

/// One scenario on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendResult {
    /// `soft` or `kvm`.
    pub backend: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Lines that failed.
    pub problems: Vec<Problem>,
    /// Lines that depart from upstream, as recorded.
    pub departures: Vec<DepartureSeen>,
    /// Every line's outcome (empty when skipped).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LineResult>,
}

/// A line whose outcome differs between two backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    /// Line number.
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// (backend, outcome) for each backend.
    pub outcomes: Vec<(String, String)>,
    /// The recorded departure that explains it, if any.
    pub explained_by: Option<String>,
}

/// One scenario file on every backend asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScenarioReport {
    /// Path relative to the corpus folder (the key departures use).
    pub scenario: String,
    /// One result per backend, in the order asked.
    pub results: Vec<BackendResult>,
    /// Lines where the backends disagree (only when two ran).
    pub disagreements: Vec<Disagreement>,
}

impl ScenarioReport {
    /// Did anything fail? A disagreement between backends on a line whose
    /// expectation both meet (a capability's value, say) is shown, not failed.
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| r.verdict == Verdict::Fail)
    }
}

/// A backend to check against: opened, or why it could not be.
pub struct BackendSlot<'a> {
    /// `soft` or `kvm`.
    pub name: String,
    /// The open backend, or the reason it is not available.
    pub hv: Result<&'a dyn Hypervisor, String>,
}

/// Runs scenario files on backends and applies recorded departures.
pub struct Checker<'a> {
    /// The backends, in report order.
    pub backends: Vec<BackendSlot<'a>>,
    /// Departures recorded in the corpus.
    pub departures: Departures,
    /// The running kernel's release (departures are looked up under it).
    pub release: String,
    /// The corpus folder: scenario keys are paths relative to it.
    pub corpus: Option<PathBuf>,
}

/// All scenarios of one `gmem check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The running kernel's release.
    pub kernel_release: String,
    /// Backends by name with their availability (`None` when available).
    pub backends: Vec<(String, Option<String>)>,
    /// One entry per scenario file.
    pub scenarios: Vec<ScenarioReport>,
}

impl CheckReport {
    /// Did anything fail?
    pub fn failed(&self) -> bool {
        self.scenarios.iter().any(ScenarioReport::failed)
    }
}

/// Every `.gmem` file under `path` (or `path` itself), sorted.
pub fn collect_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            if e.is_dir() {
                out.extend(collect_files(&e)?);
            } else if e.extension().is_some_and(|x| x == "gmem") {
                out.push(e);
            }
        }
    } else {
        // Make a missing file an error here rather than a confusing parse.
        std::fs::metadata(path)?;
        out.push(path.to_path_buf());
    }
    Ok(out)
}

impl Checker<'_> {
    /// The key of `path` for departures: relative to the corpus, `/`-separated.
    pub fn key(&self, path: &Path) -> String {
        let rel = self.corpus.as_ref().and_then(|c| {
            let c = c.canonicalize().ok()?;
            let p = path.canonicalize().ok()?;
            p.strip_prefix(&c).ok().map(Path::to_path_buf)
        });
        match rel {
            Some(p) => p
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.display().to_string(),
        }
    }

    /// Reads, parses and runs one file on every backend.
    pub fn check_file(&self, path: &Path) -> ScenarioReport {
        let key = self.key(path);
        match std::fs::read_to_string(path) {
            Ok(text) => self.check_text(&key, &path.display().to_string(), &text),
            Err(e) => self.all_fail(&key, format!("cannot read {}: {e}", path.display())),
        }
    }

    fn all_fail(&self, key: &str, why: String) -> ScenarioReport {
        let results = self
            .backends
            .iter()
            .map(|b| BackendResult {
                backend: b.name.clone(),
                verdict: Verdict::Fail,
                problems: vec![Problem {
                    kind: ProblemKind::Parse,
                    line: 0,
                    text: String::new(),
                    expected: "a valid scenario".into(),
                    actual: "an invalid one".into(),
                    detail: Some(why.clone()),
                }],
                departures: vec![],
                lines: vec![],
            })
            .collect();
        ScenarioReport {
            scenario: key.to_string(),
            results,
            disagreements: vec![],
        }
    }

    /// Parses and runs scenario text; `key` names it for departures, `shown`
    /// in parse errors.
    pub fn check_text(&self, key: &str, shown: &str, text: &str) -> ScenarioReport {
        let sc = match parse(shown, text) {
            Ok(sc) => sc,
            Err(e) => return self.all_fail(key, e.to_string()),
        };
        let mut runs: Vec<Option<ScenarioRun>> = Vec::new();
        let mut results = Vec::new();
        for b in &self.backends {
            let (result, r) = match &b.hv {
                Err(_) => (
                    BackendResult {
                        backend: b.name.clone(),
                        verdict: Verdict::Skip(format!("{} backend not available", b.name)),
                        problems: vec![],
                        departures: vec![],
                        lines: vec![],
                    },
                    None,
                ),
                Ok(hv) => {
                    let r = run(*hv, &sc);
                    let deps = if hv.name() == "kvm" {
                        self.departures.for_scenario(&self.release, key)
                    } else {
                        Vec::new()
                    };
                    (judge(&b.name, &r, &deps), Some(r))
                }
            };
            results.push(result);
            runs.push(r);
        }
        let disagreements = compare(&results, &runs);
        ScenarioReport {
            scenario: key.to_string(),
            results,
            disagreements,
        }
    }

    /// Checks every file, calling `progress(done, total, key)` before each.
    pub fn check_files(
        &self,
        files: &[PathBuf],
        mut progress: impl FnMut(usize, usize, &str),
    ) -> CheckReport {
        let scenarios = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                progress(i, files.len(), &self.key(f));
                self.check_file(f)
            })
            .collect();
        CheckReport {
            kernel_release: self.release.clone(),
            backends: self
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.hv.as_ref().err().cloned()))
                .collect(),
            scenarios,
        }
    }
}

/// Applies departures to one run and gives its verdict.
pub fn judge(backend: &str, r: &ScenarioRun, deps: &[&Departure]) -> BackendResult {
    if let Some(why) = &r.skipped {
        return BackendResult {
            backend: backend.to_string(),
            verdict: Verdict::Skip(why.clone()),
            problems: vec![],
            departures: vec![],
            lines: vec![],
        };
    }
    let mut problems = Vec::new();
    let mut departures = Vec::new();
    for l in &r.lines {
        let dep = deps.iter().find(|d| d.line == l.line);
        let problem = |kind, detail: Option<String>| Problem {
            kind,
            line: l.line,
            text: l.text.clone(),
            expected: l.expected.to_string(),
            actual: l.actual_text(),
            detail,
        };
        match (l.passed, dep) {
            (true, None) => {}
            (true, Some(d)) => problems.push(problem(
                ProblemKind::StaleDeparture,
                Some(format!(
                    "a departure is recorded for this kernel (observed `{}`: {}) but the line now has its upstream outcome; remove the record",
                    d.observed, d.explanation
                )),
            )),
            (false, Some(d))
                if l
                    .actual
                    .as_ref()
                    .zip(d.observed_outcome())
                    .is_some_and(|(a, o)| o.accepts(a)) =>
            {
                departures.push(DepartureSeen {
                    line: l.line,
                    expected: l.expected.to_string(),
                    actual: l.actual_text(),
                    explanation: d.explanation.clone(),
                })
            }
            (false, Some(d)) => problems.push(problem(
                ProblemKind::Mismatch,
                Some(format!(
                    "{}; the departure recorded for this kernel (observed `{}`) does not match either",
                    l.detail.clone().unwrap_or_default(),
                    d.observed
                )),
            )),
            (false, None) => problems.push(problem(ProblemKind::Mismatch, l.detail.clone())),
        }
    }
    for d in deps {
        if !r.lines.iter().any(|l| l.line == d.line) {
            problems.push(Problem {
                kind: ProblemKind::StaleDeparture,
                line: d.line,
                text: String::new(),
                expected: "an operation line".into(),
                actual: "no operation on that line".into(),
                detail: Some(format!(
                    "a departure is recorded for line {} (observed `{}`) but that line is not an operation; update the record",
                    d.line, d.observed
                )),
            });
        }
    }
    let verdict = if !problems.is_empty() {
        Verdict::Fail
    } else if !departures.is_empty() {
        let mut ex: Vec<String> = Vec::new();
        for d in &departures {
            if !ex.contains(&d.explanation) {
                ex.push(d.explanation.clone());
            }
        }
        Verdict::Departs(ex)
    } else {
        Verdict::Pass
    };
    BackendResult {
        backend: backend.to_string(),
        verdict,
        problems,
        departures,
        lines: r.lines.clone(),
    }
}

/// The outcome as compared across backends: a stat's block count depends
/// on the backend's memory accounting unless the scenario names it.
fn comparable(l: &LineResult) -> Option<Outcome> {
    match (l.actual, l.expected) {
        (
            Some(Outcome::Stat {
                size,
                blksize,
                blocks,
                mode,
            }),
            Outcome::Stat { blocks: eb, .. },
        ) => Some(Outcome::Stat {
            size,
            blksize,
            blocks: eb.and(blocks),
            mode,
        }),
        (
            Some(Outcome::Stat {
                size,
                blksize,
                mode,
                ..
            }),
            _,
        ) => Some(Outcome::Stat {
            size,
            blksize,
            blocks: None,
            mode,
        }),
        (a, _) => a,
    }
}

fn compare(results: &[BackendResult], runs: &[Option<ScenarioRun>]) -> Vec<Disagreement> {
    let ran: Vec<(usize, &ScenarioRun)> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().filter(|r| r.skipped.is_none()).map(|r| (i, r)))
        .collect();
    let [(ia, a), (ib, b)] = ran.as_slice() else {
        return Vec::new();
    };
    a.lines
        .iter()
        .zip(&b.lines)
        .filter(|(x, y)| comparable(x) != comparable(y))
        .map(|(x, y)| {
            let explained_by = [&results[*ia], &results[*ib]]
                .iter()
                .flat_map(|r| r.departures.iter())
                .find(|d| d.line == x.line)
                .map(|d| d.explanation.clone());
            Disagreement {
                line: x.line,
                text: x.text.clone(),
                outcomes: vec![
                    (results[*ia].backend.clone(), x.actual_text()),
                    (results[*ib].backend.clone(), y.actual_text()),
                ],
                explained_by,
            }
        })
        .collect()
}

/// The report as text: one table row per scenario, then every problem,
/// departure and disagreement, then a summary line.
pub fn render(report: &CheckReport) -> String {
    let mut out = String::new();
    for (name, why) in &report.backends {
        if let Some(why) = why {
            let _ = writeln!(out, "{name} backend not available: {why}");
        }
    }
    let names: Vec<&str> = report.backends.iter().map(|(n, _)| n.as_str()).collect();
    let w0 = report
        .scenarios
        .iter()
        .map(|s| s.scenario.len())
        .chain([8])
        .max()
        .unwrap_or(8);
    let _ = write!(out, "{:<w0$}", "scenario");
    for n in &names {
        let _ = write!(out, "  {n:<10}");
    }
    out.push('\n');
    for s in &report.scenarios {
        let _ = write!(out, "{:<w0$}", s.scenario);
        for r in &s.results {
            let _ = write!(out, "  {:<10}", r.verdict.cell());
        }
        if s.disagreements.iter().any(|d| d.explained_by.is_none()) {
            out.push_str("  (backends disagree)");
        }
        out.push('\n');
    }
    let mut wrote_header = false;
    for s in &report.scenarios {
        for r in &s.results {
            for p in &r.problems {
                if !wrote_header {
                    out.push_str("\nFailures:\n");
                    wrote_header = true;
                }
                let kind = match p.kind {
                    ProblemKind::Mismatch => "",
                    ProblemKind::StaleDeparture => " stale departure:",
                    ProblemKind::Parse => " parse error:",
                };
                let _ = writeln!(
                    out,
                    "  [{}] {}:{}:{kind} {}",
                    r.backend, s.scenario, p.line, p.text
                );
                if p.kind != ProblemKind::Parse {
                    let _ = writeln!(
                        out,
                        "      expected: {}\n      actual:   {}",
                        p.expected, p.actual
                    );
                }
                if let Some(d) = &p.detail {
                    for l in d.lines() {
                        let _ = writeln!(out, "      {l}");
                    }
                }
            }
        }
    }
    let mut wrote_header = false;
    for s in &report.scenarios {
        for r in &s.results {
            for d in &r.departures {
                if !wrote_header {
                    out.push_str("\nDepartures from upstream (recorded for this kernel):\n");
                    wrote_header = true;
                }
                let _ = writeln!(
                    out,
                    "  [{}] {}:{}: upstream {}, this kernel {}\n      {}",
                    r.backend, s.scenario, d.line, d.expected, d.actual, d.explanation
                );
            }
        }
    }
    let mut wrote_header = false;
    for s in &report.scenarios {
        for d in &s.disagreements {
            if !wrote_header {
                out.push_str("\nDisagreements between backends:\n");
                wrote_header = true;
            }
            let outs: Vec<String> = d
                .outcomes
                .iter()
                .map(|(b, o)| format!("{b}: {o}"))
                .collect();
            let _ = writeln!(
                out,
                "  {}:{}: {}\n      {}",
                s.scenario,
                d.line,
                d.text,
                outs.join(", ")
            );
            if let Some(e) = &d.explained_by {
                let _ = writeln!(out, "      departs from upstream (recorded): {e}");
            }
        }
    }
    let (mut pass, mut fail, mut skip, mut departs) = (0, 0, 0, 0);
    for s in &report.scenarios {
        for r in &s.results {
            match r.verdict {
                Verdict::Pass => pass += 1,
                Verdict::Fail => fail += 1,
                Verdict::Skip(_) => skip += 1,
                Verdict::Departs(_) => departs += 1,
            }
        }
    }
    let _ = writeln!(
        out,
        "\nscenario runs: {pass} passed, {fail} failed, {skip} skipped, {departs} depart from upstream"
    );
    out
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};

    use super::*;
    use crate::error::Result;
    use crate::hypervisor::{HostMemory, Vm};
    use crate::Backend;

    /// The software backend under the name `kvm`, so that departures apply.
    struct NamedKvm(Box<dyn Hypervisor>);

    impl AsRawFd for NamedKvm {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl Hypervisor for NamedKvm {
        fn name(&self) -> &'static str {
            "kvm"
        }
        fn check_extension(&self, cap: u32) -> i64 {
            self.0.check_extension(cap)
        }
        fn create_vm(&self, vm_type: u64) -> Result<Box<dyn Vm>> {
            self.0.create_vm(vm_type)
        }
        fn host_memory(&self, size: u64) -> Result<Box<dyn HostMemory>> {
            self.0.host_memory(size)
        }
    }

    const TEXT: &str = "vm = create_vm\nguest_read vm gpa=0x1000 => 0x01\nguest_read vm gpa=0x2000 => exit mmio gpa=0x2000 read\n";

    fn check(departures: &str) -> ScenarioReport {
        let soft = Backend::Soft.open().unwrap();
        let kvm = NamedKvm(Backend::Soft.open().unwrap());
        let checker = Checker {
            backends: vec![
                BackendSlot {
                    name: "soft".into(),
                    hv: Ok(soft.as_ref()),
                },
                BackendSlot {
                    name: "kvm".into(),
                    hv: Ok(&kvm),
                },
            ],
            departures: Departures::parse(departures).unwrap(),
            release: "6.18.44-test".into(),
            corpus: None,
        };
        checker.check_text("t.gmem", "t.gmem", TEXT)
    }

    fn departure(line: usize, observed: &str) -> String {
        format!("[[\"6.18.44-test\"]]\nscenario = \"t.gmem\"\nline = {line}\nobserved = \"{observed}\"\nexplanation = \"because\"\n")
    }

    #[test]
    fn a_recorded_departure_turns_a_kvm_failure_into_departs() {
        let r = check(&departure(2, "exit mmio gpa=0x1000 read"));
        assert_eq!(
            r.results[0].verdict,
            Verdict::Fail,
            "soft ignores departures"
        );
        assert_eq!(
            r.results[1].verdict,
            Verdict::Departs(vec!["because".into()])
        );
        assert_eq!(
            r.results[1].departures[0].actual,
            "exit mmio gpa=0x1000 read"
        );
    }

    #[test]
    fn a_departure_for_another_release_does_not_apply() {
        let d = departure(2, "exit mmio gpa=0x1000 read").replace("6.18.44-test", "6.1.0");
        let r = check(&d);
        assert_eq!(r.results[1].verdict, Verdict::Fail);
    }

    #[test]
    fn a_departure_that_no_longer_happens_is_a_stale_failure() {
        let r = check(&(departure(2, "exit mmio gpa=0x1000 read") + &departure(3, "0x00")));
        assert_eq!(r.results[1].verdict, Verdict::Fail);
        let p = &r.results[1].problems;
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].kind, p[0].line), (ProblemKind::StaleDeparture, 3));
    }

    #[test]
    fn a_departure_on_a_line_without_an_operation_is_stale() {
        let r = check(&(departure(2, "exit mmio gpa=0x1000 read") + &departure(9, "ok")));
        let p = &r.results[1].problems;
        assert_eq!((p[0].kind, p[0].line), (ProblemKind::StaleDeparture, 9));
    }

    #[test]
    fn a_different_outcome_than_recorded_still_fails() {
        let r = check(&departure(2, "EFAULT"));
        assert_eq!(r.results[1].verdict, Verdict::Fail);
        assert_eq!(r.results[1].problems[0].kind, ProblemKind::Mismatch);
    }

    #[test]
    fn backends_that_agree_have_no_disagreements() {
        let r = check("");
        assert!(r.disagreements.is_empty());
        assert!(render(&CheckReport {
            kernel_release: "r".into(),
            backends: vec![("soft".into(), None), ("kvm".into(), None)],
            scenarios: vec![r],
        })
        .contains("expected: 0x01"));
    }

    #[test]
    fn disagreements_are_reported_and_explained_by_departures() {
        let line = |actual: Outcome| LineResult {
            line: 2,
            text: "guest_read vm gpa=0x1000 => 0x01".into(),
            expected: Outcome::Value {
                value: 1,
                hex: true,
            },
            actual: Some(actual),
            detail: None,
            passed: false,
        };
        let soft = ScenarioRun {
            skipped: None,
            lines: vec![line(Outcome::Value {
                value: 1,
                hex: true,
            })],
        };
        let kvm = ScenarioRun {
            skipped: None,
            lines: vec![line(Outcome::Value {
                value: 0,
                hex: true,
            })],
        };
        let d = Departure {
            scenario: "t".into(),
            line: 2,
            observed: "0x00".into(),
            explanation: "reads userspace_addr".into(),
        };
        let results = vec![judge("soft", &soft, &[]), judge("kvm", &kvm, &[&d])];
        let dis = compare(&results, &[Some(soft), Some(kvm)]);
        assert_eq!(dis.len(), 1);
        assert_eq!(dis[0].outcomes[1], ("kvm".to_string(), "0x00".to_string()));
        assert_eq!(dis[0].explained_by.as_deref(), Some("reads userspace_addr"));
    }

    #[test]
    fn a_skipped_backend_is_not_compared() {
        let soft = ScenarioRun {
            skipped: None,
            lines: vec![],
        };
        let kvm = ScenarioRun {
            skipped: Some("requires x".into()),
            lines: vec![],
        };
        let results = vec![judge("soft", &soft, &[]), judge("kvm", &kvm, &[])];
        assert_eq!(results[1].verdict, Verdict::Skip("requires x".into()));
        assert!(compare(&results, &[Some(soft), Some(kvm)]).is_empty());
    }
}
