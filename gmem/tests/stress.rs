//! Concurrency stress on the software backend (INVAL-5): vCPU threads load
//! and store while another thread punches holes, converts, deletes, moves
//! and re-creates slots, closes and re-creates files and unmaps host memory
//! under a slot. A load sees the old bytes or zeros, never a torn mix;
//! nothing deadlocks; and no vCPU's cached translation outlives the
//! operation that invalidated it, whether it was used by a single access
//! or by a guest loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use gmem::soft::{SoftGuestMemfd, SoftHostMemory, SoftHypervisor, SoftVm};
use gmem::uapi::*;
use gmem::{GuestLoop, GuestMemfd, GuestOp, HostMemory, Hypervisor, LoopExit, Vcpu, VcpuExit, Vm};

const P: u64 = PAGE_SIZE;
/// gfns [0, 64): a guest_memfd-only slot on file A.
const A_PAGES: u64 = 64;
/// gfns [0x100, 0x140): slot 1 on file B (no MMAP) with host memory for
/// its shared pages; converted back and forth.
const B_GFN: u64 = 0x100;
const B_PAGES: u64 = 64;
const PRIVATE: u64 = KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;
const PUNCH: i32 = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;

#[test]
fn software_backend_objects_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SoftHypervisor>();
    send_sync::<SoftVm>();
    send_sync::<SoftGuestMemfd>();
    send_sync::<SoftHostMemory>();
    fn send<T: Send>() {}
    send::<Box<dyn Vcpu>>();
}

/// A tiny xorshift, so the test needs no RNG crate and is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn gmem_slot(
    slot: u32,
    gfn: u64,
    pages: u64,
    g: &dyn GuestMemfd,
    userspace_addr: u64,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        userspace_addr,
        ..guest_memfd_region(slot, gfn * P, pages * P, g.as_raw_fd(), 0)
    }
}

fn vcpu_loop(mut vcpu: Box<dyn Vcpu>, seed: u64, stop: Arc<AtomicBool>) -> (u64, u64) {
    let mut rng = Rng(seed);
    let (mut done, mut exits) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let gfn = if rng.below(2) == 0 {
            rng.below(A_PAGES)
        } else {
            B_GFN + rng.below(B_PAGES)
        };
        let gpa = gfn * P + 8 * rng.below(P / 8);
        let byte = 1 + rng.below(255);
        let value = byte * 0x0101_0101_0101_0101;
        for op in [
            GuestOp::Write {
                gpa,
                size: 8,
                value,
            },
            GuestOp::Read { gpa, size: 8 },
        ] {
            match vcpu
                .run(op)
                .expect("guest accesses never fail outright here")
            {
                VcpuExit::Done(v) => {
                    if matches!(op, GuestOp::Read { .. }) {
                        let b = v & 0xff;
                        assert_eq!(
                            v,
                            b * 0x0101_0101_0101_0101,
                            "torn read {v:#x} at gpa {gpa:#x}"
                        );
                    }
                    done += 1;
                }
                VcpuExit::MemoryFault { .. } | VcpuExit::Mmio { .. } => exits += 1,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }
    (done, exits)
}

#[test]
fn vcpus_racing_punch_convert_delete_and_close_never_tear_or_deadlock() {
    let hv = SoftHypervisor::new().unwrap();
    let vm = Arc::new(hv.create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap());
    let create = |pages: u64, flags: u64| {
        vm.create_guest_memfd(kvm_create_guest_memfd {
            size: pages * P,
            flags,
            ..Default::default()
        })
        .unwrap()
    };
    let a = create(A_PAGES, GUEST_MEMFD_FLAG_MMAP);
    let host: Box<dyn HostMemory> = Box::new(hv.create_host_memory(B_PAGES * P).unwrap());
    let mut b = create(B_PAGES, 0);
    vm.set_user_memory_region2(gmem_slot(0, 0, A_PAGES, a.as_ref(), 0))
        .unwrap();
    vm.set_user_memory_region2(gmem_slot(1, B_GFN, B_PAGES, b.as_ref(), host.addr()))
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    for seed in 1..=3u64 {
        let vcpu = vm.create_vcpu(seed).unwrap();
        let (stop, tx) = (stop.clone(), tx.clone());
        std::thread::spawn(move || tx.send(vcpu_loop(vcpu, seed * 0x9e37_79b9, stop)).unwrap());
    }

    // The chaos thread is this one: a bounded number of rounds.
    let mut rng = Rng(42);
    let started = Instant::now();
    for round in 0..1500u64 {
        let page = rng.below(A_PAGES);
        a.fallocate(
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
            (page * P) as i64,
            (P * (1 + rng.below(4))) as i64,
        )
        .unwrap();
        let attrs = if rng.below(2) == 0 {
            KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
        } else {
            0
        };
        let gfn = rng.below(A_PAGES + B_PAGES);
        let gfn = if gfn < A_PAGES {
            gfn
        } else {
            B_GFN + gfn - A_PAGES
        };
        vm.set_memory_attributes(kvm_memory_attributes {
            address: gfn * P,
            size: P * (1 + rng.below(8)),
            attributes: attrs,
            flags: 0,
        })
        .unwrap();
        if round % 10 == 0 {
            vm.set_user_memory_region2(kvm_userspace_memory_region2 {
                slot: 1,
                ..Default::default()
            })
            .unwrap();
            if round % 30 == 0 {
                // Close file B while no slot names it, then under a live slot.
                b = create(B_PAGES, 0);
            }
            vm.set_user_memory_region2(gmem_slot(1, B_GFN, B_PAGES, b.as_ref(), host.addr()))
                .unwrap();
            if round % 50 == 0 {
                b = create(B_PAGES, 0); // releases the old file under slot 1
                vm.set_user_memory_region2(kvm_userspace_memory_region2 {
                    slot: 1,
                    ..Default::default()
                })
                .unwrap();
                vm.set_user_memory_region2(gmem_slot(1, B_GFN, B_PAGES, b.as_ref(), host.addr()))
                    .unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let deadline = Duration::from_secs(60);
    let mut total = (0, 0);
    for _ in 0..3 {
        let (done, exits) = rx
            .recv_timeout(deadline.saturating_sub(started.elapsed()))
            .expect("a vCPU thread did not finish: deadlock or panic (see its output)");
        total = (total.0 + done, total.1 + exits);
    }
    assert!(
        total.0 > 0,
        "the vCPUs completed no access: the race never happened"
    );
    println!("{} accesses completed, {} exits", total.0, total.1);
}

// ---------------------------------------------------------------------------
// Stale translations: after an invalidating operation returns, no guest
// access may still use what it invalidated (INVAL-1..5). The vCPUs cache
// translations (soft::tlb); every operation below must reach that cache.

/// gfns [S_A, S_A + 64): slot 0, guest_memfd-only on file A; deleted and
/// re-created (INVAL-4), punched (INVAL-1).
const S_A: u64 = 0;
/// gfns [S_B, S_B + 64): slot 1 on file B (no MMAP) with host memory H for
/// its shared pages; converted (INVAL-3), file B released under it
/// (INVAL-2).
const S_B: u64 = 0x100;
/// Slot 2: an ordinary slot over host memory H2, moved between S_C0 and
/// S_C1 (slot move), its host memory unmapped under it (MMU notifier).
const S_C0: u64 = 0x200;
const S_C1: u64 = 0x300;
/// Slot 3: an ordinary slot over a host mapping of file D (MMAP |
/// INIT_SHARED), memory the vCPUs never cache: guest loops take the fault
/// path for it, a page at a time, while D is punched.
const S_D: u64 = 0x400;
const N: u64 = 64;
/// The seed of the guest loops' fills: a word a loop stored reads as
/// `GuestLoop::pattern(gpa, LOOP_SEED)`, never as a torn mix.
const LOOP_SEED: u64 = 0x6c6f_6f70_0000_0000;

/// The VM as the chaos thread last left it, published with an even phase.
#[derive(Clone)]
struct Model {
    slot_a: bool,
    file_b: bool,
    private_b: [bool; N as usize],
    slot_c: u64,
    h2_mapped: bool,
}

/// What a guest access in a quiet phase must end with.
#[derive(Debug, PartialEq)]
enum Expect {
    Done,
    Mmio,
    Fault {
        private: bool,
    },
    /// KVM_RUN fails with EFAULT: the slot's host memory is unmapped.
    Efault,
}

impl Model {
    fn expect(&self, gfn: u64) -> Expect {
        let i = (gfn % 0x100) as usize;
        match gfn & !0xff {
            S_A if self.slot_a => Expect::Done,
            S_A => Expect::Mmio,
            S_B if self.private_b[i] && !self.file_b => Expect::Fault { private: true },
            S_B => Expect::Done,
            c if c == self.slot_c && self.h2_mapped => Expect::Done,
            c if c == self.slot_c => Expect::Efault,
            S_D => Expect::Done,
            _ => Expect::Mmio,
        }
    }
}

/// The chaos thread's side of the phase protocol: odd while an operation
/// runs, even (with the model that holds) between operations.
struct Phases {
    phase: std::sync::atomic::AtomicU64,
    model: std::sync::Mutex<Model>,
    /// Accesses checked against the model so far.
    checked: std::sync::atomic::AtomicU64,
    /// vCPU threads still running (a panicking one leaves).
    running: std::sync::atomic::AtomicU64,
}

/// Accesses the vCPUs must check after each operation before the next one:
/// a stale translation gets used while nothing else flushes it.
const SETTLE: u64 = 8;

impl Phases {
    /// Runs `op`, publishes `update` of the model, then lets the vCPUs
    /// check a few accesses against it.
    fn change<T>(&self, op: impl FnOnce() -> T, update: impl FnOnce(&mut Model)) -> T {
        self.phase.fetch_add(1, Ordering::SeqCst);
        let out = op();
        let mut model = self.model.lock().unwrap();
        update(&mut model);
        self.phase.fetch_add(1, Ordering::SeqCst);
        drop(model);
        let target = self.checked.load(Ordering::SeqCst) + SETTLE;
        let vcpus = self.running.load(Ordering::SeqCst);
        while self.checked.load(Ordering::SeqCst) < target
            && self.running.load(Ordering::SeqCst) == vcpus
        {
            std::thread::yield_now();
        }
        out
    }
}

/// Counts a vCPU thread out of [`Phases::running`] however it ends.
struct Running(Arc<Phases>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Is `v` a whole word of a guest loop's fill of the memory at `gpa`? The
/// loop stored it at `gpa`, or at the same memory before slot 2 moved.
fn filled_by_a_loop(gpa: u64, v: u64) -> bool {
    let moved = gpa ^ ((S_C0 ^ S_C1) * P);
    v == GuestLoop::pattern(gpa, LOOP_SEED) || v == GuestLoop::pattern(moved, LOOP_SEED)
}

/// A unique value per vCPU and access, whose halves check each other.
fn word(id: u64, n: u64) -> u64 {
    let x = ((id << 24) | (n & 0xff_ffff)) as u32;
    u64::from(x) | u64::from(!x) << 32
}

fn quiet_vcpu(mut vcpu: Box<dyn Vcpu>, id: u64, phases: Arc<Phases>, stop: Arc<AtomicBool>) {
    let _running = Running(phases.clone());
    let mut rng = Rng(id * 0x9e37_79b9);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let base = [S_A, S_B, S_C0, S_C1][rng.below(4) as usize];
        let gfn = base + rng.below(N);
        let gpa = gfn * P + 8 * rng.below(P / 8);
        n += 1;
        for op in [
            GuestOp::Write {
                gpa,
                size: 8,
                value: word(id, n),
            },
            GuestOp::Read { gpa, size: 8 },
        ] {
            let before = phases.phase.load(Ordering::SeqCst);
            let exit = vcpu.run(op);
            if let (GuestOp::Read { .. }, Ok(VcpuExit::Done(v))) = (op, &exit) {
                let v = *v;
                assert!(
                    v == 0 || v >> 32 == !v & 0xffff_ffff || filled_by_a_loop(gpa, v),
                    "torn read {v:#x} at gpa {gpa:#x}"
                );
            }
            let model = phases.model.lock().unwrap();
            if before % 2 == 1 || phases.phase.load(Ordering::SeqCst) != before {
                continue;
            }
            let got = match exit {
                Ok(VcpuExit::Done(_)) => Expect::Done,
                Ok(VcpuExit::Mmio { .. }) => Expect::Mmio,
                Ok(VcpuExit::MemoryFault { flags, .. }) => Expect::Fault {
                    private: flags != 0,
                },
                Err(e) if e.errno == gmem::Errno::EFAULT => Expect::Efault,
                other => panic!("unexpected exit {other:?}"),
            };
            assert_eq!(
                got,
                model.expect(gfn),
                "{op:?} at gfn {gfn:#x} in phase {before}: a translation survived the \
                 invalidation before it"
            );
            drop(model);
            phases.checked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Guest loops filling or verifying one to four whole pages at a time,
/// anywhere the quiet vCPUs go and in slot 3, checked against the model as
/// single accesses are: a loop walks the pages through the translation
/// cache (`soft::tlb`) a chunk at a time, or the fault path once per page
/// for memory it cannot cache, and must see every invalidation before it
/// as they do.
fn loop_vcpu(mut vcpu: Box<dyn Vcpu>, id: u64, phases: Arc<Phases>, stop: Arc<AtomicBool>) {
    let _running = Running(phases.clone());
    let mut rng = Rng(id * 0x9e37_79b9);
    while !stop.load(Ordering::Relaxed) {
        let base = [S_A, S_B, S_C0, S_C1, S_D][rng.below(5) as usize];
        let gfn = base + rng.below(N);
        let pages = (1 + rng.below(4)).min(base + N - gfn);
        let (gpa, len, seed) = (gfn * P, pages * P, LOOP_SEED);
        let op = if rng.below(2) == 0 {
            GuestLoop::Fill { gpa, len, seed }
        } else {
            GuestLoop::Verify { gpa, len, seed }
        };
        let before = phases.phase.load(Ordering::SeqCst);
        let out = vcpu.run_loop(op);
        let model = phases.model.lock().unwrap();
        if before % 2 == 1 || phases.phase.load(Ordering::SeqCst) != before {
            continue;
        }
        // In a quiet phase the loop completes the pages the model says
        // are done and stops before the first word of the first that is
        // not, with its exit.
        let want = (0..pages)
            .map(|i| (i * P, model.expect(gfn + i)))
            .find(|(_, e)| *e != Expect::Done)
            .unwrap_or((len, Expect::Done));
        let (done, got) = match out {
            Ok(LoopExit {
                done,
                exit: VcpuExit::Done(_),
            }) => (Some(done), Expect::Done),
            Ok(LoopExit {
                done,
                exit: VcpuExit::Mmio { .. },
            }) => (Some(done), Expect::Mmio),
            Ok(LoopExit {
                done,
                exit: VcpuExit::MemoryFault { flags, .. },
            }) => (
                Some(done),
                Expect::Fault {
                    private: flags != 0,
                },
            ),
            // KVM_RUN fails: no count of bytes done.
            Err(e) if e.errno == gmem::Errno::EFAULT => (None, Expect::Efault),
            other => panic!("unexpected end of {op:?}: {other:?}"),
        };
        assert_eq!(
            (done.unwrap_or(want.0), got),
            want,
            "{op:?} (gfn {gfn:#x}) in phase {before}: a translation survived the \
             invalidation before it"
        );
        drop(model);
        phases.checked.fetch_add(1, Ordering::Relaxed);
    }
}

/// Host memory pages as the chaos thread saw them when they became
/// unreachable by the guest: they must not change until reachable again.
struct Snapshot(Vec<u8>);

impl Snapshot {
    /// # Safety
    /// `[addr, addr + len)` is a live mapping of real memory.
    unsafe fn take(addr: u64, len: u64) -> Snapshot {
        // SAFETY: the caller's guarantee; volatile because vCPUs may write.
        Snapshot(
            (0..len)
                .map(|i| unsafe { ((addr + i) as *const u8).read_volatile() })
                .collect(),
        )
    }

    /// # Safety
    /// As for `take`.
    unsafe fn assert_same(&self, addr: u64, what: &str) {
        // SAFETY: the caller's guarantee.
        let now = unsafe { Snapshot::take(addr, self.0.len() as u64) };
        if let Some(at) = (0..self.0.len()).find(|&i| now.0[i] != self.0[i]) {
            panic!(
                "{what}: byte {at:#x} changed from {:#x} to {:#x} while the guest could not \
                 reach it (a store after the invalidation)",
                self.0[at], now.0[at]
            );
        }
    }
}

/// INVAL-1..5, FAULT-2, FAULT-6, LIFE-5, gmem-loop: once a punch, a
/// conversion, a slot delete or move, a file release or the unmapping of
/// host memory under a slot returns, every guest access and every guest
/// loop sees the new state (checked on each access or one-page loop that
/// ran entirely between two operations) and no store lands in memory the
/// guest can no longer reach (checked on snapshots).
#[test]
fn no_translation_survives_an_invalidation() {
    let hv = SoftHypervisor::new().unwrap();
    let vm = hv.create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    let create = |flags: u64| {
        vm.create_guest_memfd(kvm_create_guest_memfd {
            size: N * P,
            flags,
            ..Default::default()
        })
        .unwrap()
    };
    let a = create(GUEST_MEMFD_FLAG_MMAP);
    let a_map = a.mmap(0, N * P, gmem::MapKind::Shared).unwrap();
    let mut b = create(0);
    let h = hv.host_memory(N * P).unwrap();
    let mut h2 = Some(hv.host_memory(N * P).unwrap());
    let slot_a = |on: bool| {
        vm.set_user_memory_region2(if on {
            gmem_slot(0, S_A, N, a.as_ref(), 0)
        } else {
            delete_region(0)
        })
        .unwrap()
    };
    slot_a(true);
    vm.set_user_memory_region2(gmem_slot(1, S_B, N, b.as_ref(), h.addr()))
        .unwrap();
    let h2_addr = h2.as_ref().unwrap().addr();
    vm.set_user_memory_region2(user_region(2, S_C0 * P, N * P, h2_addr))
        .unwrap();
    // A sw_protected VM offers no INIT_SHARED: file D is another VM's,
    // mapped by the same hypervisor.
    let vm_d = hv.create_soft_vm(KVM_X86_DEFAULT_VM as u64).unwrap();
    let d = vm_d
        .create_guest_memfd(kvm_create_guest_memfd {
            size: N * P,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            ..Default::default()
        })
        .unwrap();
    let d_map = d.mmap(0, N * P, gmem::MapKind::Shared).unwrap();
    vm.set_user_memory_region2(user_region(3, S_D * P, N * P, d_map.addr()))
        .unwrap();

    let phases = Arc::new(Phases {
        phase: Default::default(),
        model: std::sync::Mutex::new(Model {
            slot_a: true,
            file_b: true,
            private_b: [false; N as usize],
            slot_c: S_C0,
            h2_mapped: true,
        }),
        checked: Default::default(),
        running: 3.into(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let vcpus: Vec<_> = (1..=3u64)
        .map(|id| {
            let vcpu = vm.create_vcpu(id).unwrap();
            let (phases, stop) = (phases.clone(), stop.clone());
            std::thread::spawn(move || {
                if id == 3 {
                    loop_vcpu(vcpu, id, phases, stop)
                } else {
                    quiet_vcpu(vcpu, id, phases, stop)
                }
            })
        })
        .collect();

    let mut rng = Rng(7);
    let mut private_since: Vec<Option<Snapshot>> = (0..N).map(|_| None).collect();
    let mut a_since: Option<Snapshot> = None;
    for round in 0..480u64 {
        // Conversion of a few pages of slot 1 (INVAL-3): a page's shared
        // memory must not change while the page is private.
        let first = rng.below(N);
        let count = (1 + rng.below(4)).min(N - first);
        let private = rng.below(2) == 0;
        let pages = first..first + count;
        if !private {
            for i in pages.clone() {
                if let Some(snap) = private_since[i as usize].take() {
                    // SAFETY: h lives for the whole test.
                    unsafe {
                        snap.assert_same(h.addr() + i * P, &format!("shared page {i} of slot 1"))
                    };
                }
            }
        }
        phases.change(
            || {
                vm.set_memory_attributes(kvm_memory_attributes {
                    address: (S_B + first) * P,
                    size: count * P,
                    attributes: if private { PRIVATE } else { 0 },
                    flags: 0,
                })
                .unwrap()
            },
            |m| {
                pages
                    .clone()
                    .for_each(|i| m.private_b[i as usize] = private)
            },
        );
        if private {
            for i in pages.clone() {
                private_since[i as usize].get_or_insert_with(|| {
                    // SAFETY: h lives for the whole test.
                    unsafe { Snapshot::take(h.addr() + i * P, P) }
                });
            }
        }
        // Punch (INVAL-1): racing accesses must not tear.
        let page = rng.below(N);
        phases.change(
            || {
                // File A is left alone while its slot is gone (snapshot).
                let file = if rng.below(2) == 0 && a_since.is_none() {
                    &a
                } else {
                    &b
                };
                file.fallocate(PUNCH, (page * P) as i64, P as i64).unwrap();
                // File D under slot 3: its page is zapped from the mapping
                // the slot points at, and faults in again zeroed.
                d.fallocate(PUNCH, (page * P) as i64, P as i64).unwrap()
            },
            |_| {},
        );
        match round % 8 {
            // Slot 0 delete (INVAL-4): file A must not change until the
            // slot is back.
            1 => {
                phases.change(|| slot_a(false), |m| m.slot_a = false);
                // SAFETY: a_map is a live mapping of file A.
                a_since = Some(unsafe { Snapshot::take(a_map.addr(), N * P) });
            }
            2 => {
                if let Some(snap) = a_since.take() {
                    // SAFETY: as above.
                    unsafe { snap.assert_same(a_map.addr(), "file A after its slot was deleted") };
                }
                phases.change(|| slot_a(true), |m| m.slot_a = true);
            }
            // Slot 2 move (INVAL-4): the old range exits as MMIO.
            3 => {
                let to = if phases.model.lock().unwrap().slot_c == S_C0 {
                    S_C1
                } else {
                    S_C0
                };
                let addr = h2.as_ref().map_or(h2_addr, |m| m.addr());
                phases.change(
                    || {
                        vm.set_user_memory_region2(user_region(2, to * P, N * P, addr))
                            .unwrap()
                    },
                    |m| m.slot_c = to,
                );
            }
            // Host memory unmapped under slot 2 (MMU notifier): KVM_RUN
            // fails with EFAULT until the slot points at new memory.
            4 => phases.change(|| drop(h2.take()), |m| m.h2_mapped = false),
            5 => {
                let at = phases.model.lock().unwrap().slot_c;
                phases.change(
                    || {
                        vm.set_user_memory_region2(delete_region(2)).unwrap();
                        let mem = hv.host_memory(N * P).unwrap();
                        vm.set_user_memory_region2(user_region(2, at * P, N * P, mem.addr()))
                            .unwrap();
                        h2 = Some(mem);
                    },
                    |m| m.h2_mapped = true,
                );
            }
            // File B released under slot 1 (INVAL-2, LIFE-5): private pages
            // fault; then a new file is bound.
            6 => phases.change(|| b = create(0), |m| m.file_b = false),
            7 => phases.change(
                || {
                    vm.set_user_memory_region2(delete_region(1)).unwrap();
                    vm.set_user_memory_region2(gmem_slot(1, S_B, N, b.as_ref(), h.addr()))
                        .unwrap();
                },
                |m| m.file_b = true,
            ),
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in vcpus {
        t.join()
            .expect("a vCPU saw a stale translation (see its panic above)");
    }
    let checked = phases.checked.load(Ordering::Relaxed);
    assert!(
        checked > 1000,
        "only {checked} accesses ran between two operations"
    );
}
