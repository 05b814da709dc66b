//! Host memory as the software backend sees it: every mapping handed out by
//! this hypervisor (the VMM's anonymous RAM and host mappings of
//! guest_memfd files) is registered by address, so that a memslot's
//! `userspace_addr` resolves to real memory without trusting a raw pointer.
//! An address no registered mapping covers is memory the guest cannot reach:
//! the access fails as the kernel's would on an unmapped hva. Unmapping
//! invalidates every memslot pointing into the mapping first, in every VM
//! of the hypervisor, as the kernel's MMU notifier does.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use super::guest_memfd::{GmemFile, GmemInode};
use super::vm::VmInner;
use crate::host::Mmap;
use crate::hypervisor::{HostFault, HostMemory};

/// One registered mapping.
pub(crate) struct Region {
    pub(crate) mmap: Mmap,
    pub(crate) kind: RegionKind,
}

pub(crate) enum RegionKind {
    /// Anonymous memory: always accessible.
    Anonymous,
    /// A `MAP_SHARED` mapping of a guest_memfd from file offset `offset`.
    /// Holds the inode (the memory), not the file: dropping the last
    /// reference from a fault path must never run the file's release.
    GuestMemfd { inode: Arc<GmemInode>, offset: u64 },
}

impl Region {
    /// Checks that the host may touch `[offset, offset + len)` of the
    /// mapping: for a guest_memfd mapping, the pages must lie inside the
    /// file (MMAP-3) and be shared with the host (MMAP-4).
    pub(crate) fn check_access(&self, offset: u64, len: usize) -> Result<(), HostFault> {
        self.mmap.check_range(offset, len)?;
        let RegionKind::GuestMemfd {
            inode,
            offset: base,
        } = &self.kind
        else {
            return Ok(());
        };
        let file_off = base + offset;
        let last = file_off + len.max(1) as u64 - 1;
        if last >= inode.size {
            let first_bad = file_off.max(inode.size);
            return Err(HostFault::Sigbus {
                offset: first_bad - base,
                rule: "MMAP-3",
                reason: format!(
                    "file offset {first_bad:#x} is past the end of the {:#x}-byte guest_memfd",
                    inode.size
                ),
            });
        }
        if !inode.init_shared() {
            return Err(HostFault::Sigbus {
                offset,
                rule: "MMAP-4",
                reason: "the guest_memfd was created without INIT_SHARED: its memory is private to the guest".into(),
            });
        }
        Ok(())
    }

    /// Bytes from the start of the mapping that the host may touch: all of
    /// it, or for a guest_memfd mapping the part inside the file (MMAP-3),
    /// or none when the file's memory is not shared (MMAP-4).
    pub(crate) fn accessible_len(&self) -> u64 {
        match &self.kind {
            RegionKind::Anonymous => self.mmap.len(),
            RegionKind::GuestMemfd { inode, .. } if !inode.init_shared() => 0,
            RegionKind::GuestMemfd { inode, offset } => {
                self.mmap.len().min(inode.size.saturating_sub(*offset))
            }
        }
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostFault> {
        self.check_access(offset, buf.len())?;
        self.mmap.read(offset, buf)
    }

    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> Result<(), HostFault> {
        self.check_access(offset, buf.len())?;
        self.mmap.write(offset, buf)
    }
}

/// Every live mapping of one software hypervisor, by start address.
#[derive(Default)]
pub(crate) struct HostRegistry {
    regions: RwLock<BTreeMap<u64, Weak<Region>>>,
    /// The VMs whose memslots may point at these mappings.
    vms: Mutex<Vec<Weak<VmInner>>>,
}

impl HostRegistry {
    fn insert(&self, region: &Arc<Region>) {
        self.regions
            .write()
            .insert(region.mmap.addr(), Arc::downgrade(region));
    }

    fn remove(&self, region: &Region) {
        self.regions.write().remove(&region.mmap.addr());
    }

    /// Registers a VM whose slots must hear of unmappings.
    pub(crate) fn add_vm(&self, vm: &Arc<VmInner>) {
        let mut vms = self.vms.lock();
        vms.retain(|v| v.strong_count() > 0);
        vms.push(Arc::downgrade(vm));
    }

    /// Host addresses `hvas` are going away: every VM invalidates the slots
    /// that point there. The caller has already unregistered the mapping,
    /// so a fault path that runs after this finds nothing there.
    fn unmapping(&self, hvas: Range<u64>) {
        let vms: Vec<Arc<VmInner>> = self.vms.lock().iter().filter_map(Weak::upgrade).collect();
        for vm in vms {
            vm.invalidate_hvas(&hvas);
        }
    }

    /// The live mapping holding `[hva, hva + len)` and the offset of `hva`
    /// in it. The returned reference keeps the mapping alive for the access.
    pub(crate) fn lookup(&self, hva: u64, len: u64) -> Option<(Arc<Region>, u64)> {
        let regions = self.regions.read();
        let (start, region) = regions.range(..=hva).next_back()?;
        let region = region.upgrade()?;
        let offset = hva - start;
        (offset.checked_add(len)? <= region.mmap.len()).then_some((region, offset))
    }
}

/// A registered mapping handed to the user: unregistered and unmapped on
/// drop. A host mapping of a guest_memfd also holds the file (LIFE-7).
pub struct SoftHostMemory {
    region: Arc<Region>,
    registry: Arc<HostRegistry>,
    _file: Option<Arc<GmemFile>>,
}

impl SoftHostMemory {
    pub(crate) fn new(
        registry: &Arc<HostRegistry>,
        mmap: Mmap,
        kind: RegionKind,
        file: Option<Arc<GmemFile>>,
    ) -> Self {
        let region = Arc::new(Region { mmap, kind });
        registry.insert(&region);
        SoftHostMemory {
            region,
            registry: registry.clone(),
            _file: file,
        }
    }

    /// Raw pointer to the first byte, for device emulation and interop.
    /// Touching memory that [`HostMemory::read`] would refuse is the
    /// caller's responsibility.
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.mmap.as_ptr()
    }
}

impl Drop for SoftHostMemory {
    /// Unregisters and invalidates; the mapping itself goes with the last
    /// reference to the region, after that (a fault path in progress may
    /// hold one for its access).
    fn drop(&mut self) {
        self.registry.remove(&self.region);
        let start = self.region.mmap.addr();
        self.registry
            .unmapping(start..start + self.region.mmap.len());
    }
}

impl HostMemory for SoftHostMemory {
    fn addr(&self) -> u64 {
        self.region.mmap.addr()
    }

    fn len(&self) -> u64 {
        self.region.mmap.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostFault> {
        self.region.read(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), HostFault> {
        self.region.write(offset, buf)
    }
}
