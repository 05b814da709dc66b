//! LIFE-8 for the memory manager: building and dropping managers of every
//! backing, on every backend, with conversions, discards and failed
//! set-ups among them, leaves no fd and no mapping behind. (One test in its
//! own binary: it counts the whole process's fds and mappings.)

#[path = "common/leaks.rs"]
mod leaks;

#[path = "common/skips.rs"]
mod skips;

use gmem::memory::{BackingRequest, GuestAddress, GuestRange, Layout, MemoryManager, PageState};
use gmem::soft::SoftHypervisor;
use gmem::{Backend, GuestLoop, Hypervisor, Release};

/// One manager's life: built, used, converted where it can be, dropped.
fn cycle(hv: &dyn Hypervisor, request: BackingRequest) {
    let layout = Layout::builder()
        .ram(GuestAddress(0), 1 << 20)
        .ram(GuestAddress(1 << 32), 1 << 20)
        .backing(request)
        .build()
        .unwrap();
    let mm = match MemoryManager::new(hv, layout) {
        Ok(mm) => mm,
        // Only private memory may be missing (the kvm backend here).
        Err(e) if request != BackingRequest::Shared && e.rule() == "gmem-backing" => return,
        Err(e) => panic!("{}: {e}", hv.name()),
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let page = GuestRange::new(GuestAddress(0x1000), 0x1000);
    mm.run_loop(
        &mut *cpu,
        GuestLoop::Touch {
            gpa: 0x1000,
            len: 0x1000,
            write: true,
        },
    )
    .unwrap();
    if mm.backing().mode.has_private_memory() {
        mm.convert(page, PageState::Private).unwrap();
    }
    mm.discard(page).unwrap();
    // Held across the manager's drop, as a VMM's vCPU thread might.
    drop(mm);
    drop(cpu);
}

/// A set-up that fails after files and host memory exist: a range over
/// the KVM backend's setup region (KVM-SETUP) or a VM type it lacks.
fn failed_setup(hv: &dyn Hypervisor) {
    let layout = Layout::builder()
        .ram(GuestAddress(0), 1 << 20)
        .ram(GuestAddress(0xE000_0000), 1 << 20)
        .build()
        .unwrap();
    let _ = MemoryManager::new(hv, layout);
    let private = Layout::builder()
        .memory(1 << 20)
        .backing(BackingRequest::Private)
        .build()
        .unwrap();
    let _ = MemoryManager::new(hv, private);
}

#[test]
fn managers_of_every_backing_leak_no_fd_and_no_mapping() {
    let mut backends: Vec<Box<dyn Hypervisor>> = vec![
        Box::new(SoftHypervisor::new().unwrap()),
        Box::new(SoftHypervisor::with_profile(Release::Next).unwrap()),
    ];
    if !skips::no_kvm() {
        backends.push(Backend::Kvm.open().unwrap());
    }
    let requests = [
        BackingRequest::Shared,
        BackingRequest::Best,
        BackingRequest::Mode(gmem::memory::BackingMode::Anonymous),
    ];
    // Warm up once so lazily created process state is not counted.
    for hv in &backends {
        for r in requests {
            cycle(&**hv, r);
        }
        failed_setup(&**hv);
    }
    let (fds, maps) = (leaks::open_fds(), leaks::mappings());

    for _ in 0..20 {
        for hv in &backends {
            for r in requests {
                cycle(&**hv, r);
            }
            failed_setup(&**hv);
        }
    }

    assert_eq!(leaks::open_fds(), fds, "fds leaked");
    assert_eq!(leaks::mappings(), maps, "mappings leaked");
}
