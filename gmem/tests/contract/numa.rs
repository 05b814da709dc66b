//! NUMA memory policy through guest_memfd mappings (NUMA-*): where it is
//! kept changed in 6.19, so each test asks the backend's release; a running
//! kernel (release unknown) must behave as one release throughout.

use gmem::mempolicy::mems_allowed;
use gmem::{MbindFlags, MemPolicy, ModeFlags, MpolMode, NodeMask, Release};

use crate::support::*;

/// A node with memory this task may use.
fn node() -> NodeMask {
    let allowed = ok(mems_allowed(), "get_mempolicy(MPOL_F_MEMS_ALLOWED)");
    NodeMask::node(allowed.first().expect("a task may use some node"))
}

fn mbind(m: &dyn HostMemory, offset: u64, len: u64, policy: MemPolicy) -> Result<()> {
    m.mbind(offset, len, policy, MbindFlags::empty())
}

fn policy(m: &dyn HostMemory, offset: u64) -> MemPolicy {
    ok(m.get_mempolicy(offset), "get_mempolicy(MPOL_F_ADDR)")
}

/// Does the backend keep the policy per file (6.19 on)? A running kernel
/// says so by what a second mapping of the file reports.
fn per_file(hv: &dyn Hypervisor, other_mapping_sees: MemPolicy, set: MemPolicy) -> bool {
    let per_file = other_mapping_sees == set;
    match hv.release() {
        Some(r) => assert_eq!(
            per_file,
            r >= Release::V6_19,
            "release {r}: another mapping reports {other_mapping_sees}"
        ),
        None => assert!(
            per_file || other_mapping_sees == MemPolicy::default(),
            "another mapping reports {other_mapping_sees}"
        ),
    }
    per_file
}

/// NUMA-2: the policy set through one mapping is that mapping's before 6.19;
/// since, the file's by file offset: every mapping sees it, at the same file
/// page, and it outlives the mapping that set it.
pub fn policy_belongs_to_the_mapping_before_6_19_and_to_the_file_since(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 4 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let a = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap a");
    let b = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap b");
    let c = ok(
        g.mmap(2 * P as i64, 2 * P, MapKind::Shared),
        "mmap c at page 2",
    );
    let bind = MemPolicy::new(MpolMode::Bind, node());
    let interleave = MemPolicy::new(MpolMode::Interleave, node());
    ok(mbind(&*a, 0, 4 * P, bind), "mbind a");
    ok(mbind(&*c, 0, P, interleave), "mbind c, file page 2");
    assert_eq!(policy(&*a, 0), bind);
    let per_file = per_file(hv, policy(&*b, 0), bind);
    let (shared, page2) = if per_file {
        (bind, interleave)
    } else {
        (MemPolicy::default(), MemPolicy::default())
    };
    assert_eq!(policy(&*b, 3 * P), shared);
    assert_eq!(policy(&*b, 2 * P), page2);
    assert_eq!(policy(&*a, 2 * P), if per_file { interleave } else { bind });
    drop((a, b, c));
    let d = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap d after a is gone");
    assert_eq!(policy(&*d, 0), shared, "a new mapping");
    assert_eq!(policy(&*d, 2 * P), page2, "a new mapping, file page 2");
}

/// NUMA-2: a mapping whose policy already equals the request is left alone
/// (mbind_range), so since 6.19 default through a new mapping keeps the
/// file's policy; default through a mapping that had another clears it.
pub fn default_through_a_new_mapping_keeps_the_files_policy(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 2 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let a = ok(g.mmap(0, 2 * P, MapKind::Shared), "mmap a");
    let bind = MemPolicy::new(MpolMode::Bind, node());
    ok(mbind(&*a, 0, 2 * P, bind), "mbind a");
    let b = ok(g.mmap(0, 2 * P, MapKind::Shared), "mmap b");
    ok(
        mbind(&*b, 0, 2 * P, MemPolicy::default()),
        "mbind b default",
    );
    assert_eq!(policy(&*a, 0), bind);
    let per_file = per_file(hv, policy(&*b, 0), bind);
    let local = MemPolicy::new(MpolMode::Local, NodeMask::NONE);
    ok(mbind(&*b, 0, 2 * P, local), "mbind b local");
    ok(
        mbind(&*b, 0, 2 * P, MemPolicy::default()),
        "mbind b default",
    );
    assert_eq!(policy(&*b, 0), MemPolicy::default());
    let a_now = if per_file { MemPolicy::default() } else { bind };
    assert_eq!(policy(&*a, P), a_now);
}

/// NUMA-1: mbind through a guest_memfd mapping checks its arguments as for
/// any memory; a range leaving the mapping is EFAULT.
pub fn mbind_arguments_are_checked_as_for_any_memory(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 4 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let m = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap");
    let n = node();
    let absent = NodeMask(!ok(mems_allowed(), "mems_allowed").0 & 1 << 63);
    let (s, r, b) = (
        ModeFlags::STATIC_NODES,
        ModeFlags::RELATIVE_NODES,
        ModeFlags::NUMA_BALANCING,
    );
    let mut einval = vec![
        MemPolicy::new(MpolMode::Bind, NodeMask::NONE),
        MemPolicy::new(MpolMode::Interleave, NodeMask::NONE),
        MemPolicy::new(MpolMode::Default, n),
        MemPolicy::new(MpolMode::Local, n),
        MemPolicy::new(MpolMode::Preferred, NodeMask::NONE).with_flags(s),
        MemPolicy::new(MpolMode::Bind, n).with_flags(s | r),
        MemPolicy::new(MpolMode::Interleave, n).with_flags(b),
    ];
    if !absent.is_empty() {
        einval.push(MemPolicy::new(MpolMode::Bind, absent));
    }
    for p in einval {
        assert_refused(hv, mbind(&*m, 0, P, p), Errno::EINVAL, "NUMA-1");
    }
    let bind = MemPolicy::new(MpolMode::Bind, n);
    assert_refused(hv, mbind(&*m, 1, P, bind), Errno::EINVAL, "NUMA-1");
    for (offset, len) in [(0, 5 * P), (3 * P, 2 * P), (5 * P, 0)] {
        assert_refused(hv, mbind(&*m, offset, len, bind), Errno::EFAULT, "NUMA-1");
    }
    assert_refused(hv, m.get_mempolicy(4 * P), Errno::EFAULT, "NUMA-1");
    assert_eq!(
        policy(&*m, 0),
        MemPolicy::default(),
        "a refused mbind sets nothing"
    );
    ok(mbind(&*m, 0, 0, bind), "mbind of length 0");
    assert_eq!(
        policy(&*m, 0),
        MemPolicy::default(),
        "length 0 sets nothing"
    );
    ok(mbind(&*m, P, 1, bind), "mbind of one byte");
    assert_eq!(
        (policy(&*m, 0), policy(&*m, P), policy(&*m, 2 * P)),
        (MemPolicy::default(), bind, MemPolicy::default())
    );
    let strict = MbindFlags::STRICT | MbindFlags::MOVE;
    ok(
        m.mbind(0, 4 * P, bind, strict),
        "mbind strict|move before any page exists",
    );
}

/// NUMA-3: get_mempolicy reports the nodes in use (preferred's first, none
/// for local), or the nodes as given when a mode flag is set.
pub fn get_mempolicy_reports_what_mbind_installed(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let m = ok(g.mmap(0, P, MapKind::Shared), "mmap");
    let n = node();
    let more = NodeMask(n.0 | 1 << 63);
    let local = MemPolicy::new(MpolMode::Local, NodeMask::NONE);
    for (set, reported) in [
        (
            MemPolicy::new(MpolMode::Preferred, more),
            MemPolicy::new(MpolMode::Preferred, n),
        ),
        (MemPolicy::new(MpolMode::Preferred, NodeMask::NONE), local),
        (local, local),
        (
            MemPolicy::new(MpolMode::Bind, more).with_flags(ModeFlags::STATIC_NODES),
            MemPolicy::new(MpolMode::Bind, more).with_flags(ModeFlags::STATIC_NODES),
        ),
        (
            MemPolicy::new(MpolMode::PreferredMany, n),
            MemPolicy::new(MpolMode::PreferredMany, n),
        ),
        (
            MemPolicy::new(MpolMode::WeightedInterleave, n),
            MemPolicy::new(MpolMode::WeightedInterleave, n),
        ),
        (MemPolicy::default(), MemPolicy::default()),
    ] {
        ok(mbind(&*m, 0, P, set), &format!("mbind {set}"));
        assert_eq!(policy(&*m, 0), reported, "after mbind {set}");
    }
}

/// NUMA-4: with STRICT, mbind walks the pages the mapping maps. A page on
/// no node of the request (local names none) is EIO and nothing changes;
/// with MOVE a guest_memfd page never moves (an inaccessible mapping's
/// folios do not migrate), so STRICT|MOVE is EIO after the policy is
/// installed, and MOVE alone is no error. A page that only another mapping
/// maps is not this mapping's.
pub fn strict_fails_on_a_mapped_page_that_cannot_move(hv: &dyn Hypervisor) {
    let Some((_vm, g)) = shared_file(hv, 4 * P) else {
        return skip("guest_memfd without MMAP and INIT_SHARED");
    };
    let m = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap m");
    let other = ok(g.mmap(0, 4 * P, MapKind::Shared), "mmap other");
    let local = MemPolicy::new(MpolMode::Local, NodeMask::NONE);
    let anywhere = MemPolicy::new(MpolMode::Bind, ok(mems_allowed(), "mems_allowed"));
    let (strict, moving) = (MbindFlags::STRICT, MbindFlags::MOVE);
    ok(
        m.mbind(0, P, local, strict),
        "strict over a page never mapped",
    );
    m.write(P, &[1]).expect("touch page 1");
    assert_refused(hv, m.mbind(P, P, local, strict), Errno::EIO, "NUMA-4");
    assert_eq!(policy(&*m, P), MemPolicy::default(), "EIO installs nothing");
    ok(
        m.mbind(P, P, anywhere, strict),
        "strict over the nodes the page may be on",
    );
    ok(
        m.mbind(P, P, local, moving),
        "move: the page stays, no error",
    );
    ok(
        m.mbind(P, P, MemPolicy::default(), MbindFlags::empty()),
        "reset",
    );
    assert_refused(
        hv,
        m.mbind(P, P, local, strict | moving),
        Errno::EIO,
        "NUMA-4",
    );
    assert_eq!(policy(&*m, P), local, "installed before the move failed");
    other
        .write(2 * P, &[2])
        .expect("touch page 2 through other");
    ok(
        m.mbind(2 * P, P, local, strict),
        "a page only another mapping maps",
    );
}
