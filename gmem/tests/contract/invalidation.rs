//! Invalidation as the guest sees it (docs/spec.md, section 7, INVAL-*): after each
//! cause no stale translation is used. The exact ranges invalidated are
//! checked on the software backend in tests/soft_backend.rs.

use std::thread;

use crate::support::*;

const PUNCH: i32 = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;

/// INVAL-1: after a punch the guest no longer sees the freed page, and the
/// host mapping of the range reads zero too.
pub fn punch_hole_invalidates_guest_and_host_views(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, 2 * P) else {
        return;
    };
    let mapping = bind_through_own_mapping(&*vm, 0, GPA, 2 * P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA + P, 8, 0x4141);
    assert_eq!(host_read(&*mapping, P, 1), [0x41]);

    ok(file.fallocate(PUNCH, P as i64, P as i64), "punch");

    assert_eq!(cpu.load_ok(GPA + P, 8), 0);
    assert_eq!(host_read(&*mapping, P, 8), [0; 8]);
}

/// INVAL-1: a punch reaches every binding of the range: two slots on one
/// file both see the hole.
pub fn punch_hole_reaches_every_binding(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, 4 * P) else {
        return;
    };
    let _map0 = bind_through_own_mapping(&*vm, 0, GPA, 2 * P, &*file, 0);
    let _map1 = bind_through_own_mapping(&*vm, 1, GPA + 16 * P, 2 * P, &*file, 2 * P);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA + P, 8, 1);
    cpu.store_ok(GPA + 16 * P, 8, 2);

    ok(file.fallocate(PUNCH, P as i64, 2 * P as i64), "punch");

    assert_eq!(cpu.load_ok(GPA + P, 8), 0);
    assert_eq!(cpu.load_ok(GPA + 16 * P, 8), 0);
}

/// INVAL-2: releasing a file invalidates every binding over its whole
/// range.
pub fn release_invalidates_every_binding(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, GUEST_MEMFD_FLAG_MMAP);
    set_slot(&*vm, gmem_slot(0, GPA, 2 * P, &*file, 0));
    set_slot(&*vm, gmem_slot(1, GPA + 16 * P, 2 * P, &*file, 2 * P));
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA + P, 8, 1);
    cpu.store_ok(GPA + 17 * P, 8, 2);

    drop(file);

    assert_eq!(cpu.load(GPA + P, 8), memory_fault(GPA + P, false));
    assert_eq!(cpu.load(GPA + 17 * P, 8), memory_fault(GPA + 17 * P, false));
}

/// INVAL-3: an attribute change invalidates the slot: the next access uses
/// the new attribute, not a cached translation.
pub fn attribute_change_invalidates_cached_translations(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let file = gmem(&*vm, P, 0);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x7e]);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, P, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);
    assert_eq!(cpu.load_ok(GPA, 1), 0x7e);

    ok(set_attributes(&*vm, GPA, P, PRIVATE), "to private");

    assert_eq!(cpu.load_ok(GPA, 1), 0);
}

/// INVAL-4: a deleted slot is not reached again: the gpa becomes MMIO.
pub fn deleted_slot_is_not_reached(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, P) else {
        return;
    };
    let _mapping = bind_through_own_mapping(&*vm, 0, GPA, P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 5);

    set_slot(&*vm, delete_slot(0));

    assert!(matches!(cpu.load(GPA, 8), VcpuExit::Mmio { gpa: GPA, .. }));
}

/// INVAL-5: guest accesses racing punch holes never see a torn value: every
/// load is the whole pattern or a fresh zero page.
pub fn guest_access_racing_punch_hole_is_never_torn(hv: &dyn Hypervisor) {
    const PATTERN: u64 = 0x0123_4567_89ab_cdef;
    const ROUNDS: usize = 200;
    let Some((vm, file)) = shared_file(hv, P) else {
        return;
    };
    let _mapping = bind_through_own_mapping(&*vm, 0, GPA, P, &*file, 0);
    let mut cpu = vcpu(&*vm);

    let seen = thread::scope(|s| {
        let guest = s.spawn(move || {
            let mut seen = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                cpu.store_ok(GPA + 64, 8, PATTERN);
                seen.push(cpu.load_ok(GPA + 64, 8));
            }
            seen
        });
        for _ in 0..ROUNDS {
            ok(file.fallocate(PUNCH, 0, P as i64), "punch");
        }
        guest.join().expect("guest thread")
    });

    let torn: Vec<_> = seen.iter().filter(|v| **v != PATTERN && **v != 0).collect();
    assert!(torn.is_empty(), "torn loads: {torn:x?}");
}

/// INVAL-5: guest accesses racing slot delete and re-create either reach
/// the file (with the data, as unbinding never frees it) or exit as MMIO.
pub fn guest_access_racing_slot_delete_sees_the_slot_or_mmio(hv: &dyn Hypervisor) {
    const ROUNDS: usize = 100;
    let Some((vm, file)) = shared_file(hv, P) else {
        return;
    };
    let mapping = bind_through_own_mapping(&*vm, 0, GPA, P, &*file, 0);
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 8, 0x6666);
    let recreate = kvm_userspace_memory_region2 {
        userspace_addr: mapping.addr(),
        ..gmem_slot(0, GPA, P, &*file, 0)
    };

    let exits = thread::scope(|s| {
        let guest = s.spawn(move || (0..ROUNDS).map(|_| cpu.load(GPA, 8)).collect::<Vec<_>>());
        for _ in 0..ROUNDS {
            set_slot(&*vm, delete_slot(0));
            set_slot(&*vm, recreate);
        }
        guest.join().expect("guest thread")
    });

    let unexpected: Vec<_> = exits
        .iter()
        .filter(|e| !matches!(e, VcpuExit::Done(0x6666) | VcpuExit::Mmio { gpa: GPA, .. }))
        .collect();
    assert!(unexpected.is_empty(), "unexpected exits: {unexpected:?}");
}
