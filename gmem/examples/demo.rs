//! A short tour of the software backend: create, bind, share, punch,
//! convert, release. Every step prints what it did and what it observed.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use gmem::soft::{InvalidateCause, Invalidation, InvalidationObserver, SoftHypervisor};
use gmem::uapi::*;
use gmem::{GuestMemfd, GuestOp, Hypervisor, MapKind, Result, Vcpu, VcpuExit, Vm};

mod common;
use common::say;

/// What caused an invalidation, in words.
fn cause(c: InvalidateCause) -> &'static str {
    match c {
        InvalidateCause::PunchHole => "punch hole",
        InvalidateCause::Release => "file released",
        InvalidateCause::Attributes => "attributes changed",
        InvalidateCause::SlotDelete => "slot deleted",
        InvalidateCause::SlotMove => "slot moved",
        InvalidateCause::HostUnmap => "host memory unmapped",
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Invalidation>>);

impl InvalidationObserver for Recorder {
    fn invalidate(&self, inv: &Invalidation) {
        self.0.lock().unwrap().push(inv.clone());
    }
}

fn show(exit: VcpuExit) -> String {
    match exit {
        VcpuExit::Done(v) => format!("{v:#x}"),
        VcpuExit::MemoryFault { flags, gpa, size } => {
            format!("memory fault exit (gpa {gpa:#x}, size {size:#x}, flags {flags:#x})")
        }
        other => format!("{other:?}"),
    }
}

/// A one-byte guest load at `gpa`, shown as the value or the exit.
fn read(vcpu: &mut dyn Vcpu, gpa: u64) -> Result<String> {
    Ok(show(vcpu.run(GuestOp::Read { gpa, size: 1 })?))
}

/// Sets the attributes of guest physical `[0, size)`.
fn convert(vm: &dyn Vm, size: u64, attributes: u64) -> Result<()> {
    vm.set_memory_attributes(kvm_memory_attributes {
        address: 0,
        size,
        attributes,
        flags: 0,
    })
}

fn main() -> Result<()> {
    let hv = SoftHypervisor::new()?;
    println!(
        "software hypervisor: GUEST_MEMFD_FLAGS={:#x} VM_TYPES={:#x}",
        hv.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS),
        hv.check_extension(KVM_CAP_VM_TYPES)
    );

    // A default VM with a 64 KiB guest_memfd the host can map.
    let vm = hv.create_soft_vm(KVM_X86_DEFAULT_VM as u64)?;
    let recorder = Arc::new(Recorder::default());
    let observer: Arc<dyn InvalidationObserver> = recorder.clone();
    vm.register_invalidation_observer(&observer);
    let g = vm.create_soft_guest_memfd(kvm_create_guest_memfd {
        size: 64 << 10,
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        ..Default::default()
    })?;
    println!(
        "created a guest_memfd of {} KiB, flags MMAP|INIT_SHARED",
        g.size() >> 10
    );
    vm.set_user_memory_region2(guest_memfd_region(1, 0x10_0000, 64 << 10, g.as_raw_fd(), 0))?;
    println!("bound slot 1: gpa 0x100000..0x110000 -> file offset 0");
    let err = vm
        .set_user_memory_region2(guest_memfd_region(
            2,
            0x20_0000,
            4 << 10,
            g.as_raw_fd(),
            64 << 10,
        ))
        .unwrap_err();
    say(
        "binding slot 2 at the file's end is refused:",
        &err.to_string(),
    );

    let m = g.mmap(0, 64 << 10, MapKind::Shared)?;
    m.write(0x1000, &[0xaa]).expect("shared page");
    let mut vcpu = vm.create_vcpu(0)?;
    println!(
        "host wrote 0xaa at file offset 0x1000; guest reads gpa 0x101000: {}",
        read(vcpu.as_mut(), 0x10_1000)?
    );
    vcpu.run(GuestOp::Write {
        gpa: 0x10_2000,
        size: 8,
        value: 0x1122_3344_5566_7788,
    })?;
    let mut b = [0u8; 8];
    m.read(0x2000, &mut b).expect("shared page");
    println!(
        "guest wrote 0x1122334455667788 at gpa 0x102000; host reads {:#x}",
        u64::from_le_bytes(b)
    );

    let before = g.allocated_bytes()? >> 10;
    g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 64 << 10)?;
    say(
        &format!("punched the whole file: the pages held {before} KiB,"),
        &format!(
            "now {} KiB (memory went back to the host)",
            g.allocated_bytes()? >> 10
        ),
    );
    println!(
        "guest reads gpa 0x101000 after the punch: {}",
        read(vcpu.as_mut(), 0x10_1000)?
    );

    // Release: the file goes while slot 1 still names it.
    drop(m);
    drop(g);
    println!("closed the guest_memfd and its mapping; slot 1 stays, the file is gone");
    println!(
        "guest reads gpa 0x101000: {}",
        read(vcpu.as_mut(), 0x10_1000)?
    );
    vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        slot: 1,
        ..Default::default()
    })?;
    println!("deleted slot 1");

    // Private memory on a sw_protected VM.
    let pvm = hv.create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64)?;
    let pg = pvm.create_guest_memfd(kvm_create_guest_memfd {
        size: 2 << 20,
        ..Default::default()
    })?;
    let host = hv.create_host_memory(2 << 20)?;
    pvm.set_user_memory_region2(kvm_userspace_memory_region2 {
        userspace_addr: gmem::HostMemory::addr(&host),
        ..guest_memfd_region(0, 0, 2 << 20, pg.as_raw_fd(), 0)
    })?;
    let mut pvcpu = pvm.create_vcpu(0)?;
    convert(&pvm, 2 << 20, KVM_MEMORY_ATTRIBUTE_PRIVATE as u64)?;
    pvcpu.run(GuestOp::Write {
        gpa: 0x1000,
        size: 1,
        value: 0x5a,
    })?;
    gmem::HostMemory::write(&host, 0x1000, &[0x11]).expect("host memory");
    say(
        "sw_protected VM:",
        "guest wrote 0x5a to private gpa 0x1000, host wrote 0x11 to its shared copy",
    );
    println!("  private read: {}", read(pvcpu.as_mut(), 0x1000)?);
    convert(&pvm, 2 << 20, 0)?;
    println!(
        "  converted to shared; shared read: {}",
        read(pvcpu.as_mut(), 0x1000)?
    );
    convert(&pvm, 1 << 40, KVM_MEMORY_ATTRIBUTE_PRIVATE as u64)?;
    println!(
        "  converted 1 TiB to private: the attribute map holds {} range(s)",
        pvm.attribute_ranges()
    );

    println!(
        "invalidations on the default VM (mmu_invalidate_seq {}):",
        vm.invalidate_seq()
    );
    for inv in recorder.0.lock().unwrap().iter() {
        println!(
            "  slot {} gfns [{:#x}, {:#x}): {}",
            inv.slot,
            inv.gfns.start,
            inv.gfns.end,
            cause(inv.cause)
        );
    }
    Ok(())
}
