//! A vCPU of the running kernel, in 64-bit mode, that performs one
//! [`GuestOp`] per [`Vcpu::run`] and never hangs: every `KVM_RUN` is bounded
//! by [`RUN_TIMEOUT`].
//!
//! Bounding: a POSIX timer aimed at the calling thread (`SIGEV_THREAD_ID`)
//! sends [`kick_signal`] after the timeout and then every 10 ms until the run
//! ends. The signal's handler does nothing and is installed without
//! `SA_RESTART`, so `KVM_RUN` returns EINTR. A kick that lands just before
//! `KVM_RUN` is entered is harmless: the next one, 10 ms later, catches it.
//! The timer is deleted before `run` returns, and a signal generated before
//! that is delivered on the return from `timer_delete`, so no later system
//! call of the caller sees a stray EINTR.

use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_sregs;
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{GuestOp, Vcpu, VcpuExit};
use crate::kvm::guest::{self, DONE_PORT, SETUP_GPA, SETUP_SIZE};
use crate::kvm::vm::SlotPins;

/// How long one [`Vcpu::run`] lets the guest run before it reports
/// [`VcpuExit::Timeout`].
pub const RUN_TIMEOUT: Duration = Duration::from_millis(1000);
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// The signal that kicks a vCPU out of `KVM_RUN`: `SIGRTMIN + 1`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an empty handler is async-signal-safe; no SA_RESTART so
        // that KVM_RUN returns EINTR.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(kick_signal(), &act, std::ptr::null_mut());
        }
    });
}

/// A POSIX timer that kicks the calling thread; deleted on drop.
struct KickTimer(libc::timer_t);

impl KickTimer {
    fn arm(after: Duration) -> Result<KickTimer> {
        install_kick_handler();
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        // SAFETY: an all-zero sigevent is valid; the fields we need are set.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: timer_create fills in `timer`; checked below.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
            return Err(Error::last_os_error("timer_create for the vCPU run bound"));
        }
        let timer = KickTimer(timer);
        let spec = libc::itimerspec {
            it_value: ts(after),
            it_interval: ts(KICK_INTERVAL),
        };
        // SAFETY: timer is the live timer created above.
        if unsafe { libc::timer_settime(timer.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(Error::last_os_error("timer_settime for the vCPU run bound"));
        }
        Ok(timer)
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: deletes the timer created in arm, exactly once.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// A vCPU fd and what it needs to run operations.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    /// The VM's memslot pins: this vCPU can run the guest, so the slots'
    /// userspace ranges stay pinned while it lives (dropped after the fd).
    _pins: SlotPins,
    id: u64,
    /// Index of this vCPU's page tables in the setup region.
    tables: u64,
    setup: Arc<Mmap>,
    entry: EntryPoints,
    sregs: kvm_sregs,
    /// Guest MAXPHYADDR: accesses must stay below 1 << this.
    phys_bits: u8,
    /// `KVM_CAP_PRE_FAULT_MEMORY` of the VM.
    pub(crate) pre_fault: bool,
}

/// The guest code's entry points (copied from the VM's assembled code).
#[derive(Debug, Clone)]
pub(crate) struct EntryPoints(pub(crate) Arc<guest::Code>);

/// What came out of one KVM_RUN, owned (the kvm_run borrow ends here).
enum Raw {
    Done,
    Io(u16),
    Mmio(u64, bool, u8, u64),
    Hypercall(u64, [u64; 6]),
    MemoryFault(u64, u64, u64),
    Interrupted,
    Other(String),
}

impl KvmVcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        pins: SlotPins,
        id: u64,
        tables: u64,
        setup: Arc<Mmap>,
        entry: EntryPoints,
        phys_bits: u8,
    ) -> Result<KvmVcpu> {
        let mut sregs = fd
            .get_sregs()
            .map_err(|e| kernel(e, format_args!("KVM_GET_SREGS vcpu={id}")))?;
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: guest::CODE_SELECTOR,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_bindings::kvm_segment {
            selector: guest::DATA_SELECTOR,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = guest::GDT_BASE;
        sregs.gdt.limit = guest::GDT_LIMIT;
        // CR0: PE | MP | ET | NE | WP | PG; CR4: PAE; EFER: LME | LMA.
        sregs.cr0 = 0x8005_0033;
        sregs.cr4 = 0x20;
        sregs.efer = 0x500;
        sregs.cr3 = guest::cr3(tables);
        Ok(KvmVcpu {
            fd,
            _pins: pins,
            id,
            tables,
            setup,
            entry,
            sregs,
            phys_bits,
            pre_fault: false,
        })
    }

    /// Refuses what the guest code cannot do; returns the target gpa.
    fn check_op(&self, op: &GuestOp) -> Result<u64> {
        let (gpa, len) = match *op {
            GuestOp::Read { gpa, size } | GuestOp::Write { gpa, size, .. } => {
                if !matches!(size, 1 | 2 | 4 | 8) {
                    return Err(Error::new(
                        Errno::EINVAL,
                        "KVM-SETUP",
                        format!("guest access size {size} is not 1, 2, 4 or 8"),
                    ));
                }
                (gpa, u64::from(size))
            }
            // The hypercall touches no memory; map something harmless.
            GuestOp::MapGpaRange { .. } => return Ok(SETUP_GPA),
        };
        let limit = 1u64 << self.phys_bits.min(63);
        if gpa.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::new(
                Errno::EINVAL,
                "KVM-SETUP",
                format!(
                    "guest access of {len} bytes at gpa {gpa:#x} reaches past the guest's \
                     MAXPHYADDR ({} bits)",
                    self.phys_bits
                ),
            ));
        }
        if gpa < SETUP_GPA + SETUP_SIZE && gpa + len > SETUP_GPA {
            return Err(Error::new(
                Errno::EINVAL,
                "KVM-SETUP",
                format!(
                    "guest access at gpa {gpa:#x} falls in the KVM backend's reserved setup \
                     region [{SETUP_GPA:#x}, {:#x})",
                    SETUP_GPA + SETUP_SIZE
                ),
            ));
        }
        Ok(gpa)
    }

    /// One KVM_RUN, its outcome copied out of kvm_run.
    fn run_once(&mut self) -> Result<Raw> {
        match self.fd.run() {
            Ok(KvmExit::IoOut(port, _)) | Ok(KvmExit::IoIn(port, _)) => Ok(if port == DONE_PORT {
                Raw::Done
            } else {
                Raw::Io(port)
            }),
            Ok(KvmExit::Hlt) => Ok(Raw::Done),
            Ok(KvmExit::MmioRead(gpa, data)) => Ok(Raw::Mmio(gpa, false, data.len() as u8, 0)),
            Ok(KvmExit::MmioWrite(gpa, data)) => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Raw::Mmio(gpa, true, n as u8, u64::from_le_bytes(v)))
            }
            Ok(KvmExit::Hypercall(h)) => {
                // The VMM's answer to the guest: nothing converted, success.
                *h.ret = 0;
                Ok(Raw::Hypercall(h.nr, h.args))
            }
            Ok(KvmExit::MemoryFault { flags, gpa, size }) => Ok(Raw::MemoryFault(flags, gpa, size)),
            Ok(KvmExit::Intr) => Ok(Raw::Interrupted),
            Ok(other) => Ok(Raw::Other(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Raw::Interrupted),
            Err(e) => {
                let reason = self.fd.get_kvm_run().exit_reason;
                Err(Error::new(
                    Errno::from_raw(e.errno()),
                    "kernel",
                    format!(
                        "KVM_RUN vcpu={} failed without a memory-fault exit (exit_reason {reason})",
                        self.id
                    ),
                ))
            }
        }
    }

    /// Completes a pending I/O, MMIO or hypercall exit without running the
    /// guest (`immediate_exit`), so the next operation starts clean.
    fn complete_pending(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn rax(&self) -> Result<u64> {
        self.regs().map(|r| r.rax)
    }

    fn regs(&self) -> Result<kvm_bindings::kvm_regs> {
        self.fd
            .get_regs()
            .map_err(|e| kernel(e, format_args!("KVM_GET_REGS vcpu={}", self.id)))
    }
}

fn kernel(e: kvm_ioctls::Error, what: std::fmt::Arguments<'_>) -> Error {
    Error::new(
        Errno::from_raw(e.errno()),
        "kernel",
        format!("{what} refused"),
    )
}

impl Vcpu for KvmVcpu {
    fn pre_fault_memory(&mut self, range: &mut kvm_bindings::kvm_pre_fault_memory) -> Result<()> {
        if !self.pre_fault {
            return Err(Error::new(
                Errno::ENOTTY,
                "PREFAULT-1",
                "KVM_PRE_FAULT_MEMORY: not supported by this host (KVM_CAP_PRE_FAULT_MEMORY is 0)",
            ));
        }
        const KVM_PRE_FAULT_MEMORY: u64 = (3 << 30)
            | ((std::mem::size_of::<kvm_bindings::kvm_pre_fault_memory>() as u64) << 16)
            | (0xAE << 8)
            | 0xd5;
        // SAFETY: the ioctl reads and writes exactly one kvm_pre_fault_memory,
        // which `range` is, on the vCPU fd we own.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                KVM_PRE_FAULT_MEMORY as _,
                range as *mut kvm_bindings::kvm_pre_fault_memory,
            )
        };
        if r < 0 {
            return Err(Error::last_os_error(format_args!(
                "KVM_PRE_FAULT_MEMORY gpa={:#x} size={:#x}",
                range.gpa, range.size
            )));
        }
        Ok(())
    }

    fn run(&mut self, op: GuestOp) -> Result<VcpuExit> {
        let gpa = self.check_op(&op)?;
        let va = guest::map_for(&self.setup, self.tables, gpa, self.phys_bits)?;
        let mut regs = kvm_bindings::kvm_regs {
            rip: self.entry.0.entry(&op),
            rflags: 2,
            rsp: guest::STACK_TOP,
            ..Default::default()
        };
        match op {
            GuestOp::Read { .. } => regs.rdi = va,
            GuestOp::Write { value, .. } => {
                regs.rdi = va;
                regs.rsi = value;
            }
            GuestOp::MapGpaRange {
                gpa,
                npages,
                attributes,
            } => {
                regs.rax = crate::uapi::KVM_HC_MAP_GPA_RANGE;
                regs.rbx = gpa;
                regs.rcx = npages;
                regs.rdx = attributes;
            }
        }
        self.fd
            .set_sregs(&self.sregs)
            .map_err(|e| kernel(e, format_args!("KVM_SET_SREGS vcpu={}", self.id)))?;
        self.fd
            .set_regs(&regs)
            .map_err(|e| kernel(e, format_args!("KVM_SET_REGS vcpu={}", self.id)))?;

        let deadline = Instant::now() + RUN_TIMEOUT;
        let timer = KickTimer::arm(RUN_TIMEOUT)?;
        let exit = loop {
            match self.run_once()? {
                Raw::Interrupted if Instant::now() < deadline => continue,
                Raw::Interrupted => {
                    break VcpuExit::Timeout {
                        rip: self.regs()?.rip,
                    }
                }
                Raw::Done => {
                    let rax = self.rax()?;
                    self.complete_pending();
                    break VcpuExit::Done(rax);
                }
                Raw::Io(port) => {
                    self.complete_pending();
                    let rip = self.regs()?.rip;
                    return Err(Error::new(
                        Errno::EIO,
                        "kernel",
                        format!(
                            "vcpu={}: unexpected port I/O to {port:#x} at rip {rip:#x}",
                            self.id
                        ),
                    ));
                }
                Raw::Mmio(gpa, is_write, len, data) => {
                    self.complete_pending();
                    break VcpuExit::Mmio {
                        gpa,
                        is_write,
                        len,
                        data,
                    };
                }
                Raw::Hypercall(nr, args) => {
                    self.complete_pending();
                    break VcpuExit::Hypercall {
                        nr,
                        gpa: args[0],
                        npages: args[1],
                        attributes: args[2],
                    };
                }
                Raw::MemoryFault(flags, gpa, size) => {
                    break VcpuExit::MemoryFault { flags, gpa, size }
                }
                Raw::Other(what) => {
                    let rip = self.regs().map(|r| r.rip).unwrap_or(0);
                    return Err(Error::new(
                        Errno::EIO,
                        "kernel",
                        format!(
                            "vcpu={}: unexpected exit {what} at rip {rip:#x} during {op:?}",
                            self.id
                        ),
                    ));
                }
            }
        };
        drop(timer);
        Ok(exit)
    }
}
