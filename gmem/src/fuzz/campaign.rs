//! A fuzzing campaign: programs from consecutive seeds, run, compared,
//! counted, and the findings minimized and written as corpus files.

use std::sync::Arc;

use crate::scenario::ast::{Op, Outcome, RequireKind, Requirement, Scenario};
use crate::scenario::run::ScenarioRun;
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_X86_DEFAULT_VM};
use crate::{Backend, Hypervisor};

use crate::scenario::budget::Limits as ScenarioLimits;
use crate::scenario::{Departures, Explainer};

use super::coverage::{op_name, Coverage};
use super::exec::{
    compare, outcome_kind, show, Executor, Finding, FindingKind, LineClass, Tally, Target, Verdict,
};
use super::generate::{generate, renumber, Limits, Profile};
use super::minimize::{minimize, with_expectations, Budget, Minimized};
use super::model;

/// Which backends a campaign runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The software backend and the kernel, compared line by line.
    Both,
    /// The software backend alone, against the simple model.
    Soft,
    /// The kernel alone (panics, hangs and leaks of the KVM backend).
    Kvm,
}

/// How a campaign runs.
pub struct Config {
    /// Backends.
    pub mode: Mode,
    /// Bounds on every program.
    pub limits: Limits,
    /// Count fds and mappings around every program.
    pub leak_check: bool,
    /// Work allowed to minimize one finding.
    pub minimize: Budget,
    /// The kernel release the software backend follows (`docs/releases.md`).
    pub soft_release: crate::Release,
    /// Explain differences by the departures (`scenarios/departures.toml`)
    /// whose probes the running kernel shows: such a line is not a
    /// finding. `false`: every difference counts (to rediscover them).
    pub known_departures: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Both,
            limits: Limits::default(),
            leak_check: true,
            minimize: Budget::default(),
            soft_release: crate::Release::DEFAULT,
            known_departures: true,
        }
    }
}

/// Where each role's worker sits in the executor.
#[derive(Debug, Clone, Copy)]
struct Roles {
    soft: Option<usize>,
    kvm: Option<usize>,
}

/// A campaign in progress.
pub struct Campaign {
    exec: Executor,
    roles: Roles,
    /// What the programs are generated for.
    pub profile: Profile,
    /// Program bounds.
    pub limits: Limits,
    leak_check: bool,
    budget: Budget,
    /// The departures and the ids of those the kernel's probes show.
    known: Option<(Departures, Vec<String>)>,
    soft_flags: Vec<(u64, u64)>,
    /// Counts.
    pub tally: Tally,
    /// Operations and rule ids reached (on the first backend).
    pub coverage: Coverage,
    /// The first finding of each signature, in the order found.
    pub findings: Vec<Finding>,
}

fn open_profile(t: &Target) -> crate::Result<Profile> {
    let hv: Box<dyn Hypervisor> = t.open()?;
    Ok(Profile::of(hv.as_ref()))
}

/// The software backend as kernel `release`, as a worker target.
fn soft_target(release: crate::Release) -> Target {
    Target::Custom(
        "soft".into(),
        Box::new(move || {
            Ok(
                Box::new(crate::soft::SoftHypervisor::with_profile(release)?)
                    as Box<dyn Hypervisor>,
            )
        }),
    )
}

impl Campaign {
    /// Opens the backends of `config.mode` (an error when one is missing).
    pub fn new(config: Config) -> crate::Result<Campaign> {
        let mut targets = Vec::new();
        let mut roles = Roles {
            soft: None,
            kvm: None,
        };
        let mut known = None;
        let mut profile: Option<Profile> = None;
        let mut soft_flags = Vec::new();
        if config.mode != Mode::Kvm {
            roles.soft = Some(targets.len());
            let soft = soft_target(config.soft_release);
            let p = open_profile(&soft)?;
            soft_flags = model::flags_by_type(soft.open()?.as_ref());
            targets.push(soft);
            profile = Some(p);
        }
        if config.mode != Mode::Soft {
            roles.kvm = Some(targets.len());
            let kvm = Target::Backend(Backend::Kvm);
            let p = open_profile(&kvm)?;
            if config.mode == Mode::Both && config.known_departures {
                let departures = Departures::builtin();
                let probes = departures.probe(kvm.open()?.as_ref(), &ScenarioLimits::default());
                let shown = probes.shown().into_iter().map(String::from).collect();
                known = Some((departures, shown));
            }
            targets.push(kvm);
            profile = Some(match profile {
                Some(s) => s.intersect(&p),
                None => p,
            });
        }
        let profile = profile.expect("every mode runs a backend");
        Ok(Campaign {
            exec: Executor::new(targets)?,
            roles,
            profile,
            limits: config.limits,
            leak_check: config.leak_check,
            budget: config.minimize,
            known,
            soft_flags,
            tally: Tally::default(),
            coverage: Coverage::default(),
            findings: Vec::new(),
        })
    }

    /// The program for `seed`, as this campaign generates it.
    pub fn program(&self, seed: u64) -> Scenario {
        generate(seed, &self.profile, &self.limits)
    }

    /// Has a hang stopped the campaign?
    pub fn stopped(&self) -> bool {
        self.exec.hung().is_some()
    }

    /// Generates and runs the program of `seed`. A finding whose signature
    /// was seen before is counted, and returned as not new.
    pub fn run_seed(&mut self, seed: u64) -> Verdict {
        let sc = Arc::new(self.program(seed));
        self.run_program(seed, &sc)
    }

    /// Runs one program and records what it shows.
    pub fn run_program(&mut self, seed: u64, sc: &Arc<Scenario>) -> Verdict {
        self.tally.runs += 1;
        let verdict = self.judge(seed, sc);
        match &verdict {
            Verdict::Agree { known } => {
                self.tally.agreed += 1;
                self.tally.known += *known as u64;
            }
            Verdict::Skipped(why) => {
                let kind = why.split(':').next().unwrap_or(why).to_string();
                *self.tally.skipped.entry(kind).or_default() += 1;
            }
            Verdict::Found(f) => {
                let n = self.tally.findings.entry(f.signature.clone()).or_default();
                *n += 1;
                if *n == 1 {
                    self.findings.push((**f).clone());
                }
            }
        }
        verdict
    }

    /// Is `f` the first of its signature?
    pub fn is_new(&self, f: &Finding) -> bool {
        self.tally.findings.get(&f.signature) == Some(&1)
    }

    fn judge(&mut self, seed: u64, sc: &Arc<Scenario>) -> Verdict {
        let found = |kind: FindingKind, signature: String| {
            Verdict::Found(Box::new(Finding {
                kind,
                seed,
                program: (**sc).clone(),
                signature,
            }))
        };
        let runs = match self.exec.run(sc) {
            Ok(r) => r,
            Err(h) => {
                let sig = format!("hang: {}", h.backend);
                return found(
                    FindingKind::Hang {
                        backend: h.backend,
                        waited: h.waited,
                    },
                    sig,
                );
            }
        };
        for r in &runs {
            if let Some(message) = &r.panic {
                return found(
                    FindingKind::Panic {
                        backend: r.backend.clone(),
                        message: message.clone(),
                    },
                    format!("panic: {}: {message}", r.backend),
                );
            }
        }
        if let Some(run) = runs.first().and_then(|r| r.run.as_ref()) {
            self.coverage.add(sc, run);
        }
        if self.leak_check {
            for (i, r) in runs.iter().enumerate() {
                if !r.grew() {
                    continue;
                }
                match self.exec.confirm_leak(i, sc, 3) {
                    Ok(Some((fds, maps))) => {
                        return found(
                            FindingKind::Leak {
                                backend: r.backend.clone(),
                                fds,
                                maps,
                            },
                            format!("leak: {}", r.backend),
                        )
                    }
                    Ok(None) => {}
                    Err(h) => {
                        return found(
                            FindingKind::Hang {
                                backend: h.backend.clone(),
                                waited: h.waited,
                            },
                            format!("hang: {}", h.backend),
                        )
                    }
                }
            }
        }
        let run_of = |i: Option<usize>| i.and_then(|i| runs[i].run.as_ref());
        if let (Some(soft), Some(kvm)) = (run_of(self.roles.soft), run_of(self.roles.kvm)) {
            let cmp = compare(sc, soft, kvm, &self.explain(sc, soft, kvm));
            if let Some(d) = cmp.finding() {
                return Verdict::Found(Box::new(Finding::difference(seed, (**sc).clone(), d)));
            }
            if let Some(why) = cmp.skip_reason() {
                return Verdict::Skipped(why);
            }
            let known = cmp
                .diffs
                .iter()
                .filter(|d| matches!(d.class, LineClass::Known(_)))
                .count();
            if let Some(m) = self.model_mismatch(seed, sc, soft) {
                return m;
            }
            return Verdict::Agree { known };
        }
        if let Some(soft) = run_of(self.roles.soft) {
            if let Some(m) = self.model_mismatch(seed, sc, soft) {
                return m;
            }
        }
        Verdict::Agree { known: 0 }
    }

    fn model_mismatch(&self, seed: u64, sc: &Arc<Scenario>, soft: &ScenarioRun) -> Option<Verdict> {
        let m = model::check(sc, soft, &self.soft_flags)?;
        let op = op_name(&sc.lines[m.index].op);
        let signature = format!(
            "model {}: {op}: {} | {}",
            m.rule,
            outcome_kind(&Some(m.expected)),
            outcome_kind(&m.actual)
        );
        Some(Verdict::Found(Box::new(Finding {
            kind: FindingKind::Model {
                index: m.index,
                expected: m.expected,
                actual: m.actual,
                rule: m.rule.to_string(),
            },
            seed,
            program: (**sc).clone(),
            signature,
        })))
    }

    /// For each line of `sc` where the kernel's outcome differs from the
    /// software backend's: the known departures (shown by the kernel's
    /// probes) that account for it, if any. The software backend's outcomes
    /// are the expectations, as upstream's are in a corpus file.
    fn explain(&self, sc: &Scenario, soft: &ScenarioRun, kvm: &ScenarioRun) -> Vec<Option<String>> {
        let Some((departures, shown)) = &self.known else {
            return Vec::new();
        };
        let differs = soft
            .lines
            .iter()
            .zip(&kvm.lines)
            .any(|(a, b)| a.actual != b.actual);
        if !differs || kvm.skipped.is_some() {
            return Vec::new();
        }
        let outcomes: Vec<Option<Outcome>> = soft.lines.iter().map(|l| l.actual).collect();
        let expected = with_expectations(sc, &outcomes);
        let mut run = kvm.clone();
        for (l, s) in run.lines.iter_mut().zip(&soft.lines) {
            l.passed = l.actual == s.actual;
        }
        let ids: Vec<&str> = shown.iter().map(String::as_str).collect();
        Explainer::new(departures, &ids, ScenarioLimits::default())
            .explain(&expected, &run)
            .into_iter()
            .map(|e| e.map(|e| e.behaviours.join(", ")))
            .collect()
    }

    /// The ids of the known departures the kernel's probes show (empty
    /// when they are not applied).
    pub fn known_departures(&self) -> Vec<String> {
        self.known
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// Does `sc` still show `f` (at line `target`)?
    fn shows(&mut self, f: &Finding, sc: &Scenario, target: Option<usize>) -> bool {
        let sc = Arc::new(sc.clone());
        match &f.kind {
            FindingKind::Difference {
                reference, subject, ..
            } => {
                let (Some(t), Some(si), Some(ki)) = (target, self.roles.soft, self.roles.kvm)
                else {
                    return false;
                };
                // The software backend first: it is cheap, and most
                // candidates already fail there.
                let Ok(soft) = self.exec.run_on(si, &sc) else {
                    return false;
                };
                let Some(soft) = soft.run else { return false };
                if soft.lines.get(t).map(|l| outcome_kind(&l.actual))
                    != Some(outcome_kind(reference))
                {
                    return false;
                }
                let Ok(kvm) = self.exec.run_on(ki, &sc) else {
                    return false;
                };
                let Some(kvm) = kvm.run else { return false };
                if kvm.lines.get(t).map(|l| outcome_kind(&l.actual)) != Some(outcome_kind(subject))
                {
                    return false;
                }
                compare(&sc, &soft, &kvm, &self.explain(&sc, &soft, &kvm))
                    .finding()
                    .is_some_and(|d| d.index == t && d.signature == f.signature)
            }
            FindingKind::Model { rule, actual, .. } => {
                let (Some(t), Some(si)) = (target, self.roles.soft) else {
                    return false;
                };
                let Ok(r) = self.exec.run_on(si, &sc) else {
                    return false;
                };
                r.run
                    .as_ref()
                    .and_then(|run| model::check(&sc, run, &self.soft_flags))
                    .is_some_and(|m| {
                        m.index == t
                            && m.rule == rule
                            && outcome_kind(&m.actual) == outcome_kind(actual)
                    })
            }
            FindingKind::Panic { backend, message } => {
                let Some(i) = self.index_of(backend) else {
                    return false;
                };
                self.exec
                    .run_on(i, &sc)
                    .is_ok_and(|r| r.panic.as_ref() == Some(message))
            }
            FindingKind::Leak { backend, .. } => {
                let Some(i) = self.index_of(backend) else {
                    return false;
                };
                self.exec.confirm_leak(i, &sc, 3).is_ok_and(|l| l.is_some())
            }
            FindingKind::Hang { .. } => false,
        }
    }

    fn index_of(&self, backend: &str) -> Option<usize> {
        self.exec.names().iter().position(|n| n == backend)
    }

    /// Shrinks `f`'s program to the shortest that still shows it. A hang
    /// is not minimized (its worker is gone).
    pub fn minimize(&mut self, f: &Finding) -> Minimized {
        let target = match &f.kind {
            FindingKind::Difference { index, .. } | FindingKind::Model { index, .. } => {
                Some(*index)
            }
            _ => None,
        };
        let program = f.program.clone();
        if matches!(f.kind, FindingKind::Hang { .. }) {
            return Minimized {
                program,
                target,
                tests: 0,
                elapsed: std::time::Duration::ZERO,
                exhausted: false,
            };
        }
        let budget = self.budget;
        minimize(&program, target, budget, |c, t| self.shows(f, c, t))
    }

    /// The `.gmem` file for a minimized finding: a comment naming the seed
    /// and what each backend gave, then the program with the software
    /// backend's outcomes as expectations (upstream's).
    pub fn corpus_file(&mut self, f: &Finding, m: &Minimized, original_lines: usize) -> String {
        let sc = Arc::new(with_requirements(&m.program));
        let soft = self
            .roles
            .soft
            .and_then(|i| self.exec.run_on(i, &sc).ok())
            .and_then(|r| r.run);
        let kvm = self
            .roles
            .kvm
            .and_then(|i| self.exec.run_on(i, &sc).ok())
            .and_then(|r| r.run);
        let outcomes: Vec<Option<Outcome>> = match &soft {
            Some(r) => r.lines.iter().map(|l| l.actual).collect(),
            None => vec![None; sc.lines.len()],
        };
        let program = with_expectations(&sc, &outcomes);
        let mut cov = Coverage::default();
        if let Some(r) = &soft {
            cov.add(&program, r);
        }
        let covers: Vec<String> = crate::rules::ids()
            .filter(|r| cov.rules.contains_key(r))
            .collect();
        let mut head = Vec::new();
        head.push(format!(
            "Found by `gmem fuzz` from seed {} (`gmem fuzz --seed {} --runs 1` makes the program",
            f.seed, f.seed
        ));
        head.push(format!(
            "again), minimized from {original_lines} lines to {}.",
            program.lines.len()
        ));
        let line_no = |i: usize| program.lines.get(i).map_or(0, |l| l.line);
        match (&f.kind, m.target) {
            (FindingKind::Difference { .. }, Some(t)) => {
                let k = kvm.as_ref().and_then(|r| r.lines.get(t));
                let s = soft.as_ref().and_then(|r| r.lines.get(t));
                head.push(format!(
                    "The software backend (upstream) and the kernel ({}) differ on line {}:",
                    crate::scenario::kernel_release(),
                    line_no(t)
                ));
                head.push(format!(
                    "  soft: {}",
                    s.map_or("not run".into(), |l| show(&l.actual))
                ));
                head.push(format!(
                    "  kvm:  {}{}",
                    k.map_or("not run".into(), |l| show(&l.actual)),
                    k.and_then(|l| l.detail.as_ref())
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ));
            }
            (FindingKind::Model { expected, rule, .. }, Some(t)) => {
                let s = soft.as_ref().and_then(|r| r.lines.get(t));
                head.push(format!(
                    "The software backend departs from the fuzzer's model ({rule}) on line {}:",
                    line_no(t)
                ));
                head.push(format!(
                    "  soft:  {}",
                    s.map_or("not run".into(), |l| show(&l.actual))
                ));
                head.push(format!("  model: {expected}"));
            }
            _ => head.push(f.summary()),
        }
        head.push("Expectations are the software backend's outcomes.".into());
        let mut text: String = head.iter().map(|l| format!("# {l}\n")).collect();
        text.push_str(&format!("# covers: {}\n", covers.join(" ")));
        text.push_str(&super::print::print(&program));
        text
    }
}

/// `sc` with the `require` lines its operations need, so that a backend
/// without a capability skips it instead of failing.
pub fn with_requirements(sc: &Scenario) -> Scenario {
    let mut kinds = Vec::new();
    let mut add = |k: RequireKind| {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    };
    for l in &sc.lines {
        match &l.op {
            Op::CreateVm { vm_type }
                if l.bind.is_some() && *vm_type != KVM_X86_DEFAULT_VM as u64 =>
            {
                add(RequireKind::VmType(*vm_type))
            }
            Op::CreateGuestMemfd { flags, .. } if l.bind.is_some() => {
                for f in [GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED] {
                    if flags & f != 0 {
                        add(RequireKind::GuestMemfdFlag(f));
                    }
                }
            }
            Op::SetMemoryAttributes { .. } => add(RequireKind::MemoryAttributes),
            Op::GuestMapGpaRange { .. } => add(RequireKind::ExitHypercall),
            Op::PreFault { .. } => add(RequireKind::Cap(crate::uapi::KVM_CAP_PRE_FAULT_MEMORY)),
            Op::SetMemoryAttributes2 { .. } | Op::Pin { .. } => add(RequireKind::Cap(
                crate::uapi::KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES,
            )),
            Op::SetMemoryRegion(r) if r.as_id > 0 && r.as_id < 0x7fff => {
                add(RequireKind::AddressSpaces(u64::from(r.as_id) + 1))
            }
            _ => {}
        }
    }
    let mut out = sc.clone();
    out.requires = kinds
        .into_iter()
        .map(|kind| Requirement { line: 1, kind })
        .collect();
    renumber(out)
}

/// A file name for a finding: its signature, made safe, and its seed.
pub fn file_name(f: &Finding) -> String {
    let slug: String = f
        .signature
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut slug = slug
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    slug.truncate(60);
    format!("{}-{}.gmem", slug.trim_end_matches('-'), f.seed)
}
