//! Differential execution: one program on each backend, compared line by
//! line.
//!
//! Each backend runs in a worker thread of its own that keeps its
//! [`Hypervisor`] open between programs. The caller waits for a worker with a
//! deadline (a guest run is bounded by the KVM backend itself; a worker that
//! misses the deadline is a hang, and the executor stops using it). A panic
//! in a backend is caught in the worker, reported with its message and
//! location, and the backend is opened afresh. Around every program the
//! worker counts the process's fds (`/proc/self/fd`) and mappings
//! (`/proc/self/maps`); a count that grows is checked by running the
//! program again, and only a growth that repeats is a leak.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hypervisor::Hypervisor;
use crate::scenario::ast::{Op, Outcome, Scenario};
use crate::scenario::report::op_text;
use crate::scenario::run::{run, ScenarioRun};
use crate::Backend;

use super::coverage::{op_name, rule_of};

/// One program on one backend.
#[derive(Debug, Clone)]
pub struct BackendRun {
    /// `soft`, `kvm`, or the name of the model that explains departures.
    pub backend: String,
    /// The runner's result; `None` when the backend panicked.
    pub run: Option<ScenarioRun>,
    /// The panic's message and location.
    pub panic: Option<String>,
    /// Open fds before and after the program.
    pub fds: (usize, usize),
    /// Mappings before and after the program.
    pub maps: (usize, usize),
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl BackendRun {
    /// Did the process hold more fds or mappings after the program?
    pub fn grew(&self) -> bool {
        self.fds.1 > self.fds.0 || self.maps.1 > self.maps.0
    }
}

/// A worker did not answer within its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hang {
    /// The backend whose worker is stuck.
    pub backend: String,
    /// How long the caller waited.
    pub waited: Duration,
}

/// What a backend worker can be: a backend opened by name, or any
/// hypervisor (the model of the recorded departures, a test double).
pub enum Target {
    /// `Backend::open` in the worker, and again after a panic.
    Backend(Backend),
    /// A hypervisor made by this function, again after a panic.
    Custom(
        String,
        Box<dyn Fn() -> crate::Result<Box<dyn Hypervisor>> + Send>,
    ),
}

impl Target {
    /// The worker's name: the backend's, or the one given.
    pub fn name(&self) -> String {
        match self {
            Target::Backend(b) => b.name().to_string(),
            Target::Custom(n, _) => n.clone(),
        }
    }

    /// Opens the hypervisor.
    pub fn open(&self) -> crate::Result<Box<dyn Hypervisor>> {
        match self {
            Target::Backend(b) => b.open(),
            Target::Custom(_, f) => f(),
        }
    }
}

struct Job {
    scenario: Arc<Scenario>,
}

struct Worker {
    name: String,
    jobs: Sender<Job>,
    replies: Receiver<BackendRun>,
    _thread: JoinHandle<()>,
}

/// Runs programs on a fixed list of backends.
///
/// ```
/// use std::sync::Arc;
/// use gmem::fuzz::exec::{Executor, Target};
/// use gmem::Backend;
///
/// let mut exec = Executor::new(vec![Target::Backend(Backend::Soft)]).unwrap();
/// let sc = gmem::scenario::parse("x.gmem", "vm = create_vm\nh = host_memory size=4K\n").unwrap();
/// let runs = exec.run(&Arc::new(sc)).unwrap();
/// assert!(runs[0].panic.is_none());
/// assert_eq!(runs[0].run.as_ref().unwrap().lines.len(), 2);
/// ```
pub struct Executor {
    workers: Vec<Worker>,
    hung: Option<Hang>,
    base: Duration,
}

thread_local! {
    /// Set in worker threads: their panics are recorded here, not printed.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Installs, once, a panic hook that keeps worker panics off stderr (the
/// progress line stays readable) and records their location; other threads
/// keep the hook they had.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_worker = CAUGHT.with(|c| c.borrow().is_some());
            if in_worker {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_string());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                CAUGHT.with(|c| *c.borrow_mut() = Some(Some(format!("{msg}{at}"))));
            } else {
                previous(info);
            }
        }));
    });
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Mappings of this process.
pub fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
}

fn worker_main(
    target: Target,
    mut hv: Box<dyn Hypervisor>,
    jobs: Receiver<Job>,
    out: Sender<BackendRun>,
) {
    CAUGHT.with(|c| *c.borrow_mut() = Some(None));
    let name = target.name();
    while let Ok(job) = jobs.recv() {
        let (fds0, maps0) = (open_fds(), mappings());
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| run(hv.as_ref(), &job.scenario)));
        let elapsed = start.elapsed();
        let (run, panic) = match result {
            Ok(r) => (Some(r), None),
            Err(_) => {
                let msg = CAUGHT
                    .with(|c| c.borrow_mut().replace(None))
                    .flatten()
                    .unwrap_or_else(|| "(no message)".into());
                // The backend's state is not to be trusted after a panic.
                if let Ok(fresh) = target.open() {
                    hv = fresh;
                }
                (None, Some(msg))
            }
        };
        let reply = BackendRun {
            backend: name.clone(),
            run,
            panic,
            fds: (fds0, open_fds()),
            maps: (maps0, mappings()),
            elapsed,
        };
        if out.send(reply).is_err() {
            break;
        }
    }
}

/// How long a program may take on a backend: `base`, and a guest run's
/// bound (1 s on the KVM backend) and some for every guest line.
pub fn deadline(sc: &Scenario, base: Duration) -> Duration {
    let guest = sc
        .lines
        .iter()
        .filter(|l| {
            matches!(
                l.op,
                Op::GuestRead { .. } | Op::GuestWrite { .. } | Op::GuestMapGpaRange { .. }
            )
        })
        .count() as u64;
    base + Duration::from_millis(1500) * guest as u32
}

impl Executor {
    /// Opens every target (in the caller, so that an error is returned
    /// here) and starts one worker per target.
    pub fn new(targets: Vec<Target>) -> crate::Result<Executor> {
        install_panic_hook();
        let mut workers = Vec::new();
        for target in targets {
            let hv = target.open()?;
            let name = target.name();
            let (jobs_tx, jobs_rx) = channel();
            let (out_tx, out_rx) = channel();
            let thread = std::thread::Builder::new()
                .name(format!("fuzz-{name}"))
                .spawn(move || worker_main(target, hv, jobs_rx, out_tx))
                .map_err(|e| {
                    crate::Error::new(
                        crate::Errno::EAGAIN,
                        "kernel",
                        format!("spawning the {name} worker: {e}"),
                    )
                })?;
            workers.push(Worker {
                name,
                jobs: jobs_tx,
                replies: out_rx,
                _thread: thread,
            });
        }
        Ok(Executor {
            workers,
            hung: None,
            base: Duration::from_secs(10),
        })
    }

    /// Sets the time every program is given before its guest lines (10 s).
    pub fn with_base_deadline(mut self, base: Duration) -> Executor {
        self.base = base;
        self
    }

    /// The targets' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.name.clone()).collect()
    }

    /// The hang that stopped this executor, if one did.
    pub fn hung(&self) -> Option<&Hang> {
        self.hung.as_ref()
    }

    /// Runs `sc` on target `i`, waiting at most [`deadline`].
    pub fn run_on(&mut self, i: usize, sc: &Arc<Scenario>) -> Result<BackendRun, Hang> {
        if let Some(h) = &self.hung {
            return Err(h.clone());
        }
        let w = &self.workers[i];
        let hang = |waited| Hang {
            backend: w.name.clone(),
            waited,
        };
        let limit = deadline(sc, self.base);
        if w.jobs
            .send(Job {
                scenario: sc.clone(),
            })
            .is_err()
        {
            return Err(hang(Duration::ZERO));
        }
        match w.replies.recv_timeout(limit) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                let h = hang(limit);
                self.hung = Some(h.clone());
                Err(h)
            }
        }
    }

    /// Runs `sc` on every target, one after the other (so that fd and
    /// mapping counts belong to one backend).
    pub fn run(&mut self, sc: &Arc<Scenario>) -> Result<Vec<BackendRun>, Hang> {
        (0..self.workers.len())
            .map(|i| self.run_on(i, sc))
            .collect()
    }

    /// Runs `sc` on target `i` `times` more times: is the growth of fds or
    /// mappings seen once a leak (it grows every time)? Returns the growth
    /// per run (fds, mappings) when it is.
    pub fn confirm_leak(
        &mut self,
        i: usize,
        sc: &Arc<Scenario>,
        times: usize,
    ) -> Result<Option<(usize, usize)>, Hang> {
        let mut per_run = (usize::MAX, usize::MAX);
        for _ in 0..times {
            let r = self.run_on(i, sc)?;
            if !r.grew() {
                return Ok(None);
            }
            per_run.0 = per_run.0.min(r.fds.1.saturating_sub(r.fds.0));
            per_run.1 = per_run.1.min(r.maps.1.saturating_sub(r.maps.0));
        }
        Ok(Some(per_run))
    }
}

/// Why two backends' outcomes on a line differ, as far as the fuzzer can
/// tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineClass {
    /// A capability the hosts answer differently (`check_extension`), or an
    /// operation one backend says its host does not support.
    Capability(String),
    /// The KVM backend's own rule refused it (`KVM-SETUP`, `gmem-safety`):
    /// a limit of the backend, not of the kernel.
    BackendRule(String),
    /// A known departure of the running kernel, shown by its probe,
    /// explains it (the behaviours' ids).
    Known(String),
    /// The runner did not perform the line on one backend: it could have
    /// taken the program past the runner's memory budget.
    OverBudget,
    /// Nothing explains it: a finding.
    Differs,
}

/// One line on which the reference and the subject differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineDiff {
    /// Index into the program's lines.
    pub index: usize,
    /// The reference's (software backend's) outcome; `None`: not run.
    pub reference: Option<Outcome>,
    /// The subject's (kernel's) outcome.
    pub subject: Option<Outcome>,
    /// The backends' messages.
    pub details: (Option<String>, Option<String>),
    /// Why it differs.
    pub class: LineClass,
    /// What makes two differences "the same": the operation and the kind
    /// of each outcome, `guest_read: 0x.. | exit mmio`.
    pub signature: String,
}

/// A program's lines compared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Comparison {
    /// The lines that differ, up to and including the first that is not
    /// explained or that ends the comparison (a capability, a backend rule).
    pub diffs: Vec<LineDiff>,
    /// Set when a run was skipped for a requirement.
    pub skipped: Option<String>,
}

impl Comparison {
    /// The first difference nothing explains.
    pub fn finding(&self) -> Option<&LineDiff> {
        self.diffs.iter().find(|d| d.class == LineClass::Differs)
    }

    /// The reason the program does not count, when a capability or a
    /// backend rule ended the comparison before any finding.
    pub fn skip_reason(&self) -> Option<String> {
        if let Some(s) = &self.skipped {
            return Some(s.clone());
        }
        match self.diffs.last().map(|d| &d.class) {
            Some(LineClass::Capability(why)) => Some(format!("capability: {why}")),
            Some(LineClass::BackendRule(why)) => Some(format!("backend rule: {why}")),
            Some(LineClass::OverBudget) => Some("over budget: the runner's memory budget".into()),
            _ => None,
        }
    }
}

/// The kind of an outcome, for signatures: values and addresses left out.
pub fn outcome_kind(o: &Option<Outcome>) -> String {
    match o {
        None => "not run".into(),
        Some(Outcome::Ok) => "ok".into(),
        Some(Outcome::Errno { errno }) => crate::error::errno_name(*errno),
        Some(Outcome::Value { .. }) => "value".into(),
        Some(Outcome::Sigbus) => "sigbus".into(),
        Some(Outcome::MemoryFault { flags: 0, .. }) => "memory_fault shared".into(),
        Some(Outcome::MemoryFault { .. }) => "memory_fault private".into(),
        Some(Outcome::Mmio { .. }) => "mmio".into(),
        Some(Outcome::Hypercall { .. }) => "hypercall".into(),
        Some(Outcome::Stat { .. }) => "stat".into(),
        Some(Outcome::Timeout) => "timeout".into(),
        Some(Outcome::Policy { .. }) => "policy".into(),
        Some(Outcome::HypercallReturn { .. }) => "hypercall return".into(),
        Some(Outcome::OverBudget) => "over budget".into(),
    }
}

/// The signature of a difference on line `index` of `sc`: the operation,
/// for a guest access what it reaches (see [`access_context`]), and the
/// kind of each outcome.
pub fn signature(
    sc: &Scenario,
    reference_run: &ScenarioRun,
    index: usize,
    reference: &Option<Outcome>,
    subject: &Option<Outcome>,
) -> String {
    let op = &sc.lines[index].op;
    let context = access_context(sc, reference_run, index)
        .map(|c| format!(" [{c}]"))
        .unwrap_or_default();
    format!(
        "{}{context}: {} | {}",
        op_name(op),
        outcome_kind(reference),
        outcome_kind(subject)
    )
}

/// What a guest access on line `index` reaches, as the program built it
/// (following the reference run's outcomes): no slot, or a slot and its
/// backing, `gmem-only slot, file released, userspace 0`. `None` for a line
/// that is not a guest access.
pub fn access_context(sc: &Scenario, reference: &ScenarioRun, index: usize) -> Option<String> {
    use crate::scenario::ast::{FdRef, Userspace};
    use std::collections::HashMap;
    let (vm, gpa) = match &sc.lines.get(index)?.op {
        Op::GuestRead { vm, gpa } | Op::GuestWrite { vm, gpa, .. } => (vm.clone(), *gpa),
        _ => return None,
    };
    struct File {
        mmap: bool,
        fd_open: bool,
        maps: usize,
        released: bool,
    }
    // name -> file index; mapping name -> Some(file) / host memory -> None.
    let mut files: Vec<File> = Vec::new();
    let mut fds: HashMap<&str, usize> = HashMap::new();
    let mut mems: HashMap<&str, Option<usize>> = HashMap::new();
    let mut closed_mems: Vec<&str> = Vec::new();
    /// gpa, size, file, and `userspace=`: a handle or an address.
    type Slot<'a> = (u64, u64, Option<usize>, Result<&'a str, u64>);
    let mut slots: HashMap<(&str, u32, u32), Slot> = HashMap::new();
    for (line, res) in sc.lines.iter().zip(&reference.lines).take(index) {
        if !res.actual.is_some_and(|a| a.is_success()) {
            continue;
        }
        match &line.op {
            Op::CreateGuestMemfd { flags, .. } => {
                if let Some(b) = &line.bind {
                    fds.insert(b, files.len());
                    files.push(File {
                        mmap: flags & crate::uapi::GUEST_MEMFD_FLAG_MMAP != 0,
                        fd_open: true,
                        maps: 0,
                        released: false,
                    });
                }
            }
            Op::HostMemory { .. } => {
                if let Some(b) = &line.bind {
                    mems.insert(b, None);
                }
            }
            Op::Mmap { gmem, .. } => {
                if let (Some(b), Some(&f)) = (&line.bind, fds.get(gmem.as_str())) {
                    files[f].maps += 1;
                    mems.insert(b, Some(f));
                }
            }
            Op::SetMemoryRegion(r) => {
                let key = (r.vm.as_str(), r.as_id, r.slot);
                if r.size == 0 {
                    slots.remove(&key);
                    continue;
                }
                let file = match &r.guest_memfd {
                    FdRef::Handle(h) if r.flags & crate::uapi::KVM_MEM_GUEST_MEMFD != 0 => {
                        fds.get(h.as_str()).copied()
                    }
                    _ => None,
                };
                let user = match &r.userspace {
                    Userspace::Handle(h) => Ok(h.as_str()),
                    Userspace::Addr(a) => Err(a.wrapping_add(r.userspace_offset)),
                };
                slots.insert(key, (r.gpa, r.size, file, user));
            }
            Op::Close { handle } => {
                let h = handle.as_str();
                if let Some(f) = fds.remove(h) {
                    files[f].fd_open = false;
                    files[f].released = files[f].maps == 0;
                }
                if let Some(m) = mems.remove(h) {
                    closed_mems.push(h);
                    if let Some(f) = m {
                        files[f].maps -= 1;
                        files[f].released = !files[f].fd_open && files[f].maps == 0;
                    }
                }
            }
            _ => {}
        }
    }
    let slot = slots
        .iter()
        .find(|((v, a, _), (base, size, _, _))| {
            *v == vm && *a == 0 && gpa >= *base && gpa - base < *size
        })
        .map(|(_, s)| *s);
    let Some((_, _, file, user)) = slot else {
        return Some("no slot".into());
    };
    let mut parts = Vec::new();
    match file {
        Some(f) if files[f].mmap => parts.push("gmem-only slot"),
        Some(_) => parts.push("gmem slot"),
        None => parts.push("plain slot"),
    }
    if file.is_some_and(|f| files[f].released) {
        parts.push("file released");
    }
    parts.push(match user {
        Err(0) => "userspace 0",
        Err(_) => "userspace address",
        Ok(h) if closed_mems.contains(&h) => "userspace unmapped",
        Ok(h) => match mems.get(h) {
            Some(Some(m)) if file == Some(*m) => "userspace own mapping",
            Some(Some(_)) => "userspace other mapping",
            _ => "userspace host memory",
        },
    });
    Some(parts.join(", "))
}

/// Compares the reference's run (the software backend) with the subject's
/// (the kernel) line by line. `known[i]`, when given, names the known
/// departures that explain line i (see [`super::campaign`]); such a line
/// is not a finding. The comparison stops at the first difference that is
/// not explained.
pub fn compare(
    sc: &Scenario,
    reference: &ScenarioRun,
    subject: &ScenarioRun,
    known: &[Option<String>],
) -> Comparison {
    if let Some(s) = reference.skipped.as_ref().or(subject.skipped.as_ref()) {
        return Comparison {
            diffs: Vec::new(),
            skipped: Some(s.clone()),
        };
    }
    let mut diffs = Vec::new();
    for (i, line) in sc.lines.iter().enumerate() {
        let (Some(a), Some(b)) = (reference.lines.get(i), subject.lines.get(i)) else {
            break;
        };
        if a.actual == b.actual {
            continue;
        }
        let detail_b = b.detail.clone().unwrap_or_default();
        let detail_a = a.detail.clone().unwrap_or_default();
        let class =
            if a.actual == Some(Outcome::OverBudget) || b.actual == Some(Outcome::OverBudget) {
                LineClass::OverBudget
            } else if matches!(line.op, Op::CheckExtension { .. }) {
                LineClass::Capability("check_extension answers per host".into())
            } else if matches!(rule_of(&detail_b), Some("KVM-SETUP" | "gmem-safety")) {
                LineClass::BackendRule(detail_b.clone())
            } else if detail_b.contains("not supported by this")
                || detail_a.contains("not supported by this")
            {
                LineClass::Capability(format!("{detail_a}{detail_b}"))
            } else if let Some(Some(why)) = known.get(i) {
                LineClass::Known(why.clone())
            } else {
                LineClass::Differs
            };
        let stop = !matches!(class, LineClass::Known(_));
        diffs.push(LineDiff {
            index: i,
            reference: a.actual,
            subject: b.actual,
            details: (a.detail.clone(), b.detail.clone()),
            class,
            signature: signature(sc, reference, i, &a.actual, &b.actual),
        });
        if stop {
            break;
        }
    }
    Comparison {
        diffs,
        skipped: None,
    }
}

/// What a finding is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// The backends disagree on line `index`, and nothing explains it.
    Difference {
        /// Index into the program's lines.
        index: usize,
        /// The software backend's outcome there.
        reference: Option<Outcome>,
        /// The kernel's outcome there.
        subject: Option<Outcome>,
        /// The subject's message.
        detail: Option<String>,
    },
    /// The software backend disagrees with the simple model on line `index`.
    Model {
        /// Index into the program's lines.
        index: usize,
        /// What the model says.
        expected: Outcome,
        /// What the software backend gave.
        actual: Option<Outcome>,
        /// Which rule of the model.
        rule: String,
    },
    /// A backend panicked.
    Panic {
        /// The backend.
        backend: String,
        /// Message and location.
        message: String,
    },
    /// A backend's worker did not answer in time.
    Hang {
        /// The backend.
        backend: String,
        /// How long it was given.
        waited: Duration,
    },
    /// Running the program leaves fds or mappings behind, every time.
    Leak {
        /// The backend.
        backend: String,
        /// Fds left per run.
        fds: usize,
        /// Mappings left per run.
        maps: usize,
    },
}

/// Something the fuzzer found, with the program that shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What.
    pub kind: FindingKind,
    /// The program's seed.
    pub seed: u64,
    /// The program (minimized, once [`super::minimize`] has run).
    pub program: Scenario,
    /// Dedup key: findings with the same signature are the same problem.
    pub signature: String,
}

impl Finding {
    /// A difference on `diff.index` of `program`.
    pub fn difference(seed: u64, program: Scenario, diff: &LineDiff) -> Finding {
        Finding {
            kind: FindingKind::Difference {
                index: diff.index,
                reference: diff.reference,
                subject: diff.subject,
                detail: diff.details.1.clone(),
            },
            seed,
            program,
            signature: diff.signature.clone(),
        }
    }

    /// One line saying what was found.
    pub fn summary(&self) -> String {
        match &self.kind {
            FindingKind::Difference {
                index,
                reference,
                subject,
                ..
            } => format!(
                "{}: soft {}, kvm {}",
                self.line_label(*index),
                show(reference),
                show(subject)
            ),
            FindingKind::Model {
                index,
                expected,
                actual,
                rule,
            } => format!(
                "{}: the model says {expected} ({rule}), soft gives {}",
                self.line_label(*index),
                show(actual)
            ),
            FindingKind::Panic { backend, message } => format!("{backend} panicked: {message}"),
            FindingKind::Hang { backend, waited } => {
                format!("{backend} did not finish within {:.0?}", waited)
            }
            FindingKind::Leak { backend, fds, maps } => {
                format!("{backend} leaks {fds} fd(s) and {maps} mapping(s) per run")
            }
        }
    }

    /// `line N: `op``: where in the program, the line without its outcome.
    fn line_label(&self, index: usize) -> String {
        let line = self.program.lines.get(index);
        let op = op_text(line.map_or("", |l| l.text.as_str()));
        format!("line {}: `{op}`", line.map_or(0, |l| l.line))
    }
}

/// An outcome as a scenario writes it, or `not run`.
pub fn show(o: &Option<Outcome>) -> String {
    o.map_or_else(|| "not run".to_string(), |o| o.to_string())
}

/// What one program came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every line agreed (or every difference is a recorded departure).
    Agree {
        /// Lines explained by recorded departures.
        known: usize,
    },
    /// A capability or the KVM backend's own rule decided the difference.
    Skipped(String),
    /// Something to report.
    Found(Box<Finding>),
}

/// Counts kept across a campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Programs run.
    pub runs: u64,
    /// Programs whose lines all agreed.
    pub agreed: u64,
    /// Programs skipped, by reason kind.
    pub skipped: BTreeMap<String, u64>,
    /// Lines explained by recorded departures.
    pub known: u64,
    /// Findings by signature: how many programs showed each.
    pub findings: BTreeMap<String, u64>,
}
