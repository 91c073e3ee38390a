//! `memvisor plot RUN.jsonl -o run.svg|png` and `run --plot`: one chart of a run. Host usage
//! (backed and overhead stacked), the guest's view (allocated), the guest's truth (touched,
//! written), each active-memory estimate with its 95% CI as a band and its moving averages, and
//! the phases on the time axis. Drawn as SVG with plotters; PNG is that SVG rendered by resvg
//! with the system's fonts.
//!
//! # Bounded
//!
//! Rows go into a [`Recorder`], which keeps at most [`MAX_POINTS`] points however long the run:
//! past that it keeps every second point and from then on every 2nd, 4th... row (plus always the
//! newest), so memory stays bounded and the SVG (and its PNG, which `resvg` refuses beyond a
//! million nodes) stays small. A decimated plot says so in its title ("every 4th of 9000
//! intervals drawn"). Phases are kept apart from the points, so none is lost to decimation; at
//! most [`MAX_PHASES`] are labelled, each name cut to [`MAX_LABEL_CHARS`] characters with control
//! characters replaced.
//!
//! # Partial intervals
//!
//! The run's last row is usually cut short (`partial`: a stop, or the guest finishing mid-interval).
//! Its per-interval values (the guest's touched and written pages, the active-memory estimates
//! and their averages) cover only that short length and would draw as a false drop, so they are
//! left out; its snapshot values (host usage, allocated) are drawn. A note under the legend says
//! so.
//!
//! # Reading a run
//!
//! [`read_jsonl`] reads a `memvisor run --json` file as a stream: a regular file only (a FIFO or
//! device is refused, see [`crate::files::open_regular`]), up to the size it had when opened (a
//! file still growing is read as of then), lines of at most [`MAX_LINE`] bytes. Every non-empty
//! line must be a row: a JSON object with at least `time_s`, `interval` and `phase`; anything
//! else (`{}`, `[]`, text) is an error naming the line. The plot is written with
//! [`crate::files::write_atomic`], as map files are.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use resvg::{tiny_skia, usvg};

use crate::files::{self, FileError};
use crate::row::{BETWEEN_PHASES, Row};

/// Image size, pixels.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 720;
/// The legend's panel on the right, pixels.
const LEGEND_W: u32 = 270;
const FONT: &str = "sans-serif";
/// Phase labels are staggered on up to this many lines when they would overlap.
const LABEL_LINES: usize = 3;
/// Font size of the phase labels (plotters' units).
const LABEL_SIZE: f64 = 17.0;
/// Most points a plot keeps and draws (then it decimates).
pub const MAX_POINTS: usize = 2000;
/// Most phases a plot labels.
pub const MAX_PHASES: usize = 200;
/// Phase names are cut to this many characters.
pub const MAX_LABEL_CHARS: usize = 60;
/// Longest line of a run's JSON that [`read_jsonl`] reads (a row is about 1.5 KiB).
pub const MAX_LINE: usize = 64 << 10;
/// The active-memory estimates a row may carry, in drawing order (see [`Row::actives`]).
const KINDS: [&str; 2] = ["access", "writes"];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The input or output file cannot be used (not a regular file, no directory, a failed write).
    #[error("the plot's file {0}")]
    File(#[source] FileError),
    #[error("{path} line {line}: not a row of `memvisor run --json` output: {reason}")]
    Parse {
        path: String,
        line: u64,
        reason: String,
    },
    #[error(
        "{path} line {line}: longer than {MAX_LINE} bytes: not a row of `memvisor run --json` output"
    )]
    LineTooLong { path: String, line: u64 },
    #[error("{0}: no rows to plot")]
    Empty(String),
    #[error("{0}: the plot's file name must end in .svg or .png")]
    Extension(String),
    #[error("drawing the plot: {0}")]
    Draw(String),
    #[error("rendering the plot to PNG: {0}")]
    Render(String),
}

/// Reads the rows of a `memvisor run --json` output (one JSON object per line) into a bounded
/// [`Recorder`] (see the module docs).
pub fn read_jsonl(path: &Path) -> Result<Recorder, PlotError> {
    let p = path.display().to_string();
    let f = files::open_regular(path).map_err(PlotError::File)?;
    let read_err = |source| PlotError::Read {
        path: p.clone(),
        source,
    };
    let len = f.metadata().map_err(read_err)?.len();
    let mut input = BufReader::new(f.take(len));
    let mut rec = Recorder::new(MAX_POINTS);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        number += 1;
        let got = (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(read_err)?;
        if got == 0 {
            break;
        }
        if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
            return Err(PlotError::LineTooLong {
                path: p,
                line: number,
            });
        }
        if line.trim_ascii().is_empty() {
            continue;
        }
        let row = parse_row(&line).map_err(|reason| PlotError::Parse {
            path: p.clone(),
            line: number,
            reason,
        })?;
        rec.push(&row);
    }
    if rec.is_empty() {
        return Err(PlotError::Empty(p));
    }
    Ok(rec)
}

/// One line of `run --json`: a JSON object with at least the fields every row has.
fn parse_row(line: &[u8]) -> Result<Row, String> {
    let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(fields) = &v else {
        return Err("not a JSON object".into());
    };
    if let Some(key) = ["time_s", "interval", "phase"]
        .into_iter()
        .find(|k| !fields.contains_key(*k))
    {
        return Err(format!("no \"{key}\" field"));
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Whether `path` names an SVG (false) or a PNG (true) file.
fn is_png(path: &Path) -> Result<bool, PlotError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => Ok(false),
        Some("png") => Ok(true),
        _ => Err(PlotError::Extension(path.display().to_string())),
    }
}

/// Checks, before a run, that the plot can be written to `path`: its extension, and that it
/// is a regular file or absent, in a directory that exists and takes a new file.
pub fn check_path(path: &Path) -> Result<(), PlotError> {
    is_png(path)?;
    files::check_target(path).map_err(PlotError::File)
}

/// Draws what `rec` holds to `path`, SVG or PNG by its extension (written safely: see the module
/// docs).
pub fn write(path: &Path, rec: &Recorder) -> Result<(), PlotError> {
    let png_out = is_png(path)?;
    if rec.is_empty() {
        return Err(PlotError::Empty(path.display().to_string()));
    }
    let svg = svg(&rec.series())?;
    let bytes = if png_out {
        png(&svg)?
    } else {
        svg.into_bytes()
    };
    files::write_atomic(path, |f| f.write_all(&bytes)).map_err(PlotError::File)
}

/// One active-memory estimate's series (MiB; `None` where a row lacks it).
#[derive(Debug, Default)]
pub struct ActiveSeries {
    pub kind: &'static str,
    pub estimate: Vec<Option<f64>>,
    pub ci_low: Vec<Option<f64>>,
    pub ci_high: Vec<Option<f64>>,
    pub fast: Vec<Option<f64>>,
    pub slow: Vec<Option<f64>>,
    pub max: Vec<Option<f64>>,
}

/// What the plot draws, one value per point (MiB), before any drawing: tests check these.
#[derive(Debug, Default)]
pub struct Series {
    pub time_s: Vec<f64>,
    pub configured_mib: f64,
    pub backed: Vec<Option<f64>>,
    /// Machine pages saved by page sharing (SHRDSVD), MiB.
    pub saved: Vec<Option<f64>>,
    /// Backed − saved: where the overhead is stacked from.
    pub net: Vec<Option<f64>>,
    /// Backed − saved + overhead (the top of the stack).
    pub host: Vec<Option<f64>>,
    /// Guest RAM in the VMM's swap file (`--swap`; `None` without it).
    pub swapped: Vec<Option<f64>>,
    pub allocated: Vec<Option<f64>>,
    pub touched: Vec<Option<f64>>,
    pub written: Vec<Option<f64>>,
    pub actives: Vec<ActiveSeries>,
    /// Where each phase starts (the end of the last interval of the phase before) and its name.
    pub phases: Vec<(f64, String)>,
    /// Rows recorded (intervals of the run).
    pub intervals: u64,
    /// One point drawn per this many rows (1: every row).
    pub stride: u64,
    /// Phases not labelled (beyond [`MAX_PHASES`]).
    pub phases_left_out: u64,
    /// Partial rows (whose per-interval values are not drawn) and the last one's length, s.
    pub partial: Option<(u64, f64)>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// One active-memory estimate at one point.
#[derive(Clone, Debug, Default, PartialEq)]
struct ActivePoint {
    estimate: Option<f64>,
    ci_low: Option<f64>,
    ci_high: Option<f64>,
    fast: Option<f64>,
    slow: Option<f64>,
    max: Option<f64>,
}

/// What the plot keeps of one row.
#[derive(Clone, Debug, PartialEq)]
struct Point {
    time_s: f64,
    backed: Option<f64>,
    saved: Option<f64>,
    host: Option<f64>,
    swapped: Option<f64>,
    allocated: Option<f64>,
    touched: Option<f64>,
    written: Option<f64>,
    /// By [`KINDS`].
    actives: [Option<ActivePoint>; 2],
}

impl Point {
    /// The point of `r`; a partial row's per-interval values are left out.
    fn of(r: &Row) -> Point {
        let h = r.host.as_ref();
        let whole = !r.partial;
        let truth = r.truth.as_ref().filter(|_| whole);
        let mut actives: [Option<ActivePoint>; 2] = Default::default();
        for (kind, a) in r.actives() {
            if let Some(k) = KINDS.iter().position(|x| *x == kind) {
                actives[k] = Some(if whole {
                    ActivePoint {
                        estimate: finite(a.estimate_mib),
                        ci_low: finite(a.ci_low_mib),
                        ci_high: finite(a.ci_high_mib),
                        fast: finite(a.fast_mib),
                        slow: finite(a.slow_mib),
                        max: finite(a.max_mib),
                    }
                } else {
                    ActivePoint::default()
                });
            }
        }
        Point {
            time_s: r.time_s,
            backed: h.and_then(|h| finite(h.backed_mib)),
            saved: h.and_then(|h| finite(h.shared_saved_mib)),
            host: h.and_then(|h| finite(h.backed_mib - h.shared_saved_mib + h.overhead_mib)),
            swapped: r.swap.as_ref().and_then(|s| finite(s.swapped_mib)),
            allocated: finite(r.guest.allocated_mib),
            touched: truth.and_then(|t| finite(t.touched_mib)),
            written: truth.and_then(|t| finite(t.written_mib)),
            actives,
        }
    }
}

/// A phase name fit for a label: control characters (and the two non-characters XML refuses)
/// replaced by `?`, at most [`MAX_LABEL_CHARS`] characters.
fn label(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(MAX_LABEL_CHARS)
        .map(|c| {
            if c.is_control() || matches!(c, '\u{fffe}' | '\u{ffff}') {
                '?'
            } else {
                c
            }
        })
        .collect();
    if name.chars().nth(MAX_LABEL_CHARS).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// The rows of a run, as the plot keeps them: at most `cap` points (+ the newest row), by
/// decimation (see the module docs).
#[derive(Debug)]
pub struct Recorder {
    cap: usize,
    /// One point kept per this many rows (a power of two).
    stride: u64,
    /// Rows recorded (with a valid time).
    rows: u64,
    points: Vec<Point>,
    /// The newest row, when decimation did not keep it.
    newest: Option<Point>,
    configured_mib: f64,
    phases: Vec<(f64, String)>,
    phases_left_out: u64,
    /// The phase of the last phase start seen (kept or not).
    last_phase: Option<String>,
    /// The previous row's time (0 before the first).
    prev_time: f64,
    partial: Option<(u64, f64)>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new(MAX_POINTS)
    }
}

impl Recorder {
    /// An empty recorder keeping at most `cap` points (at least 2).
    pub fn new(cap: usize) -> Recorder {
        Recorder {
            cap: cap.max(2),
            stride: 1,
            rows: 0,
            points: Vec::new(),
            newest: None,
            configured_mib: 0.0,
            phases: Vec::new(),
            phases_left_out: 0,
            last_phase: None,
            prev_time: 0.0,
            partial: None,
        }
    }

    /// Whether no row was recorded.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows recorded (rows whose time is not a number are left out).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Points kept (at most the cap, plus the newest row).
    pub fn points(&self) -> usize {
        self.points.len() + usize::from(self.newest.is_some())
    }

    /// Records one row.
    pub fn push(&mut self, r: &Row) {
        if !r.time_s.is_finite() {
            return;
        }
        if self.rows == 0 {
            self.configured_mib = r.configured_mib;
        }
        // A row between two phases ("-") starts none; the next phase starts after it.
        if r.phase != BETWEEN_PHASES {
            let name = label(&r.phase);
            if self.last_phase.as_deref() != Some(name.as_str()) {
                if self.phases.len() < MAX_PHASES {
                    self.phases.push((self.prev_time, name.clone()));
                } else {
                    self.phases_left_out += 1;
                }
                self.last_phase = Some(name);
            }
        }
        if r.partial {
            let n = self.partial.map_or(0, |(n, _)| n);
            self.partial = Some((n + 1, r.length_s));
        }
        self.prev_time = r.time_s;
        let p = Point::of(r);
        let i = self.rows;
        self.rows += 1;
        if !i.is_multiple_of(self.stride) {
            self.newest = Some(p);
            return;
        }
        self.points.push(p);
        self.newest = None;
        if self.points.len() > self.cap {
            // Keep every second point: rows at multiples of twice the stride.
            if self.points.len().is_multiple_of(2) {
                self.newest = self.points.last().cloned();
            }
            let mut k = 0usize;
            self.points.retain(|_| {
                k += 1;
                k % 2 == 1
            });
            self.stride *= 2;
        }
    }

    /// What the plot draws.
    pub fn series(&self) -> Series {
        let mut s = Series {
            configured_mib: self.configured_mib,
            phases: self.phases.clone(),
            intervals: self.rows,
            stride: self.stride,
            phases_left_out: self.phases_left_out,
            partial: self.partial,
            ..Series::default()
        };
        let mut actives: [Option<ActiveSeries>; 2] = Default::default();
        let points = self.points.iter().chain(&self.newest);
        for (i, p) in points.enumerate() {
            s.time_s.push(p.time_s);
            s.backed.push(p.backed);
            s.saved.push(p.saved);
            s.net
                .push(p.backed.zip(p.saved).map(|(b, v)| b - v).or(p.backed));
            s.host.push(p.host);
            s.swapped.push(p.swapped);
            s.allocated.push(p.allocated);
            s.touched.push(p.touched);
            s.written.push(p.written);
            for (k, a) in p.actives.iter().enumerate() {
                let Some(a) = a else { continue };
                let x = actives[k].get_or_insert_with(|| ActiveSeries {
                    kind: KINDS[k],
                    ..ActiveSeries::default()
                });
                x.pad(i);
                x.estimate.push(a.estimate);
                x.ci_low.push(a.ci_low);
                x.ci_high.push(a.ci_high);
                x.fast.push(a.fast);
                x.slow.push(a.slow);
                x.max.push(a.max);
            }
        }
        let n = s.time_s.len();
        for mut x in actives.into_iter().flatten() {
            x.pad(n);
            s.actives.push(x);
        }
        s
    }
}

impl ActiveSeries {
    /// Pads every series with `None` to `len` values (rows that lacked this estimate).
    fn pad(&mut self, len: usize) {
        for v in [
            &mut self.estimate,
            &mut self.ci_low,
            &mut self.ci_high,
            &mut self.fast,
            &mut self.slow,
            &mut self.max,
        ] {
            v.resize(len, None);
        }
    }
}

/// The series of `rows`, every row kept; rows with a time that is not a number are left out.
pub fn series(rows: &[Row]) -> Series {
    let mut rec = Recorder::new(usize::MAX);
    for r in rows {
        rec.push(r);
    }
    rec.series()
}

/// Runs of consecutive known points.
fn segments<T: Copy>(t: &[f64], v: &[Option<T>]) -> Vec<Vec<(f64, T)>> {
    let mut out: Vec<Vec<(f64, T)>> = Vec::new();
    let mut cur = Vec::new();
    for (&t, v) in t.iter().zip(v) {
        match v {
            Some(v) => cur.push((t, *v)),
            None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A band between two series, as polygons over runs where both are known: along the highs,
/// then back along the lows.
fn bands(t: &[f64], low: &[Option<f64>], high: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let both: Vec<Option<(f64, f64)>> = low.iter().zip(high).map(|(l, h)| l.zip(*h)).collect();
    segments(t, &both)
        .into_iter()
        .map(|run| {
            let mut poly: Vec<(f64, f64)> = run.iter().map(|&(t, (_, h))| (t, h)).collect();
            poly.extend(run.iter().rev().map(|&(t, (l, _))| (t, l)));
            poly
        })
        .collect()
}

/// Colours of an estimate's kind: estimate, fast, slow, max.
fn palette(kind: &str) -> [RGBColor; 4] {
    match kind {
        "writes" => [
            RGBColor(203, 24, 29),
            RGBColor(252, 146, 114),
            RGBColor(165, 15, 21),
            RGBColor(103, 0, 13),
        ],
        _ => [
            RGBColor(106, 81, 163),
            RGBColor(188, 189, 220),
            RGBColor(84, 39, 143),
            RGBColor(63, 0, 125),
        ],
    }
}

const BACKED: RGBColor = RGBColor(107, 174, 214);
const OVERHEAD: RGBColor = RGBColor(253, 174, 107);
const HOST: RGBColor = RGBColor(8, 69, 148);
const SWAPPED: RGBColor = RGBColor(128, 0, 128);
const TOUCHED: RGBColor = RGBColor(65, 171, 93);
const WRITTEN: RGBColor = RGBColor(0, 90, 50);
const PHASE: RGBColor = RGBColor(120, 120, 120);

/// How a legend entry is marked.
enum Mark {
    Fill(RGBAColor),
    Line(RGBColor, u32),
    Dashed(RGBColor, u32),
    Heading,
}

/// The plot's title: the guest, the run's length, and the decimation if any.
fn title(s: &Series) -> String {
    let mut t = format!(
        "memvisor: {:.0} MiB guest, {} intervals",
        s.configured_mib, s.intervals
    );
    if s.stride > 1 {
        t = format!(
            "memvisor: {:.0} MiB guest, every {} of {} intervals drawn",
            s.configured_mib,
            ordinal(s.stride),
            s.intervals
        );
    }
    t
}

/// `2nd`, `4th`, `1024th`...
fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Notes under the legend: what the plot leaves out, one short line each.
fn notes(s: &Series) -> Vec<String> {
    let mut v = Vec::new();
    match s.partial {
        Some((1, len)) => {
            v.push(format!("last interval partial ({len:.3} s):"));
            v.push("its per-interval values not drawn".into());
        }
        Some((n, _)) => {
            v.push(format!("{n} partial intervals:"));
            v.push("their per-interval values not drawn".into());
        }
        None => {}
    }
    if s.phases_left_out > 0 {
        v.push(format!("{} more phases not labelled", s.phases_left_out));
    }
    v
}

/// The SVG of the plot of `s`.
pub fn svg(s: &Series) -> Result<String, PlotError> {
    if s.time_s.is_empty() {
        return Err(PlotError::Draw("no row with a valid time".into()));
    }
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, s).map_err(|e| PlotError::Draw(e.to_string()))?;
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    Ok(drop_empty_strokes(&buf))
}

/// Drops polylines whose points are all the same pixel (plotters' dashes make a few): they draw
/// nothing and renderers warn about them.
fn drop_empty_strokes(svg: &str) -> String {
    let empty = |line: &str| {
        let Some(rest) = line.trim_start().strip_prefix("<polyline") else {
            return false;
        };
        let Some((_, pts)) = rest.split_once("points=\"") else {
            return false;
        };
        let mut p = pts.split('"').next().unwrap_or("").split_whitespace();
        let first = p.next();
        first.is_some() && p.all(|q| Some(q) == first)
    };
    let mut out: String = svg
        .lines()
        .filter(|l| !empty(l))
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &Series) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, legend) = root.split_horizontally(WIDTH - LEGEND_W);
    let t = &s.time_s;
    let xmax = t.iter().cloned().fold(0.0, f64::max).max(1e-3);
    let mut ymax: f64 = 1.0;
    for v in [&s.host, &s.swapped, &s.allocated, &s.touched, &s.written] {
        ymax = ymax.max(v.iter().flatten().cloned().fold(0.0, f64::max));
    }
    for a in &s.actives {
        for v in [&a.ci_high, &a.max, &a.estimate] {
            ymax = ymax.max(v.iter().flatten().cloned().fold(0.0, f64::max));
        }
    }
    // Head-room for the phase labels.
    let ymax = ymax * 1.25;

    let mut chart = ChartBuilder::on(&left)
        .caption(title(s), (FONT, 26))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("MiB")
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 16))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&|v| {
            if xmax >= 5.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;

    let mut entries: Vec<(String, Mark)> = Vec::new();

    // Host usage: backed, with overhead stacked on top, and the total.
    entries.push(("host usage".into(), Mark::Heading));
    for seg in segments(t, &s.backed) {
        chart.draw_series(AreaSeries::new(seg, 0.0, BACKED.mix(0.45)))?;
    }
    for poly in bands(t, &s.net, &s.host) {
        chart.draw_series(std::iter::once(Polygon::new(poly, OVERHEAD.mix(0.6))))?;
    }
    for seg in segments(t, &s.host) {
        chart.draw_series(LineSeries::new(seg, HOST.stroke_width(3)))?;
    }
    entries.push(("backed guest pages".into(), Mark::Fill(BACKED.mix(0.45))));
    entries.push((
        "VMM overhead (stacked)".into(),
        Mark::Fill(OVERHEAD.mix(0.6)),
    ));
    let sharing = s.saved.iter().any(|v| v.is_some_and(|v| v > 0.0));
    if sharing {
        for seg in segments(t, &s.saved) {
            chart.draw_series(DashedLineSeries::new(seg, 2, 3, HOST.stroke_width(2)))?;
        }
        entries.push(("saved by page sharing".into(), Mark::Dashed(HOST, 2)));
        entries.push((
            "host = backed − saved + overhead".into(),
            Mark::Line(HOST, 3),
        ));
    } else {
        entries.push(("host = backed + overhead".into(), Mark::Line(HOST, 3)));
    }
    if s.swapped.iter().any(Option::is_some) {
        for seg in segments(t, &s.swapped) {
            chart.draw_series(DashedLineSeries::new(seg, 4, 4, SWAPPED.stroke_width(2)))?;
        }
        entries.push(("swapped by the VMM".into(), Mark::Dashed(SWAPPED, 2)));
    }

    // The guest's view and its truth.
    entries.push(("guest's view".into(), Mark::Heading));
    for seg in segments(t, &s.allocated) {
        chart.draw_series(DashedLineSeries::new(seg, 8, 5, BLACK.stroke_width(2)))?;
    }
    entries.push(("allocated".into(), Mark::Dashed(BLACK, 2)));
    let truth_at = entries.len();
    // Each active-memory estimate: CI band, estimate, averages.
    for a in &s.actives {
        let [est, fast, slow, max] = palette(a.kind);
        entries.push((format!("active ({}), sampled", a.kind), Mark::Heading));
        for poly in bands(t, &a.ci_low, &a.ci_high) {
            chart.draw_series(std::iter::once(Polygon::new(poly, est.mix(0.18))))?;
        }
        for seg in segments(t, &a.estimate) {
            chart.draw_series(LineSeries::new(seg, est.stroke_width(2)).point_size(3))?;
        }
        for seg in segments(t, &a.fast) {
            chart.draw_series(LineSeries::new(seg, fast.stroke_width(2)))?;
        }
        for seg in segments(t, &a.slow) {
            chart.draw_series(DashedLineSeries::new(seg, 6, 4, slow.stroke_width(1)))?;
        }
        for seg in segments(t, &a.max) {
            chart.draw_series(DashedLineSeries::new(seg, 2, 3, max.stroke_width(2)))?;
        }
        entries.push(("estimate, 95% CI band".into(), Mark::Fill(est.mix(0.18))));
        entries.push(("estimate (per interval)".into(), Mark::Line(est, 2)));
        entries.push(("fast average".into(), Mark::Line(fast, 2)));
        entries.push(("slow average".into(), Mark::Dashed(slow, 1)));
        entries.push(("max of the averages".into(), Mark::Dashed(max, 2)));
    }

    // The truth last, so that it shows over the estimates that track it.
    for seg in segments(t, &s.touched) {
        chart.draw_series(LineSeries::new(seg, TOUCHED.stroke_width(2)))?;
    }
    for seg in segments(t, &s.written) {
        chart.draw_series(DashedLineSeries::new(seg, 4, 4, WRITTEN.stroke_width(2)))?;
    }
    entries.splice(
        truth_at..truth_at,
        [
            ("guest truth (exact)".into(), Mark::Heading),
            ("touched".into(), Mark::Line(TOUCHED, 2)),
            ("written".into(), Mark::Dashed(WRITTEN, 2)),
        ],
    );

    // Where the guest's allocated list shrinks: the guest freed memory (the host is not told).
    let note_font = (FONT, 16).into_font().color(&BLACK);
    for i in 1..t.len() {
        if let (Some(a), Some(b)) = (s.allocated[i - 1], s.allocated[i])
            && a - b >= 1.0
        {
            let (x, y) = chart.backend_coord(&((t[i - 1] + t[i]) / 2.0, (a + b) / 2.0));
            root.draw(&Text::new(
                format!("guest frees {:.0} MiB", a - b),
                (x + 10, y - 8),
                note_font.clone(),
            ))?;
        }
    }

    // Phase boundaries and labels, staggered so that labels never overlap.
    let label_font = (FONT, LABEL_SIZE).into_font().color(&RGBColor(60, 60, 60));
    let (_, top) = chart.backend_coord(&(0.0, ymax));
    let (right, _) = chart.backend_coord(&(xmax, 0.0));
    let mut line_ends = [i32::MIN; LABEL_LINES];
    for (start, name) in &s.phases {
        if *start > 0.0 {
            chart.draw_series(DashedLineSeries::new(
                [(*start, 0.0), (*start, ymax)],
                3,
                3,
                PHASE.stroke_width(1),
            ))?;
        }
        let (x, _) = chart.backend_coord(&(*start, 0.0));
        // plotters draws text at size / 1.24 pixels; DejaVu Sans averages about 0.55 em per
        // character: err on the wide side.
        let w = (LABEL_SIZE / 1.24 * 0.62 * name.chars().count() as f64) as i32;
        let x = (x + 4).min(right - w - 2);
        let line = (0..LABEL_LINES)
            .find(|&l| line_ends[l] + 8 <= x)
            .unwrap_or_else(|| (0..LABEL_LINES).min_by_key(|&l| line_ends[l]).unwrap_or(0));
        line_ends[line] = x + w;
        root.draw(&Text::new(
            name.clone(),
            (x, top + 6 + 18 * line as i32),
            label_font.clone(),
        ))?;
    }

    // The legend, in its own panel so that it never covers data.
    let heading = (FONT, 19).into_font().color(&BLACK);
    let text = (FONT, 17).into_font().color(&RGBColor(30, 30, 30));
    let mut y = 70;
    for (label, mark) in entries {
        match mark {
            Mark::Heading => {
                y += 8;
                legend.draw(&Text::new(label, (10, y), heading.clone()))?;
            }
            Mark::Fill(c) => {
                legend.draw(&Rectangle::new([(14, y + 2), (44, y + 14)], c.filled()))?;
                legend.draw(&Text::new(label, (54, y), text.clone()))?;
            }
            Mark::Line(c, w) => {
                legend.draw(&PathElement::new(
                    vec![(14, y + 8), (44, y + 8)],
                    c.stroke_width(w),
                ))?;
                legend.draw(&Text::new(label, (54, y), text.clone()))?;
            }
            Mark::Dashed(c, w) => {
                for x0 in [14, 25, 36] {
                    legend.draw(&PathElement::new(
                        vec![(x0, y + 8), (x0 + 6, y + 8)],
                        c.stroke_width(w),
                    ))?;
                }
                legend.draw(&Text::new(label, (54, y), text.clone()))?;
            }
        }
        y += 22;
    }
    let note = (FONT, 15).into_font().color(&RGBColor(90, 90, 90));
    y += 12;
    for line in notes(s) {
        legend.draw(&Text::new(line, (10, y), note.clone()))?;
        y += 18;
    }
    Ok(())
}

/// Renders an SVG to PNG with the system's fonts.
pub fn png(svg: &str) -> Result<Vec<u8>, PlotError> {
    let mut opt = usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    if db.is_empty() {
        return Err(PlotError::Render(
            "no fonts found on this system (install e.g. fonts-dejavu-core), or plot to .svg"
                .into(),
        ));
    }
    let sans = usvg::fontdb::Query {
        families: &[usvg::fontdb::Family::SansSerif],
        ..Default::default()
    };
    if db.query(&sans).is_none() {
        let family = db
            .faces()
            .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
            .min_by_key(|name| (!name.contains("Sans"), name.len()));
        if let Some(f) = family {
            db.set_sans_serif_family(f);
        }
    }
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| PlotError::Render(e.to_string()))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| PlotError::Render(format!("bad image size {size:?}")))?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|e| PlotError::Render(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{Active, GuestView, HostUsage, Truth};

    /// A run: allocate 96, write 64 for 3 intervals, free 80, idle; host usage stays at 64.
    fn rows() -> Vec<Row> {
        (0..8)
            .map(|i| {
                let writing = i < 3;
                let mut r = Row {
                    time_s: (i + 1) as f64,
                    interval: i,
                    phase: if writing { "touch 64M" } else { "idle 5s" }.into(),
                    configured_mib: 256.0,
                    guest: GuestView {
                        allocated_mib: if writing { 96.0 } else { 16.0 },
                        ..GuestView::default()
                    },
                    host: Some(HostUsage {
                        host_mib: 68.0,
                        backed_mib: 64.0,
                        overhead_mib: 4.0,
                        ..HostUsage::default()
                    }),
                    active_writes: Some(Active {
                        n: 1000,
                        estimate_mib: if writing { 63.0 } else { 0.5 },
                        ci_low_mib: if writing { 57.0 } else { 0.0 },
                        ci_high_mib: if writing { 70.0 } else { 1.5 },
                        fast_mib: 30.0,
                        slow_mib: 40.0,
                        max_mib: 40.0,
                        ..Active::default()
                    }),
                    ..Row::default()
                };
                if i == 3 {
                    r.phase = BETWEEN_PHASES.into();
                }
                if i != 5 {
                    r.attach_truth(Truth {
                        touched_mib: if writing { 64.0 } else { 0.0 },
                        written_mib: if writing { 64.0 } else { 0.0 },
                        ..Truth::default()
                    });
                }
                r
            })
            .collect()
    }

    #[test]
    fn series_follow_the_rows() {
        let mut rs = rows();
        rs[6].time_s = f64::NAN;
        let s = series(&rs);
        assert_eq!(s.time_s.len(), 7);
        assert_eq!(s.host[0], Some(68.0));
        assert_eq!(s.backed[4], Some(64.0));
        assert_eq!(s.allocated[3], Some(16.0));
        // The row without truth leaves a gap instead of a zero.
        assert_eq!(s.touched[5], None);
        assert_eq!(s.written[4], Some(0.0));
        assert_eq!(s.actives.len(), 1);
        assert_eq!(s.actives[0].kind, "writes");
        assert_eq!(s.actives[0].ci_high[0], Some(70.0));
        assert_eq!(s.actives[0].estimate.len(), 7);
        assert_eq!(
            s.phases,
            [(0.0, "touch 64M".to_string()), (4.0, "idle 5s".to_string())]
        );
        assert_eq!(
            segments(&s.time_s, &s.touched),
            [
                vec![
                    (1.0, 64.0),
                    (2.0, 64.0),
                    (3.0, 64.0),
                    (4.0, 0.0),
                    (5.0, 0.0)
                ],
                vec![(8.0, 0.0)]
            ]
        );
    }

    #[test]
    fn rows_without_an_estimate_draw_no_estimate() {
        let mut rs = rows();
        for r in &mut rs {
            r.active_writes = None;
        }
        let s = series(&rs);
        assert!(s.actives.is_empty());
        let svg = svg(&s).unwrap();
        assert!(!svg.contains("active (writes)"));
        assert!(svg.contains("backed guest pages"));
    }

    #[test]
    fn the_svg_parses_and_the_png_is_a_picture_of_the_expected_size() {
        let svg = svg(&series(&rows())).unwrap();
        let tree = usvg::Tree::from_str(&svg, &usvg::Options::default()).unwrap();
        assert_eq!(tree.size().to_int_size().width(), WIDTH);
        assert_eq!(tree.size().to_int_size().height(), HEIGHT);
        for label in [
            "time (s)",
            "MiB",
            "touch 64M",
            "idle 5s",
            "guest frees 80 MiB",
        ] {
            assert!(svg.contains(label), "no {label:?} in the SVG");
        }
        let png = png(&svg).unwrap();
        let img = tiny_skia::Pixmap::decode_png(&png).unwrap();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        let px = img.pixels();
        let white = px
            .iter()
            .filter(|p| p.red() == 255 && p.green() == 255 && p.blue() == 255)
            .count();
        let colours: std::collections::HashSet<_> =
            px.iter().map(|p| (p.red(), p.green(), p.blue())).collect();
        // Mostly background, but a tenth or more is drawn, in many colours.
        assert!(white < px.len() * 9 / 10, "{white} of {} white", px.len());
        assert!(white > px.len() / 3, "{white} of {} white", px.len());
        assert!(colours.len() > 50, "{} colours", colours.len());
        // The backed area's colour is there (blended with white). In u16: a red of 216 or more
        // plus 40 overflows a u8 (a panic in debug builds, a wrong answer in release).
        assert!(px.iter().any(|p| bluish(p.red(), p.green(), p.blue())));
    }

    /// Whether a pixel is of the backed area's blue (blended with white).
    fn bluish(red: u8, green: u8, blue: u8) -> bool {
        u16::from(blue) > u16::from(red) + 40 && green > red
    }

    #[test]
    fn the_colour_test_does_not_overflow() {
        assert!(!bluish(250, 250, 255), "white-ish is not blue");
        assert!(!bluish(255, 255, 255));
        assert!(bluish(107, 174, 214));
        assert!(!bluish(220, 10, 255), "not greener than red");
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.jsonl");
        std::fs::write(&p, "").unwrap();
        assert!(matches!(read_jsonl(&p), Err(PlotError::Empty(_))));
        let good = serde_json::to_string(&rows()[0]).unwrap();
        std::fs::write(&p, format!("{good}\n  time phase cfg\n")).unwrap();
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("--json"), "{e}");
        std::fs::write(&p, format!("{good}\n\n{good}\n")).unwrap();
        assert_eq!(read_jsonl(&p).unwrap().rows(), 2);
        // `{}` and `[]` parse as rows full of defaults: refused, naming the line and why.
        for (bad, why) in [
            ("{}", "no \"time_s\" field"),
            ("[]", "not a JSON object"),
            ("[1, 2]", "not a JSON object"),
            ("{\"time_s\": 1, \"interval\": 0}", "no \"phase\" field"),
            ("\"text\"", "not a JSON object"),
        ] {
            std::fs::write(&p, format!("{good}\n{good}\n{bad}\n")).unwrap();
            let e = read_jsonl(&p).unwrap_err().to_string();
            assert!(e.contains("line 3") && e.contains(why), "{bad}: {e}");
        }
        // A line past the cap is refused without reading it whole; a FIFO without blocking.
        std::fs::write(&p, format!("{good}\n{}\n", "x".repeat(MAX_LINE + 10))).unwrap();
        assert!(matches!(
            read_jsonl(&p),
            Err(PlotError::LineTooLong { line: 2, .. })
        ));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path in our temporary directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_jsonl(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
        let e = read_jsonl(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
        let e = check_path(Path::new("run.jpg")).unwrap_err().to_string();
        assert!(e.contains(".svg or .png"), "{e}");
        assert!(check_path(Path::new("RUN.PNG")).is_ok());
        assert!(matches!(
            write(&dir.path().join("x.svg"), &Recorder::default()),
            Err(PlotError::Empty(_))
        ));
        let e = check_path(&dir.path().join("missing/run.svg"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn plot_output_never_follows_links_nor_writes_into_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut rec = Recorder::default();
        for r in rows() {
            rec.push(&r);
        }
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.join("link.svg");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let dangling = d.join("dangling.svg");
        std::os::unix::fs::symlink(d.join("created-through-link"), &dangling).unwrap();
        let fifo = d.join("fifo.svg");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path in our temporary directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sub = d.join("sub.svg");
        std::fs::create_dir(&sub).unwrap();
        let node = d.join("null.png");
        let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path in our temporary directory; only an entry is made.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
        for (p, what) in [
            (&link, "symbolic link"),
            (&dangling, "symbolic link"),
            (&fifo, "FIFO"),
            (&sub, "directory"),
            (&node, "character device"),
        ] {
            let e = check_path(p).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
            let e = write(p, &rec).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!d.join("created-through-link").exists());
        let out = d.join("run.svg");
        write(&out, &rec).unwrap();
        assert!(std::fs::read_to_string(&out).unwrap().contains("<svg"));
    }

    #[test]
    fn control_characters_never_reach_the_svg() {
        let mut rs = rows();
        rs[0].phase = "touch\u{7}64M\u{1b}[31m <b>&\u{fffe}".into();
        rs[4].phase = "x".repeat(500);
        let s = series(&rs);
        assert_eq!(s.phases[0].1, "touch?64M?[31m <b>&?");
        assert_eq!(s.phases[2].1.chars().count(), MAX_LABEL_CHARS);
        assert!(s.phases[2].1.ends_with('…'));
        let svg = svg(&s).unwrap();
        assert!(
            !svg.chars().any(|c| c.is_control() && c != '\n'),
            "raw control characters"
        );
        assert!(svg.contains("&lt;b&gt;&amp;"));
        usvg::Tree::from_str(&svg, &usvg::Options::default()).expect("the SVG parses");
    }

    /// A row of a long run: `i` seconds in, with an estimate and the truth.
    fn long_row(i: u64) -> Row {
        let mut r = rows()[0].clone();
        r.time_s = (i + 1) as f64;
        r.interval = i;
        r.length_s = 1.0;
        r.phase = format!("phase {}", i / 1000);
        r
    }

    #[test]
    fn the_recorder_stays_bounded_and_keeps_the_newest_row() {
        let mut rec = Recorder::new(100);
        for i in 0..100_000 {
            rec.push(&long_row(i));
            assert!(rec.points() <= 101, "{} points after {i}", rec.points());
        }
        assert_eq!(rec.rows(), 100_000);
        let s = rec.series();
        assert_eq!(s.intervals, 100_000);
        assert!(
            s.stride >= 1000 && s.stride.is_power_of_two(),
            "{}",
            s.stride
        );
        // Evenly spaced, from the first row to the newest.
        assert_eq!(s.time_s[0], 1.0);
        assert_eq!(*s.time_s.last().unwrap(), 100_000.0);
        let gaps: Vec<f64> = s.time_s.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps[..gaps.len() - 1].iter().all(|g| *g == s.stride as f64),
            "{gaps:?}"
        );
        // Every phase start is kept, however few rows of it were kept.
        assert_eq!(s.phases.len(), 100);
        assert_eq!(s.phases[1], (1000.0, "phase 1".to_string()));
        assert!(title(&s).contains(&format!(
            "every {} of 100000 intervals drawn",
            ordinal(s.stride)
        )));
        // Phases past the cap are counted, not kept.
        let mut rec = Recorder::new(10);
        for i in 0..1000 {
            let mut r = long_row(i);
            r.phase = format!("p{i}");
            rec.push(&r);
        }
        let s = rec.series();
        assert_eq!(s.phases.len(), MAX_PHASES);
        assert_eq!(s.phases_left_out, 1000 - MAX_PHASES as u64);
        assert!(notes(&s).iter().any(|n| n.contains("800 more phases")));
        assert_eq!(
            (ordinal(1), ordinal(2), ordinal(3), ordinal(4)),
            ("1st".into(), "2nd".into(), "3rd".into(), "4th".into())
        );
        assert_eq!(
            (ordinal(11), ordinal(12), ordinal(22), ordinal(1024)),
            ("11th".into(), "12th".into(), "22nd".into(), "1024th".into())
        );
    }

    #[test]
    fn a_large_run_renders_to_png() {
        // Before the recorder a run this long gave an SVG of over a million nodes, which resvg
        // refuses ("nodes limit reached").
        let mut rec = Recorder::default();
        for i in 0..300_000 {
            rec.push(&long_row(i));
        }
        assert!(rec.points() <= MAX_POINTS + 1);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run.png");
        write(&out, &rec).unwrap();
        let img = tiny_skia::Pixmap::decode_png(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
    }

    #[test]
    fn a_partial_last_interval_draws_no_false_drop() {
        let mut rs = rows();
        let last = rs.last_mut().unwrap();
        last.partial = true;
        last.length_s = 0.02;
        last.active_writes.as_mut().unwrap().estimate_mib = 0.01;
        let s = series(&rs);
        let n = s.time_s.len();
        // The snapshot values are drawn, the per-interval ones are not.
        assert_eq!(s.host[n - 1], Some(68.0));
        assert_eq!(s.allocated[n - 1], Some(16.0));
        assert_eq!(s.touched[n - 1], None);
        assert_eq!(s.written[n - 1], None);
        assert_eq!(s.actives[0].estimate[n - 1], None);
        assert_eq!(s.actives[0].fast[n - 1], None);
        assert_eq!(s.actives[0].estimate[n - 2], Some(0.5));
        assert_eq!(s.partial, Some((1, 0.02)));
        let svg = svg(&s).unwrap();
        assert!(svg.contains("last interval partial (0.020 s):"), "no note");
        assert!(svg.contains("per-interval values not drawn"));
        // A whole run has no such note.
        assert!(!svg_of(&rows()).contains("partial"));
    }

    fn svg_of(rs: &[Row]) -> String {
        svg(&series(rs)).unwrap()
    }

    use proptest::prelude::*;

    proptest! {
        // Cases: proptest's default (256), or PROPTEST_CASES from the environment (`make fuzz`).

        #[test]
        fn any_input_reads_to_rows_or_a_clear_error(
            lines in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..80),
                    (0.0f64..1e6, 0u64..1000, ".{0,12}").prop_map(|(t, i, ph)| {
                        serde_json::json!({"time_s": t, "interval": i, "phase": ph, "partial": i % 7 == 0})
                            .to_string()
                            .into_bytes()
                    }),
                ],
                0..20,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("run.jsonl");
            std::fs::write(&p, lines.join(&b'\n')).unwrap();
            match read_jsonl(&p) {
                Ok(rec) => {
                    prop_assert!(rec.rows() >= 1);
                    let s = rec.series();
                    prop_assert!(s.phases.iter().all(|(_, n)| !n.chars().any(char::is_control)));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn no_zero_length_strokes() {
        let svg = "<svg>\n<polyline points=\"1,2 1,2\"/>\n<polyline points=\"1,2 3,4\"/>\n</svg>";
        assert_eq!(
            drop_empty_strokes(svg),
            "<svg>\n<polyline points=\"1,2 3,4\"/>\n</svg>\n"
        );
    }
}
