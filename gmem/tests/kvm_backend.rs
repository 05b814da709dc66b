//! The KVM backend's own tests, against the running kernel: what only this
//! backend has. The spec's rules are checked on this backend by the contract
//! suite (tests/contract), and where the running kernel departs from
//! upstream is recorded in scenarios/departures.toml and checked there and
//! by the scenario corpus (tests/corpus.rs); neither is repeated here.
//!
//! Here: opening the device, kernel refusals naming the ioctl and its
//! values, the accesses the backend's guest code and page tables must reach
//! (every width, across a 2 MiB boundary, above 4 GiB, up to MAXPHYADDR),
//! bad guest operations and the reserved setup slot and range (KVM-SETUP),
//! userspace-address safety and the ranges it reserves (gmem-safety), no fd
//! leaks (LIFE-8), the run bound on any thread, the offset and rule a SIGBUS
//! names and the chaining of foreign SIGBUSes; and the few cases the
//! contract suite leaves out (CAP-1 on the system fd, an unknown capability,
//! LIFE-6 after a vCPU has run).
//!
//! Every test but the first needs /dev/kvm: when it does not exist the test
//! records a skip and passes (the binary prints one summary of the skips when
//! it exits); when it exists and does not open, the test fails.
//!
//! Tests run one at a time (they share a lock): the fd-leak test counts the
//! process's open fds, and the machine is small.

#[path = "common/leaks.rs"]
mod leaks;
#[path = "common/skips.rs"]
mod skips;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gmem::kvm::guest::{SETUP_GPA, SETUP_SIZE, SETUP_SLOT};
use gmem::kvm::vcpu::RUN_TIMEOUT;
use gmem::kvm::KvmHypervisor;
use gmem::uapi::*;
use gmem::{
    Errno, Error, GuestLoop, GuestMemfd, GuestOp, HostFault, HostMemory, Hypervisor, LoopExit,
    MapKind, Result, Vcpu, VcpuExit, Vm,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock and the hypervisor; `None` (after recording a skip) only when
/// /dev/kvm does not exist. A /dev/kvm that does not open fails the test.
fn kvm() -> Option<(MutexGuard<'static, ()>, KvmHypervisor)> {
    if !Path::new("/dev/kvm").exists() {
        skip("/dev/kvm does not exist");
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    match KvmHypervisor::open() {
        Ok(h) => Some((guard, h)),
        Err(e) => panic!("/dev/kvm exists but does not open: {e}"),
    }
}

/// Records that the test skips, and why: the binary prints one summary of
/// the skips when it exits.
fn skip(reason: &str) {
    skips::skip(reason);
}

const MMAP_SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

fn gmem_args(size: u64, flags: u64) -> kvm_create_guest_memfd {
    kvm_create_guest_memfd {
        size,
        flags,
        ..Default::default()
    }
}

/// A default VM.
fn default_vm(h: &KvmHypervisor) -> Box<dyn Vm> {
    h.create_vm(KVM_X86_DEFAULT_VM as u64).unwrap()
}

/// A default VM and its vCPU 0, with no memory.
fn vm_and_vcpu(h: &KvmHypervisor) -> (Box<dyn Vm>, Box<dyn Vcpu>) {
    let vm = default_vm(h);
    let cpu = vm.create_vcpu(0).unwrap();
    (vm, cpu)
}

/// A default VM whose slot 0 puts `size` bytes of fresh host memory at
/// `gpa`, the memory, and vCPU 0.
fn vm_on_host_memory(
    h: &KvmHypervisor,
    gpa: u64,
    size: u64,
) -> (Box<dyn Vm>, Box<dyn HostMemory>, Box<dyn Vcpu>) {
    let vm = default_vm(h);
    let mem = h.host_memory(size).unwrap();
    vm.set_user_memory_region2(user_region(0, gpa, size, mem.addr()))
        .unwrap();
    let cpu = vm.create_vcpu(0).unwrap();
    (vm, mem, cpu)
}

/// A default VM, a guest_memfd of `size` bytes made with `flags`, and a
/// shared mapping of the file `len` bytes long.
fn vm_with_mapped_file(
    h: &KvmHypervisor,
    size: u64,
    flags: u64,
    len: u64,
) -> (Box<dyn Vm>, Box<dyn GuestMemfd>, Box<dyn HostMemory>) {
    let vm = default_vm(h);
    let g = vm.create_guest_memfd(gmem_args(size, flags)).unwrap();
    let m = g.mmap(0, len, MapKind::Shared).unwrap();
    (vm, g, m)
}

/// The guest loads `size` bytes at `gpa`: how the run ended.
fn load(cpu: &mut Box<dyn Vcpu>, gpa: u64, size: u8) -> VcpuExit {
    cpu.run(GuestOp::Read { gpa, size }).unwrap()
}

/// The guest stores `value` (its low `size` bytes) at `gpa`: how the run
/// ended.
fn store(cpu: &mut Box<dyn Vcpu>, gpa: u64, size: u8, value: u64) -> VcpuExit {
    cpu.run(GuestOp::Write { gpa, size, value }).unwrap()
}

/// The 8 bytes at `offset` of `mem`, little-endian.
fn host_u64(mem: &dyn HostMemory, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read(offset, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Asserts that `r` was refused with `errno` by `rule`; returns the error.
#[track_caller]
fn assert_refused<T>(r: Result<T>, errno: Errno, rule: &str) -> Error {
    let Err(e) = r else {
        panic!("expected a refusal with {errno:?} ({rule})");
    };
    assert_eq!((e.errno, e.rule), (errno, rule), "{e}");
    e
}

/// Asserts that a host access was SIGBUS at mapping offset `offset`, and
/// that the backend names `rule` as the reason.
#[track_caller]
fn assert_sigbus(r: std::result::Result<(), HostFault>, offset: u64, rule: &str) {
    match r {
        Err(HostFault::Sigbus {
            offset: at,
            rule: by,
            ..
        }) => assert_eq!((at, by), (offset, rule)),
        other => panic!("expected SIGBUS at {offset:#x} ({rule}), got {other:?}"),
    }
}

/// Lets the guest's KVM_HC_MAP_GPA_RANGE exit to the VMM.
fn enable_map_gpa_range_exit(vm: &dyn Vm) {
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        .unwrap();
}

/// The guest asks for `[gpa, gpa + npages pages)` to be made private: how
/// the run ended and how long it took.
fn timed_map_gpa_range(cpu: &mut Box<dyn Vcpu>, gpa: u64, npages: u64) -> (VcpuExit, Duration) {
    let start = Instant::now();
    let exit = cpu
        .run(GuestOp::MapGpaRange {
            gpa,
            npages,
            attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
        })
        .unwrap();
    (exit, start.elapsed())
}

/// Asserts that a MAP_GPA_RANGE run of `[gpa, gpa + npages pages)` came
/// back within the run bound: as its hypercall exit, or, on a kernel that
/// never exits for it (docs/spec.md, section 10), as a timeout in the guest code.
#[track_caller]
fn assert_bounded_map_gpa_range(exit: VcpuExit, elapsed: Duration, gpa: u64, npages: u64) {
    assert!(
        elapsed < RUN_TIMEOUT + Duration::from_secs(2),
        "KVM_RUN took {elapsed:?}"
    );
    match exit {
        VcpuExit::Timeout { rip } => assert!(
            (SETUP_GPA..SETUP_GPA + SETUP_SIZE).contains(&rip),
            "timed out outside the guest code: rip {rip:#x}"
        ),
        exit => assert_eq!(
            exit,
            VcpuExit::Hypercall {
                nr: KVM_HC_MAP_GPA_RANGE,
                gpa,
                npages,
                attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
            }
        ),
    }
}

/// Is any byte of `[addr, addr + len)` mapped in this process?
fn mapped(addr: u64, len: u64) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| {
            let r = l.split_whitespace().next().unwrap();
            let (a, b) = r.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            a < addr + len && addr < b
        })
}

#[test]
fn open_on_a_missing_device_is_enoent() {
    // Arrange
    let path = c"/nonexistent/kvm";
    // Act
    let r = KvmHypervisor::open_path(path);
    // Assert
    let e = r.map(drop).expect_err("opening a missing device must fail");
    assert_eq!(e.errno, Errno::ENOENT);
    assert!(e.message.contains("/nonexistent/kvm"), "{e}");
}

#[test]
fn nr_memslots_on_the_system_fd_is_32764_cap_1() {
    let Some((_l, h)) = kvm() else { return };
    // Act
    let nr = h.check_extension(KVM_CAP_NR_MEMSLOTS);
    // Assert
    assert_eq!(nr, KVM_USER_MEM_SLOTS as i64);
}

#[test]
fn an_unknown_capability_reads_as_zero() {
    let Some((_l, h)) = kvm() else { return };
    // Act
    let unknown = h.check_extension(0xffff);
    // Assert
    assert_eq!(unknown, 0);
}

#[test]
fn a_refused_memory_region_names_the_ioctl_and_every_value_slot_7() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    let g = vm.create_guest_memfd(gmem_args(0x4000, 0)).unwrap();
    // Act
    let r = vm.set_user_memory_region2(guest_memfd_region(
        1,
        0x100000,
        0x4000,
        g.as_raw_fd(),
        0x1001,
    ));
    // Assert
    let e = assert_refused(r, Errno::EINVAL, "kernel");
    let want = format!(
        "KVM_SET_USER_MEMORY_REGION2 slot=1 gpa=0x100000 size=0x4000 flags=0x4 userspace_addr=0x0 \
         guest_memfd={} offset=0x1001 refused",
        g.as_raw_fd()
    );
    assert_eq!(e.message, want);
}

#[test]
fn a_refused_guest_memfd_creation_names_the_ioctl_and_size_create_2() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    // Act
    let r = vm.create_guest_memfd(gmem_args(4095, 0));
    // Assert
    let e = assert_refused(r, Errno::EINVAL, "kernel");
    assert!(
        e.message.contains("KVM_CREATE_GUEST_MEMFD size=0xfff"),
        "{e}"
    );
}

#[test]
fn a_vm_type_the_host_lacks_is_not_supported_by_this_host_cap_2() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let types = h.check_extension(KVM_CAP_VM_TYPES);
    let Some(lacking) = (0..6u64).find(|t| types & (1 << t) == 0) else {
        skip("this host supports every x86 VM type");
        return;
    };
    // Act
    let r = h.create_vm(lacking);
    // Assert
    let e = assert_refused(r, Errno::EINVAL, "CAP-2");
    assert!(e.message.contains("not supported by this host"), "{e}");
}

#[test]
fn guest_memfd_flags_the_vm_lacks_name_the_flags_cap_create_1() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    // Act
    let r = vm.create_guest_memfd(gmem_args(0x1000, 1 << 2));
    // Assert
    let e = assert_refused(r, Errno::EINVAL, "CREATE-1");
    assert!(e.message.contains("KVM_CAP_GUEST_MEMFD_FLAGS is"), "{e}");
}

#[test]
fn a_missing_attributes_ioctl_is_not_supported_by_this_host() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    let shared = kvm_memory_attributes {
        address: 0,
        size: 0x1000,
        attributes: 0,
        flags: 0,
    };
    // Act
    let r = vm.set_memory_attributes(shared);
    // Assert
    match r {
        Err(e) if e.errno == Errno::ENOTTY => {
            assert!(e.message.contains("not supported by this host"), "{e}")
        }
        other => skip(&format!(
            "this host has KVM_SET_MEMORY_ATTRIBUTES ({other:?})"
        )),
    }
}

#[test]
fn guest_loads_of_every_width_read_their_bytes() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, 0x10_0000, 0x2000);
    mem.write(0x1ff8, &0x1122_3344_5566_7788u64.to_le_bytes())
        .unwrap();
    // Act
    let got = [1, 2, 4, 8].map(|size| load(&mut cpu, 0x10_1ff8, size));
    // Assert
    let want = [0x88, 0x7788, 0x5566_7788, 0x1122_3344_5566_7788].map(VcpuExit::Done);
    assert_eq!(got, want);
}

#[test]
fn guest_stores_of_every_width_write_only_their_bytes() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, 0x10_0000, 0x1000);
    let value = 0xdead_beef_cafe_f00du64;
    // Act
    let exits = [(1, 0x100), (2, 0x200), (4, 0x300), (8, 0x400)]
        .map(|(size, at)| store(&mut cpu, 0x10_0000 + at, size, value));
    // Assert
    assert!(exits.iter().all(|e| *e == VcpuExit::Done(0)), "{exits:x?}");
    let stored = [0x100, 0x200, 0x300, 0x400].map(|at| host_u64(&*mem, at));
    assert_eq!(stored, [0x0d, 0xf00d, 0xcafe_f00d, value]);
}

#[test]
fn an_access_across_a_2_mib_boundary_reaches_both_pages() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: one slot over [2 MiB - 4 KiB, 2 MiB + 4 KiB).
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, 0x1f_f000, 0x2000);
    // Act
    let w = store(&mut cpu, 0x1f_fffc, 8, 0x0102_0304_0506_0708);
    let r = load(&mut cpu, 0x1f_fffc, 8);
    // Assert
    assert_eq!(w, VcpuExit::Done(0));
    assert_eq!(r, VcpuExit::Done(0x0102_0304_0506_0708));
    assert_eq!(host_u64(&*mem, 0xffc), 0x0102_0304_0506_0708);
}

#[test]
fn a_store_above_4_gib_without_a_slot_exits_as_mmio_fault_2() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mut cpu) = vm_and_vcpu(&h);
    // Act
    let exit = store(&mut cpu, 0x2_0000_0000, 2, 0xbeef);
    // Assert
    assert_eq!(
        exit,
        VcpuExit::Mmio {
            gpa: 0x2_0000_0000,
            is_write: true,
            len: 2,
            data: 0xbeef
        }
    );
}

#[test]
fn a_load_of_the_last_bytes_below_maxphyaddr_exits_as_mmio_fault_2() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mut cpu) = vm_and_vcpu(&h);
    let top = (1u64 << h.phys_bits()) - 8;
    // Act
    let exit = load(&mut cpu, top, 8);
    // Assert
    assert_eq!(
        exit,
        VcpuExit::Mmio {
            gpa: top,
            is_write: false,
            len: 8,
            data: 0
        }
    );
}

#[test]
fn a_sigbus_past_the_end_names_the_first_offset_past_it_mmap_3() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: a 4 KiB file mapped over 8 KiB.
    let (_vm, _g, m) = vm_with_mapped_file(&h, 0x1000, MMAP_SHARED, 0x2000);
    // Act
    let straddling = m.write(0xffe, &[1, 2, 3, 4]);
    let past = m.read(0x1800, &mut [0]);
    // Assert
    assert_sigbus(straddling, 0x1000, "MMAP-3");
    assert_sigbus(past, 0x1800, "MMAP-3");
}

#[test]
fn a_sigbus_without_init_shared_names_the_offset_touched_mmap_4() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, _g, m) = vm_with_mapped_file(&h, 0x2000, GUEST_MEMFD_FLAG_MMAP, 0x2000);
    // Act
    let r = m.read(0x1000, &mut [0; 4]);
    let w = m.write(8, &[1]);
    // Assert
    assert_sigbus(r, 0x1000, "MMAP-4");
    assert_sigbus(w, 8, "MMAP-4");
}

#[test]
fn a_guest_memfd_outlives_a_vm_whose_vcpu_has_run_life_6() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: the run sets up the backend's guest code in the VM.
    let (vm, mut cpu) = vm_and_vcpu(&h);
    load(&mut cpu, 0x1000, 1);
    let g = vm
        .create_guest_memfd(gmem_args(0x4000, MMAP_SHARED))
        .unwrap();
    // Act
    drop(cpu);
    drop(vm);
    let m = g.mmap(0, 0x4000, MapKind::Shared).unwrap();
    // Assert
    assert_eq!(m.write(0x1000, &[1]), Ok(()));
}

#[test]
fn the_map_gpa_range_hypercall_returns_within_the_run_bound_fault_8() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (vm, mut cpu) = vm_and_vcpu(&h);
    enable_map_gpa_range_exit(&*vm);
    // Act
    let (exit, elapsed) = timed_map_gpa_range(&mut cpu, 0x10_0000, 2);
    // Assert
    assert_bounded_map_gpa_range(exit, elapsed, 0x10_0000, 2);
}

#[test]
fn a_vcpu_made_on_one_thread_runs_bounded_on_another() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: the vCPU is made here and run on another thread.
    let (vm, mem, mut cpu) = vm_on_host_memory(&h, 0, 0x1000);
    enable_map_gpa_range_exit(&*vm);
    mem.write(0, &[0x42]).unwrap();
    // Act
    let ((hypercall, elapsed), read) = std::thread::spawn(move || {
        let hypercall = timed_map_gpa_range(&mut cpu, 0, 1);
        (hypercall, load(&mut cpu, 0, 1))
    })
    .join()
    .unwrap();
    // Assert
    assert_bounded_map_gpa_range(hypercall, elapsed, 0, 1);
    assert_eq!(read, VcpuExit::Done(0x42));
}

#[test]
fn bad_guest_operations_are_refused_before_running_kvm_setup() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mut cpu) = vm_and_vcpu(&h);
    let bad = [
        GuestOp::Read {
            gpa: 0x1000,
            size: 3,
        },
        GuestOp::Read {
            gpa: u64::MAX - 2,
            size: 8,
        },
        GuestOp::Write {
            gpa: 1 << h.phys_bits(),
            size: 1,
            value: 0,
        },
        GuestOp::Write {
            gpa: SETUP_GPA + 0x10,
            size: 1,
            value: 0,
        },
    ];
    for op in bad {
        // Act
        let r = cpu.run(op);
        // Assert
        assert_refused(r, Errno::EINVAL, "KVM-SETUP");
    }
}

#[test]
fn the_setup_slot_and_range_are_reserved_kvm_setup() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    let mem = h.host_memory(0x20_0000).unwrap();
    // Act
    let by_id = vm.set_user_memory_region2(user_region(SETUP_SLOT, 0x10_0000, 0x1000, mem.addr()));
    let delete = vm.set_user_memory_region2(user_region(SETUP_SLOT, 0, 0, 0));
    let overlap =
        vm.set_user_memory_region2(user_region(3, SETUP_GPA - 0x1000, 0x2000, mem.addr()));
    let below = vm.set_user_memory_region2(user_region(3, SETUP_GPA - 0x1000, 0x1000, mem.addr()));
    // Assert
    let e = assert_refused(by_id, Errno::EINVAL, "KVM-SETUP");
    assert!(e.message.contains("0xe0000000"), "{e}");
    assert_refused(delete, Errno::EINVAL, "KVM-SETUP");
    assert_refused(overlap, Errno::EEXIST, "KVM-SETUP");
    assert_eq!(below, Ok(()), "right below the range is free");
}

#[test]
fn userspace_addresses_outside_handed_out_memory_are_refused_gmem_safety() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    let heap = vec![0u8; 0x10000];
    let heap_page = (heap.as_ptr() as u64 + 0xfff) & !0xfff;
    let stack = 0u64;
    let stack_page = (&stack as *const u64 as u64) & !0xfff;
    let mem = h.host_memory(0x2000).unwrap();
    let unmapped = 0x7000_0000_0000u64; // far above anything this test maps
    let request =
        |slot, gpa, size, addr| vm.set_user_memory_region2(user_region(slot, gpa, size, addr));
    // Act + Assert
    assert_refused(
        request(1, 0, 0x1000, heap_page),
        Errno::EFAULT,
        "gmem-safety",
    );
    assert_refused(
        request(1, 0, 0x1000, stack_page),
        Errno::EFAULT,
        "gmem-safety",
    );
    assert_refused(
        request(1, 0, 0x3000, mem.addr()),
        Errno::EFAULT,
        "gmem-safety",
    );
    assert_eq!(request(1, 0, 0x2000, mem.addr()), Ok(()));
    assert_eq!(request(2, 0x10_0000, 0x1000, unmapped), Ok(()));
    assert_eq!(request(3, 0x20_0000, 0x1000, 0), Ok(()));
    drop(heap);
}

#[test]
fn no_fd_leaks_on_any_path_life_8() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: warm up lazily opened fds (none expected), then count.
    let vm = default_vm(&h);
    let memfd = {
        // SAFETY: memfd_create with a static name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"gmem-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fresh fd, owned once.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    };
    let before = leaks::open_fds();
    // Act
    for i in 0..2000u32 {
        let g = vm
            .create_guest_memfd(gmem_args(0x4000, MMAP_SHARED))
            .unwrap();
        let fd = g.as_raw_fd();
        let slot = 1 + (i % 8);
        vm.set_user_memory_region2(guest_memfd_region(slot, 0x10_0000, 0x4000, fd, 0))
            .unwrap();
        // Error paths: bad offsets, overlaps, closed fds, not-guest_memfd fds.
        let refused = [
            guest_memfd_region(100, 0x20_0000, 0x1000, fd, 0x1001),
            guest_memfd_region(100, 0x20_0000, 0x1000, fd, 0x4000),
            guest_memfd_region(100, 0x20_0000, 0x1000, fd, 0),
            guest_memfd_region(100, 0x10_0000, 0x1000, fd, 0x3000),
            guest_memfd_region(100, 0x20_0000, 0x1000, 9999, 0),
            guest_memfd_region(100, 0x20_0000, 0x1000, h.as_raw_fd(), 0),
            guest_memfd_region(100, 0x20_0000, 0x1000, vm.as_raw_fd(), 0),
            guest_memfd_region(100, 0x20_0000, 0x1000, memfd.as_raw_fd(), 0),
        ];
        for region in refused {
            assert!(vm.set_user_memory_region2(region).is_err(), "{region:?}");
        }
        assert!(g.mmap(0, 0x1000, MapKind::Private).is_err());
        assert!(vm.create_guest_memfd(gmem_args(0x1001, 0)).is_err());
        assert!(vm.create_guest_memfd(gmem_args(0x1000, 1 << 40)).is_err());
        let m = g.mmap(0, 0x4000, MapKind::Shared).unwrap();
        drop(g);
        drop(m);
        vm.set_user_memory_region2(guest_memfd_region(slot, 0x10_0000, 0, -1, 0))
            .unwrap();
        if i % 200 == 0 {
            let (_other, mut cpu) = vm_and_vcpu(&h);
            load(&mut cpu, 0x1000, 1);
        }
    }
    // Assert
    assert_eq!(leaks::open_fds(), before);
}

#[test]
fn memory_dropped_under_a_live_slot_stays_reserved_until_the_slot_goes_gmem_safety() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: a slot on host memory; the memory is dropped first.
    let (vm, mem, mut cpu) = vm_on_host_memory(&h, 0x10_0000, 0x2000);
    let addr = mem.addr();
    mem.write(0, &[0x99]).unwrap();
    // Act
    drop(mem);
    let still_reserved = mapped(addr, 0x2000);
    let read = load(&mut cpu, 0x10_0000, 1);
    vm.set_user_memory_region2(user_region(0, 0x10_0000, 0, 0))
        .unwrap();
    let after_delete = mapped(addr, 0x2000);
    // Assert: the guest no longer sees the old pages; the addresses were not
    // free for reuse while the slot lived, and are once it is gone.
    assert!(still_reserved);
    assert_ne!(read, VcpuExit::Done(0x99), "{read:?}");
    assert!(!after_delete);
}

#[test]
fn an_unmapped_userspace_range_is_reserved_while_its_slot_lives_gmem_safety() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let vm = default_vm(&h);
    let addr = 0x6000_0000_0000u64;
    assert!(!mapped(addr, 0x4000));
    // Act
    vm.set_user_memory_region(kvm_userspace_memory_region {
        slot: 1,
        flags: 0,
        guest_phys_addr: 0x10_0000,
        memory_size: 0x4000,
        userspace_addr: addr,
    })
    .unwrap();
    let reserved = mapped(addr, 0x4000);
    let mut cpu = vm.create_vcpu(0).unwrap();
    let read = load(&mut cpu, 0x10_0000, 1);
    drop(vm);
    let kept_by_vcpu = mapped(addr, 0x4000);
    drop(cpu);
    // Assert
    assert!(reserved);
    assert!(
        matches!(read, VcpuExit::Mmio { .. } | VcpuExit::MemoryFault { .. }),
        "{read:?}"
    );
    assert!(kept_by_vcpu, "a vCPU can still run the guest");
    assert!(!mapped(addr, 0x4000));
}

/// Child half of the SIGBUS chaining test: runs only when the parent sets
/// GMEM_SIGBUS_CHILD (to `own` or `default`).
#[test]
fn sigbus_child() {
    let Ok(mode) = std::env::var("GMEM_SIGBUS_CHILD") else {
        return;
    };
    extern "C" fn own(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(42) };
    }
    if mode == "own" {
        // SAFETY: installs a plain handler before gmem installs its own.
        unsafe { libc::signal(libc::SIGBUS, own as *const () as libc::sighandler_t) };
    }
    let h = KvmHypervisor::open().unwrap();
    let (_vm, _g, m) = vm_with_mapped_file(&h, 0x1000, MMAP_SHARED, 0x2000);
    // gmem's handler is installed and handles its own fault...
    assert_sigbus(m.write(0x1000, &[1]), 0x1000, "MMAP-3");
    // ...and a fault outside gmem's guarded copy is not ours.
    // SAFETY: deliberately touches the mapping past the end of the file:
    // this raises SIGBUS, which must reach the previous handler (or kill).
    unsafe { std::ptr::write_volatile((m.addr() + 0x1000) as *mut u8, 1) };
    unreachable!("the foreign SIGBUS was swallowed");
}

#[test]
fn a_sigbus_that_is_not_gmems_reaches_the_previous_handler_or_kills() {
    let Some((_l, _h)) = kvm() else { return };
    use std::os::unix::process::ExitStatusExt;
    let run = |mode: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sigbus_child", "--nocapture", "--test-threads=1"])
            .env("GMEM_SIGBUS_CHILD", mode)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    };
    // Act
    let own = run("own");
    let default = run("default");
    // Assert
    assert_eq!(own.code(), Some(42), "{own:?}");
    assert_eq!(default.signal(), Some(libc::SIGBUS), "{default:?}");
}

const SEED: u64 = 0x5eed_0000_0000_0000;

/// The guest runs `op` as one loop: how it ended.
fn guest_loop(cpu: &mut Box<dyn Vcpu>, op: GuestLoop) -> LoopExit {
    cpu.run_loop(op).unwrap()
}

fn fill(gpa: u64, len: u64) -> GuestLoop {
    GuestLoop::Fill {
        gpa,
        len,
        seed: SEED,
    }
}

fn verify(gpa: u64, len: u64) -> GuestLoop {
    GuestLoop::Verify {
        gpa,
        len,
        seed: SEED,
    }
}

fn finished(len: u64, result: u64) -> LoopExit {
    LoopExit {
        done: len,
        exit: VcpuExit::Done(result),
    }
}

#[test]
fn a_loop_above_4_gib_fills_what_the_host_reads_gmem_loop() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let gpa = 0x1_2345_0000;
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, gpa, 0x10000);
    // Act
    let filled = guest_loop(&mut cpu, fill(gpa, 0x10000));
    let verified = guest_loop(&mut cpu, verify(gpa, 0x10000));
    // Assert
    assert_eq!(filled, finished(0x10000, 0));
    assert_eq!(verified, finished(0x10000, 0));
    assert_eq!(host_u64(&*mem, 8), GuestLoop::pattern(gpa + 8, SEED));
    assert_eq!(
        host_u64(&*mem, 0xfff8),
        GuestLoop::pattern(gpa + 0xfff8, SEED)
    );
}

#[test]
fn a_loop_across_2_to_the_47_reaches_both_sides_gmem_loop() {
    let Some((_l, h)) = kvm() else { return };
    if h.phys_bits() <= 47 {
        skip("MAXPHYADDR is 47 bits or less: nothing lies above 2^47");
        return;
    }
    // Arrange: canonical virtual addresses stop at 2^47; guest physical
    // ones go on.
    let gpa = (1u64 << 47) - 0x4000;
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, gpa, 0x8000);
    // Act
    let filled = guest_loop(&mut cpu, fill(gpa, 0x8000));
    let verified = guest_loop(&mut cpu, verify(gpa, 0x8000));
    let below = load(&mut cpu, (1 << 47) - 8, 8);
    let above = load(&mut cpu, 1 << 47, 8);
    // Assert
    assert_eq!(filled, finished(0x8000, 0));
    assert_eq!(verified, finished(0x8000, 0));
    assert_eq!(
        host_u64(&*mem, 0x3ff8),
        GuestLoop::pattern((1 << 47) - 8, SEED)
    );
    assert_eq!(host_u64(&*mem, 0x4000), GuestLoop::pattern(1 << 47, SEED));
    assert_eq!(
        below,
        VcpuExit::Done(GuestLoop::pattern((1 << 47) - 8, SEED))
    );
    assert_eq!(above, VcpuExit::Done(GuestLoop::pattern(1 << 47, SEED)));
}

#[test]
fn a_verify_loop_into_an_mmio_gap_stops_at_its_first_word_fault_2() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: memory at [1 MiB, 1 MiB + 8 KiB), nothing after it.
    let (_vm, _mem, mut cpu) = vm_on_host_memory(&h, 0x10_0000, 0x2000);
    guest_loop(&mut cpu, fill(0x10_0000, 0x2000));
    // Act
    let exit = guest_loop(&mut cpu, verify(0x10_0000, 0x3000));
    let next = load(&mut cpu, 0x10_0008, 8);
    // Assert: the load that found no memory is the exit; the vCPU then
    // runs the next access as usual.
    assert_eq!(
        exit,
        LoopExit {
            done: 0x2000,
            exit: VcpuExit::Mmio {
                gpa: 0x10_2000,
                is_write: false,
                len: 8,
                data: 0
            }
        }
    );
    assert_eq!(next, VcpuExit::Done(GuestLoop::pattern(0x10_0008, SEED)));
}

/// gmem-loop: the page tables map guest memory a GiB (one page directory,
/// or one 1 GiB page) at a time, and a loop takes one run per GiB: a loop
/// over two adds up its counts and bytes done across them, and stops in the
/// second at a gap.
#[test]
fn a_loop_over_two_page_directories_adds_up_across_them_gmem_loop() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: 2 MiB of memory around the 1 GiB boundary.
    let gpa = (1u64 << 30) - 0x10_0000;
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, gpa, 0x20_0000);
    // Act
    let filled = guest_loop(&mut cpu, fill(gpa, 0x20_0000));
    mem.write(0x8, &[0xff]).unwrap();
    mem.write(0x1f_fff0, &[0xff]).unwrap();
    let verified = guest_loop(&mut cpu, verify(gpa, 0x20_0000));
    let past = guest_loop(&mut cpu, fill(gpa, 0x20_1000));
    // Assert
    assert_eq!(filled, finished(0x20_0000, 0));
    assert_eq!(verified, finished(0x20_0000, 2));
    assert_eq!(past.done, 0x20_0000);
    assert!(
        matches!(past.exit, VcpuExit::Mmio { gpa: at, is_write: true, .. } if at == gpa + 0x20_0000),
        "{past:?}"
    );
}

#[test]
fn two_vcpus_of_one_vm_run_loops_at_the_same_time_gmem_loop() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange: one region per vCPU, in different GiBs and under different
    // PML4 entries, so each vCPU maps its own.
    let vm = default_vm(&h);
    let len = 0x40_0000;
    let (a, b) = (0x4000_0000u64, 0x100_4000_0000u64);
    let mem_a = h.host_memory(len).unwrap();
    let mem_b = h.host_memory(len).unwrap();
    vm.set_user_memory_region2(user_region(0, a, len, mem_a.addr()))
        .unwrap();
    vm.set_user_memory_region2(user_region(1, b, len, mem_b.addr()))
        .unwrap();
    let cpus = [vm.create_vcpu(0).unwrap(), vm.create_vcpu(1).unwrap()];
    // Act: each fills and verifies its own region many times, both at once.
    let threads = cpus.into_iter().zip([a, b]).map(|(mut cpu, gpa)| {
        std::thread::spawn(move || {
            let mut exits = Vec::new();
            for _ in 0..20 {
                exits.push(guest_loop(&mut cpu, fill(gpa, len)));
                exits.push(guest_loop(&mut cpu, verify(gpa, len)));
            }
            (cpu, exits)
        })
    });
    let results: Vec<_> = threads.map(|t| t.join().unwrap()).collect();
    // Assert: every loop finished whole, and each vCPU sees the other's.
    let [(mut cpu0, exits0), (mut cpu1, exits1)] = <[_; 2]>::try_from(results).ok().unwrap();
    for exit in exits0.iter().chain(&exits1) {
        assert_eq!(*exit, finished(len, 0));
    }
    assert_eq!(guest_loop(&mut cpu0, verify(b, len)), finished(len, 0));
    assert_eq!(guest_loop(&mut cpu1, verify(a, len)), finished(len, 0));
}

/// FAULT-8: on a kernel where the hypercall never completes, the vCPU is
/// noticed at the hypercall instruction long before the run bound and
/// reported as a timeout there; it then runs the next access as usual.
#[test]
fn a_stuck_hypercall_is_reported_early_at_its_instruction_fault_8() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (vm, mem, mut cpu) = vm_on_host_memory(&h, 0x10_0000, 0x1000);
    enable_map_gpa_range_exit(&*vm);
    mem.write(0, &[0x42]).unwrap();
    // Act
    let (exit, elapsed) = timed_map_gpa_range(&mut cpu, 0x10_0000, 1);
    let next = load(&mut cpu, 0x10_0000, 1);
    // Assert
    let VcpuExit::Timeout { rip } = exit else {
        skip(&format!("this kernel completes the hypercall ({exit:?})"));
        return;
    };
    assert!(
        (SETUP_GPA..SETUP_GPA + SETUP_SIZE).contains(&rip),
        "rip {rip:#x}"
    );
    assert!(elapsed < RUN_TIMEOUT / 4, "noticed only after {elapsed:?}");
    assert_eq!(next, VcpuExit::Done(0x42));
}

/// KVM-SETUP: accesses to more distinct GiBs than the setup region has page
/// directories for recycle the page tables: each still exits where it
/// should, and memory reads as before.
#[test]
fn page_tables_are_recycled_when_the_setup_region_runs_out_kvm_setup() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mem, mut cpu) = vm_on_host_memory(&h, 0x10_0000, 0x1000);
    mem.write(0, &[0x42]).unwrap();
    // Act: one store in each of 1100 GiBs without memory.
    let stray: Vec<_> = (0..1100u64)
        .map(|k| (k, store(&mut cpu, (8 + k) << 30, 1, k & 0xff)))
        .filter(|(k, exit)| {
            *exit
                != VcpuExit::Mmio {
                    gpa: (8 + k) << 30,
                    is_write: true,
                    len: 1,
                    data: k & 0xff,
                }
        })
        .collect();
    let read = load(&mut cpu, 0x10_0000, 1);
    // Assert
    assert!(stray.is_empty(), "{stray:x?}");
    assert_eq!(read, VcpuExit::Done(0x42));
}

#[test]
fn loops_into_the_setup_region_or_past_maxphyaddr_are_refused_kvm_setup() {
    let Some((_l, h)) = kvm() else { return };
    // Arrange
    let (_vm, mut cpu) = vm_and_vcpu(&h);
    let top = 1u64 << h.phys_bits();
    // Act + Assert
    for op in [
        fill(SETUP_GPA - 0x1000, 0x2000),
        verify(SETUP_GPA + SETUP_SIZE - 8, 16),
        fill(top - 8, 16),
    ] {
        assert_refused(cpu.run_loop(op), Errno::EINVAL, "KVM-SETUP");
    }
}
