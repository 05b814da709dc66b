//! `gmem`: the command line of the gmem project.
//!
//! - `gmem check [PATHS...] [--backend soft|kvm|both] [--profile RELEASE]
//!   [--json] [--departures FILE] [--max-memory SIZE]` runs scenario files
//!   (the built-in corpus by default) and prints a conformance table;
//!   `--profile` runs the software backend as that kernel release.
//! - `gmem caps [--backend kvm|soft] [--json]` shows what a backend supports
//!   of guest_memfd, which known departures its probes find, and what that
//!   means for a VMM.
//! - `gmem bench [--json FILE] [--out DIR] [--quick]` measures every
//!   performance figure against its baseline in the same run.
//! - `gmem run [--memory 1G] [--vcpus 2] [--backend ...] [--backing ...] [--profile ...]`
//!   starts a VM whose RAM is on guest_memfd, populates it from every vCPU,
//!   verifies, converts and discards it, and prints what it cost.
//! - `gmem map [--memory SIZE | --ram GPA:SIZE ...] [--private GPA:SIZE ...]
//!   [--svg FILE]` draws a memory layout.
//! - `gmem fuzz [--seed N] [--time 60s|--runs N] [--backend soft|kvm|both]
//!   [--out DIR]` runs random scenarios and minimizes what differs.
//!
//! Exit status: 0 when everything passed or departs as the probes show, 1
//! when something failed, 2 for bad input (arguments, files that do not
//! exist or do not parse, a departures file that does not load).

#![deny(missing_docs)]

mod bench;
mod caps;
mod fuzz;
mod map;
mod run;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use gmem::scenario::budget::{mem_available, Bytes, DEFAULT_SHARE, KERNEL_VM_COST, MIN_MAX_MEMORY};
use gmem::scenario::{
    collect_paths, parse_number, render, BackendSlot, Checker, Departures, Limits, Source,
};
use gmem::soft::SoftHypervisor;
use gmem::{Backend, Hypervisor, Release};

/// The corpus, built in (see build.rs).
mod corpus {
    include!(concat!(env!("OUT_DIR"), "/corpus.rs"));
}

/// gmem: KVM's guest_memfd system in Rust.
#[derive(Debug, Parser)]
#[command(name = "gmem", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenario files and compare each line's outcome with upstream's.
    ///
    /// Exit status: 0 all passed (or depart as this kernel's probes show),
    /// 1 something failed, 2 bad input (a path or departures file that does
    /// not exist, a scenario that does not parse).
    Check {
        /// Files or folders of `.gmem` files (default: the corpus built into
        /// this binary).
        paths: Vec<PathBuf>,
        /// Which backend(s) to run on; `both` also compares them line by line.
        #[arg(long, value_enum, default_value_t = Which::Both)]
        backend: Which,
        /// Print the report as JSON on stdout (schema: docs/conformance.md).
        #[arg(long)]
        json: bool,
        /// Departures file: known kernel behaviours and their probes
        /// (default: the corpus's departures.toml, built in).
        #[arg(long, value_name = "FILE")]
        departures: Option<PathBuf>,
        /// Memory budget of each scenario run: 512M, 2G, ... (the default is
        /// stated at run time).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_memory: Option<u64>,
        /// Run the software backend as this kernel release behaves
        /// (6.18, 6.19, 7.0, 7.1, 7.2, next; default 6.18).
        #[arg(long, value_name = "RELEASE")]
        profile: Option<Release>,
    },
    /// Start a VM whose RAM is on guest_memfd, populate it from every vCPU,
    /// verify, convert and discard it, and summarise.
    Run {
        /// RAM size: bytes, or with K, M, G or T (binary units): 512M, 1G.
        #[arg(long, default_value = "1G", value_parser = run::parse_size)]
        memory: u64,
        /// vCPUs, each filling its share of RAM.
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
        /// The most RAM this run may populate (the default is stated at run time).
        #[arg(long, value_name = "SIZE", value_parser = run::parse_size)]
        max_memory: Option<u64>,
        /// Where to run: the kernel where /dev/kvm exists, else the software backend.
        #[arg(long, value_enum, default_value_t = run::BackendChoice::Auto)]
        backend: run::BackendChoice,
        /// Backing mode to ask for (auto: the most capable the host offers).
        #[arg(long, value_enum, default_value_t = run::BackingChoice::Auto)]
        backing: run::BackingChoice,
        /// Run the software backend as this kernel release (`next`: in-place conversion).
        #[arg(long, value_name = "RELEASE")]
        profile: Option<Release>,
    },
    /// Draw a memory layout: ranges, memslots, files and offsets, states, holes.
    Map(map::MapArgs),
    /// Show the host's KVM guest_memfd support (or the software backend's),
    /// and the known departures from upstream its probes find.
    Caps {
        /// Which backend to ask.
        #[arg(long, value_enum, default_value_t = One::Kvm)]
        backend: One,
        /// Print the capabilities as JSON on stdout: an object keyed by
        /// capability name.
        #[arg(long)]
        json: bool,
    },
    /// Measure every performance figure against a baseline in the same run.
    Bench {
        /// Write the report as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Draw the plots (SVG) into this folder.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Small sizes and few rounds: checks that every figure runs. The
        /// ratios are shown but not judged against the targets (which are for
        /// the full sizes): exit 0 unless a figure fails to run.
        #[arg(long)]
        quick: bool,
    },
    /// Run random scenarios on the software backend and the kernel; minimize
    /// each difference (and each panic, hang or leak) into a scenario file.
    Fuzz(fuzz::Args),
}

/// Backend choice for `check` and `fuzz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// The software backend.
    Soft,
    /// The running kernel.
    Kvm,
    /// Both, side by side.
    Both,
}

/// Backend choice for `caps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum One {
    /// The software backend.
    Soft,
    /// The running kernel.
    Kvm,
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_number(s)
        .filter(|_| !s.starts_with('-'))
        .ok_or_else(|| format!("`{s}` is not a size: write bytes, or 512M, 2G, 1T"))
}

/// The help text of `--max-memory`, with the default on this machine.
fn max_memory_help() -> String {
    let now = match mem_available() {
        Some(m) => format!("now {} of {}", Bytes(m / DEFAULT_SHARE), Bytes(m)),
        None => "MemAvailable cannot be read here: 256 MiB".to_string(),
    };
    format!(
        "Memory budget of each scenario run: 512M, 2G, ... An operation that could take a \
         scenario past it is not performed and its line is reported `over budget` \
         [default: 1/{DEFAULT_SHARE} of MemAvailable at start; {now}]"
    )
}

fn main() -> ExitCode {
    // Like any Unix filter: a closed pipe (`gmem check | head`) ends the
    // process quietly instead of making println! panic.
    // SAFETY: restores the default disposition of SIGPIPE before any thread
    // or handler exists; no Rust state depends on it.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let help = max_memory_help();
    let run_help = run::max_memory_help();
    let cmd = Cli::command()
        .mut_subcommand("check", |c| {
            c.mut_arg("max_memory", |a| {
                a.help(help.clone()).long_help(help.clone())
            })
        })
        .mut_subcommand("run", |c| {
            c.mut_arg("max_memory", |a| {
                a.help(run_help.clone()).long_help(run_help.clone())
            })
        });
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Check {
            paths,
            backend,
            json,
            departures,
            max_memory,
            profile,
        } => check(paths, backend, json, departures, max_memory, profile),
        Command::Run {
            memory,
            vcpus,
            max_memory,
            backend,
            backing,
            profile,
        } => run::run(memory, vcpus, max_memory, (backend, profile), backing),
        Command::Map(args) => map::map(args),
        Command::Caps { backend, json } => caps::caps(
            match backend {
                One::Soft => Backend::Soft,
                One::Kvm => Backend::Kvm,
            },
            json,
            corpus::FILES,
        ),
        Command::Bench { json, out, quick } => bench::bench(quick, json, out),
        Command::Fuzz(args) => fuzz::fuzz(args),
    }
}

/// The scenarios to check: the built-in corpus, or the files under `paths`.
fn sources(paths: &[PathBuf]) -> Result<Vec<Source>, String> {
    if paths.is_empty() {
        return Ok(corpus::FILES
            .iter()
            .map(|(name, text)| Source {
                name: (*name).to_string(),
                text: Ok((*text).to_string()),
            })
            .collect());
    }
    let files = collect_paths(paths).map_err(|e| {
        let missing: Vec<String> = paths
            .iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            e.to_string()
        } else {
            format!("{}: no such file or folder", missing.join(", "))
        }
    })?;
    if files.is_empty() {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(format!("no .gmem files in {}", shown.join(", ")));
    }
    Ok(files
        .iter()
        .map(|f| Source::read(f, f.display().to_string()))
        .collect())
}

/// A backend, or why it could not be opened.
type Opened = Result<Box<dyn Hypervisor>, String>;

/// Opens `backend`; the software backend as `profile` when one is given.
fn open(backend: Backend, profile: Option<Release>) -> Opened {
    match (backend, profile) {
        (Backend::Soft, Some(r)) => SoftHypervisor::with_profile(r)
            .map(|h| Box::new(h) as Box<dyn Hypervisor>)
            .map_err(|e| e.to_string()),
        (b, _) => b.open().map_err(|e| e.to_string()),
    }
}

/// What kind of input `gmem check` could not start with (`error.kind` of
/// the JSON error object, docs/conformance.md).
#[derive(Debug, Clone, Copy)]
enum InputError {
    /// Arguments that cannot go together, or a value nothing can run with.
    Arguments,
    /// A scenario path that does not exist, or has no scenario in it.
    Paths,
    /// The departures file cannot be read or does not load.
    Departures,
    /// The backend asked for alone cannot be opened.
    Backend,
}

impl InputError {
    fn kind(self) -> &'static str {
        match self {
            InputError::Arguments => "arguments",
            InputError::Paths => "paths",
            InputError::Departures => "departures",
            InputError::Backend => "backend",
        }
    }
}

fn check(
    paths: Vec<PathBuf>,
    which: Which,
    json: bool,
    departures: Option<PathBuf>,
    max_memory: Option<u64>,
    profile: Option<Release>,
) -> ExitCode {
    // Bad input is said on stderr and, with --json, as an object on stdout,
    // so that a consumer of stdout always gets one JSON value.
    let input_error = |kind: InputError, msg: String| {
        eprintln!("{}", run::wrap(&format!("gmem check: {msg}"), 100, 2));
        if json {
            #[derive(serde::Serialize)]
            struct Error<'a> {
                kind: &'a str,
                message: &'a str,
            }
            #[derive(serde::Serialize)]
            struct Failed<'a> {
                schema: &'a str,
                error: Error<'a>,
            }
            let v = Failed {
                schema: gmem::scenario::report::SCHEMA,
                error: Error {
                    kind: kind.kind(),
                    message: &msg,
                },
            };
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        ExitCode::from(2)
    };
    if let (Which::Kvm, Some(r)) = (which, profile) {
        return input_error(
            InputError::Arguments,
            format!(
                "--profile {r} runs the software backend as that release; --backend kvm runs \
                 only the running kernel (use --backend soft or both)"
            ),
        );
    }
    if let Some(m) = max_memory.filter(|m| *m < MIN_MAX_MEMORY) {
        return input_error(
            InputError::Arguments,
            format!(
                "--max-memory {}: no scenario can run in it (a VM alone takes {} on a kernel); \
                 give at least {}",
                Bytes(m),
                Bytes(KERNEL_VM_COST),
                Bytes(MIN_MAX_MEMORY)
            ),
        );
    }
    let sources = match sources(&paths) {
        Ok(s) => s,
        Err(e) => return input_error(InputError::Paths, e),
    };
    let departures = match departures {
        Some(path) => match Departures::load(&path) {
            Ok(d) => d,
            Err(e) => return input_error(InputError::Departures, format!("--departures {e}")),
        },
        None => match Departures::parse(gmem::scenario::departures::BUILTIN) {
            Ok(d) => d,
            Err(e) => {
                return input_error(InputError::Departures, format!("built-in departures: {e}"))
            }
        },
    };
    let limits = max_memory.map_or_else(Limits::for_this_machine, Limits::new);
    let wanted: &[Backend] = match which {
        Which::Soft => &[Backend::Soft],
        Which::Kvm => &[Backend::Kvm],
        Which::Both => &[Backend::Soft, Backend::Kvm],
    };
    let opened: Vec<(Backend, Opened)> = wanted.iter().map(|b| (*b, open(*b, profile))).collect();
    if which == Which::Kvm {
        if let Err(why) = &opened[0].1 {
            return input_error(
                InputError::Backend,
                format!("kvm backend not available: {why}"),
            );
        }
    }
    let checker = Checker::new(
        opened
            .iter()
            .map(|(b, r)| BackendSlot {
                name: match (b, profile) {
                    (Backend::Soft, Some(p)) => format!("soft {p}"),
                    _ => b.name().to_string(),
                },
                hv: r.as_ref().map(|h| h.as_ref()).map_err(Clone::clone),
            })
            .collect(),
        departures,
        limits,
    );
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = start;
    let report = checker.check_sources(&sources, |i, n, name| {
        if tty {
            eprint!("\r\x1b[K[{}/{n}] {name}", i + 1);
        } else if last.elapsed() > Duration::from_secs(5) {
            last = Instant::now();
            eprintln!("gmem check: {i}/{n} scenarios done, now {name}");
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("gmem check: the report does not serialize: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render(&report));
    }
    if report.input_error() {
        ExitCode::from(2)
    } else if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
