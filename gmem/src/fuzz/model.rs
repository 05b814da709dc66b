//! A simple model of files, mappings and host memory, to check the software
//! backend on its own (`gmem fuzz --backend soft`).
//!
//! The model predicts the outcome of the lines whose rules are simple and
//! local: creating a file (CREATE-1, CREATE-2), the plain file calls and
//! the ioctls the VFS answers before the file does (FILE-1, FILE-2),
//! `fallocate`'s checks in the order `vfs_fallocate` (fs/open.c) then
//! `kvm_gmem_fallocate` (virt/kvm/guest_memfd.c) make them (FALLOC-1..3),
//! `mmap`'s (MMAP-1, MMAP-2; mm/mmap.c `do_mmap`, then `kvm_gmem_mmap`),
//! `stat` and inode identity (CREATE-4), and the bytes host accesses read
//! back through any mapping of a file or the VMM's own memory (MMAP-3,
//! MMAP-4, FALLOC-4, LIFE-7), and of guest accesses only one: through an
//! ordinary slot of a default VM over nothing (`userspace_addr` 0, or
//! memory closed under the slot, whose addresses stay reserved while it
//! lives, gmem-safety), EFAULT (FAULT-3). It has no opinion on the rest
//! (memslots, other guest accesses, attributes: `gmem/tests/model.rs`
//! models those), and follows the backend's outcome there: once a slot is
//! bound over a file or over host memory, the guest may write it, and the
//! model stops predicting its bytes.

use std::collections::{BTreeMap, HashMap};

use crate::error::Errno;
use crate::scenario::ast::{FdRef, FileOp, Op, Outcome, Scenario, Userspace};
use crate::scenario::run::ScenarioRun;
use crate::uapi::{
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;

/// A line where the software backend and the model disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Index into the program's lines.
    pub index: usize,
    /// What the model predicts.
    pub expected: Outcome,
    /// What the backend gave.
    pub actual: Option<Outcome>,
    /// The rule the prediction comes from.
    pub rule: &'static str,
}

struct FileM {
    size: u64,
    flags: u64,
    fd_open: bool,
    maps: usize,
    /// Bytes written through host mappings, by file offset; `None` once a
    /// guest may have written the file (it was bound to a slot).
    data: Option<BTreeMap<u64, u8>>,
    /// Its pages were converted in place: the model says nothing of host
    /// accesses to it any more.
    converted: bool,
    ino: usize,
}

enum MemM {
    Anon {
        len: u64,
        data: Option<BTreeMap<u64, u8>>,
    },
    Map {
        len: u64,
        file: usize,
        offset: u64,
    },
}

/// A memslot, as far as the model predicts guest accesses through it.
struct SlotM {
    vm: String,
    slot: u32,
    as_id: u32,
    gpa: u64,
    size: u64,
    /// No guest_memfd: every shared access is served from `userspace_addr`.
    plain: bool,
    readonly: bool,
    /// `userspace_addr` is 0.
    zero: bool,
    /// The memory handle its range lies in, while open.
    mem: Option<String>,
    /// That memory was closed under it: nothing is mapped where it points
    /// (the addresses stay reserved while it lives, gmem-safety).
    closed: bool,
}

#[derive(Default)]
struct State {
    /// A slot's userspace range does not lie in one mapping handed out (a
    /// raw address, or a range past the end of its memory): nothing keeps
    /// its addresses, so memory made later may land where the guest writes.
    /// A range inside one mapping keeps it, or its addresses once closed,
    /// for the slot's life (gmem-safety).
    reuse: bool,
    vms: HashMap<String, u64>,
    files: Vec<FileM>,
    fds: HashMap<String, usize>,
    mems: HashMap<String, MemM>,
    slots: Vec<SlotM>,
}

fn err(e: Errno) -> Outcome {
    Outcome::Errno { errno: e }
}

fn byte(v: u8) -> Outcome {
    Outcome::Value {
        value: v.into(),
        hex: true,
    }
}

/// The guest_memfd flags a VM of each type accepts: `KVM_CAP_GUEST_MEMFD_FLAGS`
/// on a VM of that type (CAP-3), for every type `hv` creates.
pub fn flags_by_type(hv: &dyn crate::Hypervisor) -> Vec<(u64, u64)> {
    (0..8u64)
        .filter_map(|t| {
            let vm = hv.create_vm(t).ok()?;
            Some((
                t,
                vm.check_extension(crate::uapi::KVM_CAP_GUEST_MEMFD_FLAGS) as u64,
            ))
        })
        .collect()
}

/// Where the soft backend's run of `sc` departs from the model: the first
/// line whose outcome the model predicts differently. `gmem_flags` is what
/// [`flags_by_type`] gives for the backend (CAP-3).
pub fn check(sc: &Scenario, run: &ScenarioRun, gmem_flags: &[(u64, u64)]) -> Option<Mismatch> {
    if run.skipped.is_some() {
        return None;
    }
    let mut st = State::default();
    for (index, (line, res)) in sc.lines.iter().zip(&run.lines).enumerate() {
        let Some(actual) = res.actual else { continue };
        if actual == Outcome::OverBudget {
            // Not performed: nothing to check, nothing changed.
            continue;
        }
        if let Some((expected, rule)) = st.predict(&line.op, gmem_flags) {
            if !expected.accepts(&actual) {
                return Some(Mismatch {
                    index,
                    expected,
                    actual: Some(actual),
                    rule,
                });
            }
        }
        st.apply(line.bind.as_deref(), &line.op, &actual);
    }
    None
}

impl State {
    fn file(&self, name: &str) -> Option<&FileM> {
        self.fds.get(name).map(|i| &self.files[*i])
    }

    fn predict(&self, op: &Op, gmem_flags: &[(u64, u64)]) -> Option<(Outcome, &'static str)> {
        match op {
            Op::CreateGuestMemfd {
                vm, size, flags, ..
            } => {
                let vm_type = *self.vms.get(vm)?;
                let supported = gmem_flags.iter().find(|(t, _)| *t == vm_type)?.1;
                if flags & !supported != 0 {
                    return Some((err(Errno::EINVAL), "CREATE-1"));
                }
                if (*size as i64) <= 0 || size % P != 0 {
                    return Some((err(Errno::EINVAL), "CREATE-2"));
                }
                Some((Outcome::Ok, "CREATE-2"))
            }
            Op::Mmap {
                gmem,
                offset,
                size,
                private,
            } => {
                let f = self.file(gmem)?;
                let len = size.unwrap_or(f.size);
                if offset.rem_euclid(P as i64) != 0 {
                    return Some((err(Errno::EINVAL), "MMAP-2"));
                }
                if len == 0 {
                    return Some((err(Errno::EINVAL), "MMAP-2"));
                }
                // Negative offsets and lengths near 2^64 go through mm's
                // overflow checks; the model leaves them out.
                if *offset < 0 || len > 1 << 48 {
                    return None;
                }
                if f.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
                    return Some((err(Errno::ENODEV), "MMAP-1"));
                }
                if *private {
                    return Some((err(Errno::EINVAL), "MMAP-2"));
                }
                Some((Outcome::Ok, "MMAP-3"))
            }
            Op::Fallocate {
                gmem,
                mode,
                offset,
                len,
            } => {
                let f = self.file(gmem)?;
                let (keep, punch) = (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE);
                if *offset < 0 || *len <= 0 {
                    return Some((err(Errno::EINVAL), "FALLOC-2"));
                }
                // Other mode bits go through vfs_fallocate's own mode checks
                // before EFBIG (FALLOC-1); the model leaves them out.
                if mode & !(keep | punch) != 0 {
                    return None;
                }
                if mode & punch != 0 && mode & keep == 0 {
                    return Some((err(Errno::EOPNOTSUPP), "FALLOC-1"));
                }
                if offset.checked_add(*len).is_none() {
                    return Some((err(Errno::EFBIG), "FALLOC-2"));
                }
                if mode & keep == 0 {
                    return Some((err(Errno::EOPNOTSUPP), "FALLOC-1"));
                }
                if *offset as u64 % P != 0 || *len as u64 % P != 0 {
                    return Some((err(Errno::EINVAL), "FALLOC-2"));
                }
                if mode & punch == 0 && (offset + len) as u64 > f.size {
                    return Some((err(Errno::EINVAL), "FALLOC-3"));
                }
                Some((Outcome::Ok, "FALLOC-3"))
            }
            Op::File { gmem, op } => {
                self.file(gmem)?;
                Some(match op {
                    FileOp::Read | FileOp::Write => (err(Errno::EINVAL), "FILE-1"),
                    FileOp::Pread | FileOp::Pwrite | FileOp::Lseek => {
                        (err(Errno::ESPIPE), "FILE-1")
                    }
                    FileOp::Ftruncate(_) => (err(Errno::EINVAL), "FILE-2"),
                    // do_vfs_ioctl (fs/ioctl.c) answers these for every
                    // file before the file's own ioctl is asked (the
                    // request is an unsigned int): FIOCLEX and FIONCLEX
                    // succeed; FIONBIO, FIOASYNC and FIGETBSZ use the
                    // argument, 0 here.
                    FileOp::Ioctl(r) if matches!(*r as u32, 0x5450 | 0x5451) => (
                        Outcome::Value {
                            value: 0,
                            hex: false,
                        },
                        "FILE-1",
                    ),
                    FileOp::Ioctl(r) if matches!(*r as u32, 0x5421 | 0x5452 | 0x2) => {
                        (err(Errno::EFAULT), "FILE-1")
                    }
                    FileOp::Ioctl(_) => (err(Errno::ENOTTY), "FILE-1"),
                })
            }
            Op::Stat { gmem } => {
                let f = self.file(gmem)?;
                Some((
                    Outcome::Stat {
                        size: Some(f.size as i64),
                        blksize: Some(P as i64),
                        blocks: Some(0),
                        mode: Some(libc::S_IFREG | 0o600),
                    },
                    "CREATE-4",
                ))
            }
            Op::SameInode { a, b } => {
                let (x, y) = (self.file(a)?, self.file(b)?);
                Some((
                    Outcome::Value {
                        value: (x.ino == y.ino).into(),
                        hex: false,
                    },
                    "CREATE-4",
                ))
            }
            Op::HostWrite {
                mem, offset, len, ..
            } => self.host(mem, *offset, *len, true),
            Op::HostRead { mem, offset } => self.host(mem, *offset, 1, false),
            Op::GuestRead { vm, gpa } => self.guest(vm, *gpa, false),
            Op::GuestWrite { vm, gpa, .. } => self.guest(vm, *gpa, true),
            Op::Close { handle } => (self.vms.contains_key(handle)
                || self.fds.contains_key(handle)
                || self.mems.contains_key(handle))
            .then_some((Outcome::Ok, "LIFE-8")),
            _ => None,
        }
    }

    /// A guest access at `gpa` of default VM `vm`, where the model knows
    /// the answer: an ordinary slot served from where nothing is mapped
    /// (`userspace_addr` 0, or memory closed under the slot) fails KVM_RUN
    /// with EFAULT (FAULT-3), but a write to a read-only slot exits first.
    fn guest(&self, vm: &str, gpa: u64, write: bool) -> Option<(Outcome, &'static str)> {
        if *self.vms.get(vm)? != 0 {
            return None;
        }
        let s = self
            .slots
            .iter()
            .find(|s| s.vm == vm && s.as_id == 0 && gpa >= s.gpa && gpa - s.gpa < s.size)?;
        if !s.plain || (write && s.readonly) || !(s.zero || s.closed) {
            return None;
        }
        Some((err(Errno::EFAULT), "FAULT-3"))
    }

    /// A host access of `len` bytes at `offset` into `mem`.
    fn host(
        &self,
        mem: &str,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Option<(Outcome, &'static str)> {
        match self.mems.get(mem)? {
            MemM::Anon { len: size, data } => {
                if offset.checked_add(len)? > *size {
                    return None;
                }
                if write {
                    return Some((Outcome::Ok, "MMAP-5"));
                }
                let v = data.as_ref()?.get(&offset).copied().unwrap_or(0);
                Some((byte(v), "MMAP-5"))
            }
            MemM::Map {
                len: size,
                file,
                offset: base,
            } => {
                if offset.checked_add(len)? > *size {
                    return None;
                }
                let f = &self.files[*file];
                if f.converted {
                    return None;
                }
                if f.flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
                    return Some((Outcome::Sigbus, "MMAP-4"));
                }
                let at = base + offset;
                if at + len > f.size {
                    return Some((Outcome::Sigbus, "MMAP-3"));
                }
                if write {
                    return Some((Outcome::Ok, "MMAP-4"));
                }
                let v = f.data.as_ref()?.get(&at).copied().unwrap_or(0);
                Some((byte(v), "MMAP-4"))
            }
        }
    }

    /// A successful `set_memory_region`: a slot created, changed (moved,
    /// new flags, the same userspace range) or deleted.
    fn track_slot(&mut self, r: &crate::scenario::ast::Region) {
        let old = self
            .slots
            .iter()
            .position(|s| s.vm == r.vm && s.slot == r.slot && s.as_id == r.as_id)
            .map(|i| self.slots.remove(i));
        if r.size == 0 {
            return;
        }
        let mem = match &r.userspace {
            Userspace::Handle(h) => {
                let len = match self.mems.get(h) {
                    Some(MemM::Anon { len, .. } | MemM::Map { len, .. }) => Some(*len),
                    None => None,
                };
                let inside = r
                    .userspace_offset
                    .checked_add(r.size)
                    .zip(len)
                    .is_some_and(|(end, len)| end <= len);
                inside.then(|| h.clone())
            }
            Userspace::Addr(_) => None,
        };
        self.slots.push(SlotM {
            vm: r.vm.clone(),
            slot: r.slot,
            as_id: r.as_id,
            gpa: r.gpa,
            size: r.size,
            plain: r.flags & crate::uapi::KVM_MEM_GUEST_MEMFD == 0,
            readonly: r.flags & crate::uapi::KVM_MEM_READONLY != 0,
            zero: r.userspace == Userspace::Addr(0) && r.userspace_offset == 0,
            closed: old.is_some_and(|o| o.closed) && mem.is_none(),
            mem,
        });
    }

    fn release_if_unused(&mut self, file: usize) {
        let f = &mut self.files[file];
        if !f.fd_open && f.maps == 0 {
            f.data = Some(BTreeMap::new());
        }
    }

    /// Follows the line's real outcome.
    fn apply(&mut self, bind: Option<&str>, op: &Op, actual: &Outcome) {
        let ok = actual.is_success();
        match op {
            Op::CreateVm { vm_type } if ok => {
                if let Some(b) = bind {
                    self.vms.insert(b.to_string(), *vm_type);
                }
            }
            Op::CreateGuestMemfd { size, flags, .. } if ok => {
                if let Some(b) = bind {
                    let ino = self.files.len();
                    self.files.push(FileM {
                        size: *size,
                        flags: *flags,
                        fd_open: true,
                        maps: 0,
                        data: Some(BTreeMap::new()),
                        converted: false,
                        ino,
                    });
                    self.fds.insert(b.to_string(), ino);
                }
            }
            Op::HostMemory { size } if ok => {
                if let Some(b) = bind {
                    let data = (!self.reuse).then(BTreeMap::new);
                    self.mems
                        .insert(b.to_string(), MemM::Anon { len: *size, data });
                }
            }
            Op::Mmap {
                gmem, offset, size, ..
            } if ok => {
                let (Some(b), Some(&file)) = (bind, self.fds.get(gmem)) else {
                    return;
                };
                self.files[file].maps += 1;
                if self.reuse {
                    self.files[file].data = None;
                }
                let len = size.unwrap_or(self.files[file].size);
                self.mems.insert(
                    b.to_string(),
                    MemM::Map {
                        len,
                        file,
                        offset: *offset as u64,
                    },
                );
            }
            Op::SetMemoryRegion(r) if ok => {
                self.track_slot(r);
                if r.size == 0 {
                    return;
                }
                // The guest may write what the slot reaches from now on.
                if let FdRef::Handle(h) = &r.guest_memfd {
                    if let Some(&f) = self.fds.get(h) {
                        self.files[f].data = None;
                    }
                }
                match &r.userspace {
                    Userspace::Handle(h) => {
                        let inside = |len: u64| {
                            r.userspace_offset
                                .checked_add(r.size)
                                .is_some_and(|end| end <= len)
                        };
                        match self.mems.get_mut(h) {
                            Some(MemM::Anon { data, len }) => {
                                self.reuse |= !inside(*len);
                                *data = None;
                            }
                            Some(MemM::Map { file, len, .. }) => {
                                self.reuse |= !inside(*len);
                                let f = *file;
                                self.files[f].data = None;
                            }
                            None => self.reuse = true,
                        }
                    }
                    Userspace::Addr(a) => self.reuse |= *a != 0,
                }
            }
            Op::Fallocate {
                gmem,
                mode,
                offset,
                len,
            } if ok && mode & FALLOC_FL_PUNCH_HOLE != 0 => {
                if let Some(&f) = self.fds.get(gmem) {
                    if let Some(d) = &mut self.files[f].data {
                        let (from, to) =
                            (*offset as u64, (*offset as u64).saturating_add(*len as u64));
                        d.retain(|at, _| *at < from || *at >= to);
                    }
                }
            }
            // A write that crosses the file's end stores every byte before
            // the first page past it, then raises SIGBUS (MMAP-3), as memset
            // does in the kernel's selftest test_fault_overflow.
            Op::HostWrite {
                mem,
                offset,
                byte,
                len,
            } if *actual == Outcome::Sigbus => {
                if let Some(MemM::Map {
                    file, offset: base, ..
                }) = self.mems.get(mem)
                {
                    let (f, at) = (*file, base + offset);
                    let end = (at + len).min(self.files[f].size);
                    if self.files[f].flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
                        if let Some(d) = &mut self.files[f].data {
                            for a in at..end {
                                d.insert(a, *byte);
                            }
                        }
                    }
                }
            }
            Op::HostWrite {
                mem,
                offset,
                byte,
                len,
            } if ok => match self.mems.get_mut(mem) {
                Some(MemM::Anon { data: Some(d), .. }) => {
                    for at in *offset..offset + len {
                        d.insert(at, *byte);
                    }
                }
                Some(MemM::Map {
                    file, offset: base, ..
                }) => {
                    let (f, base) = (*file, *base);
                    if let Some(d) = &mut self.files[f].data {
                        for at in base + offset..base + offset + len {
                            d.insert(at, *byte);
                        }
                    }
                }
                _ => {}
            },
            // Advice may zero (dontneed on private memory), punch (remove)
            // or populate: the model stops predicting the bytes.
            Op::Madvise { mem, .. } if ok => match self.mems.get_mut(mem) {
                Some(MemM::Anon { data, .. }) => *data = None,
                Some(MemM::Map { file, .. }) => {
                    let f = *file;
                    self.files[f].data = None;
                }
                None => {}
            },
            Op::SetMemoryAttributes2 { gmem, .. } if ok => {
                if let Some(&f) = self.fds.get(gmem) {
                    self.files[f].converted = true;
                }
            }
            Op::Close { handle } if ok => {
                self.vms.remove(handle);
                if let Some(f) = self.fds.remove(handle) {
                    self.files[f].fd_open = false;
                    self.release_if_unused(f);
                }
                if let Some(MemM::Map { file, .. }) = self.mems.remove(handle) {
                    self.files[file].maps -= 1;
                    self.release_if_unused(file);
                }
                for s in &mut self.slots {
                    if s.mem.as_deref() == Some(handle.as_str()) {
                        s.mem = None;
                        s.closed = true;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::parse;
    use crate::scenario::run::LineResult;

    /// A run in which every line had the outcome it expects.
    fn as_expected(sc: &Scenario) -> ScenarioRun {
        ScenarioRun {
            skipped: None,
            max_held: 0,
            lines: sc
                .lines
                .iter()
                .map(|l| LineResult {
                    line: l.line,
                    text: l.text.clone(),
                    expected: l.expect,
                    actual: Some(l.expect),
                    detail: None,
                    passed: true,
                })
                .collect(),
        }
    }

    fn mismatch(text: &str) -> Option<Mismatch> {
        let sc = parse("t", text).unwrap();
        check(&sc, &as_expected(&sc), &[(0, 3), (1, 1)])
    }

    #[test]
    fn upstream_outcomes_agree_with_the_model() {
        let text = "\
vm = create_vm
g = create_guest_memfd vm size=8K flags=mmap|init_shared
create_guest_memfd vm size=4097 => EINVAL
create_guest_memfd vm size=4K flags=0x20 => EINVAL
m = mmap g
host_write m offset=0x1000 byte=0x5a len=2
host_read m offset=0x1001 => 0x5a
host_read m offset=0x1002 => 0x00
fallocate g mode=punch_hole offset=0x1000 len=0x1000
host_read m offset=0x1001 => 0x00
m2 = mmap g size=16K
host_write m2 offset=0x1fff byte=0x6b len=2 => sigbus
host_read m offset=0x1fff => 0x6b
fallocate g mode=0 offset=-4096 len=0x1000 => EINVAL
fallocate g mode=punch_hole offset=0x0 len=0x1 => EINVAL
fallocate g mode=allocate offset=0x1000 len=0x2000 => EINVAL
fallocate g mode=0x2 offset=0x0 len=0x1000 => EOPNOTSUPP
file_ioctl g request=0x5451 => 0
file_lseek g => ESPIPE
stat g => size=8192 blksize=4096 blocks=0 mode=0o100600
close g
host_read m offset=0x1000 => 0x00
";
        assert_eq!(mismatch(text), None);
    }

    #[test]
    fn a_wrong_outcome_is_a_mismatch_naming_its_rule() {
        let m = mismatch(
            "vm = create_vm\ng = create_guest_memfd vm size=4K flags=mmap\nm = mmap g\n\
             host_read m offset=0x0 => 0x00\n",
        )
        .unwrap();
        assert_eq!((m.index, m.rule), (3, "MMAP-4"));
        assert_eq!(m.expected, Outcome::Sigbus);
    }

    #[test]
    fn a_bound_file_has_no_predicted_bytes() {
        let text = "\
vm = create_vm
g = create_guest_memfd vm size=8K flags=mmap|init_shared
m = mmap g
set_memory_region vm slot=0 gpa=0x100000 size=8K flags=guest_memfd guest_memfd=g
host_read m offset=0x0 => 0x77
";
        assert_eq!(mismatch(text), None);
    }
}
