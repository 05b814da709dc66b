//! In-place conversion (CONV-*): `KVM_SET_MEMORY_ATTRIBUTES2` on the
//! guest_memfd, on backends that announce it
//! (`KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES`); the software backend has it
//! in its `next` profile. Also the BIND-5 errno, which changed in 7.2.

use crate::support::*;

/// A private VM, a file of `pages` pages (INIT_SHARED or not) bound at
/// `GPA`, its host mapping and a vCPU; or `None` (a recorded skip).
#[allow(clippy::type_complexity)]
fn fixture(
    hv: &dyn Hypervisor,
    pages: u64,
    shared: bool,
) -> Option<(
    Box<dyn Vm>,
    Box<dyn GuestMemfd>,
    Box<dyn HostMemory>,
    Box<dyn Vcpu>,
)> {
    if hv.check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) & PRIVATE as i64 == 0 {
        skip("KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES has no PRIVATE");
        return None;
    }
    let vm = private_vm(hv)?;
    let flags = if shared {
        MMAP_SHARED
    } else {
        GUEST_MEMFD_FLAG_MMAP
    };
    let g = gmem(&*vm, pages * P, flags);
    let m = ok(g.mmap(0, pages * P, MapKind::Shared), "mmap");
    set_slot(&*vm, gmem_slot(1, GPA, pages * P, &*g, 0));
    let cpu = vcpu(&*vm);
    Some((vm, g, m, cpu))
}

fn convert(g: &dyn GuestMemfd, offset: u64, size: u64, private: bool) -> Result<()> {
    g.set_memory_attributes2(&mut kvm_memory_attributes2::new(offset, size, private))
}

fn sigbus(m: &dyn HostMemory, offset: u64) -> bool {
    matches!(m.read(offset, &mut [0]), Err(HostFault::Sigbus { .. }))
}

/// CONV-1, CONV-6: a file without INIT_SHARED starts private and the host
/// cannot touch it; the guest can. CONV-8: the guest access is private.
pub fn file_starts_private_and_the_host_faults(hv: &dyn Hypervisor) {
    let Some((_vm, _g, m, mut cpu)) = fixture(hv, 1, false) else {
        return;
    };
    assert!(sigbus(&*m, 0), "a private page must SIGBUS on host access");
    cpu.store_ok(GPA, 1, 0x41);
    assert_eq!(cpu.load_ok(GPA, 1), 0x41);
}

/// CONV-7: converting keeps the one copy of the page, both ways.
pub fn conversion_keeps_contents_both_ways(hv: &dyn Hypervisor) {
    let Some((_vm, g, m, mut cpu)) = fixture(hv, 1, true) else {
        return;
    };
    host_write(&*m, 0, &[0x41]);
    ok(convert(&*g, 0, P, true), "to private");
    assert_eq!(cpu.load_ok(GPA, 1), 0x41);
    cpu.store_ok(GPA, 1, 0x42);
    ok(convert(&*g, 0, P, false), "to shared");
    assert_eq!(host_read(&*m, 0, 1), [0x42]);
}

/// CONV-4: a conversion invalidates the guest's mappings of the range;
/// only the converted page changes.
pub fn conversion_touches_only_its_range(hv: &dyn Hypervisor) {
    let Some((_vm, g, m, _cpu)) = fixture(hv, 3, true) else {
        return;
    };
    ok(convert(&*g, P, P, true), "to private");
    assert!(!sigbus(&*m, 0) && sigbus(&*m, P) && !sigbus(&*m, 2 * P));
    let second = ok(g.mmap(0, 3 * P, MapKind::Shared), "second mmap");
    assert!(
        sigbus(&*second, P),
        "private-ness belongs to the file (CONV-6)"
    );
}

/// CONV-2, CONV-3: flags, unknown attributes and bad ranges are EINVAL.
pub fn bad_requests_are_einval(hv: &dyn Hypervisor) {
    let Some((_vm, g, _m, _cpu)) = fixture(hv, 2, true) else {
        return;
    };
    let mut a = kvm_memory_attributes2::new(0, P, true);
    a.flags = 1;
    assert_refused(
        hv,
        g.set_memory_attributes2(&mut a),
        Errno::EINVAL,
        "CONV-2",
    );
    let mut a = kvm_memory_attributes2::new(0, P, true);
    a.attributes = 1 << 4;
    assert_refused(
        hv,
        g.set_memory_attributes2(&mut a),
        Errno::EINVAL,
        "CONV-2",
    );
    for (offset, size) in [(0, 0), (P / 2, P), (P, 2 * P), (LAST_PAGE, 2 * P)] {
        assert_refused(
            hv,
            convert(&*g, offset, size, true),
            Errno::EINVAL,
            "CONV-3",
        );
    }
}

/// CONV-5: a referenced page cannot be made private: EAGAIN with its
/// offset, nothing changed; after the reference goes, it can.
pub fn pinned_page_is_eagain_with_its_offset(hv: &dyn Hypervisor) {
    let Some((_vm, g, m, _cpu)) = fixture(hv, 2, true) else {
        return;
    };
    let pin = match m.pin(P, P) {
        Ok(p) => p,
        Err(e) if e.errno == Errno::ENOTTY => return skip("the backend cannot pin pages"),
        Err(e) => panic!("pin: {e}"),
    };
    let mut a = kvm_memory_attributes2::new(0, 2 * P, true);
    assert_refused(
        hv,
        g.set_memory_attributes2(&mut a),
        Errno::EAGAIN,
        "CONV-5",
    );
    assert_eq!(a.error_offset, P);
    assert!(!sigbus(&*m, 0), "a refused conversion changes nothing");
    drop(pin);
    ok(
        g.set_memory_attributes2(&mut a),
        "conversion after unpinning",
    );
    assert!(sigbus(&*m, P));
}

/// CONV-8: the guest's access is private iff its file page is.
pub fn guest_access_follows_the_file_page(hv: &dyn Hypervisor) {
    let Some((_vm, g, m, mut cpu)) = fixture(hv, 2, false) else {
        return;
    };
    ok(convert(&*g, P, P, false), "page 1 to shared");
    host_write(&*m, P, &[0x33]);
    assert_eq!(cpu.load_ok(GPA + P, 1), 0x33);
    cpu.store_ok(GPA, 1, 0x44);
    assert!(sigbus(&*m, 0));
}

/// BIND-5: binding a bound file range is EINVAL before 7.2, EEXIST since;
/// a running kernel may give either.
pub fn bound_range_errno_follows_the_release(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let g = gmem(&*vm, 2 * P, 0);
    set_slot(&*vm, gmem_slot(1, GPA, P, &*g, 0));
    let err = refused(vm.set_user_memory_region2(gmem_slot(2, GPA + P, P, &*g, 0)));
    match hv.release() {
        Some(r) if r >= gmem::Release::V7_2 => assert_eq!(err.errno, Errno::EEXIST, "{err}"),
        Some(_) => assert_eq!(err.errno, Errno::EINVAL, "{err}"),
        None => assert!(matches!(err.errno, Errno::EINVAL | Errno::EEXIST), "{err}"),
    }
}
