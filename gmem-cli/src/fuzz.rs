//! `gmem fuzz`: random scenarios on the software backend and the kernel,
//! differences minimized into corpus files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gmem::fuzz::campaign::file_name;
use gmem::fuzz::exec::Verdict;
use gmem::fuzz::minimize::Budget;
use gmem::fuzz::{Campaign, Config, Limits, Mode};
use gmem::scenario::report::os_error;
use gmem::Release;
use indicatif::{ProgressBar, ProgressStyle};

use crate::Which;

/// What `gmem fuzz` was asked to do.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seed of the first program; program i uses SEED + i (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this long: 60s, 5m, 1h (default 60s unless --runs is given).
    #[arg(long, value_parser = parse_duration)]
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
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    max_memory: u64,
    /// Operation lines per program at most.
    #[arg(long, default_value_t = 40)]
    max_lines: usize,
    /// Time to minimize one finding at most.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    minimize_time: Duration,
    /// Run the software backend as this kernel release behaves
    /// (6.18, 6.19, 7.0, 7.1, 7.2, next; default 6.18).
    #[arg(long, value_name = "RELEASE")]
    profile: Option<Release>,
}

/// Parses `60s`, `2m`, `1h`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (60s, 2m, 1h, 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `32M`, `1G`, `4096`, ... as the scenario language writes sizes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    gmem::scenario::parse_number(s).ok_or_else(|| format!("`{s}` is not a size (32M, 1G, 4096)"))
}

/// Output lines fit this many columns.
const WIDTH: usize = 100;

/// `text` wrapped at [`WIDTH`] columns, continuation lines indented by
/// `indent` spaces (the first line carries its own indent).
fn wrapped(text: &str, indent: usize) -> String {
    let lead = text.len() - text.trim_start().len();
    let body = crate::run::wrap(text, WIDTH - lead, indent);
    format!("{}{body}", &text[..lead])
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the campaign and prints the summary; exit status 1 when something
/// was found.
pub fn fuzz(a: Args) -> ExitCode {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_000)
    });
    let time = match (a.time, a.runs) {
        (None, None) => Some(Duration::from_secs(60)),
        (t, _) => t,
    };
    let mode = match a.backend {
        Which::Soft => Mode::Soft,
        Which::Kvm => Mode::Kvm,
        Which::Both => Mode::Both,
    };
    let config = Config {
        mode,
        limits: Limits {
            max_lines: a.max_lines.max(4),
            memory: a.max_memory,
            ..Limits::default()
        },
        leak_check: true,
        minimize: Budget {
            time: a.minimize_time,
            ..Budget::default()
        },
        soft_release: a.profile.unwrap_or(Release::DEFAULT),
        known_departures: !a.ignore_departures,
    };
    let mut c = match Campaign::new(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gmem fuzz: cannot open the backends: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &a.out {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("gmem fuzz: --out {}", os_error(dir, &e));
            return ExitCode::from(2);
        }
    }
    let backends = match mode {
        Mode::Both => "soft and kvm, compared",
        Mode::Soft => "soft, against the model",
        Mode::Kvm => "kvm",
    };
    eprintln!(
        "gmem fuzz: seed {seed}, {backends}, {} lines and {} per program at most",
        c.limits.max_lines,
        gmem::fuzz::print::size_text(c.limits.memory)
    );
    let pb = match a.runs {
        Some(n) if time.is_none() => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:24} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        _ => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    let start = Instant::now();
    let mut i = 0u64;
    loop {
        if a.runs.is_some_and(|n| i >= n)
            || time.is_some_and(|t| start.elapsed() >= t)
            || c.stopped()
        {
            break;
        }
        let s = seed.wrapping_add(i);
        i += 1;
        if let Verdict::Found(f) = c.run_seed(s) {
            if c.is_new(&f) {
                pb.println(wrapped(&format!("new: {} (seed {s})", f.summary()), 5));
            }
        }
        let (ops, all_ops) = c.coverage.ops_reached();
        let (rules, all_rules) = c.coverage.rules_reached();
        let found: u64 = c.tally.findings.values().sum();
        pb.set_message(format!(
            "{} runs, {:.1}/s, {} findings ({} kinds), ops {ops}/{all_ops}, rules {rules}/{all_rules}",
            c.tally.runs,
            c.tally.runs as f64 / start.elapsed().as_secs_f64().max(1e-3),
            found,
            c.findings.len()
        ));
        pb.inc(1);
    }
    let searched = start.elapsed();
    let findings = c.findings.clone();
    let mut reports = Vec::new();
    for (n, f) in findings.iter().enumerate() {
        pb.set_message(gmem::scenario::parse::shorten(
            &format!("minimizing {}/{}: {}", n + 1, findings.len(), f.signature),
            WIDTH - 10,
        ));
        let m = c.minimize(f);
        let text = c.corpus_file(f, &m, f.program.lines.len());
        let written = match &a.out {
            Some(dir) => {
                let path = dir.join(file_name(f));
                match std::fs::write(&path, &text) {
                    Ok(()) => Some(path.display().to_string()),
                    Err(e) => Some(format!("not written: {}", os_error(&path, &e))),
                }
            }
            None => None,
        };
        reports.push((f, m, text, written));
    }
    pb.finish_and_clear();

    let t = &c.tally;
    let rate = t.runs as f64 / searched.as_secs_f64().max(1e-3);
    println!(
        "gmem fuzz: {} programs in {:.1} s ({rate:.1} runs/s), seeds {seed}..{}, {backends}",
        t.runs,
        searched.as_secs_f64(),
        seed.wrapping_add(i.saturating_sub(1))
    );
    let skipped: u64 = t.skipped.values().sum();
    let skip_kinds: Vec<String> = t.skipped.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let found: u64 = t.findings.values().sum();
    println!(
        "{}",
        wrapped(
            &format!(
                "  agreed {}, skipped {skipped}{}, with findings {found}",
                t.agreed,
                if skip_kinds.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", skip_kinds.join(", "))
                }
            ),
            4
        )
    );
    if mode == Mode::Both {
        let shown = c.known_departures();
        let text = format!(
            "  known departures: {}",
            if a.ignore_departures {
                "ignored (--ignore-departures): every difference counts".to_string()
            } else if shown.is_empty() {
                "none shown by this kernel's probes".to_string()
            } else {
                format!(
                    "{} (shown by this kernel's probes): {} line(s) explained",
                    shown.join(", "),
                    t.known
                )
            }
        );
        println!("{}", wrapped(&text, 4));
    }
    let (ops, all_ops) = c.coverage.ops_reached();
    let (rules, all_rules) = c.coverage.rules_reached();
    println!("  operations reached {ops}/{all_ops}, rule ids {rules}/{all_rules}");
    let missed_ops = c.coverage.ops_missed();
    if !missed_ops.is_empty() {
        println!(
            "{}",
            wrapped(
                &format!("    operations not reached: {}", missed_ops.join(", ")),
                6
            )
        );
    }
    let missed_rules = c.coverage.rules_missed();
    if !missed_rules.is_empty() {
        println!(
            "{}",
            wrapped(
                &format!("    rule ids not reached: {}", missed_rules.join(" ")),
                6
            )
        );
    }
    if let Some(kib) = peak_rss_kib() {
        println!("  peak resident memory {} MiB", kib / 1024);
    }
    if reports.is_empty() {
        println!("no findings");
        return ExitCode::SUCCESS;
    }
    println!("findings ({} kinds):", reports.len());
    for (n, (f, m, text, written)) in reports.iter().enumerate() {
        let head = format!(
            "{:>3}. {} ({} program(s), first seed {})",
            n + 1,
            f.signature,
            t.findings.get(&f.signature).copied().unwrap_or(0),
            f.seed
        );
        println!("{}", wrapped(&head, 5));
        println!("{}", wrapped(&format!("     {}", f.summary()), 7));
        println!(
            "     minimized from {} to {} lines ({} runs, {:.1} s{})",
            f.program.lines.len(),
            m.program.lines.len(),
            m.tests,
            m.elapsed.as_secs_f64(),
            if m.exhausted { ", budget ran out" } else { "" }
        );
        match written {
            Some(w) => println!("{}", wrapped(&format!("     {w}"), 7)),
            None => {
                for l in text.lines() {
                    println!("       {l}");
                }
            }
        }
    }
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_summary_lines_wrap_within_100_columns_under_their_indent() {
        let rules = "LIFE-6 CREATE-5 ".repeat(20);

        let text = wrapped(&format!("    rule ids not reached: {rules}"), 6);

        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 2, "{text}");
        assert!(lines[0].starts_with("    rule ids not reached: LIFE-6"));
        for l in &lines {
            assert!(l.chars().count() <= WIDTH, "{l:?}");
        }
        assert!(lines[1].starts_with("      L") || lines[1].starts_with("      C"));
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("s").is_err());
    }
}
