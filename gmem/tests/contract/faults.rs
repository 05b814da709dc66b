//! Guest accesses: the fault path (docs/spec.md, section 6, FAULT-*).

use crate::support::*;

/// FAULT-1: on a VM without private memory no access is private: a slot
/// bound to a file without MMAP serves the guest from userspace memory.
pub fn default_vm_access_is_never_private(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x77]);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, P, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);

    let value = cpu.load_ok(GPA, 1);

    assert_eq!(value, 0x77);
}

/// FAULT-1, FAULT-3: on a private VM a PRIVATE gfn is served from the file,
/// a shared one from userspace memory.
pub fn private_attribute_makes_the_access_private(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let file = gmem(&*vm, 2 * P, 0);
    let mem = host(hv, 2 * P);
    host_write(&*mem, 0, &[0x77]);
    host_write(&*mem, P, &[0x78]);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, 2 * P, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);

    ok(set_attributes(&*vm, GPA, P, PRIVATE), "page 0 to private");

    assert_eq!(cpu.load_ok(GPA, 1), 0, "page 0 came from userspace memory");
    assert_eq!(cpu.load_ok(GPA + P, 1), 0x78);
}

/// FAULT-2: a shared load where no slot is exits as MMIO with its address
/// and width.
pub fn shared_load_without_a_slot_exits_as_mmio(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mut cpu = vcpu(&*vm);

    let exit = cpu.load(GPA + 0x10, 4);

    assert_eq!(
        exit,
        VcpuExit::Mmio {
            gpa: GPA + 0x10,
            is_write: false,
            len: 4,
            data: 0
        }
    );
}

/// FAULT-2: a shared store where no slot is exits as MMIO with the data.
pub fn shared_store_without_a_slot_exits_as_mmio(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mut cpu = vcpu(&*vm);

    let exit = cpu.store(GPA + 0x20, 2, 0xbeef);

    assert_eq!(
        exit,
        VcpuExit::Mmio {
            gpa: GPA + 0x20,
            is_write: true,
            len: 2,
            data: 0xbeef
        }
    );
}

/// FAULT-2: a private access where no slot is exits with a private memory
/// fault.
pub fn private_access_without_a_slot_is_a_memory_fault(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    ok(set_attributes(&*vm, GPA, P, PRIVATE), "to private");
    let mut cpu = vcpu(&*vm);

    let exit = cpu.store(GPA, 8, 1);

    assert_eq!(exit, memory_fault(GPA, true));
}

/// FAULT-3: a shared access is served from userspace_addr + (gfn - base) * P.
pub fn shared_access_is_served_from_userspace_addr(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, 4 * P);
    host_write(&*mem, 2 * P + 3, &[0x42]);
    set_slot(&*vm, plain_slot(0, GPA, 4 * P, mem.addr()));
    let mut cpu = vcpu(&*vm);

    let value = cpu.load_ok(GPA + 2 * P + 3, 1);
    cpu.store_ok(GPA + 3 * P, 1, 0x43);

    assert_eq!(value, 0x42);
    assert_eq!(host_read(&*mem, 3 * P, 1), [0x43]);
}

/// FAULT-3: a guest_memfd-only access is served from the file at index
/// gfn - base_gfn + first_index.
pub fn guest_memfd_access_is_served_from_the_file_index(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    if !has_gmem_flags(&*vm, MMAP_SHARED) {
        return;
    }
    let file = gmem(&*vm, 8 * P, MMAP_SHARED);
    set_slot(&*vm, gmem_slot(0, GPA, 4 * P, &*file, 2 * P));
    let mapping = ok(file.mmap(0, 8 * P, MapKind::Shared), "mmap");
    let mut cpu = vcpu(&*vm);

    cpu.store_ok(GPA + P + 4, 1, 0x9d);

    assert_eq!(host_read(&*mapping, 3 * P + 4, 1), [0x9d]);
}

/// FAULT-3: a private access is served from the file at the slot's offset.
pub fn private_access_is_served_from_the_file_index(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let file = gmem(&*vm, 8 * P, 0);
    let mem = host(hv, 2 * P);
    set_slot(
        &*vm,
        gmem_slot_with_host(0, GPA, 2 * P, &*file, 4 * P, &*mem),
    );
    set_slot(&*vm, gmem_slot(1, GPA + 64 * P, 2 * P, &*file, 6 * P));
    ok(set_attributes(&*vm, GPA, 128 * P, PRIVATE), "to private");
    let mut cpu = vcpu(&*vm);

    cpu.store_ok(GPA + P, 8, 0x51);
    cpu.store_ok(GPA + 64 * P, 8, 0x52);

    assert_eq!(cpu.load_ok(GPA + P, 8), 0x51);
    assert_eq!(cpu.load_ok(GPA + 64 * P, 8), 0x52);
    assert_eq!(
        host_read(&*mem, P, 8),
        [0; 8],
        "private data reached userspace"
    );
}

/// FAULT-4: a private access to a slot without a guest_memfd binding exits
/// with a private memory fault (private_mem_kvm_exits_test).
pub fn private_access_to_a_slot_without_guest_memfd_is_a_memory_fault(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let mem = host(hv, P);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));
    ok(set_attributes(&*vm, GPA, P, PRIVATE), "to private");
    let mut cpu = vcpu(&*vm);

    let exit = cpu.load(GPA + 0x40, 8);

    assert_eq!(exit, memory_fault(GPA, true));
}

/// FAULT-5: a hole is read as zero by the guest, and written pages keep
/// their data.
pub fn guest_read_of_a_hole_is_zero(hv: &dyn Hypervisor) {
    let Some((vm, file)) = shared_file(hv, 2 * P) else {
        return;
    };
    let _mapping = bind_through_own_mapping(&*vm, 0, GPA, 2 * P, &*file, 0);
    let mut cpu = vcpu(&*vm);

    let hole = cpu.load_ok(GPA + P + 8, 8);
    cpu.store_ok(GPA + P + 16, 8, 7);

    assert_eq!(hole, 0);
    assert_eq!(cpu.load_ok(GPA + P + 8, 8), 0);
    assert_eq!(cpu.load_ok(GPA + P + 16, 8), 7);
}

/// FAULT-6: after the file is released a guest_memfd-only access exits with
/// a memory fault (flags 0 on a default VM).
pub fn access_after_the_file_is_released_is_a_memory_fault(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, GUEST_MEMFD_FLAG_MMAP);
    set_slot(&*vm, gmem_slot(0, GPA, P, &*file, 0));
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA, 1, 1);

    drop(file);

    assert_eq!(cpu.store(GPA, 1, 2), memory_fault(GPA, false));
}

/// FAULT-6: after the file is released a private access exits with a
/// private memory fault.
pub fn private_access_after_the_file_is_released_is_a_memory_fault(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let file = gmem(&*vm, P, 0);
    let mem = host(hv, P);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, P, &*file, 0, &*mem));
    ok(set_attributes(&*vm, GPA, P, PRIVATE), "to private");
    let mut cpu = vcpu(&*vm);

    drop(file);

    assert_eq!(cpu.load(GPA, 8), memory_fault(GPA, true));
}

/// FAULT-7: a memory fault reports the page-aligned gpa and size P, even
/// for an access in the middle of the page.
pub fn memory_fault_reports_the_page_and_its_size(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 2 * P, GUEST_MEMFD_FLAG_MMAP);
    set_slot(&*vm, gmem_slot(0, GPA, 2 * P, &*file, 0));
    let mut cpu = vcpu(&*vm);
    drop(file);

    let exit = cpu.load(GPA + P + 0x123, 2);

    assert_eq!(
        exit,
        VcpuExit::MemoryFault {
            flags: 0,
            gpa: GPA + P,
            size: P
        }
    );
}

/// FAULT-7: a private access after the slot was deleted exits with a
/// private memory fault for that page (private_mem_kvm_exits_test).
pub fn private_access_after_the_slot_is_deleted_is_a_memory_fault(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let file = gmem(&*vm, 4 * P, 0);
    let mem = host(hv, 4 * P);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, 4 * P, &*file, 0, &*mem));
    ok(set_attributes(&*vm, GPA, 4 * P, PRIVATE), "to private");
    let mut cpu = vcpu(&*vm);
    cpu.store_ok(GPA + 2 * P, 8, 3);

    set_slot(&*vm, delete_slot(0));

    assert_eq!(
        cpu.load(GPA + 2 * P + 8, 8),
        memory_fault(GPA + 2 * P, true)
    );
}

/// A private VM with KVM_CAP_EXIT_HYPERCALL enabled for MAP_GPA_RANGE. The
/// conversion the hypercall asks for needs private memory, so FAULT-8 is
/// tested where there is private memory.
fn hypercall_vm(hv: &dyn Hypervisor) -> Option<Box<dyn Vm>> {
    let vm = private_vm_with_attributes(hv)?;
    ok(
        vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE),
        "KVM_ENABLE_CAP(EXIT_HYPERCALL)",
    );
    Some(vm)
}

/// FAULT-8: MAP_GPA_RANGE exits to the VMM with the gpa, the page count and
/// the attribute word.
pub fn map_gpa_range_exits_as_a_hypercall(hv: &dyn Hypervisor) {
    let Some(vm) = hypercall_vm(hv) else { return };
    let mut cpu = vcpu(&*vm);
    let attributes = KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K;

    let exit = ok(
        cpu.run(GuestOp::MapGpaRange {
            gpa: GPA,
            npages: 4,
            attributes,
        }),
        "KVM_RUN",
    );

    assert_eq!(
        exit,
        VcpuExit::Hypercall {
            nr: KVM_HC_MAP_GPA_RANGE,
            gpa: GPA,
            npages: 4,
            attributes
        }
    );
}

/// FAULT-8: the VMM converts the range the guest asked for and resumes it:
/// the guest's next access to the range is private.
pub fn vmm_converts_what_map_gpa_range_asked_for(hv: &dyn Hypervisor) {
    let Some(vm) = hypercall_vm(hv) else { return };
    let file = gmem(&*vm, 4 * P, 0);
    let mem = host(hv, 4 * P);
    host_write(&*mem, P, &[0x31]);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, 4 * P, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);
    let exit = ok(
        cpu.run(GuestOp::MapGpaRange {
            gpa: GPA,
            npages: 4,
            attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
        }),
        "KVM_RUN",
    );
    let VcpuExit::Hypercall { gpa, npages, .. } = exit else {
        panic!("expected a hypercall exit, got {exit:?}");
    };

    ok(set_attributes(&*vm, gpa, npages * P, PRIVATE), "convert");

    assert_eq!(cpu.load_ok(GPA + P, 1), 0, "still read userspace memory");
}

/// FAULT-8: without KVM_CAP_EXIT_HYPERCALL the guest gets -KVM_ENOSYS.
pub fn map_gpa_range_without_the_exit_cap_returns_enosys(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let mut cpu = vcpu(&*vm);

    let exit = ok(
        cpu.run(GuestOp::MapGpaRange {
            gpa: GPA,
            npages: 1,
            attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
        }),
        "KVM_RUN",
    );

    assert_eq!(exit, VcpuExit::Done(KVM_ENOSYS.wrapping_neg()));
}

/// The guest's MAP_GPA_RANGE: how the run ended.
fn map_gpa_range(cpu: &mut dyn Vcpu, gpa: u64, npages: u64) -> VcpuExit {
    ok(
        cpu.run(GuestOp::MapGpaRange {
            gpa,
            npages,
            attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
        }),
        "KVM_RUN",
    )
}

/// FAULT-8: without KVM_CAP_EXIT_HYPERCALL the guest gets -KVM_ENOSYS
/// before its arguments are looked at (x86.c checks the exit mask first).
pub fn map_gpa_range_without_the_exit_cap_ignores_bad_arguments(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };

    let mut cpu = vcpu(&*vm);

    let unaligned = map_gpa_range(&mut *cpu, GPA + 1, 1);

    assert_eq!(unaligned, VcpuExit::Done(KVM_ENOSYS.wrapping_neg()));
}

/// FAULT-8: with the exit enabled, an unaligned gpa, zero pages or a gfn
/// range that wraps return -KVM_EINVAL to the guest without an exit.
pub fn map_gpa_range_with_bad_arguments_returns_einval(hv: &dyn Hypervisor) {
    const KVM_EINVAL: u64 = 22;
    let Some(vm) = hypercall_vm(hv) else { return };
    let mut cpu = vcpu(&*vm);

    for (gpa, npages) in [(GPA + 1, 1), (GPA, 0), (GPA, u64::MAX)] {
        let exit = map_gpa_range(&mut *cpu, gpa, npages);

        assert_eq!(
            exit,
            VcpuExit::Done(KVM_EINVAL.wrapping_neg()),
            "gpa {gpa:#x} npages {npages}"
        );
    }
}

/// FAULT-8: any range that does not wrap exits, however large: KVM leaves
/// judging it to the VMM.
pub fn map_gpa_range_of_a_huge_range_exits(hv: &dyn Hypervisor) {
    let Some(vm) = hypercall_vm(hv) else { return };
    let mut cpu = vcpu(&*vm);

    let exit = map_gpa_range(&mut *cpu, 0, 1 << 60);

    assert!(
        matches!(exit, VcpuExit::Hypercall { npages, .. } if npages == 1 << 60),
        "{exit:?}"
    );
}

/// FAULT-2, FAULT-3: a store to a READONLY slot exits as MMIO and leaves
/// the memory alone; loads are served from userspace_addr.
pub fn store_to_a_readonly_slot_exits_as_mmio(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x12]);
    set_slot(
        &*vm,
        kvm_userspace_memory_region2 {
            flags: KVM_MEM_READONLY,
            ..plain_slot(0, GPA, P, mem.addr())
        },
    );
    let mut cpu = vcpu(&*vm);

    let exit = cpu.store(GPA, 1, 0x34);

    assert!(
        matches!(
            exit,
            VcpuExit::Mmio {
                gpa: GPA,
                is_write: true,
                len: 1,
                data: 0x34
            }
        ),
        "{exit:?}"
    );
    assert_eq!(cpu.load_ok(GPA, 1), 0x12);
}
