//! Host memory as the software backend sees it: every mapping handed out by
//! this hypervisor (the VMM's anonymous RAM and host mappings of
//! guest_memfd files) is registered by address, so that a memslot's
//! `userspace_addr` resolves to real memory without trusting a raw pointer.
//! An address no registered mapping covers is memory the guest cannot reach:
//! the access fails as the kernel's would on an unmapped hva. Unmapping
//! invalidates every memslot pointing into the mapping first, in every VM
//! of the hypervisor, as the kernel's MMU notifier does.
//!
//! A memslot whose userspace range lies in one mapping holds it
//! (`HostPin`). A mapping dropped while held gives its pages back but
//! keeps its addresses, inaccessible, until the last such memslot goes
//! (rule gmem-safety, the KVM backend's rule too): the guest keeps finding
//! nothing there, and memory made later never lands where a memslot points.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use super::guest_memfd::{GmemFile, GmemInode, SoftPin};
use super::mempolicy::{self as soft_mempolicy, MappedPage, Policies};
use super::vm::VmInner;
use crate::host::{Mmap, Reservation};
use crate::hypervisor::{HostFault, HostMemory, Pin};
use crate::madvise::{self, Advice};
use crate::mempolicy::{self, MbindFlags, MemPolicy};
use crate::refuse;
use crate::uapi::PAGE_SHIFT;

/// One registered mapping.
pub(crate) struct Region {
    /// Given to the registry when the last reference goes (`Drop`).
    pub(crate) mmap: ManuallyDrop<Mmap>,
    pub(crate) kind: RegionKind,
    registry: Weak<HostRegistry>,
}

impl Drop for Region {
    /// The memory goes with the last reference (a fault path in progress
    /// may hold one after the handle is gone): unmapped, or kept reserved
    /// if a memslot points into it.
    fn drop(&mut self) {
        // SAFETY: taken exactly once, here, and never used after.
        let mmap = unsafe { ManuallyDrop::take(&mut self.mmap) };
        match self.registry.upgrade() {
            Some(registry) => registry.release(mmap),
            None => drop(mmap),
        }
    }
}

pub(crate) enum RegionKind {
    /// Anonymous memory: always accessible.
    Anonymous,
    /// A `MAP_SHARED` mapping of a guest_memfd from file offset `offset`.
    /// Holds the inode (the memory), not the file: dropping the last
    /// reference from a fault path must never run the file's release.
    /// `vm_policy` is the mapping's own NUMA policy by page of the mapping
    /// (`vma->vm_policy`), which is what it reports before 6.19.
    GuestMemfd {
        inode: Arc<GmemInode>,
        offset: u64,
        vm_policy: Mutex<Policies>,
    },
}

impl Region {
    /// The first byte of `[offset, offset + len)` the host may not touch,
    /// if any: for a guest_memfd mapping, a page past the end of the file
    /// (MMAP-3) or a page not shared with the host (MMAP-4). The fault
    /// comes from `kvm_gmem_fault_user_mapping`, which checks the end of
    /// the file first, page by page as the access reaches each page.
    pub(crate) fn first_fault(&self, offset: u64, len: usize) -> Option<HostFault> {
        let RegionKind::GuestMemfd {
            inode,
            offset: base,
            ..
        } = &self.kind
        else {
            return None;
        };
        if len == 0 {
            return None;
        }
        let file_off = base + offset;
        let past_end = |at: u64| HostFault::Sigbus {
            offset: at - base,
            rule: "MMAP-3",
            reason: format!(
                "file offset {at:#x} is past the end of the {:#x}-byte guest_memfd",
                inode.size
            ),
        };
        if file_off >= inode.size {
            return Some(past_end(file_off));
        }
        let end = file_off + len as u64;
        if inode.in_place {
            // Pages fault in order: a private page before the end of the
            // file faults first (CONV-6), else the end of the file does.
            let last = end.min(inode.size) - 1;
            let pages = file_off >> PAGE_SHIFT..(last >> PAGE_SHIFT) + 1;
            if let Some(index) = inode.first_private(pages) {
                let at = (index << PAGE_SHIFT).max(file_off);
                return Some(HostFault::Sigbus {
                    offset: at - base,
                    rule: "CONV-6",
                    reason: format!("file page {index:#x} is private to the guest"),
                });
            }
            return (end > inode.size).then(|| past_end(inode.size));
        }
        if !inode.init_shared() {
            return Some(HostFault::Sigbus {
                offset,
                rule: "MMAP-4",
                reason: "the guest_memfd was created without INIT_SHARED: its memory is private to the guest".into(),
            });
        }
        (end > inode.size).then(|| past_end(inode.size))
    }

    /// Bytes from the start of the mapping that a vCPU may cache a
    /// translation for: all of anonymous memory; none of a guest_memfd
    /// mapping, whose pages can turn private or go with the file without
    /// an invalidation of the slots that point at the mapping, so every
    /// access through one takes the fault path and its checks.
    pub(crate) fn cacheable_len(&self) -> u64 {
        match &self.kind {
            RegionKind::Anonymous => self.mmap.len(),
            RegionKind::GuestMemfd { .. } => 0,
        }
    }

    /// Reads `buf` at `offset`. On a fault, the bytes before the first
    /// faulting byte are read, as a copy by the CPU would have read them.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostFault> {
        self.mmap.check_range(offset, buf.len())?;
        match self.first_fault(offset, buf.len()) {
            None => self.mmap.read(offset, buf),
            Some(fault) => {
                let done = Self::done_before(&fault, offset);
                self.mmap.read(offset, &mut buf[..done])?;
                Err(fault)
            }
        }
    }

    /// Writes `buf` at `offset`. On a fault, every byte before the first
    /// faulting byte is stored first, as `memset` in the kernel selftest
    /// `test_fault_overflow` stores them before its SIGBUS.
    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> Result<(), HostFault> {
        self.mmap.check_range(offset, buf.len())?;
        match self.first_fault(offset, buf.len()) {
            None => self.mmap.write(offset, buf),
            Some(fault) => {
                let done = Self::done_before(&fault, offset);
                self.mmap.write(offset, &buf[..done])?;
                Err(fault)
            }
        }
    }

    /// Bytes of an access at `offset` that precede `fault`.
    fn done_before(fault: &HostFault, offset: u64) -> usize {
        match fault {
            HostFault::Sigbus { offset: at, .. } => (at - offset) as usize,
            HostFault::OutOfRange { .. } => 0,
        }
    }
}

/// Every live mapping of one software hypervisor, by start address.
///
/// Lock order: a VM's slots lock (memslots pin and unpin under it, fault
/// paths drop regions under it), then `holds`, then `regions`.
#[derive(Default)]
pub(crate) struct HostRegistry {
    regions: RwLock<BTreeMap<u64, Weak<Region>>>,
    /// The VMs whose memslots may point at these mappings.
    vms: Mutex<Vec<Weak<VmInner>>>,
    /// Mappings memslots point into, by start address: live, or dropped
    /// and kept reserved while the memslots live.
    holds: Mutex<BTreeMap<u64, Hold>>,
}

/// A mapping memslots hold.
struct Hold {
    end: u64,
    /// Memslots whose userspace range lies in it.
    pins: usize,
    /// Its addresses once the mapping is gone.
    reserved: Option<Reservation>,
}

/// A memslot's hold on the mapping its userspace range lies in; dropping it
/// lets the addresses go once the mapping is gone too.
pub(crate) struct HostPin {
    registry: Weak<HostRegistry>,
    start: u64,
}

impl Drop for HostPin {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut holds = registry.holds.lock();
        if let Some(h) = holds.get_mut(&self.start) {
            h.pins -= 1;
            if h.pins == 0 {
                // With it goes its reservation, if the mapping is gone.
                holds.remove(&self.start);
            }
        }
    }
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

    /// A memslot's userspace range `[hva, hva + len)` is about to point into
    /// memory: holds the mapping it lies in, live or kept reserved. `None`
    /// when no one mapping (or reservation) holds the whole range: there is
    /// nothing to keep.
    pub(crate) fn pin(self: &Arc<Self>, hva: u64, len: u64) -> Option<HostPin> {
        if hva == 0 || len == 0 {
            return None;
        }
        let end = hva.checked_add(len)?;
        let mut holds = self.holds.lock();
        if let Some((&start, h)) = holds.range_mut(..=hva).next_back() {
            if end <= h.end {
                h.pins += 1;
                return Some(HostPin {
                    registry: Arc::downgrade(self),
                    start,
                });
            }
        }
        let (region, offset) = self.lookup(hva, len)?;
        let start = hva - offset;
        holds.insert(
            start,
            Hold {
                end: start + region.mmap.len(),
                pins: 1,
                reserved: None,
            },
        );
        // The region may be the last reference by now, and its release
        // takes `holds`.
        drop(holds);
        drop(region);
        Some(HostPin {
            registry: Arc::downgrade(self),
            start,
        })
    }

    /// The last reference to a mapping went: unmaps it, or keeps its
    /// addresses while memslots point there. If the kernel refuses the
    /// reservation the memory is kept instead: a leak, never an address a
    /// memslot points at reused for other memory.
    fn release(&self, mmap: Mmap) {
        let mut holds = self.holds.lock();
        match holds.get_mut(&mmap.addr()) {
            Some(h) if h.pins > 0 && h.reserved.is_none() => {
                h.reserved = mmap.into_reservation().map_err(std::mem::forget).ok();
            }
            _ => drop(mmap),
        }
    }

    /// For each file page of `indices`, how many live host mappings of
    /// `inode` map it (`folio_mapcount` without the guest's mappings).
    fn mapcounts(&self, inode: &Arc<GmemInode>, indices: Range<u64>) -> crate::Result<Vec<usize>> {
        let regions: Vec<Arc<Region>> = self
            .regions
            .read()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let mut counts = vec![0; (indices.end - indices.start) as usize];
        for r in &regions {
            let RegionKind::GuestMemfd {
                inode: i, offset, ..
            } = &r.kind
            else {
                continue;
            };
            if !Arc::ptr_eq(i, inode) {
                continue;
            }
            let first = offset >> PAGE_SHIFT;
            let last = first + r.mmap.len().div_ceil(1 << PAGE_SHIFT);
            let (lo, hi) = (indices.start.max(first), indices.end.min(last));
            if lo >= hi {
                continue;
            }
            let nodes =
                mempolicy::mapped_nodes(&page_addrs(r.mmap.addr(), lo - first..hi - first))?;
            for (i, node) in (lo..hi).zip(nodes) {
                counts[(i - indices.start) as usize] += usize::from(node.is_some());
            }
        }
        // A region may be the last reference by now; none of its release's
        // locks is held here.
        drop(regions);
        Ok(counts)
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

/// The address of each page `pages` of the mapping at `addr`.
fn page_addrs(addr: u64, pages: Range<u64>) -> Vec<u64> {
    pages.map(|p| addr + (p << PAGE_SHIFT)).collect()
}

/// A registered mapping handed to the user: unregistered and unmapped on
/// drop. A host mapping of a guest_memfd also holds the file (LIFE-7).
pub struct SoftHostMemory {
    region: Arc<Region>,
    registry: Arc<HostRegistry>,
    file: Option<Arc<GmemFile>>,
}

impl SoftHostMemory {
    pub(crate) fn new(
        registry: &Arc<HostRegistry>,
        mmap: Mmap,
        kind: RegionKind,
        file: Option<Arc<GmemFile>>,
    ) -> Self {
        let region = Arc::new(Region {
            mmap: ManuallyDrop::new(mmap),
            kind,
            registry: Arc::downgrade(registry),
        });
        registry.insert(&region);
        SoftHostMemory {
            region,
            registry: registry.clone(),
            file,
        }
    }

    /// The pages of `pages` (page numbers of this mapping, which maps file
    /// offset `base` at its start) that this mapping maps, with their node
    /// and, with `need_mapcount`, how many host mappings of the file map
    /// each. Only allocated file pages can be mapped, so only those are
    /// asked about.
    fn mapped_pages(
        &self,
        inode: &Arc<GmemInode>,
        base: u64,
        pages: Range<u64>,
        need_mapcount: bool,
    ) -> crate::Result<Vec<MappedPage>> {
        let first = base >> PAGE_SHIFT;
        let mut out = Vec::new();
        for run in inode.allocated(first + pages.start..first + pages.end) {
            let here = run.start - first..run.end - first;
            let nodes = mempolicy::mapped_nodes(&page_addrs(self.addr(), here))?;
            let counts = if need_mapcount {
                self.registry.mapcounts(inode, run.clone())?
            } else {
                vec![1; nodes.len()]
            };
            out.extend(
                nodes
                    .into_iter()
                    .zip(counts)
                    .filter_map(|(node, mapcount)| {
                        Some(MappedPage {
                            node: node?,
                            mapcount,
                        })
                    }),
            );
        }
        Ok(out)
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

    fn pin(&self, offset: u64, len: u64) -> crate::Result<Box<dyn Pin>> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.len()) {
            refuse!(
                EFAULT,
                "CONV-5",
                "pin of {len:#x} bytes at offset {offset:#x}: outside the {:#x}-byte mapping",
                self.len()
            );
        }
        let RegionKind::GuestMemfd {
            inode,
            offset: base,
            ..
        } = &self.region.kind
        else {
            return Ok(Box::new(SoftPin::unrelated()));
        };
        let first = (base + offset) >> PAGE_SHIFT;
        let end = (base + offset + len).div_ceil(crate::uapi::PAGE_SIZE);
        Ok(Box::new(inode.pin(first..end)?))
    }

    /// Anonymous memory: the kernel's per-mapping policy. A guest_memfd
    /// mapping: as the profile's release keeps it (NUMA-2); since 6.19 the
    /// store's mapping takes the policy too, so that its pages follow it.
    fn mbind(
        &self,
        offset: u64,
        len: u64,
        policy: MemPolicy,
        flags: MbindFlags,
    ) -> crate::Result<()> {
        let RegionKind::GuestMemfd {
            inode,
            offset: base,
            vm_policy,
        } = &self.region.kind
        else {
            return mempolicy::mbind(self.addr(), self.len(), offset, len, policy, flags);
        };
        mempolicy::check_range(self.len(), offset, len, "mbind")?;
        let Some(request) = soft_mempolicy::check(offset, len, policy, flags)? else {
            return Ok(());
        };
        // The page checks come first (`queue_pages_range`), on the pages
        // this mapping maps: the store's mapping behind it maps exactly the
        // pages a guest_memfd mapping would (touched through it, populated,
        // reached by the guest through a memslot pointing at it).
        let unmoved = if request.checks_pages() {
            let need_mapcount = !flags.contains(MbindFlags::MOVE_ALL);
            let mapped = self.mapped_pages(inode, *base, request.pages(), need_mapcount)?;
            request.unmoved(&mapped)?
        } else {
            0
        };
        let mut vma = vm_policy.lock();
        let mut shared = inode.policy.as_ref().map(|p| p.lock());
        if shared.is_some() {
            // shmem keeps it by file offset, as guest_memfd does since 6.19;
            // the page checks were made above.
            mempolicy::mbind(
                self.addr(),
                self.len(),
                offset,
                len,
                policy,
                MbindFlags::empty(),
            )?;
        }
        request.apply(&mut vma, shared.as_deref_mut(), base >> PAGE_SHIFT);
        request.finish(unmoved)
    }

    fn get_mempolicy(&self, offset: u64) -> crate::Result<MemPolicy> {
        let RegionKind::GuestMemfd {
            inode,
            offset: base,
            vm_policy,
        } = &self.region.kind
        else {
            return mempolicy::get_mempolicy(self.addr(), self.len(), offset);
        };
        mempolicy::check_range(self.len(), offset, 1, "get_mempolicy")?;
        let index = offset >> PAGE_SHIFT;
        Ok(match &inode.policy {
            Some(shared) => soft_mempolicy::report(&shared.lock(), (base >> PAGE_SHIFT) + index),
            None => soft_mempolicy::report(&vm_policy.lock(), index),
        })
    }

    /// Anonymous memory: the kernel's answer. A guest_memfd mapping: as
    /// the kernel treats guest_memfd, never the page store's own answer (a
    /// tmpfs memfd, which collapses into huge pages and would punch without
    /// invalidating the guest).
    fn madvise(&self, offset: u64, len: u64, advice: Advice) -> crate::Result<()> {
        let (RegionKind::GuestMemfd { offset: base, .. }, Some(file)) =
            (&self.region.kind, &self.file)
        else {
            return madvise::madvise(self.addr(), self.len(), offset, len, advice);
        };
        let Some(len) = madvise::check(self.addr(), self.len(), offset, len, advice)? else {
            return Ok(());
        };
        match advice {
            Advice::Collapse => refuse!(
                EINVAL,
                "MMAP-6",
                "MADV_COLLAPSE of {len:#x} bytes at offset {offset:#x}: guest_memfd pages are never huge (file_thp_enabled)"
            ),
            Advice::Free => refuse!(
                EINVAL,
                "MMAP-8",
                "MADV_FREE at offset {offset:#x}: only private anonymous memory is freed lazily"
            ),
            Advice::Remove => file.punch_hole((base + offset) as i64, len as i64),
            Advice::DontNeed => madvise::raw(self.addr() + offset, len, advice),
            Advice::PopulateRead | Advice::PopulateWrite => {
                // Pages are faulted in order up to the first that would
                // raise SIGBUS (faultin_page_range); that one is EFAULT.
                let fault = self.region.first_fault(offset, len as usize);
                let done = fault
                    .as_ref()
                    .map_or(len, |f| Region::done_before(f, offset) as u64);
                if done > 0 {
                    madvise::raw(self.addr() + offset, done, advice)?;
                }
                match fault {
                    None => Ok(()),
                    Some(f) => Err(crate::Error::new(
                        crate::Errno::EFAULT,
                        "MMAP-9",
                        format!("madvise({advice}) at offset {offset:#x}: {f}"),
                    )),
                }
            }
            // Huge-page advice only marks the mapping; guest_memfd pages are
            // unevictable (cold, pageout) and its inode has no readahead.
            Advice::Hugepage
            | Advice::NoHugepage
            | Advice::WillNeed
            | Advice::Cold
            | Advice::Pageout => Ok(()),
        }
    }
}
