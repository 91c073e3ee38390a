//! memvisor: boot a guest and show, side by side, what it costs the host and what it uses.
//!
//! The recipe: parse the command line, validate it into a run, then `vmm::setup` builds guest
//! memory, the VM and its devices, `--control` serves the VM's control socket, and the run
//! creates the vCPU, runs, and hands each interval's row here to print.
//!
//! Exit codes: 0 the guest ran its workload; 1 an error (bad options, a guest failure, a VMM
//! failure); 2 a usage error; 124 `--timeout`; 130 SIGINT; 143 SIGTERM or `stop` on the control
//! socket; 141 the output pipe closed.

use std::error::Error;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use memvisor::control::{self, ControlError, ControlServer};
use memvisor::observe::pmp_mmp::MapFile;
use memvisor::output::{self, writer};
use memvisor::row::{EndReason, Row};
use memvisor::vmm::config::{RunConfig, RunOptions};
use memvisor::vmm::stop;
use memvisor::vmm::{self, RunError};

#[derive(Parser)]
#[command(
    name = "memvisor",
    version,
    about = "A KVM hypervisor that makes guest memory visible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Boot the test guest, run a workload, print host and guest memory usage per interval.
    Run(Box<RunArgs>),
    /// Plot a run from its `run --json` output.
    Plot {
        /// The JSON lines written by `memvisor run --json`.
        file: PathBuf,
        /// The image to write: .svg or .png.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Run several VMs on one memory budget, each its own `memvisor run` driven over its control
    /// socket; shares, reservations, limits and the idle memory tax decide who gives memory back.
    Host(Box<memvisor::host::cli::HostOptions>),
    /// Summarise a PMP-MMP map file written by `run --map-out`.
    Map {
        /// The map file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    options: RunOptions,
    /// One JSON object per line instead of the table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV instead of the table: a header row (units in the names), then one row per interval.
    #[arg(long)]
    csv: bool,
    /// Serve the latest interval to Prometheus at http://ADDR/metrics: IP:PORT (127.0.0.1:9464),
    /// localhost:PORT, or :PORT for every interface (reachable from the network: see README).
    #[arg(long, value_name = "ADDR", value_parser = output::socket_addr_arg)]
    prometheus: Option<std::net::SocketAddr>,
    /// The `vm` label of the Prometheus metrics (default: the process id).
    #[arg(long, requires = "prometheus")]
    name: Option<String>,
    /// Keep serving the final row's metrics this long after the run ends (e.g. 15s, a little over
    /// the scrape interval), so that the last scrape sees it; a SIGINT or SIGTERM ends the wait.
    #[arg(long, value_name = "DURATION", requires = "prometheus", value_parser = duration_arg)]
    prometheus_linger: Option<std::time::Duration>,
    /// Draw the run's plot to this file at the end, also when the run is stopped (.svg or .png).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Serve a control socket here (mode 0600) while the VM runs: query its latest row, set its
    /// balloon target, stop it (docs/control.md).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    memvisor::units::parse_duration(s).map_err(|e| e.to_string())
}

/// A failure of the command, with the exit code it calls for.
struct Failure {
    code: u8,
    /// `None`: exit quietly (the reader of our output went away).
    message: Option<String>,
}

impl Failure {
    fn new(code: u8, e: &(dyn Error + 'static)) -> Self {
        Failure {
            code,
            message: Some(chain(e)),
        }
    }

    /// The rows' reader went away: the exit code a shell expects, and no message.
    fn output_closed() -> Self {
        Failure {
            code: stop::exit_code(EndReason::OutputClosed),
            message: None,
        }
    }
}

/// An error and its sources, joined with ": ", leaving out a source that its parent's message
/// already quotes.
fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let (workload, seed) = (args.options.workload.clone(), args.options.seed);
    let cfg = RunConfig::new(args.options).map_err(|e| Failure::new(1, &e))?;
    let format = match (args.json, args.csv) {
        (true, _) => output::Format::Json,
        (_, true) => output::Format::Csv,
        _ => output::Format::Table,
    };
    let prometheus = args.prometheus.map(|addr| {
        let info = output::RunInfo {
            name: args.name.unwrap_or_else(|| std::process::id().to_string()),
            workload,
            seed,
        };
        (addr, info)
    });
    // Whether this process sees host PFNs (root with CAP_SYS_ADMIN): the table's header says so.
    let pfn_visible = memvisor::memory::pagemap::Pagemap::open().is_ok_and(|p| p.pfn_visible());
    // Rows go to stdout through the writer thread: the run never waits on its reader.
    let mut sink = output::Sink::new(
        io::stdout(),
        format,
        prometheus,
        args.plot,
        pfn_visible,
        writer::warn_stderr,
    )
    .map_err(|e| Failure::new(1, &e))?;
    // Signals that came before the last row (one of them ended the run) do not end the
    // --prometheus-linger: the next one does.
    let mut signals = 0;
    // Set-up, then the control socket (which needs the set-up VM's controller), then the run;
    // the socket is stopped and removed as soon as the run ends.
    let result = vmm::setup(cfg).map_err(Started::Run).and_then(|ready| {
        let control = (args.control.as_deref())
            .map(|p| ControlServer::start(p, control::vm::handler(ready.controller())))
            .transpose()
            .map_err(Started::Control)?;
        let result = ready.run(&mut |row: &Row| {
            signals = stop::signal_count();
            sink.row(row)
        });
        drop(control);
        result.map_err(Started::Run)
    });
    // The plot is drawn whatever ended the run: a stop loses no result. With
    // --prometheus-linger the endpoint then serves the last row on, until the next signal.
    let finished = sink.finish_lingering(args.prometheus_linger.unwrap_or_default(), &|| {
        stop::signal_count() > signals
    });
    if let Ok(not) = &finished.printed
        && not.total() > 0
    {
        writer::say_on_stderr(
            format!(
                "memvisor: {} row(s) were not written to standard output: it was not read fast \
                 enough ({} dropped from the full queue, {} still queued at the end)",
                not.total(),
                not.dropped,
                not.abandoned
            ),
            writer::FINISH_WAIT,
        );
    }
    match result {
        Ok(summary) => {
            log::info!(
                "set-up to first instruction: {:.1} ms; ran {:.1} s",
                summary.setup_ms,
                summary.elapsed_s
            );
            finished.printed.map_err(write_failure)?;
            finished.plot.map_err(|e| Failure::new(1, &e))
        }
        Err(Started::Run(RunError::OutputClosed)) => Err(Failure::output_closed()),
        Err(Started::Control(e)) => Err(Failure::new(1, &e)),
        Err(Started::Run(e)) => {
            if let Err(plot) = finished.plot {
                writer::say_on_stderr(
                    format!("memvisor: error: {}", chain(&plot)),
                    writer::FINISH_WAIT,
                );
            }
            Err(Failure::new(stop::exit_code(e.end_reason()), &e))
        }
    }
}

/// What failed: the VM, or its control socket before it ran.
enum Started {
    Run(RunError),
    Control(ControlError),
}

/// A failed write to stdout: quiet for a closed pipe, else a message.
fn write_failure(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::output_closed()
    } else {
        Failure {
            code: 1,
            message: Some(format!("writing to standard output: {e}")),
        }
    }
}

fn map(file: PathBuf, json: bool) -> Result<(), Failure> {
    let s = MapFile::open(&file)
        .and_then(MapFile::summary)
        .map_err(|e| {
            // Errors opening the file name it already; errors in its contents do not.
            let text = chain(&e);
            let path = file.display().to_string();
            Failure {
                code: 1,
                message: Some(if text.contains(&path) {
                    text
                } else {
                    format!("{path}: {text}")
                }),
            }
        })?;
    let text = if json {
        serde_json::to_string(&s).map_err(|e| Failure::new(1, &e))?
    } else {
        s.to_string()
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|_| out.flush())
        .map_err(write_failure)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            if let Err(e) = stop::install_handlers() {
                log::warn!("cannot catch SIGINT/SIGTERM, a signal will end the run abruptly: {e}");
            }
            run(*args)
        }
        Command::Host(opts) => {
            if let Err(e) = stop::install_handlers() {
                log::warn!("cannot catch SIGINT/SIGTERM, a signal will stop the VMs abruptly: {e}");
            }
            memvisor::host::cli::run(&opts).map_err(|e| Failure::new(1, &*e))
        }
        Command::Map { file, json } => map(file, json),
        #[cfg(feature = "plot")]
        Command::Plot { file, output } => {
            use memvisor::output::plot;
            // The output is checked first: a bad one fails before a long input is read.
            plot::check_path(&output)
                .and_then(|()| plot::read_jsonl(&file))
                .and_then(|rec| plot::write(&output, &rec))
                .map_err(|e| Failure::new(1, &e))
        }
        #[cfg(not(feature = "plot"))]
        Command::Plot { .. } => Err(Failure::new(
            1,
            &output::OutputError::FeatureOff {
                flag: "memvisor plot",
                feature: "plot",
            },
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Some(m) = f.message {
                // stderr may be closed, or full and unread: the message is given a bounded time.
                writer::say_on_stderr(format!("memvisor: error: {m}"), writer::FINISH_WAIT);
            }
            ExitCode::from(f.code)
        }
    }
}
