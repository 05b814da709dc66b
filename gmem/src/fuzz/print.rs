//! Scenarios back to `.gmem` text: the inverse of [`crate::scenario::parse`].
//!
//! Every program the fuzzer makes, and every minimized finding it writes, is
//! printed by [`print`] and read back by the parser, so what runs is exactly
//! what a file says. Numbers print in hex (addresses, sizes) or decimal
//! (slots, counts); arguments that have their default value are left out.

use std::fmt::Write as _;

use crate::scenario::ast::{FdRef, FileOp, Line, Op, Outcome, Region, Scenario, Userspace};
use crate::scenario::parse::{GMEM_FLAGS, MBIND_FLAGS, SLOT_FLAGS};
use crate::uapi::{
    CAPS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM,
};

/// The whole file: `require` lines, then one line per operation, each with
/// its expectation (none written for `ok`).
pub fn print(scenario: &Scenario) -> String {
    let mut out = String::new();
    if !scenario.requires.is_empty() {
        let kinds: Vec<String> = scenario
            .requires
            .iter()
            .map(|r| r.kind.to_string())
            .collect();
        let _ = writeln!(out, "require {}", kinds.join(" "));
    }
    for line in &scenario.lines {
        out.push_str(&print_line(line));
        out.push('\n');
    }
    out
}

/// One operation line, `[NAME =] OP ARGS... [=> OUTCOME]`.
pub fn print_line(line: &Line) -> String {
    let mut s = String::new();
    if let Some(b) = &line.bind {
        let _ = write!(s, "{b} = ");
    }
    s.push_str(&print_op(&line.op));
    if line.expect != Outcome::Ok || !line.since.is_empty() {
        let _ = write!(s, " => {}", line.expect);
        for (release, outcome) in &line.since {
            let _ = write!(s, " | {release}: {outcome}");
        }
    }
    s
}

/// The operation and its arguments, without binding or outcome.
pub fn print_op(op: &Op) -> String {
    let mut s = String::new();
    let w = &mut s;
    match op {
        Op::CreateVm { vm_type } => {
            w.push_str("create_vm");
            match *vm_type {
                t if t == KVM_X86_DEFAULT_VM as u64 => {}
                t if t == KVM_X86_SW_PROTECTED_VM as u64 => w.push_str(" type=sw_protected"),
                t => {
                    let _ = write!(w, " type={t}");
                }
            }
        }
        Op::CreateGuestMemfd {
            vm,
            size,
            flags,
            reserved,
        } => {
            let _ = write!(w, "create_guest_memfd {vm} size={}", size_text(*size));
            if *flags != 0 {
                let _ = write!(w, " flags={}", flag_text(*flags, GMEM_FLAGS));
            }
            if *reserved != 0 {
                let _ = write!(w, " reserved={reserved:#x}");
            }
        }
        Op::HostMemory { size } => {
            let _ = write!(w, "host_memory size={}", size_text(*size));
        }
        Op::Mmap {
            gmem,
            offset,
            size,
            private,
        } => {
            let _ = write!(w, "mmap {gmem}");
            if *offset != 0 {
                let _ = write!(w, " offset={}", signed(*offset));
            }
            if let Some(n) = size {
                let _ = write!(w, " size={}", size_text(*n));
            }
            if *private {
                w.push_str(" private");
            }
        }
        Op::SetMemoryRegion(r) => region(w, r),
        Op::SetMemoryAttributes {
            vm,
            gpa,
            size,
            attributes,
            flags,
        } => {
            let _ = write!(
                w,
                "set_memory_attributes {vm} gpa={gpa:#x} size={} attributes={}",
                size_text(*size),
                attributes_text(*attributes)
            );
            if *flags != 0 {
                let _ = write!(w, " flags={flags:#x}");
            }
        }
        Op::Fallocate {
            gmem,
            mode,
            offset,
            len,
        } => {
            let mode = match *mode {
                m if m == FALLOC_FL_KEEP_SIZE => "allocate".to_string(),
                m if m == FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE => "punch_hole".to_string(),
                m => format!("{:#x}", m as u32),
            };
            let _ = write!(
                w,
                "fallocate {gmem} mode={mode} offset={} len={}",
                signed(*offset),
                signed(*len)
            );
        }
        Op::HostWrite {
            mem,
            offset,
            byte,
            len,
        } => {
            let _ = write!(w, "host_write {mem} offset={offset:#x} byte={byte:#04x}");
            if *len != 1 {
                let _ = write!(w, " len={}", size_text(*len));
            }
        }
        Op::HostRead { mem, offset } => {
            let _ = write!(w, "host_read {mem} offset={offset:#x}");
        }
        Op::GuestWrite { vm, gpa, byte } => {
            let _ = write!(w, "guest_write {vm} gpa={gpa:#x} byte={byte:#04x}");
        }
        Op::GuestRead { vm, gpa } => {
            let _ = write!(w, "guest_read {vm} gpa={gpa:#x}");
        }
        Op::GuestMapGpaRange {
            vm,
            gpa,
            pages,
            private,
        } => {
            let kind = if *private { "private" } else { "shared" };
            let _ = write!(
                w,
                "guest_map_gpa_range {vm} gpa={gpa:#x} pages={pages} {kind}"
            );
        }
        Op::File { gmem, op } => {
            let _ = match op {
                FileOp::Read => write!(w, "file_read {gmem}"),
                FileOp::Write => write!(w, "file_write {gmem}"),
                FileOp::Pread => write!(w, "file_pread {gmem}"),
                FileOp::Pwrite => write!(w, "file_pwrite {gmem}"),
                FileOp::Lseek => write!(w, "file_lseek {gmem}"),
                FileOp::Ftruncate(n) => write!(w, "file_ftruncate {gmem} size={}", signed(*n)),
                FileOp::Ioctl(0xAEFF) => write!(w, "file_ioctl {gmem}"),
                FileOp::Ioctl(r) => write!(w, "file_ioctl {gmem} request={r:#x}"),
            };
        }
        Op::Stat { gmem } => {
            let _ = write!(w, "stat {gmem}");
        }
        Op::SameInode { a, b } => {
            let _ = write!(w, "same_inode {a} {b}");
        }
        Op::CheckExtension { vm, cap } => {
            w.push_str("check_extension");
            if let Some(vm) = vm {
                let _ = write!(w, " {vm}");
            }
            match CAPS.iter().find(|(_, c)| c == cap) {
                Some((name, _)) => {
                    let _ = write!(w, " {name}");
                }
                None => {
                    let _ = write!(w, " {cap}");
                }
            }
        }
        Op::PreFault {
            vm,
            gpa,
            size,
            flags,
        } => {
            let _ = write!(w, "pre_fault {vm} gpa={gpa:#x} size={}", size_text(*size));
            if *flags != 0 {
                let _ = write!(w, " flags={flags:#x}");
            }
        }
        Op::SetMemoryAttributes2 {
            gmem,
            offset,
            size,
            attributes,
            flags,
        } => {
            let _ = write!(
                w,
                "set_memory_attributes2 {gmem} offset={offset:#x} size={} attributes={}",
                size_text(*size),
                attributes_text(*attributes)
            );
            if *flags != 0 {
                let _ = write!(w, " flags={flags:#x}");
            }
        }
        Op::Pin { mem, offset, len } => {
            let _ = write!(w, "pin {mem} offset={offset:#x} len={}", size_text(*len));
        }
        Op::Mbind {
            mem,
            offset,
            size,
            policy,
            flags,
        } => {
            let _ = write!(w, "mbind {mem}");
            if *offset != 0 {
                let _ = write!(w, " offset={offset:#x}");
            }
            if let Some(n) = size {
                let _ = write!(w, " size={}", size_text(*n));
            }
            // `bind|static nodes=0-1`: the mode argument, then the nodes.
            let _ = write!(w, " policy={policy}");
            if !flags.is_empty() {
                let _ = write!(w, " flags={}", flag_text(flags.bits().into(), MBIND_FLAGS));
            }
        }
        Op::GetMempolicy { mem, offset } => {
            let _ = write!(w, "get_mempolicy {mem}");
            if *offset != 0 {
                let _ = write!(w, " offset={offset:#x}");
            }
        }
        Op::Madvise {
            mem,
            offset,
            size,
            advice,
        } => {
            let _ = write!(w, "madvise {mem}");
            if *offset != 0 {
                let _ = write!(w, " offset={offset:#x}");
            }
            if let Some(n) = size {
                let _ = write!(w, " size={}", size_text(*n));
            }
            let _ = write!(w, " advice={advice}");
        }
        Op::Close { handle } => {
            let _ = write!(w, "close {handle}");
        }
    }
    s
}

fn attributes_text(a: u64) -> String {
    match a {
        0 => "shared".to_string(),
        a if a == KVM_MEMORY_ATTRIBUTE_PRIVATE as u64 => "private".to_string(),
        a => format!("{a:#x}"),
    }
}

fn region(w: &mut String, r: &Region) {
    if r.size == 0 {
        let _ = write!(w, "delete_memory_region {} slot={}", r.vm, r.slot);
        if r.as_id != 0 {
            let _ = write!(w, " as={}", r.as_id);
        }
        if r.gpa != 0 {
            let _ = write!(w, " gpa={:#x}", r.gpa);
        }
    } else {
        let _ = write!(w, "set_memory_region {} slot={}", r.vm, r.slot);
        if r.as_id != 0 {
            let _ = write!(w, " as={}", r.as_id);
        }
        let _ = write!(w, " gpa={:#x} size={}", r.gpa, size_text(r.size));
    }
    if r.flags != 0 {
        let _ = write!(w, " flags={}", flag_text(r.flags.into(), SLOT_FLAGS));
    }
    match &r.userspace {
        Userspace::Addr(0) => {}
        Userspace::Addr(a) => {
            let _ = write!(w, " userspace={a:#x}");
        }
        Userspace::Handle(h) => {
            let _ = write!(w, " userspace={h}");
        }
    }
    if r.userspace_offset != 0 {
        let _ = write!(w, " userspace_offset={:#x}", r.userspace_offset);
    }
    let _ = match &r.guest_memfd {
        FdRef::Raw(0) => Ok(()),
        FdRef::Raw(n) => write!(w, " guest_memfd={n:#x}"),
        FdRef::Handle(h) => write!(w, " guest_memfd={h}"),
        FdRef::Closed => write!(w, " guest_memfd=closed"),
        FdRef::Kvm => write!(w, " guest_memfd=kvm"),
        FdRef::Memfd => write!(w, " guest_memfd=memfd"),
    };
    if r.offset != 0 {
        let _ = write!(w, " offset={:#x}", r.offset);
    }
    if r.v1 {
        w.push_str(" ioctl=v1");
    }
}

/// Known bits by name, the rest as one hex number: `mmap|init_shared|0x10`.
fn flag_text(v: u64, names: &[(&str, u64)]) -> String {
    let mut parts = Vec::new();
    let mut rest = v;
    for (name, bit) in names {
        if rest & bit != 0 {
            parts.push((*name).to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    parts.join("|")
}

/// A size as people write it: `16K`, `2M`, `1T` when exact, else hex.
pub fn size_text(n: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.trailing_zeros() >= shift && n >> shift < 1 << 20 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    format!("{n:#x}")
}

/// A signed number: `-4096`, or hex when not negative.
fn signed(n: i64) -> String {
    if n < 0 {
        format!("-{}", n.unsigned_abs())
    } else {
        format!("{n:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::parse;

    fn round_trip(text: &str) -> String {
        let sc = parse("t.gmem", text).unwrap_or_else(|e| panic!("{text}\n{e}"));
        print(&sc)
    }

    #[test]
    fn every_operation_prints_as_it_parses() {
        let text = "\
require vm_type:sw_protected memory_attributes
vm = create_vm type=sw_protected
vm2 = create_vm type=7 => EINVAL
g = create_guest_memfd vm size=16K flags=mmap|init_shared|0x10 reserved=0x1
h = host_memory size=2M
m = mmap g offset=-4096 size=0x1001 private => EINVAL
set_memory_region vm slot=1 as=1 gpa=0x100000 size=16K flags=guest_memfd|0x100 userspace=h userspace_offset=0x1000 guest_memfd=g offset=0x2000 ioctl=v1
set_memory_region vm slot=2 gpa=0x200000 size=4K userspace=0x1000 guest_memfd=0xffffffff
set_memory_region vm slot=3 gpa=0x300000 size=4K guest_memfd=closed
set_memory_region vm slot=4 gpa=0x400000 size=4K guest_memfd=kvm
set_memory_region vm slot=5 gpa=0x500000 size=4K guest_memfd=memfd
set_memory_region vm slot=6 gpa=0x600000 size=4K guest_memfd=vm
delete_memory_region vm slot=1 as=1 gpa=0x100000 flags=guest_memfd
set_memory_attributes vm gpa=0x100000 size=4K attributes=private flags=0x1
set_memory_attributes vm gpa=0x100000 size=4K attributes=0x9
fallocate g mode=punch_hole offset=0x0 len=-4096
fallocate g mode=0x10 offset=0x1000 len=0x1000 => EOPNOTSUPP
host_write h offset=0xfff byte=0x5a len=0x2
host_read h offset=0x0 => 0x00
guest_write vm gpa=0x100000 byte=0x01 => exit memory_fault gpa=0x100000 size=4096 flags=private
guest_read vm gpa=0x200000 => exit mmio gpa=0x200000 read
guest_map_gpa_range vm gpa=0x100000 pages=2 private => exit hypercall gpa=0x100000 pages=2 attributes=private
guest_map_gpa_range vm gpa=0x100000 pages=1 shared => 1000
file_read g => EINVAL
file_write g
file_pread g
file_pwrite g
file_lseek g => ESPIPE
file_ftruncate g size=-1
file_ioctl g
file_ioctl g request=0x1234 => ENOTTY
stat g => size=16384 blksize=4096 blocks=0 mode=0o100600
same_inode g g => 1
check_extension guest_memfd_flags => 3
check_extension vm 999 => 0
h2 = host_memory size=0x1001 => sigbus
guest_read vm gpa=0x0 => timeout
pre_fault vm gpa=0x100000 size=8K flags=0x1 => EINVAL
set_memory_attributes2 g offset=0x1000 size=4K attributes=private => EINVAL | 7.2: EEXIST | next: ok
p = pin m offset=0x0 len=4K
close p
mbind m offset=0x1000 size=4K policy=bind|static nodes=0-1 flags=strict|move|0x8 => EINVAL
mbind m policy=default
get_mempolicy m offset=0x1000 => bind|static nodes=0-1
get_mempolicy m => default
madvise m offset=0x1000 size=4K advice=remove
madvise m advice=populate_write => sigbus
close g
";
        let once = round_trip(text);
        assert_eq!(once, text);
        assert_eq!(round_trip(&once), once);
    }

    #[test]
    fn sizes_print_with_suffixes_when_exact() {
        assert_eq!(size_text(4096), "4K");
        assert_eq!(size_text(2 << 20), "2M");
        assert_eq!(size_text(1 << 40), "1T");
        assert_eq!(size_text(4097), "0x1001");
        assert_eq!(size_text(0), "0x0");
        assert_eq!(size_text(u64::MAX - 4095), "0xfffffffffffff000");
    }
}
