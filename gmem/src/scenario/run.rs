//! Runs a parsed scenario on any [`Hypervisor`]: binds handles, performs each
//! operation through the contract and compares its outcome with the line's.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::Serialize;

use super::ast::{
    FdRef, FileOp, Line, Op, Outcome, Region, RequireKind, Requirement, Scenario, Userspace,
};
use crate::error::Error;
use crate::hypervisor::{
    GuestMemfd, GuestOp, HostFault, HostMemory, Hypervisor, MapKind, Pin, Vcpu, VcpuExit, Vm,
};
use crate::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_memory_attributes2, kvm_pre_fault_memory,
    kvm_userspace_memory_region, kvm_userspace_memory_region2, KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_VM_TYPES, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED,
};

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

/// Runs `scenario` on `hv`: every line runs, even after a mismatch, so that
/// one report shows every difference.
pub fn run(hv: &dyn Hypervisor, scenario: &Scenario) -> ScenarioRun {
    if let Some(reason) = unmet_requirement(hv, &scenario.requires) {
        return ScenarioRun {
            skipped: Some(reason),
            lines: Vec::new(),
        };
    }
    let mut st = State {
        hv,
        handles: HashMap::new(),
        memfd: None,
    };
    let lines = scenario
        .lines
        .iter()
        .map(|line| {
            let (actual, detail) = match st.exec(line) {
                Ok((o, d)) => (Some(o), d),
                Err(NotRun(why)) => (None, Some(why)),
            };
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
    // Handles drop here, vCPUs before their VMs (field order of VmState).
    drop(st);
    ScenarioRun {
        skipped: None,
        lines,
    }
}

struct NotRun(String);

type Exec = Result<(Outcome, Option<String>), NotRun>;

struct VmState {
    // Declared first: dropped before the VM it runs in.
    vcpu: Option<Box<dyn Vcpu>>,
    hypercall_enabled: bool,
    vm: Box<dyn Vm>,
}

enum Handle {
    Vm(VmState),
    Gmem(Box<dyn GuestMemfd>),
    Mem(Box<dyn HostMemory>),
    /// Held for its `Drop`, which releases the pages.
    Pin {
        _held: Box<dyn Pin>,
    },
}

struct State<'a> {
    hv: &'a dyn Hypervisor,
    handles: HashMap<String, Handle>,
    memfd: Option<OwnedFd>,
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

    fn gmem(&self, name: &str) -> Result<&dyn GuestMemfd, NotRun> {
        match self.handles.get(name) {
            Some(Handle::Gmem(g)) => Ok(g.as_ref()),
            Some(_) => Err(NotRun(format!("`{name}` is not a guest_memfd"))),
            None => Err(missing(name)),
        }
    }

    fn mem(&self, name: &str) -> Result<&dyn HostMemory, NotRun> {
        match self.handles.get(name) {
            Some(Handle::Mem(m)) => Ok(m.as_ref()),
            Some(_) => Err(NotRun(format!("`{name}` is not host memory or a mapping"))),
            None => Err(missing(name)),
        }
    }

    fn bind(&mut self, line: &Line, h: Handle) {
        // An unbound result (e.g. `create_vm type=1 => ...` that succeeded)
        // is dropped at once.
        if let Some(name) = &line.bind {
            self.handles.insert(name.clone(), h);
        }
    }

    fn exec(&mut self, line: &Line) -> Exec {
        let hv = self.hv;
        match &line.op {
            Op::CreateVm { vm_type } => match hv.create_vm(*vm_type) {
                Ok(vm) => {
                    self.bind(
                        line,
                        Handle::Vm(VmState {
                            vcpu: None,
                            hypercall_enabled: false,
                            vm,
                        }),
                    );
                    Ok(ok())
                }
                Err(e) => Ok(fail(e)),
            },
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
                match self.vm(vm)?.vm.create_guest_memfd(args) {
                    Ok(g) => {
                        self.bind(line, Handle::Gmem(g));
                        Ok(ok())
                    }
                    Err(e) => Ok(fail(e)),
                }
            }
            Op::HostMemory { size } => match hv.host_memory(*size) {
                Ok(m) => {
                    self.bind(line, Handle::Mem(m));
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
                let g = self.gmem(gmem)?;
                let kind = if *private {
                    MapKind::Private
                } else {
                    MapKind::Shared
                };
                match g.mmap(*offset, size.unwrap_or_else(|| g.size()), kind) {
                    Ok(m) => {
                        self.bind(line, Handle::Mem(m));
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
                Ok(self
                    .vm(vm)?
                    .vm
                    .set_memory_attributes(a)
                    .map_or_else(fail, |()| ok()))
            }
            Op::Fallocate {
                gmem,
                mode,
                offset,
                len,
            } => Ok(self
                .gmem(gmem)?
                .fallocate(*mode, *offset, *len)
                .map_or_else(fail, |()| ok())),
            Op::HostWrite {
                mem,
                offset,
                byte,
                len,
            } => {
                let buf = vec![*byte; *len as usize];
                match self.mem(mem)?.write(*offset, &buf) {
                    Ok(()) => Ok(ok()),
                    Err(f) => host_fault(f),
                }
            }
            Op::HostRead { mem, offset } => {
                let mut b = [0u8];
                match self.mem(mem)?.read(*offset, &mut b) {
                    Ok(()) => Ok(value(b[0].into(), true)),
                    Err(f) => host_fault(f),
                }
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
                let g = self.gmem(gmem)?;
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
            Op::Stat { gmem } => Ok(match self.gmem(gmem)?.stat() {
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
                let sa = self.gmem(a)?.stat();
                let sb = self.gmem(b)?.stat();
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
                let st = self.vcpu_of(vm)?;
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
                Ok(match self.gmem(gmem)?.set_memory_attributes2(&mut a) {
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
            Op::Pin { mem, offset, len } => match self.mem(mem)?.pin(*offset, *len) {
                Ok(p) => {
                    self.bind(line, Handle::Pin { _held: p });
                    Ok(ok())
                }
                Err(e) => Ok(fail(e)),
            },
            Op::Mbind {
                mem,
                offset,
                size,
                policy,
                flags,
            } => {
                let m = self.mem(mem)?;
                let len = size.unwrap_or_else(|| m.len().saturating_sub(*offset));
                Ok(m.mbind(*offset, len, *policy, *flags)
                    .map_or_else(fail, |()| ok()))
            }
            Op::GetMempolicy { mem, offset } => Ok(match self.mem(mem)?.get_mempolicy(*offset) {
                Ok(policy) => (Outcome::Policy { policy }, None),
                Err(e) => fail(e),
            }),
            Op::Madvise {
                mem,
                offset,
                size,
                advice,
            } => {
                let m = self.mem(mem)?;
                let len = size.unwrap_or_else(|| m.len().saturating_sub(*offset));
                Ok(m.madvise(*offset, len, *advice)
                    .map_or_else(fail, |()| ok()))
            }
            Op::Close { handle } => match self.handles.remove(handle) {
                Some(h) => {
                    drop(h);
                    Ok(ok())
                }
                None => Err(missing(handle)),
            },
        }
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
                GuestOp::MapGpaRange { .. } => value(v, false),
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
                Some(Handle::Gmem(g)) => g.as_raw_fd() as u32,
                Some(Handle::Vm(v)) => v.vm.as_raw_fd() as u32,
                Some(Handle::Mem(_) | Handle::Pin { .. }) => {
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
            Userspace::Handle(name) => self.mem(name)?.addr(),
        };
        let userspace_addr = base.wrapping_add(r.userspace_offset);
        let fd = self.fd_of(&r.guest_memfd)?;
        let slot = (r.as_id << 16) | r.slot;
        let vm = &self.vm(&r.vm)?.vm;
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
        Ok(res.map_or_else(fail, |()| ok()))
    }
}
