//! Capabilities (docs/spec.md, section 8, CAP-*).

use crate::support::*;

/// CAP-1: the guest_memfd capabilities are reported on the system fd and
/// on a VM.
pub fn guest_memfd_capabilities_are_reported(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    for cap in [
        KVM_CAP_USER_MEMORY2,
        KVM_CAP_GUEST_MEMFD,
        KVM_CAP_MEMORY_FAULT_INFO,
    ] {
        assert_eq!(hv.check_extension(cap), 1, "system cap {cap}");
        assert_eq!(vm.check_extension(cap), 1, "VM cap {cap}");
    }
}

/// CAP-1: NR_MEMSLOTS is x86's 32764 user slots.
pub fn nr_memslots_is_32764(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let nr = vm.check_extension(KVM_CAP_NR_MEMSLOTS);

    assert_eq!(nr, KVM_USER_MEM_SLOTS as i64);
}

/// CAP-1: MEMORY_ATTRIBUTES is 0 on a VM without private memory.
pub fn memory_attributes_is_zero_on_a_default_vm(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let attrs = vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES);

    assert_eq!(attrs, 0);
}

/// CAP-1: MEMORY_ATTRIBUTES is PRIVATE on a VM with private memory.
pub fn memory_attributes_is_private_on_a_private_vm(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };

    let attrs = vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES);

    assert_eq!(attrs as u64, PRIVATE);
}

/// CAP-1: EXIT_HYPERCALL reports KVM_HC_MAP_GPA_RANGE.
pub fn exit_hypercall_reports_map_gpa_range(hv: &dyn Hypervisor) {
    let mask = hv.check_extension(KVM_CAP_EXIT_HYPERCALL);

    assert_ne!(mask & (1 << KVM_HC_MAP_GPA_RANGE), 0, "mask {mask:#x}");
}

/// CAP-1, SLOT-8: MULTI_ADDRESS_SPACE is the count SLOT-8 enforces: the
/// last address space takes a slot.
pub fn last_address_space_takes_a_slot(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let nr_as = address_spaces(&*vm);
    let mem = host(hv, P);

    let r = vm.set_user_memory_region2(plain_slot((nr_as - 1) << 16, GPA, P, mem.addr()));

    ok(r, &format!("slot in address space {}", nr_as - 1));
}

/// CAP-2: VM_TYPES always has DEFAULT.
pub fn vm_types_has_the_default_type(hv: &dyn Hypervisor) {
    let types = hv.check_extension(KVM_CAP_VM_TYPES);

    assert_ne!(types & (1 << DEFAULT), 0, "types {types:#x}");
}

/// CAP-2: a VM type can be created iff VM_TYPES has its bit; others
/// (SEV, SEV_ES, SNP, TDX where absent) are EINVAL.
pub fn vm_types_bits_match_the_creatable_types(hv: &dyn Hypervisor) {
    let types = hv.check_extension(KVM_CAP_VM_TYPES);

    for vm_type in 0..8u64 {
        let r = hv.create_vm(vm_type);

        if types & (1 << vm_type) != 0 {
            ok(r, &format!("VM type {}", vm_type_name(vm_type)));
        } else {
            assert_refused(hv, r, Errno::EINVAL, "CAP-2");
        }
    }
}

/// CAP-3: GUEST_MEMFD_FLAGS is MMAP | INIT_SHARED on a default VM and on
/// the system fd.
pub fn guest_memfd_flags_are_mmap_and_init_shared_on_a_default_vm(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let on_vm = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
    let on_system = hv.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;

    assert_eq!(on_vm, MMAP_SHARED);
    assert_eq!(on_system, MMAP_SHARED);
}

/// CAP-3: GUEST_MEMFD_FLAGS is MMAP only on a VM with private memory.
pub fn guest_memfd_flags_are_mmap_only_on_a_private_vm(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm(hv) else { return };

    let flags = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;

    assert_eq!(flags, GUEST_MEMFD_FLAG_MMAP);
}
