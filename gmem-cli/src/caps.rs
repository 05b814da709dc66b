//! `gmem caps`: what a backend supports of guest_memfd (docs/spec.md, section 8),
//! per VM type, and what that means for a VMM.

use std::process::ExitCode;

use gmem::error::errno_name;
use gmem::scenario::{match_release, ReleaseMatch};
use gmem::uapi::{
    kvm_memory_attributes, vm_type_name, CAPS, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS, KVM_CAP_USER_MEMORY2, KVM_HC_MAP_GPA_RANGE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM,
};
use gmem::{Backend, Errno, Hypervisor};
use serde::Serialize;
use std::path::Path;

/// Per-VM capabilities `gmem caps` asks every VM type for.
const VM_CAPS: &[(&str, u32)] = &[
    ("guest_memfd", KVM_CAP_GUEST_MEMFD),
    ("guest_memfd_flags", KVM_CAP_GUEST_MEMFD_FLAGS),
    ("memory_attributes", KVM_CAP_MEMORY_ATTRIBUTES),
    ("multi_address_space", KVM_CAP_MULTI_ADDRESS_SPACE),
    ("nr_memslots", KVM_CAP_NR_MEMSLOTS),
    ("user_memory2", KVM_CAP_USER_MEMORY2),
];

#[derive(Debug, Serialize)]
struct VmTypeCaps {
    vm_type: u64,
    name: &'static str,
    /// `None` when KVM_CREATE_VM succeeded, else the errno.
    create_error: Option<String>,
    caps: Vec<(&'static str, i64)>,
}

#[derive(Debug, Serialize)]
struct Caps {
    backend: &'static str,
    system: Vec<(&'static str, i64)>,
    vm_types: Vec<VmTypeCaps>,
    /// `present`, `absent`, or why it could not be probed.
    set_memory_attributes: String,
    meaning: Vec<(String, String)>,
    /// Which release's guest_memfd behaviour the backend follows, measured
    /// by the corpus lines whose outcome differs between releases.
    release: Option<ReleaseMatch>,
}

fn cap(caps: &[(&'static str, i64)], name: &str) -> i64 {
    caps.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
}

fn gather(hv: &dyn Hypervisor, corpus: &Path) -> Caps {
    let system: Vec<(&'static str, i64)> = CAPS
        .iter()
        .map(|(n, c)| (*n, hv.check_extension(*c)))
        .collect();
    let vm_types: Vec<VmTypeCaps> = (0..=5u64)
        .map(|t| match hv.create_vm(t) {
            Ok(vm) => VmTypeCaps {
                vm_type: t,
                name: vm_type_name(t),
                create_error: None,
                caps: VM_CAPS
                    .iter()
                    .map(|(n, c)| (*n, vm.check_extension(*c)))
                    .collect(),
            },
            Err(e) => VmTypeCaps {
                vm_type: t,
                name: vm_type_name(t),
                create_error: Some(errno_name(e.errno)),
                caps: vec![],
            },
        })
        .collect();
    // Size 0 is refused by a kernel that has the ioctl (EINVAL) and never
    // reaches a kernel that does not (ENOTTY): a probe with no effect.
    let set_memory_attributes = match hv.create_vm(0) {
        Ok(vm) => match vm.set_memory_attributes(kvm_memory_attributes::default()) {
            Err(e) if e.errno == Errno::ENOTTY => "absent".to_string(),
            Err(e) if e.errno == Errno::EINVAL => "present".to_string(),
            Ok(()) => "present (size 0 accepted)".to_string(),
            Err(e) => format!("unknown ({})", errno_name(e.errno)),
        },
        Err(e) => format!("unknown (no default VM: {})", errno_name(e.errno)),
    };
    let meaning = meaning(&system, &vm_types, &set_memory_attributes);
    Caps {
        backend: hv.name(),
        system,
        vm_types,
        set_memory_attributes,
        meaning,
        release: match_release(hv, corpus).ok(),
    }
}

fn meaning(
    system: &[(&'static str, i64)],
    vm_types: &[VmTypeCaps],
    sma: &str,
) -> Vec<(String, String)> {
    let mut m = Vec::new();
    let yes_no = |b: bool, yes: String, no: String| {
        if b {
            format!("available: {yes}")
        } else {
            format!("not available on this host: {no}")
        }
    };
    let gm = cap(system, "guest_memfd");
    m.push((
        "guest_memfd".to_string(),
        yes_no(
            gm != 0,
            "KVM_CREATE_GUEST_MEMFD works".into(),
            "KVM_CAP_GUEST_MEMFD is 0".into(),
        ),
    ));
    let flags = cap(system, "guest_memfd_flags") as u64;
    m.push((
        "host mmap of guest_memfd".to_string(),
        yes_no(
            flags & GUEST_MEMFD_FLAG_MMAP != 0,
            "a VMM can map guest memory from the file (flag mmap)".into(),
            format!("KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}, without MMAP"),
        ),
    ));
    m.push((
        "guest_memfd as ordinary RAM".to_string(),
        yes_no(
            flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0,
            "flags mmap|init_shared give memory shared with the host from creation, on default VMs"
                .into(),
            format!("KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}, without INIT_SHARED"),
        ),
    ));
    let sw = vm_types
        .iter()
        .find(|v| v.vm_type == KVM_X86_SW_PROTECTED_VM as u64);
    let private_types: Vec<&VmTypeCaps> = vm_types
        .iter()
        .filter(|v| {
            v.vm_type != 0
                && v.create_error.is_none()
                && cap(&v.caps, "memory_attributes") as u64 & KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
                    != 0
        })
        .collect();
    let private = if private_types.is_empty() {
        let why = match sw {
            Some(VmTypeCaps {
                create_error: Some(e),
                ..
            }) => format!("VM type sw_protected is not supported (KVM_CREATE_VM: {e})"),
            Some(v) => format!(
                "VM type sw_protected has KVM_CAP_MEMORY_ATTRIBUTES {:#x}, without PRIVATE",
                cap(&v.caps, "memory_attributes")
            ),
            None => "no VM type with private memory".to_string(),
        };
        format!("not available on this host: {why}")
    } else if sma != "present" && !sma.starts_with("present") {
        format!("not available on this host: KVM_SET_MEMORY_ATTRIBUTES is {sma}")
    } else {
        let names: Vec<&str> = private_types.iter().map(|v| v.name).collect();
        format!("available: VM types {}", names.join(", "))
    };
    m.push(("private memory".to_string(), private));
    m.push(("KVM_SET_MEMORY_ATTRIBUTES".to_string(), sma.to_string()));
    let mfi = cap(system, "memory_fault_info");
    m.push((
        "memory fault exits".to_string(),
        yes_no(
            mfi != 0,
            "a guest access the kernel cannot serve exits with KVM_EXIT_MEMORY_FAULT".into(),
            "KVM_CAP_MEMORY_FAULT_INFO is 0".into(),
        ),
    ));
    let hc = cap(system, "exit_hypercall") as u64;
    m.push((
        "guest conversion requests".to_string(),
        yes_no(
            hc & (1 << KVM_HC_MAP_GPA_RANGE) != 0,
            "KVM_CAP_EXIT_HYPERCALL offers KVM_HC_MAP_GPA_RANGE exits (whether a guest's hypercall really exits: `gmem check scenarios/6-faults/hypercall-exit.gmem`)".into(),
            format!("KVM_CAP_EXIT_HYPERCALL is {hc:#x}"),
        ),
    ));
    let slots = cap(system, "nr_memslots");
    let spaces = cap(system, "multi_address_space").max(1);
    m.push((
        "memslots".to_string(),
        format!("{slots} per address space, {spaces} address space(s)"),
    ));
    m
}

fn render(c: &Caps) -> String {
    let mut out = format!(
        "backend: {}\n\nsystem capabilities (KVM_CHECK_EXTENSION on the system fd):\n",
        c.backend
    );
    for (n, v) in &c.system {
        out.push_str(&format!("  {n:<22} {v:>8}  ({v:#x})\n"));
    }
    out.push_str("\nVM types (KVM_CREATE_VM, then KVM_CHECK_EXTENSION on the VM fd):\n");
    out.push_str(&format!("  {:<4} {:<13} {:<8}", "type", "name", "create"));
    for (n, _) in VM_CAPS {
        out.push_str(&format!(" {n:>19}"));
    }
    out.push('\n');
    for v in &c.vm_types {
        out.push_str(&format!(
            "  {:<4} {:<13} {:<8}",
            v.vm_type,
            v.name,
            v.create_error.as_deref().unwrap_or("ok")
        ));
        for (n, _) in VM_CAPS {
            match v.caps.iter().find(|(m, _)| m == n) {
                Some((_, x)) => out.push_str(&format!(" {x:>19}")),
                None => out.push_str(&format!(" {:>19}", "-")),
            }
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "\nKVM_SET_MEMORY_ATTRIBUTES on a default VM: {}\n",
        c.set_memory_attributes
    ));
    out.push_str("\nwhat it means for a VMM:\n");
    for (k, v) in &c.meaning {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    if let Some(m) = &c.release {
        out.push_str(&format!(
            "\nguest_memfd behaviour follows release: {}\n",
            m.summary()
        ));
        out.push_str("  decided by (scenario line: observed -> releases with that outcome):\n");
        for p in &m.probes {
            let rels: Vec<String> = p.releases.iter().map(|r| r.to_string()).collect();
            out.push_str(&format!(
                "    {}: {} -> {}\n",
                p.at,
                p.observed,
                rels.join(" ")
            ));
        }
        for (file, why) in &m.skipped {
            out.push_str(&format!("    {file}: not run, {why}\n"));
        }
    }
    out
}

/// `gmem caps`: exits 0 even when the backend cannot be opened (it says so).
pub fn caps(backend: Backend, json: bool, corpus: &Path) -> ExitCode {
    let hv = match backend.open() {
        Ok(hv) => hv,
        Err(e) => {
            let msg = format!("{} backend not available: {e}", backend.name());
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "backend": backend.name(), "available": false, "reason": e.to_string() })
                );
            } else {
                println!("{msg}");
                if backend == Backend::Kvm {
                    println!("(no /dev/kvm on this host, or no permission to open it: KVM guest_memfd support cannot be read; `gmem caps --backend soft` shows the software backend)");
                }
            }
            return ExitCode::SUCCESS;
        }
    };
    let c = gather(hv.as_ref(), corpus);
    if json {
        match serde_json::to_string_pretty(&c) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("gmem caps: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", render(&c));
    }
    ExitCode::SUCCESS
}
