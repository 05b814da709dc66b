//! Departures of running kernels from upstream, recognised by behaviour
//! (`scenarios/departures.toml`).
//!
//! A departure is a named kernel behaviour ([`Behaviour`]) with
//! - an effect on the fault path ([`Effect`]), which the model of
//!   [`super::behaviour`] applies to predict every outcome the behaviour
//!   changes, line by line and through what follows from it;
//! - a probe: a minimal scenario, run once per kernel and backend, whose
//!   outcome shows whether the running kernel has the behaviour
//!   ([`Departures::probe`]);
//! - the kernels it was seen on (`seen_on`): where a probe no longer shows
//!   a recorded behaviour, the record is stale and the check fails.
//!
//! A failing line of a scenario is a departure, not a failure, exactly when
//! the probes of this kernel show behaviours whose model predicts the
//! line's outcome, and upstream's model does not ([`Explainer`]). The
//! expectation in the scenario stays upstream's.
//!
//! ```toml
//! [[behaviour]]
//! id = "FAULT-8"
//! rule = "FAULT-8"
//! summary = "a guest's KVM_HC_MAP_GPA_RANGE never exits to the VMM"
//! effect = "hypercall_never_exits"
//! seen_on = [{ release = "6.18.44-fc-v669", kvm = "kvm_pvm" }]
//! probe = """
//! require exit_hypercall
//! vm = create_vm
//! guest_map_gpa_range vm gpa=0x100000 pages=1 shared => exit hypercall gpa=0x100000 pages=1 attributes=shared
//! """
//!
//! [[contract_test]]
//! test = "faults::access_after_the_file_is_released_is_a_memory_fault"
//! behaviours = ["FAULT-6"]
//! ```
//!
//! # For a differential fuzzer
//!
//! Probe the kernel once ([`Departures::probe`]), build an [`Explainer`] from
//! the behaviours it shows (leaving out any to rediscover them:
//! [`Explainer::ignoring`]), then for each program run on the kernel ask
//! [`Explainer::explain`]: `Some` for a line the shown behaviours account
//! for, with their ids; `None` for a line that is a finding. Here the
//! "kernel" is the model of one behaviour, so that the example runs
//! anywhere:
//!
//! ```
//! use gmem::scenario::behaviour::{Effect, Effects, Emulated};
//! use gmem::scenario::{parse, run_limited, Departures, Explainer, Limits};
//! use gmem::Backend;
//!
//! let known = Departures::builtin();
//! let limits = Limits::new(64 << 20);
//! let kernel = Emulated::new(
//!     Backend::Soft.open()?,
//!     Effects::NONE.with(Effect::HypercallNeverExits),
//! );
//! let probes = known.probe(&kernel, &limits); // once per kernel
//! assert_eq!(probes.shown(), ["FAULT-8"]);
//!
//! let program = parse(
//!     "fuzz.gmem",
//!     "vm = create_vm\n\
//!      guest_map_gpa_range vm gpa=0x1000 pages=1 shared => exit hypercall gpa=0x1000 pages=1 attributes=shared\n",
//! )
//! .unwrap();
//! let actual = run_limited(&kernel, &program, &limits);
//! assert!(!actual.lines[1].passed);
//!
//! let explainer = Explainer::new(&known, &probes.shown(), limits);
//! let why = explainer.explain(&program, &actual);
//! assert_eq!(why[1].as_ref().unwrap().behaviours, ["FAULT-8"]);
//!
//! // Told to ignore the recorded behaviour, the line is a finding.
//! let why = explainer.ignoring(&["FAULT-8"]).explain(&program, &actual);
//! assert!(why[1].is_none());
//! # Ok::<(), gmem::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ast::{Outcome, Scenario};
use super::behaviour::{Effect, Effects, Emulated};
use super::budget::Limits;
use super::parse::parse;
use super::run::{run_limited, LineResult, ScenarioRun};
use crate::hypervisor::Hypervisor;
use crate::Backend;

/// The largest departures file [`Departures::load`] reads (the corpus's
/// has a few KiB).
pub const MAX_DEPARTURES_BYTES: u64 = 1 << 20;

/// The departures file of the repository, built in.
pub const BUILTIN: &str = include_str!("../../../scenarios/departures.toml");

/// A running kernel: its release and its KVM implementation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KernelId {
    /// `uname -r`.
    pub release: String,
    /// The loaded KVM vendor module: `kvm_pvm`, `kvm_intel`, `kvm_amd`
    /// (`+`-joined if several; `none`).
    pub kvm: String,
}

/// The KVM vendor modules, in the order they are named.
const KVM_MODULES: [&str; 3] = ["kvm_pvm", "kvm_intel", "kvm_amd"];

impl KernelId {
    /// This machine's kernel: `/proc/sys/kernel/osrelease` and the KVM
    /// modules present under `/sys/module`.
    pub fn running() -> Self {
        let loaded: Vec<&str> = KVM_MODULES
            .into_iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .collect();
        KernelId {
            release: kernel_release(),
            kvm: if loaded.is_empty() {
                "none".into()
            } else {
                loaded.join("+")
            },
        }
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.release, self.kvm)
    }
}

/// A known kernel behaviour that departs from upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Behaviour {
    /// Its name in reports: `FAULT-3`.
    pub id: String,
    /// The rule of the specification it departs from.
    pub rule: String,
    /// What the kernel does instead, in one line.
    pub summary: String,
    /// Its effect on the fault path.
    #[serde(serialize_with = "ser_effect")]
    pub effect: Effect,
    /// The probe scenario's text.
    #[serde(skip)]
    pub probe: String,
    /// The probe, parsed.
    #[serde(skip)]
    pub probe_scenario: Scenario,
    /// The kernels it was recorded on.
    pub seen_on: Vec<KernelId>,
}

fn ser_effect<S: serde::Serializer>(e: &Effect, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(e.name())
}

/// A contract test (gmem/tests/contract) that fails on a kernel whose
/// probes show `behaviours`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContractTest {
    /// `section::test`, as gmem/tests/contract instantiates it.
    pub test: String,
    /// The behaviours that make it fail: all must be shown.
    pub behaviours: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviourRecord {
    id: String,
    rule: String,
    summary: String,
    effect: String,
    probe: String,
    #[serde(default)]
    seen_on: Vec<KernelId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    behaviour: Vec<BehaviourRecord>,
    #[serde(default)]
    contract_test: Vec<ContractTest>,
}

/// The known behaviours and the contract tests they explain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Departures {
    /// The behaviours, in file order.
    pub behaviours: Vec<Behaviour>,
    /// Contract tests and the behaviours that make them fail.
    pub contract_tests: Vec<ContractTest>,
}

impl Departures {
    /// Parses a departures file and checks it: ids unique, effects known,
    /// probes that parse, contract tests that name known behaviours.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            let e = e.to_string();
            if text.contains("[[\"") || text.contains("observed =") {
                format!(
                    "{e}\nhint: departures are no longer recorded by scenario and line; each is a \
                     [[behaviour]] with an effect and a probe (see docs/conformance.md)"
                )
            } else {
                e
            }
        })?;
        let mut behaviours: Vec<Behaviour> = Vec::new();
        for r in file.behaviour {
            if behaviours.iter().any(|b| b.id == r.id) {
                return Err(format!("behaviour {} is defined twice", r.id));
            }
            let effect = Effect::from_name(&r.effect).ok_or_else(|| {
                let known: Vec<&str> = Effect::ALL.iter().map(|e| e.name()).collect();
                format!(
                    "behaviour {}: unknown effect `{}`; effects: {}",
                    r.id,
                    r.effect,
                    known.join(", ")
                )
            })?;
            let probe_scenario = parse(&format!("probe of {}", r.id), &r.probe)
                .map_err(|e| format!("behaviour {}: its probe does not parse:\n{e}", r.id))?;
            behaviours.push(Behaviour {
                id: r.id,
                rule: r.rule,
                summary: r.summary,
                effect,
                probe: r.probe,
                probe_scenario,
                seen_on: r.seen_on,
            });
        }
        for t in &file.contract_test {
            if let Some(b) = t
                .behaviours
                .iter()
                .find(|b| !behaviours.iter().any(|x| &x.id == *b))
            {
                return Err(format!(
                    "contract test {} names behaviour {b}, which is not defined",
                    t.test
                ));
            }
        }
        Ok(Departures {
            behaviours,
            contract_tests: file.contract_test,
        })
    }

    /// Reads a departures file: a regular file of at most
    /// [`MAX_DEPARTURES_BYTES`]; a missing file is an error.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = super::report::read_text(path, MAX_DEPARTURES_BYTES, "a departures file")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The repository's departures ([`BUILTIN`]).
    pub fn builtin() -> Self {
        // A test checks that it parses.
        Self::parse(BUILTIN).unwrap_or_default()
    }

    /// The behaviour `id`.
    pub fn get(&self, id: &str) -> Option<&Behaviour> {
        self.behaviours.iter().find(|b| b.id == id)
    }

    /// The behaviours that make contract test `test` fail, if it is listed.
    pub fn contract_test(&self, test: &str) -> Option<Vec<&Behaviour>> {
        let t = self.contract_tests.iter().find(|t| t.test == test)?;
        Some(t.behaviours.iter().filter_map(|id| self.get(id)).collect())
    }

    /// Runs every probe once on `hv` and says which behaviours it shows.
    pub fn probe(&self, hv: &dyn Hypervisor, limits: &Limits) -> Probes {
        let kernel = KernelId::running();
        let results = self
            .behaviours
            .iter()
            .map(|b| ProbeResult {
                id: b.id.clone(),
                outcome: probe_one(b, hv, limits),
                // Records are of kernels: the kvm backend's to check.
                recorded: hv.name() == "kvm" && b.seen_on.contains(&kernel),
            })
            .collect();
        Probes {
            backend: hv.name().to_string(),
            kernel,
            results,
        }
    }
}

/// What a probe showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum ProbeOutcome {
    /// The kernel has the behaviour: every line of the probe has the
    /// outcome the behaviour predicts, and some line differs from upstream.
    Shown,
    /// Every line of the probe has its upstream outcome.
    NotShown,
    /// Neither: the probe was skipped, or some line has an outcome neither
    /// upstream nor the behaviour gives (the reason says which).
    Inconclusive(String),
}

/// One behaviour's probe on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// The behaviour.
    pub id: String,
    /// What the probe showed.
    pub outcome: ProbeOutcome,
    /// Is the behaviour recorded (`seen_on`) for the running kernel, and
    /// is the backend probed that kernel (`kvm`)?
    pub recorded: bool,
}

impl ProbeResult {
    /// Did the probe show the behaviour?
    pub fn shown(&self) -> bool {
        self.outcome == ProbeOutcome::Shown
    }

    /// Recorded for this kernel but not shown: the record is stale.
    pub fn stale(&self) -> bool {
        self.recorded && !self.shown()
    }
}

/// Every probe on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probes {
    /// The backend probed.
    pub backend: String,
    /// The kernel running.
    pub kernel: KernelId,
    /// One result per behaviour.
    pub results: Vec<ProbeResult>,
}

impl Probes {
    /// The ids of the behaviours shown.
    pub fn shown(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|r| r.shown())
            .map(|r| r.id.as_str())
            .collect()
    }

    /// Is behaviour `id` shown?
    pub fn shows(&self, id: &str) -> bool {
        self.results.iter().any(|r| r.id == id && r.shown())
    }
}

/// The software backend, optionally with effects: the model of a kernel.
fn model(effects: Effects) -> Option<Emulated> {
    Backend::Soft
        .open()
        .ok()
        .map(|soft| Emulated::new(soft, effects))
}

fn probe_one(b: &Behaviour, hv: &dyn Hypervisor, limits: &Limits) -> ProbeOutcome {
    let actual = run_limited(hv, &b.probe_scenario, limits);
    if let Some(why) = actual.skipped {
        return ProbeOutcome::Inconclusive(format!("probe skipped: {why}"));
    }
    if actual.lines.iter().all(|l| l.passed) {
        return ProbeOutcome::NotShown;
    }
    let Some(m) = model(Effects::NONE.with(b.effect)) else {
        return ProbeOutcome::Inconclusive("the software backend does not open".into());
    };
    let predicted = run_limited(&m, &b.probe_scenario, limits);
    match actual
        .lines
        .iter()
        .zip(&predicted.lines)
        .find(|(a, p)| !same_outcome(a, p))
    {
        None => ProbeOutcome::Shown,
        Some((a, p)) => ProbeOutcome::Inconclusive(format!(
            "probe line {} (`{}`): upstream gives {}, the behaviour {}, this kernel {}",
            a.line,
            a.text,
            a.expected,
            p.actual_text(),
            a.actual_text()
        )),
    }
}

/// Do two runs of one line have the same outcome? A stat's block count
/// counts only where the line names it (it is each backend's accounting).
pub fn same_outcome(a: &LineResult, b: &LineResult) -> bool {
    comparable(a) == comparable(b)
}

/// The outcome as compared across backends.
pub(crate) fn comparable(l: &LineResult) -> Option<Outcome> {
    match (l.actual, l.expected) {
        (
            Some(Outcome::Stat {
                size,
                blksize,
                blocks,
                mode,
            }),
            expected,
        ) => {
            let named = matches!(
                expected,
                Outcome::Stat {
                    blocks: Some(_),
                    ..
                }
            );
            Some(Outcome::Stat {
                size,
                blksize,
                blocks: blocks.filter(|_| named),
                mode,
            })
        }
        (a, _) => a,
    }
}

/// Why a failing line is a departure: the behaviours that account for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The ids of the behaviours the line's outcome needs.
    pub behaviours: Vec<String>,
}

/// Decides which failing lines of a kernel's run the shown behaviours
/// account for.
#[derive(Debug, Clone)]
pub struct Explainer<'a> {
    behaviours: Vec<&'a Behaviour>,
    limits: Limits,
}

impl<'a> Explainer<'a> {
    /// An explainer for the behaviours `shown` (ids; unknown ids are
    /// ignored).
    pub fn new(departures: &'a Departures, shown: &[&str], limits: Limits) -> Self {
        Explainer {
            behaviours: departures
                .behaviours
                .iter()
                .filter(|b| shown.contains(&b.id.as_str()))
                .collect(),
            limits,
        }
    }

    /// The same explainer without behaviours `ids`: a fuzzer leaves out
    /// the recorded ones to find them again.
    pub fn ignoring(mut self, ids: &[&str]) -> Self {
        self.behaviours.retain(|b| !ids.contains(&b.id.as_str()));
        self
    }

    /// The behaviours it uses.
    pub fn behaviours(&self) -> impl Iterator<Item = &Behaviour> {
        self.behaviours.iter().copied()
    }

    fn effects(&self) -> Effects {
        self.behaviours.iter().map(|b| b.effect).collect()
    }

    /// For each line of `actual` (a run of `scenario` on a kernel): `Some`
    /// when the line failed and the shown behaviours account for its
    /// outcome. A line is accounted for when the model with every shown
    /// behaviour gives exactly its outcome and the model of upstream does
    /// not; the behaviours named are those the outcome needs (leaving one
    /// out of the model changes it).
    pub fn explain(&self, scenario: &Scenario, actual: &ScenarioRun) -> Vec<Option<Explanation>> {
        let mut out = vec![None; actual.lines.len()];
        let failing: Vec<usize> = actual
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.passed && l.actual != Some(Outcome::OverBudget))
            .map(|(i, _)| i)
            .collect();
        let all = self.effects();
        if failing.is_empty() || all.is_empty() || actual.skipped.is_some() {
            return out;
        }
        let mut runs: BTreeMap<Vec<Effect>, ScenarioRun> = BTreeMap::new();
        let mut run_with = |effects: Effects| -> Option<ScenarioRun> {
            let key: Vec<Effect> = effects.iter().collect();
            if !runs.contains_key(&key) {
                let r = run_limited(&model(effects)?, scenario, &self.limits);
                runs.insert(key.clone(), r);
            }
            runs.get(&key).cloned()
        };
        let (Some(full), Some(upstream)) = (run_with(all), run_with(Effects::NONE)) else {
            return out;
        };
        for i in failing {
            let (Some(a), Some(m), Some(u)) = (
                actual.lines.get(i),
                full.lines.get(i),
                upstream.lines.get(i),
            ) else {
                continue;
            };
            if a.line != m.line || !same_outcome(a, m) || same_outcome(m, u) {
                continue;
            }
            let needed: BTreeSet<Effect> = all
                .iter()
                .filter(|e| {
                    run_with(all.without(*e))
                        .and_then(|r| r.lines.get(i).map(|l| !same_outcome(l, m)))
                        .unwrap_or(false)
                })
                .collect();
            let ids: Vec<String> = self
                .behaviours
                .iter()
                .filter(|b| needed.is_empty() || needed.contains(&b.effect))
                .map(|b| b.id.clone())
                .collect();
            out[i] = Some(Explanation { behaviours: ids });
        }
        out
    }
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_departures_parse() {
        let d = Departures::parse(BUILTIN).unwrap();
        assert!(d.get("FAULT-3").is_some());
        assert!(!d.contract_tests.is_empty());
    }

    #[test]
    fn no_probe_shows_its_behaviour_on_the_software_backend() {
        let d = Departures::builtin();
        let soft = Backend::Soft.open().unwrap();
        let p = d.probe(soft.as_ref(), &Limits::new(64 << 20));
        for r in &p.results {
            assert_eq!(r.outcome, ProbeOutcome::NotShown, "{}", r.id);
        }
    }

    #[test]
    fn every_probe_shows_its_behaviour_on_the_model_of_it() {
        let d = Departures::builtin();
        for b in &d.behaviours {
            let m = model(Effects::NONE.with(b.effect)).unwrap();
            let p = d.probe(&m, &Limits::new(64 << 20));
            for r in &p.results {
                // Each probe shows its own behaviour and no other.
                assert_eq!(
                    r.shown(),
                    r.id == b.id,
                    "probe of {} on the model of {}",
                    r.id,
                    b.id
                );
            }
        }
    }

    /// FAULT-3-unmapped accounts for an MMIO exit exactly where the host
    /// cannot fault `userspace_addr` in. The same exit where it can
    /// (anonymous memory, a shared guest_memfd page) is a new kind of
    /// difference, and no shown behaviour explains it.
    #[test]
    fn mmio_where_the_host_can_fault_in_is_not_explained() {
        let text = "\
vm = create_vm
h = host_memory size=4K
set_memory_region vm slot=1 gpa=0x100000 size=4K userspace=h
guest_read vm gpa=0x100000 => 0x00
g = create_guest_memfd vm size=4K flags=mmap|init_shared
m = mmap g size=8K
set_memory_region vm slot=2 gpa=0x200000 size=8K userspace=m
guest_read vm gpa=0x200000 => 0x00
guest_read vm gpa=0x201000 => EFAULT
";
        let limits = Limits::new(64 << 20);
        let program = parse("t.gmem", text).unwrap();
        let soft = Backend::Soft.open().unwrap();
        let mut kernel = run_limited(soft.as_ref(), &program, &limits);
        for (i, gpa) in [(3, 0x100000), (7, 0x200000), (8, 0x201000)] {
            let l = &mut kernel.lines[i];
            l.actual = Some(Outcome::Mmio {
                gpa,
                write: Some(false),
            });
            l.passed = false;
        }
        let known = Departures::builtin();
        let all: Vec<&str> = known.behaviours.iter().map(|b| b.id.as_str()).collect();
        let why = Explainer::new(&known, &all, limits).explain(&program, &kernel);
        assert!(why[3].is_none(), "anonymous memory: {:?}", why[3]);
        assert!(why[7].is_none(), "a shared guest_memfd page: {:?}", why[7]);
        assert_eq!(
            why[8].as_ref().map(|e| e.behaviours.clone()),
            Some(vec!["FAULT-3-unmapped".to_string()]),
            "past the end of the file"
        );
    }

    #[test]
    fn old_records_by_line_are_refused_with_a_hint() {
        let e = Departures::parse(
            "[[\"6.1\"]]\nscenario = \"a\"\nline = 1\nobserved = \"ok\"\nexplanation = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.contains("[[behaviour]]"), "{e}");
    }

    #[test]
    fn unknown_effects_and_behaviours_are_refused() {
        let e = Departures::parse(
            "[[behaviour]]\nid = \"X\"\nrule = \"FAULT-3\"\nsummary = \"s\"\neffect = \"teleport\"\nprobe = \"vm = create_vm\"\n",
        )
        .unwrap_err();
        assert!(e.contains("unknown effect `teleport`"), "{e}");
        let e = Departures::parse("[[contract_test]]\ntest = \"a::b\"\nbehaviours = [\"NOPE\"]\n")
            .unwrap_err();
        assert!(e.contains("NOPE"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_error_with_the_path_and_errno_name() {
        let e = Departures::load(Path::new("/nonexistent/departures.toml")).unwrap_err();
        assert_eq!(
            e,
            "/nonexistent/departures.toml: No such file or directory (ENOENT)"
        );
    }

    #[test]
    fn a_device_is_refused_without_reading_it() {
        // /dev/zero never ends: reading it whole would take all memory.
        let e = Departures::load(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("/dev/zero: a device, not a regular file"), "{e}");
    }
}
