//! Release profiles: the software backend behaves as one kernel release
//! (`docs/releases.md`). A [`Profile`] answers, for each behaviour that
//! changed after 6.18, which side of the change this release is on; the
//! code that implements a rule asks it instead of naming releases itself,
//! and names the release in its error (`(BIND-5 since 7.2, EEXIST)`).

use crate::error::Errno;
use crate::Release;

/// The behaviour switches of one release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    release: Release,
}

impl Default for Profile {
    fn default() -> Self {
        Profile::new(Release::DEFAULT)
    }
}

impl Profile {
    /// The profile of `release`.
    pub const fn new(release: Release) -> Self {
        Profile { release }
    }

    /// The release this profile follows.
    pub const fn release(self) -> Release {
        self.release
    }

    const fn since(self, r: Release) -> bool {
        self.release as u8 >= r as u8
    }

    /// BIND-5: binding a file range that is already bound. `EINVAL` until
    /// 7.2, `EEXIST` since (`kvm_gmem_bind`); the rule text names the
    /// release for the error.
    pub fn bound_range_errno(self) -> (Errno, &'static str) {
        if self.since(Release::V7_2) {
            (Errno::EEXIST, "BIND-5 since 7.2")
        } else {
            (Errno::EINVAL, "BIND-5 before 7.2")
        }
    }

    /// BIND-4: `kvm_gmem_bind` compares `offset + size` with the file size
    /// as unsigned values since 7.2. Before, as `loff_t`: an offset below
    /// 2^63 whose sum with the size is negative passed the check.
    pub fn unsigned_bind_offsets(self) -> bool {
        self.since(Release::V7_2)
    }

    /// NUMA-2: guest_memfd keeps NUMA policy in the inode, by file offset,
    /// since 6.19 (`kvm_gmem_set_policy`, `kvm_gmem_get_policy`); before,
    /// each mapping keeps its own.
    pub fn shared_mempolicy(self) -> bool {
        self.since(Release::V6_19)
    }

    /// In-place conversion (CONV-*): attributes per file offset, set on the
    /// guest_memfd fd; the VM attribute ioctl no longer tracks PRIVATE.
    pub fn in_place_conversion(self) -> bool {
        self.since(Release::Next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_flip_at_their_release() {
        assert_eq!(
            Profile::new(Release::V7_1).bound_range_errno().0,
            Errno::EINVAL
        );
        assert_eq!(
            Profile::new(Release::V7_2).bound_range_errno().0,
            Errno::EEXIST
        );
        assert_eq!(
            Profile::new(Release::Next).bound_range_errno().0,
            Errno::EEXIST
        );
        assert!(!Profile::new(Release::V6_18).unsigned_bind_offsets());
        assert!(Profile::new(Release::V7_2).unsigned_bind_offsets());
        assert!(!Profile::new(Release::V6_18).shared_mempolicy());
        assert!(Profile::new(Release::V6_19).shared_mempolicy());
        assert!(!Profile::new(Release::V7_2).in_place_conversion());
        assert!(Profile::new(Release::Next).in_place_conversion());
        assert_eq!(Profile::default().release(), Release::V6_18);
    }
}
