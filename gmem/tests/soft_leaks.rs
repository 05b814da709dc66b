//! LIFE-8 on the software backend: thousands of create / bind / map / close
//! cycles, error paths included, leave no fd and no mapping behind.
//! (One test in its own binary: it counts the whole process's fds and
//! mappings.)

#[path = "common/leaks.rs"]
mod leaks;

use gmem::soft::SoftHypervisor;
use gmem::uapi::*;
use gmem::{GuestOp, Hypervisor, MapKind};

#[test]
fn create_bind_map_close_cycles_leak_no_fd_and_no_mapping() {
    let hv = SoftHypervisor::new().unwrap();
    // Warm up once so lazily created process state is not counted.
    drop(hv.create_vm(0).unwrap());
    let (fds, maps) = (leaks::open_fds(), leaks::mappings());
    for i in 0..2000u64 {
        let vm = hv.create_vm(i % 2).unwrap();
        let flags = if i % 2 == 0 {
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        } else {
            GUEST_MEMFD_FLAG_MMAP
        };
        let g = vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size: 16 << 10,
                flags,
                ..Default::default()
            })
            .unwrap();
        let mut region = kvm_userspace_memory_region2 {
            slot: 1,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0x10_0000,
            memory_size: 8 << 10,
            guest_memfd: g.as_raw_fd() as u32,
            ..Default::default()
        };
        // Error paths: a bad offset (BIND-4), a closed fd (BIND-1), a
        // private mapping (MMAP-2), a bad size (CREATE-2).
        region.guest_memfd_offset = 12 << 10;
        assert!(vm.set_user_memory_region2(region).is_err());
        region.guest_memfd = u32::MAX >> 1;
        assert!(vm.set_user_memory_region2(region).is_err());
        assert!(g.mmap(0, 4096, MapKind::Private).is_err());
        assert!(vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size: 1,
                ..Default::default()
            })
            .is_err());
        // Success paths, then the file goes first on odd rounds.
        region.guest_memfd = g.as_raw_fd() as u32;
        region.guest_memfd_offset = 0;
        vm.set_user_memory_region2(region).unwrap();
        let m = g.mmap(0, 16 << 10, MapKind::Shared).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.run(GuestOp::Write {
            gpa: 0x10_0000,
            size: 1,
            value: 1,
        })
        .unwrap();
        if i % 2 == 1 {
            drop(g);
            drop(m);
        }
    }
    assert_eq!(leaks::open_fds(), fds, "fds leaked");
    assert_eq!(leaks::mappings(), maps, "mappings leaked");
}
