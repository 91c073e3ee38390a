//! `memvisor host`: the command line (or a TOML file with the same settings), checked into a
//! [`HostConfig`] before any VM starts, and the host's rows printed as a table or JSON lines.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

use crate::files::FileError;
use crate::output::OutputError;
use crate::units::{fmt_mib, parse_duration, parse_size};

use super::csv::CsvLog;
use super::scheduler::DEFAULT_TAX;
use super::spec::{self, SpecError};
use super::supervisor::{HostConfig, HostRow};

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Shortest period: a VM's rows come at this interval, and the run's shortest is 10 ms.
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// The options of `memvisor host`.
#[derive(Args, Clone, Debug, Default)]
pub struct HostOptions {
    /// A TOML file with the same settings (`budget`, `tax`, `period`, and one `[[vm]]` table per
    /// VM with the keys of --vm); options given here override its `budget`, `tax` and `period`.
    pub file: Option<PathBuf>,
    /// Machine memory the VMs may use together (their granted memory and overheads), e.g. 1G.
    #[arg(long, value_parser = size_arg)]
    pub budget: Option<u64>,
    /// The idle memory tax, 0 to 1 (ESX's default 0.75): how much more an idle page costs its VM
    /// than an active one when memory is taken back.
    #[arg(long)]
    pub tax: Option<f64>,
    /// How often the host decides (and each VM reports).
    #[arg(long, value_parser = duration_arg)]
    pub period: Option<Duration>,
    /// One VM: name=web,mem=512M,shares=1000,reservation=128M,limit=400M,OPTION=VALUE,...,
    /// workload=... (workload last: it takes the rest). Repeat for each VM.
    #[arg(long = "vm", value_name = "SPEC")]
    pub vms: Vec<String>,
    /// One JSON object per period instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write each period to this CSV file as the host runs, esxtop's batch style: one row per
    /// period, one column per VM and field (`\\host\free_MiB`, `\\vm(web)\target_MiB`...).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Serve the latest period to Prometheus at http://ADDR/metrics: the host's metrics and each
    /// VM's, labelled with its name (`vm="web"`). ADDR: IP:PORT (127.0.0.1:9464),
    /// localhost:PORT, or :PORT for every interface (reachable from the network: see README).
    #[arg(long, value_name = "ADDR", value_parser = crate::output::socket_addr_arg)]
    pub prometheus: Option<SocketAddr>,
    /// Keep serving the final period's metrics this long after the VMs end (e.g. 15s, a little
    /// over the scrape interval), so that the last scrape sees it; a SIGINT or SIGTERM ends the
    /// wait.
    #[arg(long, value_name = "DURATION", requires = "prometheus", value_parser = duration_arg)]
    pub prometheus_linger: Option<Duration>,
    /// Draw the host's plot to this file at the end, also when stopped (.svg or .png): each VM's
    /// granted memory stacked under the budget, and each VM's target and active memory.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Serve a control socket here (mode 0600) while the host runs: `query` answers the latest
    /// period (the `--json` object, each VM with its latest row), for `memvisor top --control`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Start the host kernel's ksmd (/sys/kernel/mm/ksm/run = 1) for the VMs given `ksm`, and put
    /// its old value back at the end, also after SIGINT or SIGTERM (not after SIGKILL).
    #[arg(long)]
    pub ksm_run: bool,
}

/// Why the host's settings are refused.
#[derive(Debug, Error)]
pub enum HostCliError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("--budget is needed (on the command line or in the file)")]
    NoBudget,
    #[error("--tax must be between 0 and 1, not {0}")]
    Tax(f64),
    #[error("--period must be at least {} ms", MIN_PERIOD.as_millis())]
    Period,
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot find the memvisor binary to run the VMs: {0}")]
    Exe(std::io::Error),
    #[error("--csv: {0}")]
    Csv(#[source] FileError),
    #[cfg(feature = "plot")]
    #[error("--plot: {0}")]
    Plot(#[source] super::plot::PlotError),
    #[cfg(feature = "prometheus")]
    #[error(transparent)]
    Prometheus(#[from] crate::output::prometheus::PrometheusError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("--control: {0}")]
    Control(#[source] crate::control::ControlError),
    #[error("--ksm-run: {0}")]
    KsmRun(#[source] crate::memory::ksm::KsmError),
}

/// The host file's form.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    budget: Option<String>,
    tax: Option<f64>,
    period: Option<String>,
    #[serde(default)]
    vm: Vec<toml::Table>,
}

/// Largest host file read.
const MAX_FILE: u64 = 1 << 20;

impl HostOptions {
    /// Checks the settings and the VM specs into a configuration, before anything starts.
    pub fn config(&self) -> Result<HostConfig, HostCliError> {
        let mut file = HostFile::default();
        if let Some(path) = &self.file {
            file = read_file(path)?;
        }
        let bad = |why: String| HostCliError::File {
            path: self.file.clone().unwrap_or_default(),
            why,
        };
        let budget = match (self.budget, &file.budget) {
            (Some(b), _) => b,
            (None, Some(s)) => parse_size(s).map_err(|e| bad(format!("budget: {e}")))?,
            (None, None) => return Err(HostCliError::NoBudget),
        };
        let tax = self.tax.or(file.tax).unwrap_or(DEFAULT_TAX);
        if !(0.0..=1.0).contains(&tax) {
            return Err(HostCliError::Tax(tax));
        }
        let period = match (self.period, &file.period) {
            (Some(p), _) => p,
            (None, Some(s)) => parse_duration(s).map_err(|e| bad(format!("period: {e}")))?,
            (None, None) => Duration::from_secs(1),
        };
        if period < MIN_PERIOD {
            return Err(HostCliError::Period);
        }
        let mut texts: Vec<String> = Vec::new();
        for (i, t) in file.vm.iter().enumerate() {
            texts
                .push(table_spec(t).map_err(|why| bad(format!("[[vm]] number {}: {why}", i + 1)))?);
        }
        texts.extend(self.vms.iter().cloned());
        let vms = texts
            .iter()
            .enumerate()
            .map(|(i, s)| spec::parse(s, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HostConfig {
            budget,
            tax,
            period,
            vms,
            exe: std::env::current_exe().map_err(HostCliError::Exe)?,
        })
    }
}

fn read_file(path: &Path) -> Result<HostFile, HostCliError> {
    let bad = |why: String| HostCliError::File {
        path: path.to_path_buf(),
        why,
    };
    let mut text = String::new();
    crate::files::open_regular(path)
        .map_err(|e| bad(e.to_string()))?
        .take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_FILE {
        return Err(bad(format!("larger than {}", fmt_mib(MAX_FILE))));
    }
    toml::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// A `[[vm]]` table as a SPEC: its keys in order, `workload` last.
fn table_spec(t: &toml::Table) -> Result<String, String> {
    let mut items = Vec::new();
    let mut workload = None;
    for (k, v) in t {
        let value = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(true) => {
                items.push(k.clone());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            _ => return Err(format!("{k}: a string, number or true/false is expected")),
        };
        if k == "workload" {
            workload = Some(value);
        } else if value.contains(',') {
            return Err(format!("{k}: a value may not contain ','"));
        } else {
            items.push(format!("{k}={value}"));
        }
    }
    if let Some(w) = workload {
        items.push(format!("workload={w}"));
    }
    Ok(items.join(","))
}

/// The table's header: the host line's names, then esxtop's memory-screen names per VM. Sizes
/// are MiB, or GiB with a `G` when MiB would need more than 6 digits (as `memvisor run`'s table).
/// With `sharing` (some VM runs with `ksm`) the host line gains `saved` (the VMs' parts added up)
/// and each VM line SHRD and SHRDSVD in place of its settings (shares, reservation, limit: the
/// same every period, and in `--json`), so that a line still fits 120 columns.
pub fn table_header(sharing: bool) -> String {
    let host = format!(
        "{:>7} {:<5} {:>8} {:>8} {:>8}",
        "time", "state", "budget", "free", "targets"
    );
    let saved = if sharing {
        format!(" {:>8}", "saved")
    } else {
        String::new()
    };
    let vm = format!(
        "  {:<10} {:>6} {:>6} {:>6} {:>6} {:>5} {:>6} {:>7} {:>6} {:>6} {:>6}",
        "VM",
        "MEMSZ",
        "SZTGT",
        "GRANT",
        "TCHD",
        "%ACTV",
        "MCTLSZ",
        "MCTLTGT",
        "SWCUR",
        "SWTGT",
        "OVHD"
    );
    let middle = if sharing {
        format!(" {:>6} {:>7}", "SHRD", "SHRDSVD")
    } else {
        format!(" {:>6} {:>6} {:>6}", "shares", "resv", "limit")
    };
    format!(
        "{host}{saved}  (MiB)\n{vm}{middle} {:>5} {:>9}",
        "st", "rate"
    )
}

/// One period as a block: the host line, then one line per VM, each at most 120 characters; with
/// `sharing`, the columns of [`table_header`]`(true)`.
pub fn table_block(row: &HostRow, sharing: bool) -> String {
    use crate::output::table::{cell, size_cell, size_cell0};
    let h = &row.host;
    let mut s = format!(
        "{:>6}s {:<5} {:>8} {:>8} {:>8}",
        cell(Some(row.time_s), 6, 1),
        h.state.as_str(),
        size_cell(Some(h.budget_mib), 8),
        size_cell(Some(h.free_mib), 8),
        size_cell(Some(h.targets_mib), 8)
    );
    if sharing {
        s.push_str(&format!(" {:>8}", size_cell(Some(h.saved_mib), 8)));
    }
    for v in &row.vms {
        let status = match v.status {
            "running" if v.paused => "pause",
            "running" if v.balloon_stuck => "swap",
            "running" => "run",
            "ended" => "end",
            _ => "FAIL",
        };
        let size = |m: f64| size_cell(Some(m), 6);
        let middle = if sharing {
            format!(
                " {:>6} {:>7}",
                size(v.shared_mib),
                size_cell(Some(v.saved_mib), 7)
            )
        } else {
            format!(
                " {:>6} {:>6} {:>6}",
                cell(Some(v.shares as f64), 6, 0),
                size_cell0(Some(v.reservation_mib), 6),
                size_cell0(v.limit_mib, 6)
            )
        };
        s.push_str(&format!(
            "\n  {:<10} {:>6} {:>6} {:>6} {:>6} {:>5} {:>6} {:>7} {:>6} {:>6} {:>6}{middle} {:>5} {:>9}",
            truncate(&v.name, 10),
            size(v.mem_mib),
            size(v.target_mib),
            size(v.granted_mib),
            size(v.active_mib),
            cell(Some(v.active_pct), 5, 0),
            size(v.balloon_mib),
            size_cell(Some(v.balloon_target_mib), 7),
            size(v.swapped_mib),
            size(v.swap_target_mib),
            size(v.overhead_mib),
            status,
            v.rate.map_or("-".into(), |r| format!("{r:.3e}")),
        ));
    }
    s
}

fn truncate(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// The outputs beside stdout: the CSV file, the Prometheus endpoint and the plot.
struct Outputs {
    csv: Option<CsvLog>,
    control: Option<super::control::HostControl>,
    #[cfg(feature = "prometheus")]
    exporter: Option<super::metrics::Exporter>,
    #[cfg(feature = "plot")]
    plot: Option<(PathBuf, super::plot::Recorder)>,
}

impl Outputs {
    /// Checks the plot's file, creates the CSV file and starts the endpoint: a bad path or
    /// address is refused here, before any VM starts.
    fn start(opts: &HostOptions, cfg: &HostConfig) -> Result<Self, HostCliError> {
        #[cfg(feature = "plot")]
        if let Some(p) = &opts.plot {
            super::plot::check(p).map_err(HostCliError::Plot)?;
        }
        #[cfg(not(feature = "plot"))]
        if opts.plot.is_some() {
            return Err(OutputError::FeatureOff {
                flag: "--plot",
                feature: "plot",
            }
            .into());
        }
        #[cfg(not(feature = "prometheus"))]
        let _ = cfg;
        #[cfg(not(feature = "prometheus"))]
        if opts.prometheus.is_some() {
            return Err(OutputError::FeatureOff {
                flag: "--prometheus",
                feature: "prometheus",
            }
            .into());
        }
        #[cfg(feature = "prometheus")]
        let exporter = match opts.prometheus {
            Some(addr) => {
                let vms = cfg.vms.iter().map(super::metrics::VmInfo::of).collect();
                let e = super::metrics::Exporter::start(addr, vms)?;
                // stderr may be closed: the address is a courtesy, not a result.
                let _ = writeln!(
                    std::io::stderr(),
                    "memvisor: Prometheus metrics at http://{}{}",
                    e.local_addr(),
                    crate::output::prometheus::PATH
                );
                Some(e)
            }
            None => None,
        };
        let csv = (opts.csv.as_deref())
            .map(CsvLog::create)
            .transpose()
            .map_err(HostCliError::Csv)?;
        let control = (opts.control.as_deref())
            .map(super::control::HostControl::start)
            .transpose()
            .map_err(HostCliError::Control)?;
        Ok(Outputs {
            csv,
            control,
            #[cfg(feature = "prometheus")]
            exporter,
            #[cfg(feature = "plot")]
            plot: opts
                .plot
                .clone()
                .map(|p| (p, super::plot::Recorder::default())),
        })
    }

    /// Hands one period to each output.
    fn period(&mut self, row: &HostRow) -> std::io::Result<()> {
        if let Some(c) = &self.control {
            c.publish(row);
        }
        #[cfg(feature = "prometheus")]
        if let Some(e) = &self.exporter {
            e.update(row);
        }
        #[cfg(feature = "plot")]
        if let Some((_, rec)) = &mut self.plot {
            rec.push(row);
        }
        match &mut self.csv {
            Some(c) => c.row(row),
            None => Ok(()),
        }
    }

    /// Draws the plot, if asked for; then, with `--prometheus-linger`, serves the last period on
    /// for that long or until `stop()`.
    fn finish(self, linger: Duration, stop: &dyn Fn() -> bool) -> Result<(), HostCliError> {
        #[cfg(feature = "plot")]
        let plot = match &self.plot {
            Some((path, rec)) => super::plot::write(path, rec).map_err(HostCliError::Plot),
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
        plot
    }
}

/// Runs the host, printing its rows to stdout and handing them to the other outputs. The plot is
/// drawn whatever ended the run.
pub fn run(opts: &HostOptions) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = opts.config()?;
    // Admission first, so that a refused host creates no file.
    super::supervisor::admit(&cfg)?;
    // ksmd runs while this lives: dropped on every way out of here, a stop signal's included.
    let _ksmd = opts
        .ksm_run
        .then(crate::memory::ksm::KsmRun::start)
        .transpose()
        .map_err(HostCliError::KsmRun)?;
    let mut outputs = Outputs::start(opts, &cfg)?;
    let mut out = std::io::stdout().lock();
    // SHRD and SHRDSVD take the settings' place when some VM may share pages.
    let sharing = cfg.vms.iter().any(|v| v.ksm());
    if !opts.json {
        writeln!(out, "{}", table_header(sharing))?;
    }
    let json = opts.json;
    // Signals that came before the last period (one of them stopped the host) do not end the
    // linger: the next one does.
    let mut signals = 0;
    let result = super::supervisor::run(&cfg, &mut |row| {
        signals = crate::vmm::stop::signal_count();
        // The exporters first: a reader who sees this period's line can scrape this period.
        let exported = outputs.period(row);
        let line = if json {
            serde_json::to_string(row).map_err(std::io::Error::other)?
        } else {
            table_block(row, sharing)
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        exported
    });
    let plot = outputs.finish(opts.prometheus_linger.unwrap_or_default(), &|| {
        crate::vmm::stop::signal_count() > signals
    });
    match (result, plot) {
        (Err(e), Err(p)) => {
            log::error!("{p}");
            Err(e.into())
        }
        (Err(e), Ok(())) => Err(e.into()),
        (Ok(_), plot) => Ok(plot?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    fn opts(vms: &[&str]) -> HostOptions {
        HostOptions {
            budget: Some(1024 * MIB),
            vms: vms.iter().map(|s| s.to_string()).collect(),
            ..HostOptions::default()
        }
    }

    #[test]
    fn the_command_line_makes_a_config() {
        let c = opts(&["name=a,mem=256M", "mem=256M,shares=5"])
            .config()
            .unwrap();
        assert_eq!(c.budget, 1024 * MIB);
        assert_eq!(c.tax, DEFAULT_TAX);
        assert_eq!(c.period, Duration::from_secs(1));
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[1].name, "vm2");
        assert_eq!(c.vms[1].shares, 5);
    }

    #[test]
    fn the_table_fits_120_columns_with_big_values() {
        for sharing in [false, true] {
            for l in table_header(sharing).lines() {
                assert!(l.chars().count() <= 120, "{l}");
            }
            let mut r = crate::host::testing::rows(2).remove(1);
            r.time_s = 86_399.9;
            r.host.budget_mib = 16_777_216.0;
            r.host.free_mib = 1_048_576.5;
            r.host.targets_mib = 15_000_000.0;
            r.host.saved_mib = 8_000_000.0;
            for v in &mut r.vms {
                v.name = "a-name-of-32-characters-in-length".into();
                v.mem_mib = 4_194_304.0;
                v.target_mib = 3_500_000.0;
                v.granted_mib = 4_000_000.0;
                v.active_mib = 2_621_440.0;
                v.active_pct = 100.0;
                v.balloon_mib = 999_999.0;
                v.balloon_target_mib = 1_200_000.0;
                v.swapped_mib = 2_000_000.0;
                v.swap_target_mib = 2_000_000.0;
                v.overhead_mib = 1100.5;
                v.shared_mib = 4_000_000.0;
                v.saved_mib = 3_999_999.5;
                v.shares = 400_000;
                v.reservation_mib = 1_048_576.0;
                v.limit_mib = Some(4_194_304.0);
                v.rate = Some(1.234e12);
                v.paused = true;
            }
            let block = table_block(&r, sharing);
            let header = table_header(sharing);
            let names = header.lines().nth(1).unwrap();
            for l in block.lines() {
                assert!(l.chars().count() <= 120, "{l}");
                assert!(!l.contains('>'), "clamped: {l}");
            }
            // Each line has its header's columns, with the esxtop names kept.
            let vm_line = block.lines().nth(1).unwrap();
            assert_eq!(
                vm_line.chars().count(),
                names.chars().count(),
                "\n{names}\n{vm_line}"
            );
            let host_line = block.lines().next().unwrap();
            let host_names = header.lines().next().unwrap();
            assert_eq!(
                host_line.split_whitespace().count() + 1,
                host_names.split_whitespace().count(),
                "\n{host_names}\n{host_line}"
            );
            for n in [
                "MEMSZ", "SZTGT", "GRANT", "TCHD", "%ACTV", "MCTLSZ", "MCTLTGT", "SWCUR",
            ] {
                assert!(names.contains(n), "{names}");
            }
            assert!(
                vm_line.contains("4096G") && vm_line.contains("pause"),
                "{vm_line}"
            );
            assert_eq!(names.contains("SHRDSVD"), sharing, "{names}");
            assert_eq!(names.contains("shares"), !sharing, "{names}");
            assert_eq!(host_names.contains("saved"), sharing, "{host_names}");
        }
    }

    #[test]
    fn sharing_shows_shrd_and_shrdsvd_under_their_names() {
        let mut r = crate::host::testing::rows(2).remove(1);
        r.host.saved_mib = 31.7;
        for (i, v) in r.vms.iter_mut().enumerate() {
            v.shared_mib = 32.0 + i as f64;
            v.saved_mib = 15.8 + i as f64;
        }
        let header = table_header(true);
        let block = table_block(&r, true);
        // The value under each name (names and cells hold no spaces here).
        let under = |names: &str, line: &str, name: &str| -> String {
            let at = names.split_whitespace().position(|n| n == name).unwrap();
            line.split_whitespace().nth(at).unwrap().to_string()
        };
        let (h1, h2) = (
            header.lines().next().unwrap(),
            header.lines().nth(1).unwrap(),
        );
        assert_eq!(under(h1, block.lines().next().unwrap(), "saved"), "31.7");
        for (i, line) in block.lines().skip(1).enumerate() {
            assert_eq!(under(h2, line, "SHRD"), format!("{:.1}", 32.0 + i as f64));
            assert_eq!(
                under(h2, line, "SHRDSVD"),
                format!("{:.1}", 15.8 + i as f64)
            );
        }
        // Without sharing, the settings instead.
        assert!(!table_block(&r, false).contains("15.8"));
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut o = opts(&["mem=64M"]);
        o.budget = None;
        assert!(matches!(o.config(), Err(HostCliError::NoBudget)));
        let mut o = opts(&["mem=64M"]);
        o.tax = Some(1.5);
        assert!(matches!(o.config(), Err(HostCliError::Tax(_))));
        let mut o = opts(&["mem=64M"]);
        o.period = Some(Duration::from_millis(10));
        assert!(matches!(o.config(), Err(HostCliError::Period)));
        assert!(matches!(
            opts(&["mem=lots"]).config(),
            Err(HostCliError::Spec(_))
        ));
    }

    #[test]
    fn a_host_file_gives_the_same_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(
            &path,
            r#"
budget = "768M"
tax = 0.5
period = "2s"

[[vm]]
workload = "alloc 16M; touch 16M write"
name = "web"
mem = "256M"
shares = 2000
free-page-reporting = true

[[vm]]
mem = "256M"
"#,
        )
        .unwrap();
        let o = HostOptions {
            file: Some(path.clone()),
            vms: vec!["name=extra,mem=64M,workload=alloc 8M".into()],
            ..HostOptions::default()
        };
        let c = o.config().unwrap();
        assert_eq!(c.budget, 768 * MIB);
        assert_eq!(c.tax, 0.5);
        assert_eq!(c.period, Duration::from_secs(2));
        let names: Vec<&str> = c.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["web", "vm2", "extra"]);
        assert_eq!(c.vms[0].shares, 2000);
        assert!(
            c.vms[0]
                .run_args
                .contains(&"--free-page-reporting".to_string())
        );
        assert_eq!(
            c.vms[0].run_args.last().unwrap(),
            "--workload=alloc 16M; touch 16M write"
        );
        // The command line overrides the file.
        let o = HostOptions {
            file: Some(path.clone()),
            budget: Some(2048 * MIB),
            ..HostOptions::default()
        };
        assert_eq!(o.config().unwrap().budget, 2048 * MIB);
        // Unknown top-level keys and bad values are refused with the file's name.
        std::fs::write(&path, "budget = \"1G\"\nbudjet = 3\n").unwrap();
        let e = HostOptions {
            file: Some(path.clone()),
            ..HostOptions::default()
        }
        .config()
        .unwrap_err();
        assert!(e.to_string().contains("host.toml"), "{e}");
        std::fs::write(&path, "budget = \"1G\"\n[[vm]]\nmem = [1]\n").unwrap();
        assert!(
            HostOptions {
                file: Some(path),
                ..HostOptions::default()
            }
            .config()
            .is_err()
        );
    }
}
