//! The rule ids errors cite and tests name: those of sections 1-8 of the
//! specification (`docs/spec.md`), and those of what came after 6.18:
//! `KVM_PRE_FAULT_MEMORY` (PREFAULT), in-place conversion (CONV) and NUMA
//! policy through guest_memfd mappings (NUMA), whose releases
//! `docs/releases.md` gives. When a rule is added, raise its
//! family's count here: the coverage tests then demand a test and a
//! scenario for it, and the docs test its definition.

/// Rule families and how many rules each has: `("SLOT", 12)` is SLOT-1..SLOT-12.
pub const FAMILIES: &[(&str, u32)] = &[
    ("LIFE", 8),
    ("CREATE", 6),
    ("SLOT", 12),
    ("BIND", 7),
    ("FILE", 2),
    ("FALLOC", 4),
    ("MMAP", 9),
    ("ATTR", 6),
    ("FAULT", 8),
    ("INVAL", 5),
    ("CAP", 3),
    ("PREFAULT", 5),
    ("CONV", 8),
    ("NUMA", 4),
];

/// Every rule id, in spec order: `LIFE-1`, ..., `CAP-3`.
pub fn ids() -> impl Iterator<Item = String> {
    FAMILIES
        .iter()
        .flat_map(|(family, n)| (1..=*n).map(move |i| format!("{family}-{i}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn there_are_87_rules() {
        assert_eq!(super::ids().count(), 87);
        assert_eq!(super::ids().next().as_deref(), Some("LIFE-1"));
    }
}
