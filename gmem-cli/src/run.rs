//! `gmem run`: a VM whose RAM is on guest_memfd, populated by guest code on
//! every vCPU, verified from the host through the memory manager, then
//! converted and discarded where the host allows, with a summary of what
//! it cost and what the kernel says is held.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use gmem::memory::{
    human_bytes, BackingMode, BackingRequest, Error as MemError, ExitCounts, GuestAddress,
    GuestRange, Held, Layout, MemoryManager, PageState,
};
use gmem::scenario::budget::{mem_available, Bytes, FALLBACK_MAX_MEMORY};
use gmem::soft::SoftHypervisor;
use gmem::uapi::{KVM_HC_MAP_GPA_RANGE, PAGE_SIZE};
use gmem::Errno;
use gmem::{Backend, GuestLoop, GuestOp, Hypervisor, Release, Vcpu};
use indicatif::{ProgressBar, ProgressStyle};

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The running kernel where /dev/kvm exists, else the software backend.
    Auto,
    /// The software backend.
    Soft,
    /// The running kernel.
    Kvm,
}

/// Which backing mode to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackingChoice {
    /// The most capable mode the host offers (private memory where it can).
    Auto,
    /// All RAM in guest_memfd (MMAP | INIT_SHARED), no private memory.
    GuestMemfd,
    /// Private memory in guest_memfd, shared memory in host memory.
    Split,
    /// Shared and private pages in one guest_memfd, converted in place (the
    /// software backend with `--profile next`; kernels with in-place conversion).
    InPlace,
    /// Plain anonymous memory.
    Anonymous,
}

impl BackingChoice {
    /// The library's request.
    pub fn request(self) -> BackingRequest {
        match self {
            BackingChoice::Auto => BackingRequest::Best,
            BackingChoice::GuestMemfd => BackingRequest::Mode(BackingMode::GuestMemfd),
            BackingChoice::Split => BackingRequest::Mode(BackingMode::Split),
            BackingChoice::InPlace => BackingRequest::Mode(BackingMode::InPlace),
            BackingChoice::Anonymous => BackingRequest::Mode(BackingMode::Anonymous),
        }
    }
}

/// A backend and, for the software backend, the kernel release it follows.
pub type Where = (BackendChoice, Option<Release>);

/// Opens the chosen backend, or says why not. A release profile implies
/// the software backend.
pub fn open((choice, profile): Where) -> Result<Box<dyn Hypervisor>, String> {
    let backend = match (choice, profile) {
        (BackendChoice::Kvm, Some(r)) => {
            return Err(format!(
                "--profile {r} runs the software backend; the kvm backend is the running kernel"
            ))
        }
        (_, Some(r)) => {
            return SoftHypervisor::with_profile(r)
                .map(|h| Box::new(h) as Box<dyn Hypervisor>)
                .map_err(|e| format!("the soft backend cannot be opened: {e}"))
        }
        (BackendChoice::Soft, None) => Backend::Soft,
        (BackendChoice::Kvm, None) => Backend::Kvm,
        (BackendChoice::Auto, None) if std::path::Path::new("/dev/kvm").exists() => Backend::Kvm,
        (BackendChoice::Auto, None) => Backend::Soft,
    };
    backend
        .open()
        .map_err(|e| format!("the {} backend cannot be opened: {e}", backend.name()))
}

/// Parses `1G`, `512M`, `64K`, `4096`, `0x1000`, `1_000_000` (bytes;
/// binary units K, M, G, T; `_` between digits).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_amount(s, "a size", "1G, 512M, 0x1000")
}

/// A number as `--memory`, `--ram` and `--private` take it: decimal or
/// `0x` hex, `_` between digits, an optional K, M, G or T (binary units).
/// `what` names it in messages ("a size", "an address").
fn parse_amount(s: &str, what: &str, like: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not {what} (write it like {like})");
    let (body, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    let (digits, shift) = match body.chars().last() {
        Some(c) if "KMGTkmgt".contains(c) => (
            &body[..body.len() - 1],
            match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => 40,
            },
        ),
        Some(c) if c.is_ascii_alphabetic() && !c.is_digit(radix) => {
            let number = &body[..body.len() - 1];
            if !number.is_empty() && number.chars().all(|d| d.is_digit(radix) || d == '_') {
                return Err(format!("`{s}`: the unit must be K, M, G or T"));
            }
            return Err(bad());
        }
        _ => (body, 0),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') {
        return Err(bad());
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if !clean.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    u64::from_str_radix(&clean, radix)
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{s}` is more than 64 bits hold"))
}

/// Parses `GPA:SIZE` (`0x1_0000_0000:1G`).
pub fn parse_range(s: &str) -> Result<GuestRange, String> {
    let (gpa, size) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: give a range as GPA:SIZE, like 0x100000000:1G"))?;
    Ok(GuestRange::new(
        GuestAddress(parse_amount(gpa, "an address", "0x100000000, 4G")?),
        parse_size(size)?,
    ))
}

/// Wraps `text` to `width` columns, continuation lines indented by `indent`.
pub fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut col = indent;
    for word in text.split_whitespace() {
        if col > indent && col + 1 + word.len() > width {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            col = indent;
        } else if col > indent {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out
}

/// One label and its text, wrapped to 100 columns.
fn line(label: &str, text: impl std::fmt::Display) {
    println!("{label:<10}{}", wrap(&text.to_string(), 100, 10));
}

fn held_text(h: &Held) -> String {
    if h.host.iter().all(|&b| b == 0) {
        format!("{} in guest_memfd", human_bytes(h.file_bytes()))
    } else {
        format!(
            "{} ({} in guest_memfd, {} in host memory)",
            human_bytes(h.total()),
            human_bytes(h.file_bytes()),
            human_bytes(h.host_bytes())
        )
    }
}

fn per_second(bytes: u64, d: Duration) -> String {
    format!(
        "{}/s",
        human_bytes((bytes as f64 / d.as_secs_f64().max(1e-9)) as u64)
    )
}

/// Each vCPU's share of `ranges`: about equal, page aligned, possibly
/// spanning a hole (then several pieces).
fn shares(ranges: &[GuestRange], n: usize) -> Vec<Vec<GuestRange>> {
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let per = (total / n as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut out = vec![Vec::new(); n];
    let (mut cpu, mut room) = (0, per);
    for r in ranges {
        let mut at = r.start.0;
        let end = r.start.0 + r.len;
        while at < end {
            let take = if cpu + 1 == n {
                end - at
            } else {
                (end - at).min(room)
            };
            out[cpu].push(GuestRange::new(GuestAddress(at), take));
            at += take;
            room -= take.min(room);
            if room == 0 && cpu + 1 < n {
                cpu += 1;
                room = per;
            }
        }
    }
    out
}

/// Runs `op(piece)` for every piece of every vCPU's share, one thread per
/// vCPU, while a progress bar shows what the kernel says is held.
fn on_every_vcpu(
    mm: &MemoryManager,
    vcpus: &mut [Box<dyn Vcpu>],
    work: &[Vec<GuestRange>],
    progress: Option<(&str, u64)>,
    op: impl Fn(GuestRange) -> GuestLoop + Sync,
) -> Result<(u64, ExitCounts), String> {
    let done = AtomicBool::new(false);
    let bar = progress.map(|(what, total)| {
        let bar = ProgressBar::new(total).with_prefix(what.to_string());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{bar:40}] {bytes}/{total_bytes} held, {bytes_per_sec}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    std::thread::scope(|s| {
        if let Some(bar) = &bar {
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    if let Ok(h) = mm.held() {
                        bar.set_position(h.total());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let threads: Vec<_> = vcpus
            .iter_mut()
            .zip(work)
            .map(|(vcpu, pieces)| {
                let op = &op;
                s.spawn(move || {
                    let mut result = 0;
                    let mut exits = ExitCounts::default();
                    for piece in pieces {
                        let run = mm
                            .run_loop(&mut **vcpu, op(*piece))
                            .map_err(|e| e.to_string())?;
                        result += run.result;
                        exits.add(&run.exits);
                    }
                    Ok::<_, String>((result, exits))
                })
            })
            .collect();
        let mut total = (0, ExitCounts::default());
        let mut failed = None;
        for t in threads {
            match t.join().expect("a vCPU thread panicked") {
                Ok((r, e)) => {
                    total.0 += r;
                    total.1.add(&e);
                }
                Err(e) => failed = Some(e),
            }
        }
        done.store(true, Ordering::Release);
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        failed.map_or(Ok(total), Err)
    })
}

/// Reads `ranges` from the host through the manager and counts the words
/// that do not hold `pattern(gpa, seed)` (or 0 with `zero`).
fn host_verify(
    mm: &MemoryManager,
    ranges: &[GuestRange],
    seed: u64,
    zero: bool,
) -> Result<u64, String> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut wrong = 0;
    for r in ranges {
        let mut at = r.start.0;
        let end = r.start.0 + r.len;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            mm.read(GuestAddress(at), &mut buf[..n])
                .map_err(|e| e.to_string())?;
            for (i, w) in buf[..n].chunks_exact(8).enumerate() {
                let want = if zero {
                    0
                } else {
                    GuestLoop::pattern(at + 8 * i as u64, seed)
                };
                wrong += u64::from(u64::from_le_bytes(w.try_into().expect("8 bytes")) != want);
            }
            at += n as u64;
        }
    }
    Ok(wrong)
}

/// The second half of every range (page aligned).
fn halves(ranges: &[GuestRange]) -> (Vec<GuestRange>, Vec<GuestRange>) {
    ranges
        .iter()
        .map(|r| {
            let first = (r.len / 2) / PAGE_SIZE * PAGE_SIZE;
            (
                GuestRange::new(r.start, first),
                GuestRange::new(GuestAddress(r.start.0 + first), r.len - first),
            )
        })
        .unzip()
}

/// The share of `MemAvailable` `gmem run` may populate by default: it
/// touches every byte of RAM, so `--memory` must fit in memory with room
/// for everything else running.
pub const RUN_SHARE: u64 = 2;

/// The default `--max-memory` of `gmem run`: half of `MemAvailable` now,
/// 256 MiB when that cannot be read.
pub fn default_max_memory() -> u64 {
    mem_available().map_or(FALLBACK_MAX_MEMORY, |m| m / RUN_SHARE)
}

/// The help text of `run --max-memory`, with the default on this machine.
pub fn max_memory_help() -> String {
    let now = match mem_available() {
        Some(m) => format!("now {} of {}", Bytes(m / RUN_SHARE), Bytes(m)),
        None => "MemAvailable cannot be read here: 256 MiB".to_string(),
    };
    format!(
        "The most RAM this run may populate (it touches every byte): a --memory over it is \
         refused before anything is allocated [default: 1/{RUN_SHARE} of MemAvailable at \
         start; {now}]"
    )
}

/// Why a command did not complete: bad input (exit 2) or a failure (1).
pub enum Failed {
    /// Arguments the command cannot run with, or a host that cannot hold
    /// what they ask for.
    Input(String),
    /// Something went wrong while running.
    Run(String),
}

impl From<String> for Failed {
    fn from(s: String) -> Self {
        Failed::Run(s)
    }
}

impl Failed {
    /// Prints the message, wrapped to 100 columns, and gives the exit code.
    pub fn exit(self, command: &str) -> ExitCode {
        let (msg, code) = match self {
            Failed::Input(m) => (m, 2),
            Failed::Run(m) => (m, 1),
        };
        eprintln!("{}", wrap(&format!("gmem {command}: {msg}"), 100, 2));
        ExitCode::from(code)
    }
}

/// Checks `--memory` before anything is built: a positive multiple of the
/// page size, and at most `max` (the bytes the run may populate, `None`
/// for `gmem map`, which touches nothing).
pub fn check_memory(memory: u64, max: Option<(u64, &str)>) -> Result<(), Failed> {
    if memory == 0 || memory % PAGE_SIZE != 0 {
        return Err(Failed::Input(format!(
            "--memory {memory} bytes: RAM must be a positive multiple of 4 KiB, like 512M or 1G"
        )));
    }
    if let Some((max, how)) = max {
        if memory > max {
            return Err(Failed::Input(format!(
                "--memory {} is more than this run may populate: --max-memory is {} ({how}); \
                 ask for less RAM, or give a larger --max-memory if the machine can hold it",
                Bytes(memory),
                Bytes(max)
            )));
        }
    }
    Ok(())
}

/// Builds the manager for `layout`; a layout the arguments got wrong, or
/// one this host cannot even map, is bad input.
pub fn manager(
    hv: &dyn Hypervisor,
    layout: Result<Layout, MemError>,
    size: u64,
) -> Result<MemoryManager, Failed> {
    let layout = layout.map_err(|e| Failed::Input(e.to_string()))?;
    MemoryManager::new(hv, layout).map_err(|e| match e {
        // A backing mode this host does not offer.
        MemError::Unsupported { .. } => Failed::Input(e.to_string()),
        _ if e.errno() == Errno::ENOMEM => Failed::Input(format!(
            "{} of RAM cannot be set up on this host: {e}; ask for less",
            Bytes(size)
        )),
        _ => Failed::Run(e.to_string()),
    })
}

/// `gmem run`.
pub fn run(
    memory: u64,
    vcpus: usize,
    max_memory: Option<u64>,
    backend: Where,
    backing: BackingChoice,
) -> ExitCode {
    let max = match max_memory {
        Some(m) => (m, "as given".to_string()),
        None => (
            default_max_memory(),
            match mem_available() {
                Some(a) => format!("1/{RUN_SHARE} of MemAvailable, {}", Bytes(a)),
                None => "MemAvailable cannot be read".to_string(),
            },
        ),
    };
    if vcpus == 0 {
        return Failed::Input("--vcpus 0: a VM needs at least one vCPU".into()).exit("run");
    }
    if let Err(e) = check_memory(memory, Some((max.0, &max.1))) {
        return e.exit("run");
    }
    match run_inner(memory, vcpus, backend, backing) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit("run"),
    }
}

const SEED: u64 = 0x676d_656d_0000_0000;
const PRIVATE_SEED: u64 = 0x7072_6976_0000_0000;

fn run_inner(
    memory: u64,
    vcpus: usize,
    backend: Where,
    backing: BackingChoice,
) -> Result<(), Failed> {
    let hv = open(backend).map_err(Failed::Input)?;
    let layout = Layout::builder()
        .memory(memory)
        .backing(backing.request())
        .build();
    let t = Instant::now();
    let mm = manager(&*hv, layout, memory)?;
    let mut cpus = (0..vcpus as u64)
        .map(|id| mm.vm().create_vcpu(id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let setup = t.elapsed();

    let ram: Vec<GuestRange> = mm.layout().ranges().iter().map(|r| r.range).collect();
    let b = mm.backing();
    println!(
        "gmem run: {} of RAM, {vcpus} vCPU{}, {} backend\n",
        human_bytes(memory),
        if vcpus == 1 { "" } else { "s" },
        hv.name()
    );
    for (i, slot) in mm.layout().slots().iter().enumerate() {
        let backed = match mm.file(slot.file) {
            Some(_) => format!("guest_memfd {} at offset {:#x}", slot.file, slot.offset.0),
            None => "anonymous host memory".into(),
        };
        line(
            if i == 0 { "layout" } else { "" },
            format_args!(
                "{} {}: slot {}, {backed}",
                slot.range,
                human_bytes(slot.range.len),
                slot.id
            ),
        );
    }
    for hole in mm.layout().holes() {
        line("", format_args!("{hole} {}: hole", human_bytes(hole.len)));
    }
    line("backing", format_args!("{}: {}", b.mode, b.reason));
    for (mode, why) in &b.passed_over {
        line("", format_args!("not {mode}: {why}"));
    }
    line(
        "set-up",
        format_args!(
            "{:.1} ms: VM, {} guest_memfd file{}, {} memslot{}, {vcpus} vCPU{}",
            setup.as_secs_f64() * 1e3,
            mm.layout().files().len() * usize::from(b.mode != BackingMode::Anonymous),
            if mm.layout().files().len() == 1 {
                ""
            } else {
                "s"
            },
            mm.layout().slots().len(),
            if mm.layout().slots().len() == 1 {
                ""
            } else {
                "s"
            },
            if vcpus == 1 { "" } else { "s" },
        ),
    );

    // Populate: every vCPU fills its share in one guest loop.
    let work = shares(&ram, vcpus);
    let tty = std::io::stderr().is_terminal();
    let show = (tty && memory >= 64 << 20).then_some(("populate", memory));
    let t = Instant::now();
    let (_, mut exits) = on_every_vcpu(&mm, &mut cpus, &work, show, |r| GuestLoop::Fill {
        gpa: r.start.0,
        len: r.len,
        seed: SEED,
    })?;
    let fill = t.elapsed();
    line(
        "populate",
        format_args!(
            "{} by {vcpus} vCPU{} in {:.2} s: {} (one guest loop per vCPU share)",
            human_bytes(memory),
            if vcpus == 1 { "" } else { "s" },
            fill.as_secs_f64(),
            per_second(memory, fill)
        ),
    );
    let t = Instant::now();
    let wrong = host_verify(&mm, &ram, SEED, false)?;
    line(
        "verify",
        format_args!(
            "the host read {} through the memory manager in {:.2} s: {} words, {wrong} wrong",
            human_bytes(memory),
            t.elapsed().as_secs_f64(),
            memory / 8
        ),
    );
    if wrong != 0 {
        return Err(format!("{wrong} words of RAM do not hold what the guest wrote").into());
    }
    let populated = mm.held().map_err(|e| e.to_string())?;
    line(
        "held",
        format_args!("{} after populating", held_text(&populated)),
    );

    // Convert: the second half of RAM to private (VMM-driven), the guest
    // fills and checks it, then asks for its last quarter back (guest-driven).
    let (first, second) = halves(&ram);
    if b.mode.has_private_memory() {
        let t = Instant::now();
        for r in &second {
            mm.convert(*r, PageState::Private)
                .map_err(|e| e.to_string())?;
        }
        let converted = mm.held().map_err(|e| e.to_string())?;
        line(
            "convert",
            format_args!(
                "second half of RAM to private in {:.1} ms, {}: held {}",
                t.elapsed().as_secs_f64() * 1e3,
                if b.mode == BackingMode::InPlace {
                    "in place (one copy, contents kept)"
                } else {
                    "its shared copy freed"
                },
                held_text(&converted)
            ),
        );
        let private_work = shares(&second, vcpus);
        let (_, e) = on_every_vcpu(&mm, &mut cpus, &private_work, None, |r| GuestLoop::Fill {
            gpa: r.start.0,
            len: r.len,
            seed: PRIVATE_SEED,
        })?;
        exits.add(&e);
        let (wrong, e) =
            on_every_vcpu(&mm, &mut cpus, &private_work, None, |r| GuestLoop::Verify {
                gpa: r.start.0,
                len: r.len,
                seed: PRIVATE_SEED,
            })?;
        exits.add(&e);
        let filled = mm.held().map_err(|e| e.to_string())?;
        line(
            "",
            format_args!(
                "the guest filled and checked the private half ({wrong} wrong): held {}",
                held_text(&filled)
            ),
        );
        if filled.total() > memory {
            return Err(format!(
                "{} held for {} of RAM: a conversion left two copies",
                human_bytes(filled.total()),
                human_bytes(memory)
            )
            .into());
        }
        let (_, back) = halves(&second);
        for r in &back {
            let exit = cpus[0]
                .run(GuestOp::MapGpaRange {
                    gpa: r.start.0,
                    npages: r.len / PAGE_SIZE,
                    attributes: 0,
                })
                .map_err(|e| e.to_string())?;
            exits.record(&exit);
            match mm.handle_exit(&exit).map_err(|e| e.to_string())? {
                Some(_) => {}
                None => {
                    line(
                        "",
                        format_args!("the guest's KVM_HC_MAP_GPA_RANGE did not exit ({exit:?})"),
                    );
                }
            }
        }
        let after = mm.held().map_err(|e| e.to_string())?;
        line(
            "",
            format_args!(
                "the guest asked for the last quarter back (KVM_HC_MAP_GPA_RANGE {KVM_HC_MAP_GPA_RANGE}, \
                 handled by the manager): held {}",
                held_text(&after)
            ),
        );
    } else {
        let why = b
            .passed_over
            .iter()
            .find(|(m, _)| *m == BackingMode::Split)
            .map_or("", |(_, w)| w.as_str());
        line(
            "convert",
            format_args!(
                "not available: the {} backing has no private memory{}{why}",
                b.mode,
                if why.is_empty() { "" } else { "; split: " }
            ),
        );
    }

    // Discard the first half of RAM, as a balloon would.
    let before = mm.held().map_err(|e| e.to_string())?;
    let t = Instant::now();
    for r in &first {
        mm.discard(*r).map_err(|e| e.to_string())?;
    }
    let took = t.elapsed();
    let after = mm.held().map_err(|e| e.to_string())?;
    let kept_ok = if b.mode.has_private_memory() {
        0
    } else {
        host_verify(&mm, &second, SEED, false)?
    };
    // A sample: reading a discarded page faults a fresh one in.
    let sample: Vec<GuestRange> = first
        .iter()
        .map(|r| GuestRange::new(r.start, r.len.min(64 << 10)))
        .collect();
    let zero_ok = host_verify(&mm, &sample, 0, true)?;
    line(
        "discard",
        format_args!(
            "first half of RAM in {:.1} ms: held {} before, {} after",
            took.as_secs_f64() * 1e3,
            held_text(&before),
            held_text(&after)
        ),
    );
    if kept_ok != 0 || zero_ok != 0 {
        return Err(format!(
            "after the discard {kept_ok} kept words changed and {zero_ok} discarded words are \
             not zero"
        )
        .into());
    }
    line(
        "exits",
        format_args!(
            "done {}, memory fault {}, hypercall {}, mmio {}, timeout {}",
            exits.done, exits.memory_fault, exits.hypercall, exits.mmio, exits.timeout
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x1_0000"), Ok(0x10000));
        assert_eq!(parse_size("1_048_576"), Ok(1 << 20));
        assert_eq!(parse_size("0xaG"), Ok(10 << 30));
        assert_eq!(
            parse_size("1Q"),
            Err("`1Q`: the unit must be K, M, G or T".into())
        );
        assert!(parse_size("_1").is_err() && parse_size("1_").is_err());
        assert_eq!(
            parse_size("99999999999T"),
            Err("`99999999999T` is more than 64 bits hold".into())
        );
    }

    #[test]
    fn a_range_names_its_address_as_an_address() {
        assert_eq!(
            parse_range("0x1_0000_0000:4K"),
            Ok(GuestRange::new(GuestAddress(1 << 32), 4096))
        );
        let e = parse_range("zz:4K").unwrap_err();
        assert_eq!(e, "`zz` is not an address (write it like 0x100000000, 4G)");
        let e = parse_range("0x1000:big").unwrap_err();
        assert!(
            e.contains("`big`") && e.contains("a size") || e.contains("unit"),
            "{e}"
        );
    }

    #[test]
    fn shares_cover_ram_once_and_cross_the_hole() {
        let ram = [
            GuestRange::new(GuestAddress(0), 3 << 20),
            GuestRange::new(GuestAddress(1 << 32), 1 << 20),
        ];
        let s = shares(&ram, 2);
        assert_eq!(s[0], vec![GuestRange::new(GuestAddress(0), 2 << 20)]);
        assert_eq!(
            s[1],
            vec![
                GuestRange::new(GuestAddress(2 << 20), 1 << 20),
                GuestRange::new(GuestAddress(1 << 32), 1 << 20)
            ]
        );
    }

    #[test]
    fn wrap_keeps_lines_within_the_width() {
        let text = "word ".repeat(50);
        for l in wrap(&text, 30, 4).lines() {
            assert!(l.len() <= 30, "{l:?}");
        }
    }
}
