//! Advice on guest_memfd mappings (docs/spec.md, section 4, MMAP-6..MMAP-9):
//! what a VMM's huge-page, discard and preallocation calls do to guest_memfd
//! memory. The same in every release.

use gmem::Advice;

use crate::support::*;

/// One huge page.
const HPAGE: u64 = 2 << 20;

fn advise(m: &dyn HostMemory, offset: u64, len: u64, advice: Advice) {
    ok(
        m.madvise(offset, len, advice),
        &format!("madvise({advice})"),
    );
}

/// MMAP-6: MADV_COLLAPSE is EINVAL on a mapping where nothing else stops a
/// collapse (a huge page at a huge-page boundary, as the kernel selftest
/// test_collapse maps it), with or without MADV_HUGEPAGE first, and the
/// contents stay; the huge-page advice itself succeeds.
pub fn collapse_is_einval_and_huge_page_advice_changes_nothing(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 2 * HPAGE) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let m = ok(g.mmap(0, HPAGE, MapKind::Shared), "mmap one huge page");
    assert_eq!(m.addr() % HPAGE, 0, "the mapping starts on a huge page");
    for page in 0..HPAGE / P {
        host_write(&*m, page * P, &[0x5a]);
    }

    advise(&*m, 0, HPAGE, Advice::Hugepage);
    let after_hugepage = m.madvise(0, HPAGE, Advice::Collapse);
    advise(&*m, 0, HPAGE, Advice::NoHugepage);
    let after_nohugepage = m.madvise(0, HPAGE, Advice::Collapse);
    let empty = m.madvise(0, 0, Advice::Collapse);

    assert_refused(hv, after_hugepage, Errno::EINVAL, "MMAP-6");
    assert_refused(hv, after_nohugepage, Errno::EINVAL, "MMAP-6");
    assert_eq!(empty, Ok(()), "a length of 0 does nothing (MMAP-8)");
    assert_eq!(host_read(&*m, HPAGE - P, 1), [0x5a]);
}

/// MMAP-7: MADV_REMOVE punches the file range under it, counted from the
/// mapping's file offset: every mapping and the guest read zero there, the
/// pages around keep their bytes, a range past the end of the file
/// succeeds, and a file without INIT_SHARED takes it too.
pub fn remove_punches_the_file_under_the_range(hv: &dyn Hypervisor) {
    let Some((vm, g)) = shared_file(hv, 4 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let a = bind_through_own_mapping(&*vm, 0, GPA, 4 * P, &*g, 0);
    let b = ok(
        g.mmap(2 * P as i64, 4 * P, MapKind::Shared),
        "mmap at page 2",
    );
    host_write(&*a, 0, &[0x11; 4 * P as usize]);
    let mut cpu = vcpu(&*vm);
    assert_eq!(cpu.load_ok(GPA + 2 * P, 1), 0x11);

    advise(&*b, 0, P, Advice::Remove);
    let past_end = b.madvise(2 * P, 2 * P, Advice::Remove);

    assert_eq!(host_read(&*a, 2 * P, 1), [0]);
    assert_eq!(cpu.load_ok(GPA + 2 * P, 1), 0, "the guest sees the hole");
    assert_eq!(host_read(&*a, P, 1), [0x11]);
    assert_eq!(host_read(&*b, P, 1), [0x11]);
    assert_eq!(cpu.load_ok(GPA + 3 * P, 1), 0x11);
    assert_eq!(past_end, Ok(()), "past the end of the file, as punch hole");
    let Some((_vm, private)) = file_with_flags(hv, 2 * P, GUEST_MEMFD_FLAG_MMAP) else {
        return;
    };
    let q = ok(
        private.mmap(0, 2 * P, MapKind::Shared),
        "mmap without INIT_SHARED",
    );
    assert_eq!(q.madvise(0, 2 * P, Advice::Remove), Ok(()));
}

/// MMAP-8: MADV_DONTNEED only unmaps: the file keeps its pages, so the same
/// mapping and another read the old bytes; WILLNEED, COLD and PAGEOUT change
/// nothing; FREE is EINVAL. Private anonymous memory loses its pages.
pub fn dontneed_keeps_the_files_pages(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 4 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let a = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap a");
    let b = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap b");
    host_write(&*a, 0, &[0x22; 4 * P as usize]);
    let anon = host(hv, 4 * P);
    host_write(&*anon, 0, &[0x22; 4 * P as usize]);

    advise(&*a, 0, 4 * P, Advice::DontNeed);
    for advice in [Advice::WillNeed, Advice::Cold, Advice::Pageout] {
        advise(&*a, 0, 4 * P, advice);
    }
    let free = a.madvise(0, 4 * P, Advice::Free);
    advise(&*anon, 0, 4 * P, Advice::DontNeed);

    assert_eq!(host_read(&*a, 0, 1), [0x22]);
    assert_eq!(host_read(&*b, 3 * P, 1), [0x22]);
    assert_refused(hv, free, Errno::EINVAL, "MMAP-8");
    assert_eq!(host_read(&*anon, 0, 1), [0], "anonymous memory is dropped");
}

/// MMAP-8: the arguments, for every advice: an unaligned start or a wrapping
/// end is EINVAL, a length of 0 does nothing, a range leaving the mapping is
/// ENOMEM and changes nothing.
pub fn madvise_arguments_are_checked_before_the_range(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 4 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let m = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap");
    host_write(&*m, 0, &[0x33; 4 * P as usize]);

    for advice in Advice::ALL {
        for (offset, len) in [(1, P), (1, 0), (0, u64::MAX - P)] {
            let r = m.madvise(offset, len, advice);
            assert_refused(hv, r, Errno::EINVAL, "MMAP-8");
        }
        for (offset, len) in [(0, 4 * P + 1), (3 * P, 2 * P), (4 * P, P)] {
            let r = m.madvise(offset, len, advice);
            assert_refused(hv, r, Errno::ENOMEM, "MMAP-8");
        }
        assert_eq!(m.madvise(2 * P, 0, advice), Ok(()), "{advice} of length 0");
        assert_eq!(m.madvise(8 * P, 0, advice), Ok(()), "{advice} of length 0");
    }

    assert_eq!(host_read(&*m, 3 * P, 1), [0x33], "nothing was punched");
}

/// MMAP-9: the populate advice faults pages in as touches would, up to the
/// first page a touch would answer with SIGBUS, which is EFAULT: past the
/// end of the file, or any page of a file without INIT_SHARED.
pub fn populate_faults_pages_in_up_to_the_first_sigbus(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 2 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let m = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap past the end");

    advise(&*m, 0, 2 * P, Advice::PopulateWrite);
    advise(&*m, 0, 2 * P, Advice::PopulateRead);
    let across = m.madvise(P, 2 * P, Advice::PopulateRead);
    let past = m.madvise(2 * P, 2 * P, Advice::PopulateWrite);

    assert_eq!(host_read(&*m, P, 1), [0]);
    assert_refused(hv, across, Errno::EFAULT, "MMAP-9");
    assert_refused(hv, past, Errno::EFAULT, "MMAP-9");
    let Some((_vm, private)) = file_with_flags(hv, 2 * P, GUEST_MEMFD_FLAG_MMAP) else {
        return;
    };
    let q = ok(
        private.mmap(0, 2 * P, MapKind::Shared),
        "mmap without INIT_SHARED",
    );
    for advice in [Advice::PopulateRead, Advice::PopulateWrite] {
        assert_refused(hv, q.madvise(0, P, advice), Errno::EFAULT, "MMAP-9");
    }
}
