//! Where guest RAM lives: the backing mode, chosen from what the host
//! offers and reported with the reason.
//!
//! The guest_memfd creation flags and VM types combine into four meaningful
//! modes ([`BackingMode`]); a VMM asks for what it needs
//! ([`BackingRequest`]) and gets the first mode the host supports, with the
//! capability values that decided it ([`Backing::reason`]).
//!
//! ```
//! use gmem::memory::{BackingMode, BackingRequest, Layout, MemoryManager};
//! let hv = gmem::Backend::Soft.open()?;
//! let layout = Layout::builder().memory(1 << 20).backing(BackingRequest::Best).build()?;
//! let mm = MemoryManager::new(&*hv, layout)?;
//! assert_eq!(mm.backing().mode, BackingMode::Split); // the software backend has private memory
//! println!("{}", mm.backing().reason);
//! # Ok::<(), gmem::memory::Error>(())
//! ```

use std::fmt;

use super::file::FileAccess;
use super::Error;
use crate::hypervisor::{Hypervisor, Vm};
use crate::uapi::{
    KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM,
};

/// Where guest RAM lives.
///
/// ```
/// use gmem::memory::BackingMode;
/// assert_eq!(BackingMode::GuestMemfd.to_string(), "guest_memfd");
/// assert!(BackingMode::Split.has_private_memory());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackingMode {
    /// All RAM in guest_memfd files created `MMAP | INIT_SHARED`; the host
    /// reaches it through the file's own mapping, and each memslot's
    /// `userspace_addr` points at that mapping, so kernels that serve such
    /// slots from the file (upstream) and kernels that serve them from
    /// `userspace_addr` (6.18.44-fc, FAULT-3) see the same memory. No
    /// private memory.
    GuestMemfd,
    /// A VM with private memory: private pages in guest_memfd (no host
    /// mapping), shared pages in host memory at `userspace_addr`. A
    /// conversion moves a range from one to the other and frees the copy
    /// left behind.
    Split,
    /// A VM with private memory whose guest_memfd (`MMAP | INIT_SHARED`)
    /// holds shared and private pages alike, converted in place
    /// (`KVM_SET_MEMORY_ATTRIBUTES2` on the file): one copy of every page,
    /// so a conversion frees nothing and holds nothing twice. The host maps
    /// the file; a private page is refused before it is touched. Offered by
    /// kernels with in-place conversion (kvm-x86, unreleased) and by the
    /// software backend's `next` profile.
    InPlace,
    /// Plain anonymous host memory, for hosts without guest_memfd.
    Anonymous,
}

impl BackingMode {
    /// Does the mode give the VM private memory (and so conversions)?
    ///
    /// ```
    /// assert!(!gmem::memory::BackingMode::GuestMemfd.has_private_memory());
    /// ```
    pub fn has_private_memory(self) -> bool {
        matches!(self, BackingMode::Split | BackingMode::InPlace)
    }

    /// How the mode creates its guest_memfd files; `None` without guest_memfd.
    ///
    /// ```
    /// use gmem::memory::{BackingMode, FileAccess};
    /// assert_eq!(BackingMode::Split.file_access(), Some(FileAccess::GuestOnly));
    /// ```
    pub fn file_access(self) -> Option<FileAccess> {
        match self {
            BackingMode::GuestMemfd => Some(FileAccess::Shared),
            BackingMode::Split => Some(FileAccess::GuestOnly),
            BackingMode::InPlace => Some(FileAccess::Shared),
            BackingMode::Anonymous => None,
        }
    }

    /// Every mode, most capable first.
    ///
    /// ```
    /// assert_eq!(gmem::memory::BackingMode::ALL.len(), 4);
    /// ```
    pub const ALL: [BackingMode; 4] = [
        BackingMode::InPlace,
        BackingMode::Split,
        BackingMode::GuestMemfd,
        BackingMode::Anonymous,
    ];
}

impl fmt::Display for BackingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackingMode::GuestMemfd => "guest_memfd",
            BackingMode::Split => "split",
            BackingMode::InPlace => "in-place",
            BackingMode::Anonymous => "anonymous",
        })
    }
}

/// What the VMM needs of the backing.
///
/// ```
/// use gmem::memory::{BackingMode, BackingRequest};
/// assert_eq!(BackingRequest::Private.candidates(), &[BackingMode::InPlace, BackingMode::Split]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingRequest {
    /// A VM without private memory: guest_memfd if the host can map it,
    /// else anonymous memory.
    #[default]
    Shared,
    /// A VM with private memory: in-place, else split; an error if neither.
    Private,
    /// The most capable mode the host offers.
    Best,
    /// Exactly this mode, or an error saying what the host lacks.
    Mode(BackingMode),
}

impl BackingRequest {
    /// The modes tried, in order.
    ///
    /// ```
    /// use gmem::memory::{BackingMode, BackingRequest};
    /// assert_eq!(BackingRequest::Best.candidates()[0], BackingMode::InPlace);
    /// ```
    pub fn candidates(&self) -> &[BackingMode] {
        match self {
            BackingRequest::Shared => &[BackingMode::GuestMemfd, BackingMode::Anonymous],
            BackingRequest::Private => &[BackingMode::InPlace, BackingMode::Split],
            BackingRequest::Best => &BackingMode::ALL,
            BackingRequest::Mode(m) => std::slice::from_ref(m),
        }
    }
}

/// The chosen backing: the mode, the VM type it needs, and why.
///
/// ```
/// use gmem::memory::{BackingMode, Layout, MemoryManager};
/// let hv = gmem::Backend::Soft.open().unwrap();
/// let mm = MemoryManager::new(&*hv, Layout::builder().memory(1 << 20).build().unwrap()).unwrap();
/// let backing = mm.backing();
/// assert_eq!(backing.mode, BackingMode::GuestMemfd);
/// assert!(backing.reason.contains("MMAP | INIT_SHARED"), "{}", backing.reason);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The mode.
    pub mode: BackingMode,
    /// The VM type created for it (`KVM_X86_*_VM`).
    pub vm_type: u64,
    /// Why this mode: the capability values that decided it.
    pub reason: String,
    /// The more capable modes asked for but passed over, each with why.
    pub passed_over: Vec<(BackingMode, String)>,
}

/// What one mode needs, probed on a VM of its type: the VM and the reason,
/// or why the host cannot offer the mode.
fn probe(hv: &dyn Hypervisor, mode: BackingMode) -> Result<(Box<dyn Vm>, String), String> {
    let gmem = hv.check_extension(KVM_CAP_GUEST_MEMFD);
    let memory2 = hv.check_extension(KVM_CAP_USER_MEMORY2);
    let no_gmem = || {
        (gmem <= 0 || memory2 <= 0).then(|| {
            format!(
                "the host has no guest_memfd (KVM_CAP_GUEST_MEMFD {gmem}, \
                 KVM_CAP_USER_MEMORY2 {memory2})"
            )
        })
    };
    let create = |vm_type: u32| {
        hv.create_vm(vm_type as u64)
            .map_err(|e| format!("creating the VM failed: {e}"))
    };
    // Both modes with private memory need guest_memfd and a sw_protected VM.
    let private_vm = || {
        if let Some(why) = no_gmem() {
            return Err(why);
        }
        let types = hv.check_extension(KVM_CAP_VM_TYPES) as u64;
        if types & (1 << KVM_X86_SW_PROTECTED_VM) == 0 {
            return Err(format!(
                "no VM type with private memory (KVM_CAP_VM_TYPES {types:#x} lacks \
                 sw_protected)"
            ));
        }
        create(KVM_X86_SW_PROTECTED_VM)
    };
    match mode {
        BackingMode::GuestMemfd => {
            if let Some(why) = no_gmem() {
                return Err(why);
            }
            let vm = create(KVM_X86_DEFAULT_VM)?;
            let flags = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
            let want = FileAccess::Shared.flags();
            if flags & want != want {
                return Err(format!(
                    "guest_memfd cannot be mapped shared on a default VM \
                     (KVM_CAP_GUEST_MEMFD_FLAGS {flags:#x} lacks MMAP | INIT_SHARED {want:#x})"
                ));
            }
            Ok((
                vm,
                format!(
                    "KVM_CAP_GUEST_MEMFD_FLAGS {flags:#x} offers MMAP | INIT_SHARED on a default \
                     VM: all RAM in guest_memfd, the host reaches it through the file's mapping"
                ),
            ))
        }
        BackingMode::Split => {
            let vm = private_vm()?;
            let attrs = vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) as u64;
            if attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE as u64 == 0 {
                return Err(format!(
                    "the VM does not track private memory (KVM_CAP_MEMORY_ATTRIBUTES {attrs:#x} \
                     on a sw_protected VM)"
                ));
            }
            Ok((
                vm,
                format!(
                    "VM type sw_protected has private memory (KVM_CAP_MEMORY_ATTRIBUTES \
                     {attrs:#x}) and no in-place conversion: private pages in guest_memfd, \
                     shared pages in host memory"
                ),
            ))
        }
        BackingMode::InPlace => {
            let vm = private_vm()?;
            let attrs = vm.check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) as u64;
            let flags = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
            let want = FileAccess::Shared.flags();
            if attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE as u64 == 0 || flags & want != want {
                return Err(format!(
                    "no in-place conversion (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES {attrs:#x}, \
                     KVM_CAP_GUEST_MEMFD_FLAGS {flags:#x} on a sw_protected VM)"
                ));
            }
            Ok((
                vm,
                format!(
                    "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES {attrs:#x} on a sw_protected VM: \
                     shared and private pages in one guest_memfd, converted in place \
                     (KVM_SET_MEMORY_ATTRIBUTES2), one copy of each page"
                ),
            ))
        }
        BackingMode::Anonymous => {
            let vm = create(KVM_X86_DEFAULT_VM)?;
            Ok((
                vm,
                no_gmem()
                    .unwrap_or_else(|| "anonymous memory was asked for".into())
                    .replacen("the host has", "plain host memory: the host has", 1),
            ))
        }
    }
}

/// Creates the VM for the first mode of `request` the host supports.
pub(crate) fn choose(
    hv: &dyn Hypervisor,
    request: BackingRequest,
) -> Result<(Box<dyn Vm>, Backing), Error> {
    let mut passed_over = Vec::new();
    for &mode in request.candidates() {
        match probe(hv, mode) {
            Ok((vm, reason)) => {
                let vm_type = vm.vm_type();
                return Ok((
                    vm,
                    Backing {
                        mode,
                        vm_type,
                        reason,
                        passed_over,
                    },
                ));
            }
            Err(why) => passed_over.push((mode, why)),
        }
    }
    Err(Error::Unsupported {
        what: format!(
            "no {} backing on the {} backend",
            request
                .candidates()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
            hv.name()
        ),
        why: passed_over
            .iter()
            .map(|(m, why)| format!("{m}: {why}"))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gmem-backing: the software backend as 6.18 offers split private
    /// memory, and says why not in place.
    #[test]
    fn private_request_on_soft_6_18_is_split_and_says_why() {
        let hv = crate::Backend::Soft.open().unwrap();
        let (vm, b) = choose(&*hv, BackingRequest::Private).unwrap();
        assert_eq!(b.mode, BackingMode::Split);
        assert_eq!(vm.vm_type(), KVM_X86_SW_PROTECTED_VM as u64);
        assert_eq!(b.passed_over.len(), 1);
        let why = &b.passed_over[0].1;
        assert!(
            why.contains("KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES 0x0"),
            "{why}"
        );
        assert!(
            b.reason.contains("KVM_CAP_MEMORY_ATTRIBUTES 0x8"),
            "{}",
            b.reason
        );
    }

    /// gmem-backing: the `next` profile converts in place, and refuses the
    /// split backing because its VMs no longer track private memory.
    #[test]
    fn private_request_on_soft_next_is_in_place() {
        let hv = crate::soft::SoftHypervisor::with_profile(crate::Release::Next).unwrap();
        let (_, b) = choose(&hv, BackingRequest::Private).unwrap();
        assert_eq!(b.mode, BackingMode::InPlace);
        assert!(b.passed_over.is_empty());
        let Err(err) = choose(&hv, BackingRequest::Mode(BackingMode::Split)) else {
            panic!("split must be refused")
        };
        assert_eq!(err.rule(), "gmem-backing");
        assert!(
            err.to_string().contains("KVM_CAP_MEMORY_ATTRIBUTES 0x0"),
            "{err}"
        );
    }
}
