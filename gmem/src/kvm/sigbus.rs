//! Scoped SIGBUS handling: host accesses to a guest_memfd mapping that the
//! kernel answers with SIGBUS (MMAP-3, MMAP-4) become a typed error instead of
//! killing the process.
//!
//! How it works, like the kernel's exception tables:
//!
//! - Every guarded access is one `rep movsb` at a known address
//!   (`gmem_kvm_copy_insn`) inside a tiny assembly routine, with a known
//!   fixup address (`gmem_kvm_copy_fixup`) that returns "faulted".
//! - Before the access, the calling thread records the guarded address range
//!   in thread-local storage; after it, the range is cleared.
//! - One process-wide SIGBUS handler is installed once. When the faulting
//!   instruction is our `rep movsb` *and* the fault address lies in the range
//!   the current thread guards, it records the address and moves RIP to the
//!   fixup. Anything else is not ours: it goes to the handler that was
//!   installed before ours, or to the default action (the process dies as it
//!   would have without us).
//!
//! SAFETY of the handler: it only reads and writes `Cell<usize>` thread-locals
//! that have a const initialiser and no destructor (plain TLS loads/stores, no
//! lazy registration, hence async-signal-safe), reads the saved previous
//! action (written once before ours is installed) and edits the interrupted
//! context, which the kernel hands to the handler for exactly that purpose.
//! The copy routine touches no Rust-owned memory other than the caller's
//! buffer, so abandoning it half-way leaves no Rust invariant broken.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::{Once, OnceLock};

core::arch::global_asm!(
    ".pushsection .text.gmem_kvm_copy,\"ax\",@progbits",
    ".globl gmem_kvm_copy",
    ".hidden gmem_kvm_copy",
    ".type gmem_kvm_copy,@function",
    // fn gmem_kvm_copy(dst: rdi, src: rsi, len: rdx) -> rax: 0 = done, 1 = faulted
    "gmem_kvm_copy:",
    "    mov rcx, rdx",
    ".globl gmem_kvm_copy_insn",
    ".hidden gmem_kvm_copy_insn",
    "gmem_kvm_copy_insn:",
    "    rep movsb",
    "    xor eax, eax",
    "    ret",
    ".globl gmem_kvm_copy_fixup",
    ".hidden gmem_kvm_copy_fixup",
    "gmem_kvm_copy_fixup:",
    "    mov eax, 1",
    "    ret",
    ".size gmem_kvm_copy, . - gmem_kvm_copy",
    ".popsection",
);

extern "C" {
    fn gmem_kvm_copy(dst: *mut u8, src: *const u8, len: usize) -> u64;
    static gmem_kvm_copy_insn: u8;
    static gmem_kvm_copy_fixup: u8;
}

thread_local! {
    static GUARD_START: Cell<usize> = const { Cell::new(0) };
    static GUARD_END: Cell<usize> = const { Cell::new(0) };
    static FAULT_ADDR: Cell<usize> = const { Cell::new(0) };
}

/// The SIGBUS action that was installed before ours.
static PREVIOUS: OnceLock<SavedAction> = OnceLock::new();
static INSTALL: Once = Once::new();

#[derive(Clone, Copy)]
struct SavedAction(libc::sigaction);

// SAFETY: a sigaction is plain data (a handler address, flags and a mask).
unsafe impl Send for SavedAction {}
// SAFETY: as above; it is only read after being set once.
unsafe impl Sync for SavedAction {}

fn insn_addr() -> usize {
    // Only the label's address is taken, never its contents.
    std::ptr::addr_of!(gmem_kvm_copy_insn) as usize
}

fn fixup_addr() -> usize {
    std::ptr::addr_of!(gmem_kvm_copy_fixup) as usize
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an
    // SA_SIGINFO handler; si_addr is defined for SIGBUS.
    let (addr, uc) = unsafe { ((*info).si_addr() as usize, ctx.cast::<libc::ucontext_t>()) };
    // SAFETY: as above; the saved RIP is part of the interrupted context.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    let (start, end) = (GUARD_START.with(Cell::get), GUARD_END.with(Cell::get));
    if rip == insn_addr() && (start..end).contains(&addr) {
        FAULT_ADDR.with(|f| f.set(addr));
        // SAFETY: resuming at the fixup of the routine that faulted: it only
        // returns 1 from the same frame (rsp is unchanged by rep movsb).
        unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = fixup_addr() as i64 };
        return;
    }
    chain(sig, info, ctx);
}

/// Not our fault: hand it to whoever would have got it without us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get().map(|p| p.0);
    let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: sigaction and raise are async-signal-safe. Restoring the
        // default action and returning re-executes the faulting instruction,
        // which now gets the default action (the process dies as before);
        // a SIGBUS sent by kill() is raised again.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            if (*info).si_code <= 0 {
                libc::raise(sig);
            }
        }
        return;
    }
    let flags = prev.map_or(0, |p| p.sa_flags);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it
        // has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: installs a handler whose body is async-signal-safe (see the
        // module comment); the previous action is saved first so that no
        // foreign SIGBUS is lost once ours is in place.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old);
            let _ = PREVIOUS.set(SavedAction(old));
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
        }
    });
}

/// Copies `len` bytes from `src` to `dst`, where the guarded side,
/// `[guard, guard + len)`, is memory the kernel may answer with SIGBUS.
/// Returns the faulting address if it did.
///
/// # Safety
///
/// `dst` and `src` must be valid for `len` bytes apart from SIGBUS on the
/// guarded side (a mapped file range), and must not overlap.
pub(crate) unsafe fn guarded_copy(
    dst: *mut u8,
    src: *const u8,
    len: usize,
    guard: usize,
) -> Result<(), usize> {
    install();
    GUARD_START.with(|c| c.set(guard));
    GUARD_END.with(|c| c.set(guard.saturating_add(len)));
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller vouches for both ranges; a SIGBUS inside the guard
    // resumes at the routine's fixup (see the module comment).
    let faulted = unsafe { gmem_kvm_copy(dst, src, len) };
    compiler_fence(Ordering::SeqCst);
    GUARD_START.with(|c| c.set(0));
    GUARD_END.with(|c| c.set(0));
    if faulted == 0 {
        Ok(())
    } else {
        Err(FAULT_ADDR.with(Cell::get))
    }
}
