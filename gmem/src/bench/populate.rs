//! A guest loop filling RAM through the memory manager's backings on the
//! software backend, against a raw fill of the same memory from the host,
//! in the same run: what `gmem run` measures when it populates.
//!
//! Ours: [`MemoryManager::run_loop`] of a [`GuestLoop::Fill`] on each of
//! `threads` vCPUs, one share of RAM each, as `gmem run` does. Raw: as many
//! host threads storing the same words (`GuestLoop::pattern`) into the same
//! shares through the manager's host mapping (the guest_memfd's own mapping,
//! or the anonymous memory of the split backing). Both fill the same pages,
//! so the ratio is what the guest loop adds: its cache lookup and access
//! epoch once a page, nothing per word.
//!
//! Fresh rounds discard all of RAM before each fill (untimed), so each side
//! pays the kernel's first touch of every page, as populating does; refill
//! rounds fill memory that is already there (the loop's own cost against
//! memory bandwidth). A fill's time is its slowest thread's, from a common
//! start, less the time that thread waited for a core
//! (`/proc/thread-self/schedstat`).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::{compare, runqueue_wait, Pair, Row, Scale, Target, Unit};
use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestLoop, Vcpu};
use crate::memory::{BackingMode, BackingRequest, GuestAddress, GuestRange, Layout, MemoryManager};
use crate::uapi::PAGE_SIZE;
use vm_memory::GuestMemoryBackend;

/// The seed of every fill.
const SEED: u64 = 0x706f_7075_6c61_7465;

/// A soft VM built by the memory manager on one backing, with its vCPUs.
pub struct Populate {
    vcpus: Vec<Box<dyn Vcpu>>,
    mm: MemoryManager,
    /// RAM, each range with the host address of its first byte.
    ram: Vec<(GuestRange, usize)>,
}

impl Populate {
    /// `size` bytes of RAM (a multiple of the page size) on `mode`, and
    /// `vcpus` vCPUs.
    pub fn new(mode: BackingMode, size: u64, vcpus: u64) -> Result<Populate> {
        let hv = crate::Backend::Soft.open()?;
        let failed = |e: crate::memory::Error| Error::new(Errno::EINVAL, "bench", e.to_string());
        let layout = Layout::builder()
            .memory(size)
            .backing(BackingRequest::Mode(mode))
            .build()
            .map_err(failed)?;
        let mm = MemoryManager::new(&*hv, layout).map_err(failed)?;
        let ram = mm
            .guest_memory()
            .iter()
            .map(|r| (r.range(), r.host_address().0 as usize))
            .collect();
        let vcpus = (0..vcpus)
            .map(|id| mm.vm().create_vcpu(id))
            .collect::<Result<_>>()?;
        Ok(Populate { vcpus, mm, ram })
    }

    /// Each of `threads` threads' share of RAM: about equal, page aligned,
    /// as pieces with their host addresses.
    fn shares(&self, threads: usize) -> Vec<Vec<(GuestRange, usize)>> {
        let total: u64 = self.ram.iter().map(|(r, _)| r.len).sum();
        let per = (total / threads as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut out = vec![Vec::new(); threads];
        let (mut t, mut room) = (0, per);
        for &(r, hva) in &self.ram {
            let mut at = 0;
            while at < r.len {
                let take = if t + 1 == threads {
                    r.len - at
                } else {
                    (r.len - at).min(room)
                };
                let piece = GuestRange::new(GuestAddress(r.start.0 + at), take);
                out[t].push((piece, hva + at as usize));
                at += take;
                room -= take;
                if room == 0 && t + 1 < threads {
                    t += 1;
                    room = per;
                }
            }
        }
        out
    }

    /// Fills all of RAM on `threads` threads: through the vCPUs' guest
    /// loops (`guest`) or from the host, from a common start. The time of
    /// the slowest thread, less what it spent waiting for a core.
    pub fn fill(&mut self, guest: bool, threads: usize) -> Result<Duration> {
        let threads = threads.clamp(1, self.vcpus.len());
        let shares = self.shares(threads);
        let barrier = Barrier::new(threads);
        let mm = &self.mm;
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(&shares)
                .map(|(vcpu, pieces)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let (t, waited) = (Instant::now(), runqueue_wait());
                        if guest {
                            guest_fill(mm, &mut **vcpu, pieces)?;
                        } else {
                            raw_fill(pieces);
                        }
                        let waited = runqueue_wait().saturating_sub(waited);
                        Ok(t.elapsed().saturating_sub(waited))
                    })
                })
                .collect();
            workers.into_iter().try_fold(Duration::ZERO, |slowest, w| {
                Ok(slowest.max(w.join().expect("a fill thread panicked")?))
            })
        })
    }

    /// Returns every page of RAM to the host (the next fill touches fresh
    /// memory).
    pub fn discard(&self) -> Result<()> {
        for &(r, _) in &self.ram {
            self.mm
                .discard(r)
                .map_err(|e| Error::new(Errno::EIO, "bench", e.to_string()))?;
        }
        Ok(())
    }

    /// Words of RAM that do not hold the fill's pattern, read from the
    /// host through the manager.
    pub fn wrong_words(&self) -> Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut wrong = 0;
        for &(r, _) in &self.ram {
            let mut at = r.start.0;
            while at < r.start.0 + r.len {
                let n = ((r.start.0 + r.len - at) as usize).min(buf.len());
                self.mm
                    .read(GuestAddress(at), &mut buf[..n])
                    .map_err(|e| Error::new(Errno::EIO, "bench", e.to_string()))?;
                for (i, w) in buf[..n].chunks_exact(8).enumerate() {
                    let want = GuestLoop::pattern(at + 8 * i as u64, SEED);
                    wrong += u64::from(u64::from_le_bytes(w.try_into().expect("8 bytes")) != want);
                }
                at += n as u64;
            }
        }
        Ok(wrong)
    }
}

/// Ours: one guest loop per piece, through the manager.
fn guest_fill(
    mm: &MemoryManager,
    vcpu: &mut dyn Vcpu,
    pieces: &[(GuestRange, usize)],
) -> Result<()> {
    for (piece, _) in pieces {
        let op = GuestLoop::Fill {
            gpa: piece.start.0,
            len: piece.len,
            seed: SEED,
        };
        mm.run_loop(vcpu, op)
            .map_err(|e| Error::new(Errno::EIO, "bench", e.to_string()))?;
    }
    Ok(())
}

/// The baseline: the same words stored from the host, one volatile 8-byte
/// store each, as a device model's `VolatileSlice` writes. The seed is
/// opaque to the compiler, as the guest loop's is: a constant one lets it
/// fold the pattern into fewer instructions than the loop can.
fn raw_fill(pieces: &[(GuestRange, usize)]) {
    let seed = std::hint::black_box(SEED);
    for &(piece, hva) in pieces {
        let p = hva as *mut u64;
        for i in 0..(piece.len / 8) as usize {
            let word = GuestLoop::pattern(piece.start.0 + 8 * i as u64, seed);
            // SAFETY: `hva` is the manager's host mapping of `piece`, shared
            // memory of a live region (the `Populate` outlives the threads),
            // 8-byte aligned, `piece.len` bytes long.
            unsafe { p.add(i).write_volatile(word) };
        }
    }
}

/// One fill of a [`Populate`], ours against raw, as a [`Pair`]: `fresh`
/// discards RAM before each fill (not timed).
pub struct PopulatePair<'a> {
    /// The VM.
    pub populate: &'a mut Populate,
    /// Threads (vCPUs for ours).
    pub threads: usize,
    /// First touch (discard before each fill) or refill.
    pub fresh: bool,
}

impl PopulatePair<'_> {
    fn rounds(&mut self, guest: bool, iters: u64) -> Duration {
        (0..iters)
            .map(|_| {
                if self.fresh {
                    self.populate.discard().expect("discarding RAM");
                }
                self.populate
                    .fill(guest, self.threads)
                    .expect("filling RAM")
            })
            .sum()
    }
}

impl Pair for PopulatePair<'_> {
    fn ours(&mut self, iters: u64) -> Duration {
        self.rounds(true, iters)
    }

    fn baseline(&mut self, iters: u64) -> Duration {
        self.rounds(false, iters)
    }
}

/// The backings `gmem run` builds on the software backend, by name.
pub const BACKINGS: [(BackingMode, &str); 2] = [
    (BackingMode::GuestMemfd, "guest_memfd"),
    (BackingMode::Split, "split"),
];

/// The rows: for each backing, a fresh fill by 1 and 2 vCPUs and a refill
/// by 2, each against the raw fill with as many threads.
pub fn run(scale: Scale) -> Vec<Row> {
    let size = scale.big();
    let mut rows = Vec::new();
    for (mode, name) in BACKINGS {
        let cases = [(true, 1), (true, 2), (false, 2)];
        let mut populate = match Populate::new(mode, size, 2) {
            Ok(p) => p,
            Err(e) => {
                for (fresh, threads) in cases {
                    let (id, figure) = names(name, size, fresh, threads);
                    rows.push(Row::skipped(&id, &figure, TARGET, e.to_string()));
                }
                continue;
            }
        };
        for (fresh, threads) in cases {
            let (id, figure) = names(name, size, fresh, threads);
            // A fresh fill of 1 GiB takes about a second a side: one a
            // round.
            let iters = if fresh { 1 } else { 4 };
            let c = compare(
                &mut PopulatePair {
                    populate: &mut populate,
                    threads,
                    fresh,
                },
                iters,
                scale.rounds(),
            );
            rows.push(Row::new(
                &id,
                &figure,
                c.ours,
                Some((
                    c.baseline,
                    "the same words stored from the host into the same memory, as many threads",
                )),
                Some(c.ratio),
                Unit::Seconds,
                TARGET,
            ));
        }
    }
    rows
}

/// What a fill may cost over the raw fill of the same memory. The words
/// are stored alike (one 8-byte store each, the same pattern); the loop
/// adds a cache lookup and an access epoch per 64 KiB chunk, a few ns
/// against ~5 us to store the chunk at memory bandwidth, ~40 us to fault
/// it in fresh: the loop should be at memory speed, and 10% is the
/// allowance for the noise of a shared machine. A loop that leaves the
/// cache (the fault path for every word, as before the cache) is 7x and
/// more.
const TARGET: Target = Target::AtMost(1.1);

fn names(backing: &str, size: u64, fresh: bool, threads: usize) -> (String, String) {
    let kind = if fresh { "fresh" } else { "refill" };
    (
        format!("soft.populate.{backing}.{kind}.{threads}"),
        format!(
            "soft fill {}, {backing}, {kind}, {threads} vCPU{}",
            super::bytes(size),
            if threads == 1 { "" } else { "s" }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure fills every word on both backings, from the guest and
    /// from the host alike.
    #[test]
    fn both_fills_write_the_pattern_on_every_backing() {
        for (mode, _) in BACKINGS {
            let mut p = Populate::new(mode, 4 << 20, 2).unwrap();
            for guest in [true, false] {
                p.discard().unwrap();
                p.fill(guest, 2).unwrap();
                assert_eq!(p.wrong_words().unwrap(), 0, "{mode} guest={guest}");
            }
        }
    }

    #[test]
    fn shares_cover_ram_once() {
        let p = Populate::new(BackingMode::GuestMemfd, 3 << 20, 2).unwrap();
        let s = p.shares(2);
        let total: u64 = s.iter().flatten().map(|(r, _)| r.len).sum();
        assert_eq!(total, 3 << 20);
        assert_eq!(s[0][0].0.len, 3 << 19);
    }
}
