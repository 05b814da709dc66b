//! Host mappings of a guest_memfd (docs/spec.md, section 4, MMAP-*).

use crate::support::*;

#[track_caller]
fn assert_sigbus(r: std::result::Result<(), HostFault>, hv: &dyn Hypervisor, rule: &str) {
    match r {
        Err(HostFault::Sigbus { rule: got, .. }) => {
            if hv.name() == "soft" {
                assert_eq!(got, rule);
            }
        }
        other => panic!("expected SIGBUS ({rule}), got {other:?}"),
    }
}

/// MMAP-1: mmap of a file without MMAP is ENODEV.
pub fn mmap_without_the_mmap_flag_is_enodev(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.mmap(0, P, MapKind::Shared);

    assert_refused(hv, r, Errno::ENODEV, "MMAP-1");
}

/// MMAP-2: a private (copy-on-write) mapping is EINVAL.
pub fn private_mapping_is_einval(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, P, GUEST_MEMFD_FLAG_MMAP) else {
        return;
    };

    let r = file.mmap(0, P, MapKind::Private);

    assert_refused(hv, r, Errno::EINVAL, "MMAP-2");
}

/// MMAP-3: a shared mapping may be longer than the file.
pub fn mapping_longer_than_the_file_is_accepted(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, P, GUEST_MEMFD_FLAG_MMAP) else {
        return;
    };

    let r = file.mmap(0, 4 * P, MapKind::Shared);

    assert_eq!(ok(r, "mmap 4 pages of a 1-page file").len(), 4 * P);
}

/// MMAP-2: a mapping covers its length rounded up to a whole page, as the
/// kernel's VMA does: `len()` says so, the last byte of that page can be
/// written and read back, another mapping sees it, and the next byte is
/// outside the mapping.
pub fn mapping_covers_its_length_rounded_up_to_a_page(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 4 * P, MMAP_SHARED) else {
        return;
    };
    let short = ok(file.mmap(0, 1, MapKind::Shared), "mmap 1 byte");
    let whole = ok(file.mmap(0, P, MapKind::Shared), "mmap 1 page");

    let written = short.write(P - 1, &[0x5a]);
    let mut seen = [0; 2];
    let read_back = short.read(P - 1, &mut seen[..1]);
    let other = whole.read(P - 1, &mut seen[1..]);
    let past = short.write(P, &[1]);

    assert_eq!(short.len(), P);
    assert_eq!((written, read_back, other), (Ok(()), Ok(()), Ok(())));
    assert_eq!(seen, [0x5a, 0x5a]);
    assert!(
        matches!(past, Err(HostFault::OutOfRange { size, .. }) if size == P),
        "{past:?}"
    );
}

/// MMAP-2: host memory, too, covers whole pages.
pub fn host_memory_covers_its_length_rounded_up_to_a_page(hv: &dyn Hypervisor) {
    let mem = ok(hv.host_memory(P + 1), "host memory of P + 1 bytes");

    let written = mem.write(2 * P - 1, &[7]);
    let mut b = [0];
    let read_back = mem.read(2 * P - 1, &mut b);

    assert_eq!(mem.len(), 2 * P);
    assert_eq!((written, read_back, b), (Ok(()), Ok(()), [7]));
}

/// MMAP-3: touching a mapping past the end of the file is SIGBUS, while
/// the part inside the file works (guest_memfd_test).
pub fn touching_past_the_end_of_the_file_is_sigbus(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 2 * P, MMAP_SHARED) else {
        return;
    };
    let mapping = ok(file.mmap(0, 4 * P, MapKind::Shared), "mmap");

    let inside = mapping.write(P, &[1]);
    let read_past = mapping.read(2 * P, &mut [0]);
    let write_past = mapping.write(4 * P - 1, &[1]);

    assert_eq!(inside, Ok(()));
    assert_sigbus(read_past, hv, "MMAP-3");
    assert_sigbus(write_past, hv, "MMAP-3");
}

/// MMAP-4: without INIT_SHARED the mapping succeeds but every touch is
/// SIGBUS: the memory is private to the guest.
pub fn touching_without_init_shared_is_sigbus(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 2 * P, GUEST_MEMFD_FLAG_MMAP) else {
        return;
    };
    let mapping = ok(file.mmap(0, 2 * P, MapKind::Shared), "mmap");

    let read = mapping.read(0, &mut [0]);
    let write = mapping.write(P, &[1]);

    assert_sigbus(read, hv, "MMAP-4");
    assert_sigbus(write, hv, "MMAP-4");
}

/// MMAP-4: with INIT_SHARED the guest reads what the host wrote through
/// a mapping (guest_memfd_test). The slot's userspace_addr is a second
/// mapping of the file (see `bind_through_own_mapping`).
pub fn guest_reads_what_the_host_wrote(hv: &dyn Hypervisor) {
    let Some((vm, file)) = file_with_flags(hv, 2 * P, MMAP_SHARED) else {
        return;
    };
    let _slot_mapping = bind_through_own_mapping(&*vm, 0, GPA, 2 * P, &*file, 0);
    let mapping = ok(file.mmap(0, 2 * P, MapKind::Shared), "mmap");
    let mut cpu = vcpu(&*vm);

    host_write(&*mapping, P + 16, &0x1122_3344_5566_7788u64.to_le_bytes());

    assert_eq!(cpu.load_ok(GPA + P + 16, 8), 0x1122_3344_5566_7788);
}

/// MMAP-4: with INIT_SHARED the host reads what the guest wrote, through
/// a mapping other than the slot's.
pub fn host_reads_what_the_guest_wrote(hv: &dyn Hypervisor) {
    let Some((vm, file)) = file_with_flags(hv, 2 * P, MMAP_SHARED) else {
        return;
    };
    let _slot_mapping = bind_through_own_mapping(&*vm, 0, GPA, 2 * P, &*file, 0);
    let mapping = ok(file.mmap(0, 2 * P, MapKind::Shared), "mmap");
    let mut cpu = vcpu(&*vm);

    cpu.store_ok(GPA + 8, 4, 0xcafe_f00d);

    assert_eq!(host_read(&*mapping, 8, 4), 0xcafe_f00du32.to_le_bytes());
}

/// MMAP-4: a mapping at a file offset sees the file from that offset.
pub fn mapping_at_an_offset_sees_the_file_from_there(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 4 * P, MMAP_SHARED) else {
        return;
    };
    let whole = ok(file.mmap(0, 4 * P, MapKind::Shared), "mmap whole");
    let tail = ok(file.mmap(2 * P as i64, 2 * P, MapKind::Shared), "mmap tail");

    host_write(&*whole, 2 * P + 5, &[0xee]);

    assert_eq!(host_read(&*tail, 5, 1), [0xee]);
}

/// MMAP-5: a hole touched through the mapping reads zero: first touch
/// allocates a zeroed page, and a punched page comes back zeroed.
pub fn touched_hole_reads_zero(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 2 * P, MMAP_SHARED) else {
        return;
    };
    let mapping = ok(file.mmap(0, 2 * P, MapKind::Shared), "mmap");
    let fresh = host_read(&*mapping, P, 8);
    host_write(&*mapping, 0, &[0xff; 8]);

    ok(
        file.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, P as i64),
        "punch",
    );

    assert_eq!(fresh, [0; 8]);
    assert_eq!(host_read(&*mapping, 0, 8), [0; 8]);
}

/// MMAP-1, MMAP-2: a private mapping of a file without MMAP is ENODEV: the
/// MMAP check comes first.
pub fn private_mapping_of_a_file_without_mmap_is_enodev(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.mmap(0, P, MapKind::Private);

    assert_refused(hv, r, Errno::ENODEV, "MMAP-1");
}

/// MMAP-3: a mapping that starts at or past the end of the file is
/// accepted, and every touch of it is SIGBUS.
pub fn mapping_wholly_past_the_end_is_sigbus_on_touch(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, P, MMAP_SHARED) else {
        return;
    };
    let mapping = ok(
        file.mmap(2 * P as i64, P, MapKind::Shared),
        "mmap past the end",
    );

    let read = mapping.read(0, &mut [0]);

    assert_sigbus(read, hv, "MMAP-3");
}

/// Asserts that `r` is SIGBUS at mapping offset `at` (both backends) and,
/// on the software backend, that `rule` raised it.
#[track_caller]
fn assert_sigbus_at(
    r: std::result::Result<(), HostFault>,
    hv: &dyn Hypervisor,
    rule: &str,
    at: u64,
) {
    match r {
        Err(HostFault::Sigbus {
            offset, rule: got, ..
        }) => {
            assert_eq!(offset, at, "SIGBUS at the wrong offset ({rule})");
            if hv.name() == "soft" {
                assert_eq!(got, rule);
            }
        }
        other => panic!("expected SIGBUS ({rule}) at {at:#x}, got {other:?}"),
    }
}

/// MMAP-3: a host write through a mapping that crosses the end of the file
/// stores every byte before the end, then raises SIGBUS at the first byte
/// past it, as `memset` does in guest_memfd_test's `test_fault_overflow`.
pub fn write_across_the_end_stores_every_byte_before_it(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 2 * P, MMAP_SHARED) else {
        return;
    };
    let mapping = ok(file.mmap(0, 4 * P, MapKind::Shared), "mmap 4 pages of 2");

    let r = mapping.write(P + 100, &[0xaa; 3 * P as usize - 100]);

    assert_sigbus_at(r, hv, "MMAP-3", 2 * P);
    assert_eq!(
        host_read(&*mapping, P + 100, P as usize - 100),
        vec![0xaa; P as usize - 100]
    );
    assert_eq!(host_read(&*mapping, 0, 100), vec![0; 100]);
}

/// MMAP-3: a host read across the end of the file reads every byte before
/// the end into the buffer, then raises SIGBUS at the first byte past it.
pub fn read_across_the_end_reads_every_byte_before_it(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 2 * P, MMAP_SHARED) else {
        return;
    };
    let mapping = ok(file.mmap(0, 4 * P, MapKind::Shared), "mmap 4 pages of 2");
    host_write(&*mapping, 2 * P - 8, &[0x5c; 8]);
    let mut buf = vec![0u8; 2 * P as usize];

    let r = mapping.read(P + P / 2, &mut buf);

    assert_sigbus_at(r, hv, "MMAP-3", 2 * P);
    assert_eq!(&buf[P as usize / 2 - 8..P as usize / 2], &[0x5c; 8]);
}

/// MMAP-3: the fault is reported at the first byte past the end, counted
/// from the mapping's start, also for a mapping at a file offset.
pub fn write_across_the_end_of_a_mapping_at_an_offset(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 3 * P, MMAP_SHARED) else {
        return;
    };
    let tail = ok(file.mmap(2 * P as i64, 2 * P, MapKind::Shared), "mmap");
    let whole = ok(file.mmap(0, 3 * P, MapKind::Shared), "mmap whole");

    let r = tail.write(P - 4, &[0x77; 8]);

    assert_sigbus_at(r, hv, "MMAP-3", P);
    assert_eq!(host_read(&*whole, 3 * P - 4, 4), [0x77; 4]);
}

/// MMAP-4: without INIT_SHARED the first byte faults: a write stores
/// nothing, and the fault is at the access's first byte.
pub fn write_without_init_shared_faults_at_its_first_byte(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, 2 * P, GUEST_MEMFD_FLAG_MMAP) else {
        return;
    };
    let mapping = ok(file.mmap(0, 4 * P, MapKind::Shared), "mmap");

    let write = mapping.write(P + 8, &[1; 2 * P as usize]);
    let read = mapping.read(100, &mut [0; 16]);

    assert_sigbus_at(write, hv, "MMAP-4", P + 8);
    assert_sigbus_at(read, hv, "MMAP-4", 100);
}

/// MMAP-2: an offset whose mapping would pass the largest file offset is
/// EOVERFLOW (`do_mmap`, `file_mmap_ok`), checked before guest_memfd is
/// asked: a file without MMAP gives EOVERFLOW there, not ENODEV.
pub fn offset_past_the_largest_file_offset_is_eoverflow(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let plain = gmem(&*vm, P, 0);
    let last = i64::MAX & !(P as i64 - 1);

    let negative = plain.mmap(-(P as i64), P, MapKind::Shared);
    let at_the_top = plain.mmap(last, P, MapKind::Shared);
    let private = plain.mmap(-(P as i64), P, MapKind::Private);

    assert_refused(hv, negative, Errno::EOVERFLOW, "MMAP-2");
    assert_refused(hv, at_the_top, Errno::EOVERFLOW, "MMAP-2");
    assert_refused(hv, private, Errno::EOVERFLOW, "MMAP-2");
}

/// MMAP-2, MMAP-3: the highest offset whose mapping still ends inside the
/// file offset range is accepted (the mapping lies past the end of the
/// file, so every touch is SIGBUS); an unaligned negative offset is EINVAL.
pub fn highest_mappable_offset_is_accepted(hv: &dyn Hypervisor) {
    let Some((_vm, file)) = file_with_flags(hv, P, MMAP_SHARED) else {
        return;
    };
    let highest = (i64::MAX & !(P as i64 - 1)) - P as i64;

    let mapping = ok(file.mmap(highest, P, MapKind::Shared), "mmap at the top");
    let unaligned = file.mmap(-1, P, MapKind::Shared);

    assert_sigbus_at(mapping.read(0, &mut [0]), hv, "MMAP-3", 0);
    assert_refused(hv, unaligned, Errno::EINVAL, "MMAP-2");
}
