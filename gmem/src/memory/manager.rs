//! The memory manager: a VM, its RAM laid out on guest_memfd, and every
//! operation a VMM does on it: conversions, discard, accounting, device
//! access and the vCPU exits that ask for conversions.
//!
//! ```
//! use std::sync::atomic::Ordering;
//! use gmem::memory::{GuestAddress, Layout, MemoryManager};
//! let hv = gmem::Backend::Soft.open()?;
//! let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build()?)?;
//! mm.store(GuestAddress(0x100), 7u32, Ordering::Release)?; // the address first, always
//! assert_eq!(mm.load::<u32>(GuestAddress(0x100), Ordering::Acquire)?, 7);
//! println!("{}", mm.held()?); // 4 KiB in guest_memfd
//! # Ok::<(), gmem::memory::Error>(())
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::RwLock;
use rangemap::RangeSet;
use vm_memory::{AtomicAccess, Bytes, VolatileSlice};

use super::addr::{human_bytes, GuestAddress, GuestRange};
use super::backing::{self, Backing, BackingMode};
use super::file::GmemFile;
use super::layout::Layout;
use super::region::{GmemRegion, GuestRegions, HostView};
use super::Error;
use crate::hypervisor::{GuestLoop, HostMemory, Hypervisor, Vcpu, VcpuExit, Vm};
use crate::uapi::{
    delete_region, guest_memfd_region, kvm_memory_attributes, user_region, KVM_CAP_EXIT_HYPERCALL,
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SIZE,
};

/// Whether the guest or only the host-and-guest may touch a page.
///
/// ```
/// assert_eq!(gmem::memory::PageState::Private.to_string(), "private");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Host and guest may both touch it (the state every page starts in).
    Shared,
    /// Only the guest may touch it.
    Private,
}

impl std::fmt::Display for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageState::Shared => "shared",
            PageState::Private => "private",
        })
    }
}

/// Memory held, measured by the kernel: per guest_memfd file
/// (`cachestat`) and per RAM range's separate host memory (`mincore`).
/// It prints for people: the total, then where it is.
///
/// ```
/// let held = gmem::memory::Held { files: vec![8192], host: vec![4096] };
/// assert_eq!((held.file_bytes(), held.host_bytes(), held.total()), (8192, 4096, 12288));
/// assert_eq!(held.to_string(), "12 KiB (8 KiB in guest_memfd, 4 KiB in host memory)");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Bytes each guest_memfd file holds, by file index.
    pub files: Vec<u64>,
    /// Bytes each RAM range holds in separate host memory (split and
    /// anonymous backings), by range index.
    pub host: Vec<u64>,
}

impl Held {
    /// Bytes held in guest_memfd files.
    ///
    /// ```
    /// assert_eq!(gmem::memory::Held { files: vec![1, 2], host: vec![] }.file_bytes(), 3);
    /// ```
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().sum()
    }

    /// Bytes held in separate host memory.
    ///
    /// ```
    /// assert_eq!(gmem::memory::Held { files: vec![], host: vec![4] }.host_bytes(), 4);
    /// ```
    pub fn host_bytes(&self) -> u64 {
        self.host.iter().sum()
    }

    /// Everything held.
    ///
    /// ```
    /// assert_eq!(gmem::memory::Held::default().total(), 0);
    /// ```
    pub fn total(&self) -> u64 {
        self.file_bytes() + self.host_bytes()
    }
}

/// `12 KiB (8 KiB in guest_memfd, 4 KiB in host memory)`; with more than
/// one file or RAM range, each one's share follows after `; ` (`{:#}`
/// leaves it out).
///
/// ```
/// use gmem::memory::Held;
/// assert_eq!(Held { files: vec![0], host: vec![0, 0] }.to_string(), "0 B");
/// assert_eq!(Held { files: vec![4096], host: vec![] }.to_string(), "4 KiB in guest_memfd");
/// let two = Held { files: vec![4096, 8192], host: vec![] };
/// assert_eq!(two.to_string(), "12 KiB in guest_memfd; file 0: 4 KiB, file 1: 8 KiB");
/// assert_eq!(format!("{two:#}"), "12 KiB in guest_memfd");
/// ```
impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (file, host) = (self.file_bytes(), self.host_bytes());
        match (file, host) {
            (0, 0) => return f.write_str("0 B"),
            (_, 0) => write!(f, "{} in guest_memfd", human_bytes(file))?,
            (0, _) => write!(f, "{} in host memory", human_bytes(host))?,
            _ => write!(
                f,
                "{} ({} in guest_memfd, {} in host memory)",
                human_bytes(self.total()),
                human_bytes(file),
                human_bytes(host)
            )?,
        }
        if f.alternate() {
            return Ok(());
        }
        let mut shares = Vec::new();
        if self.files.len() > 1 && file > 0 {
            shares.extend(
                (self.files.iter().enumerate())
                    .map(|(i, b)| format!("file {i}: {}", human_bytes(*b))),
            );
        }
        if self.host.len() > 1 && host > 0 {
            shares.extend(
                (self.host.iter().enumerate())
                    .map(|(i, b)| format!("range {i}: {}", human_bytes(*b))),
            );
        }
        if !shares.is_empty() {
            write!(f, "; {}", shares.join(", "))?;
        }
        Ok(())
    }
}

/// vCPU exits of guest loops, by kind.
///
/// ```
/// use gmem::memory::ExitCounts;
/// let mut n = ExitCounts::default();
/// n.record(&gmem::VcpuExit::Mmio { gpa: 0, is_write: false, len: 8, data: 0 });
/// assert_eq!(n.mmio, 1);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Runs that completed (`Done`).
    pub done: u64,
    /// `KVM_EXIT_MEMORY_FAULT`.
    pub memory_fault: u64,
    /// `KVM_EXIT_HYPERCALL` (`KVM_HC_MAP_GPA_RANGE`).
    pub hypercall: u64,
    /// `KVM_EXIT_MMIO`.
    pub mmio: u64,
    /// Runs cut short by the backend's time bound.
    pub timeout: u64,
}

impl ExitCounts {
    /// Counts one exit.
    ///
    /// ```
    /// let mut n = gmem::memory::ExitCounts::default();
    /// n.record(&gmem::VcpuExit::Done(0));
    /// assert_eq!(n.done, 1);
    /// ```
    pub fn record(&mut self, exit: &VcpuExit) {
        match exit {
            VcpuExit::Done(_) => self.done += 1,
            VcpuExit::MemoryFault { .. } => self.memory_fault += 1,
            VcpuExit::Hypercall { .. } => self.hypercall += 1,
            VcpuExit::Mmio { .. } => self.mmio += 1,
            VcpuExit::Timeout { .. } => self.timeout += 1,
        }
    }

    /// Adds another count to this one.
    ///
    /// ```
    /// let mut a = gmem::memory::ExitCounts { done: 1, ..Default::default() };
    /// a.add(&a.clone());
    /// assert_eq!(a.done, 2);
    /// ```
    pub fn add(&mut self, other: &ExitCounts) {
        self.done += other.done;
        self.memory_fault += other.memory_fault;
        self.hypercall += other.hypercall;
        self.mmio += other.mmio;
        self.timeout += other.timeout;
    }
}

/// A conversion the manager made for a vCPU exit.
///
/// ```
/// use gmem::memory::{Conversion, GuestAddress, GuestRange, PageState};
/// let c = Conversion { range: GuestRange::new(GuestAddress(0), 4096), to: PageState::Private };
/// assert_eq!(c.to, PageState::Private);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversion {
    /// The converted range.
    pub range: GuestRange,
    /// Its state now.
    pub to: PageState,
}

/// What [`MemoryManager::run_loop`] did.
///
/// ```
/// let run = gmem::memory::LoopRun::default();
/// assert_eq!(run.result, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopRun {
    /// The loop's result (for a verify: the words that differ), summed
    /// over the runs it took.
    pub result: u64,
    /// The exits on the way, by kind.
    pub exits: ExitCounts,
}

/// A VM and its RAM: built from a [`Layout`] on whatever backing the host
/// offers, owning every file, mapping and memslot it made.
///
/// ```
/// use gmem::memory::{BackingRequest, GuestAddress, GuestRange, Layout, MemoryManager, PageState};
/// let hv = gmem::Backend::Soft.open().unwrap();
/// let layout = Layout::builder().memory(2 << 20).backing(BackingRequest::Private).build().unwrap();
/// let mm = MemoryManager::new(&*hv, layout).unwrap();
/// mm.write(GuestAddress(0x1000), b"hello").unwrap();
/// let page = GuestRange::new(GuestAddress(0x1000), 4096);
/// mm.convert(page, PageState::Private).unwrap();
/// assert_eq!(mm.read(GuestAddress(0x1000), &mut [0; 5]).unwrap_err().rule(), "gmem-private");
/// ```
pub struct MemoryManager {
    regions: GuestRegions,
    files: Vec<Arc<GmemFile>>,
    /// Private guest physical ranges. Conversions and discards hold it for
    /// writing, the manager's own accesses for reading, so a copy never
    /// races a conversion of its bytes.
    private: Arc<RwLock<RangeSet<u64>>>,
    layout: Layout,
    backing: Backing,
    /// Dropped last: the files and slots belong to it.
    vm: Box<dyn Vm>,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("layout", &self.layout)
            .field("backing", &self.backing)
            .finish()
    }
}

impl MemoryManager {
    /// Chooses the backing the layout asks for, creates the VM of its type,
    /// the guest_memfd files and host memory, and binds every memslot at
    /// its file offset. In the guest_memfd backing each slot's
    /// `userspace_addr` is the file's own mapping (see
    /// [`BackingMode::GuestMemfd`]).
    ///
    /// ```
    /// use gmem::memory::{BackingMode, Layout, MemoryManager};
    /// let hv = gmem::Backend::Soft.open().unwrap();
    /// let mm = MemoryManager::new(&*hv, Layout::builder().memory(4 << 20).build().unwrap()).unwrap();
    /// assert_eq!(mm.backing().mode, BackingMode::GuestMemfd);
    /// ```
    pub fn new(hv: &dyn Hypervisor, layout: Layout) -> Result<MemoryManager, Error> {
        let (vm, backing) = backing::choose(hv, layout.request())?;
        if backing.mode.has_private_memory() {
            // Guest-driven conversions reach the VMM only if the hypercall
            // exits (x86.c: `kvm->arch.hypercall_exit_enabled`).
            let mask = 1u64 << KVM_HC_MAP_GPA_RANGE;
            if vm.check_extension(KVM_CAP_EXIT_HYPERCALL) as u64 & mask != 0 {
                vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, mask)?;
            }
        }
        let files = match backing.mode.file_access() {
            Some(access) => layout
                .files()
                .iter()
                .map(|&size| GmemFile::create(&*vm, size, access).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let maps = match backing.mode {
            BackingMode::GuestMemfd | BackingMode::InPlace => files
                .iter()
                .map(|f| f.map().map(|m| Some(Arc::<dyn HostMemory>::from(m))))
                .collect::<Result<Vec<_>, _>>()?,
            _ => vec![None; files.len()],
        };
        let private = Arc::new(RwLock::new(RangeSet::new()));
        let mut regions = Vec::new();
        for ram in layout.ranges() {
            let host = match maps.get(ram.file).cloned().flatten() {
                Some(mem) => HostView {
                    mem,
                    offset: ram.offset.0,
                    is_file: true,
                },
                None => HostView {
                    mem: Arc::from(hv.host_memory(ram.range.len)?),
                    offset: 0,
                    is_file: false,
                },
            };
            regions.push(GmemRegion {
                range: ram.range,
                host,
                file: files.get(ram.file).map(|f| (f.clone(), ram.offset)),
                private: private.clone(),
            });
        }
        for slot in layout.slots() {
            let region = &regions[slot.ram];
            let within = slot.range.start.0 - region.range.start.0;
            let userspace_addr = region.host_address().0 + within;
            let (gpa, len) = (slot.range.start.0, slot.range.len);
            let request = match region.file() {
                Some(file) => {
                    let fd = file.guest_memfd().as_raw_fd();
                    let mut r = guest_memfd_region(slot.id, gpa, len, fd, slot.offset.0);
                    r.userspace_addr = userspace_addr;
                    r
                }
                None => user_region(slot.id, gpa, len, userspace_addr),
            };
            vm.set_user_memory_region2(request)?;
        }
        let regions = GuestRegions::from_regions(regions)
            .map_err(|e| Error::layout(format!("vm-memory refused the regions: {e}")))?;
        Ok(MemoryManager {
            regions,
            files,
            private,
            layout,
            backing,
            vm,
        })
    }

    /// The VM, for creating vCPUs and for conformance-style calls.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let vcpu = mm.vm().create_vcpu(0).unwrap();
    /// ```
    pub fn vm(&self) -> &dyn Vm {
        self.vm.as_ref()
    }

    /// The layout it was built from.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// assert_eq!(mm.layout().size(), 1 << 20);
    /// ```
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The backing chosen, with its reason.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// println!("{}: {}", mm.backing().mode, mm.backing().reason);
    /// ```
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// guest_memfd file `index` of the layout (none with anonymous backing).
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// assert_eq!(mm.file(0).unwrap().size(), 1 << 20);
    /// assert!(mm.file(1).is_none());
    /// ```
    pub fn file(&self, index: usize) -> Option<&GmemFile> {
        self.files.get(index).map(|f| f.as_ref())
    }

    /// Guest RAM for vm-memory: device code written against
    /// `vm_memory::Bytes` and `GuestMemoryBackend` works on it as is.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// use gmem::vm_memory::{Bytes, GuestAddress};
    /// mm.guest_memory().write_obj(7u64, GuestAddress(8)).unwrap();
    /// ```
    pub fn guest_memory(&self) -> &GuestRegions {
        &self.regions
    }

    /// RAM split by state, in guest physical order.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager, PageState};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let states = mm.states();
    /// assert_eq!(states.len(), 1);
    /// assert_eq!(states[0].1, PageState::Shared);
    /// ```
    pub fn states(&self) -> Vec<(GuestRange, PageState)> {
        let private = self.private.read();
        let mut out = Vec::new();
        for ram in self.layout.ranges() {
            let r = ram.range.start.0..ram.range.bound();
            let mut at = r.start;
            for p in private.overlapping(&r) {
                let (s, e) = (p.start.max(r.start), p.end.min(r.end));
                if s > at {
                    out.push((GuestRange::from_bounds(at, s), PageState::Shared));
                }
                out.push((GuestRange::from_bounds(s, e), PageState::Private));
                at = e;
            }
            if at < r.end {
                out.push((GuestRange::from_bounds(at, r.end), PageState::Shared));
            }
        }
        out
    }

    /// The state of the page holding `gpa`, or `None` outside RAM.
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager, PageState};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// assert_eq!(mm.state(GuestAddress(0)), Some(PageState::Shared));
    /// assert_eq!(mm.state(GuestAddress(1 << 20)), None);
    /// ```
    pub fn state(&self, gpa: GuestAddress) -> Option<PageState> {
        use vm_memory::GuestMemoryBackend;
        self.regions.find_region(gpa)?;
        Some(if self.private.read().contains(&gpa.0) {
            PageState::Private
        } else {
            PageState::Shared
        })
    }

    /// The regions holding `range` and the part of it in each; a gap is
    /// [`Error::Unbacked`].
    fn pieces(&self, range: GuestRange) -> Result<Vec<(&GmemRegion, GuestRange)>, Error> {
        use vm_memory::GuestMemoryBackend;
        let Some(end) = range.end() else {
            return Err(Error::Range {
                what: "guest range",
                range: range.to_string(),
                why: "wraps the guest physical address space",
            });
        };
        let mut out = Vec::new();
        let mut at = range.start.0;
        while at < end.0 {
            let Some(region) = self.regions.find_region(GuestAddress(at)) else {
                let next = self
                    .regions
                    .iter()
                    .map(|r| r.range.start.0)
                    .find(|&s| s > at)
                    .unwrap_or(end.0)
                    .min(end.0);
                return Err(Error::Unbacked {
                    range: GuestRange::from_bounds(at, next),
                });
            };
            let piece = range
                .intersect(&region.range)
                .expect("the region holds `at`, which lies in the range");
            at = piece.bound();
            out.push((region, piece));
        }
        Ok(out)
    }

    /// [`MemoryManager::pieces`] of a page-aligned, non-empty range.
    fn page_pieces(
        &self,
        what: &'static str,
        range: GuestRange,
    ) -> Result<Vec<(&GmemRegion, GuestRange)>, Error> {
        if range.len == 0 || !range.is_page_aligned() {
            return Err(Error::Range {
                what,
                range: range.to_string(),
                why: "must be page aligned and not empty",
            });
        }
        self.pieces(range)
    }

    /// Converts `range` (page aligned, all RAM) to `to`, so that the range
    /// is never held twice. In the split backing the copy that became
    /// stale is freed: going private drops the shared host pages
    /// (`MADV_DONTNEED` on anonymous memory), going shared punches the
    /// guest_memfd pages, and the contents do not carry over. In the
    /// in-place backing the file converts its pages where they are
    /// (`KVM_SET_MEMORY_ATTRIBUTES2`) and keeps their contents. State is
    /// kept by range: converting 1 TiB costs what 4 KiB costs.
    ///
    /// ```
    /// # use gmem::memory::{BackingRequest, GuestAddress, GuestRange, Layout, MemoryManager, PageState};
    /// let hv = gmem::Backend::Soft.open().unwrap();
    /// let layout = Layout::builder().memory(1 << 20).backing(BackingRequest::Private).build().unwrap();
    /// let mm = MemoryManager::new(&*hv, layout).unwrap();
    /// let range = GuestRange::new(GuestAddress(0x4000), 0x8000);
    /// mm.convert(range, PageState::Private).unwrap();
    /// assert_eq!(mm.state(GuestAddress(0x4000)), Some(PageState::Private));
    /// ```
    pub fn convert(&self, range: GuestRange, to: PageState) -> Result<(), Error> {
        let pieces = self.page_pieces("converting", range)?;
        let mode = self.backing.mode;
        if !mode.has_private_memory() {
            return Err(Error::Unsupported {
                what: format!("converting {range} to {to}"),
                why: format!("the {mode} backing has no private memory"),
            });
        }
        let mut private = self.private.write();
        let mark = |private: &mut RangeSet<u64>, r: &GuestRange| match to {
            PageState::Private => private.insert(r.start.0..r.bound()),
            PageState::Shared => private.remove(r.start.0..r.bound()),
        };
        if mode == BackingMode::InPlace {
            // One copy of every page: the file converts it where it is.
            for (region, piece) in &pieces {
                if let Some((file, off, len)) = region.file_piece(piece) {
                    file.set_private(off, len, to == PageState::Private)?;
                }
                mark(&mut private, piece);
            }
            return Ok(());
        }
        let attributes = match to {
            PageState::Private => KVM_MEMORY_ATTRIBUTE_PRIVATE as u64,
            PageState::Shared => 0,
        };
        self.vm.set_memory_attributes(kvm_memory_attributes {
            address: range.start.0,
            size: range.len,
            attributes,
            flags: 0,
        })?;
        mark(&mut private, &range);
        for (region, piece) in &pieces {
            match to {
                PageState::Private => region.discard_host(piece)?,
                PageState::Shared => region.punch(piece)?,
            }
        }
        Ok(())
    }

    /// Returns the memory of `range` (page aligned, all RAM) to the host,
    /// whatever holds it: guest_memfd pages are punched, separate host
    /// memory is dropped. The next touch, by guest or host, reads zeros;
    /// the range keeps its state.
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, GuestRange, Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let all = GuestRange::new(GuestAddress(0), 1 << 20);
    /// mm.write(GuestAddress(0), &[1; 8192]).unwrap();
    /// assert_eq!(mm.held_in(all).unwrap().total(), 8192);
    /// mm.discard(all).unwrap();
    /// assert_eq!(mm.held_in(all).unwrap().total(), 0);
    /// ```
    pub fn discard(&self, range: GuestRange) -> Result<(), Error> {
        let pieces = self.page_pieces("discarding", range)?;
        let _no_conversion = self.private.write();
        for (region, piece) in &pieces {
            region.punch(piece)?;
            region.discard_host(piece)?;
        }
        Ok(())
    }

    /// Memory held by the whole VM's RAM, measured by the kernel.
    ///
    /// ```
    /// # use gmem::memory::{Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// assert_eq!(mm.held().unwrap().total(), 0);
    /// ```
    pub fn held(&self) -> Result<Held, Error> {
        let mut held = Held {
            files: vec![0; self.files.len()],
            host: vec![0; self.layout.ranges().len()],
        };
        for (i, region) in self.layout.ranges().iter().enumerate() {
            self.add_held(region.range, i, &mut held)?;
        }
        Ok(held)
    }

    /// Memory held for `range` (page aligned, all RAM).
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, GuestRange, Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// mm.write(GuestAddress(0x2000), &[1]).unwrap();
    /// let page = GuestRange::new(GuestAddress(0x2000), 4096);
    /// assert_eq!(mm.held_in(page).unwrap().files, vec![4096]);
    /// ```
    pub fn held_in(&self, range: GuestRange) -> Result<Held, Error> {
        let pieces = self.page_pieces("measuring", range)?;
        let mut held = Held {
            files: vec![0; self.files.len()],
            host: vec![0; self.layout.ranges().len()],
        };
        for (_, piece) in pieces {
            let index = self
                .layout
                .ranges()
                .iter()
                .position(|r| r.range.contains(piece.start))
                .expect("pieces lie in RAM ranges");
            self.add_held(piece, index, &mut held)?;
        }
        Ok(held)
    }

    fn add_held(&self, piece: GuestRange, ram: usize, held: &mut Held) -> Result<(), Error> {
        use vm_memory::GuestMemoryBackend;
        let region = self
            .regions
            .find_region(piece.start)
            .expect("the piece lies in RAM");
        let (file, host) = region.held(&piece)?;
        if file > 0 {
            held.files[self.layout.ranges()[ram].file] += file;
        }
        held.host[ram] += host;
        Ok(())
    }

    /// The shared slices of `[gpa, gpa + len)`, with the state lock held
    /// by the caller: [`Error::Unbacked`] outside RAM, [`Error::Private`]
    /// on a private page.
    fn shared_slices(
        &self,
        private: &RangeSet<u64>,
        gpa: GuestAddress,
        len: usize,
    ) -> Result<Vec<VolatileSlice<'_>>, Error> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (region, piece) in self.pieces(GuestRange::new(gpa, len as u64))? {
            if let Some(range) = GmemRegion::private_part(private, &piece) {
                return Err(Error::Private { range });
            }
            let offset = piece.start.0 - region.range.start.0;
            out.push(region.slice_unchecked(offset, piece.len as usize));
        }
        Ok(out)
    }

    /// Reads shared guest memory at `gpa` into `buf`, across RAM ranges.
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// let mut buf = [0xff; 4];
    /// mm.read(GuestAddress(0x10), &mut buf).unwrap();
    /// assert_eq!(buf, [0; 4]);
    /// assert_eq!(mm.read(GuestAddress(1 << 20), &mut buf).unwrap_err().rule(), "gmem-unbacked");
    /// ```
    pub fn read(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), Error> {
        let private = self.private.read();
        let mut done = 0;
        for slice in self.shared_slices(&private, gpa, buf.len())? {
            done += slice.copy_to(&mut buf[done..]);
        }
        Ok(())
    }

    /// Writes `buf` into shared guest memory at `gpa`, across RAM ranges.
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// mm.write(GuestAddress(0x10), b"abcd").unwrap();
    /// ```
    pub fn write(&self, gpa: GuestAddress, buf: &[u8]) -> Result<(), Error> {
        let private = self.private.read();
        let mut done = 0;
        for slice in self.shared_slices(&private, gpa, buf.len())? {
            slice.copy_from(&buf[done..done + slice.len()]);
            done += slice.len();
        }
        Ok(())
    }

    /// An atomic load of a naturally aligned `T` at `gpa`.
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager};
    /// # use std::sync::atomic::Ordering;
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// mm.store(GuestAddress(0x40), 5u32, Ordering::Release).unwrap();
    /// assert_eq!(mm.load::<u32>(GuestAddress(0x40), Ordering::Acquire).unwrap(), 5);
    /// ```
    pub fn load<T: AtomicAccess>(&self, gpa: GuestAddress, order: Ordering) -> Result<T, Error> {
        let private = self.private.read();
        let slices = self.shared_slices(&private, gpa, size_of::<T>())?;
        one_slice(&slices, gpa)?
            .load(0, order)
            .map_err(|_| misaligned::<T>(gpa))
    }

    /// An atomic store of `val`, a naturally aligned `T`, at `gpa`. The
    /// address comes first, as in every method of the manager (vm-memory's
    /// own `Bytes::store` on [`MemoryManager::guest_memory`] keeps
    /// vm-memory's order, value first).
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager};
    /// # use std::sync::atomic::Ordering;
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// mm.store(GuestAddress(0x48), 1u64, Ordering::Relaxed).unwrap();
    /// let err = mm.store(GuestAddress(0x44), 1u64, Ordering::Relaxed).unwrap_err();
    /// assert_eq!(err.rule(), "gmem-range");
    /// ```
    pub fn store<T: AtomicAccess>(
        &self,
        gpa: GuestAddress,
        val: T,
        order: Ordering,
    ) -> Result<(), Error> {
        let private = self.private.read();
        let slices = self.shared_slices(&private, gpa, size_of::<T>())?;
        one_slice(&slices, gpa)?
            .store(val, 0, order)
            .map_err(|_| misaligned::<T>(gpa))
    }

    /// A volatile slice of shared guest memory, for device emulation that
    /// works in place (DMA-style). `range` must lie in one RAM range. The
    /// check is made now: do not keep a slice across a conversion of its
    /// bytes (the manager's own `read`/`write` hold the state lock instead).
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, GuestRange, Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// use gmem::vm_memory::Bytes;
    /// let slice = mm.slice(GuestRange::new(GuestAddress(0x1000), 16)).unwrap();
    /// slice.write_obj(0xabcd_u16, 2).unwrap();
    /// assert_eq!(slice.read_obj::<u16>(2).unwrap(), 0xabcd);
    /// ```
    pub fn slice(&self, range: GuestRange) -> Result<VolatileSlice<'_>, Error> {
        let Ok(len) = usize::try_from(range.len) else {
            return Err(Error::Unbacked { range });
        };
        let private = self.private.read();
        let mut slices = self.shared_slices(&private, range.start, len)?;
        match slices.len() {
            0 => Err(Error::Range {
                what: "slicing",
                range: range.to_string(),
                why: "is empty",
            }),
            1 => Ok(slices.pop().expect("one slice")),
            _ => Err(Error::Range {
                what: "slicing",
                range: range.to_string(),
                why: "spans two RAM ranges: take one slice in each",
            }),
        }
    }

    /// Handles a vCPU exit that asks for a conversion, so the VMM only has
    /// to resume the vCPU: a memory fault (the guest touched a page in the
    /// other state: KVM_EXIT_MEMORY_FAULT, FAULT-7) converts that page to
    /// what the guest used; a `KVM_HC_MAP_GPA_RANGE` hypercall (FAULT-8)
    /// converts the range the guest named. `Ok(None)` for any other exit
    /// (MMIO and the rest are the device model's).
    ///
    /// ```
    /// # use gmem::memory::{BackingRequest, GuestAddress, Layout, MemoryManager, PageState};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let layout = Layout::builder().memory(1 << 20).backing(BackingRequest::Private).build().unwrap();
    /// # let mm = MemoryManager::new(&*hv, layout).unwrap();
    /// use gmem::uapi::{KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED};
    /// let exit = gmem::VcpuExit::Hypercall {
    ///     nr: KVM_HC_MAP_GPA_RANGE, gpa: 0x8000, npages: 2, attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
    /// };
    /// let done = mm.handle_exit(&exit).unwrap().unwrap();
    /// assert_eq!((done.range.len, done.to), (0x2000, PageState::Private));
    /// ```
    pub fn handle_exit(&self, exit: &VcpuExit) -> Result<Option<Conversion>, Error> {
        let (range, to) = match *exit {
            VcpuExit::MemoryFault { flags, gpa, size } => {
                let to = if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE as u64 != 0 {
                    PageState::Private
                } else {
                    PageState::Shared
                };
                let range = GuestRange::new(GuestAddress(gpa), size.max(PAGE_SIZE));
                if self.pieces(range).is_ok() && self.states_in(range).iter().all(|(_, s)| *s == to)
                {
                    return Err(Error::Exit {
                        exit: *exit,
                        why: format!(
                            "{range} is already {to}: the fault is not a conversion request \
                             (a slot without guest_memfd, or a released file)"
                        ),
                    });
                }
                (range, to)
            }
            VcpuExit::Hypercall {
                nr,
                gpa,
                npages,
                attributes,
            } if nr == KVM_HC_MAP_GPA_RANGE => {
                let to = if attributes & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
                    PageState::Private
                } else {
                    PageState::Shared
                };
                let Some(len) = npages.checked_mul(PAGE_SIZE) else {
                    return Err(Error::Exit {
                        exit: *exit,
                        why: format!("{npages:#x} pages do not fit the address space"),
                    });
                };
                (GuestRange::new(GuestAddress(gpa), len), to)
            }
            _ => return Ok(None),
        };
        self.convert(range, to)?;
        Ok(Some(Conversion { range, to }))
    }

    /// The states of `range` (all RAM).
    fn states_in(&self, range: GuestRange) -> Vec<(GuestRange, PageState)> {
        self.states()
            .into_iter()
            .filter_map(|(r, s)| r.intersect(&range).map(|r| (r, s)))
            .collect()
    }

    /// Runs guest loop `op` on `vcpu` to its end, handling the exits that
    /// ask for conversions ([`MemoryManager::handle_exit`]) and resuming
    /// where the loop stopped; a run cut short by the backend's time bound
    /// after making progress is resumed too. Any other exit ends it with
    /// [`Error::Exit`] (an MMIO exit means the loop left RAM).
    ///
    /// ```
    /// # use gmem::memory::{GuestAddress, Layout, MemoryManager};
    /// # let hv = gmem::Backend::Soft.open().unwrap();
    /// # let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
    /// use gmem::GuestLoop;
    /// let mut vcpu = mm.vm().create_vcpu(0).unwrap();
    /// let run = mm.run_loop(&mut *vcpu, GuestLoop::Fill { gpa: 0, len: 4096, seed: 1 }).unwrap();
    /// assert_eq!(run.exits.done, 1);
    /// let word = mm.load::<u64>(GuestAddress(8), std::sync::atomic::Ordering::Relaxed).unwrap();
    /// assert_eq!(word, GuestLoop::pattern(8, 1));
    /// ```
    pub fn run_loop(&self, vcpu: &mut dyn Vcpu, op: GuestLoop) -> Result<LoopRun, Error> {
        let mut run = LoopRun::default();
        let mut op = op;
        loop {
            let out = vcpu.run_loop(op)?;
            run.exits.record(&out.exit);
            match out.exit {
                VcpuExit::Done(v) => {
                    run.result += v;
                    return Ok(run);
                }
                VcpuExit::MemoryFault { .. } | VcpuExit::Hypercall { .. } => {
                    self.handle_exit(&out.exit)?;
                }
                VcpuExit::Timeout { .. } if out.done > 0 => {}
                exit => {
                    return Err(Error::Exit {
                        exit,
                        why: format!(
                            "the guest loop stopped after {:#x} bytes of {op:?}",
                            out.done
                        ),
                    })
                }
            }
            op = op.rest(out.done);
        }
    }
}

/// The one slice of an access that must not cross RAM ranges.
fn one_slice<'a, 'b>(
    slices: &'b [VolatileSlice<'a>],
    gpa: GuestAddress,
) -> Result<&'b VolatileSlice<'a>, Error> {
    match slices {
        [one] => Ok(one),
        _ => Err(Error::Range {
            what: "atomic access",
            range: format!("at {:#x}", gpa.0),
            why: "crosses two RAM ranges",
        }),
    }
}

fn misaligned<T>(gpa: GuestAddress) -> Error {
    Error::Range {
        what: "atomic access",
        range: format!("of {} bytes at {:#x}", size_of::<T>(), gpa.0),
        why: "is not naturally aligned",
    }
}

impl Drop for MemoryManager {
    /// Deletes every memslot before the memory behind it goes, so no vCPU
    /// still running can reach a file or mapping being released.
    fn drop(&mut self) {
        for slot in self.layout.slots() {
            let _ = self.vm.set_user_memory_region2(delete_region(slot.id));
        }
    }
}
