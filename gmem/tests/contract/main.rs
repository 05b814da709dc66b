//! The contract test suite: every rule of docs/spec.md sections 1-8, written once
//! against `&dyn Hypervisor` and run on each backend.
//!
//! Each test is a function `fn(&dyn Hypervisor)` in the module of its spec
//! section; [`contract_tests!`] instantiates it as `soft::<section>::<test>`
//! and `kvm::<section>::<test>`, and [`release_tests!`] the tests whose
//! outcome depends on the release again as `next::soft::...` (the software
//! backend as `next`) and `next::kvm::...`. A test that needs something a backend lacks
//! (a VM type, memory attributes, a creation flag) checks the capability
//! first and records a skip naming it; no test passes silently. The binary
//! prints one summary of the skips, and of the tests that depart from
//! upstream on this kernel, when it exits.

use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

use gmem::scenario::departures::{Departures, Probes};
use gmem::scenario::Limits;
use gmem::soft::SoftHypervisor;
use gmem::{Backend, Hypervisor, Release};

#[path = "../common/skips.rs"]
mod skips;
mod support;

mod attributes;
mod bind;
mod caps;
mod conversion;
mod create;
mod fallocate;
mod faults;
mod file_ops;
mod invalidation;
mod lifetimes;
mod loops;
mod madvise;
mod memslots;
mod mmap;
mod numa;
mod prefault;

/// The departures file: the known behaviours of kernels that depart from
/// upstream, and the contract tests each makes fail.
const DEPARTURES: &str = include_str!("../../../scenarios/departures.toml");

fn departures() -> &'static Departures {
    static D: OnceLock<Departures> = OnceLock::new();
    D.get_or_init(|| Departures::parse(DEPARTURES).expect("scenarios/departures.toml parses"))
}

/// The probes of every behaviour on the running kernel, run once per binary.
fn kvm_probes(hv: &dyn Hypervisor) -> &'static Probes {
    static P: OnceLock<Probes> = OnceLock::new();
    P.get_or_init(|| departures().probe(hv, &Limits::new(64 << 20)))
}

/// Runs `test` (named `section::test`) on `backend` (the software backend
/// as `profile` where one is given), or records why it cannot run there.
///
/// A kvm test listed in departures.toml must fail exactly when the
/// kernel's probes show the behaviours listed for it: it is then recorded
/// as departing; if it passes, the record or the probe is wrong and the test
/// fails. On a kernel whose probes do not show them it must pass. The
/// expectation itself is never weakened.
fn run(backend: Backend, profile: Option<Release>, name: &str, test: fn(&dyn Hypervisor)) {
    if backend == Backend::Kvm && skips::no_kvm() {
        return;
    }
    let hv: Box<dyn Hypervisor> = match profile {
        Some(r) => match SoftHypervisor::with_profile(r) {
            Ok(hv) => Box::new(hv),
            Err(e) => panic!("opening the soft backend as {r}: {e}"),
        },
        None => match backend.open() {
            Ok(hv) => hv,
            Err(e) => panic!("opening the {} backend: {e}", backend.name()),
        },
    };
    let listed = match backend {
        Backend::Kvm => departures().contract_test(name),
        Backend::Soft => None,
    };
    let Some(behaviours) = listed else {
        test(&*hv);
        return;
    };
    let probes = kvm_probes(&*hv);
    let ids: Vec<&str> = behaviours.iter().map(|b| b.id.as_str()).collect();
    if !ids.iter().all(|id| probes.shows(id)) {
        test(&*hv);
        return;
    }
    match panic::catch_unwind(AssertUnwindSafe(|| test(&*hv))) {
        Err(_) => skips::departs(ids.join(", ")),
        Ok(()) => panic!(
            "this kernel's probes show {} (scenarios/departures.toml), listed as making this \
             test fail, but it passes: fix the listing or the probe",
            ids.join(", ")
        ),
    }
}

/// `instances!(backend, profile; section: [test, ...], ...)` makes
/// `section::test` for each test, running `crate::section::test` through
/// [`run`].
macro_rules! instances {
    ($backend:expr, $profile:expr; $($section:ident: [$($test:ident),* $(,)?]),* $(,)?) => {
        $(mod $section {
            $(#[test]
            fn $test() {
                crate::run(
                    $backend,
                    $profile,
                    concat!(stringify!($section), "::", stringify!($test)),
                    crate::$section::$test,
                );
            })*
        })*
    };
}

/// `release_tests! { section: [test, ...] }` makes `next::soft::section::test`
/// (the software backend as `next`) and `next::kvm::section::test`.
macro_rules! release_tests {
    ($($sections:tt)*) => {
        mod next {
            mod soft {
                instances!(gmem::Backend::Soft, Some(gmem::Release::Next); $($sections)*);
            }
            mod kvm {
                instances!(gmem::Backend::Kvm, None; $($sections)*);
            }
        }
    };
}

release_tests! {
    conversion: [
        file_starts_private_and_the_host_faults,
        conversion_keeps_contents_both_ways,
        conversion_touches_only_its_range,
        bad_requests_are_einval,
        pinned_page_is_eagain_with_its_offset,
        guest_access_follows_the_file_page,
        bound_range_errno_follows_the_release,
    ],
    numa: [
        policy_belongs_to_the_mapping_before_6_19_and_to_the_file_since,
        default_through_a_new_mapping_keeps_the_files_policy,
        strict_fails_on_a_mapped_page_that_cannot_move,
    ],
}

/// `contract_tests! { section: [test, ...], ... }` makes
/// `soft::section::test` and `kvm::section::test` for each test.
macro_rules! contract_tests {
    ($($sections:tt)*) => {
        mod soft {
            instances!(gmem::Backend::Soft, None; $($sections)*);
        }
        mod kvm {
            instances!(gmem::Backend::Kvm, None; $($sections)*);
        }
    };
}

contract_tests! {
    lifetimes: [
        vcpu_keeps_the_vm_alive,
        guest_memfd_keeps_the_vm_and_its_slots_alive,
        slot_does_not_keep_its_file_alive,
        slot_records_the_file_and_its_first_index,
        rebinding_a_file_range_sees_the_old_contents,
        released_files_slot_can_still_be_deleted,
        released_files_slot_keeps_its_gfns,
        guest_memfd_stays_usable_after_the_vm_handle_is_dropped,
        vm_object_outlives_its_handle_while_a_file_is_open,
        host_mapping_keeps_the_file_alive_after_close,
        host_mapping_reads_the_file_after_close,
        refused_bind_does_not_leak_the_file,
        handles_dropped_in_any_order_release_cleanly,
    ],
    create: [
        flag_bits_outside_the_flags_cap_are_einval,
        all_supported_flags_together_are_accepted,
        init_shared_without_mmap_is_accepted,
        init_shared_on_a_private_vm_is_einval,
        sizes_below_a_page_are_einval,
        size_zero_is_einval,
        size_not_a_page_multiple_is_einval,
        negative_size_is_einval,
        size_one_shl_62_is_accepted,
        reserved_fields_are_not_checked,
        two_files_have_distinct_inodes_and_their_own_sizes,
        stat_reports_size_blksize_and_a_0600_regular_file,
        fd_is_read_write_and_large_file,
        fd_is_not_close_on_exec,
        create_guest_memfd_on_the_system_fd_is_refused,
        bad_flags_are_refused_before_a_bad_size,
    ],
    memslots: [
        guest_memfd_flag_on_v1_is_einval,
        unsupported_flag_bits_on_v1_are_einval,
        v1_accepts_log_dirty_pages_and_readonly,
        slot_id_nr_memslots_is_einval,
        last_slot_id_is_accepted,
        unknown_flag_bits_on_v2_are_einval,
        guest_memfd_with_log_dirty_pages_is_einval,
        guest_memfd_with_readonly_is_einval,
        memory_size_not_a_page_multiple_is_einval,
        unaligned_guest_phys_addr_is_einval,
        unaligned_userspace_addr_is_einval,
        unaligned_userspace_addr_on_a_guest_memfd_slot_is_einval,
        userspace_range_past_the_user_address_space_is_einval,
        userspace_addr_zero_is_accepted,
        guest_memfd_offsets_below_a_page_are_einval,
        guest_memfd_offset_plus_size_wrapping_is_einval,
        address_space_id_at_the_count_is_einval,
        private_vm_refuses_address_space_1,
        second_address_space_takes_the_same_gfns,
        guest_phys_addr_plus_size_wrapping_is_einval,
        more_than_max_pages_in_a_slot_is_einval,
        deleting_a_missing_slot_is_einval,
        delete_with_guest_memfd_flag_and_fd_minus_one_is_accepted,
        delete_with_flags_zero_removes_a_guest_memfd_slot,
        repeating_a_guest_memfd_slot_request_is_einval,
        changing_a_guest_memfd_slot_without_the_flag_is_einval,
        changing_the_size_of_an_ordinary_slot_is_einval,
        changing_the_userspace_addr_of_an_ordinary_slot_is_einval,
        toggling_readonly_on_an_existing_slot_is_einval,
        identical_request_on_an_ordinary_slot_is_a_no_op,
        flags_only_change_is_accepted,
        new_base_moves_an_ordinary_slot,
        gfns_overlapping_the_lower_half_of_a_neighbour_are_eexist,
        gfns_overlapping_the_upper_half_of_a_neighbour_are_eexist,
        gfns_inside_a_neighbour_are_eexist,
        adjacent_slots_are_accepted,
        moving_a_slot_onto_a_neighbour_is_eexist,
        guest_memfd_slot_over_either_half_of_a_neighbour_is_eexist,
        delete_with_an_unknown_flag_bit_is_einval,
        slot_checks_come_before_the_fd_is_looked_at,
        gfn_overlap_comes_before_the_fd_is_looked_at,
    ],
    bind: [
        bind_to_fd_minus_one_is_ebadf,
        bind_to_a_closed_fd_is_ebadf,
        bind_to_the_system_fd_is_einval,
        bind_to_the_vm_fd_is_einval,
        bind_to_a_plain_memfd_is_einval,
        another_vms_guest_memfd_is_einval,
        own_vm_accepts_the_file_another_vm_refused,
        bind_past_end_of_file_is_einval,
        bind_at_an_offset_past_the_end_is_einval,
        bind_at_a_negative_offset_is_einval,
        bind_ending_exactly_at_end_of_file_is_accepted,
        binding_an_already_bound_file_range_is_einval,
        deleting_a_slot_frees_its_file_range,
        refused_slot_leaves_the_file_range_unbound,
        mmap_file_makes_the_slot_guest_memfd_only,
        file_without_mmap_leaves_shared_accesses_on_userspace_addr,
        two_slots_bind_one_8mib_file_at_0_and_4mib,
        one_vm_binds_many_files,
        bind_through_a_dup_of_the_fd_is_accepted,
    ],
    file_ops: [
        read_is_einval,
        write_is_einval,
        pread_is_espipe,
        pwrite_is_espipe,
        lseek_is_espipe,
        unknown_ioctl_is_enotty,
        ftruncate_is_einval_and_the_size_stays,
    ],
    fallocate: [
        allocate_without_keep_size_is_eopnotsupp,
        punch_hole_without_keep_size_is_eopnotsupp,
        other_modes_are_eopnotsupp,
        efbig_comes_before_guest_memfds_own_mode_checks,
        vfs_mode_checks_come_before_efbig,
        offset_and_length_come_before_the_mode,
        efbig_comes_before_alignment,
        guest_memfds_checks_run_in_order,
        negative_offset_is_einval,
        zero_or_negative_len_is_einval,
        unaligned_punch_hole_is_einval,
        unaligned_allocate_is_einval,
        allocating_the_whole_file_succeeds,
        allocating_at_or_past_the_end_is_einval,
        allocating_keeps_existing_contents,
        newly_allocated_pages_read_zero,
        punching_at_and_past_the_end_succeeds,
        punched_page_reads_zero,
        punching_spares_neighbouring_pages,
        refilling_a_punched_hole_succeeds,
    ],
    mmap: [
        mmap_without_the_mmap_flag_is_enodev,
        private_mapping_is_einval,
        mapping_longer_than_the_file_is_accepted,
        mapping_covers_its_length_rounded_up_to_a_page,
        host_memory_covers_its_length_rounded_up_to_a_page,
        touching_past_the_end_of_the_file_is_sigbus,
        touching_without_init_shared_is_sigbus,
        guest_reads_what_the_host_wrote,
        host_reads_what_the_guest_wrote,
        mapping_at_an_offset_sees_the_file_from_there,
        touched_hole_reads_zero,
        private_mapping_of_a_file_without_mmap_is_enodev,
        mapping_wholly_past_the_end_is_sigbus_on_touch,
        write_across_the_end_stores_every_byte_before_it,
        read_across_the_end_reads_every_byte_before_it,
        write_across_the_end_of_a_mapping_at_an_offset,
        write_without_init_shared_faults_at_its_first_byte,
        offset_past_the_largest_file_offset_is_eoverflow,
        highest_mappable_offset_is_accepted,
    ],
    attributes: [
        nonzero_flags_are_einval,
        private_on_a_vm_without_private_memory_is_einval,
        zero_attributes_are_accepted_on_a_default_vm,
        unsupported_attribute_bits_are_einval,
        size_zero_is_einval,
        wrapping_range_is_einval,
        unaligned_address_or_size_is_einval,
        every_gfn_starts_shared,
        attributes_apply_to_a_slot_created_later,
        attributes_need_no_memslot,
        request_that_changes_nothing_succeeds,
        conversion_switches_the_backing_of_the_next_access,
        conversion_round_trip_keeps_private_data,
        punched_private_range_reads_zero,
        conversion_table_of_the_selftest,
        odd_pages_converted_back_to_shared,
        converting_one_tib_succeeds,
    ],
    faults: [
        default_vm_access_is_never_private,
        private_attribute_makes_the_access_private,
        shared_load_without_a_slot_exits_as_mmio,
        shared_store_without_a_slot_exits_as_mmio,
        private_access_without_a_slot_is_a_memory_fault,
        shared_access_is_served_from_userspace_addr,
        guest_memfd_access_is_served_from_the_file_index,
        private_access_is_served_from_the_file_index,
        private_access_to_a_slot_without_guest_memfd_is_a_memory_fault,
        guest_read_of_a_hole_is_zero,
        access_after_the_file_is_released_is_a_memory_fault,
        private_access_after_the_file_is_released_is_a_memory_fault,
        memory_fault_reports_the_page_and_its_size,
        private_access_after_the_slot_is_deleted_is_a_memory_fault,
        map_gpa_range_exits_as_a_hypercall,
        vmm_converts_what_map_gpa_range_asked_for,
        map_gpa_range_without_the_exit_cap_returns_enosys,
        map_gpa_range_without_the_exit_cap_ignores_bad_arguments,
        map_gpa_range_with_bad_arguments_returns_einval,
        map_gpa_range_of_a_huge_range_exits,
        store_to_a_readonly_slot_exits_as_mmio,
    ],
    invalidation: [
        punch_hole_invalidates_guest_and_host_views,
        punch_hole_reaches_every_binding,
        release_invalidates_every_binding,
        attribute_change_invalidates_cached_translations,
        deleted_slot_is_not_reached,
        guest_access_racing_punch_hole_is_never_torn,
        guest_access_racing_slot_delete_sees_the_slot_or_mmio,
    ],
    loops: [
        fill_writes_the_pattern_the_host_reads,
        verify_counts_the_words_that_differ,
        touch_allocates_every_page_and_keeps_contents,
        loop_stops_at_an_mmio_gap_and_resumes_after_it,
        unaligned_loops_are_einval,
    ],
    prefault: [
        bad_ranges_are_einval,
        whole_range_is_mapped_and_consumed,
        range_past_the_slot_stops_there_and_no_slot_is_enoent,
        private_gfn_without_guest_memfd_is_efault,
    ],
    madvise: [
        collapse_is_einval_and_huge_page_advice_changes_nothing,
        remove_punches_the_file_under_the_range,
        dontneed_keeps_the_files_pages,
        madvise_arguments_are_checked_before_the_range,
        populate_faults_pages_in_up_to_the_first_sigbus,
    ],
    numa: [
        policy_belongs_to_the_mapping_before_6_19_and_to_the_file_since,
        default_through_a_new_mapping_keeps_the_files_policy,
        mbind_arguments_are_checked_as_for_any_memory,
        get_mempolicy_reports_what_mbind_installed,
        strict_fails_on_a_mapped_page_that_cannot_move,
    ],
    caps: [
        guest_memfd_capabilities_are_reported,
        nr_memslots_is_32764,
        memory_attributes_is_zero_on_a_default_vm,
        memory_attributes_is_private_on_a_private_vm,
        exit_hypercall_reports_map_gpa_range,
        last_address_space_takes_a_slot,
        vm_types_has_the_default_type,
        vm_types_bits_match_the_creatable_types,
        guest_memfd_flags_are_mmap_and_init_shared_on_a_default_vm,
        guest_memfd_flags_are_mmap_only_on_a_private_vm,
    ],
}

/// The sources of the contract tests.
const SOURCES: &[(&str, &str)] = &[
    ("attributes", include_str!("attributes.rs")),
    ("bind", include_str!("bind.rs")),
    ("caps", include_str!("caps.rs")),
    ("conversion", include_str!("conversion.rs")),
    ("prefault", include_str!("prefault.rs")),
    ("create", include_str!("create.rs")),
    ("fallocate", include_str!("fallocate.rs")),
    ("faults", include_str!("faults.rs")),
    ("file_ops", include_str!("file_ops.rs")),
    ("invalidation", include_str!("invalidation.rs")),
    ("lifetimes", include_str!("lifetimes.rs")),
    ("loops", include_str!("loops.rs")),
    ("madvise", include_str!("madvise.rs")),
    ("memslots", include_str!("memslots.rs")),
    ("mmap", include_str!("mmap.rs")),
    ("numa", include_str!("numa.rs")),
];

/// Does `text` name `id` as a whole id (`SLOT-1` but not inside `SLOT-12`)?
fn names_id(text: &str, id: &str) -> bool {
    text.match_indices(id).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + id.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

#[test]
fn every_rule_id_of_sections_1_to_8_is_named_by_a_contract_test() {
    let missing: Vec<String> = gmem::rules::ids()
        .filter(|id| !SOURCES.iter().any(|(_, s)| names_id(s, id)))
        .collect();
    assert!(missing.is_empty(), "rule ids no test names: {missing:?}");
}

#[test]
fn every_contract_test_in_departures_toml_exists() {
    for test in departures().contract_tests.iter().map(|t| &t.test) {
        let (section, name) = test.split_once("::").expect("section::test");
        let listed = SOURCES
            .iter()
            .any(|(m, s)| *m == section && s.contains(&format!("pub fn {name}(")));
        assert!(
            listed,
            "scenarios/departures.toml names no contract test {test}"
        );
    }
}

#[test]
fn names_id_matches_whole_ids_only() {
    assert!(names_id("/// SLOT-1: x", "SLOT-1"));
    assert!(!names_id("// covers: SLOT-12", "SLOT-1"));
    assert!(names_id("// covers: SLOT-12, SLOT-1", "SLOT-1"));
}
