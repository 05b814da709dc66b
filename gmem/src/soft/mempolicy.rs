//! NUMA memory policy on guest_memfd mappings (NUMA-*), as the profile's
//! release keeps it.
//!
//! The page store is a tmpfs memfd, and shmem always keeps policies in the
//! inode; guest_memfd did so only from 6.19. So the policies are modelled
//! here: [`Mpol`] is what `mbind` installs (`mpol_new`, `mpol_set_nodemask`
//! in `mm/mempolicy.c`), [`Policies`] a map from page index to it, kept per
//! mapping (`vma->vm_policy`) and, since 6.19, per inode
//! (`gmem_inode.policy`). Since 6.19 the request also goes to the store's
//! own mapping, so that shmem allocates the file's pages as the policy says,
//! as `kvm_gmem_get_folio` does; before, guest_memfd allocated by the
//! task's policy (`filemap_grab_folio`) and so does the untouched store.

use std::ops::Range;

use rangemap::RangeMap;

use crate::error::Result;
use crate::mempolicy::{self, MbindFlags, MemPolicy, ModeFlags, MpolMode, NodeMask};
use crate::refuse;
use crate::uapi::{page_aligned, PAGE_SHIFT, PAGE_SIZE};

/// A policy as the kernel holds it (`struct mempolicy`) once `mbind`
/// accepted it. Equality is `__mpol_equal`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mpol {
    mode: MpolMode,
    flags: ModeFlags,
    /// `pol->nodes`: the nodes allocation uses.
    nodes: NodeMask,
    /// `pol->w.user_nodemask`: the nodes as given, kept (and reported)
    /// when a mode flag is set; empty otherwise.
    user_nodes: NodeMask,
}

impl Mpol {
    /// `mpol_new` and `mpol_set_nodemask`: the policy `mbind` installs for
    /// `p` (`None`: the default policy), given the nodes with memory this
    /// task may use.
    fn new(p: MemPolicy, allowed: NodeMask) -> Result<Option<Mpol>> {
        let named = ModeFlags::STATIC_NODES | ModeFlags::RELATIVE_NODES;
        let mode = match p.mode {
            MpolMode::Default if !p.nodes.is_empty() => {
                refuse!(EINVAL, "NUMA-1", "default policy with nodes {}", p.nodes)
            }
            MpolMode::Default => return Ok(None),
            MpolMode::Preferred if p.nodes.is_empty() => {
                if p.flags.intersects(named) {
                    refuse!(
                        EINVAL,
                        "NUMA-1",
                        "preferred without nodes is local allocation, which takes no static or relative flag"
                    );
                }
                MpolMode::Local
            }
            MpolMode::Local if !p.nodes.is_empty() || p.flags.intersects(named) => refuse!(
                EINVAL,
                "NUMA-1",
                "local policy with nodes {} or a static or relative flag",
                p.nodes
            ),
            MpolMode::Local => MpolMode::Local,
            m if p.nodes.is_empty() => refuse!(EINVAL, "NUMA-1", "{} without nodes", m.name()),
            m => m,
        };
        if mode == MpolMode::Local {
            // Not remapped, no nodes of its own (mpol_set_nodemask).
            return Ok(Some(Mpol {
                mode,
                flags: p.flags,
                nodes: NodeMask::NONE,
                user_nodes: NodeMask::NONE,
            }));
        }
        let usable = if p.flags.contains(ModeFlags::RELATIVE_NODES) {
            relative(p.nodes, allowed)
        } else {
            NodeMask(p.nodes.0 & allowed.0)
        };
        let Some(first) = usable.first() else {
            refuse!(
                EINVAL,
                "NUMA-1",
                "{} over nodes {}: none has memory this task may use (nodes {allowed})",
                mode.name(),
                p.nodes
            );
        };
        Ok(Some(Mpol {
            mode,
            flags: p.flags,
            // mpol_new_preferred keeps the first node only.
            nodes: if mode == MpolMode::Preferred {
                NodeMask::node(first)
            } else {
                usable
            },
            user_nodes: if p.flags.is_empty() {
                NodeMask::NONE
            } else {
                p.nodes
            },
        }))
    }

    /// What `get_mempolicy` reports: the mode and its flags, and the nodes
    /// as given when a flag is set, else the nodes in use.
    fn report(this: Option<Mpol>) -> MemPolicy {
        let Some(p) = this else {
            return MemPolicy::default();
        };
        let nodes = if p.flags.is_empty() {
            p.nodes
        } else {
            p.user_nodes
        };
        MemPolicy::new(p.mode, nodes).with_flags(p.flags)
    }
}

/// `mpol_relative_nodemask`: node n of `nodes` means the (n mod
/// weight)-th node of `allowed`.
fn relative(nodes: NodeMask, allowed: NodeMask) -> NodeMask {
    let weight = allowed.0.count_ones();
    if weight == 0 {
        return NodeMask::NONE;
    }
    let allowed_nodes: Vec<u32> = (0..64).filter(|n| allowed.0 >> n & 1 == 1).collect();
    let mut out = 0u64;
    for n in (0..64).filter(|n| nodes.0 >> n & 1 == 1) {
        out |= 1 << allowed_nodes[(n % weight) as usize];
    }
    NodeMask(out)
}

/// The policies of a range of pages, by page index; a page absent has the
/// default policy.
pub(crate) type Policies = RangeMap<u64, Mpol>;

/// Nodes with memory this task may allocate from: the kernel checks a
/// policy's nodes against `cpuset_current_mems_allowed &
/// node_states[N_MEMORY]`.
fn allowed_nodes() -> Result<NodeMask> {
    let allowed = mempolicy::mems_allowed()?;
    let with_memory = std::fs::read_to_string("/sys/devices/system/node/has_memory")
        .ok()
        .and_then(|s| s.trim().parse::<NodeMask>().ok());
    Ok(NodeMask(allowed.0 & with_memory.map_or(u64::MAX, |m| m.0)))
}

/// Does this task have `CAP_SYS_NICE` (`MPOL_MF_MOVE_ALL` needs it)?
fn has_cap_sys_nice() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps >> CAP_SYS_NICE & 1 == 1)
}

/// An `mbind` request that passed its checks: the new policy for a range
/// of the mapping's pages.
pub(crate) struct Request {
    pages: Range<u64>,
    new: Option<Mpol>,
    /// The flags that look at pages; STRICT is dropped for default.
    flags: MbindFlags,
    /// The nodes as given, which `queue_pages_range` finds pages against
    /// (`MPOL_MF_INVERT`): a page on no node of them is misplaced.
    nodes: NodeMask,
}

/// A page the mapping maps, as `queue_folios_pte_range` sees it.
pub(crate) struct MappedPage {
    /// Its node.
    pub(crate) node: u32,
    /// How many host mappings map it (`folio_mapcount`); the guest's
    /// mappings do not count.
    pub(crate) mapcount: usize,
}

/// `kernel_mbind` and `do_mbind` up to the point where the range is
/// changed, checks in their order; `None` when there is nothing to do.
pub(crate) fn check(
    offset: u64,
    len: u64,
    policy: MemPolicy,
    flags: MbindFlags,
) -> Result<Option<Request>> {
    // sanitize_mpol_flags
    if policy
        .flags
        .contains(ModeFlags::STATIC_NODES | ModeFlags::RELATIVE_NODES)
    {
        refuse!(EINVAL, "NUMA-1", "mode flags static and relative together");
    }
    if policy.flags.contains(ModeFlags::NUMA_BALANCING)
        && !matches!(policy.mode, MpolMode::Bind | MpolMode::PreferredMany)
    {
        refuse!(
            EINVAL,
            "NUMA-1",
            "the balancing flag with {}: only bind and preferred_many take it",
            policy.mode.name()
        );
    }
    if !MbindFlags::all().contains(flags) {
        refuse!(
            EINVAL,
            "NUMA-1",
            "mbind flags {:#x}: only STRICT, MOVE and MOVE_ALL exist",
            flags.bits()
        );
    }
    if flags.contains(MbindFlags::MOVE_ALL) && !has_cap_sys_nice() {
        refuse!(EPERM, "NUMA-1", "MPOL_MF_MOVE_ALL without CAP_SYS_NICE");
    }
    if !page_aligned(offset) {
        refuse!(
            EINVAL,
            "NUMA-1",
            "mbind at mapping offset {offset:#x}: not page aligned"
        );
    }
    let pages = len.div_ceil(PAGE_SIZE);
    if pages == 0 {
        return Ok(None);
    }
    let new = Mpol::new(policy, allowed_nodes()?)?;
    let first = offset >> PAGE_SHIFT;
    let flags = if policy.mode == MpolMode::Default {
        flags - MbindFlags::STRICT
    } else {
        flags
    };
    Ok(Some(Request {
        pages: first..first + pages,
        new,
        flags,
        nodes: policy.nodes,
    }))
}

impl Request {
    /// The mapping's pages it applies to.
    pub(crate) fn pages(&self) -> Range<u64> {
        self.pages.clone()
    }

    /// Does it look at the pages at all (`queue_pages_test_walk`: only to
    /// check them, STRICT, or to move them)?
    pub(crate) fn checks_pages(&self) -> bool {
        self.flags
            .intersects(MbindFlags::STRICT | MbindFlags::MOVE | MbindFlags::MOVE_ALL)
    }

    /// `queue_pages_range` over the pages the mapping maps, for a
    /// guest_memfd mapping: how many misplaced pages could not be moved, or
    /// `EIO` with STRICT alone, before anything changes. A misplaced page
    /// is queued when MOVE_ALL, or MOVE and no other host mapping maps it
    /// (`migrate_folio_add`; one it skips is no failure), and every queued
    /// guest_memfd page fails to move: `move_to_new_folio` (mm/migrate.c)
    /// refuses a folio of an inaccessible mapping with EOPNOTSUPP.
    pub(crate) fn unmoved(&self, mapped: &[MappedPage]) -> Result<usize> {
        let misplaced = mapped.iter().filter(|p| !self.nodes.contains(p.node));
        if !self
            .flags
            .intersects(MbindFlags::MOVE | MbindFlags::MOVE_ALL)
        {
            // Strictly unmovable: the first misplaced page ends the walk.
            if let Some(p) = misplaced.clone().next() {
                refuse!(
                    EIO,
                    "NUMA-4",
                    "mbind with STRICT: a page of the range is on node {}, which {}, and STRICT without MOVE moves nothing",
                    p.node,
                    if self.nodes.is_empty() {
                        "the request names no node for".to_string()
                    } else {
                        format!("is not one of nodes {}", self.nodes)
                    }
                );
            }
            return Ok(0);
        }
        let all = self.flags.contains(MbindFlags::MOVE_ALL);
        Ok(misplaced.filter(|p| all || p.mapcount <= 1).count())
    }

    /// `do_mbind`'s verdict once the policy is installed: pages that did
    /// not move are EIO with STRICT (the policy stays).
    pub(crate) fn finish(&self, unmoved: usize) -> Result<()> {
        if unmoved > 0 && self.flags.contains(MbindFlags::STRICT) {
            refuse!(
                EIO,
                "NUMA-4",
                "mbind with STRICT: {unmoved} misplaced guest_memfd page(s) cannot move (the mapping is inaccessible to migration); the policy is installed"
            );
        }
        Ok(())
    }

    /// `mbind_range` and `vma_replace_policy` over the mapping's policies
    /// `vma` and, since 6.19, the inode's `shared`, whose index of the
    /// mapping's first page is `pgoff` (`mpol_set_shared_policy`). A piece of
    /// the mapping whose policy already equals the new one is left alone,
    /// its shared policy included: since 6.19, `default` through a new
    /// mapping does not clear the file's policy.
    pub(crate) fn apply(&self, vma: &mut Policies, mut shared: Option<&mut Policies>, pgoff: u64) {
        let range = self.pages.clone();
        let mut pieces = Vec::new();
        let mut at = range.start;
        for (r, p) in vma.overlapping(&range) {
            let start = r.start.max(range.start);
            if start > at {
                pieces.push((at..start, None));
            }
            let end = r.end.min(range.end);
            pieces.push((start..end, Some(*p)));
            at = end;
        }
        if at < range.end {
            pieces.push((at..range.end, None));
        }
        for (r, current) in pieces {
            if current == self.new {
                continue;
            }
            if let Some(s) = shared.as_deref_mut() {
                set(s, pgoff + r.start..pgoff + r.end, self.new);
            }
            set(vma, r, self.new);
        }
    }
}

fn set(map: &mut Policies, r: Range<u64>, p: Option<Mpol>) {
    match p {
        Some(p) => map.insert(r, p),
        None => map.remove(r),
    }
}

/// What `get_mempolicy(MPOL_F_ADDR)` reports for page `index` of `map`.
pub(crate) fn report(map: &Policies, index: u64) -> MemPolicy {
    Mpol::report(map.get(&index).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Errno;

    const ALL: NodeMask = NodeMask(1);

    fn install(mode: MpolMode, flags: ModeFlags, nodes: u64) -> Result<MemPolicy> {
        let p = MemPolicy::new(mode, NodeMask(nodes)).with_flags(flags);
        Mpol::new(p, ALL).map(Mpol::report)
    }

    #[test]
    fn installed_policies_report_as_the_kernel_does_on_one_node() {
        let none = ModeFlags::empty();
        for (mode, flags, nodes, reported) in [
            (MpolMode::Bind, none, 0b11, "bind nodes=0"),
            (MpolMode::Preferred, none, 0b11, "preferred nodes=0"),
            (MpolMode::Preferred, none, 0, "local"),
            (MpolMode::Local, none, 0, "local"),
            (MpolMode::Default, none, 0, "default"),
            (MpolMode::Interleave, none, 1, "interleave nodes=0"),
            (
                MpolMode::Bind,
                ModeFlags::STATIC_NODES,
                0b11,
                "bind|static nodes=0-1",
            ),
            (
                MpolMode::Bind,
                ModeFlags::RELATIVE_NODES,
                0b10,
                "bind|relative nodes=1",
            ),
            (
                MpolMode::Bind,
                ModeFlags::NUMA_BALANCING,
                1,
                "bind|balancing nodes=0",
            ),
        ] {
            assert_eq!(
                install(mode, flags, nodes).unwrap().to_string(),
                reported,
                "{mode:?} {flags:?} {nodes:#x}"
            );
        }
    }

    #[test]
    fn policies_no_allowed_node_can_serve_are_einval() {
        let none = ModeFlags::empty();
        for (mode, flags, nodes) in [
            (MpolMode::Bind, none, 0b10),
            (MpolMode::Bind, none, 0),
            (MpolMode::Bind, ModeFlags::STATIC_NODES, 0b10),
            (MpolMode::Default, none, 1),
            (MpolMode::Local, none, 1),
            (MpolMode::Preferred, ModeFlags::STATIC_NODES, 0),
        ] {
            let e = install(mode, flags, nodes).unwrap_err();
            assert_eq!((e.errno, e.rule), (Errno::EINVAL, "NUMA-1"), "{e}");
        }
    }

    /// NUMA-1, NUMA-3: the model refuses and reports as the running
    /// kernel's mm/mempolicy.c does, on anonymous memory of this machine.
    #[test]
    fn the_model_agrees_with_the_running_kernel() {
        let m = crate::host::Mmap::anonymous(PAGE_SIZE).unwrap();
        let none = ModeFlags::empty();
        let (s, r, b) = (
            ModeFlags::STATIC_NODES,
            ModeFlags::RELATIVE_NODES,
            ModeFlags::NUMA_BALANCING,
        );
        for mode in MpolMode::ALL {
            for flags in [none, s, r, b, s | r] {
                for nodes in [0, 1, 0b11, 1 << 63, 0b10] {
                    let p = MemPolicy::new(mode, NodeMask(nodes)).with_flags(flags);
                    let real =
                        mempolicy::mbind(m.addr(), PAGE_SIZE, 0, PAGE_SIZE, p, MbindFlags::empty())
                            .and_then(|()| mempolicy::get_mempolicy(m.addr(), PAGE_SIZE, 0));
                    let model = check(0, PAGE_SIZE, p, MbindFlags::empty())
                        .map(|r| Mpol::report(r.and_then(|r| r.new)));
                    match (real, model) {
                        (Ok(a), Ok(b)) => assert_eq!(a, b, "{p}"),
                        (Err(a), Err(b)) => assert_eq!(a.errno, b.errno, "{p}: {a} / {b}"),
                        (a, b) => panic!("{p}: the kernel says {a:?}, the model {b:?}"),
                    }
                }
            }
        }
    }

    /// NUMA-2: since 6.19 the page store holds the file's policy, so shmem
    /// allocates its pages by it; before, it holds none (the task's policy
    /// applies, as `filemap_grab_folio` did). What another mapping reports
    /// is what the store holds, in both.
    #[test]
    fn the_page_store_follows_the_policy_since_6_19() {
        use crate::hypervisor::{Hypervisor, MapKind};
        use crate::uapi::{
            kvm_create_guest_memfd, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
        };
        use crate::Release;
        let node = NodeMask::node(mempolicy::mems_allowed().unwrap().first().unwrap());
        let bind = MemPolicy::new(MpolMode::Bind, node);
        for (release, store) in [
            (Release::V6_18, MemPolicy::default()),
            (Release::V6_19, bind),
        ] {
            let hv = crate::soft::SoftHypervisor::with_profile(release).unwrap();
            let vm = hv.create_vm(0).unwrap();
            let g = vm
                .create_guest_memfd(kvm_create_guest_memfd {
                    size: 2 * PAGE_SIZE,
                    flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                    ..Default::default()
                })
                .unwrap();
            let a = g.mmap(0, 2 * PAGE_SIZE, MapKind::Shared).unwrap();
            let b = g.mmap(0, 2 * PAGE_SIZE, MapKind::Shared).unwrap();
            a.mbind(0, PAGE_SIZE, bind, MbindFlags::empty()).unwrap();
            // The store's own mapping behind b, asked of the running kernel.
            let held = mempolicy::get_mempolicy(b.addr(), b.len(), 0).unwrap();
            assert_eq!(held, store, "{release}: the store's policy");
            assert_eq!(b.get_mempolicy(0).unwrap(), held, "{release}: b reports");
            assert_eq!(a.get_mempolicy(0).unwrap(), bind, "{release}: a reports");
            let unset = mempolicy::get_mempolicy(b.addr(), b.len(), PAGE_SIZE).unwrap();
            assert_eq!(unset, MemPolicy::default(), "{release}: page 1");
        }
    }

    #[test]
    fn relative_nodes_fold_onto_the_allowed_ones() {
        assert_eq!(
            relative(NodeMask(0b110), NodeMask(0b1001)),
            NodeMask(0b1001)
        );
        assert_eq!(relative(NodeMask(1 << 5), NodeMask(1)), NodeMask(1));
    }
}
