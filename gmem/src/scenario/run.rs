//! Runs a parsed scenario on any [`Hypervisor`]: binds handles, performs each
//! operation through the contract and compares its outcome with the line's.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::Serialize;

use super::ast::{
    FdRef, FileOp, Line, Op, Outcome, Region, RequireKind, Requirement, Scenario, Userspace,
};
use super::budget::{page_range, Budget, Charge, Costs, Limits, Owner};
use crate::error::Error;
use crate::hypervisor::{
    GuestMemfd, GuestOp, HostFault, HostMemory, Hypervisor, MapKind, Pin, Vcpu, VcpuExit, Vm,
};
use crate::madvise::Advice;
use crate::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_memory_attributes2, kvm_pre_fault_memory,
    kvm_userspace_memory_region, kvm_userspace_memory_region2, KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_VM_TYPES, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_MAX_NR_PAGES, PAGE_SHIFT, PAGE_SIZE,
};

/// The most a `host_write` copies at once: a longer one is done in pieces,
/// so that the runner's own buffer stays this small whatever `len` says.
const HOST_WRITE_CHUNK: usize = 1 << 20;

/// `guest_memfd=closed`: a number no process has open (above any fd limit).
pub const CLOSED_FD: u32 = i32::MAX as u32;

/// The outcome of one line on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineResult {
    /// Line number (1-based).
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// What the line expects.
    pub expected: Outcome,
    /// What happened; `None` when the line could not run (see `detail`).
    pub actual: Option<Outcome>,
    /// The backend's error message, the guest's rip, or why the line did not run.
    pub detail: Option<String>,
    /// Did `actual` satisfy `expected`?
    pub passed: bool,
}

impl LineResult {
    /// The observed outcome in scenario syntax (`not run` when it did not run).
    pub fn actual_text(&self) -> String {
        match &self.actual {
            Some(o) => o.to_string(),
            None => "not run".to_string(),
        }
    }
}

/// One scenario run on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScenarioRun {
    /// `Some(reason)` when a requirement was not met: nothing ran.
    pub skipped: Option<String>,
    /// One result per operation line, in order.
    pub lines: Vec<LineResult>,
    /// The most memory the run could hold at once, by the budget's
    /// account (bytes).
    pub max_held: u64,
}

/// The first requirement `hv` does not meet, as a reason for the skip.
pub fn unmet_requirement(hv: &dyn Hypervisor, requires: &[Requirement]) -> Option<String> {
    requires.iter().find_map(|r| {
        let why = match r.kind {
            RequireKind::VmType(t) => {
                let types = hv.check_extension(KVM_CAP_VM_TYPES);
                // Kernels before KVM_CAP_VM_TYPES know only the default type.
                let ok = t < 64 && ((types >> t) & 1 == 1 || (t == 0 && types == 0));
                (!ok).then(|| format!("KVM_CAP_VM_TYPES is {types:#x}"))
            }
            RequireKind::MemoryAttributes => {
                let v = hv.check_extension(KVM_CAP_MEMORY_ATTRIBUTES);
                (v == 0).then(|| "KVM_CAP_MEMORY_ATTRIBUTES is 0".to_string())
            }
            RequireKind::GuestMemfdFlag(f) => {
                let v = hv.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS);
                (v as u64 & f != f).then(|| format!("KVM_CAP_GUEST_MEMFD_FLAGS is {v:#x}"))
            }
            RequireKind::ExitHypercall => {
                let v = hv.check_extension(KVM_CAP_EXIT_HYPERCALL);
                (v as u64 & (1 << KVM_HC_MAP_GPA_RANGE) == 0)
                    .then(|| format!("KVM_CAP_EXIT_HYPERCALL is {v:#x}"))
            }
            RequireKind::Cap(c) => {
                let v = hv.check_extension(c);
                (v == 0).then(|| format!("capability {c} is 0"))
            }
            RequireKind::AddressSpaces(n) => {
                let v = hv.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE).max(1);
                ((v as u64) < n).then(|| format!("{v} address space(s)"))
            }
        }?;
        Some(format!("requires {} ({why})", r.kind))
    })
}

/// Runs `scenario` on `hv` under the default memory budget
/// ([`Limits::for_this_machine`]).
pub fn run(hv: &dyn Hypervisor, scenario: &Scenario) -> ScenarioRun {
    run_limited(hv, scenario, &Limits::default())
}

/// Runs `scenario` on `hv`: every line runs, even after a mismatch, so that
/// one report shows every difference. An operation that could take the
/// scenario past `limits` is not performed ([`Outcome::OverBudget`]).
pub fn run_limited(hv: &dyn Hypervisor, scenario: &Scenario, limits: &Limits) -> ScenarioRun {
    if let Some(reason) = unmet_requirement(hv, &scenario.requires) {
        return ScenarioRun {
            skipped: Some(reason),
            lines: Vec::new(),
            max_held: 0,
        };
    }
    let mut st = State {
        hv,
        handles: HashMap::new(),
        memfd: None,
        budget: Budget::new(limits),
        costs: Costs::for_backend(hv.name()),
        files: HashMap::new(),
        next_id: 0,
        max_held: 0,
    };
    let lines = scenario
        .lines
        .iter()
        .map(|line| {
            let (actual, detail) = match st.exec(line) {
                Ok((o, d)) => (Some(o), d),
                Err(NotRun(why)) => (None, Some(why)),
            };
            st.max_held = st.max_held.max(st.budget.held());
            let release = hv.release();
            let passed = actual.as_ref().is_some_and(|a| line.accepts(release, a));
            LineResult {
                line: line.line,
                text: line.text.clone(),
                expected: release.map_or(line.expect, |r| line.expect_on(r)),
                actual,
                detail,
                passed,
            }
        })
        .collect();
    let max_held = st.max_held;
    // Handles drop here, vCPUs before their VMs (field order of VmState).
    drop(st);
    ScenarioRun {
        skipped: None,
        lines,
        max_held,
    }
}

struct NotRun(String);

type Exec = Result<(Outcome, Option<String>), NotRun>;

struct VmState {
    // Declared first: dropped before the VM it runs in.
    vcpu: Option<Box<dyn Vcpu>>,
    hypercall_enabled: bool,
    vm: Box<dyn Vm>,
    /// The slots installed, as the budget needs them.
    slots: Vec<SlotAcct>,
}

/// Where a slot's accesses can land, for the budget.
struct SlotAcct {
    /// Address-space id << 16 | slot id.
    slot: u32,
    base_gfn: u64,
    npages: u64,
    /// The bound file and its first page.
    file: Option<(u64, u64)>,
    /// The memory `userspace_addr` points into: owner, byte offset of the
    /// slot's first page in it, and the owner's length.
    hva: Option<(Owner, u64, u64)>,
    /// The kernel's metadata for the slot (bytes).
    metadata: u64,
}

/// What a host memory handle is, for the budget.
#[derive(Clone, Copy)]
enum MemOwner {
    /// Anonymous host memory.
    Anon(u64),
    /// A mapping of a file from file offset `offset`.
    File { id: u64, offset: u64 },
}

enum Handle {
    Vm(VmState),
    Gmem(Box<dyn GuestMemfd>, u64),
    Mem(Box<dyn HostMemory>, MemOwner),
    /// Held for its `Drop`, which releases the pages.
    Pin {
        _held: Box<dyn Pin>,
    },
}

/// A file's size and the handles (its fd, its mappings) that keep it.
struct FileAcct {
    size: u64,
    refs: u32,
}

struct State<'a> {
    hv: &'a dyn Hypervisor,
    handles: HashMap<String, Handle>,
    memfd: Option<OwnedFd>,
    budget: Budget,
    costs: Costs,
    files: HashMap<u64, FileAcct>,
    next_id: u64,
    max_held: u64,
}

fn fail(e: Error) -> (Outcome, Option<String>) {
    (Outcome::Errno { errno: e.errno }, Some(e.to_string()))
}

fn ok() -> (Outcome, Option<String>) {
    (Outcome::Ok, None)
}

fn value(v: u64, hex: bool) -> (Outcome, Option<String>) {
    (Outcome::Value { value: v, hex }, None)
}

fn host_fault(f: HostFault) -> Exec {
    match f {
        HostFault::Sigbus { .. } => Ok((Outcome::Sigbus, Some(f.to_string()))),
        HostFault::OutOfRange { .. } => Err(NotRun(format!(
            "the scenario accesses outside the mapping: {f}"
        ))),
    }
}

fn missing(name: &str) -> NotRun {
    NotRun(format!(
        "handle `{name}` is not bound: the line that binds it failed, or it was closed"
    ))
}

impl State<'_> {
    fn vm(&mut self, name: &str) -> Result<&mut VmState, NotRun> {
        match self.handles.get_mut(name) {
            Some(Handle::Vm(v)) => Ok(v),
            Some(_) => Err(NotRun(format!("`{name}` is not a VM"))),
            None => Err(missing(name)),
        }
    }

    fn gmem(&self, name: &str) -> Result<(&dyn GuestMemfd, u64), NotRun> {
        match self.handles.get(name) {
            Some(Handle::Gmem(g, id)) => Ok((g.as_ref(), *id)),
            Some(_) => Err(NotRun(format!("`{name}` is not a guest_memfd"))),
            None => Err(missing(name)),
        }
    }

    fn mem(&self, name: &str) -> Result<(&dyn HostMemory, MemOwner), NotRun> {
        match self.handles.get(name) {
            Some(Handle::Mem(m, owner)) => Ok((m.as_ref(), *owner)),
            Some(_) => Err(NotRun(format!("`{name}` is not host memory or a mapping"))),
            None => Err(missing(name)),
        }
    }

    fn bind(&mut self, line: &Line, h: Handle) {
        // An unbound result (e.g. `create_vm type=1 => ...` that succeeded)
        // is dropped at once.
        match &line.bind {
            Some(name) => {
                if let Some(old) = self.handles.insert(name.clone(), h) {
                    self.dropped(old);
                }
            }
            None => self.dropped(h),
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Gives back what a handle held once it is dropped.
    fn dropped(&mut self, h: Handle) {
        let file = match &h {
            Handle::Gmem(_, id) | Handle::Mem(_, MemOwner::File { id, .. }) => Some(*id),
            Handle::Mem(_, MemOwner::Anon(id)) => {
                self.budget.release(Owner::Mem(*id));
                None
            }
            Handle::Vm(_) | Handle::Pin { .. } => None,
        };
        drop(h);
        let Some(id) = file else { return };
        let released = self.files.get_mut(&id).is_some_and(|f| {
            f.refs = f.refs.saturating_sub(1);
            f.refs == 0
        });
        if released {
            self.files.remove(&id);
            self.budget.release(Owner::File(id));
            self.budget.release_fixed(self.costs.file);
        }
    }

    /// Performs `op` if `charge` fits the budget, and then holds it if `op`
    /// succeeded (`keep` says which outcomes hold memory).
    fn charged(
        &mut self,
        charge: Charge,
        op: impl FnOnce(&mut Self) -> Exec,
        keep: impl FnOnce(&Outcome) -> bool,
    ) -> Exec {
        if let Err(e) = self.budget.check(&charge) {
            return Ok((Outcome::OverBudget, Some(e.to_string())));
        }
        let r = op(self)?;
        if keep(&r.0) {
            self.budget.commit(charge);
        }
        Ok(r)
    }

    /// The pages a host access of `[offset, offset + len)` of `owner` can
    /// allocate.
    fn host_charge(&self, owner: MemOwner, mem_len: u64, offset: u64, len: u64) -> Charge {
        match owner {
            MemOwner::Anon(id) => {
                Charge::default().pages(Owner::Mem(id), page_range(offset, len, mem_len))
            }
            MemOwner::File { id, offset: base } => {
                let size = self.files.get(&id).map_or(0, |f| f.size);
                let end = base.saturating_add(mem_len).min(size);
                Charge::default().pages(
                    Owner::File(id),
                    page_range(base.saturating_add(offset), len, end),
                )
            }
        }
    }

    /// The memory that `[addr, ...)` lies in, among the handles: owner,
    /// offset into it, its length.
    fn owner_of(&self, addr: u64) -> Option<(Owner, u64, u64)> {
        self.handles.values().find_map(|h| {
            let Handle::Mem(m, owner) = h else {
                return None;
            };
            let off = addr.checked_sub(m.addr()).filter(|o| *o < m.len())?;
            Some(match *owner {
                MemOwner::Anon(id) => (Owner::Mem(id), off, m.len()),
                MemOwner::File { id, offset } => {
                    let size = self.files.get(&id).map_or(0, |f| f.size);
                    (Owner::File(id), offset + off, size.min(offset + m.len()))
                }
            })
        })
    }

    fn exec(&mut self, line: &Line) -> Exec {
        let hv = self.hv;
        match &line.op {
            Op::CreateVm { vm_type } => {
                let charge = Charge::default().fixed(self.costs.vm, "a VM");
                self.charged(
                    charge,
                    |st| match hv.create_vm(*vm_type) {
                        Ok(vm) => {
                            st.bind(
                                line,
                                Handle::Vm(VmState {
                                    vcpu: None,
                                    hypercall_enabled: false,
                                    vm,
                                    slots: Vec::new(),
                                }),
                            );
                            Ok(ok())
                        }
                        Err(e) => Ok(fail(e)),
                    },
                    Outcome::is_success,
                )
            }
            Op::CreateGuestMemfd {
                vm,
                size,
                flags,
                reserved,
            } => {
                let args = kvm_create_guest_memfd {
                    size: *size,
                    flags: *flags,
                    reserved: [*reserved; 6],
                };
                self.vm(vm)?;
                let charge = Charge::default().fixed(self.costs.file, "a guest_memfd");
                self.charged(
                    charge,
                    |st| match st.vm(vm)?.vm.create_guest_memfd(args) {
                        Ok(g) => {
                            let id = st.new_id();
                            st.files.insert(
                                id,
                                FileAcct {
                                    size: g.size(),
                                    refs: 1,
                                },
                            );
                            st.bind(line, Handle::Gmem(g, id));
                            Ok(ok())
                        }
                        Err(e) => Ok(fail(e)),
                    },
                    Outcome::is_success,
                )
            }
            Op::HostMemory { size } => match hv.host_memory(*size) {
                Ok(m) => {
                    let id = self.new_id();
                    self.bind(line, Handle::Mem(m, MemOwner::Anon(id)));
                    Ok(ok())
                }
                Err(e) => Ok(fail(e)),
            },
            Op::Mmap {
                gmem,
                offset,
                size,
                private,
            } => {
                let (g, id) = self.gmem(gmem)?;
                let kind = if *private {
                    MapKind::Private
                } else {
                    MapKind::Shared
                };
                match g.mmap(*offset, size.unwrap_or_else(|| g.size()), kind) {
                    Ok(m) => {
                        if let Some(f) = self.files.get_mut(&id) {
                            f.refs += 1;
                        }
                        let owner = MemOwner::File {
                            id,
                            offset: *offset as u64,
                        };
                        self.bind(line, Handle::Mem(m, owner));
                        Ok(ok())
                    }
                    Err(e) => Ok(fail(e)),
                }
            }
            Op::SetMemoryRegion(r) => self.region(r),
            Op::SetMemoryAttributes {
                vm,
                gpa,
                size,
                attributes,
                flags,
            } => {
                let a = kvm_memory_attributes {
                    address: *gpa,
                    size: *size,
                    attributes: *attributes,
                    flags: *flags,
                };
                self.vm(vm)?;
                let bytes = if *attributes != 0 {
                    (size / PAGE_SIZE).saturating_mul(self.costs.attribute_per_page)
                } else {
                    0
                };
                let charge = Charge::default().fixed(bytes, "memory attributes");
                self.charged(
                    charge,
                    |st| {
                        Ok(st
                            .vm(vm)?
                            .vm
                            .set_memory_attributes(a)
                            .map_or_else(fail, |()| ok()))
                    },
                    Outcome::is_success,
                )
            }
            Op::Fallocate {
                gmem,
                mode,
                offset,
                len,
            } => {
                let (g, id) = self.gmem(gmem)?;
                let size = g.size();
                let range = if *offset >= 0 && *len > 0 {
                    page_range(*offset as u64, *len as u64, size)
                } else {
                    0..0
                };
                let punch = *mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
                let charge = if punch {
                    Charge::default()
                } else {
                    Charge::default().pages(Owner::File(id), range.clone())
                };
                let r = self.charged(
                    charge,
                    |st| {
                        Ok(st
                            .gmem(gmem)?
                            .0
                            .fallocate(*mode, *offset, *len)
                            .map_or_else(fail, |()| ok()))
                    },
                    Outcome::is_success,
                )?;
                if punch && r.0.is_success() {
                    self.budget.release_pages(Owner::File(id), range);
                }
                Ok(r)
            }
            Op::HostWrite {
                mem,
                offset,
                byte,
                len,
            } => {
                let (m, owner) = self.mem(mem)?;
                let charge = self.host_charge(owner, m.len(), *offset, *len);
                self.charged(
                    charge,
                    |st| {
                        let (m, _) = st.mem(mem)?;
                        let buf = vec![*byte; (*len as usize).min(HOST_WRITE_CHUNK)];
                        let mut done = 0u64;
                        while done < *len {
                            let n = (*len - done).min(buf.len() as u64) as usize;
                            if let Err(f) = m.write(offset.saturating_add(done), &buf[..n]) {
                                return host_fault(f);
                            }
                            done += n as u64;
                        }
                        Ok(ok())
                    },
                    |_| true,
                )
            }
            Op::HostRead { mem, offset } => {
                let (m, owner) = self.mem(mem)?;
                let charge = self.host_charge(owner, m.len(), *offset, 1);
                self.charged(
                    charge,
                    |st| {
                        let mut b = [0u8];
                        match st.mem(mem)?.0.read(*offset, &mut b) {
                            Ok(()) => Ok(value(b[0].into(), true)),
                            Err(f) => host_fault(f),
                        }
                    },
                    |_| true,
                )
            }
            Op::GuestWrite { vm, gpa, byte } => self.guest(
                vm,
                GuestOp::Write {
                    gpa: *gpa,
                    size: 1,
                    value: (*byte).into(),
                },
            ),
            Op::GuestRead { vm, gpa } => self.guest(vm, GuestOp::Read { gpa: *gpa, size: 1 }),
            Op::GuestMapGpaRange {
                vm,
                gpa,
                pages,
                private,
            } => {
                let st = self.vm(vm)?;
                if !st.hypercall_enabled {
                    let mask = 1u64 << KVM_HC_MAP_GPA_RANGE;
                    if st.vm.check_extension(KVM_CAP_EXIT_HYPERCALL) as u64 & mask != 0 {
                        if let Err(e) = st.vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, mask) {
                            let (o, d) = fail(e);
                            return Ok((
                                o,
                                d.map(|d| format!("enabling KVM_CAP_EXIT_HYPERCALL: {d}")),
                            ));
                        }
                    }
                    st.hypercall_enabled = true;
                }
                let attributes = if *private {
                    KVM_MAP_GPA_RANGE_ENCRYPTED
                } else {
                    0
                };
                self.guest(
                    vm,
                    GuestOp::MapGpaRange {
                        gpa: *gpa,
                        npages: *pages,
                        attributes,
                    },
                )
            }
            Op::File { gmem, op } => {
                let (g, _) = self.gmem(gmem)?;
                let mut b = [0u8];
                let r = match op {
                    FileOp::Read => g.read(&mut b).map(|n| n as u64),
                    FileOp::Write => g.write(&b).map(|n| n as u64),
                    FileOp::Pread => g.pread(&mut b, 0).map(|n| n as u64),
                    FileOp::Pwrite => g.pwrite(&b, 0).map(|n| n as u64),
                    FileOp::Lseek => g.lseek(0, libc::SEEK_SET),
                    FileOp::Ftruncate(len) => g.ftruncate(*len).map(|()| 0),
                    FileOp::Ioctl(req) => g.ioctl(*req).map(|n| n as u64),
                };
                Ok(match (r, op) {
                    (Ok(_), FileOp::Ftruncate(_)) => ok(),
                    (Ok(n), _) => value(n, false),
                    (Err(e), _) => fail(e),
                })
            }
            Op::Stat { gmem } => Ok(match self.gmem(gmem)?.0.stat() {
                Ok(s) => (
                    Outcome::Stat {
                        size: Some(s.size),
                        blksize: Some(s.blksize),
                        blocks: Some(s.blocks),
                        mode: Some(s.mode),
                    },
                    Some(format!("ino {}", s.ino)),
                ),
                Err(e) => fail(e),
            }),
            Op::SameInode { a, b } => {
                let sa = self.gmem(a)?.0.stat();
                let sb = self.gmem(b)?.0.stat();
                Ok(match (sa, sb) {
                    (Ok(x), Ok(y)) => (
                        Outcome::Value {
                            value: (x.ino == y.ino).into(),
                            hex: false,
                        },
                        Some(format!("inodes {} and {}", x.ino, y.ino)),
                    ),
                    (Err(e), _) | (_, Err(e)) => fail(e),
                })
            }
            Op::CheckExtension { vm, cap } => {
                let v = match vm {
                    Some(vm) => self.vm(vm)?.vm.check_extension(*cap),
                    None => hv.check_extension(*cap),
                };
                Ok(value(v as u64, false))
            }
            Op::PreFault {
                vm,
                gpa,
                size,
                flags,
            } => {
                // Pre-faulting maps every page of the range: it allocates
                // what guest accesses to all of it would.
                let charge = match self.handles.get(vm) {
                    Some(Handle::Vm(st)) => self.range_charge(st, *gpa, *size),
                    _ => Charge::default(),
                };
                self.charged(
                    charge,
                    |this| {
                        let st = this.vcpu_of(vm)?;
                        let Some(vcpu) = st.vcpu.as_mut() else {
                            return Err(NotRun("no vCPU".into()));
                        };
                        let mut range = kvm_pre_fault_memory {
                            gpa: *gpa,
                            size: *size,
                            flags: *flags,
                            ..Default::default()
                        };
                        Ok(match vcpu.pre_fault_memory(&mut range) {
                            Ok(()) => (
                                Outcome::Value {
                                    value: range.size,
                                    hex: true,
                                },
                                Some(format!(
                                    "{:#x} bytes left at gpa {:#x}",
                                    range.size, range.gpa
                                )),
                            ),
                            Err(e) => fail(e),
                        })
                    },
                    |_| true,
                )
            }
            Op::SetMemoryAttributes2 {
                gmem,
                offset,
                size,
                attributes,
                flags,
            } => {
                let mut a = kvm_memory_attributes2 {
                    offset: *offset,
                    size: *size,
                    attributes: *attributes,
                    flags: *flags,
                    ..Default::default()
                };
                Ok(match self.gmem(gmem)?.0.set_memory_attributes2(&mut a) {
                    Ok(()) => ok(),
                    Err(e) => {
                        let (o, d) = fail(e);
                        (
                            o,
                            d.map(|d| format!("{d}; error_offset {:#x}", a.error_offset)),
                        )
                    }
                })
            }
            Op::Pin { mem, offset, len } => {
                // Pinning faults every page of the range in.
                let (m, owner) = self.mem(mem)?;
                let charge = self.host_charge(owner, m.len(), *offset, *len);
                self.charged(
                    charge,
                    |st| match st.mem(mem)?.0.pin(*offset, *len) {
                        Ok(p) => {
                            st.bind(line, Handle::Pin { _held: p });
                            Ok(ok())
                        }
                        Err(e) => Ok(fail(e)),
                    },
                    Outcome::is_success,
                )
            }
            Op::Mbind {
                mem,
                offset,
                size,
                policy,
                flags,
            } => {
                let (m, _) = self.mem(mem)?;
                let len = size.unwrap_or_else(|| m.len().saturating_sub(*offset));
                Ok(m.mbind(*offset, len, *policy, *flags)
                    .map_or_else(fail, |()| ok()))
            }
            Op::GetMempolicy { mem, offset } => Ok(match self.mem(mem)?.0.get_mempolicy(*offset) {
                Ok(policy) => (Outcome::Policy { policy }, None),
                Err(e) => fail(e),
            }),
            Op::Madvise {
                mem,
                offset,
                size,
                advice,
            } => {
                let (m, owner) = self.mem(mem)?;
                let mem_len = m.len();
                let len = size.unwrap_or_else(|| mem_len.saturating_sub(*offset));
                // Populating (and collapsing into huge pages) allocates what
                // touching the range would; REMOVE frees the range, as does
                // DONTNEED on anonymous memory.
                let allocates = matches!(
                    advice,
                    Advice::PopulateRead | Advice::PopulateWrite | Advice::Collapse
                );
                let charge = if allocates {
                    self.host_charge(owner, mem_len, *offset, len)
                } else {
                    Charge::default()
                };
                let r = self.charged(
                    charge,
                    |st| {
                        Ok(st
                            .mem(mem)?
                            .0
                            .madvise(*offset, len, *advice)
                            .map_or_else(fail, |()| ok()))
                    },
                    Outcome::is_success,
                )?;
                let frees = matches!(
                    (advice, owner),
                    (Advice::Remove, _) | (Advice::DontNeed, MemOwner::Anon(_))
                );
                if frees && r.0.is_success() {
                    for (owner, range) in self.host_charge(owner, mem_len, *offset, len).ranges() {
                        self.budget.release_pages(owner, range);
                    }
                }
                Ok(r)
            }
            Op::Close { handle } => match self.handles.remove(handle) {
                Some(h) => {
                    self.dropped(h);
                    Ok(ok())
                }
                None => Err(missing(handle)),
            },
        }
    }

    /// What guest accesses to `[gpa, gpa + size)` can allocate (and a
    /// vCPU if there is none yet): for every slot the range meets, its pages
    /// of the file the slot is bound to and those `userspace_addr` names,
    /// either of which a kernel may serve them from.
    fn range_charge(&self, vm: &VmState, gpa: u64, size: u64) -> Charge {
        let mut charge = Charge::default();
        if vm.vcpu.is_none() {
            charge = charge.fixed(self.costs.vcpu, "a vCPU");
        }
        let first = gpa >> PAGE_SHIFT;
        let end = gpa.saturating_add(size).div_ceil(PAGE_SIZE);
        for s in vm.slots.iter().filter(|s| s.slot >> 16 == 0) {
            let (lo, hi) = (
                first.max(s.base_gfn),
                end.min(s.base_gfn.saturating_add(s.npages)),
            );
            if lo >= hi {
                continue;
            }
            let (a, b) = (lo - s.base_gfn, hi - s.base_gfn);
            if let Some((id, pgoff)) = s.file {
                charge = charge.pages(
                    Owner::File(id),
                    pgoff.saturating_add(a)..pgoff.saturating_add(b),
                );
            }
            if let Some((owner, off, len)) = s.hva {
                let at = off.saturating_add(a << PAGE_SHIFT);
                charge = charge.pages(owner, page_range(at, (b - a) << PAGE_SHIFT, len));
            }
        }
        charge
    }

    /// The VM `vm` with its vCPU 0, created on first use.
    fn vcpu_of(&mut self, vm: &str) -> Result<&mut VmState, NotRun> {
        let st = self.vm(vm)?;
        if st.vcpu.is_none() {
            let v = st
                .vm
                .create_vcpu(0)
                .map_err(|e| NotRun(format!("KVM_CREATE_VCPU: {e}")))?;
            st.vcpu = Some(v);
        }
        Ok(st)
    }

    fn guest(&mut self, vm: &str, op: GuestOp) -> Exec {
        let gpa = match op {
            GuestOp::Read { gpa, .. } | GuestOp::Write { gpa, .. } => Some(gpa),
            GuestOp::MapGpaRange { .. } => None,
        };
        let charge = {
            let Some(Handle::Vm(st)) = self.handles.get(vm) else {
                self.vm(vm)?;
                return Err(missing(vm));
            };
            match gpa {
                Some(gpa) => self.range_charge(st, gpa, 1),
                None if st.vcpu.is_none() => Charge::default().fixed(self.costs.vcpu, "a vCPU"),
                None => Charge::default(),
            }
        };
        self.charged(charge, |st| st.run_guest(vm, op), |_| true)
    }

    fn run_guest(&mut self, vm: &str, op: GuestOp) -> Exec {
        let st = self.vm(vm)?;
        if st.vcpu.is_none() {
            match st.vm.create_vcpu(0) {
                Ok(v) => st.vcpu = Some(v),
                Err(e) => {
                    let (o, d) = fail(e);
                    return Ok((o, d.map(|d| format!("KVM_CREATE_VCPU: {d}"))));
                }
            }
        }
        let Some(vcpu) = st.vcpu.as_mut() else {
            return Err(NotRun("no vCPU".into()));
        };
        Ok(match vcpu.run(op) {
            Ok(VcpuExit::Done(v)) => match op {
                GuestOp::Read { .. } => value(v & 0xff, true),
                GuestOp::Write { .. } => ok(),
                GuestOp::MapGpaRange { .. } => (Outcome::HypercallReturn { value: v }, None),
            },
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                (Outcome::MemoryFault { gpa, size, flags }, None)
            }
            Ok(VcpuExit::Mmio { gpa, is_write, .. }) => (
                Outcome::Mmio {
                    gpa,
                    write: Some(is_write),
                },
                None,
            ),
            Ok(VcpuExit::Hypercall {
                gpa,
                npages,
                attributes,
                ..
            }) => (
                Outcome::Hypercall {
                    gpa,
                    pages: npages,
                    attributes,
                },
                None,
            ),
            Ok(VcpuExit::Timeout { rip }) => (
                Outcome::Timeout,
                Some(format!("the guest did not exit; rip {rip:#x}")),
            ),
            Err(e) => fail(e),
        })
    }

    fn fd_of(&mut self, r: &FdRef) -> Result<u32, NotRun> {
        Ok(match r {
            FdRef::Closed => CLOSED_FD,
            FdRef::Kvm => self.hv.as_raw_fd() as u32,
            FdRef::Raw(n) => *n,
            FdRef::Memfd => self.memfd()? as u32,
            FdRef::Handle(name) => match self.handles.get(name) {
                Some(Handle::Gmem(g, _)) => g.as_raw_fd() as u32,
                Some(Handle::Vm(v)) => v.vm.as_raw_fd() as u32,
                Some(Handle::Mem(..) | Handle::Pin { .. }) => {
                    return Err(NotRun(format!("`{name}` is memory, not an fd")))
                }
                None => return Err(missing(name)),
            },
        })
    }

    fn memfd(&mut self) -> Result<RawFd, NotRun> {
        if let Some(fd) = &self.memfd {
            return Ok(fd.as_raw_fd());
        }
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new
        // fd or -1; nothing else is touched.
        let fd = unsafe { libc::memfd_create(c"gmem-scenario".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(NotRun(format!(
                "memfd_create failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by no one else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        self.memfd = Some(owned);
        Ok(fd)
    }

    fn region(&mut self, r: &Region) -> Exec {
        let base = match &r.userspace {
            Userspace::Addr(a) => *a,
            Userspace::Handle(name) => self.mem(name)?.0.addr(),
        };
        let userspace_addr = base.wrapping_add(r.userspace_offset);
        let fd = self.fd_of(&r.guest_memfd)?;
        let slot = (r.as_id << 16) | r.slot;
        let npages = r.size >> PAGE_SHIFT;
        let per_page = self.costs.slot_per_page
            + if r.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
                self.costs.slot_dirty_per_page
            } else {
                0
            };
        // The kernel refuses a slot of more than KVM_MEM_MAX_NR_PAGES
        // (__kvm_set_memory_region, virt/kvm/kvm_main.c) before it
        // allocates anything for it.
        let metadata = if npages <= KVM_MEM_MAX_NR_PAGES {
            npages.saturating_mul(per_page)
        } else {
            0
        };
        let file = match (&r.guest_memfd, r.flags & KVM_MEM_GUEST_MEMFD != 0) {
            (FdRef::Handle(name), true) => self
                .gmem(name)
                .ok()
                .map(|(_, id)| (id, r.offset >> PAGE_SHIFT)),
            _ => None,
        };
        let hva = self.owner_of(userspace_addr);
        let charge = Charge::default().fixed(metadata, "memslot metadata");
        self.charged(
            charge,
            |st| {
                let vms = st.vm(&r.vm)?;
                let vm = &vms.vm;
                let res = if r.v1 {
                    vm.set_user_memory_region(kvm_userspace_memory_region {
                        slot,
                        flags: r.flags,
                        guest_phys_addr: r.gpa,
                        memory_size: r.size,
                        userspace_addr,
                    })
                } else {
                    vm.set_user_memory_region2(kvm_userspace_memory_region2 {
                        slot,
                        flags: r.flags,
                        guest_phys_addr: r.gpa,
                        memory_size: r.size,
                        userspace_addr,
                        guest_memfd_offset: r.offset,
                        guest_memfd: fd,
                        ..Default::default()
                    })
                };
                if res.is_ok() {
                    // A change of an existing slot keeps its metadata and
                    // binding; a delete gives them back.
                    let old = vms.slots.iter().position(|s| s.slot == slot);
                    let old = old.map(|i| vms.slots.remove(i));
                    let freed = old.as_ref().map_or(0, |o| o.metadata);
                    if r.size != 0 {
                        vms.slots.push(SlotAcct {
                            slot,
                            base_gfn: r.gpa >> PAGE_SHIFT,
                            npages,
                            file: file.or(old.and_then(|o| o.file)),
                            hva,
                            metadata,
                        });
                    }
                    st.budget.release_fixed(freed);
                }
                Ok(res.map_or_else(fail, |()| ok()))
            },
            Outcome::is_success,
        )
    }
}
