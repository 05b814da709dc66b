//! KVM_SET_MEMORY_ATTRIBUTES (docs/spec.md, section 5, ATTR-*).

use crate::support::*;

fn attrs(address: u64, size: u64, attributes: u64, flags: u64) -> kvm_memory_attributes {
    kvm_memory_attributes {
        address,
        size,
        attributes,
        flags,
    }
}

/// A default VM, when the backend has the attributes ioctl at all.
fn default_vm_with_ioctl(hv: &dyn Hypervisor) -> Option<Box<dyn Vm>> {
    has_attributes_ioctl(hv).then(|| default_vm(hv))
}

/// A private VM with slot 0 at `GPA` over a 4-page file (no MMAP) whose
/// shared side is `mem`, and a vCPU.
struct PrivateSetup {
    vm: Box<dyn Vm>,
    file: Box<dyn GuestMemfd>,
    mem: Box<dyn HostMemory>,
    cpu: Box<dyn Vcpu>,
}

fn private_setup(hv: &dyn Hypervisor) -> Option<PrivateSetup> {
    let vm = private_vm_with_attributes(hv)?;
    let file = gmem(&*vm, 4 * P, 0);
    let mem = host(hv, 4 * P);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, 4 * P, &*file, 0, &*mem));
    let cpu = vcpu(&*vm);
    Some(PrivateSetup { vm, file, mem, cpu })
}

/// ATTR-1: flags != 0 is EINVAL.
pub fn nonzero_flags_are_einval(hv: &dyn Hypervisor) {
    let Some(vm) = default_vm_with_ioctl(hv) else {
        return;
    };

    let r = vm.set_memory_attributes(attrs(GPA, P, 0, 1));

    assert_refused(hv, r, Errno::EINVAL, "ATTR-1");
}

/// ATTR-1: PRIVATE on a VM without private memory is EINVAL.
pub fn private_on_a_vm_without_private_memory_is_einval(hv: &dyn Hypervisor) {
    let Some(vm) = default_vm_with_ioctl(hv) else {
        return;
    };

    let r = vm.set_memory_attributes(attrs(GPA, P, PRIVATE, 0));

    assert_refused(hv, r, Errno::EINVAL, "ATTR-1");
}

/// ATTR-1: attributes 0 are accepted on a VM without private memory.
pub fn zero_attributes_are_accepted_on_a_default_vm(hv: &dyn Hypervisor) {
    let Some(vm) = default_vm_with_ioctl(hv) else {
        return;
    };

    let r = vm.set_memory_attributes(attrs(GPA, P, 0, 0));

    ok(r, "attributes 0");
}

/// ATTR-1: every attribute bit but PRIVATE is EINVAL on a private VM.
pub fn unsupported_attribute_bits_are_einval(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };

    for bit in (0..64).filter(|b| 1 << b != PRIVATE) {
        let r = vm.set_memory_attributes(attrs(GPA, P, 1 << bit, 0));

        assert_refused(hv, r, Errno::EINVAL, "ATTR-1");
    }
}

/// ATTR-2: size 0 is EINVAL.
pub fn size_zero_is_einval(hv: &dyn Hypervisor) {
    let Some(vm) = default_vm_with_ioctl(hv) else {
        return;
    };

    let r = vm.set_memory_attributes(attrs(GPA, 0, 0, 0));

    assert_refused(hv, r, Errno::EINVAL, "ATTR-2");
}

/// ATTR-2: a range that wraps is EINVAL.
pub fn wrapping_range_is_einval(hv: &dyn Hypervisor) {
    let Some(vm) = default_vm_with_ioctl(hv) else {
        return;
    };

    let r = vm.set_memory_attributes(attrs(LAST_PAGE, 2 * P, 0, 0));

    assert_refused(hv, r, Errno::EINVAL, "ATTR-2");
}

/// ATTR-2: an unaligned address or size is EINVAL.
pub fn unaligned_address_or_size_is_einval(hv: &dyn Hypervisor) {
    let Some(vm) = default_vm_with_ioctl(hv) else {
        return;
    };

    for (address, size) in [(GPA + 1, P), (GPA, P + 1), (GPA, P / 2)] {
        let r = vm.set_memory_attributes(attrs(address, size, 0, 0));

        assert_refused(hv, r, Errno::EINVAL, "ATTR-2");
    }
}

/// ATTR-3, FAULT-1: every gfn starts shared: the guest reads the slot's
/// userspace memory.
pub fn every_gfn_starts_shared(hv: &dyn Hypervisor) {
    let Some(PrivateSetup {
        vm: _vm,
        file: _file,
        mem,
        mut cpu,
    }) = private_setup(hv)
    else {
        return;
    };

    host_write(&*mem, 2 * P, &[0x66]);

    assert_eq!(cpu.load_ok(GPA + 2 * P, 1), 0x66);
}

/// ATTR-3: attributes set where no slot is are kept and apply when a slot
/// appears: the new slot's page is private from the start.
pub fn attributes_apply_to_a_slot_created_later(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    ok(
        set_attributes(&*vm, GPA, P, PRIVATE),
        "convert before the slot",
    );
    let file = gmem(&*vm, P, 0);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x66]);

    set_slot(&*vm, gmem_slot_with_host(0, GPA, P, &*file, 0, &*mem));

    let mut cpu = vcpu(&*vm);
    assert_eq!(cpu.load_ok(GPA, 1), 0, "the access was not private");
}

/// ATTR-3: attributes need no memslot: a private access where no slot is
/// exits with a private memory fault.
pub fn attributes_need_no_memslot(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };

    let r = set_attributes(&*vm, GPA + 512 * P, 4 * P, PRIVATE);

    ok(r, "convert a range without a slot");
    let mut cpu = vcpu(&*vm);
    assert_eq!(
        cpu.load(GPA + 513 * P, 1),
        memory_fault(GPA + 513 * P, true)
    );
}

/// ATTR-4: a request that changes nothing returns 0, and the memory stays.
pub fn request_that_changes_nothing_succeeds(hv: &dyn Hypervisor) {
    let Some(PrivateSetup {
        vm,
        file: _file,
        mem: _mem,
        mut cpu,
    }) = private_setup(hv)
    else {
        return;
    };
    ok(set_attributes(&*vm, GPA, 2 * P, PRIVATE), "convert");
    cpu.store_ok(GPA, 8, 0x55);

    let again = set_attributes(&*vm, GPA, 2 * P, PRIVATE);
    let shared_again = set_attributes(&*vm, GPA + 2 * P, 2 * P, 0);

    ok(again, "converting a private range to private");
    ok(shared_again, "converting a shared range to shared");
    assert_eq!(cpu.load_ok(GPA, 8), 0x55);
}

/// ATTR-4: a change takes effect on the next access: the guest switches
/// between the file and userspace memory as the attributes change.
pub fn conversion_switches_the_backing_of_the_next_access(hv: &dyn Hypervisor) {
    let Some(PrivateSetup {
        vm,
        file: _file,
        mem,
        mut cpu,
    }) = private_setup(hv)
    else {
        return;
    };
    host_write(&*mem, 0, &[0x11]);
    assert_eq!(cpu.load_ok(GPA, 1), 0x11);

    ok(set_attributes(&*vm, GPA, P, PRIVATE), "to private");
    cpu.store_ok(GPA, 1, 0x22);
    ok(set_attributes(&*vm, GPA, P, 0), "to shared");

    assert_eq!(cpu.load_ok(GPA, 1), 0x11);
    assert_eq!(host_read(&*mem, 0, 1), [0x11]);
}

/// ATTR-5: converting never frees guest_memfd pages: private data survives
/// a round trip through shared.
pub fn conversion_round_trip_keeps_private_data(hv: &dyn Hypervisor) {
    let Some(PrivateSetup {
        vm,
        file: _file,
        mem: _mem,
        mut cpu,
    }) = private_setup(hv)
    else {
        return;
    };
    ok(set_attributes(&*vm, GPA, 4 * P, PRIVATE), "to private");
    cpu.store_ok(GPA + 3 * P, 8, 0xdead_beef);

    ok(set_attributes(&*vm, GPA, 4 * P, 0), "to shared");
    ok(set_attributes(&*vm, GPA, 4 * P, PRIVATE), "back to private");

    assert_eq!(cpu.load_ok(GPA + 3 * P, 8), 0xdead_beef);
}

/// ATTR-5: freeing the private copy is the VMM's job: a punched private
/// range reads back zero (private_mem_conversions_test).
pub fn punched_private_range_reads_zero(hv: &dyn Hypervisor) {
    let Some(PrivateSetup {
        vm,
        file,
        mem: _mem,
        mut cpu,
    }) = private_setup(hv)
    else {
        return;
    };
    ok(set_attributes(&*vm, GPA, 4 * P, PRIVATE), "to private");
    cpu.store_ok(GPA + P, 8, 0x99);

    ok(
        file.fallocate(
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
            P as i64,
            P as i64,
        ),
        "punch",
    );

    assert_eq!(cpu.load_ok(GPA + P, 8), 0);
}

/// ATTR-3, ATTR-5: the conversion table of private_mem_conversions_test:
/// ranges (offset, size) in {(0,4K), (0,2M), (4K,4K), (4K,2M), (2M,4K)}
/// converted to private and back, with and without fallocate; the guest
/// sees the file while private and the host's pattern once shared again.
pub fn conversion_table_of_the_selftest(hv: &dyn Hypervisor) {
    const MIB2: u64 = 2 << 20;
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let size = 2 * MIB2 + 2 * P;
    let file = gmem(&*vm, size, 0);
    let mem = host(hv, size);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, size, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);
    let cases = [(0, P), (0, MIB2), (P, P), (P, MIB2), (MIB2, P)];

    for (offset, len) in cases {
        for with_fallocate in [false, true] {
            let (first, last) = (offset, offset + len - 8);
            host_write(&*mem, first, &[0x5a; 8]);
            host_write(&*mem, last, &[0x5a; 8]);
            if with_fallocate {
                ok(
                    file.fallocate(FALLOC_FL_KEEP_SIZE, offset as i64, len as i64),
                    "allocate",
                );
            }

            ok(
                set_attributes(&*vm, GPA + offset, len, PRIVATE),
                "to private",
            );
            cpu.store_ok(GPA + first, 8, 0xa5);
            cpu.store_ok(GPA + last, 8, 0xa5);
            let private = (cpu.load_ok(GPA + first, 8), cpu.load_ok(GPA + last, 8));
            ok(set_attributes(&*vm, GPA + offset, len, 0), "to shared");
            let shared = (cpu.load_ok(GPA + first, 8), cpu.load_ok(GPA + last, 8));
            if with_fallocate {
                ok(
                    file.fallocate(
                        FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                        offset as i64,
                        len as i64,
                    ),
                    "punch",
                );
            }

            assert_eq!(private, (0xa5, 0xa5), "({offset:#x}, {len:#x}) private");
            assert_eq!(
                shared,
                (0x5a5a_5a5a_5a5a_5a5a, 0x5a5a_5a5a_5a5a_5a5a),
                "({offset:#x}, {len:#x}) shared"
            );
        }
    }
}

/// ATTR-4: odd pages of a private range converted back to shared: only
/// those pages switch (private_mem_conversions_test).
pub fn odd_pages_converted_back_to_shared(hv: &dyn Hypervisor) {
    let Some(PrivateSetup {
        vm,
        file: _file,
        mem,
        mut cpu,
    }) = private_setup(hv)
    else {
        return;
    };
    ok(set_attributes(&*vm, GPA, 4 * P, PRIVATE), "to private");
    for i in 0..4 {
        cpu.store_ok(GPA + i * P, 1, 0xc0 + i);
        host_write(&*mem, i * P, &[0x10 + i as u8]);
    }

    for i in [1, 3] {
        ok(
            set_attributes(&*vm, GPA + i * P, P, 0),
            "odd page to shared",
        );
    }

    let seen: Vec<u64> = (0..4).map(|i| cpu.load_ok(GPA + i * P, 1)).collect();
    assert_eq!(seen, [0xc0, 0x11, 0xc2, 0x13]);
}

/// ATTR-6: converting 1 TiB is accepted (the soft backend stores it as one
/// range: see soft_backend.rs).
pub fn converting_one_tib_succeeds(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };

    let r = set_attributes(&*vm, 1 << 40, 1 << 40, PRIVATE);

    ok(r, "1 TiB to private");
    let mut cpu = vcpu(&*vm);
    let gpa = (1 << 40) + (1 << 39);
    assert_eq!(cpu.load(gpa, 1), memory_fault(gpa, true));
}
