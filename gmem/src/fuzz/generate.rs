//! Random scenarios: deterministic from a seed, valid-looking, biased toward
//! edges.
//!
//! The generator keeps a little state of its own (the VMs, files, mappings
//! and slots it asked for, and which handles it closed) so that most lines
//! do something meaningful: a bind names a live file, a guest access aims at
//! a slot it created, a host access stays inside its mapping. Around that it
//! picks edges on purpose: the first and last byte of a page or a file, a
//! file range or gfn range that overlaps one bound before, a binding past
//! the end of the file, a slot whose `userspace_addr` is 0, the file's own
//! mapping or other host memory, a handle closed under a live slot, memory
//! reused after close. A creation it expects to fail is left unbound, so no
//! later line depends on it.
//!
//! Two bounds hold for every program: a memory budget (what the program can
//! make the host commit: file pages allocated or touched, host memory
//! written), and, when the KVM backend runs it, that backend's rules (no
//! gpa in its setup range `[0xE000_0000, 0xE040_0000)`, not its slot 32700,
//! guest accesses below 2^36, a slot's userspace range inside the memory it
//! names).

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::hypervisor::Hypervisor;
use crate::kvm::guest::{SETUP_GPA, SETUP_SIZE, SETUP_SLOT};
use crate::scenario::ast::{FdRef, FileOp, Line, Op, Outcome, Region, Scenario, Userspace};
use crate::uapi::{
    CAPS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_PRE_FAULT_MEMORY, KVM_CAP_VM_TYPES, KVM_HC_MAP_GPA_RANGE, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_X86_DEFAULT_VM,
    KVM_X86_SW_PROTECTED_VM, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;

/// The KVM backend's reserved guest physical range (rule `KVM-SETUP`).
pub const KVM_SETUP_GPA: std::ops::Range<u64> = SETUP_GPA..SETUP_GPA + SETUP_SIZE;
/// The KVM backend's reserved slot (rule `KVM-SETUP`).
pub const KVM_SETUP_SLOT: u32 = SETUP_SLOT;
/// Guest accesses stay below this when the KVM backend runs them: every
/// x86-64 CPU has a MAXPHYADDR of at least 36 bits.
pub const KVM_GUEST_GPA_LIMIT: u64 = 1 << 36;

/// What the backends that will run the programs support: the generator
/// stays inside it, so that a difference is never only a missing capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// VM types `KVM_CREATE_VM` accepts.
    pub vm_types: Vec<u64>,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` on the system fd.
    pub gmem_flags: u64,
    /// `KVM_SET_MEMORY_ATTRIBUTES` exists.
    pub memory_attributes: bool,
    /// `KVM_CAP_EXIT_HYPERCALL` offers `KVM_HC_MAP_GPA_RANGE`.
    pub exit_hypercall: bool,
    /// Address spaces per VM (at least 1).
    pub address_spaces: u32,
    /// `KVM_PRE_FAULT_MEMORY` exists.
    pub pre_fault: bool,
    /// `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd (in-place conversion)
    /// exists, and with it pinning.
    pub gmem_attributes: bool,
    /// Stay within the KVM backend's rules (setup range and slot, guest
    /// gpa limit, userspace ranges inside the memory they name).
    pub kvm_rules: bool,
}

impl Profile {
    /// What `hv` supports, from its capabilities.
    pub fn of(hv: &dyn Hypervisor) -> Profile {
        let types = hv.check_extension(KVM_CAP_VM_TYPES) as u64;
        let vm_types = if types == 0 {
            vec![KVM_X86_DEFAULT_VM as u64]
        } else {
            (0..64).filter(|t| types >> t & 1 == 1).collect()
        };
        Profile {
            vm_types,
            gmem_flags: hv.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64,
            memory_attributes: hv.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) != 0,
            exit_hypercall: hv.check_extension(KVM_CAP_EXIT_HYPERCALL) as u64
                & (1 << KVM_HC_MAP_GPA_RANGE)
                != 0,
            address_spaces: hv.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE).max(1) as u32,
            pre_fault: hv.check_extension(KVM_CAP_PRE_FAULT_MEMORY) != 0,
            gmem_attributes: hv.check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) != 0,
            kvm_rules: hv.name() == "kvm",
        }
    }

    /// What both support.
    pub fn intersect(&self, other: &Profile) -> Profile {
        Profile {
            vm_types: self
                .vm_types
                .iter()
                .copied()
                .filter(|t| other.vm_types.contains(t))
                .collect(),
            gmem_flags: self.gmem_flags & other.gmem_flags,
            memory_attributes: self.memory_attributes && other.memory_attributes,
            exit_hypercall: self.exit_hypercall && other.exit_hypercall,
            address_spaces: self.address_spaces.min(other.address_spaces),
            pre_fault: self.pre_fault && other.pre_fault,
            gmem_attributes: self.gmem_attributes && other.gmem_attributes,
            kvm_rules: self.kvm_rules || other.kvm_rules,
        }
    }
}

/// Bounds on one program.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Operation lines at most.
    pub max_lines: usize,
    /// Bytes the program may make the host commit (allocations, writes,
    /// touched pages), counted pessimistically.
    pub memory: u64,
    /// `guest_map_gpa_range` lines at most (a hypercall that never exits
    /// costs the KVM backend its whole run bound).
    pub max_hypercalls: usize,
    /// The share of programs that may have a `guest_map_gpa_range` line.
    pub hypercall_share: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_lines: 40,
            memory: 32 << 20,
            max_hypercalls: 1,
            hypercall_share: 0.03,
        }
    }
}

/// The program for `seed`: the same seed, profile and limits always give
/// the same program. Its path is `fuzz-SEED.gmem`; every expectation is `ok`
/// (the runner reports what happened, which is what the fuzzer compares).
pub fn generate(seed: u64, profile: &Profile, limits: &Limits) -> Scenario {
    let mut g = Gen {
        rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        profile,
        limits,
        lines: Vec::new(),
        vms: Vec::new(),
        files: Vec::new(),
        mems: Vec::new(),
        pins: Vec::new(),
        names: 0,
        committed: 0,
        hypercalls: 0,
        hypercall_weight: 0,
    };
    g.program();
    let lines = g
        .lines
        .into_iter()
        .enumerate()
        .map(|(i, (bind, op))| Line {
            line: i + 1,
            text: String::new(),
            bind,
            op,
            expect: Outcome::Ok,
            since: Vec::new(),
        })
        .collect();
    renumber(Scenario {
        path: format!("fuzz-{seed}.gmem"),
        requires: Vec::new(),
        lines,
    })
}

/// Gives every line its number (1-based, after the `require` line if
/// any) and its text as printed, as if the file had been parsed.
pub fn renumber(mut sc: Scenario) -> Scenario {
    let first = usize::from(!sc.requires.is_empty()) + 1;
    for r in &mut sc.requires {
        r.line = 1;
    }
    for (i, l) in sc.lines.iter_mut().enumerate() {
        l.line = first + i;
        l.text = super::print::print_line(l);
    }
    sc
}

/// What a program can make the host commit, counted as the generator
/// counts it: an allocation's part inside its file, each host write's
/// length plus a page, a page for each host read and guest access.
pub fn commit_bound(sc: &Scenario) -> u64 {
    let mut sizes = std::collections::HashMap::new();
    let mut total = 0u64;
    for l in &sc.lines {
        match &l.op {
            Op::CreateGuestMemfd { size, .. } => {
                if let Some(b) = &l.bind {
                    sizes.insert(b.clone(), *size);
                }
            }
            Op::Fallocate {
                gmem,
                mode,
                offset,
                len,
            } if *mode == FALLOC_FL_KEEP_SIZE => {
                let fsize = sizes.get(gmem).copied().unwrap_or(0);
                let covered =
                    (*len.max(&0) as u64).min(fsize.saturating_sub(*offset.max(&0) as u64));
                total = total.saturating_add(covered);
            }
            Op::HostWrite { len, .. } => total = total.saturating_add(len + P),
            Op::Madvise { size, .. } => total = total.saturating_add(size.unwrap_or(u64::MAX)),
            Op::PreFault { size, .. } => total = total.saturating_add(*size),
            Op::HostRead { .. } | Op::GuestRead { .. } | Op::GuestWrite { .. } => total += P,
            _ => {}
        }
    }
    total
}

struct VmG {
    name: String,
    vm_type: u64,
    live: bool,
    /// (slot, as, gpa, size) of every region asked for, succeeded or not.
    slots: Vec<(u32, u32, u64, u64)>,
}

struct FileG {
    name: String,
    vm: usize,
    size: u64,
    flags: u64,
    live: bool,
}

struct MemG {
    name: String,
    size: u64,
    /// The file it maps, or `None` for the VMM's own memory.
    file: Option<usize>,
    live: bool,
}

struct Gen<'a> {
    rng: Xoshiro256PlusPlus,
    profile: &'a Profile,
    limits: &'a Limits,
    lines: Vec<(Option<String>, Op)>,
    vms: Vec<VmG>,
    files: Vec<FileG>,
    mems: Vec<MemG>,
    /// Pin handles not yet closed.
    pins: Vec<String>,
    names: usize,
    committed: u64,
    hypercalls: usize,
    hypercall_weight: u32,
}

/// Base gpas the programs play in: page boundaries, the 1 MiB and 4 GiB
/// lines, zero.
const GPAS: &[u64] = &[
    0,
    0x1000,
    0x10_0000,
    0x10_1000,
    0x20_0000,
    0x40_0000,
    0x1000_0000,
    0xDFFF_F000,
    0xE040_0000,
    0x1_0000_0000,
];

/// Slot ids: a few small ones (so that requests collide) and the edges.
const SLOTS: &[u32] = &[0, 1, 1, 2, 2, 3, 4, 5];
const EDGE_SLOTS: &[u32] = &[32763, 32764, 0x7fff, 0xffff];

/// Ioctl requests on a guest_memfd: unknown ones, and those the VFS answers
/// for every file (FIOCLEX, FIONCLEX, FIONBIO, FIOASYNC, FIGETBSZ,
/// FIONREAD, FIOQSIZE), one with bits above 31.
const IOCTLS: &[u64] = &[
    0xAEFF,
    0xAE00,
    0x5451,
    0x5450,
    0x5421,
    0x5452,
    0x2,
    0x541B,
    0x5460,
    0x1_0000_5451,
];

impl Gen<'_> {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.rng.random_range(0..xs.len())]
    }

    /// A choice among weighted values.
    fn weighted<T: Copy>(&mut self, xs: &[(u32, T)]) -> T {
        let total: u32 = xs.iter().map(|(w, _)| w).sum();
        let mut at = self.rng.random_range(0..total);
        for (w, x) in xs {
            if at < *w {
                return *x;
            }
            at -= w;
        }
        xs[xs.len() - 1].1
    }

    fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    fn push(&mut self, bind: Option<String>, op: Op) {
        self.lines.push((bind, op));
    }

    fn live_vms(&self) -> Vec<usize> {
        (0..self.vms.len()).filter(|i| self.vms[*i].live).collect()
    }

    fn live_files(&self) -> Vec<usize> {
        (0..self.files.len())
            .filter(|i| self.files[*i].live)
            .collect()
    }

    fn live_mems(&self) -> Vec<usize> {
        (0..self.mems.len())
            .filter(|i| self.mems[*i].live)
            .collect()
    }

    fn program(&mut self) {
        // Most programs start with a VM and a file: that is where the rules are.
        if self.chance(self.limits.hypercall_share.clamp(0.0, 1.0)) {
            self.hypercall_weight = 8;
        }
        self.create_vm(true);
        if self.chance(0.85) {
            self.create_file(true);
        }
        let n = self.rng.random_range(3..=self.limits.max_lines.max(4) - 2);
        while self.lines.len() < n {
            self.step();
        }
    }

    fn step(&mut self) {
        #[derive(Clone, Copy)]
        enum K {
            Vm,
            File,
            Host,
            Mmap,
            Bind,
            BindPlain,
            Delete,
            Attr,
            Falloc,
            HostW,
            HostR,
            GuestW,
            GuestR,
            Hyper,
            FileOp,
            Stat,
            Same,
            Cap,
            Close,
            PreFault,
            Attr2,
            Pin,
            Mbind,
            GetPolicy,
            Madvise,
        }
        let (pf, conv) = (
            u32::from(self.profile.pre_fault) * 2,
            u32::from(self.profile.gmem_attributes) * 3,
        );
        let k = self.weighted(&[
            (pf, K::PreFault),
            (conv, K::Attr2),
            (conv, K::Pin),
            (2, K::Mbind),
            (1, K::GetPolicy),
            (2, K::Madvise),
            (2, K::Vm),
            (5, K::File),
            (3, K::Host),
            (6, K::Mmap),
            (10, K::Bind),
            (3, K::BindPlain),
            (4, K::Delete),
            (3, K::Attr),
            (5, K::Falloc),
            (6, K::HostW),
            (6, K::HostR),
            (9, K::GuestW),
            (11, K::GuestR),
            (self.hypercall_weight, K::Hyper),
            (2, K::FileOp),
            (2, K::Stat),
            (1, K::Same),
            (2, K::Cap),
            (5, K::Close),
        ]);
        match k {
            K::Vm => {
                let bound = self.vms.len() < 3;
                self.create_vm(bound)
            }
            K::File => self.create_file(self.files.len() < 5),
            K::Host => self.host_memory(),
            K::Mmap => self.mmap(),
            K::Bind => self.bind_gmem(),
            K::BindPlain => self.bind_plain(),
            K::Delete => self.delete(),
            K::Attr => self.attributes(),
            K::Falloc => self.fallocate(),
            K::HostW => self.host_access(true),
            K::HostR => self.host_access(false),
            K::GuestW => self.guest_access(true),
            K::GuestR => self.guest_access(false),
            K::Hyper => self.hypercall(),
            K::FileOp => self.file_op(),
            K::Stat => self.stat(),
            K::Same => self.same_inode(),
            K::Cap => self.check_extension(),
            K::Close => self.close(),
            K::PreFault => self.pre_fault(),
            K::Attr2 => self.attributes2(),
            K::Pin => self.pin(),
            K::Mbind => self.mbind(),
            K::GetPolicy => self.get_mempolicy(),
            K::Madvise => self.madvise(),
        }
    }

    fn madvise(&mut self) {
        let Some((mem, offset, msize)) = self.mem_offset() else {
            return;
        };
        // Always a length: populating the rest of a mapping commits it.
        let room = msize - offset;
        let size = self
            .weighted(&[(4, P), (2, 4 * P), (1, room), (1, 0)])
            .min(room.min(64 << 10));
        if self.committed + size > self.limits.memory {
            return;
        }
        self.committed += size;
        let advice = self.pick(&crate::madvise::Advice::ALL);
        self.push(
            None,
            Op::Madvise {
                mem,
                offset,
                size: Some(size),
                advice,
            },
        );
    }

    /// A live mapping or host memory and an offset into it (a page
    /// boundary or the last page).
    fn mem_offset(&mut self) -> Option<(String, u64, u64)> {
        let mems = self.live_mems();
        if mems.is_empty() {
            return None;
        }
        let m = self.pick(&mems);
        let size = self.mems[m].size;
        let offset = self.weighted(&[(4, 0), (2, P), (1, size.saturating_sub(P))]) & !(P - 1);
        Some((self.mems[m].name.clone(), offset.min(size - 1), size))
    }

    fn mbind(&mut self) {
        let Some((mem, offset, msize)) = self.mem_offset() else {
            return;
        };
        let size = self.weighted(&[(4, None), (2, Some(P.min(msize - offset))), (1, Some(0))]);
        let mode = self.pick(&crate::MpolMode::ALL);
        let nodes = self.weighted(&[
            (3, crate::NodeMask::node(0)),
            (2, crate::NodeMask::NONE),
            (1, crate::NodeMask(0b11)),
        ]);
        let mode_flags = self.weighted(&[
            (6, crate::ModeFlags::empty()),
            (1, crate::ModeFlags::STATIC_NODES),
        ]);
        let flags = self.weighted(&[
            (6, crate::MbindFlags::empty()),
            (1, crate::MbindFlags::STRICT),
            (1, crate::MbindFlags::MOVE),
        ]);
        let policy = crate::MemPolicy::new(mode, nodes).with_flags(mode_flags);
        self.push(
            None,
            Op::Mbind {
                mem,
                offset,
                size,
                policy,
                flags,
            },
        );
    }

    fn get_mempolicy(&mut self) {
        let Some((mem, offset, _)) = self.mem_offset() else {
            return;
        };
        self.push(None, Op::GetMempolicy { mem, offset });
    }

    fn pre_fault(&mut self) {
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        let gpa = self.guest_gpa(vm) & !(P - 1);
        let size = self.weighted(&[(4, P), (2, 2 * P), (1, 0), (1, 2 << 20)]);
        if self.committed + size > self.limits.memory {
            return;
        }
        self.committed += size;
        let flags = if self.chance(0.05) { 1 } else { 0 };
        let vm = self.vms[vm].name.clone();
        self.push(
            None,
            Op::PreFault {
                vm,
                gpa,
                size,
                flags,
            },
        );
    }

    fn attributes2(&mut self) {
        let files = self.live_files();
        if files.is_empty() {
            return;
        }
        let f = self.pick(&files);
        let fsize = self.files[f].size;
        let offset = self.weighted(&[(4, 0), (2, P), (1, fsize.saturating_sub(P)), (1, 1)]);
        let size = self.weighted(&[(4, P), (2, 2 * P), (1, 0), (1, fsize)]);
        let attributes = if self.chance(0.6) {
            KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
        } else {
            0
        };
        let flags = if self.chance(0.05) { 1 } else { 0 };
        let gmem = self.files[f].name.clone();
        self.push(
            None,
            Op::SetMemoryAttributes2 {
                gmem,
                offset,
                size,
                attributes,
                flags,
            },
        );
    }

    fn pin(&mut self) {
        let mems = self.live_mems();
        if mems.is_empty() {
            return;
        }
        let m = self.pick(&mems);
        let size = self.mems[m].size;
        let offset = self.pick(&[0, P]).min(size - 1) & !(P - 1);
        let len = P.min(size - offset);
        let name = self.name("p");
        self.pins.push(name.clone());
        let mem = self.mems[m].name.clone();
        self.push(Some(name), Op::Pin { mem, offset, len });
    }

    fn create_vm(&mut self, bound: bool) {
        let types = self.profile.vm_types.clone();
        let vm_type = if types.is_empty() || (!bound && self.chance(0.5)) {
            // A type no x86 host has, or one this host lacks: refused alike.
            self.pick(&[6u64, 63, 64, 0xffff_ffff])
        } else {
            self.pick(&types)
        };
        let valid = types.contains(&vm_type);
        if bound && valid {
            let name = self.name("vm");
            self.vms.push(VmG {
                name: name.clone(),
                vm_type,
                live: true,
                slots: Vec::new(),
            });
            self.push(Some(name), Op::CreateVm { vm_type });
        } else {
            self.push(None, Op::CreateVm { vm_type });
        }
    }

    /// The flags a file of a VM of this type may have (CAP-3).
    fn flags_for(&self, vm_type: u64) -> u64 {
        if vm_type == KVM_X86_SW_PROTECTED_VM as u64 {
            self.profile.gmem_flags & GUEST_MEMFD_FLAG_MMAP
        } else {
            self.profile.gmem_flags
        }
    }

    fn create_file(&mut self, bound: bool) {
        let vms = self.vms.len();
        if vms == 0 {
            return;
        }
        // A closed VM handle cannot be named; files of it already made stay.
        let live = self.live_vms();
        if live.is_empty() {
            return;
        }
        let vm = self.pick(&live);
        let supported = self.flags_for(self.vms[vm].vm_type);
        let both = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        let flags = self.weighted(&[
            (6, supported & both),
            (3, supported & GUEST_MEMFD_FLAG_MMAP),
            (2, 0),
            (1, GUEST_MEMFD_FLAG_INIT_SHARED),
            (1, 1 << 5),
        ]);
        let size = self.weighted(&[
            (4, 4 * P),
            (3, 2 * P),
            (4, 16 * P),
            (2, P),
            (1, 2 << 20),
            (1, 0),
            (1, P + 1),
            (1, 1 << 40),
            (1, (-(P as i64)) as u64),
        ]);
        let reserved = if self.chance(0.05) { 1 } else { 0 };
        let valid = flags & !supported == 0 && size > 0 && size % P == 0 && (size as i64) > 0;
        let op = Op::CreateGuestMemfd {
            vm: self.vms[vm].name.clone(),
            size,
            flags,
            reserved,
        };
        if bound && valid {
            let name = self.name("g");
            self.files.push(FileG {
                name: name.clone(),
                vm,
                size,
                flags,
                live: true,
            });
            self.push(Some(name), op);
        } else {
            self.push(None, op);
        }
    }

    fn host_memory(&mut self) {
        let size = self.weighted(&[(4, 4 * P), (3, 16 * P), (2, P), (1, 2 << 20), (1, 0)]);
        if size == 0 {
            self.push(None, Op::HostMemory { size });
            return;
        }
        let name = self.name("h");
        self.mems.push(MemG {
            name: name.clone(),
            size,
            file: None,
            live: true,
        });
        self.push(Some(name), Op::HostMemory { size });
    }

    fn mmap(&mut self) {
        let files = self.live_files();
        if files.is_empty() {
            return self.create_file(true);
        }
        let f = self.pick(&files);
        let fsize = self.files[f].size;
        let offset: i64 = self.weighted(&[
            (8, 0),
            (2, P as i64),
            (1, fsize.saturating_sub(P) as i64),
            (1, fsize as i64),
            (1, 1),
            (1, -(P as i64)),
        ]);
        let size = self.weighted(&[
            (6, None),
            (3, Some(P)),
            (1, Some(fsize.saturating_add(P))),
            (1, Some(0)),
        ]);
        // A mapping of a huge file is virtual only; still, bound the part
        // a program could touch (madvise populates whole ranges) by naming
        // a small length.
        let size = match size {
            s if s.unwrap_or(fsize) > 64 << 20 => Some(16 * P),
            s => s,
        };
        // A large private mapping meets mm's commit accounting (ENOMEM)
        // before the file is asked: keep private ones small.
        let private = self.chance(0.05) && size.unwrap_or(fsize) <= 64 << 20;
        let len = size.unwrap_or(fsize);
        let valid = self.files[f].flags & GUEST_MEMFD_FLAG_MMAP != 0
            && offset >= 0
            && offset as u64 % P == 0
            && len > 0
            && !private;
        let op = Op::Mmap {
            gmem: self.files[f].name.clone(),
            offset,
            size,
            private,
        };
        if valid {
            let name = self.name("m");
            self.mems.push(MemG {
                name: name.clone(),
                size: len,
                file: Some(f),
                live: true,
            });
            self.push(Some(name), op);
        } else {
            self.push(None, op);
        }
    }

    fn vm_or_create(&mut self) -> Option<usize> {
        let vms = self.live_vms();
        if vms.is_empty() {
            if self.vms.len() < 3 {
                self.create_vm(true);
            }
            return self.live_vms().first().copied();
        }
        Some(self.pick(&vms))
    }

    fn slot_id(&mut self) -> u32 {
        let s = if self.chance(0.04) {
            self.pick(EDGE_SLOTS)
        } else {
            self.pick(SLOTS)
        };
        if self.profile.kvm_rules && s == KVM_SETUP_SLOT {
            1
        } else {
            s
        }
    }

    fn as_id(&mut self) -> u32 {
        if self.profile.address_spaces > 1 && self.chance(0.1) {
            self.rng.random_range(1..self.profile.address_spaces)
        } else if self.chance(0.01) {
            0x7fff
        } else {
            0
        }
    }

    /// A gpa for a new slot of `size` bytes: a fresh base, or an edge
    /// against a slot asked for before (same base, just after, inside).
    fn slot_gpa(&mut self, vm: usize, size: u64) -> u64 {
        let old = self.vms[vm].slots.clone();
        let gpa = if !old.is_empty() && self.chance(0.3) {
            let (_, _, g, s) = self.pick(&old);
            self.weighted(&[
                (2, g),
                (3, g.wrapping_add(s)),
                (1, g.wrapping_add(P)),
                (1, g.wrapping_sub(size)),
            ])
        } else if self.chance(0.03) {
            self.weighted(&[(2, 0x10_0001), (1, !(P - 1)), (1, 1 << 52)])
        } else {
            self.pick(GPAS)
        };
        self.kvm_safe_gpa(gpa, size)
    }

    fn kvm_safe_gpa(&mut self, gpa: u64, size: u64) -> u64 {
        if !self.profile.kvm_rules {
            return gpa;
        }
        let end = gpa.saturating_add(size.max(1));
        if gpa < KVM_SETUP_GPA.end && end > KVM_SETUP_GPA.start {
            0x10_0000
        } else {
            gpa
        }
    }

    /// `userspace=` for a slot of `size` bytes: 0, the file's own mapping,
    /// other host memory, or a raw address; the range stays inside the
    /// memory it names when the KVM backend runs it (rule gmem-safety).
    fn userspace(&mut self, size: u64, file: Option<usize>) -> (Userspace, u64) {
        let mems: Vec<usize> = self
            .live_mems()
            .into_iter()
            .filter(|m| self.mems[*m].size >= size)
            .collect();
        let own: Vec<usize> = mems
            .iter()
            .copied()
            .filter(|m| file.is_some() && self.mems[*m].file == file)
            .collect();
        let choice = self.weighted(&[(4, 0), (4, 1), (3, 2), (1, 3)]);
        let mem = match choice {
            1 if !own.is_empty() => Some(self.pick(&own)),
            1 | 2 if !mems.is_empty() => Some(self.pick(&mems)),
            3 => {
                let a = self.pick(&[0x1000u64, 0x1001, 0xffff_ffff_ffff_f000]);
                return (Userspace::Addr(a), 0);
            }
            _ => None,
        };
        let Some(m) = mem else {
            return (Userspace::Addr(0), 0);
        };
        let room = self.mems[m].size - size;
        let offset = if room >= P && self.chance(0.3) {
            self.pick(&[P, room & !(P - 1)])
        } else if room >= P && self.chance(0.03) {
            1
        } else {
            0
        };
        (Userspace::Handle(self.mems[m].name.clone()), offset)
    }

    fn bind_gmem(&mut self) {
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        // Mostly a live file of this VM; sometimes another VM's, or no file.
        let own: Vec<usize> = self
            .live_files()
            .into_iter()
            .filter(|f| self.files[*f].vm == vm)
            .collect();
        let others = self.live_files();
        let file = if !own.is_empty() && self.chance(0.85) {
            Some(self.pick(&own))
        } else if !others.is_empty() && self.chance(0.5) {
            Some(self.pick(&others))
        } else {
            None
        };
        let (fd, fsize) = match file {
            Some(f) => (
                FdRef::Handle(self.files[f].name.clone()),
                self.files[f].size,
            ),
            None => {
                let fd = match self.weighted(&[(2, 0), (1, 1), (1, 2), (1, 3), (1, 4)]) {
                    0 => FdRef::Closed,
                    1 => FdRef::Kvm,
                    2 => FdRef::Memfd,
                    3 => FdRef::Raw(u32::MAX),
                    _ => FdRef::Handle(self.vms[vm].name.clone()),
                };
                (fd, 16 * P)
            }
        };
        let fsize = fsize.min(1 << 30);
        let mut size = self.weighted(&[
            (4, P),
            (3, fsize),
            (2, 2 * P),
            (1, (fsize / 2) & !(P - 1)),
            (1, P + 1),
        ]);
        if size == 0 {
            size = P;
        }
        let offset = self.weighted(&[
            (8, 0),
            (2, P),
            (2, fsize.saturating_sub(size)),
            (1, fsize),
            (1, 0x800),
        ]);
        let flags = self.weighted(&[
            (20, KVM_MEM_GUEST_MEMFD),
            (1, KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY),
            (1, KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES),
            (1, KVM_MEM_GUEST_MEMFD | 1 << 16),
        ]);
        let gpa = self.slot_gpa(vm, size);
        let (userspace, userspace_offset) = self.userspace(size, file);
        let region = Region {
            vm: self.vms[vm].name.clone(),
            slot: self.slot_id(),
            as_id: self.as_id(),
            gpa,
            size,
            flags,
            userspace,
            userspace_offset,
            guest_memfd: fd,
            offset,
            v1: self.chance(0.02),
        };
        self.vms[vm]
            .slots
            .push((region.slot, region.as_id, region.gpa, region.size));
        self.push(None, Op::SetMemoryRegion(region));
    }

    fn bind_plain(&mut self) {
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        let mut size = self.weighted(&[(4, P), (3, 4 * P), (1, 16 * P)]);
        let (userspace, userspace_offset) = match self.userspace(size, None) {
            (Userspace::Addr(0), _) if self.chance(0.5) => {
                // Ordinary memory of its own, so that the slot has data.
                self.host_memory();
                match self.mems.last() {
                    Some(m) if m.live && m.file.is_none() => {
                        size = size.min(m.size);
                        (Userspace::Handle(m.name.clone()), 0)
                    }
                    _ => (Userspace::Addr(0), 0),
                }
            }
            u => u,
        };
        let flags = self.weighted(&[(8, 0), (2, KVM_MEM_READONLY), (1, KVM_MEM_LOG_DIRTY_PAGES)]);
        let gpa = self.slot_gpa(vm, size);
        let region = Region {
            vm: self.vms[vm].name.clone(),
            slot: self.slot_id(),
            as_id: self.as_id(),
            gpa,
            size,
            flags,
            userspace,
            userspace_offset,
            guest_memfd: FdRef::Raw(0),
            offset: 0,
            v1: self.chance(0.2),
        };
        self.vms[vm]
            .slots
            .push((region.slot, region.as_id, region.gpa, region.size));
        self.push(None, Op::SetMemoryRegion(region));
    }

    fn delete(&mut self) {
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        let old = self.vms[vm].slots.clone();
        let (slot, as_id) = if !old.is_empty() && self.chance(0.85) {
            let (s, a, _, _) = self.pick(&old);
            (s, a)
        } else {
            (self.slot_id(), 0)
        };
        let flags = if self.chance(0.1) {
            KVM_MEM_GUEST_MEMFD
        } else {
            0
        };
        self.push(
            None,
            Op::SetMemoryRegion(Region {
                vm: self.vms[vm].name.clone(),
                slot,
                as_id,
                gpa: 0,
                size: 0,
                flags,
                userspace: Userspace::Addr(0),
                userspace_offset: 0,
                guest_memfd: FdRef::Raw(0),
                offset: 0,
                v1: false,
            }),
        );
    }

    /// A guest physical address to touch: mostly inside a slot asked for
    /// (its first byte, last byte, a page boundary), else a base that may
    /// have nothing.
    fn guest_gpa(&mut self, vm: usize) -> u64 {
        let slots = self.vms[vm].slots.clone();
        let gpa = if !slots.is_empty() && self.chance(0.85) {
            let (_, _, g, s) = self.pick(&slots);
            let s = s.max(1);
            let pages = s.div_ceil(P);
            let page = self.rng.random_range(0..pages) * P;
            let within = self.weighted(&[
                (4, 0),
                (2, page),
                (2, page + 0x7),
                (1, s - 1),
                (1, s),
                (1, P - 1),
            ]);
            g.wrapping_add(within)
        } else {
            self.pick(GPAS) + self.pick(&[0u64, 0x10, P - 1])
        };
        if self.profile.kvm_rules && (gpa >= KVM_GUEST_GPA_LIMIT || KVM_SETUP_GPA.contains(&gpa)) {
            0x10_0000
        } else {
            gpa
        }
    }

    fn attributes(&mut self) {
        if !self.profile.memory_attributes {
            return;
        }
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        let gpa = self.guest_gpa(vm) & !(P - 1);
        let size = self.weighted(&[(4, P), (2, 4 * P), (1, 0), (1, P + 1)]);
        let private = self.vms[vm].vm_type != KVM_X86_DEFAULT_VM as u64 || self.chance(0.2);
        let attributes = if private && self.chance(0.7) {
            KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
        } else {
            0
        };
        let flags = if self.chance(0.03) { 1 } else { 0 };
        self.push(
            None,
            Op::SetMemoryAttributes {
                vm: self.vms[vm].name.clone(),
                gpa,
                size,
                attributes,
                flags,
            },
        );
    }

    fn fallocate(&mut self) {
        let files = self.live_files();
        if files.is_empty() {
            return self.create_file(true);
        }
        let f = self.pick(&files);
        let fsize = self.files[f].size;
        let keep = FALLOC_FL_KEEP_SIZE;
        let punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
        let mut mode = self.weighted(&[
            (4, keep),
            (5, punch),
            (1, 0),
            (1, FALLOC_FL_PUNCH_HOLE),
            (1, keep | 0x10),
        ]);
        let offset: i64 = self.weighted(&[
            (5, 0),
            (3, P as i64),
            (2, fsize.saturating_sub(P) as i64),
            (1, fsize as i64),
            (1, 1),
            (1, -(P as i64)),
        ]);
        let len: i64 = self.weighted(&[
            (4, P as i64),
            (2, 2 * P as i64),
            (2, fsize as i64),
            (2, fsize.saturating_sub(offset.max(0) as u64) as i64),
            (1, 0),
            (1, 1),
            (1, 1 << 62),
        ]);
        if mode == keep {
            // An allocation commits what it covers inside the file: keep
            // it within the budget, else punch instead.
            let covered = (len.max(0) as u64).min(fsize.saturating_sub(offset.max(0) as u64));
            if self.committed + covered > self.limits.memory {
                mode = punch;
            } else {
                self.committed += covered;
            }
        }
        self.push(
            None,
            Op::Fallocate {
                gmem: self.files[f].name.clone(),
                mode,
                offset,
                len,
            },
        );
    }

    fn host_access(&mut self, write: bool) {
        let mems = self.live_mems();
        if mems.is_empty() {
            return if self.chance(0.5) {
                self.host_memory()
            } else {
                self.mmap()
            };
        }
        let m = self.pick(&mems);
        let size = self.mems[m].size;
        let page = self.rng.random_range(0..size.div_ceil(P)) * P;
        let offset = self
            .weighted(&[(4, 0), (2, page), (2, page + 7), (1, size - 1), (1, P - 1)])
            .min(size - 1);
        let name = self.mems[m].name.clone();
        if write {
            let room = size - offset;
            let len = self
                .weighted(&[(8, 1), (2, 2), (1, P), (1, room)])
                .clamp(1, room.min(64 << 10));
            if self.committed + len + P > self.limits.memory {
                return;
            }
            self.committed += len + P;
            let byte = self.rng.random_range(1..=255u8);
            self.push(
                None,
                Op::HostWrite {
                    mem: name,
                    offset,
                    byte,
                    len,
                },
            );
        } else {
            if self.committed + P > self.limits.memory {
                return;
            }
            self.committed += P;
            self.push(None, Op::HostRead { mem: name, offset });
        }
    }

    fn guest_access(&mut self, write: bool) {
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        if self.committed + P > self.limits.memory {
            return;
        }
        self.committed += P;
        let gpa = self.guest_gpa(vm);
        let name = self.vms[vm].name.clone();
        if write {
            let byte = self.rng.random_range(1..=255u8);
            self.push(
                None,
                Op::GuestWrite {
                    vm: name,
                    gpa,
                    byte,
                },
            );
        } else {
            self.push(None, Op::GuestRead { vm: name, gpa });
        }
    }

    fn hypercall(&mut self) {
        if !self.profile.exit_hypercall || self.hypercalls >= self.limits.max_hypercalls {
            return;
        }
        let Some(vm) = self.vm_or_create() else {
            return;
        };
        self.hypercalls += 1;
        let gpa = self.guest_gpa(vm) & !(P - 1);
        let pages = self.weighted(&[(4, 1), (2, 4), (1, 512), (1, 0)]);
        let private = self.chance(0.5);
        let name = self.vms[vm].name.clone();
        self.push(
            None,
            Op::GuestMapGpaRange {
                vm: name,
                gpa,
                pages,
                private,
            },
        );
    }

    fn file_op(&mut self) {
        let files = self.live_files();
        if files.is_empty() {
            return;
        }
        let f = self.pick(&files);
        let op = match self.rng.random_range(0..7) {
            0 => FileOp::Read,
            1 => FileOp::Write,
            2 => FileOp::Pread,
            3 => FileOp::Pwrite,
            4 => FileOp::Lseek,
            5 => FileOp::Ftruncate(self.pick(&[0, self.files[f].size as i64, -1])),
            _ => FileOp::Ioctl(self.pick(IOCTLS)),
        };
        let gmem = self.files[f].name.clone();
        self.push(None, Op::File { gmem, op });
    }

    fn stat(&mut self) {
        let files = self.live_files();
        if files.is_empty() {
            return;
        }
        let f = self.pick(&files);
        let gmem = self.files[f].name.clone();
        self.push(None, Op::Stat { gmem });
    }

    fn same_inode(&mut self) {
        let files = self.live_files();
        if files.is_empty() {
            return;
        }
        let a = self.pick(&files);
        let b = self.pick(&files);
        let (a, b) = (self.files[a].name.clone(), self.files[b].name.clone());
        self.push(None, Op::SameInode { a, b });
    }

    fn check_extension(&mut self) {
        let cap = if self.chance(0.1) {
            self.pick(&[0u32, 9999])
        } else {
            self.pick(CAPS).1
        };
        let vms = self.live_vms();
        let vm = if !vms.is_empty() && self.chance(0.5) {
            let v = self.pick(&vms);
            Some(self.vms[v].name.clone())
        } else {
            None
        };
        self.push(None, Op::CheckExtension { vm, cap });
    }

    fn close(&mut self) {
        // Files and host memory most: that is what slots and mappings
        // outlive; VMs sometimes (their files keep them alive).
        let pins = u32::from(!self.pins.is_empty()) * 2;
        let which = self.weighted(&[(4, 0), (4, 1), (1, 2), (pins, 3)]);
        let handle = match which {
            3 => {
                let i = self.rng.random_range(0..self.pins.len());
                self.pins.swap_remove(i)
            }
            0 => {
                let fs = self.live_files();
                if fs.is_empty() {
                    return;
                }
                let f = self.pick(&fs);
                self.files[f].live = false;
                self.files[f].name.clone()
            }
            1 => {
                let ms = self.live_mems();
                if ms.is_empty() {
                    return;
                }
                let m = self.pick(&ms);
                self.mems[m].live = false;
                self.mems[m].name.clone()
            }
            _ => {
                let vs = self.live_vms();
                if vs.len() < 2 {
                    return;
                }
                let v = self.pick(&vs);
                self.vms[v].live = false;
                self.vms[v].name.clone()
            }
        };
        self.push(None, Op::Close { handle });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::print::print;
    use crate::scenario::parse;

    fn soft_profile() -> Profile {
        Profile {
            vm_types: vec![0, 1],
            gmem_flags: 3,
            memory_attributes: true,
            exit_hypercall: true,
            address_spaces: 2,
            pre_fault: true,
            gmem_attributes: true,
            kvm_rules: false,
        }
    }

    fn kvm_profile() -> Profile {
        Profile {
            vm_types: vec![0],
            gmem_flags: 3,
            memory_attributes: false,
            exit_hypercall: true,
            address_spaces: 1,
            pre_fault: false,
            gmem_attributes: false,
            kvm_rules: true,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_program() {
        let p = soft_profile();
        let l = Limits::default();
        for seed in 0..50 {
            assert_eq!(
                print(&generate(seed, &p, &l)),
                print(&generate(seed, &p, &l))
            );
        }
        assert_ne!(print(&generate(1, &p, &l)), print(&generate(2, &p, &l)));
    }

    #[test]
    fn programs_print_as_they_parse() {
        for (i, p) in [soft_profile(), kvm_profile()].iter().enumerate() {
            for seed in 0..300 {
                let sc = generate(seed, p, &Limits::default());
                let text = print(&sc);
                let back = parse(&sc.path, &text)
                    .unwrap_or_else(|e| panic!("profile {i} seed {seed}:\n{text}\n{e}"));
                assert_eq!(print(&back), text, "profile {i} seed {seed}");
                assert_eq!(back.lines, sc.lines, "profile {i} seed {seed}");
            }
        }
    }

    #[test]
    fn programs_keep_to_the_kvm_backends_rules() {
        let p = kvm_profile();
        for seed in 0..500 {
            let sc = generate(seed, &p, &Limits::default());
            for l in &sc.lines {
                match &l.op {
                    Op::SetMemoryRegion(r) => {
                        assert_ne!(r.slot, KVM_SETUP_SLOT, "seed {seed}: {}", l.text);
                        if r.size != 0 {
                            let end = r.gpa.saturating_add(r.size);
                            assert!(
                                end <= KVM_SETUP_GPA.start || r.gpa >= KVM_SETUP_GPA.end,
                                "seed {seed}: {}",
                                l.text
                            );
                        }
                    }
                    Op::GuestRead { gpa, .. } | Op::GuestWrite { gpa, .. } => {
                        assert!(*gpa < KVM_GUEST_GPA_LIMIT, "seed {seed}: {}", l.text);
                        assert!(!KVM_SETUP_GPA.contains(gpa), "seed {seed}: {}", l.text);
                    }
                    Op::CreateVm { vm_type } if l.bind.is_some() => {
                        assert_eq!(*vm_type, 0, "seed {seed}")
                    }
                    Op::SetMemoryAttributes { .. } => panic!("seed {seed}: {}", l.text),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn programs_stay_within_the_memory_budget() {
        for memory in [1 << 20, 32 << 20] {
            let l = Limits {
                memory,
                ..Limits::default()
            };
            for seed in 0..300 {
                let sc = generate(seed, &soft_profile(), &l);
                assert!(commit_bound(&sc) <= memory, "seed {seed}: {}", print(&sc));
            }
        }
    }
}
