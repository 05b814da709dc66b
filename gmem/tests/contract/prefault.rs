//! `KVM_PRE_FAULT_MEMORY` (PREFAULT-*), on every backend that has it.

use crate::support::*;

/// A VM with a 16 KiB shared guest_memfd bound at `GPA`, and a vCPU.
struct Fixture {
    // Declared first: dropped before the VM.
    cpu: Box<dyn Vcpu>,
    g: Box<dyn GuestMemfd>,
    _vm: Box<dyn Vm>,
}

/// The fixture, or `None` (a recorded skip) when the backend cannot
/// pre-fault.
fn fixture(hv: &dyn Hypervisor) -> Option<Fixture> {
    if hv.check_extension(KVM_CAP_PRE_FAULT_MEMORY) == 0 {
        skip("KVM_CAP_PRE_FAULT_MEMORY is 0");
        return None;
    }
    let (vm, g) = shared_file(hv, 4 * P)?;
    set_slot(&*vm, gmem_slot(1, GPA, 4 * P, &*g, 0));
    let cpu = vcpu(&*vm);
    Some(Fixture { cpu, g, _vm: vm })
}

fn range(gpa: u64, size: u64) -> kvm_pre_fault_memory {
    kvm_pre_fault_memory {
        gpa,
        size,
        ..Default::default()
    }
}

/// PREFAULT-1: non-zero flags, unaligned, empty or wrapping ranges are EINVAL.
pub fn bad_ranges_are_einval(hv: &dyn Hypervisor) {
    let Some(Fixture {
        mut cpu,
        g: _g,
        _vm,
    }) = fixture(hv)
    else {
        return;
    };
    let mut flagged = range(GPA, P);
    flagged.flags = 1;
    assert_refused(
        hv,
        cpu.pre_fault_memory(&mut flagged),
        Errno::EINVAL,
        "PREFAULT-1",
    );
    for (gpa, size) in [(GPA + 1, P), (GPA, P / 2), (GPA, 0), (LAST_PAGE, 2 * P)] {
        let mut r = range(gpa, size);
        assert_refused(
            hv,
            cpu.pre_fault_memory(&mut r),
            Errno::EINVAL,
            "PREFAULT-1",
        );
        assert_eq!(
            (r.gpa, r.size),
            (gpa, size),
            "a refused range is not updated"
        );
    }
}

/// PREFAULT-2, PREFAULT-3: the whole range is mapped, leaves contents as
/// they were, and the range comes back empty.
pub fn whole_range_is_mapped_and_consumed(hv: &dyn Hypervisor) {
    let Some(Fixture { mut cpu, g, _vm }) = fixture(hv) else {
        return;
    };
    let m = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap");
    host_write(&*m, P, &[0x5a]);
    let mut r = range(GPA, 4 * P);
    ok(cpu.pre_fault_memory(&mut r), "KVM_PRE_FAULT_MEMORY");
    assert_eq!((r.gpa, r.size), (GPA + 4 * P, 0));
    assert_eq!(cpu.load_ok(GPA + P, 1), 0x5a);
}

/// PREFAULT-3, PREFAULT-4: a range that runs past its slot succeeds with
/// the rest left; starting outside every slot is ENOENT.
pub fn range_past_the_slot_stops_there_and_no_slot_is_enoent(hv: &dyn Hypervisor) {
    let Some(Fixture {
        mut cpu,
        g: _g,
        _vm,
    }) = fixture(hv)
    else {
        return;
    };
    let mut r = range(GPA + 2 * P, 4 * P);
    ok(cpu.pre_fault_memory(&mut r), "KVM_PRE_FAULT_MEMORY");
    assert_eq!((r.gpa, r.size), (GPA + 4 * P, 2 * P));
    assert_refused(
        hv,
        cpu.pre_fault_memory(&mut r),
        Errno::ENOENT,
        "PREFAULT-4",
    );
}

/// PREFAULT-5: a private gfn without guest_memfd cannot be mapped: EFAULT.
pub fn private_gfn_without_guest_memfd_is_efault(hv: &dyn Hypervisor) {
    if hv.check_extension(KVM_CAP_PRE_FAULT_MEMORY) == 0 {
        skip("KVM_CAP_PRE_FAULT_MEMORY is 0");
        return;
    }
    let Some(vm) = private_vm_with_attributes(hv) else {
        return;
    };
    let h = host(hv, P);
    set_slot(&*vm, plain_slot(1, GPA, P, h.addr()));
    ok(
        set_attributes(&*vm, GPA, P, PRIVATE),
        "KVM_SET_MEMORY_ATTRIBUTES",
    );
    let mut cpu = vcpu(&*vm);
    let mut r = range(GPA, P);
    assert_refused(
        hv,
        cpu.pre_fault_memory(&mut r),
        Errno::EFAULT,
        "PREFAULT-5",
    );
}
