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
        rule: "CONV-1..CONV-8",
        since: Release::Next,
        what: "in-place conversion: KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd, attributes per file offset",
    },
    Change {
        rule: "ATTR-1",
        since: Release::Next,
        what: "the VM attribute ioctl refuses PRIVATE on every VM: private-ness belongs to guest_memfd",
    },
    Change {
        rule: "CAP-1",
        since: Release::Next,
        what: "KVM_CAP_MEMORY_ATTRIBUTES answers 0; KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES answers PRIVATE on private VMs",
    },
    Change {
        rule: "CAP-3",
        since: Release::Next,
        what: "INIT_SHARED is offered to VMs with private memory too",
    },
    Change {
        rule: "CREATE-1",
        since: Release::Next,
        what: "a VM with private memory accepts INIT_SHARED",
    },
    Change {
        rule: "BIND-6",
        since: Release::Next,
        what: "every guest_memfd slot is guest_memfd-only, MMAP or not",
    },
    Change {
        rule: "FAULT-1",
        since: Release::Next,
        what: "an access through a guest_memfd slot is private iff its file page is PRIVATE",
    },
    Change {
        rule: "MMAP-4",
        since: Release::Next,
        what: "a file without INIT_SHARED starts private page by page; shared pages can be touched",
    },
];

impl Change {
    /// The rule ids the change touches: `rule` itself, or each id of a
    /// range such as `CONV-1..CONV-8`.
    ///
    /// ```
    /// let c = gmem::release::CHANGES.iter().find(|c| c.rule.starts_with("CONV")).unwrap();
    /// assert_eq!(c.rules().len(), 8);
    /// assert_eq!(c.rules()[7], "CONV-8");
    /// ```
    pub fn rules(&self) -> Vec<String> {
        rule_ids(self.rule)
    }
}

/// The ids `spec` names: `BIND-5`, or a range `CONV-1..CONV-8`.
fn rule_ids(spec: &str) -> Vec<String> {
    let range = spec.split_once("..").and_then(|(a, b)| {
        let (family, first) = a.rsplit_once('-')?;
        let (family_b, last) = b.rsplit_once('-')?;
        let (first, last) = (first.parse::<u32>().ok()?, last.parse::<u32>().ok()?);
        (family == family_b && first <= last).then(|| {
            (first..=last)
                .map(|n| format!("{family}-{n}"))
                .collect::<Vec<_>>()
        })
    });
    range.unwrap_or_else(|| vec![spec.to_string()])
}

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

    /// The rule ids of the rows of `notes` for `release`: the second cell,
    /// a list separated by commas, ranges expanded.
    fn noted(notes: &str, release: Release) -> Vec<String> {
        let start = format!("| {release} | ");
        notes
            .lines()
            .filter_map(|l| l.strip_prefix(&start))
            .filter_map(|rest| rest.split(" |").next())
            .flat_map(|cell| cell.split(", ").flat_map(rule_ids).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn the_release_notes_name_every_change() {
        let notes = include_str!("../../docs/releases.md");
        for c in CHANGES {
            let noted = noted(notes, c.since);
            for id in c.rules() {
                assert!(
                    noted.contains(&id),
                    "docs/releases.md has no row naming {id} since {}",
                    c.since
                );
            }
        }
    }

    #[test]
    fn a_change_missing_from_the_notes_is_found() {
        let notes = "| 7.2 | BIND-5 | x |\n| next | CONV-1..CONV-3, ATTR-1 | y |\n";
        assert_eq!(noted(notes, Release::V7_2), ["BIND-5"]);
        assert_eq!(
            noted(notes, Release::Next),
            ["CONV-1", "CONV-2", "CONV-3", "ATTR-1"]
        );
        assert!(!noted(notes, Release::Next).contains(&"CAP-3".to_string()));
        assert_eq!(rule_ids("BIND-4"), ["BIND-4"]);
    }
}
