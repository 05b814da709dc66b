//! Binding a memslot to a guest_memfd range (docs/spec.md, section 3, BIND-*).

use std::os::fd::{FromRawFd, OwnedFd};

use crate::support::*;

/// BIND-1: fd -1 is EBADF.
pub fn bind_to_fd_minus_one_is_ebadf(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: u32::MAX,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EBADF, "BIND-1");
}

/// BIND-1: an fd number that is not open is EBADF (a number far above any
/// fd the test process opens, so no concurrent test can own it).
pub fn bind_to_a_closed_fd_is_ebadf(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: 0x3fff_fff0,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EBADF, "BIND-1");
}

/// BIND-2: binding the system fd (/dev/kvm) is EINVAL.
pub fn bind_to_the_system_fd_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: hv.as_raw_fd() as u32,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "BIND-2");
}

/// BIND-2: binding the VM fd is EINVAL.
pub fn bind_to_the_vm_fd_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: vm.as_raw_fd() as u32,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "BIND-2");
}

/// BIND-2: binding a plain memfd is EINVAL.
pub fn bind_to_a_plain_memfd_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);
    // SAFETY: memfd_create reads the NUL-terminated name; the fd it returns
    // is owned right away.
    let memfd = unsafe {
        let fd = libc::memfd_create(c"contract-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create failed");
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: ftruncate on the memfd we own.
    assert_eq!(unsafe { libc::ftruncate(memfd.as_raw_fd(), P as i64) }, 0);

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: memfd.as_raw_fd() as u32,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    assert_refused(hv, r, Errno::EINVAL, "BIND-2");
}

/// BIND-3: another VM's guest_memfd is EINVAL.
pub fn another_vms_guest_memfd_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let other = default_vm(hv);
    let file = gmem(&*other, P, 0);

    let r = vm.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, 0));

    assert_refused(hv, r, Errno::EINVAL, "BIND-3");
}

/// BIND-3: the file another VM refused is accepted by its own VM.
pub fn own_vm_accepts_the_file_another_vm_refused(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let other = default_vm(hv);
    let file = gmem(&*other, P, 0);
    let _ = vm.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, 0));

    let r = other.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, 0));

    ok(r, "bind on the owning VM");
}

/// BIND-4: a range that ends past the end of the file is EINVAL.
pub fn bind_past_end_of_file_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);

    let r = vm.set_user_memory_region2(gmem_slot(0, GPA, 2 * P, &*file, 3 * P));

    assert_refused(hv, r, Errno::EINVAL, "BIND-4");
}

/// BIND-4: an offset at or past the end of the file is EINVAL.
pub fn bind_at_an_offset_past_the_end_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);

    for offset in [4 * P, 64 * P] {
        let r = vm.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, offset));

        assert_refused(hv, r, Errno::EINVAL, "BIND-4");
    }
}

/// BIND-4: an offset that is negative as a signed number is EINVAL.
pub fn bind_at_a_negative_offset_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);

    let r = vm.set_user_memory_region2(gmem_slot(0, GPA, P, &*file, 1 << 63));

    assert_refused(hv, r, Errno::EINVAL, "BIND-4");
}

/// BIND-4: the end is exclusive: offset + size == file size is accepted.
pub fn bind_ending_exactly_at_end_of_file_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);

    let r = vm.set_user_memory_region2(gmem_slot(0, GPA, 2 * P, &*file, 2 * P));

    ok(r, "offset + size == file size");
}

/// BIND-5: a file range overlapping a bound range is EINVAL, not EEXIST.
pub fn binding_an_already_bound_file_range_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 8 * P, 0);
    set_slot(&*vm, gmem_slot(0, GPA, 4 * P, &*file, 0));

    let r = vm.set_user_memory_region2(gmem_slot(1, GPA + 16 * P, 2 * P, &*file, 3 * P));

    assert_refused(hv, r, Errno::EINVAL, "BIND-5");
}

/// BIND-5: deleting the slot frees its file range for a new binding.
pub fn deleting_a_slot_frees_its_file_range(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);
    set_slot(&*vm, gmem_slot(0, GPA, 4 * P, &*file, 0));
    set_slot(&*vm, delete_slot(0));

    let r = vm.set_user_memory_region2(gmem_slot(1, GPA + 16 * P, 4 * P, &*file, 0));

    ok(r, "rebinding the freed range");
}

/// BIND-6, LIFE-8: a request refused after the file was looked up (gfn
/// overlap, EEXIST) leaves the file range unbound.
pub fn refused_slot_leaves_the_file_range_unbound(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    let file = gmem(&*vm, 4 * P, 0);
    set_slot(&*vm, plain_slot(0, GPA, P, mem.addr()));
    let refused_request = vm.set_user_memory_region2(gmem_slot(1, GPA, 4 * P, &*file, 0));
    assert_refused(hv, refused_request, Errno::EEXIST, "SLOT-12");

    let r = vm.set_user_memory_region2(gmem_slot(1, GPA + 16 * P, 4 * P, &*file, 0));

    ok(r, "binding the range the refused request named");
}

/// BIND-6, FAULT-3: a slot bound to a file with MMAP is guest_memfd-only:
/// shared accesses go to the file, not to userspace_addr.
pub fn mmap_file_makes_the_slot_guest_memfd_only(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x11]);
    let file = gmem(&*vm, P, GUEST_MEMFD_FLAG_MMAP);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, P, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);

    let first = cpu.load_ok(GPA, 1);
    cpu.store_ok(GPA, 1, 0x22);

    assert_eq!(first, 0, "read the host memory, not the file");
    assert_eq!(host_read(&*mem, 0, 1), [0x11]);
    assert_eq!(cpu.load_ok(GPA, 1), 0x22);
}

/// BIND-6, FAULT-3: a slot bound to a file without MMAP serves shared
/// accesses from userspace_addr.
pub fn file_without_mmap_leaves_shared_accesses_on_userspace_addr(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let mem = host(hv, P);
    host_write(&*mem, 0, &[0x11]);
    let file = gmem(&*vm, P, 0);
    set_slot(&*vm, gmem_slot_with_host(0, GPA, P, &*file, 0, &*mem));
    let mut cpu = vcpu(&*vm);

    let value = cpu.load_ok(GPA, 1);
    cpu.store_ok(GPA, 1, 0x22);

    assert_eq!(value, 0x11);
    assert_eq!(host_read(&*mem, 0, 1), [0x22]);
}

/// BIND-7: two slots on one 8 MiB file, at 0 and 4 MiB, each see their own
/// half (set_memory_region_test).
pub fn two_slots_bind_one_8mib_file_at_0_and_4mib(hv: &dyn Hypervisor) {
    const MIB: u64 = 1 << 20;
    let Some((vm, file)) = shared_file(hv, 8 * MIB) else {
        return;
    };
    let (lo, hi) = (GPA, GPA + 64 * MIB);
    let _lo_map = bind_through_own_mapping(&*vm, 0, lo, 4 * MIB, &*file, 0);
    let _hi_map = bind_through_own_mapping(&*vm, 1, hi, 4 * MIB, &*file, 4 * MIB);
    let mut cpu = vcpu(&*vm);

    cpu.store_ok(lo, 8, 0xaaaa);
    cpu.store_ok(hi, 8, 0xbbbb);

    assert_eq!(cpu.load_ok(lo, 8), 0xaaaa);
    assert_eq!(cpu.load_ok(hi, 8), 0xbbbb);
}

/// BIND-7: one VM may have many files, each bound to its own slot.
pub fn one_vm_binds_many_files(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let files: Vec<_> = (0..8).map(|_| gmem(&*vm, P, 0)).collect();

    for (i, file) in files.iter().enumerate() {
        let r = vm.set_user_memory_region2(gmem_slot(i as u32, GPA + i as u64 * P, P, &**file, 0));

        ok(r, &format!("slot {i}"));
    }
}

/// BIND-1, BIND-2: the fd names the file, not the number: a dup of a
/// guest_memfd's fd binds the same file.
pub fn bind_through_a_dup_of_the_fd_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);
    // SAFETY: dup of an fd the test owns; the new fd is owned right away.
    let dup = unsafe {
        let fd = libc::dup(file.as_raw_fd());
        assert!(fd >= 0, "dup failed");
        OwnedFd::from_raw_fd(fd)
    };

    let r = vm.set_user_memory_region2(kvm_userspace_memory_region2 {
        guest_memfd: dup.as_raw_fd() as u32,
        ..gmem_slot(0, GPA, P, &*file, 0)
    });

    ok(r, "bind through the dup");
    let again = vm.set_user_memory_region2(gmem_slot(1, GPA + P, P, &*file, 0));
    assert_refused(hv, again, Errno::EINVAL, "BIND-5");
}
