//! Guest loops (`Vcpu::run_loop`, rule `gmem-loop`): one run walks a whole
//! range, as a VMM's guest populates or verifies its RAM. Every access of a
//! loop goes through the same fault path as a single access (FAULT-3,
//! FAULT-5, FAULT-2), so these tests bind through the file's own mapping
//! and hold on any kernel.

use crate::support::*;

const SEED: u64 = 0x5eed_0000_0000_0000;

/// A VM, its file and the file's mapping.
type Bound = (Box<dyn Vm>, Box<dyn GuestMemfd>, Box<dyn HostMemory>);

/// A VM whose slot 0 at GPA is bound to a `size`-byte MMAP | INIT_SHARED
/// file through its own mapping, and a vCPU; or `None` (a recorded skip).
fn bound(hv: &dyn Hypervisor, size: u64) -> Option<Bound> {
    let (vm, file) = shared_file(hv, size)?;
    let map = bind_through_own_mapping(&*vm, 0, GPA, size, &*file, 0);
    Some((vm, file, map))
}

fn run_loop(cpu: &mut Box<dyn Vcpu>, op: GuestLoop) -> LoopExit {
    ok(cpu.run_loop(op), "guest loop")
}

/// gmem-loop, FAULT-3: a fill stores `gpa ^ seed` in every word, which the
/// host reads through the file's mapping.
pub fn fill_writes_the_pattern_the_host_reads(hv: &dyn Hypervisor) {
    let Some((vm, _file, map)) = bound(hv, 4 * P) else {
        return;
    };
    let mut cpu = vcpu(&*vm);

    let exit = run_loop(
        &mut cpu,
        GuestLoop::Fill {
            gpa: GPA,
            len: 4 * P,
            seed: SEED,
        },
    );

    assert_eq!(
        exit,
        LoopExit {
            done: 4 * P,
            exit: VcpuExit::Done(0)
        }
    );
    for off in [0, 8, P - 8, 3 * P + 16, 4 * P - 8] {
        let word = u64::from_le_bytes(host_read(&*map, off, 8).try_into().unwrap());
        assert_eq!(
            word,
            GuestLoop::pattern(GPA + off, SEED),
            "word at {off:#x}"
        );
    }
}

/// gmem-loop: a verify counts the words that do not hold the pattern.
pub fn verify_counts_the_words_that_differ(hv: &dyn Hypervisor) {
    let Some((vm, _file, map)) = bound(hv, 2 * P) else {
        return;
    };
    let mut cpu = vcpu(&*vm);
    run_loop(
        &mut cpu,
        GuestLoop::Fill {
            gpa: GPA,
            len: 2 * P,
            seed: SEED,
        },
    );
    host_write(&*map, 16, &[0xff]);
    host_write(&*map, P + 8, &[0xff]);

    let exit = run_loop(
        &mut cpu,
        GuestLoop::Verify {
            gpa: GPA,
            len: 2 * P,
            seed: SEED,
        },
    );

    assert_eq!(
        exit,
        LoopExit {
            done: 2 * P,
            exit: VcpuExit::Done(2)
        }
    );
}

/// gmem-loop, FAULT-5: touching faults in every page; a write touch keeps
/// what the pages held.
pub fn touch_allocates_every_page_and_keeps_contents(hv: &dyn Hypervisor) {
    let Some((vm, _file, map)) = bound(hv, 3 * P) else {
        return;
    };
    host_write(&*map, P, &[0x42]);
    let mut cpu = vcpu(&*vm);

    let read = run_loop(
        &mut cpu,
        GuestLoop::Touch {
            gpa: GPA,
            len: 3 * P,
            write: false,
        },
    );
    let write = run_loop(
        &mut cpu,
        GuestLoop::Touch {
            gpa: GPA,
            len: 3 * P,
            write: true,
        },
    );

    assert_eq!(
        read,
        LoopExit {
            done: 3 * P,
            exit: VcpuExit::Done(0)
        }
    );
    assert_eq!(
        write,
        LoopExit {
            done: 3 * P,
            exit: VcpuExit::Done(0)
        }
    );
    assert_eq!(host_read(&*map, P, 1), [0x42]);
    assert_eq!(host_read(&*map, 2 * P, 1), [0]);
}

/// gmem-loop, FAULT-2: a loop that reaches gfns without a slot stops there
/// with the MMIO exit and the bytes done; the rest of the loop resumes
/// past the gap.
pub fn loop_stops_at_an_mmio_gap_and_resumes_after_it(hv: &dyn Hypervisor) {
    let Some((vm, file, map)) = bound(hv, P) else {
        return;
    };
    let _second =
        bind_through_own_mapping(&*vm, 1, GPA + 2 * P, P, &*gmem(&*vm, P, MMAP_SHARED), 0);
    let mut cpu = vcpu(&*vm);
    let op = GuestLoop::Fill {
        gpa: GPA,
        len: 3 * P,
        seed: SEED,
    };

    let first = run_loop(&mut cpu, op);
    let rest = run_loop(&mut cpu, op.rest(2 * P));

    assert_eq!(first.done, P);
    assert!(
        matches!(first.exit, VcpuExit::Mmio { gpa, is_write: true, .. } if gpa == GPA + P),
        "{first:?}"
    );
    assert_eq!(
        rest,
        LoopExit {
            done: P,
            exit: VcpuExit::Done(0)
        }
    );
    let word = u64::from_le_bytes(host_read(&*map, P - 8, 8).try_into().unwrap());
    assert_eq!(word, GuestLoop::pattern(GPA + P - 8, SEED));
    drop(file);
}

/// gmem-loop: a range not aligned to the loop's step, or wrapping, is
/// refused before the guest runs.
pub fn unaligned_loops_are_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mut cpu = vcpu(&*vm);

    for op in [
        GuestLoop::Fill {
            gpa: GPA + 4,
            len: 8,
            seed: 0,
        },
        GuestLoop::Verify {
            gpa: GPA,
            len: 12,
            seed: 0,
        },
        GuestLoop::Touch {
            gpa: GPA + 8,
            len: P,
            write: false,
        },
        GuestLoop::Fill {
            gpa: LAST_PAGE,
            len: 2 * P,
            seed: 0,
        },
    ] {
        let e = refused(cpu.run_loop(op));
        assert_eq!(
            (e.errno, e.rule),
            (Errno::EINVAL, "gmem-loop"),
            "{op:?}: {e}"
        );
    }
}
