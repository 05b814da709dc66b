//! NUMA memory policy of host memory: `mbind(2)` and `get_mempolicy(2)`
//! with `MPOL_F_ADDR`, as typed values (NUMA-*, `docs/releases.md`).
//!
//! A policy says on which nodes the pages of a range are allocated. Where it
//! is kept depends on the memory (`vma_replace_policy` and
//! `__get_vma_policy` in `mm/mempolicy.c`): a mapping whose `vm_ops` have no
//! `set_policy`/`get_policy` keeps it itself (`vma->vm_policy`): anonymous
//! memory, and guest_memfd before 6.19. One with them keeps it in the inode
//! by file offset, seen through every mapping of the file: shmem, and
//! guest_memfd since 6.19 (`kvm_gmem_set_policy`, `kvm_gmem_get_policy` in
//! `virt/kvm/guest_memfd.c`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Errno, Error, Result};

/// `MPOL_*` of `<linux/mempolicy.h>`: how the pages of a range are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MpolMode {
    /// `MPOL_DEFAULT`: no policy of its own; the allocating task's applies.
    #[default]
    Default = 0,
    /// `MPOL_PREFERRED`: one node first, then any. Without nodes it is
    /// installed as [`MpolMode::Local`].
    Preferred = 1,
    /// `MPOL_BIND`: only these nodes.
    Bind = 2,
    /// `MPOL_INTERLEAVE`: page by page across these nodes.
    Interleave = 3,
    /// `MPOL_LOCAL`: the node of the allocating CPU.
    Local = 4,
    /// `MPOL_PREFERRED_MANY`: these nodes first, then any (5.15).
    PreferredMany = 5,
    /// `MPOL_WEIGHTED_INTERLEAVE`: interleave by per-node weights (6.9).
    WeightedInterleave = 6,
}

impl MpolMode {
    /// Every mode, by number.
    pub const ALL: [MpolMode; 7] = [
        MpolMode::Default,
        MpolMode::Preferred,
        MpolMode::Bind,
        MpolMode::Interleave,
        MpolMode::Local,
        MpolMode::PreferredMany,
        MpolMode::WeightedInterleave,
    ];

    /// `bind`, `preferred_many`, ...: the names scenarios use.
    pub fn name(self) -> &'static str {
        match self {
            MpolMode::Default => "default",
            MpolMode::Preferred => "preferred",
            MpolMode::Bind => "bind",
            MpolMode::Interleave => "interleave",
            MpolMode::Local => "local",
            MpolMode::PreferredMany => "preferred_many",
            MpolMode::WeightedInterleave => "weighted_interleave",
        }
    }

    /// Does the mode take a node mask (all but default and local)?
    pub fn takes_nodes(self) -> bool {
        !matches!(self, MpolMode::Default | MpolMode::Local)
    }
}

bitflags::bitflags! {
    /// The mode flags or-ed into the mode (`MPOL_F_*_NODES`,
    /// `MPOL_F_NUMA_BALANCING`). With any of them the kernel keeps the nodes
    /// as given, and `get_mempolicy` reports those.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ModeFlags: u16 {
        /// `MPOL_F_NUMA_BALANCING`: with bind or preferred_many only.
        const NUMA_BALANCING = 1 << 13;
        /// `MPOL_F_RELATIVE_NODES`: node n is the n-th allowed node.
        const RELATIVE_NODES = 1 << 14;
        /// `MPOL_F_STATIC_NODES`: the nodes as given, never remapped.
        const STATIC_NODES = 1 << 15;
    }

    /// `mbind(2)`'s flags (`MPOL_MF_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MbindFlags: u32 {
        /// `MPOL_MF_STRICT`: fail (EIO) if a page of the range is misplaced.
        const STRICT = 1;
        /// `MPOL_MF_MOVE`: move misplaced pages this process alone maps.
        const MOVE = 2;
        /// `MPOL_MF_MOVE_ALL`: move them all (needs `CAP_SYS_NICE`).
        const MOVE_ALL = 4;
    }
}

const MODE_FLAG_NAMES: [(&str, ModeFlags); 3] = [
    ("static", ModeFlags::STATIC_NODES),
    ("relative", ModeFlags::RELATIVE_NODES),
    ("balancing", ModeFlags::NUMA_BALANCING),
];

/// The names of [`MbindFlags`] in scenarios.
pub const MBIND_FLAG_NAMES: [(&str, MbindFlags); 3] = [
    ("strict", MbindFlags::STRICT),
    ("move", MbindFlags::MOVE),
    ("move_all", MbindFlags::MOVE_ALL),
];

/// A set of NUMA nodes: bit n is node n (nodes 0 to 63). Written as the
/// kernel lists them: `0`, `0-3,8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeMask(pub u64);

impl NodeMask {
    /// No node.
    pub const NONE: NodeMask = NodeMask(0);

    /// Node `n` alone.
    pub const fn node(n: u32) -> NodeMask {
        NodeMask(1 << n)
    }

    /// Is the set empty?
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Is node `n` in the set?
    pub const fn contains(self, n: u32) -> bool {
        n < 64 && self.0 >> n & 1 == 1
    }

    /// The lowest node (`first_node`).
    pub fn first(self) -> Option<u32> {
        (!self.is_empty()).then(|| self.0.trailing_zeros())
    }
}

impl fmt::Display for NodeMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bits = self.0;
        let mut sep = "";
        while bits != 0 {
            let start = bits.trailing_zeros();
            let run = (bits >> start).trailing_ones();
            let end = start + run - 1;
            if run == 1 {
                write!(f, "{sep}{start}")?;
            } else {
                write!(f, "{sep}{start}-{end}")?;
            }
            sep = ",";
            bits &= !(u64::MAX >> (63 - end));
        }
        Ok(())
    }
}

impl FromStr for NodeMask {
    type Err = String;

    /// `0`, `0,2`, `0-3,8`: nodes 0 to 63.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let node = |t: &str| -> std::result::Result<u32, String> {
            t.parse::<u32>()
                .ok()
                .filter(|n| *n < 64)
                .ok_or_else(|| format!("`{t}` is not a node number from 0 to 63"))
        };
        let mut mask = 0u64;
        for part in s.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (node(lo)?, node(hi)?),
                None => (node(part)?, node(part)?),
            };
            if lo > hi {
                return Err(format!("the node range `{part}` runs backwards"));
            }
            mask |= (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        }
        Ok(NodeMask(mask))
    }
}

/// A NUMA memory policy: a mode, its flags and its nodes; what `mbind`
/// takes and what `get_mempolicy` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemPolicy {
    /// The mode.
    pub mode: MpolMode,
    /// Its flags.
    pub flags: ModeFlags,
    /// Its nodes.
    pub nodes: NodeMask,
}

impl MemPolicy {
    /// `mode` over `nodes`, no flags.
    pub const fn new(mode: MpolMode, nodes: NodeMask) -> Self {
        MemPolicy {
            mode,
            flags: ModeFlags::empty(),
            nodes,
        }
    }

    /// The same policy with `flags`.
    pub const fn with_flags(self, flags: ModeFlags) -> Self {
        MemPolicy { flags, ..self }
    }

    /// The mode argument of the syscalls: the mode or-ed with its flags.
    pub fn raw_mode(self) -> i32 {
        self.mode as i32 | i32::from(self.flags.bits())
    }

    /// `MODE[|FLAG]...` (`bind|static`) as scenarios write it.
    pub fn parse_mode(s: &str) -> std::result::Result<(MpolMode, ModeFlags), String> {
        let mut parts = s.split('|');
        let name = parts.next().unwrap_or_default();
        let mode = MpolMode::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = MpolMode::ALL.map(MpolMode::name).into();
                format!("`{name}` is not a policy mode; modes: {}", names.join(", "))
            })?;
        let mut flags = ModeFlags::empty();
        for part in parts {
            let (_, f) = MODE_FLAG_NAMES
                .into_iter()
                .find(|(n, _)| *n == part)
                .ok_or_else(|| {
                    format!("`{part}` is not a mode flag; flags: static, relative, balancing")
                })?;
            flags |= f;
        }
        Ok((mode, flags))
    }
}

impl fmt::Display for MemPolicy {
    /// `bind|static nodes=0-1`, or `default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode.name())?;
        for (name, flag) in MODE_FLAG_NAMES {
            if self.flags.contains(flag) {
                write!(f, "|{name}")?;
            }
        }
        if !self.nodes.is_empty() {
            write!(f, " nodes={}", self.nodes)?;
        }
        Ok(())
    }
}

/// `MPOL_F_ADDR`: `get_mempolicy` reports the policy at an address.
const MPOL_F_ADDR: u64 = 1 << 1;
/// `MPOL_F_MEMS_ALLOWED`: `get_mempolicy` reports the nodes this task may use.
const MPOL_F_MEMS_ALLOWED: u64 = 1 << 2;
/// `mbind`'s `maxnode` for one word of nodes: `get_nodes` reads one bit
/// fewer than it is given.
const MBIND_MAXNODE: u64 = 65;
/// Words of `get_mempolicy`'s node mask: room for the largest
/// `MAX_NUMNODES` (1024), which the kernel requires (`nr_node_ids`).
const GET_WORDS: usize = 16;

/// Refuses a call on `[offset, offset + len)` that leaves the mapping of
/// `map_len` bytes: the kernel would act on whatever memory lies beyond it
/// (NUMA-1, EFAULT).
pub(crate) fn check_range(map_len: u64, offset: u64, len: u64, call: &str) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > map_len) || (len == 0 && offset > map_len) {
        return Err(Error::new(
            Errno::EFAULT,
            "NUMA-1",
            format!(
                "{call} of {len:#x} bytes at offset {offset:#x} leaves the {map_len:#x}-byte mapping"
            ),
        ));
    }
    Ok(())
}

/// `mbind(2)` on `[offset, offset + len)` of the mapping of `map_len` bytes
/// at `addr`, by the running kernel.
pub(crate) fn mbind(
    addr: u64,
    map_len: u64,
    offset: u64,
    len: u64,
    policy: MemPolicy,
    flags: MbindFlags,
) -> Result<()> {
    check_range(map_len, offset, len, "mbind")?;
    let mask = [policy.nodes.0];
    // SAFETY: mbind reads one word of nodes (maxnode 65) and changes only the
    // policy of [addr + offset, + len), which lies in the caller's mapping
    // (checked above); it never writes user memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr + offset,
            len,
            policy.raw_mode(),
            mask.as_ptr(),
            MBIND_MAXNODE,
            flags.bits(),
        )
    };
    if r != 0 {
        return Err(Error::last_os_error(format_args!(
            "mbind({policy}, flags {:#x}) of {len:#x} bytes at offset {offset:#x}",
            flags.bits()
        )));
    }
    Ok(())
}

/// `get_mempolicy(2)` with `MPOL_F_ADDR` at `offset` of the mapping of
/// `map_len` bytes at `addr`, by the running kernel.
pub(crate) fn get_mempolicy(addr: u64, map_len: u64, offset: u64) -> Result<MemPolicy> {
    if offset >= map_len {
        check_range(map_len, offset, 1, "get_mempolicy")?;
    }
    let (mode, mask) = raw_get_mempolicy(addr + offset, MPOL_F_ADDR)
        .map_err(|e| Error::kernel(e, format_args!("get_mempolicy at offset {offset:#x}")))?;
    let mode_bits = mode & 0xff;
    let Some(m) = MpolMode::ALL.into_iter().find(|m| *m as i32 == mode_bits) else {
        return Err(Error::new(
            Errno::EINVAL,
            "kernel",
            format!("get_mempolicy reported mode {mode:#x}, which this crate does not know"),
        ));
    };
    Ok(MemPolicy {
        mode: m,
        flags: ModeFlags::from_bits_truncate((mode & !0xff) as u16),
        nodes: mask,
    })
}

/// The node of each page at `addrs` that is mapped in this process
/// (`move_pages(2)` without target nodes, which only reports): `None` for a
/// page not mapped there.
pub(crate) fn mapped_nodes(addrs: &[u64]) -> Result<Vec<Option<u32>>> {
    if addrs.is_empty() {
        return Ok(Vec::new());
    }
    let pages: Vec<*const libc::c_void> = addrs.iter().map(|a| *a as *const _).collect();
    let mut status = vec![0 as libc::c_int; addrs.len()];
    // SAFETY: with a null node array move_pages moves nothing: it reads
    // `pages` and writes one status per page into `status`, both of
    // `addrs.len()` entries.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            addrs.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if r != 0 {
        return Err(Error::last_os_error("move_pages (query)"));
    }
    Ok(status.into_iter().map(|s| u32::try_from(s).ok()).collect())
}

/// The nodes this task may allocate from (`MPOL_F_MEMS_ALLOWED`: its
/// cpuset's `mems_allowed`).
pub fn mems_allowed() -> Result<NodeMask> {
    raw_get_mempolicy(0, MPOL_F_MEMS_ALLOWED)
        .map(|(_, mask)| mask)
        .map_err(|e| Error::kernel(e, "get_mempolicy(MPOL_F_MEMS_ALLOWED)"))
}

fn raw_get_mempolicy(addr: u64, flags: u64) -> std::result::Result<(i32, NodeMask), Errno> {
    let mut mode: libc::c_int = 0;
    let mut mask = [0u64; GET_WORDS];
    // SAFETY: the kernel writes one int to `mode` and at most GET_WORDS
    // words to `mask` (maxnode is their bit count); it reads nothing else.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            (GET_WORDS * 64) as u64,
            addr,
            flags,
        )
    };
    if r != 0 {
        return Err(Errno::last());
    }
    if mask[1..].iter().any(|w| *w != 0) {
        // Nodes above 63: NodeMask cannot say them.
        return Err(Errno::EOVERFLOW);
    }
    Ok((mode, NodeMask(mask[0])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_print_as_they_parse() {
        for (text, mask) in [
            ("0", 1),
            ("0-2,5", 0b100111),
            ("63", 1 << 63),
            ("0-63", u64::MAX),
            ("1,3", 0b1010),
        ] {
            assert_eq!(text.parse::<NodeMask>(), Ok(NodeMask(mask)), "{text}");
            assert_eq!(NodeMask(mask).to_string(), text);
        }
        for bad in ["", "64", "3-1", "a", "1,", "-1"] {
            assert!(bad.parse::<NodeMask>().is_err(), "{bad}");
        }
    }

    #[test]
    fn policies_print_as_scenarios_write_them() {
        let p = MemPolicy::new(MpolMode::Bind, NodeMask(3)).with_flags(ModeFlags::STATIC_NODES);
        assert_eq!(p.to_string(), "bind|static nodes=0-1");
        assert_eq!(p.raw_mode(), 2 | 1 << 15);
        assert_eq!(MemPolicy::default().to_string(), "default");
        assert_eq!(
            MemPolicy::parse_mode("preferred_many|balancing"),
            Ok((MpolMode::PreferredMany, ModeFlags::NUMA_BALANCING))
        );
        assert!(MemPolicy::parse_mode("bind|sticky").is_err());
        assert!(MemPolicy::parse_mode("firsttouch").is_err());
    }

    #[test]
    fn a_range_leaving_the_mapping_is_efault() {
        assert!(check_range(8192, 0, 8192, "mbind").is_ok());
        assert!(check_range(8192, 8192, 0, "mbind").is_ok());
        for (offset, len) in [(0, 8193), (4096, 8192), (u64::MAX, 2), (8193, 0)] {
            let e = check_range(8192, offset, len, "mbind").unwrap_err();
            assert_eq!((e.errno, e.rule), (Errno::EFAULT, "NUMA-1"));
        }
    }

    #[test]
    fn this_task_may_use_some_node() {
        assert!(!mems_allowed().unwrap().is_empty());
    }
}
