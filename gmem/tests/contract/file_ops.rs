//! System calls on a guest_memfd other than fallocate and mmap (docs/spec.md,
//! section 4, FILE-*).

use crate::support::*;

/// FILE-1: read(2) is EINVAL.
pub fn read_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.read(&mut [0; 8]);

    assert_refused(hv, r, Errno::EINVAL, "FILE-1");
}

/// FILE-1: write(2) is EINVAL.
pub fn write_is_einval(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.write(&[0; 8]);

    assert_refused(hv, r, Errno::EINVAL, "FILE-1");
}

/// FILE-1: pread(2) is ESPIPE.
pub fn pread_is_espipe(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.pread(&mut [0; 8], 0);

    assert_refused(hv, r, Errno::ESPIPE, "FILE-1");
}

/// FILE-1: pwrite(2) is ESPIPE.
pub fn pwrite_is_espipe(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.pwrite(&[0; 8], 0);

    assert_refused(hv, r, Errno::ESPIPE, "FILE-1");
}

/// FILE-1: lseek(2) is ESPIPE, whatever the whence.
pub fn lseek_is_espipe(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    for whence in [libc::SEEK_SET, libc::SEEK_CUR, libc::SEEK_END] {
        let r = file.lseek(0, whence);

        assert_refused(hv, r, Errno::ESPIPE, "FILE-1");
    }
}

/// FILE-1: an unknown ioctl is ENOTTY.
pub fn unknown_ioctl_is_enotty(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, P, 0);

    let r = file.ioctl(0xAE00 | 0xff);

    assert_refused(hv, r, Errno::ENOTTY, "FILE-1");
}

/// FILE-2: ftruncate is EINVAL, to any size, and the size stays.
pub fn ftruncate_is_einval_and_the_size_stays(hv: &dyn Hypervisor) {
    let vm = default_vm(hv);
    let file = gmem(&*vm, 4 * P, 0);

    for len in [0, P, 4 * P, 8 * P] {
        let r = file.ftruncate(len as i64);

        assert_refused(hv, r, Errno::EINVAL, "FILE-2");
    }
    assert_eq!(ok(file.stat(), "fstat").size, 4 * P as i64);
}
