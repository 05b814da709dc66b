//! What the runs reached: operations of the scenario language, and rule ids,
//! from the errors' rule (`... (SLOT-7, EINVAL)`) and from the rules an
//! operation's outcome shows (a guest read that gives a byte went through
//! FAULT-3).

use std::collections::BTreeMap;

use crate::scenario::ast::{Op, Outcome, Scenario};
use crate::scenario::run::ScenarioRun;
use crate::uapi::{KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEM_GUEST_MEMFD};

/// Every operation of the scenario language, as written in a file.
pub const OPERATIONS: &[&str] = &[
    "create_vm",
    "create_guest_memfd",
    "host_memory",
    "mmap",
    "set_memory_region",
    "delete_memory_region",
    "set_memory_attributes",
    "fallocate",
    "host_write",
    "host_read",
    "guest_write",
    "guest_read",
    "guest_map_gpa_range",
    "file_read",
    "file_write",
    "file_pread",
    "file_pwrite",
    "file_lseek",
    "file_ftruncate",
    "file_ioctl",
    "stat",
    "same_inode",
    "check_extension",
    "pre_fault",
    "set_memory_attributes2",
    "pin",
    "mbind",
    "get_mempolicy",
    "madvise",
    "close",
];

/// The operation's name as a file writes it.
pub fn op_name(op: &Op) -> &'static str {
    use crate::scenario::ast::FileOp;
    match op {
        Op::CreateVm { .. } => "create_vm",
        Op::CreateGuestMemfd { .. } => "create_guest_memfd",
        Op::HostMemory { .. } => "host_memory",
        Op::Mmap { .. } => "mmap",
        Op::SetMemoryRegion(r) if r.size == 0 => "delete_memory_region",
        Op::SetMemoryRegion(_) => "set_memory_region",
        Op::SetMemoryAttributes { .. } => "set_memory_attributes",
        Op::Fallocate { .. } => "fallocate",
        Op::HostWrite { .. } => "host_write",
        Op::HostRead { .. } => "host_read",
        Op::GuestWrite { .. } => "guest_write",
        Op::GuestRead { .. } => "guest_read",
        Op::GuestMapGpaRange { .. } => "guest_map_gpa_range",
        Op::File { op, .. } => match op {
            FileOp::Read => "file_read",
            FileOp::Write => "file_write",
            FileOp::Pread => "file_pread",
            FileOp::Pwrite => "file_pwrite",
            FileOp::Lseek => "file_lseek",
            FileOp::Ftruncate(_) => "file_ftruncate",
            FileOp::Ioctl(_) => "file_ioctl",
        },
        Op::Stat { .. } => "stat",
        Op::SameInode { .. } => "same_inode",
        Op::CheckExtension { .. } => "check_extension",
        Op::PreFault { .. } => "pre_fault",
        Op::SetMemoryAttributes2 { .. } => "set_memory_attributes2",
        Op::Pin { .. } => "pin",
        Op::Mbind { .. } => "mbind",
        Op::GetMempolicy { .. } => "get_mempolicy",
        Op::Madvise { .. } => "madvise",
        Op::Close { .. } => "close",
    }
}

/// The rule id an error message names: `... (SLOT-7, EINVAL)` gives
/// `SLOT-7`, a SIGBUS `... (MMAP-3)` gives `MMAP-3`.
pub fn rule_of(detail: &str) -> Option<&str> {
    let open = detail.rfind('(')?;
    let inner = detail[open + 1..].strip_suffix(')')?;
    // A rule that changed in a release names it: `BIND-5 since 7.2`.
    let rule = inner.split(',').next()?.split(' ').next()?.trim();
    let (family, n) = rule.rsplit_once('-')?;
    (!family.is_empty() && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
        || rule == "gmem-safety")
        .then_some(rule)
}

/// The rules a successful or exiting outcome of `op` goes through.
fn exercised(op: &Op, outcome: &Outcome) -> &'static [&'static str] {
    use Outcome as O;
    match (op, outcome) {
        (Op::CreateVm { .. }, O::Ok) => &["LIFE-1", "CAP-2"],
        (Op::CreateGuestMemfd { reserved, .. }, O::Ok) if *reserved != 0 => {
            &["LIFE-2", "CREATE-1", "CREATE-2", "CREATE-3"]
        }
        (Op::CreateGuestMemfd { .. }, O::Ok) => &["LIFE-2", "CREATE-1", "CREATE-2"],
        (Op::SetMemoryRegion(r), O::Ok) if r.size == 0 => &["SLOT-10", "LIFE-4", "INVAL-4"],
        (Op::SetMemoryRegion(r), O::Ok) if r.flags & KVM_MEM_GUEST_MEMFD != 0 => {
            &["LIFE-3", "BIND-6", "BIND-7"]
        }
        (Op::SetMemoryRegion(r), O::Ok) if r.v1 => &["SLOT-1"],
        (Op::SetMemoryAttributes { .. }, O::Ok) => &["ATTR-3", "ATTR-4", "INVAL-3"],
        (Op::Fallocate { mode, .. }, O::Ok) if *mode & libc::FALLOC_FL_PUNCH_HOLE != 0 => {
            &["FALLOC-4", "INVAL-1"]
        }
        (Op::Fallocate { .. }, O::Ok) => &["FALLOC-3"],
        (Op::Mmap { .. }, O::Ok) => &["MMAP-3"],
        (Op::HostRead { .. } | Op::HostWrite { .. }, O::Ok | O::Value { .. }) => &["MMAP-5"],
        (Op::GuestRead { .. } | Op::GuestWrite { .. }, O::Ok | O::Value { .. }) => {
            &["FAULT-3", "FAULT-5"]
        }
        (Op::GuestRead { .. } | Op::GuestWrite { .. }, O::Mmio { .. }) => &["FAULT-2"],
        (Op::GuestRead { .. } | Op::GuestWrite { .. }, O::MemoryFault { flags, .. })
            if *flags != 0 =>
        {
            &["FAULT-1", "FAULT-4", "FAULT-7"]
        }
        (Op::GuestRead { .. } | Op::GuestWrite { .. }, O::MemoryFault { .. }) => {
            &["FAULT-6", "FAULT-7", "LIFE-5", "INVAL-2"]
        }
        (Op::GuestMapGpaRange { .. }, O::Hypercall { .. }) => &["FAULT-8"],
        (Op::Stat { .. } | Op::SameInode { .. }, O::Stat { .. } | O::Value { .. }) => &["CREATE-4"],
        (Op::CheckExtension { cap, .. }, _) if *cap == KVM_CAP_GUEST_MEMFD_FLAGS => {
            &["CAP-1", "CAP-3"]
        }
        (Op::CheckExtension { .. }, _) => &["CAP-1"],
        (Op::PreFault { .. }, O::Value { .. }) => &["PREFAULT-1"],
        (Op::SetMemoryAttributes2 { .. }, O::Ok) => &["CONV-1"],
        (Op::Pin { .. }, O::Ok) => &["CONV-5"],
        (Op::Mbind { .. }, O::Ok) => &["NUMA-1"],
        (Op::GetMempolicy { .. }, O::Policy { .. }) => &["NUMA-2"],
        _ => &[],
    }
}

/// Counts of operations run and rule ids reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Operation name → lines run.
    pub ops: BTreeMap<&'static str, u64>,
    /// Rule id → times reached.
    pub rules: BTreeMap<String, u64>,
}

impl Coverage {
    /// Adds one run of `sc` (lines that did not run count for nothing).
    pub fn add(&mut self, sc: &Scenario, run: &ScenarioRun) {
        for (line, res) in sc.lines.iter().zip(&run.lines) {
            let Some(actual) = &res.actual else { continue };
            *self.ops.entry(op_name(&line.op)).or_default() += 1;
            let from_detail = res.detail.as_deref().and_then(rule_of);
            for rule in exercised(&line.op, actual)
                .iter()
                .copied()
                .chain(from_detail)
            {
                *self.rules.entry(rule.to_string()).or_default() += 1;
            }
        }
    }

    /// (operations reached, operations in the language).
    pub fn ops_reached(&self) -> (usize, usize) {
        (self.ops.len(), OPERATIONS.len())
    }

    /// (rule ids of the specification reached, rule ids in it).
    pub fn rules_reached(&self) -> (usize, usize) {
        let all: Vec<String> = crate::rules::ids().collect();
        let n = all.iter().filter(|r| self.rules.contains_key(*r)).count();
        (n, all.len())
    }

    /// Operations never run.
    pub fn ops_missed(&self) -> Vec<&'static str> {
        OPERATIONS
            .iter()
            .copied()
            .filter(|o| !self.ops.contains_key(o))
            .collect()
    }

    /// Rule ids of the specification never reached.
    pub fn rules_missed(&self) -> Vec<String> {
        crate::rules::ids()
            .filter(|r| !self.rules.contains_key(r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_come_from_error_messages() {
        assert_eq!(
            rule_of("guest_memfd_offset 0x1001 is not page aligned (SLOT-7, EINVAL)"),
            Some("SLOT-7")
        );
        assert_eq!(
            rule_of("SIGBUS at mapping offset 0x0: past the end (MMAP-3)"),
            Some("MMAP-3")
        );
        assert_eq!(
            rule_of("KVM_SET_USER_MEMORY_REGION2 failed (kernel, EINVAL)"),
            None
        );
        assert_eq!(rule_of("range (gmem-safety, EFAULT)"), Some("gmem-safety"));
        assert_eq!(
            rule_of("file pages [0x1, 0x2) are already bound (BIND-5 before 7.2, EINVAL)"),
            Some("BIND-5")
        );
        assert_eq!(rule_of("ino 12"), None);
    }

    #[test]
    fn every_operation_of_the_parser_is_listed() {
        let sc = crate::scenario::parse(
            "t",
            "vm = create_vm\ng = create_guest_memfd vm size=4K\nfile_ioctl g\nfile_ftruncate g size=0\n\
             delete_memory_region vm slot=0\n",
        )
        .unwrap();
        for l in &sc.lines {
            assert!(OPERATIONS.contains(&op_name(&l.op)), "{}", l.text);
        }
    }
}
