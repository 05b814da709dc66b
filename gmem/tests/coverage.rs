//! The corpus covers the specification (docs/spec.md): every rule id of
//! sections 1-8 that a scenario can express is named on some scenario's
//! `# covers:` line, and every case of section 9 (the kernel selftests) on
//! some `# selftest:` line.
//!
//! The rule ids come from `gmem::rules`; tests/docs.rs checks that
//! docs/spec.md defines each of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use gmem::scenario::collect_files;

/// Rules no scenario can express, and why. Each is covered elsewhere.
const NOT_EXPRESSIBLE: &[(&str, &str)] = &[
    (
        "LIFE-8",
        "released exactly once: reference counts and leaks are not outcomes; \
         the backends' leak tests check it",
    ),
    (
        "CREATE-5",
        "the fd's open flags (O_RDWR, O_LARGEFILE, no O_CLOEXEC): the contract \
         hands out owned handles and has no fcntl",
    ),
    (
        "CREATE-6",
        "KVM_CREATE_GUEST_MEMFD on /dev/kvm: the contract offers the call on a \
         VM only, as the kernel's uAPI intends",
    ),
    (
        "ATTR-6",
        "the cost of a conversion is a performance goal, measured by the \
         benchmarks, not an outcome",
    ),
    (
        "INVAL-5",
        "a guest access racing an invalidation: scenarios are sequential; the \
         concurrent stress tests check it",
    ),
];

/// The cases of docs/spec.md section 9, as named on `# selftest:` lines.
const SELFTEST_CASES: &[&str] = &[
    "guest_memfd_test/flags",
    "guest_memfd_test/sizes",
    "guest_memfd_test/inodes",
    "guest_memfd_test/read-write",
    "guest_memfd_test/mmap-refused",
    "guest_memfd_test/mmap-private",
    "guest_memfd_test/mmap-past-end",
    "guest_memfd_test/mmap-no-init-shared",
    "guest_memfd_test/fallocate",
    "guest_memfd_test/punch-alignment",
    "guest_memfd_test/guest-host",
    "guest_memfd_test/guest-userspace-zero",
    "guest_memfd_test/sizes-with-flags",
    "guest_memfd_test/per-flags",
    "guest_memfd_test/mmap-supported",
    "guest_memfd_test/fault-overflow",
    "guest_memfd_test/fault-private",
    "set_memory_region_test/flags",
    "set_memory_region_test/guest-memfd-flags",
    "set_memory_region_test/bind-fds",
    "set_memory_region_test/other-vm",
    "set_memory_region_test/offsets",
    "set_memory_region_test/userspace-zero",
    "set_memory_region_test/two-slots",
    "set_memory_region_test/delete-fd-minus-one",
    "set_memory_region_test/overlap",
    "set_memory_region_test/nr-memslots",
    "private_mem_kvm_exits_test/deleted-slot",
    "private_mem_kvm_exits_test/no-guest-memfd",
    "private_mem_conversions_test/patterns",
    "private_mem_conversions_test/ranges",
    "private_mem_conversions_test/ranges-fallocate",
    "private_mem_conversions_test/odd-pages",
    "private_mem_conversions_test/punch",
    "private_mem_conversions_test/vm-freed",
    "guest_memfd_conversions_test/init-private",
    "guest_memfd_conversions_test/init-shared",
    "guest_memfd_conversions_test/indexing",
    "guest_memfd_conversions_test/before-allocation",
    "guest_memfd_conversions_test/unallocated-folios",
    "guest_memfd_conversions_test/truncate",
    "guest_memfd_conversions_test/forked-accesses",
    "guest_memfd_conversions_test/elevated-refcount",
    "private_mem_conversions_test/punch-ranges",
    "private_mem_conversions_test/memslots",
];

/// Assertions of the v6.18 selftests that no scenario carries, and why.
/// docs/scenarios.md ("What a scenario cannot say") explains the language
/// gaps behind them.
const SELFTEST_NOT_CARRIED: &[(&str, &str)] = &[
    (
        "guest_memfd_test: every byte of a page or file compared (memcmp, memset)",
        "host_read and guest_read move one byte; scenarios check the first, last and a \
         middle byte of each range, and host_write with len writes every byte",
    ),
    (
        "guest_memfd_test: KVM_CAP_GUEST_MEMFD_FLAGS has the MMAP and INIT_SHARED bits",
        "an outcome is one exact value, not a mask; flags-default-vm checks the value 3",
    ),
    (
        "set_memory_region_test: all KVM_CAP_NR_MEMSLOTS slots can be added, one more cannot",
        "the language has no loop, and 32764 slot updates each wait for an SRCU grace \
         period in the kernel (tens of seconds); slot-id checks both ends of the id range",
    ),
    (
        "private_mem_kvm_exits_test: the slot is deleted while the vCPU runs in another thread",
        "scenarios run one operation at a time; deleted-slot-private deletes the slot \
         before the access (the stress tests race deletes against accesses)",
    ),
    (
        "private_mem_conversions_test: several vCPUs converting their own ranges at once (-n)",
        "one vCPU per VM, operations in sequence",
    ),
    (
        "private_mem_conversions_test: the hypercall's attribute word carries the test's own bits",
        "guest_map_gpa_range writes private or shared, not an arbitrary attribute word",
    ),
    (
        "private_mem_conversions_test: shared memory from hugetlbfs or THP (-s)",
        "host_memory is anonymous memory in base pages",
    ),
];

fn all_rules() -> BTreeSet<String> {
    gmem::rules::ids().collect()
}

/// (file, ids on its `# covers:` lines, names on its `# selftest:` lines).
fn corpus_tags() -> Vec<(String, Vec<String>, Vec<String>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    collect_files(&dir)
        .unwrap()
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let mut covers = Vec::new();
            let mut selftests = Vec::new();
            for line in text.lines() {
                if let Some(ids) = line.strip_prefix("# covers:") {
                    covers.extend(ids.split_whitespace().map(String::from));
                }
                if let Some(ids) = line.strip_prefix("# selftest:") {
                    selftests.extend(ids.split_whitespace().map(String::from));
                }
            }
            (f.display().to_string(), covers, selftests)
        })
        .collect()
}

#[test]
fn every_scenario_says_what_it_shows_and_which_rules_it_covers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    for f in collect_files(&dir).unwrap() {
        let text = std::fs::read_to_string(&f).unwrap();
        let header: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
        assert!(
            header.len() >= 2,
            "{}: starts with fewer than two comment lines",
            f.display()
        );
        assert!(
            header.iter().any(|l| l.starts_with("# covers:")),
            "{}: no `# covers:` line in its opening comment",
            f.display()
        );
    }
}

#[test]
fn every_expressible_rule_of_sections_1_to_8_is_covered() {
    let rules = all_rules();
    let mut covered: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, ids, _) in corpus_tags() {
        for id in ids {
            assert!(rules.contains(&id), "{file}: covers unknown rule id {id}");
            covered.entry(id).or_default().push(file.clone());
        }
    }
    for (id, why) in NOT_EXPRESSIBLE {
        assert!(rules.contains(*id), "{id} is not a rule id");
        assert!(!why.is_empty());
        assert!(
            !covered.contains_key(*id),
            "{id} is listed as not expressible but {:?} claim to cover it",
            covered[*id]
        );
    }
    let missing: Vec<&String> = rules
        .iter()
        .filter(|id| !covered.contains_key(*id) && !NOT_EXPRESSIBLE.iter().any(|(n, _)| n == id))
        .collect();
    assert!(missing.is_empty(), "rules no scenario covers: {missing:?}");
}

#[test]
fn selftest_assertions_not_carried_say_why() {
    for (assertion, why) in SELFTEST_NOT_CARRIED {
        assert!(
            assertion.contains("_test"),
            "{assertion}: name the selftest"
        );
        assert!(why.len() > 20, "{assertion}: say why");
    }
}

#[test]
fn every_selftest_case_of_section_9_is_carried_over() {
    let mut seen = BTreeSet::new();
    for (file, _, cases) in corpus_tags() {
        for c in cases {
            assert!(
                SELFTEST_CASES.contains(&c.as_str()),
                "{file}: unknown selftest case {c}"
            );
            seen.insert(c);
        }
    }
    let missing: Vec<&&str> = SELFTEST_CASES
        .iter()
        .filter(|c| !seen.contains(**c))
        .collect();
    assert!(
        missing.is_empty(),
        "section 9 cases without a scenario: {missing:?}"
    );
}
