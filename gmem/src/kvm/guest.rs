//! The guest side of a vCPU: a private setup region with the GDT, the code
//! that performs guest operations and loops, and every vCPU's page tables.
//!
//! Layout: the setup region is bound to memslot [`SETUP_SLOT`] at guest
//! physical `[SETUP_GPA, SETUP_GPA + SETUP_SIZE)` (0xE000_0000 to
//! 0xE040_0000, below the usual PCI hole end) when the VM is created, all
//! but its last page, the doorbell, which is the read-only memslot
//! [`DOORBELL_SLOT`]: a guest store there exits as MMIO (stores to
//! read-only memory do, `KVM_MEM_READONLY`). Inside:
//!
//! | offset   | what |
//! |---|---|
//! | 0x0000   | GDT: null, ring-0 code (0x08) and data (0x10), ring-3 code (0x1b) and data (0x23) |
//! | 0x1000   | code: one entry point per operation and per loop (two pages) |
//! | 0x3000   | vCPU n's PML4 at 0x3000 + n * 0x1000, for n below [`MAX_VCPUS`] |
//! | 0x43000  | the pool: page-directory-pointer and page-directory pages, handed out as vCPUs need them |
//! | 0x3ff000 | the doorbell: a store here exits as MMIO and carries the result |
//!
//! # Paging
//!
//! 4-level paging with 1 GiB pages where the guest's CPUID offers them
//! (`pdpe1gb`), else 2 MiB pages, which exist on every x86-64 CPU (KVM
//! offers no `pdpe1gb` on our hosts). Guest physical address `gpa`
//! is at guest virtual [`va`]`(gpa)`: `gpa` itself, sign-extended from bit
//! 47. So the whole of `[0, 2^48)` has one fixed virtual address, the upper
//! half of the physical space in the upper canonical half, and nothing is
//! ever mapped twice or remapped. Every entry is user-accessible: ring-0
//! code (single operations) and ring-3 code (loops) use the same tables.
//!
//! Tables grow on demand: before a run the host adds the entries the run
//! needs: per GiB of guest physical space one 1 GiB page, or one page
//! directory with all 512 of its 2 MiB entries. The host only ever turns a
//! not-present entry into a present one, and only while the vCPU is outside
//! `KVM_RUN`: a processor
//! caches no not-present translation (Intel SDM vol. 3, 4.10.2.3), and a
//! shadow MMU (KVM's, and PVM's for ring-3 code) walks the guest's tables
//! again when the access faults (`FNAME(page_fault)` in
//! arch/x86/kvm/mmu/paging_tmpl.h), so a new entry is seen at once without
//! any flush. A present entry is never rewritten: a shadow MMU trusts the
//! guest tables it has write-protected to change only by guest stores it
//! traps (`kvm_mmu_track_write` in arch/x86/kvm/mmu/mmu.c) and never sees a
//! host store; measured here, a guest at ring 3 keeps reading through a
//! rewritten entry's old target even after `KVM_SET_SREGS` or a guest CR3
//! reload.
//!
//! When the pool runs out, `Setup::recycle` starts over: with no vCPU of
//! the VM in `KVM_RUN` it deletes and re-creates the setup memslot, which
//! makes KVM drop every shadow page built from it
//! (`kvm_arch_flush_shadow_memslot`), then empties the pool; each vCPU
//! clears its PML4 before its next run (`Tables::prepare`).
//!
//! Guest physical addresses at or above 2^48 (hosts whose MAXPHYADDR is
//! above 48) have no virtual address under 4-level paging; accesses there
//! are refused (`KVM-SETUP`, EINVAL).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use iced_x86::code_asm::{
    byte_ptr, dword_ptr, eax, esi, qword_ptr, r15, r8, rax, rbx, rcx, rdi, rdx, rsi, si, sil,
    word_ptr, CodeAssembler, CodeLabel,
};
use iced_x86::BlockEncoderOptions;
use kvm_bindings::{kvm_segment, kvm_sregs};
use parking_lot::{Mutex, RwLock};

use crate::error::{Errno, Error, Result};
use crate::host::Mmap;
use crate::hypervisor::{GuestLoop, GuestOp};
use crate::uapi::{kvm_userspace_memory_region, KVM_MEM_READONLY, PAGE_SIZE};

/// Memslot id of the setup region (address space 0). User slots may not use it.
pub const SETUP_SLOT: u32 = 32700;
/// Memslot id of the doorbell page (read-only). User slots may not use it.
pub const DOORBELL_SLOT: u32 = 32701;
/// Guest physical address of the setup region.
pub const SETUP_GPA: u64 = 0xE000_0000;
/// Size of the reserved setup range: two 2 MiB pages.
pub const SETUP_SIZE: u64 = 0x40_0000;
/// Guest physical address of the doorbell: guest code stores its result
/// here to end a run, which exits as an 8-byte MMIO write (the page is
/// read-only to the guest).
pub const DOORBELL_GPA: u64 = SETUP_GPA + SETUP_SIZE - PAGE_SIZE;
/// Bytes of the setup range in the setup memslot: all but the doorbell.
pub(crate) const SLOT_SIZE: u64 = SETUP_SIZE - PAGE_SIZE;

const GDT: u64 = 0x0000;
const CODE: u64 = 0x1000;
const CODE_SIZE: u64 = 2 * PAGE_SIZE;
const PML4S: u64 = CODE + CODE_SIZE;
/// vCPUs per VM that the setup region has page tables for.
pub const MAX_VCPUS: u64 = 64;
const POOL: u64 = PML4S + MAX_VCPUS * PAGE_SIZE;

/// GDT entries: null, ring-0 code (L=1) and data, ring-3 code and data.
pub const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00af_fa00_0000_ffff,
    0x00cf_f200_0000_ffff,
];
/// Selectors of the GDT above, with their requested privilege level.
const CODE0_SELECTOR: u16 = 0x08;
const DATA0_SELECTOR: u16 = 0x10;
const CODE3_SELECTOR: u16 = 0x1b;
const DATA3_SELECTOR: u16 = 0x23;
/// GDT base in the setup region.
pub(crate) const GDT_BASE: u64 = SETUP_GPA + GDT;

/// A flat 64-bit segment of [`GDT_ENTRIES`]: code or data, at the
/// selector's privilege level.
fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// `sregs` for 64-bit mode at ring 0 (or ring 3 when `user`): the GDT of
/// [`GDT_ENTRIES`] at guest address `gdt_base`, its flat segments, and
/// 4-level paging from `cr3`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, gdt_base: u64, cr3: u64, user: bool) -> kvm_sregs {
    sregs.gdt.base = gdt_base;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    // CR0: PE | MP | ET | NE | WP | PG; CR4: PAE; EFER: LME | LMA.
    (sregs.cr0, sregs.cr4, sregs.efer, sregs.cr3) = (0x8005_0033, 0x20, 0x500, cr3);
    let (cs, ds) = if user {
        (CODE3_SELECTOR, DATA3_SELECTOR)
    } else {
        (CODE0_SELECTOR, DATA0_SELECTOR)
    };
    sregs.cs = segment(cs, true);
    let data = segment(ds, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs
}

/// Present, writable, user.
const PTE_PRW_U: u64 = 0x7;
/// A large page: 2 MiB in a page directory, 1 GiB in a PDPT.
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bytes one page directory (or one 1 GiB page) maps.
pub(crate) const GIB: u64 = 1 << 30;
/// Guest physical addresses this paging reaches: below 2^48.
pub(crate) const VA_BITS: u32 = 48;
/// The low 48 bits of a virtual address: its guest physical address.
pub(crate) const GPA_MASK: u64 = (1 << VA_BITS) - 1;

/// The guest virtual address of guest physical `gpa` (below 2^48):
/// `gpa` sign-extended from bit 47.
pub const fn va(gpa: u64) -> u64 {
    (((gpa << 16) as i64) >> 16) as u64
}

/// CR3 of vCPU `n`: its PML4.
pub(crate) const fn cr3(n: u64) -> u64 {
    SETUP_GPA + PML4S + n * PAGE_SIZE
}

fn asm_err(e: iced_x86::IcedError) -> Error {
    Error::new(
        Errno::EINVAL,
        "KVM-SETUP",
        format!("assembling the guest code failed: {e}"),
    )
}

/// The assembled guest code and its entry points (guest virtual addresses).
///
/// Register contract, for every entry: r15 holds [`DOORBELL_GPA`] (set
/// once per vCPU; no code writes it); every path ends with one 8-byte store
/// of its result to `[r15]`.
///
/// - Single operations (ring 0): rdi = address, rsi = value to store. The
///   result is the value loaded (zero-extended), or 0 after a store.
/// - The hypercall (ring 0): rax = number, rbx, rcx, rdx = arguments. A
///   `nop` precedes the `vmcall`/`vmmcall`, so a vCPU found at the hypercall
///   instruction has executed guest code (see [`Code::hypercall_insn`]).
/// - Loops (ring 3): rdi = first address, rcx = bytes (a non-zero multiple
///   of the step), rdx = seed, r8 = [`GPA_MASK`], rbx = 0. Each iteration
///   completes its access before it advances rdi, so at any instruction all
///   bytes below rdi are done and none at or above it; the result is the
///   number of words that differ (verify) or 0.
#[derive(Debug, Clone)]
pub(crate) struct Code {
    bytes: Vec<u8>,
    reads: [u64; 4],
    writes: [u64; 4],
    hypercall: u64,
    hypercall_insn: u64,
    fill: u64,
    verify: u64,
    touch_read: u64,
    touch_write: u64,
}

impl Code {
    /// Assembles the guest code; `amd` picks `vmmcall` over `vmcall`.
    pub(crate) fn assemble(amd: bool) -> Result<Code> {
        let mut a = CodeAssembler::new(64).map_err(asm_err)?;
        let e = |r: std::result::Result<(), iced_x86::IcedError>| r.map_err(asm_err);
        let mut labels: Vec<CodeLabel> = (0..14).map(|_| a.create_label()).collect();
        // Loads, zero-extended into rax, which is the result.
        e(a.set_label(&mut labels[0]))?;
        e(a.movzx(eax, byte_ptr(rdi)))?;
        e(a.mov(qword_ptr(r15), rax))?;
        e(a.set_label(&mut labels[1]))?;
        e(a.movzx(eax, word_ptr(rdi)))?;
        e(a.mov(qword_ptr(r15), rax))?;
        e(a.set_label(&mut labels[2]))?;
        e(a.mov(eax, dword_ptr(rdi)))?;
        e(a.mov(qword_ptr(r15), rax))?;
        e(a.set_label(&mut labels[3]))?;
        e(a.mov(rax, qword_ptr(rdi)))?;
        e(a.mov(qword_ptr(r15), rax))?;
        // Stores of the low bytes of rsi; the result is 0.
        e(a.set_label(&mut labels[4]))?;
        e(a.mov(byte_ptr(rdi), sil))?;
        e(a.mov(qword_ptr(r15), 0))?;
        e(a.set_label(&mut labels[5]))?;
        e(a.mov(word_ptr(rdi), si))?;
        e(a.mov(qword_ptr(r15), 0))?;
        e(a.set_label(&mut labels[6]))?;
        e(a.mov(dword_ptr(rdi), esi))?;
        e(a.mov(qword_ptr(r15), 0))?;
        e(a.set_label(&mut labels[7]))?;
        e(a.mov(qword_ptr(rdi), rsi))?;
        e(a.mov(qword_ptr(r15), 0))?;
        // The hypercall: AMD's instruction or Intel's; rax is its return.
        e(a.set_label(&mut labels[8]))?;
        e(a.nop())?;
        e(a.set_label(&mut labels[9]))?;
        e(if amd { a.vmmcall() } else { a.vmcall() })?;
        e(a.mov(qword_ptr(r15), rax))?;
        // Fill: [rdi] = (rdi & r8) ^ rdx, word by word.
        e(a.set_label(&mut labels[10]))?;
        e(a.mov(rax, rdi))?;
        e(a.and(rax, r8))?;
        e(a.xor(rax, rdx))?;
        e(a.mov(qword_ptr(rdi), rax))?;
        e(a.add(rdi, 8))?;
        e(a.sub(rcx, 8))?;
        e(a.jnz(labels[10]))?;
        e(a.mov(qword_ptr(r15), rbx))?;
        // Verify: rbx += [rdi] != (rdi & r8) ^ rdx (neg sets CF iff non-zero).
        e(a.set_label(&mut labels[11]))?;
        e(a.mov(rax, rdi))?;
        e(a.and(rax, r8))?;
        e(a.xor(rax, rdx))?;
        e(a.xor(rax, qword_ptr(rdi)))?;
        e(a.neg(rax))?;
        e(a.adc(rbx, 0))?;
        e(a.add(rdi, 8))?;
        e(a.sub(rcx, 8))?;
        e(a.jnz(labels[11]))?;
        e(a.mov(qword_ptr(r15), rbx))?;
        // Touch for reading: one load per page.
        e(a.set_label(&mut labels[12]))?;
        e(a.mov(rax, qword_ptr(rdi)))?;
        e(a.add(rdi, PAGE_SIZE as i32))?;
        e(a.sub(rcx, PAGE_SIZE as i32))?;
        e(a.jnz(labels[12]))?;
        e(a.mov(qword_ptr(r15), rbx))?;
        // Touch for writing: an atomic add of 0 keeps the word, faults the
        // page in writable.
        e(a.set_label(&mut labels[13]))?;
        e(a.lock().add(qword_ptr(rdi), 0))?;
        e(a.add(rdi, PAGE_SIZE as i32))?;
        e(a.sub(rcx, PAGE_SIZE as i32))?;
        e(a.jnz(labels[13]))?;
        e(a.mov(qword_ptr(r15), rbx))?;
        // Never reached: every path above ends at the doorbell.
        e(a.hlt())?;
        let res = a
            .assemble_options(
                SETUP_GPA + CODE,
                BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .map_err(asm_err)?;
        let ip = |i: usize| res.label_ip(&labels[i]).map_err(asm_err);
        let code = Code {
            reads: [ip(0)?, ip(1)?, ip(2)?, ip(3)?],
            writes: [ip(4)?, ip(5)?, ip(6)?, ip(7)?],
            hypercall: ip(8)?,
            hypercall_insn: ip(9)?,
            fill: ip(10)?,
            verify: ip(11)?,
            touch_read: ip(12)?,
            touch_write: ip(13)?,
            bytes: res.inner.code_buffer,
        };
        if code.bytes.len() as u64 > CODE_SIZE {
            return Err(Error::new(
                Errno::E2BIG,
                "KVM-SETUP",
                "guest code exceeds its pages",
            ));
        }
        Ok(code)
    }

    /// The entry point for `op` (ring 0).
    pub(crate) fn entry(&self, op: &GuestOp) -> u64 {
        let width = |size: u8| match size {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        match *op {
            GuestOp::Read { size, .. } => self.reads[width(size)],
            GuestOp::Write { size, .. } => self.writes[width(size)],
            GuestOp::MapGpaRange { .. } => self.hypercall,
        }
    }

    /// The entry point for `op` (ring 3).
    pub(crate) fn loop_entry(&self, op: &GuestLoop) -> u64 {
        match op {
            GuestLoop::Fill { .. } => self.fill,
            GuestLoop::Verify { .. } => self.verify,
            GuestLoop::Touch { write: false, .. } => self.touch_read,
            GuestLoop::Touch { write: true, .. } => self.touch_write,
        }
    }

    /// The address of the `vmcall`/`vmmcall` instruction itself.
    pub(crate) fn hypercall_insn(&self) -> u64 {
        self.hypercall_insn
    }
}

/// The pool has no page left: `Setup::recycle` and try again.
#[derive(Debug)]
pub(crate) struct Exhausted;

/// A VM's setup region and what its vCPUs share about it.
#[derive(Debug)]
pub(crate) struct Setup {
    map: Mmap,
    /// A duplicate of the VM fd, owned: recycling re-creates the setup
    /// memslot, possibly after the VM handle itself is gone.
    vm: OwnedFd,
    /// Held for reading by every vCPU from the moment it edits its tables
    /// until its `KVM_RUN` returns; for writing by `Setup::recycle`.
    pub(crate) runs: RwLock<()>,
    /// Offset of the next free pool page.
    next: Mutex<u64>,
    /// How many times the pool was recycled.
    generation: AtomicU64,
    /// Map each GiB with one 1 GiB page rather than a page directory.
    gib_pages: bool,
}

/// `KVM_SET_USER_MEMORY_REGION` on `vm`.
///
/// # Safety
///
/// `region.userspace_addr` must be 0 or memory that stays mapped while the
/// slot lives.
unsafe fn set_region(vm: &OwnedFd, region: &kvm_userspace_memory_region) -> Result<()> {
    // SAFETY: the request matches the struct passed; the caller vouches for
    // the userspace range.
    let ret = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            crate::uapi::KVM_SET_USER_MEMORY_REGION as _,
            region,
        )
    };
    if ret < 0 {
        return Err(Error::last_os_error(format_args!(
            "KVM_SET_USER_MEMORY_REGION for the setup region (slot {} at gpa {:#x} size \
             {:#x}) refused",
            region.slot, region.guest_phys_addr, region.memory_size
        )));
    }
    Ok(())
}

impl Setup {
    /// Maps the setup region, writes the GDT and `code` into it and binds
    /// it to the VM `vm` (the fd is duplicated, not taken). `gib_pages`:
    /// the guest's CPUID offers 1 GiB pages.
    pub(crate) fn new(vm: &impl AsRawFd, code: &Code, gib_pages: bool) -> Result<Setup> {
        let map = Mmap::anonymous(SETUP_SIZE)?;
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            put(&map, GDT + 8 * i as u64, *d);
        }
        map.write(CODE, &code.bytes)
            .map_err(|e| Error::new(Errno::EINVAL, "KVM-SETUP", e.to_string()))?;
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd or -1; checked below.
        let raw = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if raw < 0 {
            return Err(Error::last_os_error(
                "dup of the VM fd for the setup region",
            ));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let vm = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let setup = Setup {
            map,
            vm,
            runs: RwLock::new(()),
            next: Mutex::new(POOL),
            generation: AtomicU64::new(0),
            gib_pages,
        };
        // SAFETY: the slot points at our own mapping, which lives as long as
        // the Setup, and the Setup as long as the VM and its vCPUs.
        unsafe { set_region(&setup.vm, &setup.region(SLOT_SIZE))? };
        let doorbell = kvm_userspace_memory_region {
            slot: DOORBELL_SLOT,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: DOORBELL_GPA,
            memory_size: PAGE_SIZE,
            userspace_addr: setup.map.addr() + SLOT_SIZE,
        };
        // SAFETY: as above; the guest cannot even write this page.
        unsafe { set_region(&setup.vm, &doorbell)? };
        Ok(setup)
    }

    fn region(&self, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: SETUP_SLOT,
            flags: 0,
            guest_phys_addr: SETUP_GPA,
            memory_size: size,
            userspace_addr: self.map.addr(),
        }
    }

    /// A zeroed page from the pool.
    fn alloc(&self) -> std::result::Result<u64, Exhausted> {
        let mut next = self.next.lock();
        if *next + PAGE_SIZE > SLOT_SIZE {
            return Err(Exhausted);
        }
        let page = *next;
        *next += PAGE_SIZE;
        drop(next);
        zero(&self.map, page);
        Ok(page)
    }

    /// Empties the pool (see the module comment). Waits until no vCPU of
    /// the VM is in `KVM_RUN`; the caller must not hold [`Setup::runs`].
    pub(crate) fn recycle(&self, seen: u64) -> Result<()> {
        let _all = self.runs.write();
        if self.generation.load(Ordering::Acquire) != seen {
            // Another vCPU recycled meanwhile.
            return Ok(());
        }
        // SAFETY: deleting our own slot exposes nothing; re-creating it
        // points at our own mapping, as in new.
        unsafe {
            set_region(&self.vm, &self.region(0))?;
            set_region(&self.vm, &self.region(SLOT_SIZE))?;
        }
        *self.next.lock() = POOL;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// One vCPU's page tables: its PML4 and the pool pages it took.
#[derive(Debug)]
pub(crate) struct Tables {
    n: u64,
    generation: u64,
}

impl Tables {
    /// The tables of vCPU index `n` (below [`MAX_VCPUS`]), empty.
    pub(crate) fn new(setup: &Setup, n: u64) -> Tables {
        zero(&setup.map, PML4S + n * PAGE_SIZE);
        Tables {
            n,
            generation: setup.generation.load(Ordering::Acquire),
        }
    }

    /// The pool generation these tables were built in.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes `[lo, hi)` (below 2^48) and the setup region reachable at
    /// their [`va`]. Call with [`Setup::runs`] held for reading.
    pub(crate) fn prepare(
        &mut self,
        setup: &Setup,
        lo: u64,
        hi: u64,
    ) -> std::result::Result<(), Exhausted> {
        let current = setup.generation.load(Ordering::Acquire);
        if self.generation != current {
            // Recycled: every page we held is gone, and no shadow of our
            // PML4 exists any more, so it may be cleared.
            zero(&setup.map, PML4S + self.n * PAGE_SIZE);
            self.generation = current;
        }
        self.map_gib(setup, SETUP_GPA / GIB)?;
        if hi > lo {
            for gib in lo / GIB..=(hi - 1) / GIB {
                self.map_gib(setup, gib)?;
            }
        }
        Ok(())
    }

    /// Maps guest physical GiB `gib` with a 1 GiB page or a page directory.
    fn map_gib(&mut self, setup: &Setup, gib: u64) -> std::result::Result<(), Exhausted> {
        let gpa = gib * GIB;
        let pml4 = PML4S + self.n * PAGE_SIZE;
        let pdpt = table(setup, pml4 + ((gpa >> 39) & 511) * 8)?;
        let slot = pdpt + ((gpa >> 30) & 511) * 8;
        if get(&setup.map, slot) & PTE_PRW_U != 0 {
            return Ok(());
        }
        if setup.gib_pages {
            put(&setup.map, slot, gpa | PTE_PRW_U | PTE_PS);
            return Ok(());
        }
        let pd = setup.alloc()?;
        let mut entries = [0u8; PAGE_SIZE as usize];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let pde = (gpa + ((i as u64) << 21)) | PTE_PRW_U | PTE_PS;
            e.copy_from_slice(&pde.to_le_bytes());
        }
        // In bounds: the page came from the pool, inside the region.
        let _ = setup.map.write(pd, &entries);
        put(&setup.map, slot, (SETUP_GPA + pd) | PTE_PRW_U);
        Ok(())
    }
}

/// The table the entry at `entry` points to, taken from the pool (and the
/// entry made present) if absent. Returns its offset in the region.
fn table(setup: &Setup, entry: u64) -> std::result::Result<u64, Exhausted> {
    let e = get(&setup.map, entry);
    if e & PTE_PRW_U != 0 {
        return Ok((e & ADDR_MASK) - SETUP_GPA);
    }
    let t = setup.alloc()?;
    put(&setup.map, entry, (SETUP_GPA + t) | PTE_PRW_U);
    Ok(t)
}

/// Writes one little-endian u64 at `offset` of the setup region.
fn put(map: &Mmap, offset: u64, value: u64) {
    // The offsets used here are inside the region by construction.
    let _ = map.write(offset, &value.to_le_bytes());
}

fn get(map: &Mmap, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = map.read(offset, &mut b);
    u64::from_le_bytes(b)
}

fn zero(map: &Mmap, page: u64) {
    let _ = map.write(page, &[0u8; PAGE_SIZE as usize]);
}
