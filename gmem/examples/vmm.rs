//! A minimal VMM on the memory manager: lay RAM out around the 32-bit hole
//! on guest_memfd, load an image, let the guest run over its RAM, serve a
//! device request through vm-memory, hand a conversion back to the guest,
//! and give memory back as a balloon would, printing what the kernel says
//! is held at each step.
//!
//! `cargo run --example vmm` (software backend), or
//! `cargo run --example vmm -- kvm` on a host with /dev/kvm.

use std::sync::atomic::Ordering;

use gmem::memory::{
    human_bytes, BackingRequest, GuestAddress, GuestRange, Layout, MemoryManager, PageState,
};
// vm-memory as gmem re-exports it: no vm-memory version to pin here.
use gmem::vm_memory::{self, Bytes, GuestMemoryBackend};
use gmem::{Backend, GuestLoop, GuestOp};

mod common;
use common::say;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = match std::env::args().nth(1).as_deref() {
        Some("kvm") => Backend::Kvm,
        _ => Backend::Soft,
    };
    let hv = backend.open()?;

    // 3 GiB + 64 MiB: the last 64 MiB land above 4 GiB. Private memory if
    // the host has it; nothing is allocated until it is touched.
    let layout = Layout::builder()
        .memory((3 << 30) + (64 << 20))
        .backing(BackingRequest::Best)
        .build()?;
    let mm = MemoryManager::new(&*hv, layout)?;
    say(
        &format!("{} backend, {} backing:", hv.name(), mm.backing().mode),
        &mm.backing().reason,
    );
    for slot in mm.layout().slots() {
        println!(
            "  memslot {} {} -> guest_memfd {} at {}",
            slot.id, slot.range, slot.file, slot.offset
        );
    }

    // "Load the kernel": the host writes an image into guest RAM and sets a
    // boot flag after it. Every manager method takes the address first.
    let image = b"\x7fELF pretend kernel";
    mm.write(GuestAddress(0x10_0000), image)?;
    mm.store(GuestAddress(0x10_1000), 1u32, Ordering::Release)?;

    // The guest populates 64 KiB above 4 GiB in one loop.
    let mut vcpu = mm.vm().create_vcpu(0)?;
    let high = GuestRange::new(GuestAddress(1 << 32), 64 << 10);
    let fill = GuestLoop::Fill {
        gpa: high.start.0,
        len: high.len,
        seed: 0x5eed,
    };
    let run = mm.run_loop(&mut *vcpu, fill)?;
    println!(
        "guest filled {} above 4 GiB ({} run)",
        human_bytes(high.len),
        run.exits.done
    );

    // A device, written against vm-memory only, reads what the guest wrote.
    let mem = mm.guest_memory();
    let word: u64 = mem.read_obj(vm_memory::GuestAddress(high.start.0 + 8))?;
    assert_eq!(word, GuestLoop::pattern(high.start.0 + 8, 0x5eed));
    println!(
        "device read {word:#x} through vm-memory ({} regions)",
        mem.num_regions()
    );
    say("held:", &mm.held()?.to_string());

    // A confidential guest makes that range private with a hypercall; the VMM
    // lets the manager handle the exit and resumes.
    if mm.backing().mode.has_private_memory() {
        let exit = vcpu.run(GuestOp::MapGpaRange {
            gpa: high.start.0,
            npages: high.len / 4096,
            attributes: gmem::uapi::KVM_MAP_GPA_RANGE_ENCRYPTED,
        })?;
        if let Some(done) = mm.handle_exit(&exit)? {
            say(
                &format!(
                    "guest converted {} to {}; that range holds",
                    done.range, done.to
                ),
                &mm.held_in(high)?.to_string(),
            );
        }
        assert_eq!(mm.state(high.start), Some(PageState::Private));
    }

    // The balloon takes the range back: whatever held it lets go.
    mm.discard(high)?;
    println!(
        "after discard, {} held for that range",
        human_bytes(mm.held_in(high)?.total())
    );
    Ok(())
}
