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
pub mod table;
pub mod writer;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::row::Row;
#[cfg(feature = "prometheus")]
use prometheus::Exporter;
use writer::{LineWriter, NotWritten};

/// One JSON line.
pub fn json_row(r: &Row) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Parses `--prometheus ADDR`: `IP:PORT` (`127.0.0.1:9464`, `[::1]:9464`), `localhost:PORT`
/// (127.0.0.1, not resolved: no lookup can send it elsewhere) or `:PORT` (every interface, IPv6
/// and IPv4, as node_exporter's `:9100`). Port 0 picks a free port.
pub fn socket_addr_arg(s: &str) -> Result<SocketAddr, String> {
    let bad = || {
        format!(
            "expected IP:PORT, localhost:PORT or :PORT (every interface), e.g. 127.0.0.1:9464, \
             [::1]:9464, localhost:9464 or :9464, not {s:?}"
        )
    };
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    // Digits only: `parse` alone would take `+80`.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    match host {
        "" => Ok((std::net::Ipv6Addr::UNSPECIFIED, port).into()),
        h if h.eq_ignore_ascii_case("localhost") => {
            Ok((std::net::Ipv4Addr::LOCALHOST, port).into())
        }
        _ => Err(bad()),
    }
}

/// What the Prometheus info metrics say of a run: its `vm` label, `--workload` and `--seed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunInfo {
    pub name: String,
    pub workload: String,
    /// `None`: no `--seed` (the run is not reproducible); the label says `random`.
    pub seed: Option<u64>,
}

/// How rows are printed.
#[derive(Clone)]
pub enum Format {
    /// The table's columns, and how many rows to print between two headers (`None`: one header
    /// only; see [`table::header_every_for_stdout`]).
    Table {
        table: table::Table,
        header_every: Option<usize>,
    },
    Json,
    /// CSV rows of the VM named `name` (`run --name`).
    Csv {
        name: String,
    },
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
    /// Whether host PFNs are visible (the table's header says so).
    pfn_visible: bool,
    /// Table rows printed since the header was.
    since_header: usize,
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
        prometheus: Option<(SocketAddr, RunInfo)>,
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
            Some((addr, info)) => {
                let e = Exporter::start(addr, info)?;
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
        let header = match &format {
            Format::Table { table, .. } => Some(table.header(pfn_visible)),
            Format::Csv { .. } => Some(crate::output::csv::header()),
            Format::Json => None,
        };
        if let Some(h) = header {
            // A failed write shows at the first row (or at the end).
            let _ = lines.send(h);
        }
        Ok(Sink {
            lines,
            format,
            pfn_visible,
            since_header: 0,
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
        let line = match &self.format {
            Format::Table {
                table,
                header_every,
            } => {
                // The header again every screenful, in the same write as the row.
                let again = header_every.is_some_and(|n| self.since_header >= n);
                self.since_header = if again { 1 } else { self.since_header + 1 };
                if again {
                    format!("{}\n{}", table.header(self.pfn_visible), table.row(row))
                } else {
                    table.row(row)
                }
            }
            Format::Json => json_row(row),
            Format::Csv { name } => {
                crate::output::csv::row(row, name, std::time::SystemTime::now())
            }
        };
        self.lines.send(line)
    }

    /// Lets the writer finish (waiting at most [`writer::FINISH_WAIT`]), writes the plot (if
    /// asked for) and stops the Prometheus server.
    pub fn finish(self) -> Finished {
        self.finish_lingering(std::time::Duration::ZERO, &|| true)
    }

    /// As [`Sink::finish`], but the Prometheus server (if any) keeps serving the last row for
    /// `linger` once the rows are written and the plot drawn, or until `stop()` (`--prometheus-linger`).
    pub fn finish_lingering(
        self,
        linger: std::time::Duration,
        stop: &dyn Fn() -> bool,
    ) -> Finished {
        let printed = self.lines.finish(writer::FINISH_WAIT);
        #[cfg(feature = "plot")]
        let plot = match &self.plot {
            Some((path, rec)) => plot::write(path, rec).map_err(OutputError::from),
            None => Ok(()),
        };
        #[cfg(not(feature = "plot"))]
        let plot = Ok(());
        #[cfg(feature = "prometheus")]
        if let Some(e) = &self.exporter {
            e.linger(linger, stop);
        }
        #[cfg(not(feature = "prometheus"))]
        let _ = (linger, stop);
        Finished { printed, plot }
    }
}

#[cfg(test)]
mod tests {
    use super::table::tests::row_with;
    use super::*;

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

    #[test]
    fn listen_addresses_as_node_exporter_takes_them() {
        let ok = |s: &str| socket_addr_arg(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("127.0.0.1:9464"), "127.0.0.1:9464".parse().unwrap());
        assert_eq!(ok("[::1]:9464"), "[::1]:9464".parse().unwrap());
        assert_eq!(ok("localhost:9464"), "127.0.0.1:9464".parse().unwrap());
        assert_eq!(ok("LocalHost:0"), "127.0.0.1:0".parse().unwrap());
        // Every interface, IPv6 and (dual-stack) IPv4.
        assert_eq!(ok(":9100"), "[::]:9100".parse().unwrap());
        assert_eq!(ok("0.0.0.0:9100"), "0.0.0.0:9100".parse().unwrap());
        for bad in [
            "",
            ":",
            "9464",
            "localhost",
            "localhost:",
            ":+80",
            ":65536",
            "example.com:80",
            "127.0.0.1",
            "::1:80",
            "localhost:80:80",
            " :80",
            ":-1",
        ] {
            let e = socket_addr_arg(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} taken"));
            assert!(e.contains(":PORT"), "{bad:?}: {e}");
        }
    }

    /// Built without its feature, an output asked for is a clear error before anything runs.
    #[cfg(not(all(feature = "plot", feature = "prometheus")))]
    #[test]
    fn an_output_left_out_of_the_build_is_a_clear_error() {
        #[cfg(not(feature = "prometheus"))]
        {
            let prom = Some(("127.0.0.1:0".parse().unwrap(), RunInfo::default()));
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

    /// The lines a table sink prints for `rows` rows, repeating its header every `every`.
    fn table_lines(rows: usize, every: Option<usize>) -> Vec<String> {
        let buf = Shared::default();
        let table = table::Table::default();
        let format = Format::Table {
            table,
            header_every: every,
        };
        let mut s = Sink::new(buf.clone(), format, None, None, true, quiet).unwrap();
        for i in 0..rows {
            s.row(&row_with(i as f64, "idle")).unwrap();
        }
        assert_eq!(s.finish().printed.unwrap().total(), 0);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(String::from).collect()
    }

    #[test]
    fn the_header_is_repeated_every_screenful() {
        let header: Vec<String> = table::Table::default()
            .header(true)
            .lines()
            .map(String::from)
            .collect();
        // Every 3 rows: the header, 3 rows, the header, 3 rows, the header, 1 row.
        let lines = table_lines(7, Some(3));
        assert_eq!(lines.len(), 3 * 2 + 7, "{lines:#?}");
        for at in [0, 5, 10] {
            assert_eq!(lines[at..at + 2], header[..], "at {at}: {lines:#?}");
        }
        let data: Vec<&String> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| ![0, 1, 5, 6, 10, 11].contains(i))
            .map(|(_, l)| l)
            .collect();
        for (i, l) in data.iter().enumerate() {
            assert_eq!(
                **l,
                table::Table::default().row(&row_with(i as f64, "idle"))
            );
        }
        // Never: one header.
        let lines = table_lines(7, None);
        assert_eq!(lines.len(), 2 + 7);
        assert_eq!(lines.iter().filter(|l| **l == header[1]).count(), 1);
    }

    #[test]
    fn sink_prints_the_chosen_format() {
        let r = row_with(3.0, "idle 1s");
        let buf = Shared::default();
        let csv = Format::Csv { name: "web".into() };
        let before = std::time::SystemTime::now();
        let mut s = Sink::new(buf.clone(), csv, None, None, true, quiet).unwrap();
        s.row(&r).unwrap();
        let f = s.finish();
        let after = std::time::SystemTime::now();
        assert_eq!(f.printed.unwrap().total(), 0);
        f.plot.unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], crate::output::csv::header());
        // Stamped with the wall clock when it was printed (to the millisecond).
        let (stamp, rest) = lines[1].split_once(',').unwrap();
        let bounds = [before, after].map(crate::units::rfc3339_utc);
        assert!(
            bounds[0].as_str() <= stamp && stamp <= bounds[1].as_str(),
            "{stamp}"
        );
        let expect = crate::output::csv::row(&r, "web", before);
        assert_eq!(rest, expect.split_once(',').unwrap().1);

        let buf = Shared::default();
        let mut s = Sink::new(buf.clone(), Format::Json, None, None, true, quiet).unwrap();
        s.row(&r).unwrap();
        assert_eq!(s.finish().printed.unwrap().total(), 0);
        let back: Row = serde_json::from_slice(&buf.0.lock().unwrap()).unwrap();
        assert_eq!(back, r);
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
