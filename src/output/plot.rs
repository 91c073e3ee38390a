//! `memvisor plot RUN.jsonl -o run.svg|png` and `run --plot`: one chart of a run. Host usage
//! (backed and overhead stacked), the guest's view (allocated), the guest's truth (touched,
//! written), each active-memory estimate with its 95% CI as a band and its moving averages, and
//! the phases on the time axis. Drawn as SVG with plotters; PNG is that SVG rendered by resvg
//! with the system's fonts.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use resvg::{tiny_skia, usvg};

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

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a row of `memvisor run --json` output: {source}")]
    Parse {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{0}: no rows to plot")]
    Empty(String),
    #[error("{0}: the plot's file name must end in .svg or .png")]
    Extension(String),
    #[error("drawing the plot: {0}")]
    Draw(String),
    #[error("rendering the plot to PNG: {0}")]
    Render(String),
}

/// Reads the rows of a `memvisor run --json` output (one JSON object per line).
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>, PlotError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io {
        path: p.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(line).map_err(|source| PlotError::Parse {
            path: p.clone(),
            line: i + 1,
            source,
        })?;
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(PlotError::Empty(p));
    }
    Ok(rows)
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

/// Checks that the plot can be written to `path` (its extension), before a run.
pub fn check_path(path: &Path) -> Result<(), PlotError> {
    is_png(path).map(|_| ())
}

/// Draws `rows` to `path`, SVG or PNG by its extension.
pub fn write(path: &Path, rows: &[Row]) -> Result<(), PlotError> {
    let png_out = is_png(path)?;
    if rows.is_empty() {
        return Err(PlotError::Empty(path.display().to_string()));
    }
    let svg = svg(rows)?;
    let bytes = if png_out {
        png(&svg)?
    } else {
        svg.into_bytes()
    };
    std::fs::write(path, bytes).map_err(|source| PlotError::Io {
        path: path.display().to_string(),
        source,
    })
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

/// What the plot draws, one value per row (MiB), before any drawing: tests check these.
#[derive(Debug, Default)]
pub struct Series {
    pub time_s: Vec<f64>,
    pub configured_mib: f64,
    pub backed: Vec<Option<f64>>,
    /// Backed + overhead (the top of the stack).
    pub host: Vec<Option<f64>>,
    pub allocated: Vec<Option<f64>>,
    pub touched: Vec<Option<f64>>,
    pub written: Vec<Option<f64>>,
    pub actives: Vec<ActiveSeries>,
    /// Where each phase starts (the end of the last interval of the phase before) and its name.
    pub phases: Vec<(f64, String)>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The series of `rows`; rows with a time that is not a number are left out.
pub fn series(rows: &[Row]) -> Series {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.time_s.is_finite()).collect();
    let mut s = Series {
        configured_mib: rows.first().map_or(0.0, |r| r.configured_mib),
        ..Series::default()
    };
    for (i, r) in rows.iter().enumerate() {
        s.time_s.push(r.time_s);
        let h = r.host.as_ref();
        s.backed.push(h.and_then(|h| finite(h.backed_mib)));
        s.host
            .push(h.and_then(|h| finite(h.backed_mib + h.overhead_mib)));
        s.allocated.push(finite(r.guest.allocated_mib));
        s.touched
            .push(r.truth.as_ref().and_then(|t| finite(t.touched_mib)));
        s.written
            .push(r.truth.as_ref().and_then(|t| finite(t.written_mib)));
        for (kind, a) in r.actives() {
            let k = match s.actives.iter().position(|x| x.kind == kind) {
                Some(k) => k,
                None => {
                    s.actives.push(ActiveSeries {
                        kind,
                        ..ActiveSeries::default()
                    });
                    s.actives.len() - 1
                }
            };
            let x = &mut s.actives[k];
            x.pad(i);
            x.estimate.push(finite(a.estimate_mib));
            x.ci_low.push(finite(a.ci_low_mib));
            x.ci_high.push(finite(a.ci_high_mib));
            x.fast.push(finite(a.fast_mib));
            x.slow.push(finite(a.slow_mib));
            x.max.push(finite(a.max_mib));
        }
        // A row between two phases ("-") starts none; the next phase starts after it.
        let last = s.phases.last().map(|(_, name)| name.as_str());
        if r.phase != BETWEEN_PHASES && last != Some(r.phase.as_str()) {
            let start = if i == 0 { 0.0 } else { rows[i - 1].time_s };
            s.phases.push((start, r.phase.clone()));
        }
    }
    let n = s.time_s.len();
    for x in &mut s.actives {
        x.pad(n);
    }
    s
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

/// The SVG of the plot of `rows`.
pub fn svg(rows: &[Row]) -> Result<String, PlotError> {
    let s = series(rows);
    if s.time_s.is_empty() {
        return Err(PlotError::Draw("no row with a valid time".into()));
    }
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, &s).map_err(|e| PlotError::Draw(e.to_string()))?;
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
    for v in [&s.host, &s.allocated, &s.touched, &s.written] {
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
        .caption(
            format!(
                "memvisor: {:.0} MiB guest, {} intervals",
                s.configured_mib,
                t.len()
            ),
            (FONT, 26),
        )
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
    for poly in bands(t, &s.backed, &s.host) {
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
    entries.push(("host = backed + overhead".into(), Mark::Line(HOST, 3)));

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
        let svg = svg(&rs).unwrap();
        assert!(!svg.contains("active (writes)"));
        assert!(svg.contains("backed guest pages"));
    }

    #[test]
    fn the_svg_parses_and_the_png_is_a_picture_of_the_expected_size() {
        let svg = svg(&rows()).unwrap();
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
        // The backed area's colour is there (blended with white).
        assert!(
            px.iter()
                .any(|p| p.blue() > p.red() + 40 && p.green() > p.red())
        );
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
        assert_eq!(read_jsonl(&p).unwrap().len(), 2);
        let e = read_jsonl(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
        let e = check_path(Path::new("run.jpg")).unwrap_err().to_string();
        assert!(e.contains(".svg or .png"), "{e}");
        assert!(check_path(Path::new("RUN.PNG")).is_ok());
        assert!(matches!(
            write(&dir.path().join("x.svg"), &[]),
            Err(PlotError::Empty(_))
        ));
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
