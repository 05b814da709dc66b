//! A vCPU of the running kernel, in 64-bit mode: one [`GuestOp`] per
//! [`Vcpu::run`] at ring 0, one guest loop per [`Vcpu::run_loop`] at ring 3,
//! each in one `KVM_RUN` (a loop: one per GiB), and never hanging.
//!
//! # One `KVM_RUN` per operation
//!
//! Registers travel through `kvm_run` itself (`KVM_CAP_SYNC_REGS`): the
//! backend writes the few registers an operation needs (rip and its
//! arguments) into `kvm_run->s.regs` and marks them dirty; KVM loads them at
//! the start of `KVM_RUN` (`sync_regs`) and stores them back at every exit
//! (`store_regs`, both in arch/x86/kvm/x86.c), so an operation is exactly
//! one ioctl: no `KVM_SET_REGS`, `KVM_GET_REGS` or `KVM_SET_SREGS`.
//!
//! Every run ends with a store to the doorbell page, a read-only memslot
//! ([`guest::DOORBELL_SLOT`]): an MMIO write exit carrying the result in
//! `kvm_run->mmio.data`. A pending
//! MMIO write needs no second run: `KVM_RUN` first loads the dirty registers
//! (`sync_regs`), then completes what the last exit left pending
//! (`complete_userspace_io`), and `complete_emulated_mmio` finishes a write
//! by returning to the guest at the new rip (the emulator has already moved
//! rip past the store). The exits whose completion writes registers after
//! `sync_regs` would undo the new rip: an MMIO *read*
//! (`complete_emulated_io` re-runs the emulator's writeback) and a
//! hypercall exit (`complete_hypercall_exit` skips the instruction at the
//! current rip). Only after those does the backend complete the exit at
//! once, with `immediate_exit` (one extra ioctl, never on the hot path).
//!
//! # Rings
//!
//! On our hosts (PVM) ring-0 guest code is interpreted (about 1.5 M
//! instructions/s) and ring-3 code runs natively (billions), but leaving
//! ring 3 costs more than a whole interpreted run: measured with
//! `benches/kvm_path.rs`, a raw run exiting from ring 3 takes two to two and
//! a half times as long as one exiting from ring 0. So single
//! operations run at ring 0 (two instructions), loops at ring 3, and the
//! vCPU switches with `KVM_SET_SREGS` only when the ring changes.
//! The hypercall must run at ring 0 anyway: KVM refuses a hypercall from
//! CPL > 0 (`kvm_emulate_hypercall`, -KVM_EPERM).
//!
//! # The run bound
//!
//! The `watchdog` module kicks the thread out of `KVM_RUN` at the
//! deadline the run sets; no timer is created or armed per run.
//!
//! - An operation may run for [`RUN_TIMEOUT`]; then it ends as
//!   [`VcpuExit::Timeout`] with the rip where the guest was.
//! - A stuck hypercall is noticed early: a run still at the
//!   `vmcall`/`vmmcall` instruction after [`HYPERCALL_CHECK`], and again
//!   after the thread has spent [`HYPERCALL_RECHECK`] more CPU time in the
//!   run, is reported as [`VcpuExit::Timeout`] with that instruction's
//!   address. A hypercall KVM handles completes within microseconds, and one
//!   it forwards exits at once; a `nop` before the instruction shows the
//!   guest reached it, and counting CPU time keeps a descheduled thread
//!   from looking stuck. (Our kernel never completes
//!   `KVM_HC_MAP_GPA_RANGE`: FAULT-8.)
//! - A loop runs as long as it makes progress: every [`LOOP_STALL`] the
//!   backend looks at the loop's address register, and only a loop that did
//!   not advance since the last look ends as [`VcpuExit::Timeout`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit as KvmExit, VcpuFd};

use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestLoop, GuestOp, LoopExit, Vcpu, VcpuExit};
use crate::kvm::guest::{
    self, va, Code, Setup, Tables, DOORBELL_GPA, GIB, GPA_MASK, SETUP_GPA, SETUP_SIZE, VA_BITS,
};
use crate::kvm::vm::SlotPins;
use crate::kvm::watchdog::Watch;

pub use crate::kvm::watchdog::kick_signal;

/// How long one [`Vcpu::run`] lets the guest run before it reports
/// [`VcpuExit::Timeout`].
pub const RUN_TIMEOUT: Duration = Duration::from_millis(1000);
/// When a run still at its hypercall instruction is looked at first.
pub const HYPERCALL_CHECK: Duration = Duration::from_millis(3);
/// CPU time the thread must spend in the run, still at the hypercall
/// instruction, after the first look, before the run counts as stuck.
pub const HYPERCALL_RECHECK: Duration = Duration::from_millis(2);
/// How long a loop may go without advancing before it is reported as
/// [`VcpuExit::Timeout`].
pub const LOOP_STALL: Duration = Duration::from_millis(1000);

/// Guest privilege level of the code a run executes (ring 0 or ring 3);
/// the value indexes `KvmVcpu::sregs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    Kernel = 0,
    User = 1,
}

/// How a run is bounded.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Op,
    Loop,
}

/// What came out of one KVM_RUN, owned (the kvm_run borrow ends here).
enum Raw {
    /// The guest stored its result to the doorbell.
    Done(u64),
    Io(u16),
    Mmio(u64, bool, u8, u64),
    Hypercall(u64, [u64; 6]),
    MemoryFault(u64, u64, u64),
    Interrupted,
    Other(String),
}

/// How a bounded run ended.
enum Outcome {
    Exit(Raw),
    Timeout(u64),
}

/// A vCPU fd and what it needs to run operations.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    /// The VM's memslot pins: this vCPU can run the guest, so the slots'
    /// userspace ranges stay pinned while it lives (dropped after the fd).
    _pins: SlotPins,
    id: u64,
    setup: Arc<Setup>,
    tables: Tables,
    code: Arc<Code>,
    /// Segment and control registers for ring 0 and for ring 3.
    sregs: [kvm_sregs; 2],
    ring: Ring,
    /// Guest MAXPHYADDR: accesses must stay below 1 << this.
    phys_bits: u8,
    watch: Watch,
    /// `KVM_CAP_PRE_FAULT_MEMORY` of the VM.
    pub(crate) pre_fault: bool,
}

/// Thread CPU time (CLOCK_THREAD_CPUTIME_ID): guest time counts too.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into ts.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The first (at most 8) bytes of an MMIO write's data as a little-endian
/// value, zero-extended.
fn le_u64(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

impl KvmVcpu {
    pub(crate) fn new(
        mut fd: VcpuFd,
        pins: SlotPins,
        id: u64,
        index: u64,
        setup: Arc<Setup>,
        code: Arc<Code>,
        phys_bits: u8,
    ) -> Result<KvmVcpu> {
        let sregs = fd
            .get_sregs()
            .map_err(|e| kernel(e, format_args!("KVM_GET_SREGS vcpu={id}")))?;
        let cr3 = guest::cr3(index);
        let rings =
            [false, true].map(|user| guest::long_mode_sregs(sregs, guest::GDT_BASE, cr3, user));
        fd.set_sregs(&rings[0])
            .map_err(|e| kernel(e, format_args!("KVM_SET_SREGS vcpu={id}")))?;
        let regs = kvm_regs {
            rflags: 2,
            r15: DOORBELL_GPA,
            rsp: SETUP_GPA + SETUP_SIZE - 16,
            ..Default::default()
        };
        // The kernel's copy in kvm_run is the one every run loads from now
        // on: it starts out whole here, and each run then changes only the
        // registers it needs.
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.sync_regs_mut().regs = regs;
        fd.set_sync_dirty_reg(SyncReg::Register);
        let tables = Tables::new(&setup, index);
        Ok(KvmVcpu {
            fd,
            _pins: pins,
            id,
            setup,
            tables,
            code,
            sregs: rings,
            ring: Ring::Kernel,
            phys_bits,
            watch: Watch::new(),
            pre_fault: false,
        })
    }

    /// Refuses a range of guest physical memory the guest code cannot
    /// reach: past MAXPHYADDR, at or above 2^48, or in the setup region.
    fn check_range(&self, what: &str, gpa: u64, len: u64) -> Result<()> {
        let limit = 1u64 << self.phys_bits.min(63);
        let refuse = |why: String| {
            Error::new(
                Errno::EINVAL,
                "KVM-SETUP",
                format!("{what} of {len} bytes at gpa {gpa:#x} {why}"),
            )
        };
        let end = gpa.checked_add(len);
        if end.is_none_or(|end| end > limit) {
            return Err(refuse(format!(
                "reaches past the guest's MAXPHYADDR ({} bits)",
                self.phys_bits
            )));
        }
        if end.is_none_or(|end| end > 1 << VA_BITS) {
            return Err(refuse(format!(
                "reaches past 2^{VA_BITS}, where the backend's 4-level paging ends"
            )));
        }
        if gpa < SETUP_GPA + SETUP_SIZE && gpa + len > SETUP_GPA {
            return Err(refuse(format!(
                "falls in the KVM backend's reserved setup region [{SETUP_GPA:#x}, {:#x})",
                SETUP_GPA + SETUP_SIZE
            )));
        }
        Ok(())
    }

    /// Refuses what the guest code cannot do; returns the range it touches.
    fn check_op(&self, op: &GuestOp) -> Result<(u64, u64)> {
        match *op {
            GuestOp::Read { gpa, size } | GuestOp::Write { gpa, size, .. } => {
                if !matches!(size, 1 | 2 | 4 | 8) {
                    return Err(Error::new(
                        Errno::EINVAL,
                        "KVM-SETUP",
                        format!("guest access size {size} is not 1, 2, 4 or 8"),
                    ));
                }
                self.check_range("guest access", gpa, u64::from(size))?;
                Ok((gpa, u64::from(size)))
            }
            // The hypercall touches no memory.
            GuestOp::MapGpaRange { .. } => Ok((0, 0)),
        }
    }

    /// Runs `set_regs` on the registers, then the guest in `ring` until it
    /// exits, with `[lo, hi)` mapped. Holds the VM's run lock for reading
    /// throughout; recycles the page-table pool when it runs out.
    fn run_with(
        &mut self,
        ring: Ring,
        lo: u64,
        hi: u64,
        bound: Bound,
        set_regs: impl Fn(&mut kvm_regs),
    ) -> Result<Outcome> {
        let setup = Arc::clone(&self.setup);
        let _run = loop {
            let run = setup.runs.read();
            match self.tables.prepare(&setup, lo, hi) {
                Ok(()) => break run,
                Err(guest::Exhausted) => {
                    let seen = self.tables.generation();
                    drop(run);
                    setup.recycle(seen)?;
                }
            }
        };
        if self.ring != ring {
            self.fd
                .set_sregs(&self.sregs[ring as usize])
                .map_err(|e| kernel(e, format_args!("KVM_SET_SREGS vcpu={}", self.id)))?;
            self.ring = ring;
        }
        set_regs(&mut self.fd.sync_regs_mut().regs);
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        self.run_bounded(bound)
    }

    /// KVM_RUN until the guest exits for a reason other than a kick, or the
    /// bound (see the module comment) says it is over.
    fn run_bounded(&mut self, bound: Bound) -> Result<Outcome> {
        let start = Instant::now();
        let mut deadline = start
            + match bound {
                Bound::Op => HYPERCALL_CHECK,
                Bound::Loop => LOOP_STALL,
            };
        let mut at_hypercall: Option<Duration> = None;
        let mut last_rdi = self.fd.sync_regs().regs.rdi;
        loop {
            self.watch.arm(deadline);
            let raw = self.run_once();
            self.watch.disarm();
            let raw = raw?;
            if !matches!(raw, Raw::Interrupted) {
                return Ok(Outcome::Exit(raw));
            }
            let now = Instant::now();
            if now < deadline {
                continue;
            }
            let regs = self.fd.sync_regs().regs;
            match bound {
                Bound::Op if regs.rip == self.code.hypercall_insn() => {
                    let cpu = thread_cpu_time();
                    match at_hypercall {
                        Some(first) if cpu.saturating_sub(first) >= HYPERCALL_RECHECK => {
                            return Ok(Outcome::Timeout(regs.rip))
                        }
                        Some(_) => {}
                        None => at_hypercall = Some(cpu),
                    }
                    deadline = (now + HYPERCALL_RECHECK).min(start + RUN_TIMEOUT);
                }
                Bound::Op => {
                    at_hypercall = None;
                    deadline = start + RUN_TIMEOUT;
                }
                Bound::Loop if regs.rdi != last_rdi => {
                    last_rdi = regs.rdi;
                    deadline = now + LOOP_STALL;
                    continue;
                }
                Bound::Loop => return Ok(Outcome::Timeout(regs.rip)),
            }
            if now >= start + RUN_TIMEOUT {
                return Ok(Outcome::Timeout(regs.rip));
            }
        }
    }

    /// One KVM_RUN, its outcome copied out of kvm_run.
    fn run_once(&mut self) -> Result<Raw> {
        match self.fd.run() {
            Ok(KvmExit::MmioWrite(DOORBELL_GPA, data)) => Ok(Raw::Done(le_u64(data))),
            Ok(KvmExit::IoOut(port, _)) | Ok(KvmExit::IoIn(port, _)) => Ok(Raw::Io(port)),
            Ok(KvmExit::MmioRead(gpa, data)) => Ok(Raw::Mmio(gpa, false, data.len() as u8, 0)),
            Ok(KvmExit::MmioWrite(gpa, data)) => {
                Ok(Raw::Mmio(gpa, true, data.len().min(8) as u8, le_u64(data)))
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

    /// Completes a pending exit whose completion would undo the next run's
    /// registers (see the module comment), without running the guest.
    fn complete_pending(&mut self) {
        // The completion may write guest memory: not while the setup
        // memslot is being re-created.
        let setup = Arc::clone(&self.setup);
        let _run = setup.runs.read();
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The contract's view of an exit that is not the doorbell; completes
    /// it first where needed.
    fn exit_of(&mut self, raw: Raw, what: &dyn std::fmt::Debug) -> Result<VcpuExit> {
        let rip = self.fd.sync_regs().regs.rip;
        match raw {
            Raw::Done(v) => Ok(VcpuExit::Done(v)),
            Raw::Mmio(gpa, is_write, len, data) => {
                if !is_write {
                    self.complete_pending();
                }
                Ok(VcpuExit::Mmio {
                    gpa,
                    is_write,
                    len,
                    data,
                })
            }
            Raw::Hypercall(nr, args) => {
                self.complete_pending();
                Ok(VcpuExit::Hypercall {
                    nr,
                    gpa: args[0],
                    npages: args[1],
                    attributes: args[2],
                })
            }
            Raw::MemoryFault(flags, gpa, size) => Ok(VcpuExit::MemoryFault { flags, gpa, size }),
            Raw::Io(port) => {
                self.complete_pending();
                Err(Error::new(
                    Errno::EIO,
                    "kernel",
                    format!(
                        "vcpu={}: unexpected port I/O to {port:#x} at rip {rip:#x}",
                        self.id
                    ),
                ))
            }
            Raw::Interrupted | Raw::Other(_) => {
                let exit = match raw {
                    Raw::Other(s) => s,
                    _ => "Intr".into(),
                };
                Err(Error::new(
                    Errno::EIO,
                    "kernel",
                    format!(
                        "vcpu={}: unexpected exit {exit} at rip {rip:#x} during {what:?}",
                        self.id
                    ),
                ))
            }
        }
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
        // SAFETY: the ioctl reads and writes exactly one kvm_pre_fault_memory,
        // which `range` is, on the vCPU fd we own.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                crate::uapi::KVM_PRE_FAULT_MEMORY as _,
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
        let (gpa, len) = self.check_op(&op)?;
        let rip = self.code.entry(&op);
        let outcome = self.run_with(Ring::Kernel, gpa, gpa + len, Bound::Op, |r| {
            r.rip = rip;
            match op {
                GuestOp::Read { gpa, .. } => r.rdi = va(gpa),
                GuestOp::Write { gpa, value, .. } => {
                    r.rdi = va(gpa);
                    r.rsi = value;
                }
                GuestOp::MapGpaRange {
                    gpa,
                    npages,
                    attributes,
                } => {
                    r.rax = crate::uapi::KVM_HC_MAP_GPA_RANGE;
                    r.rbx = gpa;
                    r.rcx = npages;
                    r.rdx = attributes;
                }
            }
        })?;
        match outcome {
            Outcome::Timeout(rip) => Ok(VcpuExit::Timeout { rip }),
            Outcome::Exit(raw) => self.exit_of(raw, &op),
        }
    }

    /// One guest loop at ring 3 per GiB of the range, each in one
    /// `KVM_RUN`: the host adds page tables a GiB at a time (see [`guest`]),
    /// so a run maps what it walks without ever remapping.
    fn run_loop(&mut self, op: GuestLoop) -> Result<LoopExit> {
        op.check()?;
        let (gpa, len) = op.range();
        if len == 0 {
            return Ok(LoopExit {
                done: 0,
                exit: VcpuExit::Done(0),
            });
        }
        self.check_range("guest loop", gpa, len)?;
        let seed = match op {
            GuestLoop::Fill { seed, .. } | GuestLoop::Verify { seed, .. } => seed,
            GuestLoop::Touch { .. } => 0,
        };
        let rip = self.code.loop_entry(&op);
        let end = gpa + len;
        let mut at = gpa;
        let mut mismatches = 0u64;
        while at < end {
            let chunk_end = end.min((at | (GIB - 1)) + 1);
            // PVM keeps the upper canonical half from ring-3 code (it is the
            // host kernel's there): the guest faults with nothing to catch it
            // (a shutdown exit). Loops above 2^47 run at ring 0, interpreted.
            let ring = if at < 1 << (VA_BITS - 1) {
                Ring::User
            } else {
                Ring::Kernel
            };
            let outcome = self.run_with(ring, at, chunk_end, Bound::Loop, |r| {
                r.rip = rip;
                r.rdi = va(at);
                r.rcx = chunk_end - at;
                r.rdx = seed;
                r.r8 = GPA_MASK;
                r.rbx = 0;
            })?;
            // All bytes below rdi are done (see guest::Code).
            let reached = self.fd.sync_regs().regs.rdi & GPA_MASK;
            let done = reached.clamp(at, chunk_end) - gpa;
            let exit = match outcome {
                Outcome::Exit(Raw::Done(n)) => {
                    mismatches += n;
                    at = chunk_end;
                    continue;
                }
                Outcome::Timeout(rip) => VcpuExit::Timeout { rip },
                Outcome::Exit(raw) => self.exit_of(raw, &op)?,
            };
            return Ok(LoopExit { done, exit });
        }
        Ok(LoopExit {
            done: len,
            exit: VcpuExit::Done(mismatches),
        })
    }
}
