//! `gmem bench`: every performance figure against its baseline, measured in
//! the same run; a table, JSON (`--json FILE`) and SVG plots (`--out DIR`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use gmem::bench::{self, bytes, seconds, Report, Row, Scale, Target, Unit};
use gmem::scenario::report::{os_error, os_words};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Runs the figures and writes what was asked.
pub fn bench(quick: bool, json: Option<PathBuf>, out: Option<PathBuf>) -> ExitCode {
    let scale = if quick { Scale::Quick } else { Scale::Full };
    let bar = ProgressBar::new(bench::STEPS.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut first = true;
    let report = bench::run(scale, &mut |step| {
        if !std::mem::take(&mut first) {
            bar.inc(1);
        }
        bar.set_message(step.to_string());
    });
    bar.finish_and_clear();
    // Quick sizes are not the sizes the targets are for: report, do not judge.
    let judged = !quick;
    print!("{}", table(&report, judged));
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("gmem bench: --json {}", os_error(&path, &e));
            return ExitCode::from(2);
        }
    }
    if let Some(dir) = out {
        if let Err(e) = plots(&report, &dir) {
            let why = match e.downcast_ref::<std::io::Error>() {
                Some(io) => os_words(io),
                None => e.to_string(),
            };
            eprintln!("gmem bench: --out {}: {why}", dir.display());
            return ExitCode::from(2);
        }
        println!(
            "plots: {}, {}",
            dir.join("conversion.svg").display(),
            dir.join("access.svg").display()
        );
    }
    let failed = failed_to_run(&report, kvm_available());
    for r in &failed {
        eprintln!(
            "gmem bench: {} did not run: {}",
            r.figure,
            r.note.as_deref().unwrap_or("no reason given")
        );
    }
    if !failed.is_empty() || (judged && report.summary.missed > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Can the kvm figures run here?
fn kvm_available() -> bool {
    gmem::Backend::Kvm.open().is_ok()
}

/// The figures that should have run here and did not: every soft figure,
/// and the kvm figures where the kvm backend opens.
fn failed_to_run(report: &Report, kvm: bool) -> Vec<&Row> {
    report
        .rows
        .iter()
        .filter(|r| r.ours.is_nan())
        .filter(|r| kvm || !r.id.starts_with("kvm."))
        .collect()
}

fn value(v: f64, unit: Unit) -> String {
    match unit {
        _ if v.is_nan() => "-".into(),
        Unit::Seconds => seconds(v),
        Unit::Factor => format!("{v:.2}x"),
    }
}

fn target(t: Target) -> String {
    match t {
        Target::AtMost(x) => format!("<= {x}x"),
        Target::AtLeast(x) => format!(">= {x}x"),
        Target::Under(s) => format!("< {}", seconds(s)),
        Target::None => "-".into(),
    }
}

/// A ratio as people read it: `2.98x`; one below 0.01 as the fraction it
/// is (`1/5.2e7`), never `0.00x`.
fn ratio(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x > 0.0 && x < 0.01 {
        let inv = 1.0 / x;
        if inv < 1e4 {
            format!("1/{inv:.0}")
        } else {
            format!("1/{inv:.1e}")
        }
    } else {
        format!("{x:.2}x")
    }
}

/// The table, 100 columns wide at most, then footnotes: what each baseline
/// is and the notes. `judged`: with the target and whether it was met
/// (full sizes); else the ratios only (`--quick`).
fn table(report: &Report, judged: bool) -> String {
    let mut s = String::new();
    if judged {
        let _ = writeln!(
            s,
            "{:<52} {:>9} {:>9} {:>8} {:>8} {:>5}",
            "figure", "ours", "baseline", "ratio", "target", "met"
        );
    } else {
        let _ = writeln!(
            s,
            "{:<52} {:>9} {:>9} {:>8}",
            "figure", "ours", "baseline", "ratio"
        );
    }
    let mut notes = Vec::new();
    for r in &report.rows {
        let mut foot = Vec::new();
        if !r.baseline_is.is_empty() {
            foot.push(format!("baseline: {}", r.baseline_is));
        }
        if let Some(n) = &r.note {
            foot.push(n.clone());
        }
        let mark = if foot.is_empty() {
            String::new()
        } else {
            notes.push(foot.join("; "));
            format!(" [{}]", notes.len())
        };
        let figure = format!("{}{mark}", r.figure);
        let row = format!(
            "{figure:<52} {:>9} {:>9} {:>8}",
            value(r.ours, r.unit),
            r.baseline.map_or("-".into(), |b| value(b, r.unit)),
            r.ratio.map_or("-".into(), ratio),
        );
        if judged {
            let _ = writeln!(s, "{row} {:>8} {:>5}", target(r.target), met(r));
        } else {
            let _ = writeln!(s, "{}", row.trim_end());
        }
    }
    if judged {
        let _ = writeln!(
            s,
            "{} met, {} missed, {} without a target or not measured here",
            report.summary.met, report.summary.missed, report.summary.other
        );
    } else {
        let measured = report.rows.iter().filter(|r| !r.ours.is_nan()).count();
        let _ = writeln!(
            s,
            "--quick: {measured} of {} figures ran at small sizes; the targets are for the \
             full sizes: not judged",
            report.rows.len()
        );
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(s, "[{}] {n}", i + 1);
    }
    s
}

fn met(r: &Row) -> &'static str {
    match (r.met, &r.note) {
        (Some(true), _) => "yes",
        (Some(false), _) => "NO",
        (None, Some(_)) if r.ours.is_nan() => "skip",
        (None, _) => "-",
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// A blank 900x560 SVG drawing at `path`.
fn canvas(path: &Path) -> Result<DrawingArea<SVGBackend<'_>, Shift>, Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    Ok(root)
}

/// A chart on `root` titled `caption`, with room for the axis labels.
fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80);
    builder
}

/// Draws the legend (upper left, on a light background) and writes the file.
fn legend_and_write<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    root: &DrawingArea<SVGBackend<'a>, Shift>,
) -> PlotResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `conversion.svg` and `access.svg` into `dir`.
fn plots(report: &Report, dir: &Path) -> PlotResult {
    std::fs::create_dir_all(dir)?;
    conversion_plot(report, &dir.join("conversion.svg"))?;
    access_plot(report, &dir.join("access.svg"))?;
    Ok(())
}

/// Conversion cost against range size, log-log; modelled points dashed.
fn conversion_plot(report: &Report, path: &Path) -> PlotResult {
    let root = canvas(path)?;
    let all: Vec<f64> = report
        .conversion
        .iter()
        .flat_map(|s| s.points.iter().chain(&s.modelled).map(|p| p.y))
        .filter(|y| y.is_finite() && *y > 0.0)
        .collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if all.is_empty() {
        (1e-7, 1.0)
    } else {
        (lo / 3.0, hi * 3.0)
    };
    let mut chart = chart_builder(
        &root,
        "Memory attribute conversion: time per conversion by range size",
    )
    .build_cartesian_2d(
        (3000.0..(1u64 << 40) as f64 * 1.5).log_scale().base(16.0),
        (lo..hi).log_scale(),
    )?;
    chart
        .configure_mesh()
        .x_desc("range size")
        .y_desc("time per conversion")
        .x_label_formatter(&|x| bytes(round_pow2(*x)))
        .y_label_formatter(&|y| seconds(*y))
        .x_labels(10)
        .draw()?;
    let colors = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28)];
    for (s, color) in report.conversion.iter().zip(colors) {
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x, p.y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        if !s.modelled.is_empty() {
            let m: Vec<(f64, f64)> = s.modelled.iter().map(|p| (p.x, p.y)).collect();
            chart
                .draw_series(DashedLineSeries::new(m, 8, 6, color.stroke_width(2)))?
                .label(format!("{} (extended linearly)", s.name))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 8, y)], color.stroke_width(2))
                });
        }
    }
    legend_and_write(&mut chart, &root)
}

/// The nearest power of two, for axis labels of a log scale.
fn round_pow2(x: f64) -> u64 {
    2f64.powf(x.log2().round()) as u64
}

/// Time per access by pattern and thread count, ours and raw, log scale.
fn access_plot(report: &Report, path: &Path) -> PlotResult {
    let root = canvas(path)?;
    let cells = &report.access;
    let ys: Vec<f64> = cells
        .iter()
        .flat_map(|c| [c.ours, c.raw])
        .filter(|y| y.is_finite() && *y > 0.0)
        .collect();
    let lo = ys.iter().cloned().fold(f64::MAX, f64::min).min(1e-9) / 2.0;
    let hi = ys.iter().cloned().fold(f64::MIN, f64::max).max(1e-8) * 3.0;
    let n = cells.len().max(1);
    let labels: Vec<String> = cells
        .iter()
        .map(|c| {
            format!(
                "{}, {} thread{}",
                c.pattern,
                c.threads,
                if c.threads == 1 { "" } else { "s" }
            )
        })
        .collect();
    let mut chart = chart_builder(
        &root,
        "Guest loads of 8 bytes: time per access by pattern and threads",
    )
    .build_cartesian_2d(0.0..n as f64, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("wall time per access (all threads)")
        .y_label_formatter(&|y| seconds(*y))
        .draw()?;
    let ours = RGBColor(0x1f, 0x77, 0xb4);
    let raw = RGBColor(0x99, 0x99, 0x99);
    for (bars, color, name, shift) in [
        (
            cells.iter().map(|c| c.ours).collect::<Vec<_>>(),
            ours,
            "gmem soft vCPU",
            0.1,
        ),
        (cells.iter().map(|c| c.raw).collect(), raw, "raw loads", 0.5),
    ] {
        chart
            .draw_series(bars.iter().enumerate().map(|(i, &y)| {
                let x = i as f64 + shift;
                Rectangle::new([(x, lo), (x + 0.4, y)], color.filled())
            }))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    legend_and_write(&mut chart, &root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_fits_100_columns_and_footnotes_the_baselines() {
        let mut report = Report {
            rows: vec![
                Row::new(
                    "soft.access.hot",
                    "soft guest access, 8 bytes, hot",
                    2.3e-9,
                    Some((6e-10, "raw load from a slice")),
                    Some(3.8),
                    Unit::Seconds,
                    Target::AtMost(5.0),
                ),
                Row::skipped(
                    "kvm.access",
                    "kvm guest access, 8 bytes",
                    Target::AtMost(1.3),
                    "open /dev/kvm failed: No such file or directory".into(),
                ),
            ],
            ..Default::default()
        };
        report.summarize();

        let text = table(&report, true);

        assert!(text.lines().all(|l| l.len() <= 100), "{text}");
        assert!(text.contains("yes") && text.contains("skip"), "{text}");
        assert!(
            text.contains("[1] baseline: raw load from a slice"),
            "{text}"
        );
        assert!(text.contains("1 met, 0 missed, 1 without"), "{text}");
    }

    fn missed_at_quick_sizes() -> Report {
        let mut report = Report {
            rows: vec![Row::new(
                "soft.access.random",
                "soft guest access, random over 16 MiB",
                264e-9,
                Some((45e-9, "raw dependent random load")),
                Some(2.61),
                Unit::Seconds,
                Target::AtMost(1.2),
            )],
            ..Default::default()
        };
        report.summarize();
        report
    }

    #[test]
    fn quick_reports_ratios_without_judging_them() {
        let report = missed_at_quick_sizes();

        let text = table(&report, false);

        assert!(text.lines().next().unwrap().ends_with("ratio"), "{text}");
        assert!(!text.contains("NO") && !text.contains("met"), "{text}");
        assert!(text.contains("2.61x"), "{text}");
        assert!(text.contains("--quick: 1 of 1 figures ran"), "{text}");
        assert!(failed_to_run(&report, true).is_empty());
    }

    #[test]
    fn a_figure_that_did_not_run_fails_unless_it_needs_an_absent_kvm() {
        let mut report = missed_at_quick_sizes();
        report.rows.push(Row::skipped(
            "kvm.access",
            "kvm guest access",
            Target::None,
            "no /dev/kvm".into(),
        ));
        report.rows.push(Row::skipped(
            "soft.convert",
            "conversion",
            Target::None,
            "ENOMEM".into(),
        ));

        let without_kvm: Vec<&str> = failed_to_run(&report, false)
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        let with_kvm = failed_to_run(&report, true).len();

        assert_eq!(without_kvm, ["soft.convert"]);
        assert_eq!(with_kvm, 2);
    }

    #[test]
    fn a_tiny_ratio_reads_as_a_fraction_not_zero() {
        assert_eq!(ratio(1.74e-6 / 90.7), "1/5.2e7");
        assert_eq!(ratio(0.004), "1/250");
        assert_eq!(ratio(0.99), "0.99x");
        assert_eq!(ratio(f64::NAN), "-");
    }
}
