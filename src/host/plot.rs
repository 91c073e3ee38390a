//! `memvisor host --plot FILE.svg|png`: one chart of the host's run, drawn at the end (also when
//! the host is stopped).
//!
//! Two panels share the time axis. The upper one is the budget as the VMs share it: each running
//! VM's granted memory as a stacked area (in the order the VMs were given), the VMs' overheads
//! stacked on top, and the budget as a line, so the gap under the line is the free memory; a strip
//! along its top shows the host's state. The lower one is each VM on its own: its target (SZTGT,
//! solid), its granted memory (thin) and its active memory (TCHD, dashed), in the VM's colour. A
//! VM that has ended holds nothing and is no longer drawn.
//!
//! The periods go into a bounded [`Recorder`] (at most [`MAX_POINTS`] points, then every second
//! one, as `run --plot` does; the title says so), SVG is drawn with plotters and PNG rendered from
//! it by [`crate::output::plot::png`]; the file is written with [`files::write_atomic`].

use std::io::Write;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::state::MemState;
use super::supervisor::HostRow;
use crate::files;
pub use crate::output::plot::PlotError;
use crate::output::plot::{MAX_POINTS, check_path, png};

/// Image size, pixels.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 960;
/// The legend's panel on the right, pixels.
const LEGEND_W: u32 = 250;
const FONT: &str = "sans-serif";
/// The VMs' colours (Tableau 10 without its grey, which marks the overheads), repeated past nine.
const COLOURS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const OVERHEAD: RGBColor = RGBColor(170, 170, 170);
const BUDGET: RGBColor = RGBColor(0, 0, 0);

/// One VM at one period (MiB); `None` once it has ended.
#[derive(Clone, Copy, Debug, PartialEq)]
struct VmPoint {
    granted: f64,
    target: f64,
    active: f64,
    overhead: f64,
}

/// What the plot keeps of one period.
#[derive(Clone, Debug, PartialEq)]
struct Point {
    time_s: f64,
    budget: f64,
    state: MemState,
    /// By the VMs' order.
    vms: Vec<Option<VmPoint>>,
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v.max(0.0) } else { 0.0 }
}

impl Point {
    fn of(r: &HostRow) -> Point {
        Point {
            time_s: r.time_s,
            budget: finite(r.host.budget_mib),
            state: r.host.state,
            vms: r
                .vms
                .iter()
                .map(|v| {
                    (v.status == "running").then(|| VmPoint {
                        granted: finite(v.granted_mib),
                        target: finite(v.target_mib),
                        active: finite(v.active_mib),
                        overhead: finite(v.overhead_mib),
                    })
                })
                .collect(),
        }
    }
}

/// The periods the plot draws, bounded (see the module docs).
#[derive(Debug, Default)]
pub struct Recorder {
    names: Vec<String>,
    /// One point kept per this many periods (a power of two).
    stride: u64,
    periods: u64,
    points: Vec<Point>,
    /// The newest period, when decimation did not keep it.
    newest: Option<Point>,
}

impl Recorder {
    /// Whether no period was recorded.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Records one period.
    pub fn push(&mut self, r: &HostRow) {
        if !r.time_s.is_finite() {
            return;
        }
        if self.periods == 0 {
            self.names = r.vms.iter().map(|v| v.name.clone()).collect();
            self.stride = 1;
        }
        let p = Point::of(r);
        let i = self.periods;
        self.periods += 1;
        if !i.is_multiple_of(self.stride) {
            self.newest = Some(p);
            return;
        }
        self.points.push(p);
        self.newest = None;
        if self.points.len() > MAX_POINTS {
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

    fn all(&self) -> impl Iterator<Item = &Point> {
        self.points.iter().chain(&self.newest)
    }
}

/// Checks, before any VM starts, that the plot can be written to `path` (its extension, a
/// regular file or none, in a directory that takes a new file).
pub fn check(path: &Path) -> Result<(), PlotError> {
    check_path(path)
}

/// Draws what `rec` holds to `path`, SVG or PNG by its extension.
pub fn write(path: &Path, rec: &Recorder) -> Result<(), PlotError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let png_out = match ext.as_deref() {
        Some("svg") => false,
        Some("png") => true,
        _ => return Err(PlotError::Extension(path.display().to_string())),
    };
    if rec.is_empty() {
        return Err(PlotError::Empty(path.display().to_string()));
    }
    let svg = svg(rec)?;
    let bytes = if png_out {
        png(&svg)?
    } else {
        svg.into_bytes()
    };
    files::write_atomic(path, |f| f.write_all(&bytes)).map_err(PlotError::File)
}

/// The SVG of the plot.
pub fn svg(rec: &Recorder) -> Result<String, PlotError> {
    if rec.is_empty() {
        return Err(PlotError::Draw("no period to draw".into()));
    }
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, rec).map_err(|e| PlotError::Draw(e.to_string()))?;
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    Ok(buf)
}

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A state's colour in the strip (none for `high`).
fn state_colour(s: MemState) -> Option<RGBColor> {
    match s {
        MemState::High => None,
        MemState::Soft => Some(RGBColor(254, 217, 118)),
        MemState::Hard => Some(RGBColor(253, 141, 60)),
        MemState::Low => Some(RGBColor(189, 0, 38)),
    }
}

/// Runs of consecutive points where `f` gives a value.
fn runs(points: &[&Point], f: impl Fn(&Point) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for p in points {
        match f(p) {
            Some(v) => cur.push((p.time_s, v)),
            None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Characters of a VM's name that fit the legend (names have up to 32).
const LEGEND_CHARS: usize = 17;

/// A VM's name as the legend shows it: cut with `~` when it would not fit.
fn legend_name(name: &str) -> String {
    if name.chars().count() <= LEGEND_CHARS {
        return name.to_string();
    }
    let mut s: String = name.chars().take(LEGEND_CHARS - 1).collect();
    s.push('~');
    s
}

/// The plot's title.
fn title(rec: &Recorder) -> String {
    let budget = rec.points.first().map_or(0.0, |p| p.budget);
    let mut t = format!(
        "memvisor host: {} VMs on a {budget:.0} MiB budget, {} periods",
        rec.names.len(),
        rec.periods
    );
    if rec.stride > 1 {
        t.push_str(&format!(" (one in {} drawn)", rec.stride));
    }
    t
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn axis_x(xmax: f64) -> impl Fn(&f64) -> String {
    move |v| {
        if xmax >= 5.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    }
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, rec: &Recorder) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, legend) = root.split_horizontally(WIDTH - LEGEND_W);
    let left = left.titled(&title(rec), (FONT, 26))?;
    let (upper, lower) = left.split_vertically(left.dim_in_pixel().1 / 2 + 10);
    let points: Vec<&Point> = rec.all().collect();
    let n = rec.names.len();
    let xmax = points
        .iter()
        .map(|p| p.time_s)
        .fold(0.0, f64::max)
        .max(1e-3);

    // The upper panel: the stack under the budget.
    let stack_top = |p: &Point| {
        p.vms
            .iter()
            .flatten()
            .map(|v| v.granted + v.overhead)
            .sum::<f64>()
    };
    let ymax = points
        .iter()
        .map(|p| p.budget.max(stack_top(p)))
        .fold(1.0, f64::max)
        * 1.12;
    let mut chart = ChartBuilder::on(&upper)
        .caption("the budget: granted memory, stacked", (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("MiB")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&axis_x(xmax))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    // The state strip along the top: each period's state from the period before to its end.
    let strip = (ymax * 0.965, ymax);
    for w in 0..points.len() {
        let Some(c) = state_colour(points[w].state) else {
            continue;
        };
        let from = if w == 0 { 0.0 } else { points[w - 1].time_s };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(from, strip.0), (points[w].time_s, strip.1)],
            c.filled(),
        )))?;
    }
    // Each VM's band from the VMs' stack below it, then the overheads.
    let below = |p: &Point, i: usize| {
        p.vms[..i.min(p.vms.len())]
            .iter()
            .flatten()
            .map(|v| v.granted)
            .sum::<f64>()
    };
    let granted_total = |p: &Point| below(p, n);
    let band = |lo: &dyn Fn(&Point) -> f64, hi: &dyn Fn(&Point) -> f64| {
        let mut poly: Vec<(f64, f64)> = points.iter().map(|p| (p.time_s, hi(p))).collect();
        poly.extend(points.iter().rev().map(|p| (p.time_s, lo(p))));
        poly
    };
    for i in 0..n {
        let poly = band(&|p| below(p, i), &|p| below(p, i + 1));
        chart.draw_series(std::iter::once(Polygon::new(poly, colour(i).mix(0.55))))?;
    }
    let poly = band(&granted_total, &stack_top);
    chart.draw_series(std::iter::once(Polygon::new(poly, OVERHEAD.mix(0.6))))?;
    chart.draw_series(LineSeries::new(
        points.iter().map(|p| (p.time_s, p.budget)),
        BUDGET.stroke_width(3),
    ))?;

    // The lower panel: each VM's target, granted and active memory.
    let ymax = points
        .iter()
        .flat_map(|p| p.vms.iter().flatten())
        .map(|v| v.target.max(v.granted).max(v.active))
        .fold(1.0, f64::max)
        * 1.08;
    let mut chart = ChartBuilder::on(&lower)
        .caption("each VM: target, granted and active", (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("MiB")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&axis_x(xmax))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    for i in 0..n {
        let c = colour(i);
        let at = |f: fn(&VmPoint) -> f64| {
            move |p: &Point| p.vms.get(i).copied().flatten().map(|v| f(&v))
        };
        for run in runs(&points, at(|v| v.granted)) {
            chart.draw_series(LineSeries::new(run, c.mix(0.7).stroke_width(1)))?;
        }
        for run in runs(&points, at(|v| v.target)) {
            chart.draw_series(LineSeries::new(run, c.stroke_width(3)))?;
        }
        for run in runs(&points, at(|v| v.active)) {
            chart.draw_series(DashedLineSeries::new(run, 7, 5, c.stroke_width(2)))?;
        }
    }

    // The legend, in its own panel.
    let heading = (FONT, 19).into_font().color(&BLACK);
    let text = (FONT, 17).into_font().color(&RGBColor(30, 30, 30));
    let swatch = |y: i32, c: RGBAColor| Rectangle::new([(14, y + 2), (44, y + 16)], c.filled());
    let line = |y: i32, c: RGBColor, w: u32| {
        PathElement::new(vec![(14, y + 9), (44, y + 9)], c.stroke_width(w))
    };
    let mut y = 60;
    legend.draw(&Text::new("VMs (both panels)", (10, y), heading.clone()))?;
    y += 28;
    for (i, name) in rec.names.iter().enumerate() {
        legend.draw(&swatch(y, colour(i).mix(0.55)))?;
        legend.draw(&Text::new(legend_name(name), (54, y), text.clone()))?;
        y += 24;
    }
    legend.draw(&swatch(y, OVERHEAD.mix(0.6)))?;
    legend.draw(&Text::new("VMM overheads", (54, y), text.clone()))?;
    y += 24;
    legend.draw(&line(y, BUDGET, 3))?;
    legend.draw(&Text::new("budget", (54, y), text.clone()))?;
    y += 36;
    legend.draw(&Text::new("host state (strip)", (10, y), heading.clone()))?;
    y += 28;
    for s in [MemState::Soft, MemState::Hard, MemState::Low] {
        if let Some(c) = state_colour(s) {
            legend.draw(&swatch(y, c.to_rgba()))?;
        }
        legend.draw(&Text::new(s.as_str(), (54, y), text.clone()))?;
        y += 24;
    }
    legend.draw(&Text::new("high: no strip", (54, y), text.clone()))?;
    y += 36;
    legend.draw(&Text::new("lower panel, per VM", (10, y), heading.clone()))?;
    y += 28;
    let grey = RGBColor(60, 60, 60);
    legend.draw(&line(y, grey, 3))?;
    legend.draw(&Text::new("target (SZTGT)", (54, y), text.clone()))?;
    y += 24;
    legend.draw(&line(y, grey, 1))?;
    legend.draw(&Text::new("granted (GRANT)", (54, y), text.clone()))?;
    y += 24;
    for x0 in [14, 27, 40] {
        legend.draw(&PathElement::new(
            vec![(x0, y + 9), (x0 + 7, y + 9)],
            grey.stroke_width(2),
        ))?;
    }
    legend.draw(&Text::new("active (TCHD)", (54, y), text.clone()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing;

    #[test]
    fn the_svg_names_every_vm_and_parses() {
        let mut rec = Recorder::default();
        for r in testing::rows(12) {
            rec.push(&r);
        }
        let svg = svg(&rec).unwrap();
        for text in ["web", "db", "budget", "time (s)", "MiB", "target (SZTGT)"] {
            assert!(svg.contains(text), "no {text} in the SVG");
        }
        // A valid SVG (resvg parses it, as the PNG is made from it).
        resvg::usvg::Tree::from_str(&svg, &resvg::usvg::Options::default()).unwrap();
    }

    #[test]
    fn it_is_written_as_svg_or_png_and_bad_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::default();
        for r in testing::rows(6) {
            rec.push(&r);
        }
        let svg_path = dir.path().join("host.svg");
        write(&svg_path, &rec).unwrap();
        let text = std::fs::read_to_string(&svg_path).unwrap();
        assert!(text.starts_with("<svg") && text.contains("web"));
        let e = check(&dir.path().join("host.txt")).unwrap_err().to_string();
        assert!(e.contains(".svg or .png"), "{e}");
        let sub = dir.path().join("sub.svg");
        std::fs::create_dir(&sub).unwrap();
        let e = check(&sub).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let link = dir.path().join("link.svg");
        std::os::unix::fs::symlink(&svg_path, &link).unwrap();
        let e = check(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = write(&dir.path().join("empty.svg"), &Recorder::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no rows"), "{e}");
    }

    #[test]
    fn a_long_run_is_decimated_and_keeps_the_newest_period() {
        let mut rec = Recorder::default();
        let rows = testing::rows(2);
        let mut r = rows[0].clone();
        for i in 0..(3 * MAX_POINTS as u64 + 1) {
            r.period = i;
            r.time_s = i as f64;
            rec.push(&r);
        }
        assert!(rec.all().count() <= MAX_POINTS + 1);
        assert_eq!(rec.all().last().unwrap().time_s, 3.0 * MAX_POINTS as f64);
        assert!(title(&rec).contains("one in 2 drawn") || title(&rec).contains("one in 4 drawn"));
    }
}
