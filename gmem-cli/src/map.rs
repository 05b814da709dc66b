//! `gmem map`: draws a memory layout as the memory manager built it: guest
//! physical ranges, memslots, the guest_memfd file and offset behind each,
//! private and shared ranges, holes; as text, and as SVG with `--svg`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use gmem::memory::{
    human_bytes, BackingMode, GuestRange, Layout, LayoutBuilder, MemoryManager, PageState,
};

use crate::run::{
    check_memory, manager, open, parse_range, parse_size, wrap, BackendChoice, BackingChoice,
    Failed,
};
use gmem::scenario::report::os_error;
use gmem::Release;

/// What one row of the map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hole,
    Ram {
        slot: u32,
        /// guest_memfd index and the file offset of the row's first byte.
        file: Option<(usize, u64)>,
        state: PageState,
    },
}

/// A run of guest physical memory that is one thing throughout.
#[derive(Debug, Clone, Copy)]
struct Row {
    range: GuestRange,
    kind: Kind,
}

/// The rows of `mm`'s layout: slots cut by state, and the holes between.
fn rows(mm: &MemoryManager) -> Vec<Row> {
    let states = mm.states();
    let mut rows = Vec::new();
    let mut at = 0;
    for slot in mm.layout().slots() {
        if slot.range.start.0 > at {
            rows.push(Row {
                range: GuestRange::from_bounds(at, slot.range.start.0),
                kind: Kind::Hole,
            });
        }
        let has_file = mm.file(slot.file).is_some();
        for (r, state) in &states {
            let Some(part) = r.intersect(&slot.range) else {
                continue;
            };
            let off = slot.offset.0 + (part.start.0 - slot.range.start.0);
            rows.push(Row {
                range: part,
                kind: Kind::Ram {
                    slot: slot.id,
                    file: has_file.then_some((slot.file, off)),
                    state: *state,
                },
            });
        }
        at = slot.range.start.0 + slot.range.len;
    }
    rows
}

/// Where a row's bytes live, in words.
fn lives_in(mode: BackingMode, kind: Kind) -> &'static str {
    match (mode, kind) {
        (_, Kind::Hole) => "",
        (BackingMode::Anonymous, _) => "host memory",
        (
            BackingMode::Split,
            Kind::Ram {
                state: PageState::Shared,
                ..
            },
        ) => "host memory",
        _ => "guest_memfd",
    }
}

/// The map as text, 100 columns at most.
fn text(mm: &MemoryManager, backend: &str) -> String {
    let b = mm.backing();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gmem map: {} of RAM in {} ({backend} backend)",
        human_bytes(mm.layout().size()),
        counts(mm)
    );
    let _ = writeln!(
        out,
        "backing   {}\n",
        wrap(&format!("{}: {}", b.mode, b.reason), 100, 10)
    );
    let _ = writeln!(
        out,
        "{:<27} {:>8}  {:<6} {:<29} state (where it lives)",
        "guest physical", "size", "slot", "guest_memfd [offsets)"
    );
    for row in rows(mm) {
        let (slot, file, state) = match row.kind {
            Kind::Hole => (String::new(), "hole".to_string(), String::new()),
            Kind::Ram { slot, file, state } => (
                slot.to_string(),
                file.map_or("-".into(), |(i, off)| {
                    format!("{i} [{off:#x}, {:#x})", off + row.range.len)
                }),
                format!("{state} ({})", lives_in(b.mode, row.kind)),
            ),
        };
        let line = format!(
            "{:<27} {:>8}  {slot:<6} {file:<29} {state}",
            row.range.to_string(),
            human_bytes(row.range.len)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The guest_memfd files behind the layout: none on anonymous backing.
fn file_count(mm: &MemoryManager) -> usize {
    if mm.backing().mode == BackingMode::Anonymous {
        0
    } else {
        mm.layout().files().len()
    }
}

/// `N ranges, M memslots, F guest_memfd files`: what the map shows.
fn counts(mm: &MemoryManager) -> String {
    let layout = mm.layout();
    let (ranges, slots, files) = (layout.ranges().len(), layout.slots().len(), file_count(mm));
    format!(
        "{ranges} range{}, {slots} memslot{}, {files} guest_memfd file{}",
        plural(ranges),
        plural(slots),
        plural(files)
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 30.0;
const BAR: f64 = WIDTH - 2.0 * LEFT;
const SHARED: &str = "#66bb6a";
const PRIVATE: &str = "#7e57c2";
const UNUSED: &str = "#f4f4f4";

/// Pixels a character of an 11-pixel label takes, about.
const CHAR_W: f64 = 7.0;

/// The narrowest a row of the guest physical bar is drawn: room for its
/// size label (`4 KiB`), so that a page beside gigabytes stays visible
/// and says what it is.
fn min_width(row: &Row) -> f64 {
    let label = match row.kind {
        Kind::Hole => "hole".to_string(),
        Kind::Ram { .. } => human_bytes(row.range.len),
    };
    CHAR_W * label.len() as f64 + 12.0
}

/// Pixel widths of segments: proportional to `weights` within `total`,
/// but none narrower than its `min`. When the minimums would take more
/// than half of `total`, plain proportions.
fn widths(weights: &[f64], mins: &[f64], total: f64) -> Vec<f64> {
    let mut fixed = vec![false; weights.len()];
    loop {
        let held: f64 = mins
            .iter()
            .zip(&fixed)
            .filter(|(_, f)| **f)
            .map(|(m, _)| m)
            .sum();
        let free: f64 = weights
            .iter()
            .zip(&fixed)
            .filter(|(_, f)| !**f)
            .map(|(w, _)| w)
            .sum();
        if held > total / 2.0 {
            let all: f64 = weights.iter().sum();
            return weights.iter().map(|w| w / all * total).collect();
        }
        let room = total - held;
        let mut changed = false;
        for i in 0..weights.len() {
            if !fixed[i] && free > 0.0 && weights[i] / free * room < mins[i] {
                fixed[i] = true;
                changed = true;
            }
        }
        if !changed {
            return (0..weights.len())
                .map(|i| {
                    if fixed[i] {
                        mins[i]
                    } else {
                        weights[i] / free * room
                    }
                })
                .collect();
        }
    }
}

/// x positions of every row: RAM proportional to its size, holes too but
/// never wider than a quarter of RAM (a 1 TiB gap would hide the rest),
/// and no row narrower than [`min_width`].
fn xs(rows: &[Row], ram: u64) -> Vec<(f64, f64)> {
    let weight = |r: &Row| match r.kind {
        Kind::Hole => r.range.len.min(ram / 4).max(ram / 40) as f64,
        Kind::Ram { .. } => r.range.len as f64,
    };
    let weights: Vec<f64> = rows.iter().map(weight).collect();
    let mins: Vec<f64> = rows.iter().map(min_width).collect();
    let mut x = LEFT;
    widths(&weights, &mins, BAR)
        .into_iter()
        .map(|w| {
            x += w;
            (x - w, x)
        })
        .collect()
}

/// A piecewise linear scale from values (file offsets) to x positions.
struct Axis(Vec<(u64, f64)>);

impl Axis {
    /// The scale of a file of `size` bytes drawn `px` pixels wide from
    /// [`LEFT`], cut at `cuts` (the offsets where bound pieces start and
    /// end), each piece at least `min` pixels wide.
    fn new(size: u64, px: f64, cuts: &[u64], min: f64) -> Axis {
        let mut at: Vec<u64> = cuts.iter().copied().filter(|c| *c < size).collect();
        at.push(0);
        at.push(size);
        at.sort_unstable();
        at.dedup();
        let weights: Vec<f64> = at.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
        let mins = vec![min; weights.len()];
        let mut x = LEFT;
        let mut points = vec![(0, LEFT)];
        for (w, end) in widths(&weights, &mins, px).into_iter().zip(&at[1..]) {
            x += w;
            points.push((*end, x));
        }
        Axis(points)
    }

    /// The x of `v`.
    fn x(&self, v: u64) -> f64 {
        let i = self.0.partition_point(|(p, _)| *p <= v);
        match (self.0.get(i.wrapping_sub(1)), self.0.get(i)) {
            (Some(&(p0, x0)), Some(&(p1, x1))) => {
                x0 + (v - p0) as f64 / (p1 - p0).max(1) as f64 * (x1 - x0)
            }
            (Some(&(_, x)), None) | (None, Some(&(_, x))) => x,
            (None, None) => LEFT,
        }
    }
}

/// How a label hangs from its x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    Middle,
    End,
}

impl Anchor {
    fn svg(self) -> &'static str {
        match self {
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// The row (0 or 1, below a bar) of each label at `(x, text, anchor)`:
/// the first row where it overlaps no label already there, or `None`
/// (not drawn) when it would overlap in both. The last label (the end of
/// the range) is placed first: it must show.
fn place_labels(labels: &[(f64, String, Anchor)]) -> Vec<Option<usize>> {
    let span = |(x, t, a): &(f64, String, Anchor)| {
        let w = CHAR_W * t.len() as f64;
        match a {
            Anchor::Middle => (x - w / 2.0, x + w / 2.0),
            Anchor::End => (x - w, *x),
        }
    };
    let mut taken: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut out = vec![None; labels.len()];
    let order = labels
        .len()
        .checked_sub(1)
        .into_iter()
        .chain(0..labels.len().saturating_sub(1));
    for i in order {
        let (a, b) = span(&labels[i]);
        const GAP: f64 = 10.0;
        out[i] = (0..2).find(|&r| taken[r].iter().all(|&(c, d)| b + GAP <= c || d + GAP <= a));
        if let Some(r) = out[i] {
            taken[r].push((a, b));
        }
    }
    out
}

/// Address labels below a bar whose bottom is at `y`: a tick and the
/// text, in the row [`place_labels`] gives, or nothing.
fn labels_below(labels: &[(f64, String, Anchor)], y: f64) -> String {
    let mut s = String::new();
    for ((x, text, anchor), row) in labels.iter().zip(place_labels(labels)) {
        let Some(row) = row else { continue };
        let dy = 14.0 + 13.0 * row as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#555"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="{}">{}</text>"##,
            y + dy - 10.0,
            y + dy,
            anchor.svg(),
            esc(text)
        );
    }
    s
}

/// The map as an SVG picture: host memory (split and anonymous backings)
/// above the guest physical address space, each guest_memfd below it with
/// every memslot drawn from its guest physical range to its file offsets.
fn svg(mm: &MemoryManager, backend: &str) -> String {
    let layout = mm.layout();
    let b = mm.backing();
    let rows = rows(mm);
    let xs = xs(&rows, layout.size());
    let host_lane = matches!(b.mode, BackingMode::Split | BackingMode::Anonymous);
    let (y_host, y_gpa) = (96.0, if host_lane { 200.0 } else { 110.0 });
    let lane_h = 46.0;
    let y_file0 = y_gpa + lane_h + 120.0;
    let file_pitch = 130.0;
    let nfiles = file_count(mm);
    let y_legend = y_file0 + nfiles as f64 * file_pitch + 10.0;
    let height = y_legend + 110.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">
<defs><pattern id="hatch" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="8" height="8" fill="#e0e0e0"/><line x1="0" y1="0" x2="0" y2="8" stroke="#9e9e9e" stroke-width="2"/></pattern></defs>
<rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="28" font-size="17" font-weight="bold">{}</text>"#,
        esc(&format!(
            "{} of RAM: {}",
            human_bytes(layout.size()),
            counts(mm)
        ))
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="50" font-size="13">{}</text>"#,
        esc(&format!("{} backing, {backend} backend", b.mode))
    );

    // Host memory: where shared pages live when they are not in the file.
    if host_lane {
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">host memory at each slot's userspace_addr (shared pages live here)</text>"#,
            y_host - 8.0
        );
        for (row, (x0, x1)) in rows.iter().zip(&xs) {
            let Kind::Ram { state, .. } = row.kind else {
                continue;
            };
            let fill = if state == PageState::Shared {
                SHARED
            } else {
                UNUSED
            };
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{y_host}" width="{:.1}" height="{lane_h}" fill="{fill}" stroke="#555"/>"##,
                x1 - x0
            );
            if state == PageState::Private && x1 - x0 > 90.0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777">freed (private)</text>"##,
                    (x0 + x1) / 2.0,
                    y_host + lane_h / 2.0 + 4.0
                );
            }
        }
    }

    // Guest physical address space.
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">guest physical address space</text>"#,
        y_gpa - 24.0
    );
    for (row, (x0, x1)) in rows.iter().zip(&xs) {
        let (fill, label) = match row.kind {
            Kind::Hole => ("url(#hatch)", "hole".to_string()),
            Kind::Ram { state, .. } => (
                if state == PageState::Shared {
                    SHARED
                } else {
                    PRIVATE
                },
                state.to_string(),
            ),
        };
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{y_gpa}" width="{:.1}" height="{lane_h}" fill="{fill}" stroke="#555"><title>{}</title></rect>"##,
            x1 - x0,
            esc(&format!(
                "{label} {}, {}",
                row.range,
                human_bytes(row.range.len)
            ))
        );
        let text_fill = if matches!(
            row.kind,
            Kind::Ram {
                state: PageState::Private,
                ..
            }
        ) {
            "white"
        } else {
            "black"
        };
        // The label, shortened to what fits (about 7 px a character).
        let size = human_bytes(row.range.len);
        let long = format!("{label} {size}");
        let fits = |t: &str| 7.5 * t.len() as f64 + 8.0 < x1 - x0;
        let shown = [long.as_str(), label.as_str(), size.as_str()]
            .into_iter()
            .find(|t| fits(t));
        if let Some(t) = shown {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{text_fill}">{}</text>"#,
                (x0 + x1) / 2.0,
                y_gpa + lane_h / 2.0 + 4.0,
                esc(t)
            );
        }
    }
    // The address of each row's start below the bar, and the end of the
    // last: in two rows, and left out where it would overprint another.
    let mut addrs: Vec<(f64, String, Anchor)> = rows
        .iter()
        .zip(&xs)
        .map(|(row, (x0, _))| (*x0, format!("{:#x}", row.range.start.0), Anchor::Middle))
        .collect();
    if let (Some(last), Some(&(_, x1))) = (rows.last(), xs.last()) {
        addrs.push((
            x1,
            format!("{:#x}", last.range.start.0 + last.range.len),
            Anchor::End,
        ));
    }
    s.push_str(&labels_below(&addrs, y_gpa + lane_h));
    // Slot spans above the guest physical bar.
    for slot in layout.slots() {
        let span: Vec<(f64, f64)> = rows
            .iter()
            .zip(&xs)
            .filter(|(r, _)| matches!(r.kind, Kind::Ram { slot: id, .. } if id == slot.id))
            .map(|(_, x)| *x)
            .collect();
        let (Some(first), Some(last)) = (span.first(), span.last()) else {
            continue;
        };
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{y_gpa}" width="{:.1}" height="{lane_h}" fill="none" stroke="#111" stroke-width="3"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">memslot {}</text>"##,
            first.0,
            last.1 - first.0,
            (first.0 + last.1) / 2.0,
            y_gpa - 6.0,
            slot.id
        );
    }

    // Each guest_memfd, on one scale, and every slot drawn to its offsets.
    // The connectors go first so that each file's bar covers those that
    // pass behind it on their way to a lower file.
    let largest = layout.files().iter().copied().max().unwrap_or(1).max(1);
    let file_y = |f: usize| y_file0 + f as f64 * file_pitch;
    let file_rows = || {
        rows.iter().zip(&xs).filter_map(|(row, x)| match row.kind {
            Kind::Ram {
                file: Some((f, off)),
                state,
                ..
            } if f < nfiles => Some((row, *x, f, off, state)),
            _ => None,
        })
    };
    // Each file on the scale of the largest, and no bound piece of it
    // narrower than a few pixels: a private page stays visible.
    let axes: Vec<Axis> = (0..nfiles)
        .map(|f| {
            let size = layout.files()[f];
            let cuts: Vec<u64> = file_rows()
                .filter(|(_, _, g, _, _)| *g == f)
                .flat_map(|(row, _, _, off, _)| [off, off + row.range.len])
                .collect();
            Axis::new(size, size as f64 / largest as f64 * BAR, &cuts, 12.0)
        })
        .collect();
    let fx = |f: usize, off: u64| axes[f].x(off);
    for (row, (x0, x1), f, off, _) in file_rows() {
        let (f0, f1, y) = (fx(f, off), fx(f, off + row.range.len), file_y(f));
        let _ = writeln!(
            s,
            r##"<polygon points="{x0:.1},{:.1} {x1:.1},{:.1} {f1:.1},{y:.1} {f0:.1},{y:.1}" fill="#90a4ae" fill-opacity="0.25" stroke="#90a4ae"/>"##,
            y_gpa + lane_h + 36.0,
            y_gpa + lane_h + 36.0
        );
    }
    for f in 0..nfiles {
        let size = layout.files()[f];
        let y = file_y(f);
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y:.1}" width="{:.1}" height="{lane_h}" fill="white"/>"##,
            fx(f, size) - LEFT
        );
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">guest_memfd {f} ({}, {}): file offsets</text>"#,
            y + lane_h + 44.0,
            esc(&human_bytes(size)),
            esc(&mm.file(f).map_or(String::new(), |g| g.access().to_string()))
        );
        // The offset where each slot starts, and the file's end.
        let mut offsets: Vec<(f64, String, Anchor)> = layout
            .slots()
            .iter()
            .filter(|sl| sl.file == f)
            .map(|sl| {
                (
                    fx(f, sl.offset.0),
                    format!("{:#x}", sl.offset.0),
                    Anchor::Middle,
                )
            })
            .collect();
        offsets.sort_by(|a, b| a.0.total_cmp(&b.0));
        offsets.push((fx(f, size), format!("{size:#x}"), Anchor::End));
        s.push_str(&labels_below(&offsets, y + lane_h));
    }
    for (row, _, f, off, state) in file_rows() {
        let (f0, f1, y) = (fx(f, off), fx(f, off + row.range.len), file_y(f));
        let in_file = lives_in(b.mode, row.kind) == "guest_memfd";
        let fill = match (state, in_file) {
            (_, false) => UNUSED,
            (PageState::Shared, true) => SHARED,
            (PageState::Private, true) => PRIVATE,
        };
        let _ = writeln!(
            s,
            r##"<rect x="{f0:.1}" y="{y:.1}" width="{:.1}" height="{lane_h}" fill="{fill}" stroke="#555"><title>{}</title></rect>"##,
            f1 - f0,
            esc(&format!(
                "file offsets [{off:#x}, {:#x}): {state}",
                off + row.range.len
            ))
        );
        if !in_file && f1 - f0 > 110.0 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777">empty (shared)</text>"##,
                (f0 + f1) / 2.0,
                y + lane_h / 2.0 + 4.0
            );
        }
    }
    for slot in layout.slots().iter().filter(|sl| sl.file < nfiles) {
        let (f0, f1, y) = (
            fx(slot.file, slot.offset.0),
            fx(slot.file, slot.offset.0 + slot.range.len),
            file_y(slot.file),
        );
        let _ = writeln!(
            s,
            r##"<rect x="{f0:.1}" y="{y:.1}" width="{:.1}" height="{lane_h}" fill="none" stroke="#111" stroke-width="3"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">slot {} at offset {:#x}</text>"##,
            f1 - f0,
            (f0 + f1) / 2.0,
            y - 6.0,
            slot.id,
            slot.offset.0,
        );
    }

    // Legend and the reason for the backing.
    let mut x = LEFT;
    for (fill, what) in [
        (SHARED, "shared"),
        (PRIVATE, "private"),
        ("url(#hatch)", "hole (not RAM)"),
        (UNUSED, "no memory here in this backing"),
    ] {
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{y_legend}" width="22" height="14" fill="{fill}" stroke="#555"/><text x="{}" y="{}">{what}</text>"##,
            x + 28.0,
            y_legend + 12.0
        );
        x += 60.0 + 7.0 * what.len() as f64;
    }
    for (i, l) in wrap(&format!("{}: {}", b.mode, b.reason), 140, 0)
        .lines()
        .enumerate()
    {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{:.1}" font-size="11" fill="#444">{}</text>"##,
            y_legend + 40.0 + 15.0 * i as f64,
            esc(l)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// What `gmem map` draws.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// RAM size placed around the 32-bit hole (ignored with --ram): bytes,
    /// or with K, M, G or T: 512M, 6G.
    #[arg(long, default_value = "6G", value_parser = parse_size)]
    memory: u64,
    /// An explicit RAM range GPA:SIZE (repeat for more).
    #[arg(long, value_parser = parse_range)]
    ram: Vec<GuestRange>,
    /// One guest_memfd per RAM range instead of one per VM.
    #[arg(long)]
    file_per_range: bool,
    /// Where to build the layout.
    #[arg(long, value_enum, default_value_t = BackendChoice::Soft)]
    backend: BackendChoice,
    /// Backing mode to ask for.
    #[arg(long, value_enum, default_value_t = BackingChoice::Auto)]
    backing: BackingChoice,
    /// Convert GPA:SIZE to private before drawing (repeat for more).
    #[arg(long, value_parser = parse_range)]
    private: Vec<GuestRange>,
    /// Also write the picture as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Run the software backend as this kernel release (`next`: in-place conversion).
    #[arg(long, value_name = "RELEASE")]
    profile: Option<Release>,
}

/// `gmem map`.
pub fn map(args: MapArgs) -> ExitCode {
    match map_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit("map"),
    }
}

fn map_inner(args: MapArgs) -> Result<(), Failed> {
    if args.ram.is_empty() {
        check_memory(args.memory, None)?;
    }
    let hv = open((args.backend, args.profile)).map_err(Failed::Input)?;
    let mut builder: LayoutBuilder = Layout::builder()
        .file_per_range(args.file_per_range)
        .backing(args.backing.request());
    if args.ram.is_empty() {
        builder = builder.memory(args.memory);
    }
    for r in &args.ram {
        builder = builder.ram(r.start, r.len);
    }
    let size = if args.ram.is_empty() {
        args.memory
    } else {
        args.ram.iter().fold(0u64, |a, r| a.saturating_add(r.len))
    };
    let mm = manager(&*hv, builder.build(), size)?;
    for r in &args.private {
        // A range the layout does not have, or not page aligned, is the
        // user's to fix.
        mm.convert(*r, PageState::Private).map_err(|e| {
            let m = format!("--private {r}: {e}");
            match e.rule() {
                "gmem-range" | "gmem-unbacked" => Failed::Input(m),
                _ => Failed::Run(m),
            }
        })?;
    }
    print!("{}", text(&mm, hv.name()));
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&mm, hv.name()))
            .map_err(|e| Failed::Input(format!("--svg {}", os_error(path, &e))))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gmem::memory::{BackingRequest, GuestAddress};

    fn split_two_ranges() -> MemoryManager {
        let hv = gmem::Backend::Soft.open().unwrap();
        let layout = Layout::builder()
            .memory(5 << 30)
            .backing(BackingRequest::Private)
            .build()
            .unwrap();
        let mm = MemoryManager::new(&*hv, layout).unwrap();
        for r in [(1 << 30, 1 << 30), ((4 << 30) + (1 << 29), 1 << 29)] {
            mm.convert(GuestRange::new(GuestAddress(r.0), r.1), PageState::Private)
                .unwrap();
        }
        mm
    }

    #[test]
    fn rows_cut_slots_by_state_and_show_the_hole() {
        let mm = split_two_ranges();
        let rows = rows(&mm);
        let kinds: Vec<String> = rows
            .iter()
            .map(|r| match r.kind {
                Kind::Hole => format!("hole {}", r.range),
                Kind::Ram { slot, file, state } => {
                    format!("{slot} {} {state} {:#x}", r.range, file.unwrap().1)
                }
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "0 [0x0, 0x40000000) shared 0x0",
                "0 [0x40000000, 0x80000000) private 0x40000000",
                "0 [0x80000000, 0xc0000000) shared 0x80000000",
                "hole [0xc0000000, 0x100000000)",
                "1 [0x100000000, 0x120000000) shared 0xc0000000",
                "1 [0x120000000, 0x140000000) private 0xe0000000",
                "1 [0x140000000, 0x180000000) shared 0x100000000",
            ]
        );
    }

    #[test]
    fn text_fits_100_columns() {
        let mm = split_two_ranges();
        for l in text(&mm, "soft").lines() {
            assert!(l.chars().count() <= 100, "{l:?}");
        }
    }

    /// 2 GiB, a hole, then 2 GiB with one private page at its second page:
    /// the layout that hid the page and overprinted its addresses.
    fn a_page_in_gigabytes() -> MemoryManager {
        let hv = gmem::Backend::Soft.open().unwrap();
        let layout = Layout::builder()
            .ram(GuestAddress(0), 2 << 30)
            .ram(GuestAddress(1 << 32), 2 << 30)
            .backing(BackingRequest::Private)
            .build()
            .unwrap();
        let mm = MemoryManager::new(&*hv, layout).unwrap();
        let page = GuestRange::new(GuestAddress((1 << 32) + 4096), 4096);
        mm.convert(page, PageState::Private).unwrap();
        mm
    }

    #[test]
    fn a_page_beside_gigabytes_is_wide_enough_for_its_label() {
        let mm = a_page_in_gigabytes();
        let rows = rows(&mm);

        let xs = xs(&rows, mm.layout().size());

        let page = rows
            .iter()
            .position(|r| {
                r.range.len == 4096
                    && matches!(
                        r.kind,
                        Kind::Ram {
                            state: PageState::Private,
                            ..
                        }
                    )
            })
            .unwrap();
        let (x0, x1) = xs[page];
        assert!(x1 - x0 >= min_width(&rows[page]), "{xs:?}");
        assert!((xs.last().unwrap().1 - (LEFT + BAR)).abs() < 1e-6);
        assert!(svg(&mm, "soft").contains(">4 KiB</text>"));
    }

    #[test]
    fn widths_keep_proportions_when_the_minimums_do_not_fit() {
        let w = widths(&[1.0, 1.0, 1.0, 1.0], &[400.0; 4], 1000.0);
        assert_eq!(w, [250.0; 4]);
        let w = widths(&[1.0, 1e9], &[50.0, 50.0], 1000.0);
        assert_eq!(w, [50.0, 950.0]);
    }

    #[test]
    fn address_labels_that_would_overprint_are_staggered_or_left_out() {
        let at = |x: f64, v: u64| (x, format!("{v:#x}"), Anchor::Middle);
        let labels = [
            at(500.0, 0x1_0000_0000),
            at(547.0, 0x1_0000_1000),
            at(594.0, 0x1_0000_2000),
            at(600.0, 0x1_0000_3000),
            (970.0, "0x180000000".to_string(), Anchor::End),
        ];

        let rows = place_labels(&labels);

        assert_eq!(rows, [Some(0), Some(1), Some(0), None, Some(0)]);
    }

    #[test]
    fn a_file_axis_gives_a_bound_page_a_visible_width() {
        let axis = Axis::new(4 << 30, BAR, &[2 << 30, (2 << 30) + 8192], 12.0);
        assert!(axis.x((2 << 30) + 8192) - axis.x(2 << 30) >= 12.0);
        assert_eq!(axis.x(0), LEFT);
        assert!((axis.x(4 << 30) - (LEFT + BAR)).abs() < 1e-6);
    }

    #[test]
    fn svg_draws_every_slot_and_both_states() {
        let mm = split_two_ranges();
        let svg = svg(&mm, "soft");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("memslot 0") && svg.contains("memslot 1"));
        assert!(svg.contains("slot 1 at offset 0xc0000000"));
        assert!(svg.contains(PRIVATE) && svg.contains(SHARED) && svg.contains("url(#hatch)"));
    }
}
