//! What only the software backend can show: the exact gfn ranges each
//! invalidation covers (INVAL-1..4, seen through an invalidation observer),
//! that guest_memfd pages are real memory (FALLOC-4, MMAP-5, FAULT-5,
//! ATTR-5: `allocated_bytes` rises and falls), and that attributes are stored by
//! range (ATTR-6). The contract tests (tests/contract) cover the same rules
//! as the guest sees them, on every backend.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use gmem::soft::{
    InvalidateCause, Invalidation, InvalidationObserver, SoftGuestMemfd, SoftHypervisor, SoftVm,
};
use gmem::uapi::*;
use gmem::{Advice, Errno, GuestMemfd, GuestOp, Hypervisor, MapKind, Vcpu, VcpuExit, Vm};

const P: u64 = PAGE_SIZE;
const GPA: u64 = 0x1000_0000;
const GFN: u64 = GPA >> PAGE_SHIFT;
const PRIVATE: u64 = KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;
const PUNCH: i32 = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;

/// Records every invalidation of a VM.
#[derive(Default)]
struct Recorder(Mutex<Vec<Invalidation>>);

impl InvalidationObserver for Recorder {
    fn invalidate(&self, invalidation: &Invalidation) {
        self.0.lock().unwrap().push(invalidation.clone());
    }
}

impl Recorder {
    /// Registers a new recorder on `vm`; it records while the Arc lives.
    fn on(vm: &SoftVm) -> Arc<Recorder> {
        let recorder = Arc::new(Recorder::default());
        let observer: Arc<dyn InvalidationObserver> = recorder.clone();
        vm.register_invalidation_observer(&observer);
        recorder
    }

    /// What was recorded so far, emptying the record.
    fn take(&self) -> Vec<Invalidation> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

fn inv(slot: u16, gfns: std::ops::Range<u64>, cause: InvalidateCause) -> Invalidation {
    Invalidation {
        as_id: 0,
        slot,
        gfns,
        cause,
    }
}

fn hv() -> SoftHypervisor {
    SoftHypervisor::new().unwrap()
}

fn gmem(vm: &SoftVm, size: u64, flags: u64) -> SoftGuestMemfd {
    vm.create_soft_guest_memfd(kvm_create_guest_memfd {
        size,
        flags,
        ..Default::default()
    })
    .unwrap()
}

fn set_attributes(vm: &SoftVm, gpa: u64, size: u64, attributes: u64) {
    vm.set_memory_attributes(kvm_memory_attributes {
        address: gpa,
        size,
        attributes,
        flags: 0,
    })
    .unwrap();
}

fn allocated(file: &SoftGuestMemfd) -> u64 {
    file.allocated_bytes().unwrap()
}

fn load(cpu: &mut Box<dyn Vcpu>, gpa: u64) -> VcpuExit {
    cpu.run(GuestOp::Read { gpa, size: 8 }).unwrap()
}

/// Two slots on one 8-page file: slot 0 at `GPA` over pages [0, 4), slot 1
/// at `GPA + 64P` over pages [4, 8).
fn two_bindings(vm: &SoftVm) -> SoftGuestMemfd {
    let file = gmem(vm, 8 * P, GUEST_MEMFD_FLAG_MMAP);
    vm.set_user_memory_region2(guest_memfd_region(0, GPA, 4 * P, file.as_raw_fd(), 0))
        .unwrap();
    vm.set_user_memory_region2(guest_memfd_region(
        1,
        GPA + 64 * P,
        4 * P,
        file.as_raw_fd(),
        4 * P,
    ))
    .unwrap();
    file
}

/// INVAL-1: a punch invalidates, in each binding it overlaps, exactly the
/// gfns of the punched pages.
#[test]
fn punch_hole_invalidates_the_punched_gfns_of_each_binding() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = two_bindings(&vm);
    let recorder = Recorder::on(&vm);

    file.fallocate(PUNCH, 2 * P as i64, 4 * P as i64).unwrap();

    assert_eq!(
        recorder.take(),
        [
            inv(0, GFN + 2..GFN + 4, InvalidateCause::PunchHole),
            inv(1, GFN + 64..GFN + 66, InvalidateCause::PunchHole),
        ]
    );
}

/// INVAL-1: a punch of pages no slot binds invalidates nothing.
#[test]
fn punch_hole_of_unbound_pages_invalidates_nothing() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = gmem(&vm, 8 * P, 0);
    vm.set_user_memory_region2(guest_memfd_region(0, GPA, 2 * P, file.as_raw_fd(), 0))
        .unwrap();
    let recorder = Recorder::on(&vm);

    file.fallocate(PUNCH, 4 * P as i64, 4 * P as i64).unwrap();

    assert_eq!(recorder.take(), []);
}

/// INVAL-2, LIFE-5: releasing the file invalidates every binding over its
/// whole range; the slots stay.
#[test]
fn release_invalidates_every_binding_over_its_whole_range() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = two_bindings(&vm);
    let recorder = Recorder::on(&vm);

    drop(file);

    assert_eq!(
        recorder.take(),
        [
            inv(0, GFN..GFN + 4, InvalidateCause::Release),
            inv(1, GFN + 64..GFN + 68, InvalidateCause::Release),
        ]
    );
    assert_eq!(vm.nr_memslots(0), 2);
}

/// INVAL-3: an attribute change invalidates each intersecting slot over
/// the intersection only.
#[test]
fn attribute_change_invalidates_the_intersection_with_each_slot() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    let _file = two_bindings(&vm);
    let recorder = Recorder::on(&vm);

    set_attributes(&vm, GPA + 2 * P, 64 * P, PRIVATE);

    assert_eq!(
        recorder.take(),
        [
            inv(0, GFN + 2..GFN + 4, InvalidateCause::Attributes),
            inv(1, GFN + 64..GFN + 66, InvalidateCause::Attributes),
        ]
    );
}

/// ATTR-4, INVAL-3: a request that changes nothing invalidates nothing.
#[test]
fn attribute_request_that_changes_nothing_invalidates_nothing() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    let _file = two_bindings(&vm);
    set_attributes(&vm, GPA, 4 * P, PRIVATE);
    let recorder = Recorder::on(&vm);
    let seq = vm.invalidate_seq();

    set_attributes(&vm, GPA, 4 * P, PRIVATE);
    set_attributes(&vm, GPA + 64 * P, 4 * P, 0);

    assert_eq!(recorder.take(), []);
    assert_eq!(vm.invalidate_seq(), seq);
}

/// ATTR-4, INVAL-3: attributes changed where no slot is invalidate nothing,
/// yet are stored (ATTR-3).
#[test]
fn attribute_change_without_a_slot_invalidates_nothing_but_is_stored() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    let recorder = Recorder::on(&vm);

    set_attributes(&vm, GPA, 4 * P, PRIVATE);

    assert_eq!(recorder.take(), []);
    assert_eq!(vm.memory_attributes(GFN + 3), PRIVATE);
    assert_eq!(vm.memory_attributes(GFN + 4), 0);
}

/// INVAL-4: deleting a slot invalidates the whole slot.
#[test]
fn slot_delete_invalidates_the_whole_slot() {
    let vm = hv().create_soft_vm(0).unwrap();
    let _file = two_bindings(&vm);
    let recorder = Recorder::on(&vm);

    vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        slot: 1,
        ..Default::default()
    })
    .unwrap();

    assert_eq!(
        recorder.take(),
        [inv(1, GFN + 64..GFN + 68, InvalidateCause::SlotDelete)]
    );
}

/// INVAL-4, SLOT-11: moving an ordinary slot invalidates its old range.
#[test]
fn slot_move_invalidates_the_old_range() {
    let hv = hv();
    let vm = hv.create_soft_vm(0).unwrap();
    let mem = hv.host_memory(2 * P).unwrap();
    let region = kvm_userspace_memory_region2 {
        slot: 3,
        guest_phys_addr: GPA,
        memory_size: 2 * P,
        userspace_addr: mem.addr(),
        ..Default::default()
    };
    vm.set_user_memory_region2(region).unwrap();
    let recorder = Recorder::on(&vm);

    vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_phys_addr: GPA + 16 * P,
        ..region
    })
    .unwrap();

    assert_eq!(
        recorder.take(),
        [inv(3, GFN..GFN + 2, InvalidateCause::SlotMove)]
    );
}

/// INVAL-5: every invalidation moves `mmu_invalidate_seq`, so a translation
/// cached before it is known stale.
#[test]
fn every_invalidation_moves_the_sequence() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = two_bindings(&vm);
    let before = vm.invalidate_seq();

    file.fallocate(PUNCH, 0, 8 * P as i64).unwrap();

    assert_eq!(vm.invalidate_seq(), before + 2);
}

/// FALLOC-3, FALLOC-4: allocating commits real memory, punching returns it
/// to the host.
#[test]
fn allocate_commits_memory_and_punch_returns_it() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = gmem(&vm, 16 * P, 0);
    assert_eq!(allocated(&file), 0);

    file.fallocate(FALLOC_FL_KEEP_SIZE, 0, 16 * P as i64)
        .unwrap();
    let after_allocate = allocated(&file);
    file.fallocate(PUNCH, 0, 16 * P as i64).unwrap();

    assert_eq!(after_allocate, 16 * P);
    assert_eq!(allocated(&file), 0);
}

/// CREATE-2: a huge file commits no memory at creation.
#[test]
fn huge_file_commits_no_memory() {
    let vm = hv().create_soft_vm(0).unwrap();

    let file = gmem(&vm, 1 << 62, 0);

    assert_eq!(allocated(&file), 0);
}

/// MMAP-5, FALLOC-4: a host touch allocates one page; a punch frees it.
#[test]
fn host_touch_allocates_a_page_and_punch_frees_it() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = gmem(
        &vm,
        4 * P,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    );
    let mapping = file.mmap(0, 4 * P, MapKind::Shared).unwrap();

    mapping.write(P + 1, &[1]).unwrap();
    let touched = allocated(&file);
    file.fallocate(PUNCH, P as i64, P as i64).unwrap();

    assert_eq!(touched, P);
    assert_eq!(allocated(&file), 0);
}

/// MMAP-7, INVAL-1: MADV_REMOVE through a mapping is the file's punch hole:
/// it invalidates the punched gfns of each binding and frees the pages.
#[test]
fn madvise_remove_invalidates_each_binding_and_frees_the_pages() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = two_bindings(&vm);
    file.fallocate(FALLOC_FL_KEEP_SIZE, 0, 8 * P as i64)
        .unwrap();
    let mapping = file.mmap(2 * P as i64, 4 * P, MapKind::Shared).unwrap();
    let recorder = Recorder::on(&vm);

    mapping.madvise(0, 4 * P, Advice::Remove).unwrap();

    assert_eq!(
        recorder.take(),
        [
            inv(0, GFN + 2..GFN + 4, InvalidateCause::PunchHole),
            inv(1, GFN + 64..GFN + 66, InvalidateCause::PunchHole),
        ]
    );
    assert_eq!(allocated(&file), 4 * P);
}

/// MMAP-8, MMAP-9: MADV_DONTNEED frees nothing and invalidates nothing;
/// MADV_POPULATE_WRITE allocates the pages up to the end of the file before
/// it fails with EFAULT.
#[test]
fn madvise_dontneed_frees_nothing_and_populate_allocates() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = gmem(
        &vm,
        4 * P,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    );
    vm.set_user_memory_region2(guest_memfd_region(0, GPA, 4 * P, file.as_raw_fd(), 0))
        .unwrap();
    let mapping = file.mmap(0, 8 * P, MapKind::Shared).unwrap();
    let recorder = Recorder::on(&vm);

    let populate = mapping.madvise(P, 7 * P, Advice::PopulateWrite);
    let populated = allocated(&file);
    mapping.madvise(0, 8 * P, Advice::DontNeed).unwrap();

    assert_eq!(populate.map_err(|e| e.errno), Err(Errno::EFAULT));
    assert_eq!(populated, 3 * P);
    assert_eq!(allocated(&file), 3 * P);
    assert_eq!(recorder.take(), []);
}

/// FAULT-5: a guest touch of a hole allocates it, reads included.
#[test]
fn guest_read_of_a_hole_allocates_it() {
    let vm = hv().create_soft_vm(0).unwrap();
    let file = gmem(&vm, 4 * P, GUEST_MEMFD_FLAG_MMAP);
    vm.set_user_memory_region2(guest_memfd_region(0, GPA, 4 * P, file.as_raw_fd(), 0))
        .unwrap();
    let mut cpu = vm.create_vcpu(0).unwrap();

    let exit = load(&mut cpu, GPA + 2 * P);

    assert_eq!(exit, VcpuExit::Done(0));
    assert_eq!(allocated(&file), P);
}

/// ATTR-5: conversions neither allocate nor free guest_memfd pages.
#[test]
fn conversions_neither_allocate_nor_free() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    let file = gmem(&vm, 4 * P, 0);
    vm.set_user_memory_region2(guest_memfd_region(0, GPA, 4 * P, file.as_raw_fd(), 0))
        .unwrap();
    set_attributes(&vm, GPA, P, PRIVATE);
    let mut cpu = vm.create_vcpu(0).unwrap();
    assert_eq!(load(&mut cpu, GPA), VcpuExit::Done(0));
    let before = allocated(&file);

    set_attributes(&vm, GPA, 4 * P, 0);
    set_attributes(&vm, GPA, 4 * P, PRIVATE);

    assert_eq!(before, P);
    assert_eq!(allocated(&file), before);
}

/// ATTR-6: converting 1 TiB stores one range, not 2^28 entries.
#[test]
fn converting_one_tib_stores_one_range() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();

    set_attributes(&vm, 1 << 40, 1 << 40, PRIVATE);

    assert_eq!(vm.attribute_ranges(), 1);
    assert_eq!(
        vm.memory_attributes((1 << 40 >> PAGE_SHIFT) + 12345),
        PRIVATE
    );
}

/// ATTR-6: converting one page of a 1 TiB range back leaves two ranges
/// around the hole; converting it again merges them.
#[test]
fn converting_a_page_back_splits_and_merges_ranges() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    set_attributes(&vm, 1 << 40, 1 << 40, PRIVATE);

    set_attributes(&vm, (1 << 40) + (1 << 39), P, 0);
    let split = vm.attribute_ranges();
    set_attributes(&vm, (1 << 40) + (1 << 39), P, PRIVATE);

    assert_eq!(split, 2);
    assert_eq!(vm.attribute_ranges(), 1);
}

/// ATTR-6: converting 1 TiB back to shared leaves no range at all.
#[test]
fn converting_everything_back_to_shared_leaves_no_range() {
    let vm = hv().create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
    set_attributes(&vm, 1 << 40, 1 << 40, PRIVATE);

    set_attributes(&vm, 0, 1 << 41, 0);

    assert_eq!(vm.attribute_ranges(), 0);
}

/// INVAL-5: unmapping host memory that an ordinary slot points at
/// invalidates the slot's gfns over it (the kernel's MMU notifier), and a
/// later access fails with EFAULT (FAULT-3) instead of reaching the
/// unmapped memory.
#[test]
fn unmapping_host_memory_invalidates_the_slots_over_it() {
    let hv = hv();
    let vm = hv.create_soft_vm(0).unwrap();
    let mem = hv.host_memory(4 * P).unwrap();
    vm.set_user_memory_region2(user_region(3, GPA, 2 * P, mem.addr() + 2 * P))
        .unwrap();
    let mut cpu = vm.create_vcpu(0).unwrap();
    let write = GuestOp::Write {
        gpa: GPA + P,
        size: 8,
        value: 7,
    };
    assert_eq!(cpu.run(write).unwrap(), VcpuExit::Done(0));
    let recorder = Recorder::on(&vm);

    drop(mem);

    assert_eq!(
        recorder.take(),
        [inv(3, GFN..GFN + 2, InvalidateCause::HostUnmap)]
    );
    let e = cpu.run(write).unwrap_err();
    assert_eq!((e.errno, e.rule), (gmem::Errno::EFAULT, "FAULT-3"), "{e}");
}

/// gmem-safety: host memory dropped while a slot points into it keeps its
/// addresses until the slot goes: no memory made meanwhile lands there, so
/// the guest cannot reach it through the old slot.
#[test]
fn memory_dropped_under_a_slot_keeps_its_addresses_while_the_slot_lives() {
    let hv = hv();
    let vm = hv.create_soft_vm(0).unwrap();
    let mem = hv.host_memory(4 * P).unwrap();
    let old = mem.addr()..mem.addr() + 4 * P;
    vm.set_user_memory_region2(user_region(3, GPA, 4 * P, old.start))
        .unwrap();
    drop(mem);

    let later: Vec<_> = (0..16).map(|_| hv.host_memory(4 * P).unwrap()).collect();

    for m in &later {
        assert!(
            m.addr() + 4 * P <= old.start || m.addr() >= old.end,
            "new memory at {:#x} overlaps the reserved {old:x?}",
            m.addr()
        );
        m.write(0, &[0x5a]).unwrap();
    }
    let mut cpu = vm.create_vcpu(0).unwrap();
    let e = cpu.run(GuestOp::Read { gpa: GPA, size: 1 }).unwrap_err();
    assert_eq!((e.errno, e.rule), (gmem::Errno::EFAULT, "FAULT-3"), "{e}");
}

/// FAULT-5, gmem-loop: a guest touch loop allocates every page of the
/// range in the file.
#[test]
fn touch_loop_allocates_every_page() {
    let hv = hv();
    let vm = hv.create_soft_vm(0).unwrap();
    let file = vm
        .create_soft_guest_memfd(kvm_create_guest_memfd {
            size: 64 * P,
            flags: GUEST_MEMFD_FLAG_MMAP,
            ..Default::default()
        })
        .unwrap();
    vm.set_user_memory_region2(guest_memfd_region(0, GPA, 64 * P, file.as_raw_fd(), 0))
        .unwrap();
    let mut cpu = vm.create_vcpu(0).unwrap();

    for write in [false, true] {
        file.fallocate(PUNCH, 0, 64 * P as i64).unwrap();
        let exit = cpu
            .run_loop(gmem::GuestLoop::Touch {
                gpa: GPA,
                len: 64 * P,
                write,
            })
            .unwrap();

        assert_eq!(exit.done, 64 * P);
        assert_eq!(file.allocated_bytes().unwrap(), 64 * P, "write: {write}");
    }
}

/// FAULT-2: an access that ends on the last byte of the address space is
/// an ordinary access (here MMIO, no slot), not an overflow.
#[test]
fn access_ending_at_the_top_of_the_address_space_exits_as_mmio() {
    let vm = hv().create_soft_vm(0).unwrap();
    let mut cpu = vm.create_vcpu(0).unwrap();
    let gpa = u64::MAX - 7;

    let exit = cpu.run(GuestOp::Read { gpa, size: 8 }).unwrap();

    assert_eq!(
        exit,
        VcpuExit::Mmio {
            gpa,
            is_write: false,
            len: 8,
            data: 0
        }
    );
}

/// gmem-loop, FAULT-3: a loop over memory the vCPU never caches (an
/// ordinary slot over a guest_memfd's host mapping, whose pages can turn
/// private or go with the file without invalidating that slot) takes the
/// fault path for the rest of each page at once: every word is stored,
/// from a start inside a page to an end inside another, and a verify
/// counts exactly the words changed behind it.
#[test]
fn loop_over_memory_it_cannot_cache_fills_and_verifies_every_word() {
    let hv = hv();
    let vm = hv.create_soft_vm(0).unwrap();
    let file = gmem(
        &vm,
        4 * P,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    );
    let map = file.mmap(0, 4 * P, MapKind::Shared).unwrap();
    vm.set_user_memory_region2(user_region(0, GPA, 4 * P, map.addr()))
        .unwrap();
    let mut cpu = vm.create_vcpu(0).unwrap();
    let (gpa, len, seed) = (GPA + 24, 3 * P - 48, 0x5eed);
    let word = |off: u64| {
        let mut b = [0u8; 8];
        map.read(off, &mut b).unwrap();
        u64::from_le_bytes(b)
    };

    let fill = cpu
        .run_loop(gmem::GuestLoop::Fill { gpa, len, seed })
        .unwrap();
    map.write(P + 800, &[0xff]).unwrap();
    map.write(3 * P - 32, &[0xff]).unwrap();
    let verify = cpu
        .run_loop(gmem::GuestLoop::Verify { gpa, len, seed })
        .unwrap();

    assert_eq!((fill.done, fill.exit), (len, VcpuExit::Done(0)));
    assert_eq!(word(16), 0, "before the loop");
    assert_eq!(word(3 * P - 24), 0, "after the loop");
    for off in (24..3 * P - 24).step_by(8) {
        if off != P + 800 && off != 3 * P - 32 {
            assert_eq!(
                word(off),
                gmem::GuestLoop::pattern(GPA + off, seed),
                "{off:#x}"
            );
        }
    }
    assert_eq!((verify.done, verify.exit), (len, VcpuExit::Done(2)));
}
