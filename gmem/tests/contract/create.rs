//! KVM_CREATE_GUEST_MEMFD (docs/spec.md, section 2): flags, sizes, the file it makes.

use crate::support::*;

/// CREATE-1: every flag bit outside `KVM_CAP_GUEST_MEMFD_FLAGS` is EINVAL,
/// every bit inside it is accepted (guest_memfd_test's flag loop).
pub fn flag_bits_outside_the_flags_cap_are_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let supported = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;

    for bit in 0..64 {
        let flag = 1u64 << bit;
        let r = vm.create_guest_memfd(create_args(P, flag));

        if supported & flag != 0 {
            ok(r, &format!("flag {flag:#x} is in the cap {supported:#x}"));
        } else {
            assert_refused(hv, r, Errno::EINVAL, "CREATE-1");
        }
    }
}

/// CREATE-1: the whole supported mask is accepted at once.
pub fn all_supported_flags_together_are_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let supported = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;

    let file = vm.create_guest_memfd(create_args(P, supported));

    assert_eq!(ok(file, "create with every flag").flags(), supported);
}

/// CREATE-1: INIT_SHARED without MMAP is not refused.
pub fn init_shared_without_mmap_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    if !has_gmem_flags(&*vm, GUEST_MEMFD_FLAG_INIT_SHARED) {
        return;
    }

    let r = vm.create_guest_memfd(create_args(P, GUEST_MEMFD_FLAG_INIT_SHARED));

    ok(r, "INIT_SHARED alone");
}

/// CREATE-1, CAP-3: a VM with private memory refuses INIT_SHARED.
pub fn init_shared_on_a_private_vm_is_einval(hv: &dyn Hypervisor) {
    let Some(vm) = private_vm(hv) else { return };

    let r = vm.create_guest_memfd(create_args(P, MMAP_SHARED));

    assert_refused(hv, r, Errno::EINVAL, "CREATE-1");
}

/// CREATE-2: sizes 1..P-1 are refused (guest_memfd_test).
pub fn sizes_below_a_page_are_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    for size in 1..P {
        let r = vm.create_guest_memfd(create_args(size, 0));

        assert_refused(hv, r, Errno::EINVAL, "CREATE-2");
    }
}

/// CREATE-2: size 0 is EINVAL.
pub fn size_zero_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let r = vm.create_guest_memfd(create_args(0, 0));

    assert_refused(hv, r, Errno::EINVAL, "CREATE-2");
}

/// CREATE-2: a size that is not a multiple of P is EINVAL.
pub fn size_not_a_page_multiple_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    for size in [P + 1, 2 * P - 1, 3 * P + 512] {
        let r = vm.create_guest_memfd(create_args(size, 0));

        assert_refused(hv, r, Errno::EINVAL, "CREATE-2");
    }
}

/// CREATE-2: the size is read as signed: negative sizes are EINVAL.
pub fn negative_size_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    for size in [1u64 << 63, LAST_PAGE] {
        let r = vm.create_guest_memfd(create_args(size, 0));

        assert_refused(hv, r, Errno::EINVAL, "CREATE-2");
    }
}

/// CREATE-2: no upper bound: 1<<62 is accepted and commits no memory.
pub fn size_one_shl_62_is_accepted(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let file = vm.create_guest_memfd(create_args(1 << 62, 0));

    assert_eq!(ok(file, "1<<62 bytes").size(), 1 << 62);
}

/// CREATE-3: reserved[] is not checked.
pub fn reserved_fields_are_not_checked(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let args = kvm_create_guest_memfd {
        size: P,
        flags: 0,
        reserved: [u64::MAX; 6],
    };

    let r = vm.create_guest_memfd(args);

    ok(r, "reserved all ones");
}

/// CREATE-4: two files have distinct inodes and their own sizes.
pub fn two_files_have_distinct_inodes_and_their_own_sizes(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let a = gmem(&*vm, P, 0);
    let b = gmem(&*vm, 4 * P, 0);

    let (sa, sb) = (ok(a.stat(), "fstat a"), ok(b.stat(), "fstat b"));

    assert_ne!(sa.ino, sb.ino);
    assert_eq!(sa.size, P as i64);
    assert_eq!(sb.size, 4 * P as i64);
}

/// CREATE-4: fstat gives st_size, st_blksize = P, a regular file, mode 0600.
pub fn stat_reports_size_blksize_and_a_0600_regular_file(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 8 * P, 0);

    let st = ok(file.stat(), "fstat");

    assert_eq!(st.size, 8 * P as i64);
    assert_eq!(st.blksize, P as i64);
    assert_eq!(st.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(st.mode & 0o777, 0o600);
}

/// CREATE-5: the fd is read-write and large-file.
pub fn fd_is_read_write_and_large_file(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);
    // The kernel's O_LARGEFILE; libc says 0 on 64-bit targets.
    const O_LARGEFILE: i32 = 0o100000;

    // SAFETY: F_GETFL reads the flags of an fd the test owns.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };

    assert!(fl >= 0, "F_GETFL failed");
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDWR);
    assert_ne!(fl & O_LARGEFILE, 0, "flags {fl:#o} lack O_LARGEFILE");
}

/// CREATE-5: the fd is not close-on-exec.
pub fn fd_is_not_close_on_exec(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    // SAFETY: F_GETFD reads the fd flags of an fd the test owns.
    let fd_flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) };

    assert!(fd_flags >= 0, "F_GETFD failed");
    assert_eq!(fd_flags & libc::FD_CLOEXEC, 0);
}

/// CREATE-6: the ioctl exists only on VM fds: on the system fd it fails
/// (EINVAL from /dev/kvm, ENOTTY from a file that knows no ioctls) and no
/// fd is made.
pub fn create_guest_memfd_on_the_system_fd_is_refused(hv: &dyn Hypervisor) {
    const KVM_CREATE_GUEST_MEMFD: libc::c_ulong = 0xC040_AED4;
    let mut args = create_args(P, 0);

    // SAFETY: the ioctl reads and writes the 64-byte struct we pass; on the
    // system fd it must fail, and a returned fd would be closed below.
    let r = unsafe { libc::ioctl(hv.as_raw_fd(), KVM_CREATE_GUEST_MEMFD, &mut args) };
    let errno = Errno::last();

    if r >= 0 {
        // SAFETY: the fd was just returned to us.
        unsafe { libc::close(r) };
        panic!("KVM_CREATE_GUEST_MEMFD on the system fd returned fd {r}");
    }
    assert!(
        matches!(errno, Errno::EINVAL | Errno::ENOTTY),
        "errno {errno:?}"
    );
}

/// CREATE-1, CREATE-2: flags are checked before the size.
pub fn bad_flags_are_refused_before_a_bad_size(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);

    let r = vm.create_guest_memfd(create_args(1, 1 << 63));

    assert_refused(hv, r, Errno::EINVAL, "CREATE-1");
}
