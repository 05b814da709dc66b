//! What the whole process holds, counted before and after a test's cycles
//! to show they leak nothing (LIFE-8): its open fds and its mappings. A
//! test that counts them runs alone in its own binary.

/// The process's open fds.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The process's mappings.
#[allow(dead_code)]
pub fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}
