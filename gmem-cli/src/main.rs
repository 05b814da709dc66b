//! `gmem`: the command line of the gmem project.
//!
//! - `gmem check [PATHS...] [--backend soft|kvm|both] [--profile RELEASE] [--json]`
//!   runs scenario files (the corpus by default) and prints a conformance
//!   table; `--profile` runs the software backend as that kernel release.
//! - `gmem caps [--backend kvm|soft] [--json]` shows what a backend supports
//!   of guest_memfd and what that means for a VMM.
//! - `gmem fuzz [--seed N] [--time 60s|--runs N] [--backend soft|kvm|both]
//!   [--out DIR]` runs random scenarios and minimizes what differs.

#![deny(missing_docs)]

mod caps;
mod fuzz;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use gmem::scenario::{collect_files, kernel_release, render, BackendSlot, Checker, Departures};
use gmem::soft::SoftHypervisor;
use gmem::{Backend, Hypervisor, Release};

/// gmem: KVM's guest_memfd system in Rust.
#[derive(Debug, Parser)]
#[command(name = "gmem", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenario files and compare each line's outcome with its expectation.
    Check {
        /// Files or folders of `.gmem` files (default: the project's corpus, scenarios/).
        paths: Vec<PathBuf>,
        /// Which backend(s) to run on; `both` also compares them line by line.
        #[arg(long, value_enum, default_value_t = Which::Both)]
        backend: Which,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Departures file (default: departures.toml in the corpus folder).
        #[arg(long)]
        departures: Option<PathBuf>,
        /// Run the software backend as this kernel release behaves
        /// (6.18, 6.19, 7.0, 7.1, 7.2, next; default 6.18).
        #[arg(long, value_name = "RELEASE")]
        profile: Option<Release>,
    },
    /// Show the host's KVM guest_memfd support (or the software backend's).
    Caps {
        /// Which backend to ask.
        #[arg(long, value_enum, default_value_t = One::Kvm)]
        backend: One,
        /// Print the capabilities as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run random scenarios on the software backend and the kernel; minimize
    /// each difference (and each panic, hang or leak) into a scenario file.
    Fuzz {
        /// Seed of the first program; program i uses SEED + i (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Stop after this long: 60s, 5m, 1h (default 60s unless --runs is given).
        #[arg(long, value_parser = fuzz::parse_duration)]
        time: Option<Duration>,
        /// Stop after this many programs.
        #[arg(long)]
        runs: Option<u64>,
        /// soft: the software backend against a simple model; kvm: the kernel
        /// alone (panics, hangs, leaks); both: the two compared line by line.
        #[arg(long, value_enum, default_value_t = Which::Both)]
        backend: Which,
        /// Write each minimized finding here as a .gmem file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Count every difference, even one the running kernel's known
        /// departures explain (to rediscover them).
        #[arg(long)]
        ignore_departures: bool,
        /// Memory one program may make the host commit (file pages, host writes).
        #[arg(long, default_value = "32M", value_parser = fuzz::parse_size)]
        max_memory: u64,
        /// Operation lines per program at most.
        #[arg(long, default_value_t = 40)]
        max_lines: usize,
        /// Time to minimize one finding at most.
        #[arg(long, default_value = "30s", value_parser = fuzz::parse_duration)]
        minimize_time: Duration,
        /// Run the software backend as this kernel release behaves
        /// (6.18, 6.19, 7.0, 7.1, 7.2, next; default 6.18).
        #[arg(long, value_name = "RELEASE")]
        profile: Option<Release>,
    },
}

/// Backend choice for `check`.
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

fn main() -> ExitCode {
    // Like any Unix filter: a closed pipe (`gmem check | head`) ends the
    // process quietly instead of making println! panic.
    // SAFETY: restores the default disposition of SIGPIPE before any thread
    // or handler exists; no Rust state depends on it.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            paths,
            backend,
            json,
            departures,
            profile,
        } => check(paths, backend, json, departures, profile),
        Command::Caps { backend, json } => caps::caps(
            match backend {
                One::Soft => Backend::Soft,
                One::Kvm => Backend::Kvm,
            },
            json,
            &corpus_dir(),
        ),
        Command::Fuzz {
            seed,
            time,
            runs,
            backend,
            out,
            ignore_departures,
            max_memory,
            max_lines,
            minimize_time,
            profile,
        } => fuzz::fuzz(fuzz::Args {
            seed,
            time,
            runs,
            mode: match backend {
                Which::Soft => gmem::fuzz::Mode::Soft,
                Which::Kvm => gmem::fuzz::Mode::Kvm,
                Which::Both => gmem::fuzz::Mode::Both,
            },
            out,
            ignore_departures,
            max_memory,
            max_lines,
            minimize_time,
            profile,
        }),
    }
}

/// The corpus folder: next to the workspace when built from it, else ./scenarios.
fn corpus_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("scenarios")
    }
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

fn check(
    paths: Vec<PathBuf>,
    which: Which,
    json: bool,
    departures: Option<PathBuf>,
    profile: Option<Release>,
) -> ExitCode {
    let corpus = corpus_dir();
    let paths = if paths.is_empty() {
        vec![corpus.clone()]
    } else {
        paths
    };
    let mut files = Vec::new();
    for p in &paths {
        match collect_files(p) {
            Ok(f) => files.extend(f),
            Err(e) => {
                eprintln!("gmem check: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        }
    }
    if files.is_empty() {
        eprintln!(
            "gmem check: no .gmem files in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::from(2);
    }
    let dep_path = departures.unwrap_or_else(|| corpus.join("departures.toml"));
    let departures = match Departures::load(&dep_path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gmem check: departures: {e}");
            return ExitCode::from(2);
        }
    };
    let wanted: &[Backend] = match which {
        Which::Soft => &[Backend::Soft],
        Which::Kvm => &[Backend::Kvm],
        Which::Both => &[Backend::Soft, Backend::Kvm],
    };
    let opened: Vec<(Backend, Opened)> = wanted.iter().map(|b| (*b, open(*b, profile))).collect();
    if which == Which::Kvm {
        if let Err(why) = &opened[0].1 {
            eprintln!("gmem check: kvm backend not available: {why}");
            return ExitCode::from(2);
        }
    }
    let checker = Checker {
        backends: opened
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
        release: kernel_release(),
        corpus: Some(corpus),
    };
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = start;
    let report = checker.check_files(&files, |i, n, key| {
        if tty {
            eprint!("\r\x1b[K[{}/{n}] {key}", i + 1);
        } else if last.elapsed() > Duration::from_secs(5) {
            last = Instant::now();
            eprintln!("gmem check: {i}/{n} scenarios done, now {key}");
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("gmem check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", render(&report));
    }
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
