//! Objects and lifetimes (docs/spec.md, section 1, LIFE-*): what holds what, and
//! what survives whose release.

use crate::support::*;

/// A default VM with a guest_memfd-only slot 0 at `GPA` over `file`.
fn vm_with_gmem_only_slot(hv: &dyn Hypervisor, size: u64) -> (Box<dyn Vm>, Box<dyn GuestMemfd>) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, size, GUEST_MEMFD_FLAG_MMAP);
    set_slot(&*vm, gmem_slot(0, GPA, size, &*file, 0));
    (vm, file)
}

/// LIFE-1: a vCPU keeps its VM alive: with the VM handle dropped the vCPU
/// still reaches the VM's memslots.
pub fn vcpu_keeps_the_vm_alive(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x3c]);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));
    let mut cpu = vcpu(&*vm);

    drop(vm);

    assert_eq!(cpu.load_ok(GPA, 1), 0x3c);
}

/// LIFE-1, LIFE-2: a guest_memfd keeps its VM alive: with the VM handle
/// dropped, the VM's slot still leads the guest to what it wrote.
pub fn guest_memfd_keeps_the_vm_and_its_slots_alive(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, P) else {
        return;
    };
    let _mapping = bind_through_own_mapping(&*vm, 0, GPA, P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 0xfeed);

    drop(vm);

    assert_eq!(cpu.load_ok(GPA, 8), 0xfeed);
}

/// LIFE-2, LIFE-3: the VM and its slots do not hold the file: closing the
/// fd releases it even though a slot is bound to it.
pub fn slot_does_not_keep_its_file_alive(hv: &dyn Hypervisor) {
    let (vm, file) = vm_with_gmem_only_slot(hv, P);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 1);

    drop(file);

    assert_eq!(cpu.load(GPA, 8), memory_fault(GPA, false));
}

/// LIFE-3: binding records the file range: a slot at file offset 2P sees
/// what another slot wrote at that offset.
pub fn slot_records_the_file_and_its_first_index(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, 4 * P) else {
        return;
    };
    let first = bind_through_own_mapping(&*vm, 0, GPA, 4 * P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA + 2 * P + 8, 8, 0x1234);
    set_slot(&*vm, delete_slot(0));
    drop(first);

    let _second = bind_through_own_mapping(&*vm, 1, GPA + 64 * P, P, &*file, 2 * P);

    assert_eq!(cpu.load_ok(GPA + 64 * P + 8, 8), 0x1234);
}

/// LIFE-4: deleting a slot neither frees nor zeroes the file's memory: a
/// later binding of the range sees the old contents.
pub fn rebinding_a_file_range_sees_the_old_contents(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, P) else {
        return;
    };
    let first = bind_through_own_mapping(&*vm, 0, GPA, P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 0xabcd_ef01);
    set_slot(&*vm, delete_slot(0));
    drop(first);

    let _second = bind_through_own_mapping(&*vm, 0, GPA + 32 * P, P, &*file, 0);

    assert_eq!(cpu.load_ok(GPA + 32 * P, 8), 0xabcd_ef01);
}

/// LIFE-5: after the file is released its slot stays and can be deleted.
pub fn released_files_slot_can_still_be_deleted(hv: &dyn Hypervisor) {
    let (vm, file) = vm_with_gmem_only_slot(hv, P);
    drop(file);

    let r = vm.set_user_memory_region2(delete_slot(0));

    ok(r, "deleting the slot of a released file");
}

/// LIFE-5: after the file is released its slot stays: its gfns are still
/// taken (EEXIST), not free.
pub fn released_files_slot_keeps_its_gfns(hv: &dyn Hypervisor) {
    let (vm, file) = vm_with_gmem_only_slot(hv, P);
    let mem = host(hv, P);
    drop(file);

    let r = vm.set_user_memory_region2(plain_slot(1, GPA, P, mem.addr()));

    assert_refused(hv, r, Errno::EEXIST, "SLOT-12");
}

/// LIFE-6: with the VM handle dropped, a guest_memfd stays usable:
/// allocate, punch hole and (with MMAP) mmap
/// (private_mem_conversions_test's last step).
pub fn guest_memfd_stays_usable_after_the_vm_handle_is_dropped(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, GUEST_MEMFD_FLAG_MMAP);

    drop(vm);

    ok(
        file.fallocate(FALLOC_FL_KEEP_SIZE, 0, 4 * P as i64),
        "allocate",
    );
    ok(
        file.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, P as i64),
        "punch",
    );
    ok(file.mmap(0, 4 * P, MapKind::Shared).map(drop), "mmap");
    assert_eq!(ok(file.stat(), "fstat").size, 4 * P as i64);
}

/// LIFE-6: a VM whose handle and vCPUs are gone still accepts a file
/// created before: the VM object lives while the file does.
pub fn vm_object_outlives_its_handle_while_a_file_is_open(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let cpu = vcpu(&*vm);
    let file = gmem(&*vm, P, 0);

    drop(cpu);
    drop(vm);

    ok(
        file.fallocate(FALLOC_FL_KEEP_SIZE, 0, P as i64),
        "allocate after the VM handle and vCPU are gone",
    );
}

/// LIFE-7: a host mapping keeps the file alive after its fd is closed: the
/// guest still reaches the file's pages through its slot.
pub fn host_mapping_keeps_the_file_alive_after_close(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, P) else {
        return;
    };
    let _mapping = bind_through_own_mapping(&*vm, 0, GPA, P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 0x77);

    drop(file);

    assert_eq!(cpu.load_ok(GPA, 8), 0x77);
}

/// LIFE-7, MMAP-4: with INIT_SHARED the host still reads the file through
/// its mapping after the fd is closed.
pub fn host_mapping_reads_the_file_after_close(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    if !has_gmem_flags(&*vm, MMAP_SHARED) {
        return;
    }
    let file = gmem(&*vm, P, MMAP_SHARED);
    let mapping = ok(file.mmap(0, P, MapKind::Shared), "mmap");
    host_write(&*mapping, 0, &[9, 8, 7]);

    drop(file);

    assert_eq!(host_read(&*mapping, 0, 3), [9, 8, 7]);
}

/// LIFE-8: a bind refused for an invalid offset does not leak a reference
/// to the file (the v13 bug): closing the fd still releases it.
pub fn refused_bind_does_not_leak_the_file(hv: &dyn Hypervisor) {
    let (vm, file) = vm_with_gmem_only_slot(hv, P);
    let refused_bind = vm.set_user_memory_region2(gmem_slot(1, GPA + P, P, &*file, 8 * P));
    assert_refused(hv, refused_bind, Errno::EINVAL, "BIND-4");
    let misaligned = vm.set_user_memory_region2(gmem_slot(1, GPA + P, P, &*file, 1));
    assert_refused(hv, misaligned, Errno::EINVAL, "SLOT-7");
    let mut cpu = vcpu(&*vm);

    drop(file);

    assert_eq!(cpu.load(GPA, 8), memory_fault(GPA, false));
}

/// LIFE-8: objects released in any order are each released once: the last
/// one to go takes the VM with it, and nothing else is disturbed.
pub fn handles_dropped_in_any_order_release_cleanly(hv: &dyn Hypervisor) {
    for order in 0..6 {
        let (vm, file) = vm_with_gmem_only_slot(hv, P);
        let cpu = vcpu(&*vm);
        let mapping = ok(file.mmap(0, P, MapKind::Shared), "mmap");
        let mut handles: Vec<Box<dyn FnOnce()>> = vec![
            Box::new(move || drop(vm)),
            Box::new(move || drop(file)),
            Box::new(move || drop((cpu, mapping))),
        ];

        handles.rotate_left(order % 3);
        if order >= 3 {
            handles.swap(0, 1);
        }
        for release in handles {
            release();
        }
    }
    let vm = default_vm(hv);
    ok(
        vm.set_user_memory_region2(plain_slot(0, GPA, P, 0)),
        "a new VM after the releases",
    );
}
