//! Performance figures: each one measures gmem against a baseline in the
//! same run and reports the ratio, so that a busy machine moves both sides
//! alike. `gmem bench` runs the whole set and prints the table; the
//! criterion benches in `benches/` drive the same code.
//!
//! A figure is a pair of workloads ([`Pair`]): ours and its baseline, each
//! timed for a number of iterations. [`compare`] alternates them over
//! several rounds and keeps the median of the per-round ratios. A scaling
//! figure ([`compare_scaling`]) times four cells in every round, ours and
//! the baseline on one thread and on several ([`Threads`]), and keeps the
//! median of the per-round ratio of the two scalings.
//!
//! - [`access`]: soft guest accesses (hot, sequential, random over 1 GiB;
//!   1 and 2 vCPU threads) against raw loads.
//! - [`convert`]: attribute conversions from 4 KiB to 1 TiB against a
//!   per-page map (the kernel's per-page xarray).
//! - [`falloc`]: fallocate allocate and punch of 1 GiB against a raw memfd.
//! - [`start`]: VM creation to the first guest access with 1 GiB bound.
//! - [`kvm`]: one KVM guest access against a raw `KVM_SET_REGS` +
//!   `KVM_RUN`, and guest first touch of 1 GiB.
//! - [`populate`]: a soft guest loop filling 1 GiB through the memory
//!   manager's guest_memfd and split backings against a raw fill of the
//!   same memory from the host, 1 and 2 vCPUs.

pub mod access;
pub mod convert;
pub mod falloc;
pub mod kvm;
pub mod populate;
pub mod start;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::hypervisor::{GuestMemfd, HostMemory, MapKind, Vm};
use crate::uapi::{
    guest_memfd_region, kvm_create_guest_memfd, kvm_userspace_memory_region2,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};

/// A fresh `size`-byte MMAP | INIT_SHARED guest_memfd of `vm`, bound as
/// slot 0 at `gpa` through its own shared mapping, which both backends
/// serve alike (on kernels with FAULT-3 too): the file and the mapping.
pub fn bind_shared_file(
    vm: &dyn Vm,
    gpa: u64,
    size: u64,
) -> Result<(Box<dyn GuestMemfd>, Box<dyn HostMemory>)> {
    let file = vm.create_guest_memfd(kvm_create_guest_memfd {
        size,
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        ..Default::default()
    })?;
    let map = file.mmap(0, size, MapKind::Shared)?;
    vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        userspace_addr: map.addr(),
        ..guest_memfd_region(0, gpa, size, file.as_raw_fd(), 0)
    })?;
    Ok((file, map))
}

/// A workload and its baseline, timed alike.
pub trait Pair {
    /// Runs ours `iters` times; the time taken.
    fn ours(&mut self, iters: u64) -> Duration;
    /// Runs the baseline `iters` times; the time taken.
    fn baseline(&mut self, iters: u64) -> Duration;
}

/// Medians over the rounds of one comparison.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Compared {
    /// Seconds per iteration of ours.
    pub ours: f64,
    /// Seconds per iteration of the baseline.
    pub baseline: f64,
    /// Median of the per-round ratios ours / baseline.
    pub ratio: f64,
}

/// Alternates ours and the baseline `rounds` times, `iters` iterations
/// each (the first round of each warms up and is not counted).
pub fn compare(pair: &mut dyn Pair, iters: u64, rounds: usize) -> Compared {
    pair.ours(iters.div_ceil(4));
    pair.baseline(iters.div_ceil(4));
    let mut ours = Vec::with_capacity(rounds);
    let mut base = Vec::with_capacity(rounds);
    let mut ratio = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Alternate which goes first, so neither always follows the other.
        let (o, b) = if round % 2 == 0 {
            let o = pair.ours(iters);
            (o, pair.baseline(iters))
        } else {
            let b = pair.baseline(iters);
            (pair.ours(iters), b)
        };
        let (o, b) = (per_iter(o, iters), per_iter(b, iters));
        ours.push(o);
        base.push(b);
        ratio.push(o / b);
    }
    Compared {
        ours: median(&mut ours),
        baseline: median(&mut base),
        ratio: median(&mut ratio),
    }
}

/// A workload and its baseline that run on any number of threads, each
/// thread doing the same number of iterations: a scaling figure.
pub trait Threads {
    /// Runs ours on `threads` threads, `iters` iterations each; the time
    /// of the round.
    fn ours(&mut self, threads: usize, iters: u64) -> Duration;
    /// Runs the baseline alike.
    fn baseline(&mut self, threads: usize, iters: u64) -> Duration;
}

/// A [`Threads`] workload on a fixed number of threads, as a [`Pair`].
pub struct OnThreads<'a>(pub &'a mut dyn Threads, pub usize);

impl Pair for OnThreads<'_> {
    fn ours(&mut self, iters: u64) -> Duration {
        self.0.ours(self.1, iters)
    }

    fn baseline(&mut self, iters: u64) -> Duration {
        self.0.baseline(self.1, iters)
    }
}

/// Medians over the rounds of one scaling comparison.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scaled {
    /// Throughput of the threads over that of one thread, ours.
    pub ours: f64,
    /// The same for the baseline.
    pub baseline: f64,
    /// Median of the per-round ratios ours scaling / baseline scaling.
    pub ratio: f64,
}

/// Times ours and the baseline on one thread and on `threads` threads in
/// each of `rounds` rounds (after a warm-up round), and compares how they
/// scale. All four cells of a round run back to back, the two of each
/// thread count next to each other, in an order that turns over from round
/// to round: a change of the machine's speed (what else runs, where the
/// host puts our threads) lasts milliseconds to seconds, so it hits the
/// cells of one round alike and cancels in that round's ratio, and the
/// median drops the rounds it split. The baseline runs as many iterations
/// as take it as long as ours (measured in the warm-up), so that a
/// disturbance is as likely to land in either.
pub fn compare_scaling(
    pair: &mut dyn Threads,
    threads: usize,
    iters: u64,
    rounds: usize,
) -> Scaled {
    let warm = iters.div_ceil(4);
    let warm_ours =
        per_iter(pair.ours(1, warm), warm).min(per_iter(pair.ours(threads, warm), warm));
    let warm_base =
        per_iter(pair.baseline(1, warm), warm).min(per_iter(pair.baseline(threads, warm), warm));
    let base_iters = if warm_base > 0.0 {
        ((iters as f64 * warm_ours / warm_base).round() as u64).max(1)
    } else {
        iters
    };
    let (mut ours, mut base, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // [ours one, ours many, baseline one, baseline many], per iteration.
        let mut cell = [0.0; 4];
        let counts = if round % 2 == 0 {
            [1, threads]
        } else {
            [threads, 1]
        };
        for n in counts {
            let many = usize::from(n != 1);
            let (o, b) = if (round / 2) % 2 == 0 {
                let o = pair.ours(n, iters);
                (o, pair.baseline(n, base_iters))
            } else {
                let b = pair.baseline(n, base_iters);
                (pair.ours(n, iters), b)
            };
            cell[many] = per_iter(o, iters);
            cell[2 + many] = per_iter(b, base_iters);
        }
        let o = threads as f64 * cell[0] / cell[1];
        let b = threads as f64 * cell[2] / cell[3];
        ours.push(o);
        base.push(b);
        ratio.push(o / b);
    }
    Scaled {
        ours: median(&mut ours),
        baseline: median(&mut base),
        ratio: median(&mut ratio),
    }
}

/// How long the calling thread has been runnable but waiting for a core
/// (`/proc/thread-self/schedstat`, second field; `Duration::ZERO` where the
/// kernel does not keep it). Timings of threads leave it out: on a machine
/// shared with builds a thread waits for a core for a tenth or more of a
/// round, more than what a figure measures, while time it blocks (on a
/// lock, a futex) or spins still counts.
pub fn runqueue_wait() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = stat
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

fn per_iter(d: Duration, iters: u64) -> f64 {
    d.as_secs_f64() / iters.max(1) as f64
}

/// The median (the mean of the middle two for an even count).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `f` once.
pub fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Times `f` once, passing its error on.
pub fn timed<T>(f: impl FnOnce() -> crate::Result<T>) -> crate::Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// What a figure must reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// The ratio must be at most this.
    AtMost(f64),
    /// The ratio must be at least this.
    AtLeast(f64),
    /// Ours (seconds) must be below this.
    Under(f64),
    /// Reported only.
    None,
}

impl Target {
    /// Is the row within its target? `None` when there is nothing to meet.
    pub fn met(self, ours: f64, ratio: Option<f64>) -> Option<bool> {
        match (self, ratio) {
            (Target::AtMost(t), Some(r)) => Some(r <= t),
            (Target::AtLeast(t), Some(r)) => Some(r >= t),
            (Target::Under(t), _) => Some(ours < t),
            _ => None,
        }
    }
}

/// How a row's values read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Seconds, shown scaled (ns, us, ms, s).
    Seconds,
    /// A plain number (a scaling factor).
    Factor,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Short stable name (`soft.access.hot`).
    pub id: String,
    /// What is measured, for people.
    pub figure: String,
    /// Our value.
    pub ours: f64,
    /// The baseline measured in the same run, if the figure has one.
    pub baseline: Option<f64>,
    /// What the baseline is.
    pub baseline_is: String,
    /// ours / baseline, or the figure's own ratio.
    pub ratio: Option<f64>,
    /// The unit of `ours` and `baseline`.
    pub unit: Unit,
    /// The target.
    pub target: Target,
    /// Within the target? `None`: nothing to meet, or not measured.
    pub met: Option<bool>,
    /// Why the figure was not measured, or what to know about it.
    pub note: Option<String>,
}

impl Row {
    /// A measured row; `met` follows from the target.
    pub fn new(
        id: &str,
        figure: &str,
        ours: f64,
        baseline: Option<(f64, &str)>,
        ratio: Option<f64>,
        unit: Unit,
        target: Target,
    ) -> Row {
        Row {
            id: id.into(),
            figure: figure.into(),
            ours,
            baseline: baseline.map(|b| b.0),
            baseline_is: baseline.map_or(String::new(), |b| b.1.into()),
            ratio,
            unit,
            target,
            met: target.met(ours, ratio),
            note: None,
        }
    }

    /// A row whose figure could not be measured here, and why.
    pub fn skipped(id: &str, figure: &str, target: Target, why: String) -> Row {
        Row {
            id: id.into(),
            figure: figure.into(),
            ours: f64::NAN,
            baseline: None,
            baseline_is: String::new(),
            ratio: None,
            unit: Unit::Seconds,
            target,
            met: None,
            note: Some(why),
        }
    }
}

/// One point of a curve for the plots.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// x (bytes, or a thread count).
    pub x: f64,
    /// y (seconds).
    pub y: f64,
}

/// A named series of points.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Measured points.
    pub points: Vec<Point>,
    /// Points computed from the measured ones (drawn dashed).
    pub modelled: Vec<Point>,
}

/// Everything a run produced: the table and the data of the plots.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The table.
    pub rows: Vec<Row>,
    /// Conversion cost against range size: ours, and the per-page map.
    pub conversion: Vec<Series>,
    /// Access cost by pattern and thread count, ours and raw: wall time
    /// divided by the accesses of all threads.
    pub access: Vec<AccessCell>,
    /// Rows that met their target, missed it, and had none or were skipped.
    pub summary: Summary,
}

/// One bar of the access plot.
#[derive(Debug, Clone, Serialize)]
pub struct AccessCell {
    /// `hot`, `sequential` or `random`.
    pub pattern: String,
    /// vCPU threads (raw threads for the baseline).
    pub threads: u32,
    /// Seconds per access, ours.
    pub ours: f64,
    /// Seconds per access, raw loads.
    pub raw: f64,
}

/// Counts of the table.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// Rows within their target.
    pub met: usize,
    /// Rows outside their target.
    pub missed: usize,
    /// Rows with no target, or not measured here.
    pub other: usize,
}

impl Report {
    /// Fills in the summary from the rows.
    pub fn summarize(&mut self) {
        let mut s = Summary::default();
        for r in &self.rows {
            match r.met {
                Some(true) => s.met += 1,
                Some(false) => s.missed += 1,
                None => s.other += 1,
            }
        }
        self.summary = s;
    }
}

/// How long the run may take: `Quick` for tests and smoke runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The full set as documented (1 GiB, many rounds).
    Full,
    /// Small sizes and few rounds: checks that every figure runs.
    Quick,
}

impl Scale {
    /// Bytes of the "1 GiB" figures.
    pub fn big(self) -> u64 {
        match self {
            Scale::Full => 1 << 30,
            Scale::Quick => 16 << 20,
        }
    }

    /// Rounds of each comparison.
    pub fn rounds(self) -> usize {
        match self {
            Scale::Full => 9,
            Scale::Quick => 3,
        }
    }

    /// Scales an iteration count.
    pub fn iters(self, full: u64) -> u64 {
        match self {
            Scale::Full => full,
            Scale::Quick => (full / 100).max(1),
        }
    }
}

/// One step of a run, for progress display.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// The figures in the order `gmem bench` runs them.
pub const STEPS: &[&str] = &[
    "soft access: hot, sequential, random; 1 and 2 vCPUs",
    "conversion cost by size",
    "fallocate 1 GiB (soft)",
    "fallocate 1 GiB (kvm)",
    "VM creation to first access",
    "kvm: one guest access",
    "guest first touch of 1 GiB",
    "soft guest fill of 1 GiB through the memory manager",
];

/// Runs every figure; `progress` is told each step as it starts.
pub fn run(scale: Scale, progress: Progress<'_>) -> Report {
    let mut report = Report::default();
    let mut step = 0;
    let mut next = |progress: &mut dyn FnMut(&str)| {
        progress(STEPS[step]);
        step += 1;
    };
    let rows = &mut report.rows;
    let keep = |r: crate::Result<Vec<Row>>, id: &str, figure: &str, rows: &mut Vec<Row>| match r {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(Row::skipped(id, figure, Target::None, e.to_string())),
    };
    next(progress);
    let mut cells = Vec::new();
    let r = access::run(scale, &mut cells);
    keep(r, "soft.access", "soft guest access", rows);
    report.access = cells;
    next(progress);
    match convert::run(scale) {
        Ok((r, series)) => {
            rows.extend(r);
            report.conversion = series;
        }
        Err(e) => rows.push(Row::skipped(
            "soft.convert",
            "conversion",
            Target::None,
            e.to_string(),
        )),
    }
    next(progress);
    let r = falloc::run(crate::Backend::Soft, scale);
    keep(r, "soft.fallocate", "fallocate (soft)", rows);
    next(progress);
    let r = falloc::run(crate::Backend::Kvm, scale);
    keep(r, "kvm.fallocate", "fallocate (kvm)", rows);
    next(progress);
    rows.extend(start::run(scale));
    next(progress);
    rows.extend(kvm::access(scale));
    next(progress);
    rows.extend(kvm::first_touch(scale));
    next(progress);
    rows.extend(populate::run(scale));
    report.summarize();
    report
}

/// `n` bytes as people write them: `4 KiB`, `1 GiB`, `1 TiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut i = 0;
    let mut v = n;
    while i + 1 < UNITS.len() && v >= 1024 && v % 1024 == 0 {
        v /= 1024;
        i += 1;
    }
    format!("{v} {}", UNITS[i])
}

/// Seconds as people read them: `2.1 ns`, `37 us`, `1.7 ms`.
pub fn seconds(s: f64) -> String {
    let (v, unit) = match s {
        s if s.is_nan() => return "-".into(),
        s if s < 1e-6 => (s * 1e9, "ns"),
        s if s < 1e-3 => (s * 1e6, "us"),
        s if s < 1.0 => (s * 1e3, "ms"),
        s => (s, "s"),
    };
    // 99.99999 reads as 100, not 100.0.
    let v = (v * 1e6).round() / 1e6;
    if v < 10.0 {
        format!("{v:.2} {unit}")
    } else if v < 100.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_as_people_write_them() {
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(1 << 40), "1 TiB");
        assert_eq!(bytes(3 << 20), "3 MiB");
        assert_eq!(seconds(2.1e-9), "2.10 ns");
        assert_eq!(seconds(1e-4), "100 us");
        assert_eq!(seconds(0.0371), "37.1 ms");
        assert_eq!(seconds(f64::NAN), "-");
    }

    #[test]
    fn targets_are_met_by_their_own_measure() {
        assert_eq!(Target::AtMost(5.0).met(1.0, Some(4.9)), Some(true));
        assert_eq!(Target::AtMost(5.0).met(1.0, Some(5.1)), Some(false));
        assert_eq!(Target::AtLeast(0.95).met(1.0, Some(0.9)), Some(false));
        assert_eq!(Target::Under(0.010).met(0.002, None), Some(true));
        assert_eq!(Target::None.met(1.0, Some(1.0)), None);
    }

    /// A pair whose ours costs twice its baseline, in fake time.
    struct Twice;

    impl Pair for Twice {
        fn ours(&mut self, iters: u64) -> Duration {
            Duration::from_nanos(2 * iters)
        }
        fn baseline(&mut self, iters: u64) -> Duration {
            Duration::from_nanos(iters)
        }
    }

    /// Ours: 3 ns an iteration on one thread, 4 ns on each of two (1.5
    /// times the throughput). The baseline: 1 ns on any (twice).
    struct Scales;

    impl Threads for Scales {
        fn ours(&mut self, threads: usize, iters: u64) -> Duration {
            Duration::from_nanos(if threads == 1 { 3 } else { 4 } * iters)
        }
        fn baseline(&mut self, _threads: usize, iters: u64) -> Duration {
            Duration::from_nanos(iters)
        }
    }

    #[test]
    fn compare_scaling_reports_both_scalings_and_their_ratio() {
        let s = compare_scaling(&mut Scales, 2, 1000, 5);

        assert!((s.ours - 1.5).abs() < 1e-6, "{s:?}");
        assert!((s.baseline - 2.0).abs() < 1e-6, "{s:?}");
        assert!((s.ratio - 0.75).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn compare_reports_medians_per_iteration_and_the_ratio() {
        let c = compare(&mut Twice, 1000, 5);

        assert!((c.ratio - 2.0).abs() < 1e-9, "{c:?}");
        assert!((c.ours - 2e-9).abs() < 1e-15, "{c:?}");
        assert!((c.baseline - 1e-9).abs() < 1e-15, "{c:?}");
        assert_eq!(median(&mut [3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
