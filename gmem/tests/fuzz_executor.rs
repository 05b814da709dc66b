//! The fuzzer's executor catches what it promises to: a backend that
//! panics, one that hangs, and one that leaks an fd on every program
//! (LIFE-8), each from a hypervisor made to misbehave on one VM type.
//! (One test in its own binary: the leak check counts the whole process's
//! fds.)

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use gmem::fuzz::exec::{Executor, Target};
use gmem::soft::SoftHypervisor;
use gmem::{HostMemory, Hypervisor, Vm};

/// The software backend, except that `create_vm` of type 60 panics, of type
/// 61 sleeps past any deadline, and of type 62 leaks an fd.
struct Faulty(SoftHypervisor);

impl AsRawFd for Faulty {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Hypervisor for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn check_extension(&self, cap: u32) -> i64 {
        self.0.check_extension(cap)
    }
    fn create_vm(&self, vm_type: u64) -> gmem::Result<Box<dyn Vm>> {
        match vm_type {
            60 => panic!("type 60 panics"),
            61 => std::thread::sleep(Duration::from_secs(5)),
            62 => {
                let f = std::fs::File::open("/dev/null").unwrap();
                let _ = f.into_raw_fd();
            }
            _ => {}
        }
        self.0.create_vm(0)
    }
    fn host_memory(&self, size: u64) -> gmem::Result<Box<dyn HostMemory>> {
        self.0.host_memory(size)
    }
}

fn faulty() -> Executor {
    Executor::new(vec![Target::Custom(
        "faulty".into(),
        Box::new(|| Ok(Box::new(Faulty(SoftHypervisor::new()?)) as Box<dyn Hypervisor>)),
    )])
    .unwrap()
    .with_base_deadline(Duration::from_millis(500))
}

fn program(vm_type: u64) -> Arc<gmem::scenario::Scenario> {
    let text = format!("vm = create_vm type={vm_type}\nh = host_memory size=4K\n");
    Arc::new(gmem::scenario::parse("t.gmem", &text).unwrap())
}

#[test]
fn panics_hangs_and_leaks_are_caught() {
    let mut exec = faulty();
    // A clean program first: nothing to report, and warm-up for the counts.
    let clean = exec.run_on(0, &program(0)).unwrap();
    assert!(clean.panic.is_none());
    assert_eq!(exec.confirm_leak(0, &program(0), 3).unwrap(), None);

    // A panic: caught with its message and place; the worker goes on.
    let r = exec.run_on(0, &program(60)).unwrap();
    let msg = r.panic.expect("the panic is caught");
    assert!(msg.contains("type 60 panics"), "{msg}");
    assert!(msg.contains("fuzz_executor.rs"), "{msg}");
    assert!(exec.run_on(0, &program(0)).unwrap().panic.is_none());

    // A leak: one fd per program, every time.
    let r = exec.run_on(0, &program(62)).unwrap();
    assert!(r.grew());
    assert_eq!(exec.confirm_leak(0, &program(62), 3).unwrap(), Some((1, 0)));

    // A hang: the deadline passes, and the executor stops.
    let h = exec.run_on(0, &program(61)).unwrap_err();
    assert_eq!(h.backend, "faulty");
    assert!(exec.hung().is_some());
    assert!(exec.run_on(0, &program(0)).is_err());
}
