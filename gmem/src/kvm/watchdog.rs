//! The run bound: one watchdog thread per process kicks a vCPU thread out
//! of `KVM_RUN` once its run passes the deadline the vCPU set.
//!
//! A run costs no system call for its bound: the vCPU thread stores its
//! thread id and deadline in its [`Watch`] before `KVM_RUN` and clears them
//! after. The watchdog wakes every [`TICK`] while some vCPU has run lately,
//! and sends [`kick_signal`] (`tgkill`) to each thread whose deadline has
//! passed, again every tick until the thread clears its deadline (a kick
//! that lands just before `KVM_RUN` is entered is simply repeated). With
//! nothing to watch for a while it parks, and the next [`Watch::arm`] wakes
//! it.
//!
//! The kick's handler does nothing; `KVM_RUN` sees the pending signal and
//! returns EINTR with `KVM_EXIT_INTR` (`kvm_arch_vcpu_ioctl_run` in
//! arch/x86/kvm/x86.c). A kick is only sent while the deadline is set, under
//! the same lock that clears it, so no kick reaches a thread after
//! [`Watch::disarm`] returned, and the thread id is never stale. The handler
//! is installed with `SA_RESTART`: KVM's EINTR is not restartable, so
//! `KVM_RUN` still returns, while a kick racing with the end of a run
//! cannot make another system call of the caller fail.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How often the watchdog looks at the deadlines while vCPUs run.
pub const TICK: Duration = Duration::from_millis(1);
/// Ticks without any armed run before the watchdog parks.
const IDLE_TICKS: u32 = 200;

/// The signal that kicks a vCPU thread out of `KVM_RUN`: `SIGRTMIN + 1`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an empty handler is async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(kick_signal(), &act, std::ptr::null_mut());
        }
    });
}

thread_local! {
    static TID: Cell<libc::pid_t> = const { Cell::new(0) };
}

/// The calling thread's kernel id, asked once per thread.
fn tid() -> libc::pid_t {
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no preconditions.
            t.set(unsafe { libc::gettid() });
        }
        t.get()
    })
}

/// A vCPU thread's run in progress: who to kick, and when.
#[derive(Debug, Default)]
struct Armed {
    tid: libc::pid_t,
    deadline: Option<Instant>,
}

#[derive(Default)]
struct Watchdog {
    entries: Mutex<Vec<Weak<Mutex<Armed>>>>,
    parked: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static DOG: OnceLock<&'static Watchdog> = OnceLock::new();
    DOG.get_or_init(|| {
        install_kick_handler();
        let dog: &'static Watchdog = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("gmem-kvm-watchdog".into())
            .spawn(move || dog.watch())
            .expect("spawning the KVM run watchdog thread");
        dog
    })
}

impl Watchdog {
    fn watch(&self) {
        let mut idle = 0u32;
        loop {
            if self.kick_overdue() {
                idle = 0;
            } else {
                idle += 1;
            }
            if idle < IDLE_TICKS {
                std::thread::sleep(TICK);
                continue;
            }
            // Park: say so first, then look once more, so that a vCPU
            // arming meanwhile either is seen here or sees `parked`.
            self.parked.store(true, Ordering::SeqCst);
            if self.kick_overdue() {
                self.parked.store(false, Ordering::SeqCst);
                idle = 0;
                continue;
            }
            let mut guard = self.wake_lock.lock();
            while self.parked.load(Ordering::SeqCst) {
                self.wake.wait(&mut guard);
            }
            idle = 0;
        }
    }

    /// Kicks every thread past its deadline; true if any run is armed.
    fn kick_overdue(&self) -> bool {
        let now = Instant::now();
        let mut any = false;
        self.entries.lock().retain(|weak| {
            let Some(entry) = weak.upgrade() else {
                return false;
            };
            let armed = entry.lock();
            if let Some(deadline) = armed.deadline {
                any = true;
                if now >= deadline {
                    // SAFETY: tgkill only sends a signal. The thread is
                    // alive: it clears its deadline under this lock before
                    // it can return from its run.
                    unsafe {
                        libc::syscall(libc::SYS_tgkill, libc::getpid(), armed.tid, kick_signal())
                    };
                }
            }
            true
        });
        any
    }
}

/// A vCPU's registration with the watchdog.
#[derive(Debug)]
pub(crate) struct Watch(Arc<Mutex<Armed>>);

impl Watch {
    pub(crate) fn new() -> Watch {
        let entry = Arc::<Mutex<Armed>>::default();
        watchdog().entries.lock().push(Arc::downgrade(&entry));
        Watch(entry)
    }

    /// The calling thread is about to enter `KVM_RUN`: kick it out at
    /// `deadline`.
    pub(crate) fn arm(&self, deadline: Instant) {
        {
            let mut armed = self.0.lock();
            armed.tid = tid();
            armed.deadline = Some(deadline);
        }
        let dog = watchdog();
        if dog.parked.load(Ordering::SeqCst) {
            let _guard = dog.wake_lock.lock();
            dog.parked.store(false, Ordering::SeqCst);
            dog.wake.notify_one();
        }
    }

    /// The run is over: no kick after this returns.
    pub(crate) fn disarm(&self) {
        self.0.lock().deadline = None;
    }
}
