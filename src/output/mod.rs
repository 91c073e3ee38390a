//! Rendering rows for people (a fixed-width table) and for scripts (one JSON object or CSV row
//! per line), plus the [`Sink`] that sends each row to the chosen format (through the writer
//! thread: the run never waits on its reader), the Prometheus endpoint and the plot.

pub mod csv;
#[cfg(feature = "prometheus")]
pub mod http;
#[cfg(feature = "plot")]
pub mod plot;
#[cfg(feature = "prometheus")]
pub mod prometheus;
pub mod writer;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::row::{Active, Row};
#[cfg(feature = "prometheus")]
use prometheus::Exporter;
use writer::{LineWriter, NotWritten};

/// The table's two header lines. Without PFNs (not root) the host usage group says that its
/// `zero` and `backed` are inferred from writes, not read from the host's page tables.
pub fn table_header(pfn_visible: bool) -> String {
    let host = if pfn_visible {
        "host usage (MiB)"
    } else {
        "host usage (MiB; no PFNs: zero/backed inferred)"
    };
    let l1 = format!(
        "{:>6} {:<24} {:>6} | {:>13} | {:>13} | {:<62} | {:<36} | {:<43} | {:<20}",
        "",
        "",
        "",
        "guest's view",
        "guest truth",
        host,
        "active: reads+writes, MiB",
        "active: writes, MiB; dirty MiB/s",
        "balloon, guest stats"
    );
    let l2 = format!(
        "{:>6} {:<24} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} {:>5} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} | {:>6} {:>15} {:>6} {:>6} | {:>6} {:>15} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6}",
        "time",
        "phase",
        "cfg",
        "alloc",
        "free",
        "touch",
        "write",
        "host",
        "backed",
        "ovhd",
        "untch",
        "zero",
        "swap",
        "vswp",
        "shard",
        "saved",
        "rel",
        "est",
        "95% CI",
        "max",
        "err",
        "est",
        "95% CI",
        "max",
        "err",
        "dirty",
        "balln",
        "gfree",
        "gavail"
    );
    format!("{}\n{l2}", l1.trim_end())
}

/// A number in at most `width` characters with `prec` decimals, fewer when it does not fit; a
/// value too large even without decimals is clamped and marked (`>99999`, `<-9999`), one that is
/// not a number is `?`, a missing one `-`. Garbage reported by a hostile guest cannot shift the
/// table's columns.
fn cell(v: Option<f64>, width: usize, prec: usize) -> String {
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

/// A 95% interval in at most 15 characters.
fn ci_cell(a: Option<&Active>) -> String {
    a.map(|a| {
        format!(
            "{}-{}",
            cell(Some(a.ci_low_mib), 7, 1),
            cell(Some(a.ci_high_mib), 7, 1)
        )
    })
    .unwrap_or_else(|| "-".into())
}

/// One table line.
pub fn table_row(r: &Row) -> String {
    let t = r.truth.as_ref();
    let h = r.host.as_ref();
    let a = r.active.as_ref();
    let w = r.active_writes.as_ref();
    let bal = r.balloon.as_ref();
    let gs = bal.and_then(|b| b.guest_stats.as_ref());
    format!(
        "{:>6} {:<24} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} {:>5} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} | {:>6} {:>15} {:>6} {:>6} | {:>6} {:>15} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6}{}",
        cell(Some(r.time_s), 6, 1),
        phase_cell(&r.phase, 24),
        cell(Some(r.configured_mib), 6, 0),
        cell(Some(r.guest.allocated_mib), 6, 1),
        cell(Some(r.guest.free_mib), 6, 1),
        cell(t.map(|t| t.touched_mib), 6, 1),
        cell(t.map(|t| t.written_mib), 6, 1),
        cell(h.map(|h| h.host_mib), 6, 1),
        cell(h.map(|h| h.backed_mib), 6, 1),
        cell(h.map(|h| h.overhead_mib), 5, 1),
        cell(h.map(|h| h.untouched_mib), 6, 1),
        cell(h.map(|h| h.zero_mib), 5, 1),
        cell(h.map(|h| h.swapped_mib), 5, 1),
        cell(r.swap.as_ref().map(|s| s.swapped_mib), 5, 1),
        cell(h.map(|h| h.shared_mib), 5, 1),
        cell(h.map(|h| h.shared_saved_mib), 5, 1),
        cell(h.map(|h| h.released_mib), 5, 1),
        cell(a.map(|a| a.estimate_mib), 6, 1),
        ci_cell(a),
        cell(a.map(|a| a.max_mib), 6, 1),
        cell(a.and_then(|a| a.error_mib), 6, 1),
        cell(w.map(|a| a.estimate_mib), 6, 1),
        ci_cell(w),
        cell(w.map(|a| a.max_mib), 6, 1),
        cell(w.and_then(|a| a.error_mib), 6, 1),
        cell(w.map(|a| a.dirty_rate_mib_s), 6, 1),
        cell(bal.map(|b| b.balloon_mib), 6, 1),
        cell(gs.and_then(|g| g.free_mib), 6, 1),
        cell(gs.and_then(|g| g.available_mib), 6, 1),
        end_marker(r)
    )
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

/// One JSON line.
pub fn json_row(r: &Row) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Parses `--prometheus ADDR` (an IP address and a port).
pub fn socket_addr_arg(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("expected IP:PORT, e.g. 127.0.0.1:9464 or [::1]:9464, not {s:?}"))
}

/// How rows are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Errors setting up or finishing the outputs.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[cfg(feature = "prometheus")]
    #[error(transparent)]
    Prometheus(#[from] prometheus::PrometheusError),
    #[cfg(feature = "plot")]
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    /// `--plot` names a file that cannot be written (checked before the run).
    #[cfg(feature = "plot")]
    #[error("--plot: {source}")]
    PlotPath { source: plot::PlotError },
    /// An output asked for whose cargo feature this build left out.
    #[error(
        "{flag}: this memvisor was built without the `{feature}` cargo feature (on by default)"
    )]
    FeatureOff {
        flag: &'static str,
        feature: &'static str,
    },
}

/// What became of the outputs at the end.
#[derive(Debug)]
pub struct Finished {
    /// The printed rows: those that did not reach standard output, or the write error that
    /// stopped it.
    pub printed: std::io::Result<NotWritten>,
    /// The plot, if asked for.
    pub plot: Result<(), OutputError>,
}

/// Where each row goes: the printed format (queued for the writer thread), the Prometheus
/// endpoint (latest row) and the plot written at the end.
pub struct Sink {
    lines: LineWriter,
    format: Format,
    #[cfg(feature = "prometheus")]
    exporter: Option<Exporter>,
    /// The rows the plot draws (a bounded [`plot::Recorder`]): `row` pushes, `finish` draws.
    #[cfg(feature = "plot")]
    plot: Option<(PathBuf, plot::Recorder)>,
}

impl Sink {
    /// Starts the Prometheus server (if `prometheus` is given) and checks the plot's file name
    /// before the run, so that a bad address or file name fails at once; starts the writer
    /// thread on `out` and queues the header. `pfn_visible`: whether this process can see host
    /// PFNs (the table's header says so). `warn`: where the writer says once that it drops rows.
    pub fn new<W: Write + Send + 'static>(
        out: W,
        format: Format,
        prometheus: Option<(SocketAddr, String)>,
        plot: Option<PathBuf>,
        pfn_visible: bool,
        warn: fn(String),
    ) -> Result<Self, OutputError> {
        #[cfg(feature = "plot")]
        if let Some(p) = &plot {
            plot::check_path(p).map_err(|source| OutputError::PlotPath { source })?;
        }
        #[cfg(not(feature = "plot"))]
        if plot.is_some() {
            return Err(OutputError::FeatureOff {
                flag: "--plot",
                feature: "plot",
            });
        }
        #[cfg(not(feature = "prometheus"))]
        if prometheus.is_some() {
            return Err(OutputError::FeatureOff {
                flag: "--prometheus",
                feature: "prometheus",
            });
        }
        #[cfg(feature = "prometheus")]
        let exporter = match prometheus {
            Some((addr, name)) => {
                let e = Exporter::start(addr, name)?;
                // stderr may be closed: the address is a courtesy, not a result.
                let _ = writeln!(
                    std::io::stderr(),
                    "memvisor: Prometheus metrics at http://{}/metrics",
                    e.local_addr()
                );
                Some(e)
            }
            None => None,
        };
        let mut lines = LineWriter::spawn(out, writer::QUEUE_LINES, warn);
        let header = match format {
            Format::Table => Some(table_header(pfn_visible)),
            Format::Csv => Some(crate::output::csv::header()),
            Format::Json => None,
        };
        if let Some(h) = header {
            // A failed write shows at the first row (or at the end).
            let _ = lines.send(h);
        }
        Ok(Sink {
            lines,
            format,
            #[cfg(feature = "prometheus")]
            exporter,
            #[cfg(feature = "plot")]
            plot: plot.map(|p| (p, plot::Recorder::default())),
        })
    }

    /// Hands one row to the Prometheus server and the plot, then queues its line; never blocks
    /// (the server only swaps in the latest row under a short lock). An error is a failed
    /// earlier write, the caller's to act on (a closed pipe stops the run).
    pub fn row(&mut self, row: &Row) -> std::io::Result<()> {
        #[cfg(feature = "prometheus")]
        if let Some(e) = &self.exporter {
            e.update(row);
        }
        #[cfg(feature = "plot")]
        if let Some((_, rec)) = &mut self.plot {
            rec.push(row);
        }
        let line = match self.format {
            Format::Table => table_row(row),
            Format::Json => json_row(row),
            Format::Csv => crate::output::csv::row(row),
        };
        self.lines.send(line)
    }

    /// Lets the writer finish (waiting at most [`writer::FINISH_WAIT`]), writes the plot (if
    /// asked for) and stops the Prometheus server.
    pub fn finish(self) -> Finished {
        let printed = self.lines.finish(writer::FINISH_WAIT);
        #[cfg(feature = "plot")]
        let plot = match &self.plot {
            Some((path, rec)) => plot::write(path, rec).map_err(OutputError::from),
            None => Ok(()),
        };
        #[cfg(not(feature = "plot"))]
        let plot = Ok(());
        Finished { printed, plot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{Active, GuestView, HostUsage, Swap, Truth};

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

    fn row_with(v: f64, phase: &str) -> Row {
        let mut r = Row {
            active: Some(Active {
                estimate_mib: v,
                ci_low_mib: v,
                ci_high_mib: v,
                max_mib: v,
                ..Active::default()
            }),
            reads_seen: true,
            balloon: None,
            swap: Some(Swap {
                swapped_mib: v,
                ..Swap::default()
            }),
            check: None,
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
                ..HostUsage::default()
            }),
            active_writes: Some(Active {
                estimate_mib: v,
                ci_low_mib: v,
                ci_high_mib: v,
                fast_mib: v,
                slow_mib: v,
                max_mib: v,
                dirty_rate_mib_s: v,
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

    #[test]
    fn absurd_values_keep_the_columns_of_the_header() {
        let header = table_header(true);
        // Without PFNs the header says so, in the same columns.
        let hidden = table_header(false);
        assert!(hidden.contains("no PFNs"), "{hidden}");
        assert_eq!(
            bars(hidden.lines().next().unwrap()),
            bars(header.lines().next().unwrap())
        );
        let names = header.lines().nth(1).unwrap();
        let width = names.chars().count();
        assert_eq!(bars(header.lines().next().unwrap()), bars(names));
        let ci_words: Vec<usize> = names.match_indices("95%").map(|(i, _)| i + 2).collect();
        let name_ends: Vec<usize> = ends(names)
            .into_iter()
            // "phase" is left-aligned and each "95% CI" has a space inside: compare the rest.
            .filter(|&i| i != names.find("phase").unwrap() + 4 && !ci_words.contains(&i))
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
                let line = table_row(&row_with(v, phase));
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
        // A clamped value says so.
        let line = table_row(&row_with(1e300, "x"));
        assert!(line.contains(">99999"), "{line}");
        let line = table_row(&row_with(-1e300, "x"));
        assert!(line.contains("<-9999"), "{line}");
        let line = table_row(&row_with(f64::NAN, "x"));
        assert!(line.contains(" ?"), "{line}");
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

    /// An output the test reads back after the writer thread finished.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn quiet(_: String) {}

    /// Built without its feature, an output asked for is a clear error before anything runs.
    #[cfg(not(all(feature = "plot", feature = "prometheus")))]
    #[test]
    fn an_output_left_out_of_the_build_is_a_clear_error() {
        #[cfg(not(feature = "prometheus"))]
        {
            let prom = Some(("127.0.0.1:0".parse().unwrap(), "x".to_string()));
            let err = Sink::new(Shared::default(), Format::Json, prom, None, true, quiet)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("--prometheus") && err.contains("`prometheus` cargo feature"),
                "{err}"
            );
        }
        #[cfg(not(feature = "plot"))]
        {
            let plot = Some(PathBuf::from("run.svg"));
            let err = Sink::new(Shared::default(), Format::Json, None, plot, true, quiet)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("--plot") && err.contains("`plot` cargo feature"),
                "{err}"
            );
        }
    }

    #[test]
    fn sink_prints_the_chosen_format() {
        let r = row_with(3.0, "idle 1s");
        let buf = Shared::default();
        let mut s = Sink::new(buf.clone(), Format::Csv, None, None, true, quiet).unwrap();
        s.row(&r).unwrap();
        let f = s.finish();
        assert_eq!(f.printed.unwrap().total(), 0);
        f.plot.unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [crate::output::csv::header(), crate::output::csv::row(&r)]
        );

        let buf = Shared::default();
        let mut s = Sink::new(buf.clone(), Format::Json, None, None, true, quiet).unwrap();
        s.row(&r).unwrap();
        assert_eq!(s.finish().printed.unwrap().total(), 0);
        let back: Row = serde_json::from_slice(&buf.0.lock().unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn the_last_row_says_why_the_run_ended_and_whether_it_was_cut_short() {
        let mut r = row_with(3.0, "idle 1s");
        assert!(!table_row(&r).contains("(end"));
        assert!(!table_row(&r).contains("(paused"));
        r.paused_s = 0.8;
        assert!(
            table_row(&r).ends_with("  (paused: 0.80 s)"),
            "{}",
            table_row(&r)
        );
        r.paused_s = 0.0;
        r.end = Some(crate::row::EndReason::Done);
        assert!(table_row(&r).ends_with("  (end)"));
        r.partial = true;
        r.length_s = 0.0213;
        r.end = Some(crate::row::EndReason::Timeout);
        assert!(
            table_row(&r).ends_with("  (partial: 0.02 s)  (end: timeout)"),
            "{}",
            table_row(&r)
        );
    }

    #[cfg(feature = "plot")]
    #[test]
    fn a_plot_path_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("p.svg");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Sink::new(
            Shared::default(),
            Format::Json,
            None,
            Some(fifo),
            true,
            quiet,
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let link = dir.path().join("l.svg");
        std::os::unix::fs::symlink(dir.path().join("target.svg"), &link).unwrap();
        let e = Sink::new(
            Shared::default(),
            Format::Json,
            None,
            Some(link),
            true,
            quiet,
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let new = dir.path().join("new.svg");
        assert!(
            Sink::new(
                Shared::default(),
                Format::Json,
                None,
                Some(new),
                true,
                quiet
            )
            .is_ok()
        );
    }
}
