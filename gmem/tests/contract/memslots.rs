//! KVM_SET_USER_MEMORY_REGION(2) (docs/spec.md, section 3, SLOT-*): the checks in
//! kernel order, deletes, changes and overlaps.

use crate::support::*;

/// A guest_memfd slot at slot 0, `GPA`, one page, on a fresh file.
fn gmem_fixture(vm: &dyn Vm) -> Box<dyn GuestMemfd> {
    gmem(vm, 2 * P, 0)
}

/// The v1 request the v2 request `r` cuts down to.
fn v1(r: kvm_userspace_memory_region2) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: r.slot,
        flags: r.flags,
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        userspace_addr: r.userspace_addr,
    }
}

/// SLOT-1: GUEST_MEMFD on the v1 ioctl is EINVAL.
pub fn guest_memfd_flag_on_v1_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region(v1(gmem_slot(0, GPA, P, &*file, 0)));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-1");
}

/// SLOT-1: every flag bit but LOG_DIRTY_PAGES and READONLY is EINVAL on v1
/// (set_memory_region_test).
pub fn unsupported_flag_bits_on_v1_are_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);

    for bit in 2..32 {
        let r = vm.set_user_memory_region(kvm_userspace_memory_region {
            flags: 1 << bit,
            ..v1(plain_slot(0, GPA, P, mem.addr()))
        });

        assert_refused(hv, r, Errno::EINVAL, "SLOT-1");
    }
}

/// SLOT-1: v1 accepts LOG_DIRTY_PAGES and READONLY.
pub fn v1_accepts_log_dirty_pages_and_readonly(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 2 * P);

    let dirty = vm.set_user_memory_region(kvm_userspace_memory_region {
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        ..v1(plain_slot(0, GPA, P, mem.addr()))
    });
    let readonly = vm.set_user_memory_region(kvm_userspace_memory_region {
        flags: KVM_MEM_READONLY,
        ..v1(plain_slot(1, GPA + P, P, mem.addr() + P))
    });

    ok(dirty, "LOG_DIRTY_PAGES on v1");
    ok(readonly, "READONLY on v1");
}

/// SLOT-2: slot id NR_MEMSLOTS is EINVAL (set_memory_region_test).
pub fn slot_id_nr_memslots_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let nr = vm.check_extension(KVM_CAP_NR_MEMSLOTS) as u32;
    let mem = host(hv, P);

    let r = vm.set_user_memory_region2(plain_slot(nr, GPA, P, mem.addr()));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-2");
}

/// SLOT-2: the last slot id, NR_MEMSLOTS - 1, is accepted.
pub fn last_slot_id_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let nr = vm.check_extension(KVM_CAP_NR_MEMSLOTS) as u32;
    let mem = host(hv, P);

    let r = vm.set_user_memory_region2(plain_slot(nr - 1, GPA, P, mem.addr()));

    ok(r, "slot NR_MEMSLOTS - 1");
}

/// SLOT-3: every unknown flag bit, bits 16-31 included, is EINVAL on v2.
pub fn unknown_flag_bits_on_v2_are_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);

    for bit in 3..32 {
        let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
            flags: 1 << bit,
            ..plain_slot(0, GPA, P, mem.addr())
        });

        assert_refused(hv, r, Errno::EINVAL, "SLOT-3");
    }
}

/// SLOT-3: GUEST_MEMFD with LOG_DIRTY_PAGES is EINVAL.
pub fn guest_memfd_with_log_dirty_pages_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        flags: KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "SLOT-3");
}

/// SLOT-3: GUEST_MEMFD with READONLY is EINVAL.
pub fn guest_memfd_with_readonly_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        flags: KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "SLOT-3");
}

/// SLOT-4: memory_size not a multiple of P is EINVAL.
pub fn memory_size_not_a_page_multiple_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 2 * P);

    for size in [1, P - 1, P + 1] {
        let r = vm.set_user_memory_region2(plain_slot(0, GPA, size, mem.addr()));

        assert_refused(hv, r, Errno::EINVAL, "SLOT-4");
    }
}

/// SLOT-5: an unaligned guest_phys_addr is EINVAL.
pub fn unaligned_guest_phys_addr_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);

    let r = vm.set_user_memory_region2(plain_slot(0, GPA + 1, P, mem.addr()));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-5");
}

/// SLOT-6: an unaligned userspace_addr is EINVAL.
pub fn unaligned_userspace_addr_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 2 * P);

    let r = vm.set_user_memory_region2(plain_slot(0, GPA, P, mem.addr() + 8));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-6");
}

/// SLOT-6: an unaligned userspace_addr is EINVAL on guest_memfd slots too.
pub fn unaligned_userspace_addr_on_a_guest_memfd_slot_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        userspace_addr: 0x800,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "SLOT-6");
}

/// SLOT-6: a userspace range that leaves the user address space is EINVAL.
pub fn userspace_range_past_the_user_address_space_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    // It ends in the kernel half: past every user address, LAM or not.
    let r = vm.set_user_memory_region2(plain_slot(0, GPA, 2 * P, (1 << 63) - P));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-6");
}

/// SLOT-6: userspace_addr 0 is valid (set_memory_region_test's
/// guest_memfd slot).
pub fn userspace_addr_zero_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, 0));

    ok(r, "userspace_addr 0");
}

/// SLOT-7: guest_memfd offsets 1..P-1 are EINVAL (set_memory_region_test).
pub fn guest_memfd_offsets_below_a_page_are_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    for offset in 1..P {
        let r = vm.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, offset));

        assert_refused(hv, r, Errno::EINVAL, "SLOT-7");
    }
}

/// SLOT-7: guest_memfd_offset + memory_size wrapping 64 bits is EINVAL.
pub fn guest_memfd_offset_plus_size_wrapping_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region2(gmem_slot(0, GPA, 2 * P, &*file, LAST_PAGE));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-7");
}

/// SLOT-8: an address-space id at the VM's count is EINVAL.
pub fn address_space_id_at_the_count_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let nr_as = address_spaces(&*vm);
    let mem = host(hv, P);

    let r = vm.set_user_memory_region2(plain_slot(nr_as << 16, GPA, P, mem.addr()));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-8");
}

/// SLOT-8: a VM with private memory has one address space.
pub fn private_vm_refuses_address_space_1(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm(hv) else { return };
    let mem = host(hv, P);

    let r = vm.set_user_memory_region2(plain_slot(1 << 16, GPA, P, mem.addr()));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-8");
}

/// SLOT-8, SLOT-12: address space 1 is usable where there are two, and its
/// gfns do not overlap those of address space 0.
pub fn second_address_space_takes_the_same_gfns(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    if address_spaces(&*vm) < 2 {
        skip(format!(
            "the {} backend lacks address_spaces 2 (KVM_CAP_MULTI_ADDRESS_SPACE)",
            hv.name()
        ));
        return;
    }
    let mem = host(hv, 2 * P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));

    let r = vm.set_user_memory_region2(plain_slot(1 << 16, GPA, P, mem.addr() + P));

    ok(r, "same gfns in address space 1");
}

/// SLOT-9: guest_phys_addr + memory_size wrapping is EINVAL.
pub fn guest_phys_addr_plus_size_wrapping_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let r = vm.set_user_memory_region2(plain_slot(0, LAST_PAGE, 2 * P, 0));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-9");
}

/// SLOT-9: more than 2^31-1 pages in one slot is EINVAL.
pub fn more_than_max_pages_in_a_slot_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let r = vm.set_user_memory_region2(plain_slot(0, 0, (KVM_MEM_MAX_NR_PAGES + 1) * P, 0));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-9");
}

/// SLOT-10: deleting a slot that does not exist is EINVAL.
pub fn deleting_a_missing_slot_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let r = vm.set_user_memory_region2(delete_slot(3));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-10");
}

/// SLOT-10: a delete may carry GUEST_MEMFD with fd -1: the fd is not looked
/// at (set_memory_region_test).
pub fn delete_with_guest_memfd_flag_and_fd_minus_one_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);
    set_slot(&*vm, gmem_slot(0, GPA, P, &*file, 0));

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        flags: KVM_MEM_GUEST_MEMFD,
        guest_memfd: u32::MAX,
        ..delete_slot(0)
    });

    ok(r, "delete with fd -1");
}

/// SLOT-10: a delete with flags 0 removes a guest_memfd slot.
pub fn delete_with_flags_zero_removes_a_guest_memfd_slot(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);
    set_slot(&*vm, gmem_slot(0, GPA, P, &*file, 0));

    let r = vm.set_user_memory_region2(delete_slot(0));

    ok(r, "delete");
    let again = vm.set_user_memory_region2(delete_slot(0));
    assert_refused(hv, again, Errno::EINVAL, "SLOT-10");
}

/// SLOT-11: an exact repeat of the request that created a guest_memfd slot
/// is EINVAL.
pub fn repeating_a_guest_memfd_slot_request_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);
    let request = gmem_slot(0, GPA, P, &*file, 0);
    set_slot(&*vm, request);

    let r = vm.set_user_memory_region2(request);

    assert_refused(hv, r, Errno::EINVAL, "SLOT-11");
}

/// SLOT-11: a request without GUEST_MEMFD on an existing guest_memfd slot
/// is EINVAL.
pub fn changing_a_guest_memfd_slot_without_the_flag_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);
    set_slot(&*vm, gmem_slot(0, GPA, P, &*file, 0));

    let r = vm.set_user_memory_region2(plain_slot(0, GPA + 8 * P, P, 0));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-11");
}

/// SLOT-11: changing an ordinary slot's size is EINVAL.
pub fn changing_the_size_of_an_ordinary_slot_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 2 * P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));

    let r = vm.set_user_memory_region2(plain_slot(0, GPA, 2 * P, mem.addr()));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-11");
}

/// SLOT-11: changing an ordinary slot's userspace_addr is EINVAL.
pub fn changing_the_userspace_addr_of_an_ordinary_slot_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 2 * P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));

    let r = vm.set_user_memory_region2(plain_slot(0, GPA, P, mem.addr() + P));

    assert_refused(hv, r, Errno::EINVAL, "SLOT-11");
}

/// SLOT-11: toggling READONLY on an existing slot is EINVAL (kernel:
/// `(mem->flags ^ old->flags) & KVM_MEM_READONLY`).
pub fn toggling_readonly_on_an_existing_slot_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        flags: KVM_MEM_READONLY,
        ..plain_slot(0, GPA, P, mem.addr())
    });

    assert_refused(hv, r, Errno::EINVAL, "SLOT-11");
}

/// SLOT-11: an identical request on an ordinary slot is a no-op.
pub fn identical_request_on_an_ordinary_slot_is_a_no_op(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    let request = plain_slot(0, GPA, P, mem.addr());
    set_slot(&*vm, request);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 0x1122_3344);

    let r = vm.set_user_memory_region2(request);

    ok(r, "identical request");
    assert_eq!(cpu.load_ok(GPA, 8), 0x1122_3344);
}

/// SLOT-11: a new flags word alone (LOG_DIRTY_PAGES) changes the flags.
pub fn flags_only_change_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        ..plain_slot(0, GPA, P, mem.addr())
    });

    ok(r, "flags-only change");
}

/// SLOT-11: a new base moves an ordinary slot: its memory appears at the
/// new gpa and the old gpa becomes MMIO.
pub fn new_base_moves_an_ordinary_slot(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x5a]);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));
    let moved = GPA + 16 * P;

    let r = vm.set_user_memory_region2(plain_slot(0, moved, P, mem.addr()));

    ok(r, "move");
    let mut cpu = vcpu(&*vm);
    assert_eq!(cpu.load_ok(moved, 1), 0x5a);
    assert!(matches!(cpu.load(GPA, 1), VcpuExit::Mmio { gpa: GPA, .. }));
}

/// Two ordinary slots: 0 at [GPA, GPA + 4P) and the request for slot 1.
fn overlap_case(hv: &dyn Hypervisor, gpa: u64, size: u64) -> Result<()> {
    let vm = default_vm(hv);
    let mem = host(hv, 8 * P);
    set_slot(&*vm, plain_slot(0, GPA, 4 * P, mem.addr()));
    vm.set_user_memory_region2(plain_slot(1, gpa, size, mem.addr() + 4 * P))
}

/// SLOT-12: a slot overlapping the lower half of a neighbour is EEXIST.
pub fn gfns_overlapping_the_lower_half_of_a_neighbour_are_eexist(hv: &dyn Hypervisor) {
    let r = overlap_case(hv, GPA - 2 * P, 4 * P);

    assert_refused(hv, r, Errno::EEXIST, "SLOT-12");
}

/// SLOT-12: a slot overlapping the upper half of a neighbour is EEXIST.
pub fn gfns_overlapping_the_upper_half_of_a_neighbour_are_eexist(hv: &dyn Hypervisor) {
    let r = overlap_case(hv, GPA + 2 * P, 4 * P);

    assert_refused(hv, r, Errno::EEXIST, "SLOT-12");
}

/// SLOT-12: a slot inside a neighbour is EEXIST.
pub fn gfns_inside_a_neighbour_are_eexist(hv: &dyn Hypervisor) {
    let r = overlap_case(hv, GPA + P, P);

    assert_refused(hv, r, Errno::EEXIST, "SLOT-12");
}

/// SLOT-12: adjacent slots on either side do not overlap.
pub fn adjacent_slots_are_accepted(hv: &dyn Hypervisor) {
    let below = overlap_case(hv, GPA - 4 * P, 4 * P);
    let above = overlap_case(hv, GPA + 4 * P, 4 * P);

    ok(below, "slot just below");
    ok(above, "slot just above");
}

/// SLOT-12: moving a slot onto a neighbour is EEXIST.
pub fn moving_a_slot_onto_a_neighbour_is_eexist(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 2 * P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));
    set_slot(&*vm, plain_slot(1, GPA + 8 * P, P, mem.addr() + P));

    let r = vm.set_user_memory_region2(plain_slot(1, GPA, P, mem.addr() + P));

    assert_refused(hv, r, Errno::EEXIST, "SLOT-12");
}

/// SLOT-12: re-creating a guest_memfd slot over either half of a
/// neighbour is EEXIST (set_memory_region_test).
pub fn guest_memfd_slot_over_either_half_of_a_neighbour_is_eexist(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 16 * P, 0);
    set_slot(&*vm, gmem_slot(0, GPA, 4 * P, &*file, 0));

    let lower = vm.set_user_memory_region2(gmem_slot(1, GPA - 2 * P, 4 * P, &*file, 8 * P));
    let upper = vm.set_user_memory_region2(gmem_slot(1, GPA + 2 * P, 4 * P, &*file, 8 * P));

    assert_refused(hv, lower, Errno::EEXIST, "SLOT-12");
    assert_refused(hv, upper, Errno::EEXIST, "SLOT-12");
}

/// SLOT-3, SLOT-10: a delete is checked like any other request: an unknown
/// flag bit is EINVAL even on an existing slot.
pub fn delete_with_an_unknown_flag_bit_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        flags: 1 << 3,
        ..delete_slot(0)
    });

    assert_refused(hv, r, Errno::EINVAL, "SLOT-3");
}

/// SLOT-5, BIND-1: the slot checks come before the file is looked at: a bad
/// gpa with fd -1 is the gpa's EINVAL, not EBADF.
pub fn slot_checks_come_before_the_fd_is_looked_at(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: u32::MAX,
        ..gmem_slot(0, GPA + 1, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "SLOT-5");
}

/// SLOT-12, BIND-1: the gfn overlap is checked before the file: fd -1 over
/// a neighbour is EEXIST.
pub fn gfn_overlap_comes_before_the_fd_is_looked_at(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem_fixture(&*vm);
    set_slot(&*vm, gmem_slot(0, GPA, P, &*file, 0));

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: u32::MAX,
        ..gmem_slot(1, GPA, P, &*file, P)
    });

    assert_refused(hv, r, Errno::EEXIST, "SLOT-12");
}
