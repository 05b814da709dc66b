//! The memory manager (`gmem::memory`), written once against
//! `&dyn Hypervisor` and run on each backend (`soft::test`,
//! `soft_next::test` for the `next` profile, `kvm::test`).
//!
//! Memory held is what the kernel says (`cachestat` of a guest_memfd,
//! `mincore` of host memory, `st_blocks` of a memfd), never bookkeeping. A
//! test that needs what a host lacks (private memory for conversions)
//! skips, and the binary's one summary of skips names what was lacking.

#[path = "common/skips.rs"]
mod skips;

use std::sync::atomic::Ordering;

use gmem::memory::{
    BackingMode, BackingRequest, Error, FileAccess, GmemFile, GmemOffset, GuestAddress, GuestRange,
    Held, Layout, LayoutBuilder, MemoryManager, PageState,
};
use gmem::soft::SoftHypervisor;
use gmem::uapi::*;
use gmem::{vm_memory, Backend, GuestLoop, GuestOp, Hypervisor, Release, Vcpu, VcpuExit};

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;
const SEED: u64 = 0x6d65_6d00_0000_0000;

/// The manager for `layout`, or `None` (a recorded skip) when the host
/// cannot offer the backing it asks for.
#[track_caller]
fn manager(hv: &dyn Hypervisor, layout: LayoutBuilder) -> Option<MemoryManager> {
    match MemoryManager::new(hv, layout.build().expect("the layout is valid")) {
        Ok(mm) => Some(mm),
        Err(Error::Unsupported { why, .. }) => {
            // The last mode tried says what this host lacks.
            let lacks = why.rsplit("; ").next().unwrap_or(&why).to_string();
            skips::skip(format_args!("{} backend: {lacks}", hv.name()));
            None
        }
        Err(e) => panic!("building the memory manager: {e}"),
    }
}

/// A manager with private memory (split or in-place backing), or `None`
/// (a recorded skip).
fn private_manager(hv: &dyn Hypervisor, bytes: u64) -> Option<MemoryManager> {
    let mm = manager(
        hv,
        Layout::builder()
            .memory(bytes)
            .backing(BackingRequest::Private),
    )?;
    assert!(mm.backing().mode.has_private_memory());
    Some(mm)
}

fn in_place(mm: &MemoryManager) -> bool {
    mm.backing().mode == BackingMode::InPlace
}

/// (bytes in guest_memfd, bytes in separate host memory).
fn where_held(h: &Held) -> (u64, u64) {
    (h.file_bytes(), h.host_bytes())
}

fn range(start: u64, len: u64) -> GuestRange {
    GuestRange::new(GuestAddress(start), len)
}

fn held(mm: &MemoryManager, r: GuestRange) -> Held {
    mm.held_in(r).expect("measuring")
}

/// The guest writes `pattern(gpa, SEED)` into every word of `r`: one loop
/// on the software backend, a few runs per word on the KVM backend (keep
/// it to a few pages there).
fn guest_fill(mm: &MemoryManager, vcpu: &mut dyn Vcpu, r: GuestRange) {
    let op = GuestLoop::Fill {
        gpa: r.start.0,
        len: r.len,
        seed: SEED,
    };
    mm.run_loop(vcpu, op).expect("guest fill");
}

/// The guest writes the first word of every page of `r`, which allocates
/// the page wherever it lives (one or two runs per page).
fn guest_touch(mm: &MemoryManager, vcpu: &mut dyn Vcpu, r: GuestRange) {
    let op = GuestLoop::Touch {
        gpa: r.start.0,
        len: r.len,
        write: true,
    };
    mm.run_loop(vcpu, op).expect("guest touch");
}

fn guest_read(vcpu: &mut dyn Vcpu, gpa: u64) -> u64 {
    match vcpu
        .run(GuestOp::Read { gpa, size: 8 })
        .expect("guest read")
    {
        VcpuExit::Done(v) => v,
        exit => panic!("guest read at {gpa:#x} exited: {exit:?}"),
    }
}

fn host_word(mm: &MemoryManager, gpa: u64) -> u64 {
    mm.load::<u64>(GuestAddress(gpa), Ordering::Relaxed)
        .expect("host load")
}

/// Runs `test` on `backend` (the software backend as `profile`), or says
/// why it cannot run there.
fn run(backend: Backend, profile: Option<Release>, test: fn(&dyn Hypervisor)) {
    if backend == Backend::Kvm && skips::no_kvm() {
        return;
    }
    let hv: Box<dyn Hypervisor> = match profile {
        Some(r) => Box::new(SoftHypervisor::with_profile(r).expect("soft backend")),
        None => backend
            .open()
            .unwrap_or_else(|e| panic!("opening the {} backend: {e}", backend.name())),
    };
    test(&*hv);
}

/// `each_backend! { test, ... }`: `soft::test` (6.18), `soft_next::test`
/// (in-place conversion) and `kvm::test` for each.
macro_rules! each_backend {
    ($($test:ident),* $(,)?) => {
        mod soft {
            $(#[test]
            fn $test() {
                crate::run(gmem::Backend::Soft, None, crate::$test);
            })*
        }
        mod soft_next {
            $(#[test]
            fn $test() {
                crate::run(gmem::Backend::Soft, Some(gmem::Release::Next), crate::$test);
            })*
        }
        mod kvm {
            $(#[test]
            fn $test() {
                crate::run(gmem::Backend::Kvm, None, crate::$test);
            })*
        }
    };
}

each_backend! {
    default_backing_is_guest_memfd_and_says_why,
    private_request_gets_private_memory_or_names_what_is_missing,
    two_ranges_bind_one_file_at_consecutive_offsets,
    file_per_range_starts_each_file_at_offset_0,
    default_layout_leaves_the_32_bit_hole_unbound,
    guest_and_host_see_the_same_bytes,
    access_spanning_two_ranges_is_split_between_them,
    hole_access_is_unbacked,
    atomics_must_be_naturally_aligned,
    flags_beyond_the_vms_cap_are_create_1,
    discard_returns_guest_memfd_memory,
    held_prints_for_people,
    discard_returns_anonymous_memory,
    madvise_dontneed_on_a_shared_mapping_frees_nothing,
    conversion_to_private_leaves_one_copy,
    conversion_to_shared_leaves_one_copy,
    pinned_page_refuses_going_private_and_names_it,
    round_trip_never_holds_a_range_twice,
    discard_returns_both_sides_of_split_memory,
    conversions_are_kept_by_range,
    conversion_without_private_memory_is_refused,
    map_gpa_range_exit_is_converted_and_the_guest_resumes,
    memory_fault_exit_is_converted_once,
    private_range_refuses_device_access_with_a_typed_error,
    vm_memory_device_code_works_unchanged,
    vm_memory_refuses_private_ranges_inside_its_own_error,
}

// ---------------------------------------------------------------- backing

/// gmem-backing: a VM without private memory gets the guest_memfd backing
/// where the host maps guest_memfd, and the reason quotes the capability.
fn default_backing_is_guest_memfd_and_says_why(hv: &dyn Hypervisor) {
    let Some(mm) = manager(hv, Layout::builder().memory(MIB)) else {
        return;
    };

    let b = mm.backing();

    assert_eq!(b.mode, BackingMode::GuestMemfd);
    assert_eq!(b.vm_type, KVM_X86_DEFAULT_VM as u64);
    assert!(
        b.reason.contains("KVM_CAP_GUEST_MEMFD_FLAGS 0x3"),
        "{}",
        b.reason
    );
    assert_eq!(mm.file(0).unwrap().access(), FileAccess::Shared);
}

/// gmem-backing: private memory is the split backing where a VM type has
/// it; elsewhere the refusal names the capability that lacks it.
fn private_request_gets_private_memory_or_names_what_is_missing(hv: &dyn Hypervisor) {
    let types = hv.check_extension(KVM_CAP_VM_TYPES) as u64;
    let layout = Layout::builder()
        .memory(MIB)
        .backing(BackingRequest::Private)
        .build()
        .unwrap();

    let got = MemoryManager::new(hv, layout);

    if types & (1 << KVM_X86_SW_PROTECTED_VM) != 0 {
        let mm = got.expect("private memory");
        assert_eq!(mm.vm().vm_type(), KVM_X86_SW_PROTECTED_VM as u64);
        let in_place = hv.check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) != 0
            || mm
                .vm()
                .check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)
                != 0;
        let (mode, access) = if in_place {
            (BackingMode::InPlace, FileAccess::Shared)
        } else {
            (BackingMode::Split, FileAccess::GuestOnly)
        };
        assert_eq!(mm.backing().mode, mode, "{}", mm.backing().reason);
        assert_eq!(mm.file(0).unwrap().access(), access);
    } else {
        let err = got.expect_err("no private memory here");
        assert_eq!(err.rule(), "gmem-backing");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("KVM_CAP_VM_TYPES {types:#x}")),
            "{msg}"
        );
        assert!(msg.contains("in-place") && msg.contains("split"), "{msg}");
    }
}

// ----------------------------------------------------------------- layout

/// gmem-layout, SLOT-7, BIND-4: two ranges of one file are bound at
/// consecutive offsets: what the guest writes at the second range lands at
/// the file offset right after the first range.
fn two_ranges_bind_one_file_at_consecutive_offsets(hv: &dyn Hypervisor) {
    let high = 1 << 32;
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .ram(GuestAddress(0), MIB)
            .ram(GuestAddress(high), MIB),
    ) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();

    guest_touch(&mm, &mut *cpu, range(high + 2 * P, P));

    let file = mm.file(0).unwrap();
    assert_eq!(file.size(), 2 * MIB);
    assert_eq!(file.held_in(GmemOffset(MIB + 2 * P), P).unwrap(), P);
    assert_eq!(file.held().unwrap(), P);
    assert_eq!(held(&mm, range(high, MIB)).files, vec![P]);
    let slots = mm.layout().slots();
    assert_eq!((slots[1].range.start.0, slots[1].offset.0), (high, MIB));
}

/// gmem-layout: with one file per range every range starts at offset 0 of
/// its own file, and each file holds only its range's memory.
fn file_per_range_starts_each_file_at_offset_0(hv: &dyn Hypervisor) {
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .ram(GuestAddress(0), MIB)
            .ram(GuestAddress(16 * MIB), MIB)
            .file_per_range(true),
    ) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();

    guest_touch(&mm, &mut *cpu, range(16 * MIB, 2 * P));

    assert_eq!(mm.layout().ranges()[1].offset, GmemOffset(0));
    assert_eq!(mm.file(0).unwrap().held().unwrap(), 0);
    assert_eq!(
        mm.file(1).unwrap().held_in(GmemOffset(0), 2 * P).unwrap(),
        2 * P
    );
    assert_eq!(mm.held().unwrap().files, vec![0, 2 * P]);
}

/// gmem-layout, KVM-SETUP: the default layout of more than 3 GiB puts RAM
/// below 0xC000_0000 and from 4 GiB, so the KVM backend's setup region in
/// the hole stays free; a guest access in the hole exits as MMIO.
fn default_layout_leaves_the_32_bit_hole_unbound(hv: &dyn Hypervisor) {
    let Some(mm) = manager(hv, Layout::builder().memory((3 << 30) + MIB)) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();

    let exit = cpu
        .run(GuestOp::Read {
            gpa: 0xD000_0000,
            size: 8,
        })
        .unwrap();

    assert!(
        matches!(
            exit,
            VcpuExit::Mmio {
                gpa: 0xD000_0000,
                ..
            }
        ),
        "{exit:?}"
    );
    guest_touch(&mm, &mut *cpu, range(1 << 32, P));
    assert_eq!(
        mm.file(0).unwrap().held_in(GmemOffset(3 << 30), P).unwrap(),
        P
    );
}

// --------------------------------------------------------- device access

/// gmem-loop, FAULT-3: a guest loop's pattern is what the host reads
/// through the manager, and what the host writes the guest reads.
fn guest_and_host_see_the_same_bytes(hv: &dyn Hypervisor) {
    let Some(mm) = manager(hv, Layout::builder().memory(MIB)) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();

    guest_fill(&mm, &mut *cpu, range(0x3000, P));
    mm.write(GuestAddress(0x5008), &0x1234_5678u64.to_le_bytes())
        .unwrap();

    for gpa in [0x3000, 0x3008, 0x3ff8] {
        assert_eq!(
            host_word(&mm, gpa),
            GuestLoop::pattern(gpa, SEED),
            "{gpa:#x}"
        );
    }
    assert_eq!(guest_read(&mut *cpu, 0x5008), 0x1234_5678);
}

/// gmem-unbacked: a host access that runs from one RAM range into the next
/// is split between them; a slice must stay in one (gmem-range).
fn access_spanning_two_ranges_is_split_between_them(hv: &dyn Hypervisor) {
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .ram(GuestAddress(0), MIB)
            .ram(GuestAddress(MIB), MIB)
            .file_per_range(true),
    ) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let data: Vec<u8> = (0..32).collect();

    mm.write(GuestAddress(MIB - 16), &data).unwrap();

    let mut back = [0u8; 32];
    mm.read(GuestAddress(MIB - 16), &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);
    assert_eq!(
        guest_read(&mut *cpu, MIB),
        u64::from_le_bytes(data[16..24].try_into().unwrap())
    );
    let err = mm.slice(range(MIB - 16, 32)).unwrap_err();
    assert_eq!(err.rule(), "gmem-range", "{err}");
}

/// gmem-unbacked: an access that reaches a hole names its part that is
/// not RAM.
fn hole_access_is_unbacked(hv: &dyn Hypervisor) {
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .ram(GuestAddress(0), MIB)
            .ram(GuestAddress(4 * MIB), MIB),
    ) else {
        return;
    };

    let err = mm.write(GuestAddress(MIB - 8), &[0; 16]).unwrap_err();

    match err {
        Error::Unbacked { range: r } => assert_eq!(r, range(MIB, 8)),
        e => panic!("expected an unbacked range: {e}"),
    }
    let err = mm.discard(range(2 * MIB, P)).unwrap_err();
    assert_eq!(
        (err.rule(), err.errno()),
        ("gmem-unbacked", gmem::Errno::EFAULT)
    );
}

/// gmem-range: atomics are naturally aligned, as on hardware.
fn atomics_must_be_naturally_aligned(hv: &dyn Hypervisor) {
    let Some(mm) = manager(hv, Layout::builder().memory(MIB)) else {
        return;
    };

    mm.store(GuestAddress(0x104), 0xdead_beef_u32, Ordering::Release)
        .unwrap();

    assert_eq!(
        mm.load::<u32>(GuestAddress(0x104), Ordering::Acquire)
            .unwrap(),
        0xdead_beef
    );
    let err = mm
        .store(GuestAddress(0x104), 1u64, Ordering::Relaxed)
        .unwrap_err();
    assert_eq!(err.rule(), "gmem-range", "{err}");
    assert!(err.to_string().contains("naturally aligned"), "{err}");
}

/// CREATE-1: a file is created only with flags the VM offers, and the
/// refusal quotes the VM's KVM_CAP_GUEST_MEMFD_FLAGS.
fn flags_beyond_the_vms_cap_are_create_1(hv: &dyn Hypervisor) {
    let shared = FileAccess::Shared.flags() as i64;
    let narrower = [KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM]
        .into_iter()
        .filter_map(|t| hv.create_vm(t as u64).ok())
        .find(|vm| vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) & shared != shared);
    let Some(vm) = narrower else {
        skips::skip("every VM type here offers MMAP | INIT_SHARED");
        return;
    };
    let offered = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS);

    let err = GmemFile::create(&*vm, MIB, FileAccess::Shared).unwrap_err();

    assert_eq!((err.rule(), err.errno()), ("CREATE-1", gmem::Errno::EINVAL));
    assert!(
        err.to_string().contains(&format!("offers {offered:#x}")),
        "{err}"
    );
}

// ------------------------------------------------------ discard, measured

/// FALLOC-4: discarding part of guest_memfd RAM returns exactly that part
/// to the host (cachestat drops), reads zero afterwards and leaves the rest.
fn discard_returns_guest_memfd_memory(hv: &dyn Hypervisor) {
    let Some(mm) = manager(hv, Layout::builder().memory(MIB)) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let all = range(0, MIB);
    guest_touch(&mm, &mut *cpu, all);
    mm.write(GuestAddress(0), &[7; 16]).unwrap();
    mm.write(GuestAddress(MIB / 2), &[9; 16]).unwrap();
    let before = held(&mm, all);

    mm.discard(range(0, MIB / 2)).unwrap();

    let after = held(&mm, all);
    assert_eq!((before.files, before.host), (vec![MIB], vec![0]));
    assert_eq!(after.files, vec![MIB / 2]);
    assert_eq!(host_word(&mm, 0), 0);
    assert_eq!(guest_read(&mut *cpu, MIB / 2) & 0xff, 9);
}

/// gmem-account: what is held prints for people, from the kernel's count:
/// the total, where it is, and each file's share when there are several.
fn held_prints_for_people(hv: &dyn Hypervisor) {
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .ram(GuestAddress(0), MIB)
            .ram(GuestAddress(1 << 32), MIB)
            .file_per_range(true),
    ) else {
        return;
    };
    mm.write(GuestAddress(0), &[1; 8192]).unwrap();
    mm.write(GuestAddress(1 << 32), &[1]).unwrap();

    let text = mm.held().unwrap().to_string();

    assert_eq!(text, "12 KiB in guest_memfd; file 0: 8 KiB, file 1: 4 KiB");
}

/// Anonymous backing: discarding drops the pages (mincore), they read zero.
fn discard_returns_anonymous_memory(hv: &dyn Hypervisor) {
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .memory(MIB)
            .backing(BackingRequest::Mode(BackingMode::Anonymous)),
    ) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let all = range(0, MIB);
    guest_touch(&mm, &mut *cpu, range(0, 64 * P));
    mm.write(GuestAddress(8), &[5]).unwrap();
    let before = held(&mm, all);

    mm.discard(all).unwrap();

    assert_eq!((before.files, before.host), (vec![], vec![64 * P]));
    assert_eq!(held(&mm, all).total(), 0);
    assert_eq!(guest_read(&mut *cpu, 8), 0);
}

/// st_blocks * 512 of an open file.
fn st_bytes(fd: i32) -> u64 {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into the buffer.
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
    st.st_blocks as u64 * 512
}

fn madvise(addr: u64, len: u64, advice: i32) {
    // SAFETY: [addr, addr + len) is a live mapping the test owns and no
    // Rust reference points into; dropping its contents is the point.
    assert_eq!(
        unsafe { libc::madvise(addr as *mut _, len as usize, advice) },
        0
    );
}

/// firecracker#6167: MADV_DONTNEED on a shared mapping only drops this
/// process's page table entries: the pages stay in the file, as the kernel
/// counts them (a memfd's st_blocks, a guest_memfd's cachestat). What frees
/// them is MADV_REMOVE or a punch, which is what the manager uses.
fn madvise_dontneed_on_a_shared_mapping_frees_nothing(hv: &dyn Hypervisor) {
    // A shared memfd, as a VMM uses for vhost-user.
    // SAFETY: memfd_create reads the NUL-terminated name; the fd is closed below.
    let memfd = unsafe { libc::memfd_create(c"gmem-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(memfd >= 0);
    // SAFETY: sizing and mapping our own memfd; unmapped below.
    let addr = unsafe {
        assert_eq!(libc::ftruncate(memfd, MIB as i64), 0);
        libc::mmap(
            std::ptr::null_mut(),
            MIB as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    // SAFETY: the mapping is MIB bytes long and ours.
    unsafe { std::ptr::write_bytes(addr.cast::<u8>(), 1, MIB as usize) };
    let written = st_bytes(memfd);
    madvise(addr as u64, MIB, libc::MADV_DONTNEED);
    let after_dontneed = st_bytes(memfd);
    madvise(addr as u64, MIB, libc::MADV_REMOVE);
    let after_remove = st_bytes(memfd);
    // SAFETY: unmapping and closing what this test made.
    unsafe {
        libc::munmap(addr, MIB as usize);
        libc::close(memfd);
    }

    // A guest_memfd mapping, the memory of the guest_memfd backing.
    let vm = hv.create_vm(0).unwrap();
    let file = GmemFile::create(&*vm, MIB, FileAccess::Shared).unwrap();
    let map = file.map().unwrap();
    map.write(0, &vec![1; MIB as usize]).unwrap();
    let gmem_written = file.held().unwrap();
    madvise(map.addr(), MIB, libc::MADV_DONTNEED);
    let gmem_after_dontneed = file.held().unwrap();
    file.punch_hole(GmemOffset(0), MIB).unwrap();
    let gmem_after_punch = file.held().unwrap();

    report(format_args!(
        "memfd {MIB} B written: held {written} after writing, {after_dontneed} after \
         MADV_DONTNEED, {after_remove} after MADV_REMOVE; guest_memfd: {gmem_written}, \
         {gmem_after_dontneed} after MADV_DONTNEED, {gmem_after_punch} after punch"
    ));
    assert_eq!((written, after_dontneed, after_remove), (MIB, MIB, 0));
    assert_eq!(
        (gmem_written, gmem_after_dontneed, gmem_after_punch),
        (MIB, MIB, 0)
    );
}

/// Prints a measurement line, naming the test (shown with --nocapture).
fn report(what: impl std::fmt::Display) {
    println!("measured: {what}");
}

// ------------------------------------------------------------ conversions

/// ATTR-4, CONV-7: converting a populated shared range to private leaves
/// one copy. Split: the shared copy is freed (mincore of the host memory
/// drops to 0) and what the guest then writes lands in guest_memfd. In
/// place: the file keeps the same pages, and their contents.
fn conversion_to_private_leaves_one_copy(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, 4 * MIB) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let r = range(MIB, MIB);
    guest_fill(&mm, &mut *cpu, r);
    let shared = held(&mm, r);

    mm.convert(r, PageState::Private).unwrap();
    let converted = held(&mm, r);
    let first_word = guest_read(&mut *cpu, MIB + 8);
    guest_touch(&mm, &mut *cpu, r);
    let private = held(&mm, r);

    report(format_args!(
        "{} to private, 1 MiB: shared {shared:?}, just converted {converted:?}, guest wrote \
         {private:?}",
        mm.backing().mode
    ));
    if in_place(&mm) {
        assert_eq!(where_held(&shared), (MIB, 0));
        assert_eq!(where_held(&converted), (MIB, 0));
        assert_eq!(
            first_word,
            GuestLoop::pattern(MIB + 8, SEED),
            "CONV-7: contents stay"
        );
    } else {
        assert_eq!(where_held(&shared), (0, MIB));
        assert_eq!(converted.total(), 0);
        assert_eq!(first_word, 0, "private memory starts zeroed");
    }
    assert_eq!(where_held(&private), (MIB, 0));
}

/// ATTR-4, CONV-7: converting a populated private range back to shared
/// leaves one copy. Split: its guest_memfd pages are punched. In place:
/// the same pages become shared and the host reads what the guest wrote.
fn conversion_to_shared_leaves_one_copy(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, 4 * MIB) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let r = range(2 * MIB, MIB);
    mm.convert(r, PageState::Private).unwrap();
    guest_fill(&mm, &mut *cpu, r);
    let private = held(&mm, r);

    mm.convert(r, PageState::Shared).unwrap();
    let converted = held(&mm, r);
    let host_sees = host_word(&mm, 2 * MIB + 16);
    guest_touch(&mm, &mut *cpu, r);
    let shared = held(&mm, r);

    report(format_args!(
        "{} to shared, 1 MiB: private {private:?}, just converted {converted:?}, guest wrote \
         {shared:?}",
        mm.backing().mode
    ));
    assert_eq!(where_held(&private), (MIB, 0));
    if in_place(&mm) {
        assert_eq!(where_held(&converted), (MIB, 0));
        assert_eq!(where_held(&shared), (MIB, 0));
        assert_eq!(host_sees, GuestLoop::pattern(2 * MIB + 16, SEED));
    } else {
        assert_eq!(converted.total(), 0);
        assert_eq!(where_held(&shared), (0, MIB));
        assert_eq!(host_sees, 0);
    }
}

/// ATTR-4: through shared -> private -> shared -> private with the guest
/// writing every page each time, the range is held once, never twice.
fn round_trip_never_holds_a_range_twice(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, 8 * MIB) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let r = range(0, 8 * MIB);
    let mut seen = Vec::new();
    guest_touch(&mm, &mut *cpu, r);
    seen.push(held(&mm, r).total());
    for to in [PageState::Private, PageState::Shared, PageState::Private] {
        mm.convert(r, to).unwrap();
        seen.push(held(&mm, r).total());
        guest_touch(&mm, &mut *cpu, r);
        seen.push(held(&mm, r).total());
    }

    report(format_args!(
        "{} round trip of 8 MiB, bytes held at each step: {seen:?}",
        mm.backing().mode
    ));
    let m = 8 * MIB;
    if in_place(&mm) {
        assert_eq!(seen, vec![m; 7]);
    } else {
        assert_eq!(seen, vec![m, 0, m, 0, m, 0, m]);
    }
    assert_eq!(where_held(&mm.held().unwrap()), (m, 0));
}

/// CONV-5: a page still referenced (a pin, as a device doing DMA holds)
/// refuses going private in place with EAGAIN, the error names its file
/// offset, and the manager's state does not change.
fn pinned_page_refuses_going_private_and_names_it(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, MIB) else {
        return;
    };
    if !in_place(&mm) {
        skips::skip("pins matter to in-place conversion only; this backing has two copies");
        return;
    }
    let map = mm.file(0).unwrap().map().unwrap();
    map.write(0x6000, &[1]).unwrap();
    let pin = map.pin(0x6000, P).expect("pinning a shared page");

    let err = mm
        .convert(range(0x4000, 4 * P), PageState::Private)
        .unwrap_err();

    assert_eq!(err.errno(), gmem::Errno::EAGAIN, "{err}");
    assert!(err.to_string().contains("offset 0x6000"), "{err}");
    assert_eq!(mm.state(GuestAddress(0x4000)), Some(PageState::Shared));
    drop(pin);
    mm.convert(range(0x4000, 4 * P), PageState::Private)
        .unwrap();
}

/// FALLOC-4: discarding memory of a VM with private memory returns the
/// private pages (in the file) and the shared ones (in host memory, or in
/// the file in place).
fn discard_returns_both_sides_of_split_memory(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, 4 * MIB) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let all = range(0, 4 * MIB);
    mm.convert(range(0, 2 * MIB), PageState::Private).unwrap();
    guest_touch(&mm, &mut *cpu, all);
    let before = held(&mm, all);

    mm.discard(all).unwrap();

    let after = held(&mm, all);
    report(format_args!(
        "discard of {} 4 MiB: before {before:?}, after {after:?}",
        mm.backing().mode
    ));
    if in_place(&mm) {
        assert_eq!(where_held(&before), (4 * MIB, 0));
    } else {
        assert_eq!(where_held(&before), (2 * MIB, 2 * MIB));
    }
    assert_eq!(after.total(), 0);
    assert_eq!(
        mm.state(GuestAddress(0)),
        Some(PageState::Private),
        "discard keeps state"
    );
}

/// ATTR-6: state is kept by range: converting 16 GiB and then a hole in
/// it leaves two private ranges, not millions of pages.
fn conversions_are_kept_by_range(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, 20 << 30) else {
        return;
    };

    mm.convert(range(1 << 32, 16 << 30), PageState::Private)
        .unwrap();
    mm.convert(range(8 << 30, MIB), PageState::Shared).unwrap();

    let private: Vec<GuestRange> = mm
        .states()
        .into_iter()
        .filter(|(_, s)| *s == PageState::Private)
        .map(|(r, _)| r)
        .collect();
    assert_eq!(
        private,
        vec![
            GuestRange::from_bounds(1 << 32, 8 << 30),
            GuestRange::from_bounds((8 << 30) + MIB, 20 << 30),
        ]
    );
    assert_eq!(mm.states().len(), 5, "{:?}", mm.states());
}

/// gmem-backing: a backing without private memory refuses conversions and
/// says which backing and why.
fn conversion_without_private_memory_is_refused(hv: &dyn Hypervisor) {
    let Some(mm) = manager(hv, Layout::builder().memory(MIB)) else {
        return;
    };

    let err = mm.convert(range(0, P), PageState::Private).unwrap_err();

    assert_eq!(
        (err.rule(), err.errno()),
        ("gmem-backing", gmem::Errno::EOPNOTSUPP)
    );
    assert!(
        err.to_string()
            .contains("guest_memfd backing has no private memory"),
        "{err}"
    );
    let err = mm.convert(range(0x800, P), PageState::Private).unwrap_err();
    assert_eq!(err.rule(), "gmem-range");
}

/// FAULT-8: the guest's KVM_HC_MAP_GPA_RANGE exits; the manager converts
/// the range and frees the stale copy, and the resumed guest's writes land
/// in guest_memfd.
fn map_gpa_range_exit_is_converted_and_the_guest_resumes(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, 4 * MIB) else {
        return;
    };
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    let r = range(MIB, 16 * P);
    guest_touch(&mm, &mut *cpu, r);

    let exit = cpu
        .run(GuestOp::MapGpaRange {
            gpa: r.start.0,
            npages: 16,
            attributes: KVM_MAP_GPA_RANGE_ENCRYPTED,
        })
        .unwrap();
    let done = mm.handle_exit(&exit).unwrap();
    guest_touch(&mm, &mut *cpu, r);

    assert!(matches!(exit, VcpuExit::Hypercall { .. }), "{exit:?}");
    assert_eq!(done.map(|c| (c.range, c.to)), Some((r, PageState::Private)));
    let h = held(&mm, r);
    assert_eq!((h.file_bytes(), h.host_bytes()), (16 * P, 0));
    assert_eq!(mm.handle_exit(&VcpuExit::Done(0)).unwrap(), None);
}

/// FAULT-7: a memory fault exit asking for the other state converts that
/// page; one asking for the state the page already has is not a
/// conversion request and is refused (gmem-exit) instead of looping.
fn memory_fault_exit_is_converted_once(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, MIB) else {
        return;
    };
    let fault = VcpuExit::MemoryFault {
        flags: KVM_MEMORY_EXIT_FLAG_PRIVATE as u64,
        gpa: 0x7000,
        size: P,
    };

    let done = mm.handle_exit(&fault).unwrap();

    assert_eq!(done.map(|c| c.to), Some(PageState::Private));
    assert_eq!(mm.state(GuestAddress(0x7000)), Some(PageState::Private));
    assert_eq!(mm.state(GuestAddress(0x8000)), Some(PageState::Shared));
    let err = mm.handle_exit(&fault).unwrap_err();
    assert_eq!(err.rule(), "gmem-exit", "{err}");
}

/// gmem-private: the host's reads, writes, atomics and slices of a range
/// that is private are refused with the private part named.
fn private_range_refuses_device_access_with_a_typed_error(hv: &dyn Hypervisor) {
    let Some(mm) = private_manager(hv, MIB) else {
        return;
    };
    mm.convert(range(0x4000, 2 * P), PageState::Private)
        .unwrap();

    let read = mm.read(GuestAddress(0x3ff0), &mut [0; 32]).unwrap_err();
    let write = mm.write(GuestAddress(0x5000), &[1]).unwrap_err();
    let load = mm
        .load::<u64>(GuestAddress(0x4008), Ordering::Relaxed)
        .unwrap_err();
    let slice = mm.slice(range(0x3000, 3 * P)).unwrap_err();

    match read {
        Error::Private { range: r } => assert_eq!(r, range(0x4000, 0x10)),
        e => panic!("expected private: {e}"),
    }
    for e in [write, load, slice] {
        assert_eq!(
            (e.rule(), e.errno()),
            ("gmem-private", gmem::Errno::EACCES),
            "{e}"
        );
    }
    mm.write(GuestAddress(0x3ff8), &[1; 8]).unwrap();
}

// -------------------------------------------------------------- vm-memory

/// Device code as written for vm-memory: generic over `GuestMemory`, only
/// vm-memory's API.
mod device {
    use gmem::vm_memory::{
        Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    };

    /// A descriptor a virtio-style device reads.
    #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
    #[repr(C)]
    pub struct Desc {
        pub addr: u64,
        pub len: u32,
        pub flags: u16,
        pub next: u16,
    }
    // SAFETY: plain integers, no padding (8 + 4 + 2 + 2 bytes).
    unsafe impl vm_memory::ByteValued for Desc {}

    /// Reads the descriptor at `table`, copies its buffer to `dst` and sets
    /// a used flag with an atomic store.
    pub fn serve<M: GuestMemory + GuestMemoryBackend>(
        mem: &M,
        table: GuestAddress,
        dst: GuestAddress,
    ) -> vm_memory::GuestMemoryResult<Vec<u8>> {
        let desc: Desc = mem.read_obj(table)?;
        let mut buf = vec![0u8; desc.len as usize];
        mem.read_slice(&mut buf, GuestAddress(desc.addr))?;
        mem.write_slice(&buf, dst)?;
        mem.store(
            1u16,
            table.unchecked_add(14),
            std::sync::atomic::Ordering::Release,
        )?;
        let region = mem.find_region(dst).expect("dst is RAM");
        assert!(region.len() >= buf.len() as u64);
        Ok(buf)
    }
}

/// vm-memory#315: a device written against vm-memory reads and writes
/// guest_memfd RAM through `GuestRegionCollection<GmemRegion>`, and sees
/// what the guest wrote.
fn vm_memory_device_code_works_unchanged(hv: &dyn Hypervisor) {
    use gmem::vm_memory::{Bytes, GuestMemoryBackend};
    let Some(mm) = manager(
        hv,
        Layout::builder()
            .ram(GuestAddress(0), MIB)
            .ram(GuestAddress(1 << 32), MIB),
    ) else {
        return;
    };
    let mem = mm.guest_memory();
    let mut cpu = mm.vm().create_vcpu(0).unwrap();
    guest_fill(&mm, &mut *cpu, range(0x2000, 64));
    let desc = device::Desc {
        addr: 0x2000,
        len: 64,
        flags: 0,
        next: 0,
    };
    mem.write_obj(desc, vm_memory::GuestAddress(0x1000))
        .unwrap();

    let got = device::serve(
        mem,
        vm_memory::GuestAddress(0x1000),
        vm_memory::GuestAddress((1 << 32) + 0x100),
    )
    .unwrap();

    assert_eq!(mem.num_regions(), 2);
    assert_eq!(
        u64::from_le_bytes(got[8..16].try_into().unwrap()),
        GuestLoop::pattern(0x2008, SEED)
    );
    assert_eq!(
        guest_read(&mut *cpu, (1 << 32) + 0x108),
        GuestLoop::pattern(0x2008, SEED)
    );
    assert_eq!(
        mem.read_obj::<u16>(vm_memory::GuestAddress(0x100e))
            .unwrap(),
        1
    );
    assert_eq!(mm.file(0).unwrap().held_in(GmemOffset(MIB), P).unwrap(), P);
}

/// gmem-private: vm-memory's API refuses a private range; the error it
/// carries is the manager's typed error.
fn vm_memory_refuses_private_ranges_inside_its_own_error(hv: &dyn Hypervisor) {
    use gmem::vm_memory::{Bytes, GuestMemory, GuestMemoryError};
    let Some(mm) = private_manager(hv, MIB) else {
        return;
    };
    mm.convert(range(0x8000, P), PageState::Private).unwrap();
    let mem = mm.guest_memory();

    let err = mem
        .read_obj::<u64>(vm_memory::GuestAddress(0x8010))
        .unwrap_err();
    let ok = mem.write_obj(3u64, vm_memory::GuestAddress(0x7ff8));
    let hole = mem.read_obj::<u8>(vm_memory::GuestAddress(MIB));

    let GuestMemoryError::IOError(io) = err else {
        panic!("expected the typed error inside IOError: {err:?}");
    };
    let inner = io.get_ref().and_then(|e| e.downcast_ref::<Error>());
    assert!(matches!(inner, Some(Error::Private { .. })), "{io}");
    assert!(ok.is_ok());
    assert!(matches!(
        hole,
        Err(GuestMemoryError::InvalidGuestAddress(_))
    ));
    assert!(!mem.check_range(
        vm_memory::GuestAddress(MIB - 8),
        16,
        vm_memory::Permissions::Read
    ));
}
