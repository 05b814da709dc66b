//! Conformance reports: scenarios run on one or two backends, departures
//! recognised by behaviour, a running kernel's release-dependent lines held
//! to one release, disagreements between backends, the text table and the
//! JSON object (schema: docs/conformance.md).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::budget::{Bytes, Limits};
use super::departures::{same_outcome, Departures, Explainer, KernelId, Probes};
use super::parse::{parse, shorten, ParseError, MAX_SCENARIO_BYTES};
use super::probe::{consensus, describe};
use super::run::{run_limited, LineResult, ScenarioRun};
use super::{Outcome, Scenario};
use crate::hypervisor::Hypervisor;
use crate::Release;

/// The `schema` field of the JSON report.
pub const SCHEMA: &str = "gmem-check/2";

/// Output rows fit this many columns.
const WIDTH: usize = 100;

/// The verdict of one scenario on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// Every line had its expected outcome.
    Pass,
    /// At least one line did not, and no shown behaviour accounts for it.
    Fail,
    /// Not run: a requirement was not met, or the backend is not available.
    Skip(String),
    /// Every line that differed is accounted for by behaviours this
    /// kernel's probes show; their ids.
    Departs(Vec<String>),
}

/// What kind of problem a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The outcome differs from the expectation (or the line did not run).
    Mismatch,
    /// The runner did not perform the operation: over the memory budget.
    OverBudget,
    /// A line after an over-budget line that did not have its outcome: it
    /// may only follow from the operation not performed.
    AfterOverBudget,
    /// On a running kernel, an outcome of a release the other
    /// release-dependent lines of the check do not agree on: a kernel
    /// follows one release.
    Release,
}

/// One failing line of a scenario on a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What went wrong.
    pub kind: ProblemKind,
    /// Line number.
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// Expected outcome.
    pub expected: String,
    /// Actual outcome.
    pub actual: String,
    /// The backend's message, or why the line did not run.
    pub detail: Option<String>,
}

/// A line whose difference behaviours of this kernel account for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DepartureSeen {
    /// Line number.
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// Upstream's outcome (the expectation).
    pub upstream: String,
    /// What this kernel did.
    pub actual: String,
    /// The behaviours, by id.
    pub behaviours: Vec<String>,
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
    /// Lines that depart from upstream.
    pub departures: Vec<DepartureSeen>,
    /// The most memory the run could hold at once (bytes, by the budget).
    pub max_held: u64,
    /// Every line's outcome (empty when skipped).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LineResult>,
    /// On a backend whose release is measured (a running kernel), the
    /// release-dependent lines that passed, for [`hold_to_one_release`].
    #[serde(skip)]
    release_lines: Vec<ReleaseLine>,
}

/// A release-dependent line (`=> EINVAL | 7.2: EEXIST`) that passed on a
/// running kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReleaseLine {
    /// Its index in [`BackendResult::lines`].
    index: usize,
    /// The releases whose outcome it had.
    releases: Vec<Release>,
    /// Its expected outcome on each release of [`Release::ALL`].
    expected: Vec<Outcome>,
}

/// A line on which two backends both meet the expectation with different
/// outcomes (a capability's value, say). Lines that fail or depart on
/// either backend are reported there, not here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    /// Line number.
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// (backend, outcome) for each backend.
    pub outcomes: Vec<(String, String)>,
}

/// One scenario file on every backend asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScenarioReport {
    /// The file: relative to the corpus for the corpus, else as given.
    pub scenario: String,
    /// Why the file could not be run, one object per error: it did not
    /// parse, or could not be read. Then `results` is empty.
    pub parse_errors: Vec<ParseError>,
    /// One result per backend, in the order asked.
    pub results: Vec<BackendResult>,
    /// Lines where two backends both pass with different outcomes.
    pub disagreements: Vec<Disagreement>,
}

impl ScenarioReport {
    /// Did anything fail (or not parse)?
    pub fn failed(&self) -> bool {
        !self.parse_errors.is_empty() || self.results.iter().any(|r| r.verdict == Verdict::Fail)
    }
}

/// A backend to check against: opened, or why it could not be.
pub struct BackendSlot<'a> {
    /// `soft` or `kvm`.
    pub name: String,
    /// The open backend, or the reason it is not available.
    pub hv: Result<&'a dyn Hypervisor, String>,
}

/// One backend of a check, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendInfo {
    /// `soft` or `kvm`.
    pub name: String,
    /// Why it is not available, if it is not.
    pub unavailable: Option<String>,
    /// The probes of every known behaviour on it (absent when unavailable).
    pub probes: Option<Probes>,
}

/// A behaviour recorded for the running kernel whose probe does not show
/// it: the record is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stale {
    /// The backend probed.
    pub backend: String,
    /// The behaviour.
    pub id: String,
    /// What the probe showed instead.
    pub probe: String,
}

/// Counts for the summary line and the JSON report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Scenario files.
    pub files: usize,
    /// Files that did not parse or could not be read.
    pub unparsed_files: usize,
    /// The parse errors of those files, each counted (a file that could
    /// not be read counts one).
    pub parse_errors: usize,
    /// Scenario runs (file × backend) that passed.
    pub passed: usize,
    /// Runs that failed.
    pub failed: usize,
    /// Runs skipped (a requirement not met, a backend not available).
    pub skipped: usize,
    /// Runs whose every difference is a departure this kernel's probes show.
    pub departed: usize,
    /// Lines not performed because of the memory budget.
    pub over_budget_lines: usize,
    /// Failing lines after an over-budget line of their run, which may only
    /// follow from it.
    pub after_over_budget_lines: usize,
    /// Stale records of behaviours.
    pub stale: usize,
}

/// All scenarios of one `gmem check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// The running kernel.
    pub kernel: KernelId,
    /// The memory budget of each scenario run (bytes).
    pub max_memory: u64,
    /// The backends, with their probes.
    pub backends: Vec<BackendInfo>,
    /// The behaviours known (`departures.toml`).
    pub behaviours: Vec<super::departures::Behaviour>,
    /// One entry per scenario file.
    pub scenarios: Vec<ScenarioReport>,
    /// Recorded behaviours whose probes no longer show them.
    pub stale: Vec<Stale>,
    /// The counts.
    pub summary: Summary,
}

impl CheckReport {
    /// Did anything fail (a scenario, a parse, a stale record)?
    pub fn failed(&self) -> bool {
        self.scenarios.iter().any(ScenarioReport::failed) || !self.stale.is_empty()
    }

    /// Did some file not parse or not read (an input error)?
    pub fn input_error(&self) -> bool {
        self.summary.unparsed_files > 0
    }
}

/// Every `.gmem` file under `path` (or `path` itself), sorted, each once
/// (see [`collect_paths`]).
pub fn collect_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    collect_paths(&[path.to_path_buf()])
}

/// Every `.gmem` file under each of `paths` (a file or a folder), sorted
/// per folder, each file once: paths are compared canonically, and a
/// folder reached twice (a symlink loop) is walked once.
pub fn collect_paths(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen_files = BTreeSet::new();
    let mut seen_dirs = BTreeSet::new();
    for p in paths {
        walk(p, &mut out, &mut seen_files, &mut seen_dirs)?;
    }
    Ok(out)
}

fn walk(
    path: &Path,
    out: &mut Vec<PathBuf>,
    files: &mut BTreeSet<PathBuf>,
    dirs: &mut BTreeSet<PathBuf>,
) -> std::io::Result<()> {
    // The error names the path it is about, with the errno's name.
    let about = |e: std::io::Error| std::io::Error::new(e.kind(), os_error(path, &e));
    let canonical = path.canonicalize().map_err(about)?;
    if canonical.is_dir() {
        if !dirs.insert(canonical.clone()) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(about)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(about)?;
        entries.sort();
        for e in entries {
            let is_dir = e.is_dir();
            if is_dir || e.extension().is_some_and(|x| x == "gmem") {
                // A dangling symlink in a folder is not the user's request.
                if !is_dir && !e.exists() {
                    continue;
                }
                walk(&e, out, files, dirs)?;
            }
        }
    } else if files.insert(canonical) {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// A scenario to check: its name in the report and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The name shown (a path, or a corpus-relative name).
    pub name: String,
    /// The text, or why it could not be read.
    pub text: Result<String, String>,
}

impl Source {
    /// Reads `path`, refusing what is not a regular file or is larger than a
    /// scenario may be ([`read_text`]).
    pub fn read(path: &Path, name: String) -> Source {
        let text = read_text(path, MAX_SCENARIO_BYTES as u64, "a scenario");
        Source { name, text }
    }
}

/// An OS error about `path` as people read it: the path, the system's
/// words and the errno name, `x.gmem: No such file or directory (ENOENT)`.
pub fn os_error(path: &Path, e: &std::io::Error) -> String {
    format!("{}: {}", path.display(), os_words(e))
}

/// The system's words for `e` and its errno name: `No such file or
/// directory (ENOENT)`, not Rust's `(os error 2)`.
pub fn os_words(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let words = e.to_string();
            let words = words
                .strip_suffix(&format!(" (os error {n})"))
                .unwrap_or(&words);
            let name = crate::error::errno_name(crate::error::Errno::from_raw(n));
            format!("{words} ({name})")
        }
        None => e.to_string(),
    }
}

/// The text of `path`, which must be a regular file of at most `limit`
/// bytes of UTF-8 (`what` names it in messages: "a scenario"). The error
/// does not repeat the path: the caller shows it.
///
/// The size is not taken from the file's metadata alone: a device
/// (`/dev/zero`) says 0 and never ends, a file may grow while it is read.
/// At most `limit + 1` bytes are ever read, whatever the file is.
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};

    let too_big = |n: String| format!("the file has {n}; {what} may have at most {}", Bytes(limit));
    let meta = std::fs::metadata(path).map_err(|e| os_words(&e))?;
    let kind = meta.file_type();
    let not_regular =
        |k: &str| format!("{k}, not a regular file; {what} is read from a regular file");
    if kind.is_dir() {
        return Err(not_regular("a folder"));
    }
    if !kind.is_file() {
        return Err(not_regular(
            if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else if kind.is_fifo() {
                "a pipe"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "a special file"
            },
        ));
    }
    if meta.len() > limit {
        return Err(too_big(format!("{} bytes", meta.len())));
    }
    // O_NONBLOCK: a pipe put in the file's place since the check above
    // must not hang the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| os_words(&e))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| os_words(&e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(format!("more than {}", Bytes(limit))));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// Runs scenario files on backends and applies departures.
pub struct Checker<'a> {
    backends: Vec<BackendSlot<'a>>,
    departures: Departures,
    limits: Limits,
    probes: Vec<Option<Probes>>,
    kernel: KernelId,
}

impl<'a> Checker<'a> {
    /// A checker: runs every behaviour's probe once on each available
    /// backend.
    pub fn new(backends: Vec<BackendSlot<'a>>, departures: Departures, limits: Limits) -> Self {
        let probes = backends
            .iter()
            .map(|b| b.hv.as_ref().ok().map(|hv| departures.probe(*hv, &limits)))
            .collect();
        Checker {
            backends,
            departures,
            limits,
            probes,
            kernel: KernelId::running(),
        }
    }

    /// The probes of backend `i`.
    pub fn probes(&self, i: usize) -> Option<&Probes> {
        self.probes.get(i).and_then(Option::as_ref)
    }

    /// Parses and runs one scenario on every backend.
    pub fn check_source(&self, source: &Source) -> ScenarioReport {
        let mut report = ScenarioReport {
            scenario: source.name.clone(),
            parse_errors: vec![],
            results: vec![],
            disagreements: vec![],
        };
        let text = match &source.text {
            Ok(t) => t,
            Err(why) => {
                report.parse_errors.push(ParseError {
                    file: source.name.clone(),
                    line: 0,
                    column: 0,
                    expected: "a scenario file".into(),
                    found: why.clone(),
                    hint: "give a readable .gmem file".into(),
                });
                return report;
            }
        };
        let scenario = match parse(&source.name, text) {
            Ok(s) => s,
            Err(errs) => {
                report.parse_errors = errs.0;
                return report;
            }
        };
        let mut runs: Vec<Option<ScenarioRun>> = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            match &b.hv {
                Err(_) => {
                    runs.push(None);
                    report.results.push(BackendResult {
                        backend: b.name.clone(),
                        // Why is said once, in the report's backends.
                        verdict: Verdict::Skip(format!("the {} backend is not available", b.name)),
                        problems: vec![],
                        departures: vec![],
                        max_held: 0,
                        lines: vec![],
                        release_lines: vec![],
                    });
                }
                Ok(hv) => {
                    let r = run_limited(*hv, &scenario, &self.limits);
                    let explanations = match self.probes(i) {
                        Some(p) if !is_reference(&b.name) => {
                            Explainer::new(&self.departures, &p.shown(), self.limits)
                                .explain(&scenario, &r)
                        }
                        _ => vec![None; r.lines.len()],
                    };
                    let mut result = judge(&b.name, &r, &explanations);
                    let skipped = matches!(result.verdict, Verdict::Skip(_));
                    if hv.release().is_none() && !skipped {
                        result.release_lines = release_lines(&scenario, &r);
                    }
                    report.results.push(result);
                    runs.push(Some(r));
                }
            }
        }
        report.disagreements = compare(&report.results, &runs);
        report
    }

    /// Checks every source in order; `progress(i, n, name)` is called
    /// before each.
    pub fn check_sources(
        &self,
        sources: &[Source],
        mut progress: impl FnMut(usize, usize, &str),
    ) -> CheckReport {
        let n = sources.len();
        let mut scenarios: Vec<ScenarioReport> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                progress(i, n, &s.name);
                self.check_source(s)
            })
            .collect();
        for b in 0..self.backends.len() {
            hold_to_one_release(&mut scenarios, b);
        }
        let backends: Vec<BackendInfo> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| BackendInfo {
                name: b.name.clone(),
                unavailable: b.hv.as_ref().err().cloned(),
                probes: self.probes(i).cloned(),
            })
            .collect();
        let stale: Vec<Stale> = backends
            .iter()
            .filter(|b| !is_reference(&b.name))
            .filter_map(|b| b.probes.as_ref().map(|p| (b, p)))
            .flat_map(|(b, p)| {
                p.results.iter().filter(|r| r.stale()).map(|r| Stale {
                    backend: b.name.clone(),
                    id: r.id.clone(),
                    probe: match &r.outcome {
                        super::departures::ProbeOutcome::NotShown => {
                            "every line now has its upstream outcome".to_string()
                        }
                        super::departures::ProbeOutcome::Inconclusive(why) => why.clone(),
                        super::departures::ProbeOutcome::Shown => String::new(),
                    },
                })
            })
            .collect();
        let mut summary = Summary {
            files: scenarios.len(),
            stale: stale.len(),
            ..Summary::default()
        };
        for s in &scenarios {
            if !s.parse_errors.is_empty() {
                summary.unparsed_files += 1;
                summary.parse_errors += s.parse_errors.len();
            }
            for r in &s.results {
                match r.verdict {
                    Verdict::Pass => summary.passed += 1,
                    Verdict::Fail => summary.failed += 1,
                    Verdict::Skip(_) => summary.skipped += 1,
                    Verdict::Departs(_) => summary.departed += 1,
                }
                let count = |k| r.problems.iter().filter(|p| p.kind == k).count();
                summary.over_budget_lines += count(ProblemKind::OverBudget);
                summary.after_over_budget_lines += count(ProblemKind::AfterOverBudget);
            }
        }
        CheckReport {
            schema: SCHEMA,
            kernel: self.kernel.clone(),
            max_memory: self.limits.max_memory,
            backends,
            behaviours: self.departures.behaviours.clone(),
            scenarios,
            stale,
            summary,
        }
    }
}

/// Is `backend` the software backend (`soft`, or `soft 7.2` with a
/// profile)? It is the reference: its failures are never departures and it
/// has no departure records.
fn is_reference(backend: &str) -> bool {
    backend == "soft" || backend.starts_with("soft ")
}

/// The verdict of one run, with `explanations` (one per line) applied.
pub fn judge(
    backend: &str,
    r: &ScenarioRun,
    explanations: &[Option<super::departures::Explanation>],
) -> BackendResult {
    let mut result = BackendResult {
        backend: backend.to_string(),
        verdict: Verdict::Pass,
        problems: vec![],
        departures: vec![],
        max_held: r.max_held,
        lines: r.lines.clone(),
        release_lines: vec![],
    };
    if let Some(why) = &r.skipped {
        result.verdict = Verdict::Skip(why.clone());
        return result;
    }
    // A line the backend refused by its own rule says nothing of the
    // kernel, and neither do the lines after it: the scenario cannot be run
    // there, whatever the line expected.
    if let Some((line, why)) = r
        .lines
        .iter()
        .find_map(|l| backend_rule(l).map(|w| (l.line, w)))
    {
        result.verdict = Verdict::Skip(format!(
            "the {backend} backend cannot run line {line}: {why}"
        ));
        return result;
    }
    let mut over_budget = None;
    for (i, l) in r.lines.iter().enumerate() {
        if l.passed {
            continue;
        }
        match explanations.get(i).and_then(Option::as_ref) {
            Some(e) => result.departures.push(DepartureSeen {
                line: l.line,
                text: l.text.clone(),
                upstream: l.expected.to_string(),
                actual: l.actual_text(),
                behaviours: e.behaviours.clone(),
            }),
            None => {
                let (kind, detail) = match (l.actual == Some(Outcome::OverBudget), over_budget) {
                    (true, _) => {
                        over_budget.get_or_insert(l.line);
                        (ProblemKind::OverBudget, l.detail.clone())
                    }
                    (false, Some(first)) => (
                        ProblemKind::AfterOverBudget,
                        Some(match &l.detail {
                            Some(d) => format!(
                                "may follow from line {first}, which was not performed (over \
                                 budget): {d}"
                            ),
                            None => format!(
                                "may follow from line {first}, which was not performed (over \
                                 budget)"
                            ),
                        }),
                    ),
                    (false, None) => (ProblemKind::Mismatch, l.detail.clone()),
                };
                result.problems.push(Problem {
                    kind,
                    line: l.line,
                    text: l.text.clone(),
                    expected: l.expected.to_string(),
                    actual: l.actual_text(),
                    detail,
                });
            }
        }
    }
    result.verdict = verdict(&result);
    result
}

/// The rules by which a backend refuses what it cannot run, as opposed to
/// what the kernel refuses: the KVM backend's setup region and its guest
/// code (`KVM-SETUP`), memslots that would expose process memory
/// (`gmem-safety`). docs/spec.md, section 11.
pub const BACKEND_RULES: [&str; 2] = ["KVM-SETUP", "gmem-safety"];

/// Why the backend, not the kernel, refused line `l`: its message without
/// the ioctl's arguments, ending with the rule and errno; `None` when the
/// line's outcome is not such a refusal.
fn backend_rule(l: &LineResult) -> Option<String> {
    let Some(Outcome::Errno { errno }) = l.actual else {
        return None;
    };
    let detail = l.detail.as_deref()?;
    let errno = crate::error::errno_name(errno);
    // The form of every contract error: `message (rule, ERRNO)`.
    BACKEND_RULES
        .iter()
        .any(|rule| detail.ends_with(&format!("({rule}, {errno})")))
        .then(|| {
            // `KVM_SET_USER_MEMORY_REGION2 slot=.. gpa=..: why`: the why.
            match detail.split_once(": ") {
                Some((call, why)) if call.starts_with("KVM_") => why.to_string(),
                _ => detail.to_string(),
            }
        })
}

/// The verdict of a run that was not skipped, from its problems and
/// departures.
fn verdict(result: &BackendResult) -> Verdict {
    if !result.problems.is_empty() {
        Verdict::Fail
    } else if !result.departures.is_empty() {
        let mut ids: Vec<String> = Vec::new();
        for id in result.departures.iter().flat_map(|d| &d.behaviours) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        Verdict::Departs(ids)
    } else {
        Verdict::Pass
    }
}

/// The release-dependent lines of `scenario` that passed in `r`, with the
/// releases each outcome allows.
fn release_lines(scenario: &Scenario, r: &ScenarioRun) -> Vec<ReleaseLine> {
    scenario
        .lines
        .iter()
        .zip(&r.lines)
        .enumerate()
        .filter(|(_, (line, result))| !line.since.is_empty() && result.passed)
        .filter_map(|(index, (line, result))| {
            Some(ReleaseLine {
                index,
                releases: line.releases_matching(result.actual.as_ref()?),
                expected: Release::ALL.map(|rel| line.expect_on(rel)).to_vec(),
            })
        })
        .collect()
}

/// A kernel follows one release: on backend `b`, fails every
/// release-dependent line that passed with the outcome of a release the
/// other such lines of the check do not agree on ([`consensus`]), saying
/// which releases the line implies and which the others do.
fn hold_to_one_release(scenarios: &mut [ScenarioReport], b: usize) {
    let at: Vec<(usize, usize)> = scenarios
        .iter()
        .enumerate()
        .filter_map(|(si, s)| s.results.get(b).map(|r| (si, r)))
        .flat_map(|(si, r)| (0..r.release_lines.len()).map(move |k| (si, k)))
        .collect();
    let sets: Vec<Vec<Release>> = at
        .iter()
        .map(|&(si, k)| scenarios[si].results[b].release_lines[k].releases.clone())
        .collect();
    let agreed = consensus(&sets);
    let allow = |r: &Release| sets.iter().filter(|l| l.contains(r)).count();
    let most = agreed.releases.first().map_or(0, allow);
    for (&(si, k), _) in at.iter().zip(&agreed.agrees).filter(|(_, a)| !**a) {
        let s = &mut scenarios[si];
        let r = &mut s.results[b];
        let rl = r.release_lines[k].clone();
        let first = Release::ALL
            .iter()
            .position(|x| Some(x) == agreed.releases.first());
        let line = &mut r.lines[rl.index];
        let detail = format!(
            "a kernel follows one release: this outcome is that of {}, but the \
             release-dependent lines of this check agree on {} ({most} of {} lines allow it)",
            describe(&rl.releases),
            describe(&agreed.releases),
            sets.len()
        );
        line.passed = false;
        line.detail = Some(detail.clone());
        r.problems.push(Problem {
            kind: ProblemKind::Release,
            line: line.line,
            text: line.text.clone(),
            expected: match first {
                Some(i) => format!("{} ({})", rl.expected[i], describe(&agreed.releases)),
                None => line.expected.to_string(),
            },
            actual: format!("{} ({})", line.actual_text(), describe(&rl.releases)),
            detail: Some(detail),
        });
        let failed = line.line;
        r.problems.sort_by_key(|p| p.line);
        r.verdict = verdict(r);
        s.disagreements.retain(|d| d.line != failed);
    }
}

fn compare(results: &[BackendResult], runs: &[Option<ScenarioRun>]) -> Vec<Disagreement> {
    let ran: Vec<(usize, &ScenarioRun)> = runs
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(results[*i].verdict, Verdict::Skip(_)))
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
        .collect();
    let [(ia, a), (ib, b)] = ran.as_slice() else {
        return Vec::new();
    };
    // Failures and departures are listed once, where they are.
    let reported: BTreeSet<usize> = [&results[*ia], &results[*ib]]
        .iter()
        .flat_map(|r| {
            r.problems
                .iter()
                .map(|p| p.line)
                .chain(r.departures.iter().map(|d| d.line))
        })
        .collect();
    a.lines
        .iter()
        .zip(&b.lines)
        .filter(|(x, y)| !same_outcome(x, y) && !reported.contains(&x.line))
        .map(|(x, y)| Disagreement {
            line: x.line,
            text: x.text.clone(),
            outcomes: vec![
                (results[*ia].backend.clone(), x.actual_text()),
                (results[*ib].backend.clone(), y.actual_text()),
            ],
        })
        .collect()
}

/// `first` then `text`, wrapped at 100 columns; continuation lines
/// are indented by `indent` spaces. A word longer than a line is shortened.
pub fn wrap(first: &str, text: &str, indent: usize) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut fresh = true;
    for word in text.split_whitespace() {
        let word = shorten(word, WIDTH - indent - 1);
        let len = line.chars().count();
        if !fresh && len + 1 + word.chars().count() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = " ".repeat(indent);
        } else if !line.is_empty() && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(&word);
        fresh = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// The operation part of a line (without `=> outcome`).
pub(crate) fn op_text(text: &str) -> &str {
    text.split("=>").next().unwrap_or(text).trim()
}

/// Footnotes: each distinct text once, numbered in order of first use.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn mark(&mut self, text: String) -> usize {
        match self.0.iter().position(|t| *t == text) {
            Some(i) => i + 1,
            None => {
                self.0.push(text);
                self.0.len()
            }
        }
    }
}

/// The report as text: a header, one table row per scenario with
/// footnotes, then failures, departures and disagreements (each entry once),
/// then a summary line. Rows fit 100 columns.
pub fn render(report: &CheckReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gmem check: kernel {}, memory budget {} per scenario",
        report.kernel,
        Bytes(report.max_memory)
    );
    for b in &report.backends {
        if let Some(why) = &b.unavailable {
            let line = format!("{} backend not available: {why}", b.name);
            let _ = writeln!(out, "{}", shorten(&line, WIDTH));
        }
    }
    out.push('\n');
    let names: Vec<&str> = report.backends.iter().map(|b| b.name.as_str()).collect();
    const CELL: usize = 12;
    let room = WIDTH.saturating_sub(names.len() * (CELL + 2)).max(20);
    let w0 = report
        .scenarios
        .iter()
        .map(|s| s.scenario.chars().count())
        .chain([8])
        .max()
        .unwrap_or(8)
        .min(room);
    let mut notes = Notes::default();
    let mut row = format!("{:<w0$}", "scenario");
    for n in &names {
        let _ = write!(row, "  {n:<CELL$}");
    }
    let _ = writeln!(out, "{}", row.trim_end());
    for s in &report.scenarios {
        let mut row = format!("{:<w0$}", shorten(&s.scenario, w0));
        if !s.parse_errors.is_empty() {
            let n = notes.mark("does not parse (see Failures)".into());
            let _ = write!(row, "  {:<CELL$}", format!("invalid [{n}]"));
        }
        for r in &s.results {
            let cell = match &r.verdict {
                Verdict::Pass => "pass".to_string(),
                Verdict::Fail => "FAIL".to_string(),
                Verdict::Skip(why) => format!("skip [{}]", notes.mark(format!("skip: {why}"))),
                Verdict::Departs(ids) => format!(
                    "departs [{}]",
                    notes.mark(format!("departs from upstream: {}", ids.join(", ")))
                ),
            };
            let _ = write!(row, "  {cell:<CELL$}");
        }
        let _ = writeln!(out, "{}", row.trim_end());
    }
    if !notes.0.is_empty() {
        out.push('\n');
        for (i, n) in notes.0.iter().enumerate() {
            let mark = format!("[{}]", i + 1);
            out.push_str(&wrap(&mark, n, mark.len() + 1));
        }
    }
    render_failures(&mut out, report);
    render_departures(&mut out, report);
    let mut wrote = false;
    for s in &report.scenarios {
        for d in &s.disagreements {
            if !wrote {
                out.push_str("\nBackends that disagree where both meet the expectation:\n");
                wrote = true;
            }
            let outs: Vec<String> = d.outcomes.iter().map(|(b, o)| format!("{b} {o}")).collect();
            let _ = writeln!(
                out,
                "{}",
                line_head(None, &s.scenario, d.line, op_text(&d.text))
            );
            out.push_str(&wrap("     ", &outs.join(", "), 6));
        }
    }
    let m = &report.summary;
    let n = |count: usize, one: &str, many: &str| {
        format!("{count} {}", if count == 1 { one } else { many })
    };
    let mut tail = String::new();
    if m.unparsed_files > 0 {
        tail += &format!(
            "; {} not parse",
            n(m.unparsed_files, "file does", "files do")
        );
    }
    if m.over_budget_lines > 0 {
        tail += &format!("; {} over budget", n(m.over_budget_lines, "line", "lines"));
    }
    if m.after_over_budget_lines > 0 {
        tail += &format!(
            ", {} after {} may only follow from {}",
            n(m.after_over_budget_lines, "failure", "failures"),
            if m.over_budget_lines == 1 {
                "it"
            } else {
                "them"
            },
            if m.over_budget_lines == 1 {
                "it"
            } else {
                "them"
            },
        );
    }
    if m.stale > 0 {
        tail += &format!(
            "; {}",
            n(m.stale, "stale departure record", "stale departure records")
        );
    }
    let summary = format!(
        "{}, {}: {} passed, {} failed, {} skipped, {} depart from upstream{tail}",
        n(m.files, "file", "files"),
        n(m.passed + m.failed + m.skipped + m.departed, "run", "runs"),
        m.passed,
        m.failed,
        m.skipped,
        m.departed,
    );
    out.push('\n');
    out.push_str(&wrap("", &summary, 2));
    out
}

fn render_failures(out: &mut String, report: &CheckReport) {
    let mut wrote = false;
    let mut header = |out: &mut String| {
        if !wrote {
            out.push_str("\nFailures:\n");
            wrote = true;
        }
    };
    for st in &report.stale {
        header(out);
        out.push_str(&wrap(
            &format!("  [{}] {}:", st.backend, st.id),
            &format!(
                "recorded for kernel {}, but its probe does not show it: {}; remove the kernel \
                 from its seen_on in departures.toml, or fix the probe",
                report.kernel, st.probe
            ),
            6,
        ));
    }
    for s in &report.scenarios {
        for e in &s.parse_errors {
            header(out);
            let file = shorten(&e.file, PATH_SHOWN);
            if e.line == 0 {
                out.push_str(&wrap(&format!("  {file}: cannot be read:"), &e.found, 6));
            } else {
                out.push_str(&wrap(
                    &format!("  {file}:{}:{}: parse error:", e.line, e.column),
                    &format!("expected {}, found {}", e.expected, e.found_shown()),
                    6,
                ));
            }
            out.push_str(&wrap("      hint:", &e.hint, 8));
        }
        for r in &s.results {
            for p in &r.problems {
                header(out);
                let _ = writeln!(
                    out,
                    "{}",
                    line_head(Some(&r.backend), &s.scenario, p.line, &p.text)
                );
                let _ = writeln!(
                    out,
                    "{}\n{}",
                    shorten(&format!("      expected: {}", p.expected), WIDTH),
                    shorten(&format!("      actual:   {}", p.actual), WIDTH)
                );
                if let Some(d) = &p.detail {
                    for l in d.lines() {
                        out.push_str(&wrap("      ", l, 8));
                    }
                }
            }
        }
    }
}

/// A path in a heading is shortened (in its middle) to this many columns.
const PATH_SHOWN: usize = 56;

/// `  [backend] scenario:line  text` within 100 columns: a long path is
/// shortened in its middle, then the text to what is left.
fn line_head(backend: Option<&str>, scenario: &str, line: usize, text: &str) -> String {
    let head = match backend {
        Some(b) => format!("  [{b}] {}:{line}", shorten(scenario, PATH_SHOWN)),
        None => format!("  {}:{line}", shorten(scenario, PATH_SHOWN)),
    };
    let room = WIDTH.saturating_sub(head.chars().count() + 2).max(20);
    format!("{head}  {}", shorten(text, room))
}

/// The departing lines, with the behaviours they need (and any the probes
/// show that the departures file does not record for this kernel); nothing
/// when no line departs and every shown behaviour is recorded.
fn render_departures(out: &mut String, report: &CheckReport) {
    let seen: Vec<(&str, &str, &DepartureSeen)> = report
        .scenarios
        .iter()
        .flat_map(|s| {
            s.results.iter().flat_map(move |r| {
                r.departures
                    .iter()
                    .map(move |d| (s.scenario.as_str(), r.backend.as_str(), d))
            })
        })
        .collect();
    let unrecorded: BTreeSet<&str> = report
        .backends
        .iter()
        .filter(|b| !is_reference(&b.name))
        .filter_map(|b| b.probes.as_ref())
        .flat_map(|p| p.results.iter())
        .filter(|r| r.shown() && !r.recorded)
        .map(|r| r.id.as_str())
        .collect();
    let used: BTreeSet<&str> = seen
        .iter()
        .flat_map(|(_, _, d)| d.behaviours.iter().map(String::as_str))
        .collect();
    if seen.is_empty() && unrecorded.is_empty() {
        return;
    }
    out.push_str("\nDepartures from upstream: behaviours the probes of this kernel show\n");
    let listed: Vec<&super::departures::Behaviour> = report
        .behaviours
        .iter()
        .filter(|b| used.contains(b.id.as_str()) || unrecorded.contains(b.id.as_str()))
        .collect();
    let w = listed.iter().map(|b| b.id.len()).max().unwrap_or(0);
    for b in listed {
        out.push_str(&wrap(&format!("  {:<w$}  ", b.id), &b.summary, w + 4));
        if unrecorded.contains(b.id.as_str()) {
            let _ = writeln!(
                out,
                "  {:<w$}  (not recorded for kernel {}: add it to seen_on)",
                "", report.kernel
            );
        }
    }
    for (scenario, backend, d) in seen {
        let _ = writeln!(
            out,
            "{}",
            line_head(Some(backend), scenario, d.line, op_text(&d.text))
        );
        let _ = writeln!(
            out,
            "{}",
            shorten(&format!("      upstream:    {}", d.upstream), WIDTH)
        );
        out.push_str(&wrap(
            &format!("      this kernel: {}", d.actual),
            &format!("({})", d.behaviours.join(", ")),
            19,
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};

    use super::*;
    use crate::error::Result;
    use crate::hypervisor::{HostMemory, Vm};
    use crate::scenario::behaviour::{Effect, Effects, Emulated};
    use crate::Backend;

    /// A model of a kernel with `effects`, under the name `kvm`, so that
    /// departures apply.
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

    fn kernel_with(effects: Effects) -> NamedKvm {
        NamedKvm(Box::new(Emulated::new(
            Backend::Soft.open().unwrap(),
            effects,
        )))
    }

    /// The built-in behaviours, recorded for no kernel: the machine running
    /// the tests must not make a model's probes stale.
    fn behaviours() -> Departures {
        let mut d = Departures::builtin();
        for b in &mut d.behaviours {
            b.seen_on.clear();
        }
        d
    }

    fn check_on(kvm: &NamedKvm, text: &str) -> ScenarioReport {
        check_with(kvm, behaviours(), text)
    }

    /// A checker of the software backend against `kvm`.
    fn checker<'a>(
        soft: &'a dyn Hypervisor,
        kvm: &'a NamedKvm,
        departures: Departures,
    ) -> Checker<'a> {
        Checker::new(
            vec![
                BackendSlot {
                    name: "soft".into(),
                    hv: Ok(soft),
                },
                BackendSlot {
                    name: "kvm".into(),
                    hv: Ok(kvm),
                },
            ],
            departures,
            Limits::new(64 << 20),
        )
    }

    fn check_with(kvm: &NamedKvm, departures: Departures, text: &str) -> ScenarioReport {
        let soft = Backend::Soft.open().unwrap();
        let checker = checker(soft.as_ref(), kvm, departures);
        checker.check_source(&Source {
            name: "t.gmem".into(),
            text: Ok(text.into()),
        })
    }

    /// The software backend as 7.2 behaves, under the name `kvm` and with
    /// its release hidden, as a running kernel's is: which release it follows
    /// is measured from its outcomes.
    fn kernel_of_7_2() -> NamedKvm {
        NamedKvm(Box::new(
            crate::soft::SoftHypervisor::with_profile(Release::V7_2).unwrap(),
        ))
    }

    fn sources(texts: &[&str]) -> Vec<Source> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Source {
                name: format!("{i}.gmem"),
                text: Ok(t.to_string()),
            })
            .collect()
    }

    /// A line whose outcome is 3 on every release before 7.2: true of 7.2 too,
    /// so a 7.2 kernel gives the outcome of 6.18 to 7.1 here.
    const FLAGS_BEFORE_7_2: &str = "vm = create_vm\n\
        check_extension vm guest_memfd_flags => 3 | 7.2: 99\n";
    /// BIND-5: EEXIST since 7.2.
    const BOUND_RANGE: &str = "vm = create_vm\n\
        g = create_guest_memfd vm size=8K\n\
        set_memory_region vm slot=1 gpa=0x100000 size=4K flags=guest_memfd guest_memfd=g\n\
        set_memory_region vm slot=2 gpa=0x200000 size=4K flags=guest_memfd guest_memfd=g \
        => EINVAL | 7.2: EEXIST\n";

    /// A file of its own under the build's temporary folder, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> TempFile {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(format!("report-{}-{name}", std::process::id()));
            std::fs::write(&p, bytes).unwrap();
            TempFile(p)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_device_is_refused_whatever_its_size_says() {
        // /dev/zero has size 0 and never ends.
        let e = read_text(Path::new("/dev/zero"), 1 << 20, "a scenario").unwrap_err();
        assert_eq!(
            e,
            "a device, not a regular file; a scenario is read from a regular file"
        );
        let s = Source::read(Path::new("/dev/zero"), "zero".into());
        assert!(s.text.unwrap_err().contains("a device"));
    }

    #[test]
    fn a_file_over_the_limit_is_refused_and_one_at_it_is_read() {
        let f = TempFile::new("limit.gmem", &[b'#'; 4097]);
        let e = read_text(&f.0, 4096, "a scenario").unwrap_err();
        assert_eq!(
            e,
            "the file has 4097 bytes; a scenario may have at most 4 KiB"
        );
        assert_eq!(read_text(&f.0, 4097, "a scenario").unwrap().len(), 4097);
    }

    #[test]
    fn a_missing_file_says_the_errno_name_not_the_os_error_number() {
        let e = read_text(Path::new("/nonexistent/x.gmem"), 10, "a scenario").unwrap_err();
        assert_eq!(e, "No such file or directory (ENOENT)");
        let e = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            os_error(Path::new("/x"), &e),
            "/x: Permission denied (EACCES)"
        );
    }

    fn line(n: usize, expected: Outcome, actual: Outcome, detail: Option<&str>) -> LineResult {
        LineResult {
            line: n,
            text: format!("line {n}"),
            passed: expected == actual,
            expected,
            actual: Some(actual),
            detail: detail.map(str::to_string),
        }
    }

    fn ran(lines: Vec<LineResult>) -> ScenarioRun {
        ScenarioRun {
            skipped: None,
            lines,
            max_held: 0,
        }
    }

    const EINVAL: Outcome = Outcome::Errno {
        errno: crate::Errno::EINVAL,
    };

    /// KVM-SETUP: a line the KVM backend refuses by its own rule skips the
    /// scenario there, naming the rule and the reserved slots, even when
    /// the errno is the one the line expected; the lines after it are not
    /// failures.
    #[test]
    fn a_line_refused_by_a_backend_rule_skips_the_scenario_on_that_backend() {
        let refused = "KVM_SET_USER_MEMORY_REGION2 slot=32700 gpa=0x100000: slot 32700 is \
                       reserved by the KVM backend for its setup region (slots 32700 and 32701 \
                       at gpa [0xe0000000, 0xe0400000)) (KVM-SETUP, EINVAL)";
        for expected in [Outcome::Ok, EINVAL] {
            let r = ran(vec![
                line(1, Outcome::Ok, Outcome::Ok, None),
                line(2, expected, EINVAL, Some(refused)),
                line(3, Outcome::Ok, Outcome::Sigbus, None),
            ]);

            let result = judge("kvm", &r, &[None, None, None]);

            let Verdict::Skip(why) = &result.verdict else {
                panic!("{:?}", result.verdict)
            };
            assert!(
                why.starts_with("the kvm backend cannot run line 2: slot 32700"),
                "{why}"
            );
            assert!(
                why.contains("32701") && why.ends_with("(KVM-SETUP, EINVAL)"),
                "{why}"
            );
            assert!(result.problems.is_empty());
        }
    }

    /// gmem-safety is a backend rule too; the kernel's own refusal is not.
    #[test]
    fn only_the_backends_own_rules_skip() {
        let safety = "KVM_SET_USER_MEMORY_REGION2 slot=1: userspace_addr range [0x1000, 0x2000) \
                      covers process memory (gmem-safety, EFAULT)";
        let efault = Outcome::Errno {
            errno: crate::Errno::EFAULT,
        };
        let r = ran(vec![line(1, Outcome::Ok, efault, Some(safety))]);
        assert!(matches!(
            judge("kvm", &r, &[None]).verdict,
            Verdict::Skip(_)
        ));

        let kernel = "KVM_SET_USER_MEMORY_REGION2 slot=1 failed (kernel, EINVAL)";
        let r = ran(vec![line(1, Outcome::Ok, EINVAL, Some(kernel))]);
        assert_eq!(judge("kvm", &r, &[None]).verdict, Verdict::Fail);
    }

    #[test]
    fn a_failure_after_an_over_budget_line_says_it_may_follow_from_it() {
        let mut not_run = line(
            3,
            Outcome::Ok,
            Outcome::Ok,
            Some("handle `g2` is not bound"),
        );
        not_run.actual = None;
        not_run.passed = false;
        let r = ran(vec![
            line(1, Outcome::Ok, EINVAL, None),
            line(2, Outcome::Ok, Outcome::OverBudget, Some("not performed")),
            not_run,
        ]);

        let result = judge("soft", &r, &[None, None, None]);

        let kinds: Vec<ProblemKind> = result.problems.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                ProblemKind::Mismatch,
                ProblemKind::OverBudget,
                ProblemKind::AfterOverBudget
            ]
        );
        let detail = result.problems[2].detail.as_deref().unwrap();
        assert!(detail.starts_with("may follow from line 2, which was not performed"));
    }

    #[test]
    fn no_departures_block_when_no_line_departs() {
        // The kernel shows FAULT-3, but nothing in this scenario needs it.
        let kvm = kernel_with(Effects::NONE.with(Effect::GmemOnlyViaUserspaceAddr));
        let soft = Backend::Soft.open().unwrap();
        let mut recorded = behaviours();
        for b in recorded.behaviours.iter_mut().filter(|b| b.id == "FAULT-3") {
            b.seen_on = vec![KernelId::running()];
        }
        let checker = checker(soft.as_ref(), &kvm, recorded);
        let report = checker.check_sources(
            &sources(&["vm = create_vm
g = create_guest_memfd vm size=4K
"]),
            |_, _, _| {},
        );
        let text = render(&report);
        assert!(!text.contains("Departures"), "{text}");

        let parse_error = checker.check_sources(&sources(&["frob\n"]), |_, _, _| {});
        assert!(!render(&parse_error).contains("Departures"));
    }

    #[test]
    fn the_summary_counts_unparsed_files_and_their_errors_apart() {
        let kvm = kernel_with(Effects::NONE);
        let soft = Backend::Soft.open().unwrap();
        let checker = checker(soft.as_ref(), &kvm, behaviours());

        let report = checker.check_sources(&sources(&["frob\nfrob\n", "x = y\n"]), |_, _, _| {});

        assert_eq!(report.summary.unparsed_files, 2);
        assert_eq!(report.summary.parse_errors, 3);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["schema"], "gmem-check/2");
        let found = &json["scenarios"][0]["parse_errors"][0]["found"];
        assert_eq!(found, "frob", "no backticks in JSON");
        assert!(render(&report).contains("found `frob`"));
    }

    #[test]
    fn failures_of_a_long_path_fit_100_columns() {
        let kvm = kernel_with(Effects::NONE);
        let soft = Backend::Soft.open().unwrap();
        let checker = checker(soft.as_ref(), &kvm, behaviours());
        let long = format!("{}/x.gmem", "a-folder-with-a-long-name".repeat(6));
        let text = "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_read g => ESPIPE\n";
        let report = checker.check_sources(
            &[
                Source {
                    name: long.clone(),
                    text: Ok(text.into()),
                },
                Source {
                    name: format!("{long}2"),
                    text: Ok("frob\n".into()),
                },
            ],
            |_, _, _| {},
        );

        let out = render(&report);

        assert!(out.contains("Failures:"), "{out}");
        for l in out.lines() {
            assert!(
                l.chars().count() <= 100,
                "{} columns: {l}",
                l.chars().count()
            );
        }
    }

    #[test]
    fn a_release_dependent_line_inconsistent_with_the_others_fails_on_a_kernel() {
        let kvm = kernel_of_7_2();
        let soft = Backend::Soft.open().unwrap();
        let checker = checker(soft.as_ref(), &kvm, behaviours());

        let report = checker.check_sources(
            &sources(&[FLAGS_BEFORE_7_2, BOUND_RANGE, FLAGS_BEFORE_7_2]),
            |_, _, _| {},
        );

        let verdicts: Vec<&Verdict> = report
            .scenarios
            .iter()
            .map(|s| &s.results[1].verdict)
            .collect();
        assert_eq!(verdicts, [&Verdict::Pass, &Verdict::Fail, &Verdict::Pass]);
        let p = &report.scenarios[1].results[1].problems;
        assert_eq!(
            (p.len(), p[0].kind, p[0].line),
            (1, ProblemKind::Release, 4),
            "{p:?}"
        );
        assert_eq!(p[0].actual, "EEXIST (7.2 to next)");
        assert_eq!(p[0].expected, "EINVAL (6.18 to 7.1)");
        let detail = p[0].detail.as_deref().unwrap();
        assert!(
            detail.contains("agree on 6.18 to 7.1 (2 of 3 lines"),
            "{detail}"
        );
        assert!(!report.scenarios[1].results[1].lines[3].passed);
        assert_eq!(report.summary.failed, 1);
        assert!(render(&report).contains("a kernel follows one release"));
    }

    #[test]
    fn release_dependent_lines_of_one_release_pass_on_a_kernel() {
        let kvm = kernel_of_7_2();
        let soft = Backend::Soft.open().unwrap();
        let checker = checker(soft.as_ref(), &kvm, behaviours());

        let alone = checker.check_sources(&sources(&[BOUND_RANGE]), |_, _, _| {});
        let flags = checker.check_sources(&sources(&[FLAGS_BEFORE_7_2]), |_, _, _| {});

        assert!(!alone.failed(), "{}", render(&alone));
        assert!(!flags.failed(), "{}", render(&flags));
    }

    /// The selftest test_guest_memfd_guest as a user would write it: a
    /// MMAP | INIT_SHARED file bound with userspace_addr 0, guest reads and
    /// writes. The corpus has no such file.
    const USER_SCENARIO: &str = "\
vm = create_vm
g = create_guest_memfd vm size=8K flags=mmap|init_shared
m = mmap g
host_write m offset=0 byte=0xaa len=8K
set_memory_region vm slot=1 gpa=0x100000 size=8K flags=guest_memfd guest_memfd=g
guest_read vm gpa=0x100000 => 0xaa
guest_write vm gpa=0x101000 byte=0x55
host_read m offset=4K => 0x55
guest_read vm gpa=0x101000 => 0x55
";

    #[test]
    fn a_user_scenario_that_hits_fault_3_departs_as_fault_3() {
        let kvm = kernel_with(
            Effects::NONE
                .with(Effect::GmemOnlyViaUserspaceAddr)
                .with(Effect::UnfaultableUserspaceAddrIsMmio),
        );
        let r = check_on(&kvm, USER_SCENARIO);
        assert_eq!(r.results[0].verdict, Verdict::Pass, "soft");
        assert_eq!(
            r.results[1].verdict,
            Verdict::Departs(vec!["FAULT-3".into(), "FAULT-3-unmapped".into()])
        );
        let d = &r.results[1].departures;
        assert_eq!(d.len(), 4, "{d:?}");
        assert_eq!(d[0].actual, "exit mmio gpa=0x100000 read");
        // The write went nowhere: the host does not see it.
        assert_eq!((d[2].line, d[2].actual.as_str()), (8, "0xaa"));
        assert!(
            r.disagreements.is_empty(),
            "listed once: {:?}",
            r.disagreements
        );
    }

    #[test]
    fn a_difference_no_known_behaviour_predicts_fails() {
        // The kernel exits MMIO at an unmapped userspace_addr, but no known
        // behaviour says so: those lines fail; the host read that only
        // FAULT-3 explains departs.
        let kvm = kernel_with(
            Effects::NONE
                .with(Effect::GmemOnlyViaUserspaceAddr)
                .with(Effect::UnfaultableUserspaceAddrIsMmio),
        );
        let mut d = behaviours();
        d.behaviours.retain(|b| b.id != "FAULT-3-unmapped");
        let r = check_with(&kvm, d, USER_SCENARIO);
        assert_eq!(r.results[1].verdict, Verdict::Fail);
        let failed: Vec<usize> = r.results[1].problems.iter().map(|p| p.line).collect();
        assert_eq!(failed, [6, 7, 9]);
        assert_eq!(r.results[1].departures[0].line, 8);
        assert_eq!(r.results[1].departures[0].behaviours, ["FAULT-3"]);
    }

    #[test]
    fn a_kernel_with_fault_3_alone_departs_with_efault_as_fault_3() {
        let kvm = kernel_with(Effects::NONE.with(Effect::GmemOnlyViaUserspaceAddr));
        let r = check_on(&kvm, USER_SCENARIO);
        assert_eq!(
            r.results[1].verdict,
            Verdict::Departs(vec!["FAULT-3".into()])
        );
        assert_eq!(r.results[1].departures[0].actual, "EFAULT");
    }

    #[test]
    fn a_kernel_without_the_behaviour_fails_where_it_differs() {
        // A kernel that gives a wrong byte: no behaviour predicts it.
        let kvm = kernel_with(Effects::NONE);
        let r = check_on(&kvm, "vm = create_vm\nguest_read vm gpa=0x1000 => 0x01\n");
        assert_eq!(r.results[1].verdict, Verdict::Fail);
        assert_eq!(r.results[1].problems[0].kind, ProblemKind::Mismatch);
    }

    #[test]
    fn the_fault_8_probe_and_matcher_turn_a_timeout_into_a_departure() {
        let kvm = kernel_with(Effects::NONE.with(Effect::HypercallNeverExits));
        let r = check_on(
            &kvm,
            "vm = create_vm\nguest_map_gpa_range vm gpa=0x1000 pages=1 shared => exit hypercall gpa=0x1000 pages=1 attributes=shared\n",
        );
        assert_eq!(
            r.results[1].verdict,
            Verdict::Departs(vec!["FAULT-8".into()])
        );
    }

    #[test]
    fn parse_errors_are_reported_once_per_file_not_per_backend() {
        let kvm = kernel_with(Effects::NONE);
        let r = check_on(&kvm, "vm = create_vm\nfrob vm\n");
        assert_eq!(r.parse_errors.len(), 1);
        assert!(r.results.is_empty());
        assert_eq!((r.parse_errors[0].line, r.parse_errors[0].column), (2, 1));
    }

    #[test]
    fn a_stale_record_fails_the_check() {
        // The model with no effect, named kvm, stands for a kernel recorded
        // as having every behaviour: every record is stale there.
        let kvm = kernel_with(Effects::NONE);
        let soft = Backend::Soft.open().unwrap();
        let mut d = behaviours();
        for b in &mut d.behaviours {
            b.seen_on = vec![KernelId::running()];
        }
        let checker = checker(soft.as_ref(), &kvm, d);
        let report = checker.check_sources(&[], |_, _, _| {});
        assert_eq!(report.stale.len(), 4, "kvm only: {:?}", report.stale);
        assert!(report.failed());
        assert!(render(&report).contains("does not show it"));
    }

    #[test]
    fn rows_fit_100_columns_and_explanations_are_footnotes() {
        let kvm = kernel_with(
            Effects::NONE
                .with(Effect::GmemOnlyViaUserspaceAddr)
                .with(Effect::UnfaultableUserspaceAddrIsMmio),
        );
        let soft = Backend::Soft.open().unwrap();
        let checker = checker(soft.as_ref(), &kvm, behaviours());
        let long = format!("{}/x.gmem", "very-long-folder-name".repeat(8));
        let report = checker.check_sources(
            &[
                Source {
                    name: long,
                    text: Ok(USER_SCENARIO.into()),
                },
                Source {
                    name: "private.gmem".into(),
                    text: Ok("require vm_type:5\nvm = create_vm\n".into()),
                },
            ],
            |_, _, _| {},
        );
        let text = render(&report);
        let table: Vec<&str> = text.lines().skip(2).take(3).collect();
        for l in &table {
            assert!(l.chars().count() <= 100, "{l:?}");
        }
        assert!(table[1].contains("departs [1]"), "{text}");
        assert!(
            text.contains("\n[1] departs from upstream: FAULT-3, FAULT-3-unmapped"),
            "{text}"
        );
        assert!(text.contains("skip [2]"), "{text}");
    }
}
