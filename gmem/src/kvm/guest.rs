//! The guest side of a vCPU: a private setup region with the page tables,
//! the GDT and the code that performs one [`GuestOp`] per run.
//!
//! Layout: the setup region is bound to memslot [`SETUP_SLOT`] at guest
//! physical `[SETUP_GPA, SETUP_GPA + SETUP_SIZE)` (0xE000_0000 to
//! 0xE040_0000, below the usual PCI hole end) when the VM is created. Inside:
//!
//! | offset   | what |
//! |---|---|
//! | 0x0000   | GDT: null, 64-bit code (0x08), data (0x10) |
//! | 0x1000   | code, one entry point per operation |
//! | 0x10000 + n * 0x8000 | vCPU n's page tables (PML4, then a pool of 7 pages), rebuilt before each of its runs |
//!
//! So up to [`MAX_VCPUS`] vCPUs of one VM can run at the same time, each on
//! its own page tables.
//!
//! Paging (4-level, 2 MiB pages, built before every run): the setup region
//! is identity-mapped; the target of the access is reached through a 4 MiB
//! window at guest virtual [`WINDOW`], which maps the 2 MiB page holding the
//! target and the next one. A window rather than an identity map because
//! guest physical addresses reach 2^MAXPHYADDR (2^48 and more) while
//! canonical virtual addresses stop at 2^47. 2 MiB pages exist on every
//! x86-64 CPU (no need for pdpe1gb), so any guest physical address below
//! MAXPHYADDR is reachable, below and above 4 GiB. Exits report the guest
//! physical address, as always.

use iced_x86::code_asm::{
    byte_ptr, dword_ptr, eax, esi, qword_ptr, rax, rdi, rsi, si, sil, word_ptr, CodeAssembler,
    CodeLabel,
};
use iced_x86::BlockEncoderOptions;

use crate::error::{Errno, Error, Result};
use crate::hypervisor::GuestOp;
use crate::uapi::PAGE_SIZE;

/// Memslot id of the setup region (address space 0). User slots may not use it.
pub const SETUP_SLOT: u32 = 32700;
/// Guest physical address of the setup region.
pub const SETUP_GPA: u64 = 0xE000_0000;
/// Size of the setup region: two 2 MiB pages.
pub const SETUP_SIZE: u64 = 0x40_0000;
/// The port the guest writes to when it completed its operation.
pub const DONE_PORT: u16 = 0x4d;

const GDT: u64 = 0x0000;
const CODE: u64 = 0x1000;
const TABLES: u64 = 0x10000;
const TABLES_SIZE: u64 = 0x8000;
/// vCPUs per VM that the setup region has page tables for.
pub const MAX_VCPUS: u64 = 64;
/// Top of a stack the guest never uses (no calls), kept valid anyway.
pub(crate) const STACK_TOP: u64 = SETUP_GPA + SETUP_SIZE - 16;

/// Guest virtual address of the window onto the target of an access: the
/// last 4 MiB below 2^47, far from the identity-mapped setup region.
pub const WINDOW: u64 = (1 << 47) - 2 * HUGE;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;
const HUGE: u64 = 2 << 20;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// GDT entries: null, code (L=1), data.
const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
/// Selectors of the GDT above.
pub(crate) const CODE_SELECTOR: u16 = 0x08;
pub(crate) const DATA_SELECTOR: u16 = 0x10;
/// GDT base and limit.
pub(crate) const GDT_BASE: u64 = SETUP_GPA + GDT;
pub(crate) const GDT_LIMIT: u16 = (GDT_ENTRIES.len() * 8 - 1) as u16;
/// Offset of vCPU `n`'s page tables in the setup region.
pub(crate) const fn tables_base(n: u64) -> u64 {
    TABLES + n * TABLES_SIZE
}

/// CR3 of vCPU `n`: its PML4.
pub(crate) const fn cr3(n: u64) -> u64 {
    SETUP_GPA + tables_base(n)
}

/// Guest code entry points, as guest physical (= virtual) addresses.
#[derive(Debug, Clone)]
pub(crate) struct Code {
    bytes: Vec<u8>,
    reads: [u64; 4],
    writes: [u64; 4],
    hypercall: u64,
}

fn asm_err(e: iced_x86::IcedError) -> Error {
    Error::new(
        Errno::EINVAL,
        "KVM-SETUP",
        format!("assembling the guest code failed: {e}"),
    )
}

impl Code {
    /// Assembles the guest code. Registers in: rdi = gpa, rsi = value;
    /// for the hypercall rax = nr, rbx/rcx/rdx = its arguments. Out: rax.
    /// Every path ends with `out DONE_PORT, al`.
    pub(crate) fn assemble(amd: bool) -> Result<Code> {
        let mut a = CodeAssembler::new(64).map_err(asm_err)?;
        let mut done = a.create_label();
        let mut labels: Vec<CodeLabel> = (0..9).map(|_| a.create_label()).collect();
        let e = |r: std::result::Result<(), iced_x86::IcedError>| r.map_err(asm_err);
        // Loads, zero-extended into rax.
        e(a.set_label(&mut labels[0]))?;
        e(a.movzx(eax, byte_ptr(rdi)))?;
        e(a.jmp(done))?;
        e(a.set_label(&mut labels[1]))?;
        e(a.movzx(eax, word_ptr(rdi)))?;
        e(a.jmp(done))?;
        e(a.set_label(&mut labels[2]))?;
        e(a.mov(eax, dword_ptr(rdi)))?;
        e(a.jmp(done))?;
        e(a.set_label(&mut labels[3]))?;
        e(a.mov(rax, qword_ptr(rdi)))?;
        e(a.jmp(done))?;
        // Stores of the low bytes of rsi; rax = 0.
        e(a.set_label(&mut labels[4]))?;
        e(a.mov(byte_ptr(rdi), sil))?;
        e(a.jmp(done))?;
        e(a.set_label(&mut labels[5]))?;
        e(a.mov(word_ptr(rdi), si))?;
        e(a.jmp(done))?;
        e(a.set_label(&mut labels[6]))?;
        e(a.mov(dword_ptr(rdi), esi))?;
        e(a.jmp(done))?;
        e(a.set_label(&mut labels[7]))?;
        e(a.mov(qword_ptr(rdi), rsi))?;
        e(a.xor(eax, eax))?;
        e(a.jmp(done))?;
        // The hypercall: AMD's instruction or Intel's.
        e(a.set_label(&mut labels[8]))?;
        e(if amd { a.vmmcall() } else { a.vmcall() })?;
        e(a.set_label(&mut done))?;
        e(a.out(DONE_PORT as u32, iced_x86::code_asm::al))?;
        e(a.hlt())?;
        let base = SETUP_GPA + CODE;
        let res = a
            .assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .map_err(asm_err)?;
        let ip = |l: &CodeLabel| res.label_ip(l).map_err(asm_err);
        let code = Code {
            reads: [
                ip(&labels[0])?,
                ip(&labels[1])?,
                ip(&labels[2])?,
                ip(&labels[3])?,
            ],
            writes: [
                ip(&labels[4])?,
                ip(&labels[5])?,
                ip(&labels[6])?,
                ip(&labels[7])?,
            ],
            hypercall: ip(&labels[8])?,
            bytes: res.inner.code_buffer,
        };
        if code.bytes.len() as u64 > PAGE_SIZE {
            return Err(Error::new(
                Errno::E2BIG,
                "KVM-SETUP",
                "guest code exceeds its page",
            ));
        }
        Ok(code)
    }

    /// The entry point for `op`.
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
}

/// Writes one little-endian u64 at `offset` of the setup region.
fn put(setup: &crate::host::Mmap, offset: u64, value: u64) {
    // The offsets used here are constants inside the region.
    let _ = setup.write(offset, &value.to_le_bytes());
}

fn get(setup: &crate::host::Mmap, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = setup.read(offset, &mut b);
    u64::from_le_bytes(b)
}

/// Page tables under construction in the setup region.
struct Tables<'a> {
    setup: &'a crate::host::Mmap,
    pml4: u64,
    next: u64,
}

impl Tables<'_> {
    /// The table an entry points to, made from the pool if absent.
    fn table(&mut self, entry_offset: u64) -> Result<u64> {
        let e = get(self.setup, entry_offset);
        if e & PTE_P != 0 {
            return Ok((e & ADDR_MASK) - SETUP_GPA);
        }
        if self.next >= self.pml4 + TABLES_SIZE {
            return Err(Error::new(
                Errno::ENOMEM,
                "KVM-SETUP",
                "page-table pool exhausted",
            ));
        }
        let t = self.next;
        self.next += PAGE_SIZE;
        put(self.setup, entry_offset, (SETUP_GPA + t) | PTE_P | PTE_RW);
        Ok(t)
    }

    /// Maps the 2 MiB page at guest virtual `va` to guest physical `pa`.
    fn map(&mut self, va: u64, pa: u64) -> Result<()> {
        let idx = |shift: u32| ((va >> shift) & 511) * 8;
        let pdpt = self.table(self.pml4 + idx(39))?;
        let pd = self.table(pdpt + idx(30))?;
        put(
            self.setup,
            pd + idx(21),
            (pa & !(HUGE - 1)) | PTE_P | PTE_RW | PTE_PS,
        );
        Ok(())
    }
}

/// Writes the GDT and the code into the setup region (once per VM).
pub(crate) fn install(setup: &crate::host::Mmap, code: &Code) -> Result<()> {
    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        put(setup, GDT + 8 * i as u64, *d);
    }
    setup
        .write(CODE, &code.bytes)
        .map_err(|e| Error::new(Errno::EINVAL, "KVM-SETUP", e.to_string()))
}

/// Rebuilds vCPU `n`'s page tables for an access at `gpa`: the setup
/// region identity-mapped, and the window mapping the 2 MiB page holding
/// `gpa` and the one after it (for accesses that cross). Returns the guest
/// virtual address of `gpa` in the window.
pub(crate) fn map_for(setup: &crate::host::Mmap, n: u64, gpa: u64, phys_bits: u8) -> Result<u64> {
    let pml4 = tables_base(n);
    let _ = setup.write(pml4, &[0u8; TABLES_SIZE as usize]);
    let mut t = Tables {
        setup,
        pml4,
        next: pml4 + PAGE_SIZE,
    };
    t.map(SETUP_GPA, SETUP_GPA)?;
    t.map(SETUP_GPA + HUGE, SETUP_GPA + HUGE)?;
    let page = gpa & !(HUGE - 1);
    t.map(WINDOW, page)?;
    let next = page + HUGE;
    if next < 1u64 << phys_bits.min(63) {
        t.map(WINDOW + HUGE, next)?;
    }
    Ok(WINDOW + (gpa - page))
}
