//! The plain table of `memvisor run`: named columns in groups, a default view that fits 120
//! terminal columns, `--columns LIST` to choose them, `--wide` for all of them. Sizes are MiB, or
//! GiB with a `G` suffix when MiB would need more than 6 digits.

use thiserror::Error;

use crate::row::{Active, Row};

/// The groups the columns fall in; the header's first line labels each run of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// `time`, `phase`, `cfg`: no label.
    Run,
    GuestView,
    Truth,
    Host,
    Access,
    Writes,
    Balloon,
}

impl Group {
    /// The group's labels, longest first: the header uses the longest that fits its columns.
    fn labels(self, pfn_visible: bool) -> &'static [&'static str] {
        match self {
            Group::Run => &[""],
            Group::GuestView => &["guest's view", "guest"],
            Group::Truth => &["guest truth", "truth"],
            Group::Host if pfn_visible => &["host usage (MiB)", "host usage", "host"],
            Group::Host => &[
                "host usage (MiB; no PFNs: zero/backed inferred)",
                "host usage (no PFNs: inferred)",
                "host (no PFNs)",
                "host*",
            ],
            Group::Access => &[
                "active: reads+writes, MiB",
                "active: reads+writes",
                "reads+writes",
                "r+w",
            ],
            Group::Writes => &[
                "active: writes, MiB; dirty MiB/s",
                "active: writes, MiB",
                "active: writes",
                "writes",
                "w",
            ],
            Group::Balloon => &["balloon, guest stats", "balloon", "bal"],
        }
    }
}

/// One column: its name (in the header and in `--columns`), group, width and cell.
pub struct Column {
    pub name: &'static str,
    group: Group,
    width: usize,
    /// The cell of a row, in at most `width` characters.
    cell: fn(&Row, usize) -> String,
}

/// The width of the phase column in `--wide`; other views cut phase names at [`PHASE`].
const PHASE_WIDE: usize = 24;
const PHASE: usize = 18;

macro_rules! size {
    ($f:expr) => {
        |r: &Row, w: usize| size_cell($f(r), w)
    };
}

/// Every column, in `--wide` order.
pub const COLUMNS: &[Column] = &[
    Column {
        name: "time",
        group: Group::Run,
        width: 6,
        cell: |r, w| cell(Some(r.time_s), w, 1),
    },
    Column {
        name: "phase",
        group: Group::Run,
        width: PHASE,
        cell: |r, w| phase_cell(&r.phase, w),
    },
    Column {
        name: "cfg",
        group: Group::Run,
        width: 6,
        cell: |r, w| size_cell0(Some(r.configured_mib), w),
    },
    Column {
        name: "alloc",
        group: Group::GuestView,
        width: 6,
        cell: size!(|r: &Row| Some(r.guest.allocated_mib)),
    },
    Column {
        name: "free",
        group: Group::GuestView,
        width: 6,
        cell: size!(|r: &Row| Some(r.guest.free_mib)),
    },
    Column {
        name: "touch",
        group: Group::Truth,
        width: 6,
        cell: size!(|r: &Row| r.truth.as_ref().map(|t| t.touched_mib)),
    },
    Column {
        name: "write",
        group: Group::Truth,
        width: 6,
        cell: size!(|r: &Row| r.truth.as_ref().map(|t| t.written_mib)),
    },
    Column {
        name: "host",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.host_mib)),
    },
    Column {
        name: "backed",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.backed_mib)),
    },
    Column {
        name: "ovhd",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.overhead_mib)),
    },
    Column {
        name: "untch",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.untouched_mib)),
    },
    Column {
        name: "zero",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.zero_mib)),
    },
    Column {
        name: "swap",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.swapped_mib)),
    },
    Column {
        name: "vswp",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.swap.as_ref().map(|s| s.swapped_mib)),
    },
    Column {
        name: "shard",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.shared_mib)),
    },
    Column {
        name: "saved",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.shared_saved_mib)),
    },
    Column {
        name: "rel",
        group: Group::Host,
        width: 6,
        cell: size!(|r: &Row| r.host.as_ref().map(|h| h.released_mib)),
    },
    Column {
        name: "est",
        group: Group::Access,
        width: 6,
        cell: size!(|r: &Row| r.active.as_ref().map(|a| a.estimate_mib)),
    },
    Column {
        name: "ci",
        group: Group::Access,
        width: CI,
        cell: |r, _| ci_cell(r.active.as_ref()),
    },
    Column {
        name: "max",
        group: Group::Access,
        width: 6,
        cell: size!(|r: &Row| r.active.as_ref().map(|a| a.max_mib)),
    },
    Column {
        name: "err",
        group: Group::Access,
        width: 6,
        cell: size!(|r: &Row| r.active.as_ref().and_then(|a| a.error_mib)),
    },
    Column {
        name: "west",
        group: Group::Writes,
        width: 6,
        cell: size!(|r: &Row| r.active_writes.as_ref().map(|a| a.estimate_mib)),
    },
    Column {
        name: "wci",
        group: Group::Writes,
        width: CI,
        cell: |r, _| ci_cell(r.active_writes.as_ref()),
    },
    Column {
        name: "wmax",
        group: Group::Writes,
        width: 6,
        cell: size!(|r: &Row| r.active_writes.as_ref().map(|a| a.max_mib)),
    },
    Column {
        name: "werr",
        group: Group::Writes,
        width: 6,
        cell: size!(|r: &Row| r.active_writes.as_ref().and_then(|a| a.error_mib)),
    },
    Column {
        name: "dirty",
        group: Group::Writes,
        width: 6,
        cell: size!(|r: &Row| r.active_writes.as_ref().and_then(|a| a.dirty_rate_mib_s)),
    },
    Column {
        name: "balln",
        group: Group::Balloon,
        width: 6,
        cell: size!(|r: &Row| r.balloon.as_ref().map(|b| b.balloon_mib)),
    },
    Column {
        name: "gfree",
        group: Group::Balloon,
        width: 6,
        cell: size!(|r: &Row| {
            (r.balloon.as_ref())
                .and_then(|b| b.guest_stats.as_ref())
                .and_then(|g| g.free_mib)
        }),
    },
    Column {
        name: "gavail",
        group: Group::Balloon,
        width: 6,
        cell: size!(|r: &Row| {
            (r.balloon.as_ref())
                .and_then(|b| b.guest_stats.as_ref())
                .and_then(|g| g.available_mib)
        }),
    },
];

/// The default view (119 characters wide): when, what the guest did (its truth), what it costs
/// the host, and what the two estimates make of it. README says why these.
pub const DEFAULT_COLUMNS: &[&str] = &[
    "time", "phase", "touch", "write", "host", "backed", "ovhd", "vswp", "est", "ci", "west",
    "dirty", "balln",
];

/// The widest the default view may be.
pub const MAX_DEFAULT_WIDTH: usize = 120;

/// The width of a 95% interval: two sizes and a `-`.
const CI: usize = 13;

/// A `--columns` list that cannot be shown.
#[derive(Debug, Error, PartialEq)]
pub enum TableError {
    #[error("unknown column {name:?}; the columns are: {}", names())]
    Unknown { name: String },
    #[error("no column given; the columns are: {}", names())]
    Empty,
    #[error("column {0:?} is given twice")]
    Twice(String),
}

/// Every column's name, comma-separated.
pub fn names() -> String {
    COLUMNS.iter().map(|c| c.name).collect::<Vec<_>>().join(",")
}

/// The chosen columns with their widths.
#[derive(Clone)]
pub struct Table {
    columns: Vec<(&'static Column, usize)>,
}

impl Default for Table {
    /// The default view.
    fn default() -> Self {
        Table::select(&DEFAULT_COLUMNS.join(",")).expect("the default columns exist")
    }
}

impl Table {
    /// Every column (`--wide`), the phase names 24 characters wide.
    pub fn wide() -> Self {
        Table {
            columns: COLUMNS
                .iter()
                .map(|c| {
                    (
                        c,
                        if c.name == "phase" {
                            PHASE_WIDE
                        } else {
                            c.width
                        },
                    )
                })
                .collect(),
        }
    }

    /// The columns named in `list` (comma-separated, in the order given).
    pub fn select(list: &str) -> Result<Self, TableError> {
        let mut columns: Vec<(&'static Column, usize)> = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let c = COLUMNS
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| TableError::Unknown {
                    name: name.chars().take(40).collect(),
                })?;
            if columns.iter().any(|(k, _)| k.name == name) {
                return Err(TableError::Twice(name.into()));
            }
            columns.push((c, c.width));
        }
        if columns.is_empty() {
            return Err(TableError::Empty);
        }
        Ok(Table { columns })
    }

    /// Parses `--columns LIST` (the error says which names there are).
    pub fn arg(list: &str) -> Result<Self, String> {
        Table::select(list).map_err(|e| e.to_string())
    }

    /// The columns' names, in order.
    pub fn column_names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(c, _)| c.name).collect()
    }

    /// Lays out one line: each cell aligned in its column (phase to the left, the rest to the
    /// right), a space between columns and ` | ` between groups.
    fn line(&self, cells: impl Iterator<Item = String>) -> String {
        let mut s = String::new();
        let mut last: Option<Group> = None;
        for ((c, w), text) in self.columns.iter().zip(cells) {
            match last {
                None => {}
                Some(g) if g == c.group => s.push(' '),
                Some(_) => s.push_str(" | "),
            }
            last = Some(c.group);
            if c.name == "phase" {
                s.push_str(&format!("{text:<w$}"));
            } else {
                s.push_str(&format!("{text:>w$}"));
            }
        }
        s
    }

    /// The two header lines: the groups' labels over their columns, then the columns' names.
    /// Without PFNs (not root) the host usage label says that its `zero` and `backed` are
    /// inferred from writes, not read from the host's page tables.
    pub fn header(&self, pfn_visible: bool) -> String {
        let mut l1 = String::new();
        let mut i = 0;
        while i < self.columns.len() {
            let group = self.columns[i].0.group;
            let n = self.columns[i..]
                .iter()
                .take_while(|(c, _)| c.group == group)
                .count();
            let span = self.columns[i..i + n].iter().map(|(_, w)| w).sum::<usize>() + n - 1;
            if i > 0 {
                l1.push_str(" | ");
            }
            let labels = group.labels(pfn_visible);
            let label = labels
                .iter()
                .find(|l| l.chars().count() <= span)
                .copied()
                .unwrap_or("");
            l1.push_str(&format!("{label:<span$}"));
            i += n;
        }
        let l2 = self.line(self.columns.iter().map(|(c, _)| c.name.to_string()));
        format!("{}\n{l2}", l1.trim_end())
    }

    /// One row's line, then its markers (paused, partial, end).
    pub fn row(&self, r: &Row) -> String {
        let line = self.line(self.columns.iter().map(|(c, w)| (c.cell)(r, *w)));
        format!("{line}{}", end_marker(r))
    }
}

/// How often the table repeats its header, as vmstat does: every screenful (its height less the
/// two header lines) when standard output is a terminal, measured when the run starts; never
/// otherwise (a file or a pipe gets one header, which scripts can skip once).
pub fn header_every_for_stdout() -> Option<usize> {
    // SAFETY: isatty only reads the descriptor's state.
    if unsafe { libc::isatty(libc::STDOUT_FILENO) } != 1 {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the call.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    // A terminal that does not say its size gets vmstat's fallback of 24 lines.
    let rows = if ok && ws.ws_row > 0 {
        usize::from(ws.ws_row)
    } else {
        24
    };
    Some(rows.saturating_sub(2).max(1))
}

/// A number in at most `width` characters with `prec` decimals, fewer when it does not fit; a
/// value too large even without decimals is clamped and marked (`>99999`, `<-9999`), one that is
/// not a number is `?`, a missing one `-`. Garbage reported by a hostile guest cannot shift the
/// table's columns.
pub fn cell(v: Option<f64>, width: usize, prec: usize) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    if !v.is_finite() {
        return "?".into();
    }
    let s = format!("{v:.prec$}");
    if s.len() <= width {
        return s;
    }
    let s = format!("{v:.0}");
    if s.len() <= width {
        return s;
    }
    if v > 0.0 {
        format!(">{}", "9".repeat(width - 1))
    } else {
        format!("<-{}", "9".repeat(width - 2))
    }
}

/// MiB at or above this (in magnitude, rounded) would need more than 6 digits: shown in GiB.
const GIB_FROM_MIB: f64 = 999_999.5;

/// A size given in MiB, with one decimal when it fits; in GiB with a `G` suffix when MiB would
/// need more than 6 digits (1 TiB is `1024G`); clamped (`>9999G`) past what `width` holds.
pub fn size_cell(v: Option<f64>, width: usize) -> String {
    sized(v, width, 1)
}

/// [`size_cell`] without decimals (configured sizes are whole MiB).
pub fn size_cell0(v: Option<f64>, width: usize) -> String {
    sized(v, width, 0)
}

fn sized(v: Option<f64>, width: usize, prec: usize) -> String {
    match v {
        Some(m) if m.is_finite() && m.abs() >= GIB_FROM_MIB => {
            let g = cell(Some(m / 1024.0), width - 1, 1);
            match g.chars().next() {
                // Past even GiB: the clamp keeps its unit.
                Some('>') => format!(">{}G", "9".repeat(width - 2)),
                Some('<') => format!("<-{}G", "9".repeat(width - 3)),
                _ => format!("{g}G"),
            }
        }
        _ => cell(v, width, prec),
    }
}

/// The phase name in at most `width` characters: control characters become `?` and a longer
/// name is cut with `~`.
fn phase_cell(phase: &str, width: usize) -> String {
    let mut s: String = phase
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > width {
        s = s.chars().take(width - 1).collect();
        s.push('~');
    }
    s
}

/// A 95% interval in at most [`CI`] characters.
fn ci_cell(a: Option<&Active>) -> String {
    a.map(|a| {
        format!(
            "{}-{}",
            size_cell(Some(a.ci_low_mib), 6),
            size_cell(Some(a.ci_high_mib), 6)
        )
    })
    .unwrap_or_else(|| "-".into())
}

/// What follows a row: `(paused: 0.80 s)` when a controller held the vCPU out of the guest in
/// its interval; on the last row, `(end)` or `(end: why)`, after `(partial: 0.02 s)` when its
/// interval was cut short (its rates are over that length, its counts not a full interval's).
fn end_marker(r: &Row) -> String {
    let paused = if r.paused_s > 0.0 {
        format!(
            "  (paused: {} s)",
            cell(Some(r.paused_s), 6, 2).trim_start()
        )
    } else {
        String::new()
    };
    let Some(why) = r.end else {
        return paused;
    };
    let partial = if r.partial {
        format!("  (partial: {} s)", cell(Some(r.length_s), 6, 2))
    } else {
        String::new()
    };
    let end = match why {
        crate::row::EndReason::Done => "(end)".to_string(),
        why if r.guest.out_of_memory => {
            format!("(end: {}: the guest is out of memory)", why.as_str())
        }
        why => format!("(end: {})", why.as_str()),
    };
    format!("{paused}{partial}  {end}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::row::{BalloonView, GuestStats, GuestView, HostUsage, Swap, Truth};

    /// The character positions of the column separators `|` in a line.
    fn bars(line: &str) -> Vec<usize> {
        line.chars()
            .enumerate()
            .filter(|(_, c)| *c == '|')
            .map(|(i, _)| i)
            .collect()
    }

    /// The character positions where a column ends (a non-space followed by a space or the
    /// end), for right-aligned columns.
    fn ends(line: &str) -> Vec<usize> {
        let c: Vec<char> = line.chars().collect();
        (0..c.len())
            .filter(|&i| c[i] != ' ' && (i + 1 == c.len() || c[i + 1] == ' '))
            .collect()
    }

    /// A row with every value `v` and the phase name `phase`.
    pub(crate) fn row_with(v: f64, phase: &str) -> Row {
        let mut r = Row {
            schema_version: crate::row::SchemaVersion,
            active: Some(Active {
                estimate_mib: v,
                ci_low_mib: v,
                ci_high_mib: v,
                max_mib: v,
                ..Active::default()
            }),
            reads_seen: true,
            balloon: Some(BalloonView {
                balloon_mib: v,
                guest_stats: Some(GuestStats {
                    free_mib: Some(v),
                    available_mib: Some(v),
                    ..GuestStats::default()
                }),
                ..BalloonView::default()
            }),
            swap: Some(Swap {
                swapped_mib: v,
                ..Swap::default()
            }),
            check: None,
            vmm: None,
            length_s: 1.0,
            partial: false,
            paused_s: 0.0,
            time_s: v,
            interval: 1,
            phase: phase.into(),
            end: None,
            configured_mib: v,
            guest: GuestView {
                allocated_mib: v,
                free_mib: v,
                ..GuestView::default()
            },
            truth: None,
            host: Some(HostUsage {
                host_mib: v,
                backed_mib: v,
                overhead_mib: v,
                untouched_mib: v,
                zero_mib: v,
                swapped_mib: v,
                shared_mib: v,
                shared_saved_mib: v,
                released_mib: v,
                ..HostUsage::default()
            }),
            active_writes: Some(Active {
                estimate_mib: v,
                ci_low_mib: v,
                ci_high_mib: v,
                fast_mib: v,
                slow_mib: v,
                max_mib: v,
                dirty_rate_mib_s: Some(v),
                ..Active::default()
            }),
        };
        r.attach_truth(Truth {
            touched_mib: v,
            written_mib: v,
            ..Truth::default()
        });
        r
    }

    /// The three kinds of view: the default, every column, and a few in an order of their own.
    fn views() -> Vec<Table> {
        vec![
            Table::default(),
            Table::wide(),
            Table::select("est,phase,host,time,gavail,wci").unwrap(),
        ]
    }

    #[test]
    fn absurd_values_keep_the_columns_of_the_header() {
        for table in views() {
            let header = table.header(true);
            // Without PFNs the header says so, in the same columns.
            let hidden = table.header(false);
            assert_eq!(
                bars(hidden.lines().next().unwrap()),
                bars(header.lines().next().unwrap())
            );
            let names = header.lines().nth(1).unwrap();
            let width = names.chars().count();
            assert_eq!(bars(header.lines().next().unwrap()), bars(names));
            // "phase" is left-aligned: compare the ends of the other columns.
            let name_ends: Vec<usize> = ends(names)
                .into_iter()
                .filter(|&i| names.find("phase").is_none_or(|p| i != p + 4))
                .collect();
            let absurd = [
                1e300,
                -1e300,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                -123456.78,
                9_999_999_999.0,
                0.0,
                12.25,
            ];
            for v in absurd {
                for phase in [
                    "idle",
                    "a phase name much longer than the column",
                    "tab\there é ü",
                ] {
                    let line = table.row(&row_with(v, phase));
                    assert_eq!(line.chars().count(), width, "value {v}: {line}");
                    assert_eq!(bars(&line), bars(names), "value {v}: {line}");
                    let line_ends = ends(&line);
                    for e in &name_ends {
                        assert!(
                            line_ends.contains(e),
                            "value {v}: column ending at {e} moved:\n{names}\n{line}"
                        );
                    }
                }
            }
        }
        let wide = Table::wide();
        assert!(wide.header(false).contains("no PFNs"));
        // A clamped value says so.
        let line = wide.row(&row_with(1e300, "x"));
        assert!(line.contains(">9999G"), "{line}");
        let line = wide.row(&row_with(-1e300, "x"));
        assert!(line.contains("<-999G"), "{line}");
        let line = wide.row(&row_with(f64::NAN, "x"));
        assert!(line.contains(" ?"), "{line}");
    }

    #[test]
    fn the_default_view_fits_120_columns_with_big_values() {
        let t = Table::default();
        for l in t.header(true).lines().chain(t.header(false).lines()) {
            assert!(l.chars().count() <= MAX_DEFAULT_WIDTH, "{l}");
        }
        // A 4 TiB guest with a 2.5 TiB working set, and a phase name longer than its column.
        for v in [4_194_304.0, 2_621_440.5, 999_999.9, -1_048_576.0, 65_536.25] {
            let mut r = row_with(v, "touch 2500G write 10m random hot 10%:90%");
            r.time_s = 86_399.9;
            let line = t.row(&r);
            assert!(line.chars().count() <= MAX_DEFAULT_WIDTH, "{line}");
            assert!(
                !line.contains('>') && !line.contains('<'),
                "clamped: {line}"
            );
        }
        // Every column of the wide view is there, in order.
        let names: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
        assert_eq!(Table::wide().column_names(), names);
        let l2 = Table::wide()
            .header(true)
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        let shown: Vec<&str> = l2.split([' ', '|']).filter(|w| !w.is_empty()).collect();
        assert_eq!(shown, names);
    }

    #[test]
    fn columns_picks_exactly_those_in_their_order() {
        let t = Table::select("host, est,time").unwrap();
        assert_eq!(t.column_names(), ["host", "est", "time"]);
        let header = t.header(true);
        let l2 = header.lines().nth(1).unwrap();
        let shown: Vec<&str> = l2.split([' ', '|']).filter(|w| !w.is_empty()).collect();
        assert_eq!(shown, ["host", "est", "time"]);
        let line = t.row(&row_with(42.0, "idle"));
        let cells: Vec<&str> = line.split([' ', '|']).filter(|w| !w.is_empty()).collect();
        assert_eq!(cells, ["42.0", "42.0", "42.0"]);
        assert!(header.lines().next().unwrap().contains("host"), "{header}");
    }

    #[test]
    fn shard_and_saved_show_esxtops_shrd_and_shrdsvd() {
        let mut r = row_with(1.0, "idle");
        let h = r.host.as_mut().unwrap();
        h.shared_mib = 32.0;
        h.shared_saved_mib = 31.875;
        let t = Table::select("shard,saved").unwrap();
        let cells = |line: &str| -> Vec<String> {
            line.split([' ', '|'])
                .filter(|w| !w.is_empty())
                .map(String::from)
                .collect()
        };
        assert_eq!(cells(&t.row(&r)), ["32.0", "31.9"]);
        assert_eq!(
            cells(t.header(true).lines().nth(1).unwrap()),
            ["shard", "saved"]
        );
        // In the wide view, beside each other in the host group; not in the default view.
        let wide = Table::wide().column_names();
        let at = wide.iter().position(|&c| c == "shard").unwrap();
        assert_eq!(wide[at + 1], "saved");
        assert!(!Table::default().column_names().contains(&"saved"));
        // A row without host usage shows `-`.
        r.host = None;
        assert_eq!(cells(&t.row(&r)), ["-", "-"]);
    }

    #[test]
    fn an_unknown_column_is_a_clear_error_listing_the_columns() {
        let e = Table::select("time,hots").err().unwrap();
        assert_eq!(
            e,
            TableError::Unknown {
                name: "hots".into()
            }
        );
        let text = e.to_string();
        assert!(text.contains("\"hots\""), "{text}");
        for c in COLUMNS {
            assert!(text.contains(c.name), "{text}");
        }
        assert!(text.contains("untch,zero"), "{text}");
        assert_eq!(Table::select(" , ").err(), Some(TableError::Empty));
        assert_eq!(
            Table::select("est,est").err(),
            Some(TableError::Twice("est".into()))
        );
    }

    #[test]
    fn sizes_switch_to_gib_past_six_digits_of_mib() {
        assert_eq!(size_cell(Some(64.0), 6), "64.0");
        assert_eq!(size_cell(Some(12345.6), 6), "12346");
        assert_eq!(size_cell(Some(999_999.0), 6), "999999");
        assert_eq!(size_cell(Some(1_000_000.0), 6), "976.6G");
        assert_eq!(size_cell(Some(1_048_576.0), 6), "1024G");
        assert_eq!(size_cell(Some(-2_097_152.0), 6), "-2048G");
        assert_eq!(size_cell(Some(-99_999.0), 6), "-99999");
        assert_eq!(size_cell(Some(1e12), 6), ">9999G");
        assert_eq!(size_cell(None, 6), "-");
        assert_eq!(size_cell(Some(f64::NAN), 6), "?");
        assert_eq!(size_cell0(Some(1_048_576.0), 6), "1024G");
        assert_eq!(size_cell0(Some(256.0), 6), "256");
        // In a row: a 1 TiB guest's truth, and its interval.
        let line = Table::select("touch,ci")
            .unwrap()
            .row(&row_with(1_048_576.0, "x"));
        assert_eq!(line, " 1024G |   1024G-1024G");
    }

    #[test]
    fn cell_keeps_precision_when_it_fits() {
        assert_eq!(cell(Some(64.04), 6, 1), "64.0");
        assert_eq!(cell(Some(-5.96), 6, 1), "-6.0");
        assert_eq!(cell(Some(123456.7), 6, 1), "123457");
        assert_eq!(cell(Some(1234567.0), 6, 1), ">99999");
        assert_eq!(cell(None, 6, 1), "-");
        assert_eq!(phase_cell("a\u{7}b", 24), "a?b");
    }

    #[test]
    fn the_last_row_says_why_the_run_ended_and_whether_it_was_cut_short() {
        let mut r = row_with(3.0, "idle 1s");
        assert!(!Table::default().row(&r).contains("(end"));
        assert!(!Table::default().row(&r).contains("(paused"));
        r.paused_s = 0.8;
        assert!(
            Table::default().row(&r).ends_with("  (paused: 0.80 s)"),
            "{}",
            Table::default().row(&r)
        );
        r.paused_s = 0.0;
        r.end = Some(crate::row::EndReason::Done);
        assert!(Table::default().row(&r).ends_with("  (end)"));
        r.partial = true;
        r.length_s = 0.0213;
        r.end = Some(crate::row::EndReason::Timeout);
        assert!(
            Table::default()
                .row(&r)
                .ends_with("  (partial: 0.02 s)  (end: timeout)"),
            "{}",
            Table::default().row(&r)
        );
    }
}
