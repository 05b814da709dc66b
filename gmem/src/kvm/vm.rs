//! A VM of the running kernel, with the backend's private setup region.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_enable_cap, CpuId};
use kvm_ioctls::VmFd;

use crate::error::{Errno, Error, Result};
use crate::hypervisor::{GuestMemfd, Vcpu, Vm};
use crate::kvm::guest::{Code, Setup, DOORBELL_SLOT, MAX_VCPUS, SETUP_GPA, SETUP_SIZE, SETUP_SLOT};
use crate::kvm::guest_memfd::KvmGuestMemfd;
use crate::kvm::memory::{pin_userspace_range, Pin};
use crate::kvm::vcpu::KvmVcpu;
use crate::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region,
    kvm_userspace_memory_region2, vm_type_name, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_HC_MAP_GPA_RANGE,
};

/// The userspace ranges of a VM's memslots, pinned (see
/// [`crate::kvm::memory`]) by slot (address-space id << 16 | slot id) until
/// the slot is deleted, or the VM and all its vCPUs are gone.
pub(crate) type SlotPins = Arc<Mutex<HashMap<u32, Pin>>>;

/// A VM fd (closed on drop) and the backend's setup region, bound to
/// memslot [`SETUP_SLOT`] at [`SETUP_GPA`] from creation on, so that no user
/// slot created later can conflict unnoticed (its last page, the doorbell,
/// is the read-only memslot [`DOORBELL_SLOT`]).
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    /// Dropped after the fd: the guest can run only while the VM fd or one
    /// of its vCPUs (which hold their own clone) is open.
    pins: SlotPins,
    vm_type: u64,
    /// Page tables, GDT and code: the guest sees them at SETUP_GPA.
    setup: Arc<Setup>,
    code: Arc<Code>,
    cpuid: CpuId,
    phys_bits: u8,
    next_tables: AtomicU64,
}

fn kernel(e: kvm_ioctls::Error, what: std::fmt::Arguments<'_>) -> Error {
    Error::new(
        Errno::from_raw(e.errno()),
        "kernel",
        format!("{what} refused"),
    )
}

fn reserved_range() -> String {
    format!(
        "slots {SETUP_SLOT} and {DOORBELL_SLOT} at gpa [{SETUP_GPA:#x}, {:#x})",
        SETUP_GPA + SETUP_SIZE
    )
}

impl KvmVm {
    pub(crate) fn new(
        fd: VmFd,
        vm_type: u64,
        cpuid: CpuId,
        phys_bits: u8,
        amd: bool,
    ) -> Result<KvmVm> {
        let code = Arc::new(Code::assemble(amd)?);
        // CPUID 0x8000_0001 EDX bit 26: the guest may use 1 GiB pages.
        let gib_pages = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0);
        let setup = Arc::new(Setup::new(&fd, &code, gib_pages)?);
        // Let KVM_HC_MAP_GPA_RANGE exit to the VMM where the kernel can.
        let mask = 1u64 << KVM_HC_MAP_GPA_RANGE;
        if fd.check_extension_raw(KVM_CAP_EXIT_HYPERCALL.into()) as i64 & mask as i64 != 0 {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_HYPERCALL,
                args: [mask, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(|e| kernel(e, format_args!("KVM_ENABLE_CAP EXIT_HYPERCALL {mask:#x}")))?;
        }
        Ok(KvmVm {
            fd,
            pins: SlotPins::default(),
            vm_type,
            setup,
            code,
            cpuid,
            phys_bits,
            next_tables: AtomicU64::new(0),
        })
    }

    /// Runs a memslot ioctl with the slot's userspace range checked and
    /// pinned (see [`crate::kvm::memory`]); the pin lives as long as the
    /// kernel keeps the slot.
    fn set_slot(
        &self,
        what: String,
        slot: u32,
        gpa: u64,
        size: u64,
        addr: u64,
        ioctl: impl FnOnce() -> std::result::Result<(), kvm_ioctls::Error>,
    ) -> Result<()> {
        self.check_reserved_slot(&what, slot)?;
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let pin = pin_userspace_range(&what, addr, size)?;
        ioctl().map_err(|e| self.slot_error(e, what, gpa, size))?;
        if size == 0 {
            pins.remove(&slot);
        } else if let Some(pin) = pin {
            // A change of an existing slot keeps its range (the kernel
            // refuses a new one): the first pin stays, this one goes.
            pins.entry(slot).or_insert(pin);
        }
        Ok(())
    }

    /// Refuses requests on the setup slots; they would unmap the vCPUs'
    /// page tables or move them.
    fn check_reserved_slot(&self, what: &str, slot: u32) -> Result<()> {
        if slot == SETUP_SLOT || slot == DOORBELL_SLOT {
            return Err(Error::new(
                Errno::EINVAL,
                "KVM-SETUP",
                format!(
                    "{what}: slot {slot} is reserved by the KVM backend for its setup region \
                     ({})",
                    reserved_range()
                ),
            ));
        }
        Ok(())
    }

    /// The kernel's refusal, named after the setup region when that is
    /// what the request ran into.
    fn slot_error(&self, e: kvm_ioctls::Error, what: String, gpa: u64, size: u64) -> Error {
        let end = gpa.saturating_add(size);
        if e.errno() == libc::EEXIST && gpa < SETUP_GPA + SETUP_SIZE && end > SETUP_GPA {
            return Error::new(
                Errno::EEXIST,
                "KVM-SETUP",
                format!(
                    "{what} refused: the range overlaps the KVM backend's reserved setup region \
                     ({})",
                    reserved_range()
                ),
            );
        }
        Error::new(
            Errno::from_raw(e.errno()),
            "kernel",
            format!("{what} refused"),
        )
    }
}

impl AsRawFd for KvmVm {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Vm for KvmVm {
    fn vm_type(&self) -> u64 {
        self.vm_type
    }

    fn check_extension(&self, cap: u32) -> i64 {
        i64::from(self.fd.check_extension_raw(cap.into()).max(0))
    }

    fn enable_cap(&self, cap: u32, arg0: u64) -> Result<()> {
        let c = kvm_enable_cap {
            cap,
            args: [arg0, 0, 0, 0],
            ..Default::default()
        };
        self.fd.enable_cap(&c).map_err(|e| {
            let mut err = kernel(e, format_args!("KVM_ENABLE_CAP cap={cap} arg0={arg0:#x}"));
            if self.check_extension(cap) == 0 {
                err.message += ": not supported by this host (KVM_CHECK_EXTENSION gives 0)";
            }
            err
        })
    }

    fn create_guest_memfd(&self, args: kvm_create_guest_memfd) -> Result<Box<dyn GuestMemfd>> {
        let raw = self.fd.create_guest_memfd(args).map_err(|e| {
            let mut err = kernel(
                e,
                format_args!(
                    "KVM_CREATE_GUEST_MEMFD size={:#x} flags={:#x}",
                    args.size, args.flags
                ),
            );
            let supported = self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) as u64;
            if args.flags & !supported != 0 {
                err.rule = "CREATE-1";
                err.message += &format!(
                    ": flags {:#x} are not supported by this VM on this host \
                     (KVM_CAP_GUEST_MEMFD_FLAGS is {supported:#x})",
                    args.flags & !supported
                );
            }
            err
        })?;
        // SAFETY: the kernel just returned this fd to us and nobody else
        // knows it: owning it here is what keeps it from leaking.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Box::new(KvmGuestMemfd::new(fd, args.size, args.flags)))
    }

    fn set_user_memory_region(&self, r: kvm_userspace_memory_region) -> Result<()> {
        let what = format!(
            "KVM_SET_USER_MEMORY_REGION slot={} gpa={:#x} size={:#x} flags={:#x} \
             userspace_addr={:#x}",
            r.slot, r.guest_phys_addr, r.memory_size, r.flags, r.userspace_addr
        );
        let (slot, gpa, size, addr) = (r.slot, r.guest_phys_addr, r.memory_size, r.userspace_addr);
        self.set_slot(what, slot, gpa, size, addr, || {
            // SAFETY: the userspace range is 0, or pinned memory this backend
            // handed out or reserved (set_slot; see kvm::memory): the guest
            // cannot reach memory Rust owns through this slot.
            unsafe { self.fd.set_user_memory_region(r) }
        })
    }

    fn set_user_memory_region2(&self, r: kvm_userspace_memory_region2) -> Result<()> {
        let what = format!(
            "KVM_SET_USER_MEMORY_REGION2 slot={} gpa={:#x} size={:#x} flags={:#x} \
             userspace_addr={:#x} guest_memfd={} offset={:#x}",
            r.slot,
            r.guest_phys_addr,
            r.memory_size,
            r.flags,
            r.userspace_addr,
            r.guest_memfd as i32,
            r.guest_memfd_offset
        );
        let (slot, gpa, size, addr) = (r.slot, r.guest_phys_addr, r.memory_size, r.userspace_addr);
        self.set_slot(what, slot, gpa, size, addr, || {
            // SAFETY: as in set_user_memory_region. The guest_memfd field is
            // a plain number to the kernel, which looks it up and checks it.
            unsafe { self.fd.set_user_memory_region2(r) }
        })
    }

    fn set_memory_attributes(&self, a: kvm_memory_attributes) -> Result<()> {
        self.fd.set_memory_attributes(a).map_err(|e| {
            let mut err = kernel(
                e,
                format_args!(
                    "KVM_SET_MEMORY_ATTRIBUTES address={:#x} size={:#x} attributes={:#x} \
                     flags={:#x}",
                    a.address, a.size, a.attributes, a.flags
                ),
            );
            if err.errno == Errno::ENOTTY {
                err.message += ": not supported by this host (the kernel has no such ioctl)";
            }
            err
        })
    }

    fn create_vcpu(&self, id: u64) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(id)
            .map_err(|e| kernel(e, format_args!("KVM_CREATE_VCPU id={id}")))?;
        // Page tables are handed out only to vCPUs the kernel created.
        let tables = self.next_tables.fetch_add(1, Ordering::Relaxed);
        if tables >= MAX_VCPUS {
            return Err(Error::new(
                Errno::ENOSPC,
                "KVM-SETUP",
                format!("the setup region has page tables for {MAX_VCPUS} vCPUs per VM only"),
            ));
        }
        fd.set_cpuid2(&self.cpuid)
            .map_err(|e| kernel(e, format_args!("KVM_SET_CPUID2 vcpu={id}")))?;
        let mut vcpu = KvmVcpu::new(
            fd,
            Arc::clone(&self.pins),
            id,
            tables,
            Arc::clone(&self.setup),
            Arc::clone(&self.code),
            self.phys_bits,
        )?;
        vcpu.pre_fault = self.check_extension(crate::uapi::KVM_CAP_PRE_FAULT_MEMORY) > 0;
        Ok(Box::new(vcpu))
    }
}

/// The VM type's name, for messages.
pub(crate) fn describe_type(vm_type: u64) -> String {
    format!("type={vm_type} ({})", vm_type_name(vm_type))
}
