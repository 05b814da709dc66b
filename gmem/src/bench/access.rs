//! Soft guest accesses against raw loads, by pattern and thread count.
//!
//! Ours: 8-byte guest loads through [`SoftVcpu`]s from a guest_memfd-only
//! slot at gpa 0. Raw: 8-byte volatile loads from anonymous memory of the
//! same size and the same contents. Patterns:
//!
//! - hot: the same word again (each thread its own page);
//! - sequential: every word in turn;
//! - random: a dependent chase through one word of every page, in a random
//!   cyclic order (Sattolo's shuffle), so each load waits for the last,
//!   with a TLB and cache miss each, as a raw dependent random load does.
//!
//! Each thread times its own loads, less what it waited for a core; a
//! round of several threads takes the time their summed throughput gives
//! (the harmonic mean of their times). On this 2-vCPU nested machine the
//! host slows one vCPU or the other for milliseconds at a time: a round
//! timed by its slowest thread would take that whole, and more often for
//! ours than for raw loads, whose loop few disturbances slow.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::{
    bind_shared_file, compare, compare_scaling, runqueue_wait, AccessCell, OnThreads, Pair, Row,
    Scale, Target, Threads, Unit,
};
use crate::error::Result;
use crate::host::Mmap;
use crate::hypervisor::{GuestMemfd, GuestOp, HostMemory, Vcpu, VcpuExit};
use crate::soft::{SoftHypervisor, SoftVcpu, SoftVm};
use crate::uapi::{KVM_X86_DEFAULT_VM, PAGE_SIZE};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// The same word again.
    Hot,
    /// Word after word.
    Sequential,
    /// A dependent chase over every page.
    Random,
}

impl Pattern {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Hot => "hot",
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
        }
    }
}

/// A tiny xorshift: reproducible layouts without an RNG crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The word of page `p` that the random chase visits.
fn chase_word(p: u64) -> u64 {
    (p.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 55) * 8
}

/// A soft VM with `size` bytes of guest memory at gpa 0, its vCPUs, and raw
/// memory of the same size and contents. Dropping it frees both.
pub struct Access {
    vcpus: Vec<SoftVcpu>,
    raw: Mmap,
    size: u64,
    _map: Box<dyn HostMemory>,
    _file: Box<dyn GuestMemfd>,
    _vm: SoftVm,
}

impl Access {
    /// Sets up `size` bytes (a multiple of the page size) and `vcpus`
    /// vCPUs, and writes the random chase into both memories.
    pub fn new(size: u64, vcpus: u64) -> Result<Access> {
        let hv = SoftHypervisor::new()?;
        let vm = hv.create_soft_vm(KVM_X86_DEFAULT_VM as u64)?;
        let (file, map) = bind_shared_file(&vm, 0, size)?;
        let raw = Mmap::anonymous(size)?;
        // Sattolo's shuffle: one cycle through every page.
        let pages = size / PAGE_SIZE;
        let mut next: Vec<u64> = (0..pages).collect();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for i in (1..pages).rev() {
            next.swap(i as usize, rng.below(i) as usize);
        }
        for (p, &q) in next.iter().enumerate() {
            let at = p as u64 * PAGE_SIZE + chase_word(p as u64);
            let to = q * PAGE_SIZE + chase_word(q);
            map.write(at, &to.to_le_bytes())
                .map_err(|f| crate::Error::new(crate::Errno::EFAULT, "bench", f.to_string()))?;
            raw.write(at, &to.to_le_bytes())
                .map_err(|f| crate::Error::new(crate::Errno::EFAULT, "bench", f.to_string()))?;
        }
        let vcpus = (0..vcpus)
            .map(|id| vm.create_soft_vcpu(id))
            .collect::<Result<_>>()?;
        Ok(Access {
            vcpus,
            raw,
            size,
            _map: map,
            _file: file,
            _vm: vm,
        })
    }

    /// Where thread `t` of `threads` starts.
    fn start(&self, pattern: Pattern, t: usize, threads: usize) -> u64 {
        let page = (self.size / PAGE_SIZE) * t as u64 / threads as u64;
        match pattern {
            Pattern::Hot => t as u64 * PAGE_SIZE + 64,
            Pattern::Sequential => page * PAGE_SIZE,
            Pattern::Random => page * PAGE_SIZE + chase_word(page),
        }
    }

    /// `iters` accesses of `pattern` on each of `threads` threads: through
    /// the vCPUs (ours) or as raw loads, from a common start. Each thread's
    /// time is its own, less what it waited for a core; the round's is the
    /// time at the threads' summed throughput (the harmonic mean of theirs).
    pub fn time(&mut self, ours: bool, pattern: Pattern, threads: usize, iters: u64) -> Duration {
        let starts: Vec<u64> = (0..threads)
            .map(|t| self.start(pattern, t, threads))
            .collect();
        let size = self.size;
        let raw = self.raw.as_ptr() as usize;
        let barrier = Barrier::new(threads.min(self.vcpus.len()));
        let times: Vec<f64> = std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(&starts)
                .map(|(vcpu, &at)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let waited = runqueue_wait();
                        let t = Instant::now();
                        if ours {
                            guest_loads(vcpu, pattern, at, size, iters);
                        } else {
                            raw_loads(raw as *const u8, pattern, at, size, iters);
                        }
                        let took = t.elapsed();
                        took.saturating_sub(runqueue_wait().saturating_sub(waited))
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("an access thread panicked").as_secs_f64())
                .collect()
        });
        let rate: f64 = times.iter().map(|t| 1.0 / t.max(1e-9)).sum();
        Duration::from_secs_f64(times.len() as f64 / rate)
    }
}

/// One 8-byte guest load.
#[inline(always)]
fn guest_load(vcpu: &mut SoftVcpu, gpa: u64) -> u64 {
    match vcpu.run(GuestOp::Read { gpa, size: 8 }) {
        Ok(VcpuExit::Done(v)) => v,
        other => failed(gpa, other),
    }
}

#[cold]
#[inline(never)]
fn failed(gpa: u64, got: Result<VcpuExit>) -> ! {
    panic!("guest load at {gpa:#x}: {got:?}")
}

/// Ours: `iters` guest loads through `vcpu`.
fn guest_loads(vcpu: &mut SoftVcpu, pattern: Pattern, mut at: u64, size: u64, iters: u64) {
    let mut load = |gpa: u64| guest_load(vcpu, gpa);
    match pattern {
        Pattern::Hot => {
            for _ in 0..iters {
                black_box(load(black_box(at)));
            }
        }
        Pattern::Sequential => {
            for _ in 0..iters {
                black_box(load(at));
                at += 8;
                if at == size {
                    at = 0;
                }
            }
        }
        Pattern::Random => {
            for _ in 0..iters {
                at = load(at);
            }
            black_box(at);
        }
    }
}

/// The baseline: `iters` raw 8-byte loads from `base`.
fn raw_loads(base: *const u8, pattern: Pattern, mut at: u64, size: u64, iters: u64) {
    // SAFETY: every offset used is 8-byte aligned and below `size`, inside
    // the raw mapping, which outlives the threads that load from it.
    let load = |off: u64| unsafe { base.add(off as usize).cast::<u64>().read_volatile() };
    match pattern {
        Pattern::Hot => {
            for _ in 0..iters {
                black_box(load(black_box(at)));
            }
        }
        Pattern::Sequential => {
            for _ in 0..iters {
                black_box(load(at));
                at += 8;
                if at == size {
                    at = 0;
                }
            }
        }
        Pattern::Random => {
            for _ in 0..iters {
                at = load(at);
            }
            black_box(at);
        }
    }
}

/// Hot guest loads through `&mut dyn Vcpu` (what a VMM holding
/// `Box<dyn Vcpu>` pays: no inlining across the call) against the same
/// loads through the concrete [`SoftVcpu`].
pub struct DynPair<'a>(pub &'a mut Access);

impl Pair for DynPair<'_> {
    fn ours(&mut self, iters: u64) -> Duration {
        let at = self.0.start(Pattern::Hot, 0, 1);
        let vcpu: &mut dyn Vcpu = &mut self.0.vcpus[0];
        let vcpu = black_box(vcpu);
        super::time(|| {
            for _ in 0..iters {
                match vcpu.run(GuestOp::Read {
                    gpa: black_box(at),
                    size: 8,
                }) {
                    Ok(VcpuExit::Done(v)) => {
                        black_box(v);
                    }
                    other => failed(at, other),
                }
            }
        })
    }

    fn baseline(&mut self, iters: u64) -> Duration {
        self.0.time(true, Pattern::Hot, 1, iters)
    }
}

/// A pattern of an [`Access`] on any number of threads, as [`Threads`]:
/// the scaling figure's cells, and (on a fixed count, [`OnThreads`]) each
/// pattern's.
pub struct AccessThreads<'a> {
    /// The memories.
    pub access: &'a mut Access,
    /// The pattern.
    pub pattern: Pattern,
}

impl Threads for AccessThreads<'_> {
    fn ours(&mut self, threads: usize, iters: u64) -> Duration {
        self.access.time(true, self.pattern, threads, iters)
    }

    fn baseline(&mut self, threads: usize, iters: u64) -> Duration {
        self.access.time(false, self.pattern, threads, iters)
    }
}

/// Rounds of the scaling figure: short rounds, many of them, so that the
/// median drops the rounds a change of the machine's speed split.
pub fn scaling_rounds(scale: Scale) -> usize {
    4 * scale.rounds() + 1
}

/// Iterations of each thread in a cell of the scaling figure: about 16 ms
/// of hot soft guest loads.
pub fn scaling_iters(scale: Scale) -> u64 {
    scale.iters(10_000_000)
}

/// Iterations per round for a pattern: about 20-50 ms of raw loads.
fn iters_for(pattern: Pattern, scale: Scale) -> u64 {
    scale.iters(match pattern {
        Pattern::Hot => 40_000_000,
        Pattern::Sequential => 20_000_000,
        Pattern::Random => 200_000,
    })
}

/// The access figures: the table rows (hot, random, 2 threads vs 1) and
/// every pattern at 1 and 2 threads for the plot (`cells`).
pub fn run(scale: Scale, cells: &mut Vec<AccessCell>) -> Result<Vec<Row>> {
    let mut access = Access::new(scale.big(), 2)?;
    let mut got = Vec::new();
    for pattern in [Pattern::Hot, Pattern::Sequential, Pattern::Random] {
        for threads in [1, 2] {
            let c = compare(
                &mut OnThreads(
                    &mut AccessThreads {
                        access: &mut access,
                        pattern,
                    },
                    threads,
                ),
                iters_for(pattern, scale),
                scale.rounds(),
            );
            // Per access: the time of a round covers `threads` loads per
            // iteration.
            cells.push(AccessCell {
                pattern: pattern.name().into(),
                threads: threads as u32,
                ours: c.ours / threads as f64,
                raw: c.baseline / threads as f64,
            });
            got.push((pattern, threads, c));
        }
    }
    let threads = compare_scaling(
        &mut AccessThreads {
            access: &mut access,
            pattern: Pattern::Hot,
        },
        2,
        scaling_iters(scale),
        scaling_rounds(scale),
    );
    let dyn_hot = compare(
        &mut DynPair(&mut access),
        iters_for(Pattern::Hot, scale),
        scale.rounds(),
    );
    drop(access);
    let find = |p: Pattern, t: usize| {
        got.iter()
            .find(|(gp, gt, _)| *gp == p && *gt == t)
            .map(|g| g.2)
            .expect("every cell was measured")
    };
    let (hot, random) = (find(Pattern::Hot, 1), find(Pattern::Random, 1));
    // Scaling: throughput of 2 threads over 1, ours and raw, in the same
    // rounds; the figure is the median of their per-round ratio.
    let mut scaling = Row::new(
        "soft.access.threads",
        "2 vCPU threads vs 1, hot: scaling, of raw scaling",
        threads.ours,
        Some((threads.baseline, "raw loads")),
        Some(threads.ratio),
        Unit::Factor,
        Target::AtLeast(0.9),
    );
    scaling.note = Some(format!(
        "ratio = median over {} rounds of our / raw scaling, all 4 cells in each",
        scaling_rounds(scale)
    ));
    Ok(vec![
        Row::new(
            "soft.access.hot",
            "soft guest access, 8 bytes, hot",
            hot.ours,
            Some((hot.baseline, "raw load from a slice")),
            Some(hot.ratio),
            Unit::Seconds,
            Target::AtMost(5.0),
        ),
        {
            let mut row = Row::new(
                "soft.access.hot_dyn",
                "soft guest access, hot, through dyn Vcpu",
                dyn_hot.ours,
                Some((hot.baseline, "raw load from a slice")),
                Some(dyn_hot.ratio * hot.ratio),
                Unit::Seconds,
                Target::None,
            );
            row.note = Some(format!(
                "{:.2}x the same loads through SoftVcpu",
                dyn_hot.ratio
            ));
            row
        },
        Row::new(
            "soft.access.random",
            &format!(
                "soft guest access, random over {}",
                super::bytes(scale.big())
            ),
            random.ours,
            Some((random.baseline, "raw dependent random load")),
            Some(random.ratio),
            Unit::Seconds,
            Target::AtMost(1.2),
        ),
        scaling,
    ])
}
