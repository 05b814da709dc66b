//! fallocate on a guest_memfd (docs/spec.md, section 4, FALLOC-*): modes, alignment,
//! allocation and punching holes (guest_memfd_test's fallocate tables).

use crate::support::*;

const KEEP: i32 = FALLOC_FL_KEEP_SIZE;
const PUNCH: i32 = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
/// The file size of these tests.
const SIZE: u64 = 4 * P;

fn file(hv: &dyn Hypervisor) -> (Box<dyn Vm>, Box<dyn GuestMemfd>) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, SIZE, 0);
    (vm, file)
}

/// What a test needs to see the file through the guest.
struct GuestView {
    _vm: Box<dyn Vm>,
    file: Box<dyn GuestMemfd>,
    _mapping: Box<dyn HostMemory>,
    cpu: Box<dyn Vcpu>,
}

/// A default VM with slot 0 over the whole file at `GPA`, or `None` (a
/// recorded skip).
fn guest_view(hv: &dyn Hypervisor) -> Option<GuestView> {
    let (vm, file) = shared_file(hv, SIZE)?;
    let mapping = bind_through_own_mapping(&*vm, 0, GPA, SIZE, &*file, 0);
    let cpu = vcpu(&*vm);
    Some(GuestView {
        _vm: vm,
        file,
        _mapping: mapping,
        cpu,
    })
}

/// FALLOC-1: mode 0 (allocate without KEEP_SIZE) is EOPNOTSUPP.
pub fn allocate_without_keep_size_is_eopnotsupp(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    let r = file.fallocate(0, 0, P as i64);

    assert_refused(hv, r, Errno::EOPNOTSUPP, "FALLOC-1");
}

/// FALLOC-1: PUNCH_HOLE without KEEP_SIZE is EOPNOTSUPP.
pub fn punch_hole_without_keep_size_is_eopnotsupp(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    let r = file.fallocate(FALLOC_FL_PUNCH_HOLE, 0, P as i64);

    assert_refused(hv, r, Errno::EOPNOTSUPP, "FALLOC-1");
}

/// FALLOC-1: modes other than allocate and punch hole are EOPNOTSUPP:
/// ZERO_RANGE, COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, unknown bits.
pub fn other_modes_are_eopnotsupp(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let modes = [
        libc::FALLOC_FL_ZERO_RANGE | KEEP,
        libc::FALLOC_FL_ZERO_RANGE,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
        libc::FALLOC_FL_UNSHARE_RANGE | KEEP,
        0x100 | KEEP,
    ];

    for mode in modes {
        let r = file.fallocate(mode, 0, P as i64);

        assert_refused(hv, r, Errno::EOPNOTSUPP, "FALLOC-1");
    }
}

/// An offset whose sum with [`LEN`] passes 2^63 - 1, the largest file size.
const HUGE_OFFSET: i64 = 0x7fff_ffff_ffff_f000;
/// Two pages.
const LEN: i64 = 2 * P as i64;

/// FALLOC-1, FALLOC-2: `vfs_fallocate` checks the size (EFBIG) before it
/// asks guest_memfd, so a mode that only guest_memfd refuses (no KEEP_SIZE,
/// any mode but allocate and punch hole) is EFBIG when the sum overflows.
pub fn efbig_comes_before_guest_memfds_own_mode_checks(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let modes = [
        0,
        KEEP,
        PUNCH,
        libc::FALLOC_FL_ZERO_RANGE,
        libc::FALLOC_FL_ZERO_RANGE | KEEP,
        libc::FALLOC_FL_UNSHARE_RANGE,
        libc::FALLOC_FL_UNSHARE_RANGE | KEEP,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
        FALLOC_FL_WRITE_ZEROES,
    ];

    for mode in modes {
        let r = file.fallocate(mode, HUGE_OFFSET, LEN);

        assert_refused(hv, r, Errno::EFBIG, "FALLOC-2");
    }
}

/// FALLOC-1, FALLOC-2: the mode checks of `vfs_fallocate` come before the
/// size: unknown bits, two modes at once, PUNCH_HOLE without KEEP_SIZE and
/// the size-changing modes with it are EOPNOTSUPP whatever the range.
pub fn vfs_mode_checks_come_before_efbig(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let modes = [
        FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_COLLAPSE_RANGE | KEEP,
        libc::FALLOC_FL_INSERT_RANGE | KEEP,
        FALLOC_FL_WRITE_ZEROES | KEEP,
        PUNCH | libc::FALLOC_FL_ZERO_RANGE,
        0x04 | KEEP,
        0x100 | KEEP,
        -1,
    ];

    for mode in modes {
        let r = file.fallocate(mode, HUGE_OFFSET, LEN);

        assert_refused(hv, r, Errno::EOPNOTSUPP, "FALLOC-1");
    }
}

/// FALLOC-2: a negative offset or a length of 0 is EINVAL before the mode
/// is looked at.
pub fn offset_and_length_come_before_the_mode(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    for mode in [0, FALLOC_FL_PUNCH_HOLE, 0x100 | KEEP, -1] {
        for (offset, len) in [(-(P as i64), P as i64), (0, 0), (HUGE_OFFSET, -1)] {
            let r = file.fallocate(mode, offset, len);

            assert_refused(hv, r, Errno::EINVAL, "FALLOC-2");
        }
    }
}

/// FALLOC-2: EFBIG comes before guest_memfd's alignment check.
pub fn efbig_comes_before_alignment(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    for (offset, len) in [(i64::MAX - 1, 2), (1, i64::MAX), (HUGE_OFFSET + 1, LEN)] {
        let r = file.fallocate(KEEP, offset, len);

        assert_refused(hv, r, Errno::EFBIG, "FALLOC-2");
    }
}

/// FALLOC-1, FALLOC-2, FALLOC-3: guest_memfd's own checks run in order:
/// KEEP_SIZE, then the mode, then alignment, then (allocate) the end of
/// the file.
pub fn guest_memfds_checks_run_in_order(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let past_end = SIZE as i64 + 1;

    let no_keep = file.fallocate(0, 1, 1);
    let zero = file.fallocate(libc::FALLOC_FL_ZERO_RANGE | KEEP, 1, 1);
    let unaligned = file.fallocate(KEEP, past_end, P as i64);

    assert_refused(hv, no_keep, Errno::EOPNOTSUPP, "FALLOC-1");
    assert_refused(hv, zero, Errno::EOPNOTSUPP, "FALLOC-1");
    assert_refused(hv, unaligned, Errno::EINVAL, "FALLOC-2");
}

/// FALLOC-2: a negative offset is EINVAL, for allocate and punch.
pub fn negative_offset_is_einval(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    for mode in [KEEP, PUNCH] {
        let r = file.fallocate(mode, -(P as i64), P as i64);

        assert_refused(hv, r, Errno::EINVAL, "FALLOC-2");
    }
}

/// FALLOC-2: len 0 or negative is EINVAL, for allocate and punch.
pub fn zero_or_negative_len_is_einval(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    for (mode, len) in [(KEEP, 0), (PUNCH, 0), (KEEP, -(P as i64)), (PUNCH, -1)] {
        let r = file.fallocate(mode, 0, len);

        assert_refused(hv, r, Errno::EINVAL, "FALLOC-2");
    }
}

/// FALLOC-2: the punch-hole alignment table of guest_memfd_test: every
/// unaligned (offset, len) is EINVAL.
pub fn unaligned_punch_hole_is_einval(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let p = P as i64;
    let cases = [
        (0, 1),
        (0, p - 1),
        (0, p + 1),
        (1, 1),
        (1, p - 1),
        (1, p),
        (1, p + 1),
        (p, 1),
        (p, p - 1),
        (p, p + 1),
    ];

    for (offset, len) in cases {
        let r = file.fallocate(PUNCH, offset, len);

        assert_refused(hv, r, Errno::EINVAL, "FALLOC-2");
    }
}

/// FALLOC-2: an unaligned allocation is EINVAL.
pub fn unaligned_allocate_is_einval(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let p = P as i64;

    for (offset, len) in [(0, p - 1), (0, p + 1), (1, p), (p / 2, p)] {
        let r = file.fallocate(KEEP, offset, len);

        assert_refused(hv, r, Errno::EINVAL, "FALLOC-2");
    }
}

/// FALLOC-3: allocating the whole file succeeds.
pub fn allocating_the_whole_file_succeeds(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);

    let r = file.fallocate(KEEP, 0, SIZE as i64);

    ok(r, "allocate [0, size)");
}

/// FALLOC-3: an allocation at or past the end is EINVAL: files never grow.
pub fn allocating_at_or_past_the_end_is_einval(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let (size, p) = (SIZE as i64, P as i64);

    for (offset, len) in [(size, p), (size + p, p), (size - p, 2 * p), (0, size + p)] {
        let r = file.fallocate(KEEP, offset, len);

        assert_refused(hv, r, Errno::EINVAL, "FALLOC-3");
    }
}

/// FALLOC-3: allocating keeps the contents of pages that existed.
pub fn allocating_keeps_existing_contents(hv: &dyn Hypervisor) {
    let Some(mut view) = guest_view(hv) else {
        return;
    };
    view.cpu.store_ok(GPA + P, 8, 0x0102_0304);

    let r = view.file.fallocate(KEEP, 0, SIZE as i64);

    ok(r, "allocate over a written page");
    assert_eq!(view.cpu.load_ok(GPA + P, 8), 0x0102_0304);
}

/// FALLOC-3: newly allocated pages read as zero.
pub fn newly_allocated_pages_read_zero(hv: &dyn Hypervisor) {
    let Some(mut view) = guest_view(hv) else {
        return;
    };

    ok(view.file.fallocate(KEEP, 0, SIZE as i64), "allocate");

    assert_eq!(view.cpu.load_ok(GPA + 3 * P + 8, 8), 0);
}

/// FALLOC-4: punching at and past the end succeeds: no size check.
pub fn punching_at_and_past_the_end_succeeds(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    let (size, p) = (SIZE as i64, P as i64);

    for (offset, len) in [(size, p), (size + p, p), (size - p, 4 * p), (0, 1 << 40)] {
        let r = file.fallocate(PUNCH, offset, len);

        ok(r, &format!("punch offset {offset:#x} len {len:#x}"));
    }
}

/// FALLOC-4: a punched page reads back zero on the next guest access.
pub fn punched_page_reads_zero(hv: &dyn Hypervisor) {
    let Some(mut view) = guest_view(hv) else {
        return;
    };
    view.cpu.store_ok(GPA + P, 8, u64::MAX);

    ok(view.file.fallocate(PUNCH, P as i64, P as i64), "punch");

    assert_eq!(view.cpu.load_ok(GPA + P, 8), 0);
}

/// FALLOC-4: punching leaves the pages around the hole alone.
pub fn punching_spares_neighbouring_pages(hv: &dyn Hypervisor) {
    let Some(mut view) = guest_view(hv) else {
        return;
    };
    for i in 0..4 {
        view.cpu.store_ok(GPA + i * P, 8, 0x100 + i);
    }

    ok(view.file.fallocate(PUNCH, P as i64, 2 * P as i64), "punch");

    let values: Vec<u64> = (0..4).map(|i| view.cpu.load_ok(GPA + i * P, 8)).collect();
    assert_eq!(values, [0x100, 0, 0, 0x103]);
}

/// FALLOC-4, FALLOC-3: a punched hole can be refilled by allocating.
pub fn refilling_a_punched_hole_succeeds(hv: &dyn Hypervisor) {
    let (_vm, file) = file(hv);
    ok(file.fallocate(KEEP, 0, SIZE as i64), "allocate");
    ok(file.fallocate(PUNCH, 0, P as i64), "punch");

    let r = file.fallocate(KEEP, 0, P as i64);

    ok(r, "refill");
}
