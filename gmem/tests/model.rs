//! The software backend against a deliberately simple reference model.
//!
//! Random sequences of create / bind / delete / punch / allocate / convert /
//! access / close run on a sw_protected software VM and on a model made of
//! plain maps (a page per entry, one attribute per gfn, bindings found by
//! scanning the slots). Every step's outcome must agree: errnos, exits and
//! the bytes the guest reads.
//!
//! Covers, as properties: SLOT-10, SLOT-11, SLOT-12, BIND-4, BIND-5, BIND-6,
//! LIFE-4, LIFE-5, FALLOC-3, FALLOC-4, ATTR-3, ATTR-4, FAULT-1..FAULT-6.

use std::collections::{BTreeMap, BTreeSet};

use gmem::soft::SoftHypervisor;
use gmem::uapi::*;
use gmem::{Errno, GuestMemfd, GuestOp, HostMemory, Hypervisor, Vcpu, VcpuExit, Vm};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;
/// Host memory pages ordinary slots point into.
const HOST_PAGES: u64 = 16;
/// Guest physical pages the test plays in.
const GFNS: u64 = 16;

#[derive(Debug, Clone)]
enum Op {
    CreateFile {
        pages: u64,
        mmap: bool,
    },
    BindFile {
        slot: u16,
        gfn: u64,
        npages: u64,
        file: usize,
        pgoff: u64,
    },
    BindHost {
        slot: u16,
        gfn: u64,
        npages: u64,
        host_page: u64,
    },
    Delete {
        slot: u16,
    },
    Punch {
        file: usize,
        page: u64,
        pages: u64,
    },
    Allocate {
        file: usize,
        page: u64,
        pages: u64,
    },
    Convert {
        gfn: u64,
        pages: u64,
        private: bool,
    },
    Write {
        gfn: u64,
        byte: u8,
    },
    Read {
        gfn: u64,
    },
    HostWrite {
        page: u64,
        byte: u8,
    },
    Close {
        file: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1..8u64, any::<bool>()).prop_map(|(pages, mmap)| Op::CreateFile { pages, mmap }),
        4 => (0..4u16, 0..GFNS, 1..5u64, 0..3usize, 0..4u64)
            .prop_map(|(slot, gfn, npages, file, pgoff)| Op::BindFile { slot, gfn, npages, file, pgoff }),
        2 => (0..4u16, 0..GFNS, 1..5u64, 0..HOST_PAGES - 4)
            .prop_map(|(slot, gfn, npages, host_page)| Op::BindHost { slot, gfn, npages, host_page }),
        2 => (0..4u16).prop_map(|slot| Op::Delete { slot }),
        2 => (0..3usize, 0..4u64, 1..4u64).prop_map(|(file, page, pages)| Op::Punch { file, page, pages }),
        1 => (0..3usize, 0..5u64, 1..4u64).prop_map(|(file, page, pages)| Op::Allocate { file, page, pages }),
        3 => (0..GFNS, 1..6u64, any::<bool>()).prop_map(|(gfn, pages, private)| Op::Convert { gfn, pages, private }),
        5 => (0..GFNS, any::<u8>()).prop_map(|(gfn, byte)| Op::Write { gfn, byte }),
        5 => (0..GFNS).prop_map(|gfn| Op::Read { gfn }),
        1 => (0..HOST_PAGES, any::<u8>()).prop_map(|(page, byte)| Op::HostWrite { page, byte }),
        1 => (0..3usize).prop_map(|file| Op::Close { file }),
    ]
}

/// What one step produced, in a form both sides can give.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Errno(Errno),
    Byte(u8),
    MemoryFault { private: bool, gfn: u64 },
    Mmio { gfn: u64 },
}

// ---- the model ----

#[derive(Default, Clone)]
struct ModelFile {
    pages: u64,
    mmap: bool,
    open: bool,
    data: BTreeMap<u64, u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backing {
    Host {
        page: u64,
    },
    File {
        file: usize,
        pgoff: u64,
        released: bool,
    },
}

#[derive(Clone, Copy)]
struct ModelSlot {
    gfn: u64,
    npages: u64,
    backing: Backing,
}

#[derive(Default)]
struct Model {
    files: Vec<ModelFile>,
    slots: BTreeMap<u16, ModelSlot>,
    private: BTreeSet<u64>,
    host: BTreeMap<u64, u8>,
}

impl Model {
    fn bound(&self, file: usize, first: u64, n: u64) -> bool {
        self.slots.values().any(|s| match s.backing {
            Backing::File {
                file: f,
                pgoff,
                released: false,
            } => f == file && pgoff < first + n && first < pgoff + s.npages,
            _ => false,
        })
    }

    fn gfn_overlap(&self, slot: u16, gfn: u64, n: u64) -> bool {
        self.slots
            .iter()
            .any(|(id, s)| *id != slot && s.gfn < gfn + n && gfn < s.gfn + s.npages)
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::CreateFile { pages, mmap } => {
                self.files.push(ModelFile {
                    pages,
                    mmap,
                    open: true,
                    data: BTreeMap::new(),
                });
                Outcome::Ok
            }
            Op::BindFile {
                slot,
                gfn,
                npages,
                file,
                pgoff,
            } => {
                if self.slots.contains_key(&slot) {
                    return Outcome::Errno(Errno::EINVAL); // SLOT-11
                }
                if self.gfn_overlap(slot, gfn, npages) {
                    return Outcome::Errno(Errno::EEXIST); // SLOT-12
                }
                let f = &self.files[file];
                if pgoff + npages > f.pages || self.bound(file, pgoff, npages) {
                    return Outcome::Errno(Errno::EINVAL); // BIND-4, BIND-5
                }
                self.slots.insert(
                    slot,
                    ModelSlot {
                        gfn,
                        npages,
                        backing: Backing::File {
                            file,
                            pgoff,
                            released: false,
                        },
                    },
                );
                Outcome::Ok
            }
            Op::BindHost {
                slot,
                gfn,
                npages,
                host_page,
            } => {
                if let Some(old) = self.slots.get(&slot) {
                    // SLOT-11: only the base of an ordinary slot may change.
                    if old.backing != (Backing::Host { page: host_page }) || old.npages != npages {
                        return Outcome::Errno(Errno::EINVAL);
                    }
                    if old.gfn == gfn {
                        return Outcome::Ok;
                    }
                }
                if self.gfn_overlap(slot, gfn, npages) {
                    return Outcome::Errno(Errno::EEXIST);
                }
                self.slots.insert(
                    slot,
                    ModelSlot {
                        gfn,
                        npages,
                        backing: Backing::Host { page: host_page },
                    },
                );
                Outcome::Ok
            }
            Op::Delete { slot } => match self.slots.remove(&slot) {
                Some(_) => Outcome::Ok,
                None => Outcome::Errno(Errno::EINVAL), // SLOT-10
            },
            Op::Punch { file, page, pages } => {
                let f = &mut self.files[file];
                f.data.retain(|p, _| !(page..page + pages).contains(p));
                Outcome::Ok
            }
            Op::Allocate { file, page, pages } => {
                if page + pages > self.files[file].pages {
                    Outcome::Errno(Errno::EINVAL) // FALLOC-3
                } else {
                    Outcome::Ok
                }
            }
            Op::Convert {
                gfn,
                pages,
                private,
            } => {
                for g in gfn..gfn + pages {
                    if private {
                        self.private.insert(g);
                    } else {
                        self.private.remove(&g);
                    }
                }
                Outcome::Ok
            }
            Op::Write { gfn, byte } => self.access(gfn, Some(byte)),
            Op::Read { gfn } => self.access(gfn, None),
            Op::HostWrite { page, byte } => {
                self.host.insert(page, byte);
                Outcome::Ok
            }
            Op::Close { file } => {
                self.files[file].open = false;
                self.files[file].data.clear();
                for s in self.slots.values_mut() {
                    if let Backing::File {
                        file: f, released, ..
                    } = &mut s.backing
                    {
                        if *f == file {
                            *released = true;
                        }
                    }
                }
                Outcome::Ok
            }
        }
    }

    fn access(&mut self, gfn: u64, write: Option<u8>) -> Outcome {
        let private = self.private.contains(&gfn);
        let Some(slot) = self
            .slots
            .values()
            .find(|s| s.gfn <= gfn && gfn < s.gfn + s.npages)
            .copied()
        else {
            return if private {
                Outcome::MemoryFault { private, gfn }
            } else {
                Outcome::Mmio { gfn }
            };
        };
        let page = |host: &mut BTreeMap<u64, u8>, at: u64| match write {
            Some(b) => {
                host.insert(at, b);
                Outcome::Byte(b)
            }
            None => Outcome::Byte(host.get(&at).copied().unwrap_or(0)),
        };
        match slot.backing {
            Backing::File {
                file,
                pgoff,
                released,
            } if private || self.files[file].mmap => {
                if released {
                    return Outcome::MemoryFault { private, gfn };
                }
                page(&mut self.files[file].data, gfn - slot.gfn + pgoff)
            }
            Backing::Host { .. } if private => Outcome::MemoryFault { private, gfn },
            Backing::Host { page: hp } => page(&mut self.host, hp + gfn - slot.gfn),
            // Shared access to a file without MMAP: served from
            // userspace_addr 0, where nothing is mapped (FAULT-3: EFAULT).
            Backing::File { .. } => Outcome::Errno(Errno::EFAULT),
        }
    }
}

// ---- the system under test ----

struct Real {
    /// Kept open for the VM's life.
    _hv: SoftHypervisor,
    vm: Box<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    host: Box<dyn HostMemory>,
    files: Vec<Option<Box<dyn GuestMemfd>>>,
}

impl Real {
    fn new() -> Real {
        let hv = SoftHypervisor::new().unwrap();
        let vm = hv.create_vm(KVM_X86_SW_PROTECTED_VM as u64).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let host = hv.host_memory(HOST_PAGES * P).unwrap();
        Real {
            _hv: hv,
            vm,
            vcpu,
            host,
            files: Vec::new(),
        }
    }

    fn result(r: gmem::Result<()>) -> Outcome {
        match r {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Errno(e.errno),
        }
    }

    fn fallocate(&self, file: usize, mode: i32, page: u64, pages: u64) -> Outcome {
        let f = self.files[file].as_ref().unwrap();
        Self::result(f.fallocate(mode, (page * P) as i64, (pages * P) as i64))
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::CreateFile { pages, mmap } => {
                let flags = if mmap { GUEST_MEMFD_FLAG_MMAP } else { 0 };
                let g = self.vm.create_guest_memfd(kvm_create_guest_memfd {
                    size: pages * P,
                    flags,
                    ..Default::default()
                });
                self.files.push(Some(g.unwrap()));
                Outcome::Ok
            }
            Op::BindFile {
                slot,
                gfn,
                npages,
                file,
                pgoff,
            } => Self::result(
                self.vm
                    .set_user_memory_region2(kvm_userspace_memory_region2 {
                        slot: slot as u32,
                        flags: KVM_MEM_GUEST_MEMFD,
                        guest_phys_addr: gfn * P,
                        memory_size: npages * P,
                        guest_memfd: self.files[file].as_ref().unwrap().as_raw_fd() as u32,
                        guest_memfd_offset: pgoff * P,
                        ..Default::default()
                    }),
            ),
            Op::BindHost {
                slot,
                gfn,
                npages,
                host_page,
            } => Self::result(
                self.vm
                    .set_user_memory_region2(kvm_userspace_memory_region2 {
                        slot: slot as u32,
                        guest_phys_addr: gfn * P,
                        memory_size: npages * P,
                        userspace_addr: self.host.addr() + host_page * P,
                        ..Default::default()
                    }),
            ),
            Op::Delete { slot } => Self::result(self.vm.set_user_memory_region2(
                kvm_userspace_memory_region2 {
                    slot: slot as u32,
                    ..Default::default()
                },
            )),
            Op::Punch { file, page, pages } => self.fallocate(
                file,
                FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                page,
                pages,
            ),
            Op::Allocate { file, page, pages } => {
                self.fallocate(file, FALLOC_FL_KEEP_SIZE, page, pages)
            }
            Op::Convert {
                gfn,
                pages,
                private,
            } => Self::result(self.vm.set_memory_attributes(kvm_memory_attributes {
                address: gfn * P,
                size: pages * P,
                attributes: if private {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
                } else {
                    0
                },
                flags: 0,
            })),
            Op::Write { gfn, byte } => {
                let exit = self.vcpu.run(GuestOp::Write {
                    gpa: gfn * P + 7,
                    size: 1,
                    value: byte as u64,
                });
                Self::exit(exit, Some(byte))
            }
            Op::Read { gfn } => Self::exit(
                self.vcpu.run(GuestOp::Read {
                    gpa: gfn * P + 7,
                    size: 1,
                }),
                None,
            ),
            Op::HostWrite { page, byte } => {
                self.host.write(page * P + 7, &[byte]).unwrap();
                Outcome::Ok
            }
            Op::Close { file } => {
                self.files[file] = None;
                Outcome::Ok
            }
        }
    }

    fn exit(exit: gmem::Result<VcpuExit>, wrote: Option<u8>) -> Outcome {
        match exit {
            Ok(VcpuExit::Done(v)) => Outcome::Byte(wrote.unwrap_or(v as u8)),
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                assert_eq!(size, P, "FAULT-7: a memory fault covers one page");
                Outcome::MemoryFault {
                    private: flags & KVM_MEMORY_EXIT_FLAG_PRIVATE as u64 != 0,
                    gfn: gpa / P,
                }
            }
            Ok(VcpuExit::Mmio { gpa, .. }) => Outcome::Mmio { gfn: gpa / P },
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => Outcome::Errno(e.errno),
        }
    }
}

/// Ops that name a file that does not exist or is closed are dropped, so
/// that both sides see only meaningful sequences.
fn runnable(model: &Model, op: &Op) -> bool {
    let open = |f: usize| model.files.get(f).is_some_and(|f| f.open);
    match *op {
        Op::BindFile { file, .. }
        | Op::Punch { file, .. }
        | Op::Allocate { file, .. }
        | Op::Close { file } => open(file),
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn software_backend_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut model = Model::default();
        let mut real = Real::new();
        // A starting layout, so that most random steps hit bound memory:
        // a guest_memfd-only slot, a slot on a file without MMAP (shared
        // accesses go to userspace_addr 0, private ones to the file) and an
        // ordinary slot.
        let setup = [
            Op::CreateFile { pages: 4, mmap: true },
            Op::CreateFile { pages: 4, mmap: false },
            Op::BindFile { slot: 0, gfn: 0, npages: 4, file: 0, pgoff: 0 },
            Op::BindFile { slot: 1, gfn: 4, npages: 4, file: 1, pgoff: 0 },
            Op::BindHost { slot: 2, gfn: 8, npages: 4, host_page: 0 },
        ];
        for (step, op) in setup.iter().chain(&ops).enumerate() {
            if !runnable(&model, op) {
                continue;
            }
            let expected = model.apply(op);
            let actual = real.apply(op);
            prop_assert_eq!(&actual, &expected, "step {}: {:?}", step, op);
        }
    }
}
