//! `gmem caps`: what a backend supports of guest_memfd, per VM type, the
//! known departures from upstream its probes find, and what that means for a
//! VMM.

use std::collections::BTreeMap;
use std::process::ExitCode;

use gmem::error::errno_name;
use gmem::scenario::departures::{KernelId, ProbeOutcome};
use gmem::scenario::{match_release_in, Departures, Limits, ReleaseMatch};
use gmem::uapi::{
    kvm_memory_attributes, vm_type_name, CAPS, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS, KVM_CAP_USER_MEMORY2, KVM_HC_MAP_GPA_RANGE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM,
};
use gmem::{Backend, Errno, Hypervisor};
use serde::Serialize;

/// Output lines fit this many columns.
const WIDTH: usize = 100;

/// Per-VM capabilities `gmem caps` asks every VM type for.
const VM_CAPS: &[(&str, u32)] = &[
    ("guest_memfd", KVM_CAP_GUEST_MEMFD),
    ("guest_memfd_flags", KVM_CAP_GUEST_MEMFD_FLAGS),
    ("memory_attributes", KVM_CAP_MEMORY_ATTRIBUTES),
    ("multi_address_space", KVM_CAP_MULTI_ADDRESS_SPACE),
    ("nr_memslots", KVM_CAP_NR_MEMSLOTS),
    ("user_memory2", KVM_CAP_USER_MEMORY2),
];

/// Capability name → `KVM_CHECK_EXTENSION` value.
type CapMap = BTreeMap<&'static str, i64>;

#[derive(Debug, Serialize)]
struct VmTypeCaps {
    vm_type: u64,
    /// `None` when KVM_CREATE_VM succeeded, else the errno.
    create_error: Option<String>,
    /// On the VM fd, keyed by capability name (empty when not created).
    capabilities: CapMap,
}

/// One known departure and what its probe found here.
#[derive(Debug, Serialize)]
struct DepartureCap {
    rule: String,
    summary: String,
    /// `shown`, `not_shown` or `inconclusive`.
    probe: &'static str,
    /// Why a probe was inconclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Recorded for this kernel in departures.toml.
    recorded: bool,
}

/// The `schema` field of `gmem caps --json` (docs/conformance.md).
pub const SCHEMA: &str = "gmem-caps/1";

/// What one capability, or a set of them, means for a VMM.
#[derive(Debug)]
struct Meaning {
    /// Its key in JSON: an identifier.
    id: &'static str,
    /// Its label in the text.
    label: &'static str,
    /// What it means here.
    text: String,
}

#[derive(Debug, Serialize)]
struct Caps {
    /// [`SCHEMA`].
    schema: &'static str,
    backend: &'static str,
    kernel: KernelId,
    /// On the system fd, keyed by capability name.
    capabilities: CapMap,
    /// Keyed by VM type name.
    vm_types: BTreeMap<&'static str, VmTypeCaps>,
    /// `present`, `absent`, or why it could not be probed.
    set_memory_attributes: String,
    /// Known departures from upstream, keyed by behaviour id.
    departures: BTreeMap<String, DepartureCap>,
    /// What it means for a VMM, keyed by topic id (in this order).
    #[serde(serialize_with = "ser_meaning")]
    meaning: Vec<Meaning>,
    /// Which release's guest_memfd behaviour the backend follows, measured
    /// by the corpus lines whose outcome differs between releases.
    release: ReleaseMatch,
}

/// The meanings as a JSON object `{id: text}`, in order.
fn ser_meaning<S: serde::Serializer>(meaning: &[Meaning], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(meaning.len()))?;
    for x in meaning {
        m.serialize_entry(x.id, &x.text)?;
    }
    m.end()
}

fn cap(caps: &CapMap, name: &str) -> i64 {
    caps.get(name).copied().unwrap_or(0)
}

fn gather(hv: &dyn Hypervisor, corpus: &[(&str, &str)]) -> Caps {
    let capabilities: CapMap = CAPS
        .iter()
        .map(|(n, c)| (*n, hv.check_extension(*c)))
        .collect();
    let vm_types: BTreeMap<&'static str, VmTypeCaps> = (0..=5u64)
        .map(|t| {
            let caps = match hv.create_vm(t) {
                Ok(vm) => VmTypeCaps {
                    vm_type: t,
                    create_error: None,
                    capabilities: VM_CAPS
                        .iter()
                        .map(|(n, c)| (*n, vm.check_extension(*c)))
                        .collect(),
                },
                Err(e) => VmTypeCaps {
                    vm_type: t,
                    create_error: Some(errno_name(e.errno)),
                    capabilities: CapMap::new(),
                },
            };
            (vm_type_name(t), caps)
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
    let known = Departures::builtin();
    let probes = known.probe(hv, &Limits::new(64 << 20));
    let departures = known
        .behaviours
        .iter()
        .zip(&probes.results)
        .map(|(b, r)| {
            let (probe, reason) = match &r.outcome {
                ProbeOutcome::Shown => ("shown", None),
                ProbeOutcome::NotShown => ("not_shown", None),
                ProbeOutcome::Inconclusive(why) => ("inconclusive", Some(why.clone())),
            };
            (
                b.id.clone(),
                DepartureCap {
                    rule: b.rule.clone(),
                    summary: b.summary.clone(),
                    probe,
                    reason,
                    recorded: r.recorded,
                },
            )
        })
        .collect();
    let meaning = meaning(&capabilities, &vm_types, &set_memory_attributes);
    let files: Vec<(String, String)> = corpus
        .iter()
        .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
        .collect();
    Caps {
        schema: SCHEMA,
        release: match_release_in(hv, &files),
        backend: hv.name(),
        kernel: probes.kernel,
        capabilities,
        vm_types,
        set_memory_attributes,
        departures,
        meaning,
    }
}

fn meaning(
    system: &CapMap,
    vm_types: &BTreeMap<&'static str, VmTypeCaps>,
    sma: &str,
) -> Vec<Meaning> {
    let mut m = Vec::new();
    let mut push = |id, label, text| m.push(Meaning { id, label, text });
    let yes_no = |b: bool, yes: String, no: String| {
        if b {
            format!("available: {yes}")
        } else {
            format!("not available on this host: {no}")
        }
    };
    let gm = cap(system, "guest_memfd");
    push(
        "guest_memfd",
        "guest_memfd",
        yes_no(
            gm != 0,
            "KVM_CREATE_GUEST_MEMFD works".into(),
            "KVM_CAP_GUEST_MEMFD is 0".into(),
        ),
    );
    let flags = cap(system, "guest_memfd_flags") as u64;
    push(
        "host_mmap",
        "host mmap of guest_memfd",
        yes_no(
            flags & GUEST_MEMFD_FLAG_MMAP != 0,
            "a VMM can map guest memory from the file (flag mmap)".into(),
            format!("KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}, without MMAP"),
        ),
    );
    push(
        "guest_memfd_as_ram",
        "guest_memfd as ordinary RAM",
        yes_no(
            flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0,
            "flags mmap|init_shared give memory shared with the host from creation, on default VMs"
                .into(),
            format!("KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}, without INIT_SHARED"),
        ),
    );
    let sw = vm_types
        .values()
        .find(|v| v.vm_type == KVM_X86_SW_PROTECTED_VM as u64);
    let private_types: Vec<&str> = vm_types
        .iter()
        .filter(|(_, v)| {
            v.vm_type != 0
                && v.create_error.is_none()
                && cap(&v.capabilities, "memory_attributes") as u64
                    & KVM_MEMORY_ATTRIBUTE_PRIVATE as u64
                    != 0
        })
        .map(|(n, _)| *n)
        .collect();
    let private = if private_types.is_empty() {
        let why = match sw {
            Some(VmTypeCaps {
                create_error: Some(e),
                ..
            }) => format!("VM type sw_protected is not supported (KVM_CREATE_VM: {e})"),
            Some(v) => format!(
                "VM type sw_protected has KVM_CAP_MEMORY_ATTRIBUTES {:#x}, without PRIVATE",
                cap(&v.capabilities, "memory_attributes")
            ),
            None => "no VM type with private memory".to_string(),
        };
        format!("not available on this host: {why}")
    } else if !sma.starts_with("present") {
        format!("not available on this host: KVM_SET_MEMORY_ATTRIBUTES is {sma}")
    } else {
        format!("available: VM types {}", private_types.join(", "))
    };
    push("private_memory", "private memory", private);
    push(
        "set_memory_attributes",
        "KVM_SET_MEMORY_ATTRIBUTES",
        sma.to_string(),
    );
    let mfi = cap(system, "memory_fault_info");
    push(
        "memory_fault_exits",
        "memory fault exits",
        yes_no(
            mfi != 0,
            "a guest access the kernel cannot serve exits with KVM_EXIT_MEMORY_FAULT".into(),
            "KVM_CAP_MEMORY_FAULT_INFO is 0".into(),
        ),
    );
    let hc = cap(system, "exit_hypercall") as u64;
    push(
        "guest_conversion_requests",
        "guest conversion requests",
        yes_no(
            hc & (1 << KVM_HC_MAP_GPA_RANGE) != 0,
            "KVM_CAP_EXIT_HYPERCALL offers KVM_HC_MAP_GPA_RANGE exits (whether a guest's \
             hypercall really exits is what the probe of departure FAULT-8 finds)"
                .into(),
            format!("KVM_CAP_EXIT_HYPERCALL is {hc:#x}"),
        ),
    );
    let slots = cap(system, "nr_memslots");
    let spaces = cap(system, "multi_address_space").max(1);
    push(
        "memslots",
        "memslots",
        format!("{slots} per address space, {spaces} address space(s)"),
    );
    m
}

/// `text` wrapped at [`WIDTH`] columns, continuation lines indented by
/// `indent` spaces.
fn wrap(first: &str, text: &str, indent: usize) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    for word in text.split_whitespace() {
        if line.chars().count() + 1 + word.chars().count() > WIDTH
            && line.trim().chars().count() > 0
        {
            out.push_str(line.trim_end());
            out.push('\n');
            line = " ".repeat(indent);
        } else if !line.ends_with(' ') && !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

fn render(c: &Caps) -> String {
    let mut out = format!("backend: {}\nkernel:  {}\n", c.backend, c.kernel);
    out.push_str("\nsystem capabilities (KVM_CHECK_EXTENSION on the system fd):\n");
    // The name column is as wide as the longest name.
    let nw = c
        .capabilities
        .keys()
        .chain(VM_CAPS.iter().map(|(n, _)| n))
        .map(|n| n.len())
        .max()
        .unwrap_or(0)
        .max("capability".len());
    for (n, v) in &c.capabilities {
        out.push_str(&format!("  {n:<nw$} {v:>8}  ({v:#x})\n"));
    }
    let created: Vec<(&&str, &VmTypeCaps)> = c
        .vm_types
        .iter()
        .filter(|(_, v)| v.create_error.is_none())
        .collect();
    let mut by_type: Vec<(&&str, &VmTypeCaps)> = c.vm_types.iter().collect();
    by_type.sort_by_key(|(_, v)| v.vm_type);
    let refused: Vec<String> = by_type
        .iter()
        .filter_map(|(n, v)| {
            v.create_error
                .as_ref()
                .map(|e| format!("{n} ({}): {e}", v.vm_type))
        })
        .collect();
    out.push_str("\nVM types (KVM_CREATE_VM, then KVM_CHECK_EXTENSION on the VM fd):\n");
    if !refused.is_empty() {
        out.push_str(&wrap("  refused:", &refused.join(", "), 4));
    }
    if !created.is_empty() {
        out.push_str(&format!("  {:<nw$}", "capability"));
        for (n, v) in &created {
            out.push_str(&format!(" {:>14}", format!("{n} ({})", v.vm_type)));
        }
        out.push('\n');
        for (cap, _) in VM_CAPS {
            out.push_str(&format!("  {cap:<nw$}"));
            for (_, v) in &created {
                let x = v.capabilities.get(cap).copied().unwrap_or(0);
                out.push_str(&format!(" {x:>14}"));
            }
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "\nKVM_SET_MEMORY_ATTRIBUTES on a default VM: {}\n",
        c.set_memory_attributes
    ));
    out.push_str("\nknown departures from upstream (probes run on this backend):\n");
    let w = c.departures.keys().map(String::len).max().unwrap_or(0);
    for (id, d) in &c.departures {
        let state = match d.probe {
            "shown" => "shown",
            "not_shown" => "not shown",
            _ => "inconclusive",
        };
        // The summary starts at column w + 16; so do its continuation lines.
        out.push_str(&wrap(
            &format!("  {id:<w$}  {state:<12}"),
            &d.summary,
            w + 16,
        ));
        if let Some(why) = &d.reason {
            out.push_str(&wrap(&" ".repeat(w + 16), why, w + 16));
        }
    }
    out.push_str("\nwhat it means for a VMM:\n");
    for x in &c.meaning {
        out.push_str(&wrap(&format!("  {}:", x.label), &x.text, 4));
    }
    let m = &c.release;
    out.push_str(&format!(
        "\nguest_memfd behaviour follows release: {}\n",
        m.summary()
    ));
    out.push_str("  decided by (scenario line: observed -> releases with that outcome):\n");
    for p in &m.probes {
        let rels: Vec<String> = p.releases.iter().map(|r| r.to_string()).collect();
        out.push_str(&wrap(
            &format!("    {}:", p.at),
            &format!("{} -> {}", p.observed, rels.join(" ")),
            6,
        ));
    }
    for (file, why) in &m.skipped {
        out.push_str(&wrap(
            &format!("    {file}:"),
            &format!("not run, {why}"),
            6,
        ));
    }
    out
}

/// `gmem caps`: exits 0 even when the backend cannot be opened (it says so).
pub fn caps(backend: Backend, json: bool, corpus: &[(&str, &str)]) -> ExitCode {
    let hv = match backend.open() {
        Ok(hv) => hv,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "schema": SCHEMA,
                        "backend": backend.name(),
                        "kernel": KernelId::running(),
                        "available": false,
                        "reason": e.to_string()
                    })
                );
            } else {
                print!(
                    "{}",
                    wrap(
                        "",
                        &format!("{} backend not available: {e}", backend.name()),
                        2
                    )
                );
                println!("kernel: {}", KernelId::running());
                if backend == Backend::Kvm {
                    print!(
                        "{}",
                        wrap(
                            "",
                            "(no /dev/kvm on this host, or no permission to open it: KVM \
                             guest_memfd support cannot be read; `gmem caps --backend soft` \
                             shows the software backend)",
                            1
                        )
                    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn soft_caps() -> Caps {
        let hv = Backend::Soft.open().unwrap();
        gather(hv.as_ref(), &[])
    }

    #[test]
    fn capability_values_line_up_whatever_the_name_length() {
        let text = render(&soft_caps());

        // Every row of the system table ends its value at one column.
        let ends: Vec<usize> = text
            .lines()
            .skip_while(|l| !l.starts_with("system capabilities"))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .map(|l| l.find("  (").expect("a value in hex"))
            .collect();
        assert!(ends.len() > 5, "{text}");
        assert!(ends.iter().all(|e| *e == ends[0]), "{ends:?}\n{text}");
        assert!(text.lines().all(|l| l.chars().count() <= WIDTH), "{text}");
    }

    #[test]
    fn a_wrapped_departure_summary_continues_under_its_first_word() {
        let mut c = soft_caps();
        let d = c.departures.values_mut().next().unwrap();
        d.summary = "word ".repeat(40);

        let text = render(&c);

        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("known departures"))
            .skip(1)
            .take(2)
            .collect();
        let start = lines[0].find("word").unwrap();
        let next = lines[1].len() - lines[1].trim_start().len();
        assert_eq!(start, next, "{lines:?}");
    }

    #[test]
    fn json_has_a_schema_and_identifiers_for_keys_and_no_layout_words() {
        let v = serde_json::to_value(soft_caps()).unwrap();

        assert_eq!(v["schema"], SCHEMA);
        let meaning = v["meaning"].as_object().unwrap();
        assert!(meaning.len() >= 8);
        for (k, text) in meaning {
            assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{k}");
            assert!(!text.as_str().unwrap().contains("above"), "{k}: {text}");
        }
    }

    #[test]
    fn wrapped_lines_fit_100_columns() {
        let text = "word ".repeat(100);
        for l in wrap("  topic:", &text, 4).lines() {
            assert!(l.chars().count() <= WIDTH, "{l:?}");
        }
    }
}
