//! Kernel releases whose guest_memfd behaviour differs, and what changed in
//! each (`docs/releases.md` gives the sources). The software backend runs as
//! one of them ([`crate::soft::profile`]); a scenario line can give an
//! outcome per release; `gmem caps` tells which release a kernel follows.

use std::fmt;
use std::str::FromStr;

/// A kernel release with its own guest_memfd behaviour, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Release {
    /// 6.18: guest_memfd with `MMAP` and `INIT_SHARED`; attributes per VM.
    #[serde(rename = "6.18")]
    V6_18,
    /// 6.19: NUMA memory policy on guest_memfd mappings.
    #[serde(rename = "6.19")]
    V6_19,
    /// 7.0: `MADV_COLLAPSE` refused on anonymous-inode files in every
    /// build; the default build refused it on guest_memfd before (MMAP-6).
    #[serde(rename = "7.0")]
    V7_0,
    /// 7.1: no guest_memfd uAPI change.
    #[serde(rename = "7.1")]
    V7_1,
    /// 7.2: `EEXIST` for a bound file range, unsigned binding offsets.
    #[serde(rename = "7.2")]
    V7_2,
    /// kvm-x86 with in-place shared/private conversion (not released).
    #[serde(rename = "next")]
    Next,
}

impl Release {
    /// Every release, oldest first.
    pub const ALL: [Release; 6] = [
        Release::V6_18,
        Release::V6_19,
        Release::V7_0,
        Release::V7_1,
        Release::V7_2,
        Release::Next,
    ];

    /// The software backend's default: the release our machines run.
    pub const DEFAULT: Release = Release::V6_18;

    /// `6.18`, ..., `next`.
    pub fn name(self) -> &'static str {
        match self {
            Release::V6_18 => "6.18",
            Release::V6_19 => "6.19",
            Release::V7_0 => "7.0",
            Release::V7_1 => "7.1",
            Release::V7_2 => "7.2",
            Release::Next => "next",
        }
    }

    /// The names, for help texts: `6.18, 6.19, ..., next`.
    pub fn names() -> String {
        Release::ALL.map(Release::name).join(", ")
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Release {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Release::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown release `{s}`; releases: {}", Release::names()))
    }
}

/// One change of guest_memfd behaviour: the rule it touches, the release it
/// landed in and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The rule id (`BIND-5`), or `-` when no rule of ours changed.
    pub rule: &'static str,
    /// The first release that behaves so.
    pub since: Release,
    /// What changed.
    pub what: &'static str,
}

/// Every change after 6.18 that the profiles model, oldest first.
pub const CHANGES: &[Change] = &[
    Change {
        rule: "NUMA-2",
        since: Release::V6_19,
        what: "NUMA policy set with mbind through a guest_memfd mapping belongs to the file by offset, seen through every mapping (was the mapping's own)",
    },
    Change {
        rule: "BIND-5",
        since: Release::V7_2,
        what: "binding a file range that is already bound is EEXIST (was EINVAL)",
    },
    Change {
        rule: "BIND-4",
        since: Release::V7_2,
        what: "binding offsets are unsigned: an offset whose signed sum with the size is negative is EINVAL (was bound)",
    },
    Change {
        rule: "CONV-1",
        since: Release::Next,
        what: "in-place conversion: KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd, attributes per file offset",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_as_they_print_and_are_ordered() {
        for r in Release::ALL {
            assert_eq!(r.name().parse::<Release>(), Ok(r));
        }
        assert!(Release::V6_18 < Release::V7_2 && Release::V7_2 < Release::Next);
        assert!("7.3".parse::<Release>().unwrap_err().contains("6.18, 6.19"));
    }

    #[test]
    fn the_release_notes_name_every_change() {
        let notes = include_str!("../../docs/releases.md");
        for c in CHANGES {
            assert!(
                notes.contains(&format!("| {} | {} |", c.since, c.rule))
                    || notes.contains(&format!("| {} | {}..", c.since, c.rule)),
                "docs/releases.md has no row for {} since {}",
                c.rule,
                c.since
            );
        }
    }
}
