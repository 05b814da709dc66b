//! Attribute conversion cost against range size, from 4 KiB to 1 TiB.
//!
//! Ours: `KVM_SET_MEMORY_ATTRIBUTES` on the software backend, private then
//! shared again, over `[0, size)` of a 1 TiB guest_memfd slot with a vCPU
//! (so every conversion invalidates and waits out the vCPU, as in use).
//! The baseline models the kernel's per-page xarray with a per-page map
//! (`BTreeMap`, one insert or remove per page); it is measured on the sizes
//! up to 1 GiB (256 MiB is the last of the powers of 16) and extended
//! linearly beyond (drawn dashed).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use super::{bytes, compare, time, Pair, Point, Row, Scale, Series, Target, Unit};
use crate::error::Result;
use crate::hypervisor::{GuestMemfd, Vm};
use crate::soft::{SoftHypervisor, SoftVcpu, SoftVm};
use crate::uapi::{
    guest_memfd_region, kvm_create_guest_memfd, kvm_memory_attributes,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM, PAGE_SHIFT,
};

/// The largest range: 1 TiB.
pub const TOP: u64 = 1 << 40;

/// A software VM with a 1 TiB slot at gpa 0 and a vCPU.
pub struct Conversions {
    _vcpu: SoftVcpu,
    _file: Box<dyn GuestMemfd>,
    vm: SoftVm,
}

impl Conversions {
    /// Sets it up: no memory is committed.
    pub fn new() -> Result<Conversions> {
        let hv = SoftHypervisor::new()?;
        let vm = hv.create_soft_vm(KVM_X86_SW_PROTECTED_VM as u64)?;
        let file = vm.create_guest_memfd(kvm_create_guest_memfd {
            size: TOP,
            ..Default::default()
        })?;
        vm.set_user_memory_region2(guest_memfd_region(0, 0, TOP, file.as_raw_fd(), 0))?;
        let vcpu = vm.create_soft_vcpu(0)?;
        Ok(Conversions {
            _vcpu: vcpu,
            _file: file,
            vm,
        })
    }

    /// `iters` round trips (private, then shared) over `[0, size)`.
    pub fn convert(&self, size: u64, iters: u64) -> Duration {
        time(|| {
            for _ in 0..iters {
                for attributes in [KVM_MEMORY_ATTRIBUTE_PRIVATE as u64, 0] {
                    self.vm
                        .set_memory_attributes(kvm_memory_attributes {
                            address: 0,
                            size,
                            attributes,
                            flags: 0,
                        })
                        .expect("conversion inside the slot");
                }
            }
        })
    }
}

/// The per-page baseline: `iters` round trips over `size` bytes.
pub fn per_page(size: u64, iters: u64) -> Duration {
    let mut map = BTreeMap::new();
    time(|| {
        for _ in 0..iters {
            for gfn in 0..size >> PAGE_SHIFT {
                map.insert(gfn, KVM_MEMORY_ATTRIBUTE_PRIVATE as u64);
            }
            for gfn in 0..size >> PAGE_SHIFT {
                black_box(map.remove(&gfn));
            }
        }
    })
}

/// 1 TiB against 4 KiB, as a [`Pair`]: ours converts 1 TiB, the
/// "baseline" 4 KiB.
struct Flat<'a>(&'a Conversions);

impl Pair for Flat<'_> {
    fn ours(&mut self, iters: u64) -> Duration {
        self.0.convert(TOP, iters)
    }

    fn baseline(&mut self, iters: u64) -> Duration {
        self.0.convert(4096, iters)
    }
}

/// The sizes of the curve: 4 KiB times powers of 16, up to 1 TiB.
pub fn sizes() -> impl Iterator<Item = u64> {
    (0..=7).map(|k| 4096u64 << (4 * k))
}

/// The table rows and the curves.
pub fn run(scale: Scale) -> Result<(Vec<Row>, Vec<Series>)> {
    let c = Conversions::new()?;
    let iters = scale.iters(2000);
    let flat = compare(&mut Flat(&c), iters, scale.rounds());
    let mut ours = Series {
        name: "gmem (attributes by range)".into(),
        points: Vec::new(),
        modelled: Vec::new(),
    };
    let mut base = Series {
        name: "per-page map (the kernel's xarray)".into(),
        points: Vec::new(),
        modelled: Vec::new(),
    };
    let measured_up_to = match scale {
        Scale::Full => 1 << 30,
        Scale::Quick => 16 << 20,
    };
    let mut per_page_cost = 0.0;
    for size in sizes() {
        let mut v: Vec<f64> = (0..scale.rounds())
            .map(|_| c.convert(size, iters).as_secs_f64() / (2 * iters) as f64)
            .collect();
        ours.points.push(Point {
            x: size as f64,
            y: super::median(&mut v),
        });
        if size <= measured_up_to {
            let n = (iters / (size >> PAGE_SHIFT)).max(1);
            let mut v: Vec<f64> = (0..scale.rounds())
                .map(|_| per_page(size, n).as_secs_f64() / (2 * n) as f64)
                .collect();
            let y = super::median(&mut v);
            per_page_cost = y / (size >> PAGE_SHIFT) as f64;
            base.points.push(Point { x: size as f64, y });
        } else {
            if base.modelled.is_empty() {
                base.modelled
                    .push(*base.points.last().expect("4 KiB was measured"));
            }
            base.modelled.push(Point {
                x: size as f64,
                y: per_page_cost * (size >> PAGE_SHIFT) as f64,
            });
        }
    }
    let top = ours.points.last().expect("measured").y;
    let modelled_top = base.modelled.last().map_or(f64::NAN, |p| p.y);
    let mut per_page_row = Row::new(
        "soft.convert.per_page",
        &format!("conversion of {} against a per-page map", bytes(TOP)),
        top,
        Some((modelled_top, "per-page map")),
        Some(top / modelled_top),
        Unit::Seconds,
        Target::None,
    );
    let last_measured = base.points.last().map_or(0, |p| p.x as u64);
    per_page_row.note = Some(format!(
        "the per-page map was measured up to {} and extended linearly",
        bytes(last_measured)
    ));
    // Each iteration of `Flat` is a round trip: two conversions.
    Ok((
        vec![
            Row::new(
                "soft.convert.flat",
                &format!("conversion of {} vs 4 KiB (soft)", bytes(TOP)),
                flat.ours / 2.0,
                Some((flat.baseline / 2.0, "conversion of 4 KiB")),
                Some(flat.ratio),
                Unit::Seconds,
                Target::AtMost(1.5),
            ),
            per_page_row,
        ],
        vec![ours, base],
    ))
}
