//! Concurrency stress on the software backend (INVAL-5): vCPU threads load
//! and store while another thread punches holes, converts, deletes and
//! re-creates slots and closes and re-creates files. A load sees the old
//! bytes or zeros, never a torn mix; nothing deadlocks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use gmem::soft::{SoftGuestMemfd, SoftHostMemory, SoftHypervisor, SoftVm};
use gmem::uapi::*;
use gmem::{GuestMemfd, GuestOp, HostMemory, Vcpu, VcpuExit, Vm};

const P: u64 = PAGE_SIZE;
/// gfns [0, 64): a guest_memfd-only slot on file A.
const A_PAGES: u64 = 64;
/// gfns [0x100, 0x140): slot 1 on file B (no MMAP) with host memory for
/// its shared pages; converted back and forth.
const B_GFN: u64 = 0x100;
const B_PAGES: u64 = 64;

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
