//! Shrinking a finding to the shortest scenario that still shows it.
//!
//! Three passes, each kept only where the finding still holds (the caller's
//! oracle runs the candidate):
//!
//! 1. Lines after the line that differs go (they cannot change it), then
//!    the program is sliced to the lines that reach the target through the
//!    handles they share.
//! 2. Delta debugging (Zeller's ddmin) over the remaining lines. Removing a
//!    line that binds a handle removes every later line that uses it, so a
//!    candidate is always a program the parser accepts.
//! 3. Arguments are simplified one at a time (offsets to 0, a page for
//!    sizes, fewer flags), and handles get plain names (`vm`, `g`, `m`, `h`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::scenario::ast::{FdRef, Line, Op, Outcome, Region, Scenario, Userspace};
use crate::uapi::{KVM_MEM_GUEST_MEMFD, PAGE_SIZE};

use super::generate::renumber;

const P: u64 = PAGE_SIZE;

/// How much work a minimization may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Oracle calls at most.
    pub tests: usize,
    /// Wall time at most (checked between oracle calls).
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            tests: 400,
            time: Duration::from_secs(30),
        }
    }
}

/// The result of [`minimize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minimized {
    /// The smallest program found that still shows the finding.
    pub program: Scenario,
    /// Its target line (index), if the finding has one.
    pub target: Option<usize>,
    /// Oracle calls made.
    pub tests: usize,
    /// Wall time spent.
    pub elapsed: Duration,
    /// Did the budget run out before the passes finished?
    pub exhausted: bool,
}

/// The handle names `op` uses (not the one it binds).
pub fn uses(op: &Op) -> Vec<&str> {
    match op {
        Op::CreateVm { .. } | Op::HostMemory { .. } => vec![],
        Op::CreateGuestMemfd { vm, .. }
        | Op::SetMemoryAttributes { vm, .. }
        | Op::GuestWrite { vm, .. }
        | Op::GuestRead { vm, .. }
        | Op::GuestMapGpaRange { vm, .. }
        | Op::PreFault { vm, .. } => vec![vm],
        Op::Mmap { gmem, .. }
        | Op::SetMemoryAttributes2 { gmem, .. }
        | Op::Fallocate { gmem, .. }
        | Op::File { gmem, .. }
        | Op::Stat { gmem } => vec![gmem],
        Op::HostWrite { mem, .. }
        | Op::HostRead { mem, .. }
        | Op::Pin { mem, .. }
        | Op::Mbind { mem, .. }
        | Op::GetMempolicy { mem, .. }
        | Op::Madvise { mem, .. } => vec![mem],
        Op::SetMemoryRegion(r) => {
            let mut v = vec![r.vm.as_str()];
            if let Userspace::Handle(h) = &r.userspace {
                v.push(h);
            }
            if let FdRef::Handle(h) = &r.guest_memfd {
                v.push(h);
            }
            v
        }
        Op::SameInode { a, b } => vec![a, b],
        Op::CheckExtension { vm, .. } => vm.iter().map(String::as_str).collect(),
        Op::Close { handle } => vec![handle],
    }
}

/// Renames every handle `op` uses.
fn rename_uses(op: &mut Op, f: &dyn Fn(&str) -> String) {
    let r = |s: &mut String| *s = f(s);
    match op {
        Op::CreateVm { .. } | Op::HostMemory { .. } => {}
        Op::CreateGuestMemfd { vm, .. }
        | Op::SetMemoryAttributes { vm, .. }
        | Op::GuestWrite { vm, .. }
        | Op::GuestRead { vm, .. }
        | Op::GuestMapGpaRange { vm, .. }
        | Op::PreFault { vm, .. } => r(vm),
        Op::Mmap { gmem, .. }
        | Op::SetMemoryAttributes2 { gmem, .. }
        | Op::Fallocate { gmem, .. }
        | Op::File { gmem, .. }
        | Op::Stat { gmem } => r(gmem),
        Op::HostWrite { mem, .. }
        | Op::HostRead { mem, .. }
        | Op::Pin { mem, .. }
        | Op::Mbind { mem, .. }
        | Op::GetMempolicy { mem, .. }
        | Op::Madvise { mem, .. } => r(mem),
        Op::SetMemoryRegion(reg) => {
            r(&mut reg.vm);
            if let Userspace::Handle(h) = &mut reg.userspace {
                r(h);
            }
            if let FdRef::Handle(h) = &mut reg.guest_memfd {
                r(h);
            }
        }
        Op::SameInode { a, b } => {
            r(a);
            r(b);
        }
        Op::CheckExtension { vm, .. } => {
            if let Some(v) = vm {
                r(v);
            }
        }
        Op::Close { handle } => r(handle),
    }
}

/// The lines of `lines` picked by `keep` (indices, ascending), less every
/// line that uses a handle no kept line binds (or that was closed). `None`
/// when `target` does not survive. Returns the lines and the target's new
/// index.
fn closure(
    lines: &[Line],
    keep: &[usize],
    target: Option<usize>,
) -> Option<(Vec<Line>, Option<usize>)> {
    let mut bound: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    let mut new_target = None;
    for &i in keep {
        let l = &lines[i];
        if uses(&l.op).iter().any(|h| !bound.contains(h)) {
            continue;
        }
        if let Op::Close { handle } = &l.op {
            bound.remove(handle.as_str());
        }
        if let Some(b) = &l.bind {
            bound.insert(b);
        }
        if Some(i) == target {
            new_target = Some(out.len());
        }
        out.push(l.clone());
    }
    if target.is_some() && new_target.is_none() {
        return None;
    }
    Some((out, new_target))
}

/// The lines that reach `target` through shared handles: the target, and
/// (going backwards) every line that uses or binds a handle of a line
/// already taken.
fn slice(lines: &[Line], target: usize) -> Vec<usize> {
    let mut handles: HashSet<String> = HashSet::new();
    let mut take = vec![false; lines.len()];
    take[target] = true;
    handles.extend(uses(&lines[target].op).into_iter().map(String::from));
    // Backwards until nothing changes: a line joins if it touches a handle
    // in the set; its own handles then join the set.
    loop {
        let mut changed = false;
        for i in (0..target).rev() {
            if take[i] {
                continue;
            }
            let l = &lines[i];
            let touches = l.bind.as_ref().is_some_and(|b| handles.contains(b))
                || uses(&l.op).iter().any(|h| handles.contains(*h));
            if touches {
                take[i] = true;
                changed = true;
                handles.extend(uses(&l.op).into_iter().map(String::from));
                if let Some(b) = &l.bind {
                    handles.insert(b.clone());
                }
            }
        }
        if !changed {
            break;
        }
    }
    (0..=target).filter(|i| take[*i]).collect()
}

struct Search<'a, F> {
    holds: F,
    budget: Budget,
    start: Instant,
    tests: usize,
    path: &'a str,
    requires: &'a [crate::scenario::ast::Requirement],
}

impl<F: FnMut(&Scenario, Option<usize>) -> bool> Search<'_, F> {
    fn exhausted(&self) -> bool {
        self.tests >= self.budget.tests || self.start.elapsed() >= self.budget.time
    }

    fn scenario(&self, lines: Vec<Line>) -> Scenario {
        renumber(Scenario {
            path: self.path.to_string(),
            requires: self.requires.to_vec(),
            lines,
        })
    }

    fn test(&mut self, lines: Vec<Line>, target: Option<usize>) -> Option<Scenario> {
        if self.exhausted() {
            return None;
        }
        self.tests += 1;
        let sc = self.scenario(lines);
        (self.holds)(&sc, target).then_some(sc)
    }

    /// Tries `keep` (indices into `lines`); on success the new lines and target.
    fn try_keep(
        &mut self,
        lines: &[Line],
        keep: &[usize],
        target: Option<usize>,
    ) -> Option<(Vec<Line>, Option<usize>)> {
        let (cand, t) = closure(lines, keep, target)?;
        // An empty file is not a scenario.
        if cand.is_empty() || cand.len() >= lines.len() {
            return None;
        }
        let sc = self.test(cand, t)?;
        Some((sc.lines, t))
    }

    fn ddmin(
        &mut self,
        mut lines: Vec<Line>,
        mut target: Option<usize>,
    ) -> (Vec<Line>, Option<usize>) {
        let mut n = 2usize;
        loop {
            let removable: Vec<usize> = (0..lines.len()).filter(|i| Some(*i) != target).collect();
            if removable.is_empty() || self.exhausted() {
                break;
            }
            let n_eff = n.min(removable.len());
            let chunk = removable.len().div_ceil(n_eff);
            let mut reduced = false;
            for part in removable.chunks(chunk) {
                let keep: Vec<usize> = (0..lines.len()).filter(|i| !part.contains(i)).collect();
                if let Some((l, t)) = self.try_keep(&lines, &keep, target) {
                    lines = l;
                    target = t;
                    n = (n_eff - 1).max(2);
                    reduced = true;
                    break;
                }
                if self.exhausted() {
                    break;
                }
            }
            if !reduced {
                if n_eff >= removable.len() {
                    break;
                }
                n = (n_eff * 2).min(removable.len());
            }
        }
        (lines, target)
    }

    fn simplify(&mut self, mut lines: Vec<Line>, target: Option<usize>) -> Vec<Line> {
        loop {
            let mut changed = false;
            for i in 0..lines.len() {
                for op in simpler(&lines[i].op) {
                    if self.exhausted() {
                        return lines;
                    }
                    let mut cand = lines.clone();
                    cand[i].op = op;
                    if let Some(sc) = self.test(cand, target) {
                        lines = sc.lines;
                        changed = true;
                        break;
                    }
                }
            }
            if !changed {
                return lines;
            }
        }
    }
}

/// Simpler versions of `op`, most promising first.
fn simpler(op: &Op) -> Vec<Op> {
    let mut out = Vec::new();
    let mut push = |o: Op| {
        if &o != op && !out.contains(&o) {
            out.push(o);
        }
    };
    match op {
        Op::CreateGuestMemfd {
            vm,
            size,
            flags,
            reserved,
        } => {
            let v = |size, flags, reserved| Op::CreateGuestMemfd {
                vm: vm.clone(),
                size,
                flags,
                reserved,
            };
            push(v(*size, *flags, 0));
            if *size > P && size % P == 0 {
                push(v(P, *flags, *reserved));
                push(v((size / 2) & !(P - 1), *flags, *reserved));
            }
            for bit in 0..64 {
                if flags >> bit & 1 == 1 {
                    push(v(*size, flags & !(1 << bit), *reserved));
                }
            }
        }
        Op::HostMemory { size } if *size > P => push(Op::HostMemory { size: P }),
        Op::Mmap {
            gmem,
            offset,
            size,
            private,
        } => {
            let v = |offset, size| Op::Mmap {
                gmem: gmem.clone(),
                offset,
                size,
                private: *private,
            };
            push(v(*offset, None));
            push(v(0, *size));
            push(v(0, None));
        }
        Op::SetMemoryRegion(r) => {
            let v = |f: &dyn Fn(&mut Region)| {
                let mut r = r.clone();
                f(&mut r);
                Op::SetMemoryRegion(r)
            };
            if r.size != 0 {
                push(v(&|r| r.userspace = Userspace::Addr(0)));
                push(v(&|r| r.userspace_offset = 0));
                push(v(&|r| r.offset = 0));
                push(v(&|r| r.size = P));
                push(v(&|r| r.as_id = 0));
                push(v(&|r| r.v1 = false));
                push(v(&|r| r.flags &= KVM_MEM_GUEST_MEMFD));
                push(v(&|r| {
                    r.flags = 0;
                    r.guest_memfd = FdRef::Raw(0);
                    r.offset = 0;
                }));
            } else {
                push(v(&|r| r.flags = 0));
                push(v(&|r| r.gpa = 0));
            }
        }
        Op::Fallocate {
            gmem,
            mode,
            offset,
            len,
        } => {
            let v = |offset, len| Op::Fallocate {
                gmem: gmem.clone(),
                mode: *mode,
                offset,
                len,
            };
            push(v(0, *len));
            push(v(*offset, P as i64));
        }
        Op::HostWrite {
            mem,
            offset,
            byte,
            len,
        } => {
            let v = |offset, len| Op::HostWrite {
                mem: mem.clone(),
                offset,
                byte: *byte,
                len,
            };
            push(v(*offset, 1));
            push(v(0, *len));
        }
        Op::HostRead { mem, .. } => push(Op::HostRead {
            mem: mem.clone(),
            offset: 0,
        }),
        Op::GuestMapGpaRange {
            vm, gpa, private, ..
        } => push(Op::GuestMapGpaRange {
            vm: vm.clone(),
            gpa: *gpa,
            pages: 1,
            private: *private,
        }),
        _ => {}
    }
    out
}

/// Gives handles plain names in order of binding: `vm`, `vm2`, `g`, `g2`,
/// `m`, `h`, ...
fn canonical_names(lines: &[Line]) -> Vec<Line> {
    let mut names: HashMap<String, String> = HashMap::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in lines {
        let Some(b) = &l.bind else { continue };
        let prefix = match &l.op {
            Op::CreateVm { .. } => "vm",
            Op::CreateGuestMemfd { .. } => "g",
            Op::Mmap { .. } => "m",
            Op::Pin { .. } => "p",
            _ => "h",
        };
        let n = counts.entry(prefix).or_default();
        *n += 1;
        let name = if *n == 1 {
            prefix.to_string()
        } else {
            format!("{prefix}{n}")
        };
        names.insert(b.clone(), name);
    }
    let map = |s: &str| names.get(s).cloned().unwrap_or_else(|| s.to_string());
    lines
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l.bind = l.bind.as_deref().map(map);
            rename_uses(&mut l.op, &map);
            l
        })
        .collect()
}

/// Shrinks `program` while `holds(candidate, target)` stays true; `target`
/// is the index of the line that shows the finding (kept in every
/// candidate, and given to the oracle at its new index), or `None` when
/// the finding is about the whole program (a panic, a leak). `holds` must
/// be true of `program` itself.
pub fn minimize(
    program: &Scenario,
    target: Option<usize>,
    budget: Budget,
    holds: impl FnMut(&Scenario, Option<usize>) -> bool,
) -> Minimized {
    let mut s = Search {
        holds,
        budget,
        start: Instant::now(),
        tests: 0,
        path: &program.path,
        requires: &program.requires,
    };
    let mut lines = program.lines.clone();
    let mut target = target;
    // 1. Nothing after the target can change it.
    if let Some(t) = target {
        if t + 1 < lines.len() {
            if let Some(sc) = s.test(lines[..=t].to_vec(), target) {
                lines = sc.lines;
            }
        }
        if let Some(t) = target {
            let keep = slice(&lines, t);
            if let Some((l, nt)) = s.try_keep(&lines, &keep, target) {
                lines = l;
                target = nt;
            }
        }
    }
    // 2. ddmin, then 3. arguments, again while either finds something;
    // then names.
    let (mut l, mut t) = (lines, target);
    loop {
        let before = l.clone();
        (l, t) = s.ddmin(l, t);
        l = s.simplify(l, t);
        if l == before || s.exhausted() {
            break;
        }
    }
    let renamed = canonical_names(&l);
    let lines = if renamed != l && s.test(renamed.clone(), t).is_some() {
        renamed
    } else {
        l
    };
    let exhausted = s.exhausted();
    Minimized {
        program: s.scenario(lines),
        target: t,
        tests: s.tests,
        elapsed: s.start.elapsed(),
        exhausted,
    }
}

/// `program` with each line's expectation set to `outcomes[i]` (lines with
/// no outcome keep `ok`).
pub fn with_expectations(program: &Scenario, outcomes: &[Option<Outcome>]) -> Scenario {
    let mut sc = program.clone();
    for (l, o) in sc.lines.iter_mut().zip(outcomes) {
        l.expect = o.unwrap_or(Outcome::Ok);
        l.since.clear();
    }
    renumber(sc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::print::print;
    use crate::scenario::parse;

    const PROGRAM: &str = "\
vm1 = create_vm
vm2 = create_vm
g3 = create_guest_memfd vm1 size=16K flags=mmap|init_shared
g4 = create_guest_memfd vm2 size=8K flags=mmap
h5 = host_memory size=2M
stat g4
m6 = mmap g3 offset=0x1000 size=8K
set_memory_region vm1 slot=1 gpa=0x100000 size=8K flags=guest_memfd userspace=m6 userspace_offset=0x1000 guest_memfd=g3 offset=0x1000
host_write h5 offset=0x0 byte=0x01
guest_read vm2 gpa=0x0
guest_write vm1 gpa=0x100000 byte=0x22
close g4
guest_read vm1 gpa=0x100000
file_read g3
";

    /// The \"finding\": a guest_read on vm1's slot after a write to it.
    fn shows(sc: &Scenario, t: Option<usize>) -> bool {
        let Some(t) = t else { return false };
        let before = &sc.lines[..t];
        matches!(sc.lines[t].op, Op::GuestRead { .. })
            && before.iter().any(|l| matches!(l.op, Op::GuestWrite { .. }))
            && before
                .iter()
                .any(|l| matches!(&l.op, Op::SetMemoryRegion(r) if r.size != 0))
    }

    #[test]
    fn minimizing_keeps_the_target_and_the_handles_it_needs() {
        let sc = parse("t.gmem", PROGRAM).unwrap();
        let m = minimize(&sc, Some(12), Budget::default(), shows);
        let text = print(&m.program);
        assert_eq!(
            text,
            "vm = create_vm\n\
             set_memory_region vm slot=1 gpa=0x100000 size=4K\n\
             guest_write vm gpa=0x100000 byte=0x22\n\
             guest_read vm gpa=0x100000\n"
        );
        assert_eq!(m.target, Some(3));
        // What comes out is a file the parser reads back as it is.
        assert_eq!(print(&parse("t", &text).unwrap()), text);
    }

    #[test]
    fn a_candidate_never_uses_a_handle_it_does_not_bind() {
        let sc = parse("t.gmem", PROGRAM).unwrap();
        let mut seen = 0;
        minimize(&sc, None, Budget::default(), |c, _| {
            seen += 1;
            let text = print(c);
            parse("c", &text).unwrap_or_else(|e| panic!("{text}\n{e}"));
            c.lines.len() > 5
        });
        assert!(seen > 5);
    }

    #[test]
    fn the_budget_bounds_the_oracle_calls() {
        let sc = parse("t.gmem", PROGRAM).unwrap();
        let budget = Budget {
            tests: 3,
            time: Duration::from_secs(60),
        };
        let m = minimize(&sc, None, budget, |c, _| c.lines.len() >= 8);
        assert_eq!(m.tests, 3);
        assert!(m.exhausted);
    }
}
