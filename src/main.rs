//! memvisor: boot a guest and show, side by side, what it costs the host and what it uses.
//!
//! The recipe: parse the command line, validate it into a run, then `vmm::setup` builds guest
//! memory, the VM and its devices, `--control` serves the VM's control socket, and the run
//! creates the vCPU, runs, and hands each interval's row here to print.
//!
//! Exit codes: `vmm::stop::EXIT_CODES_HELP` (shown by `--help`).

use std::error::Error;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

use memvisor::control::{self, ControlError, ControlServer};
use memvisor::observe::pmp_mmp::MapFile;
use memvisor::output::{self, writer};
use memvisor::row::{EndReason, Row};
use memvisor::vmm::config::{RunConfig, RunOptions};
use memvisor::vmm::stop;
use memvisor::vmm::{self, RunError};

/// What `--help` adds after the options (of the top level and of `run`): the workload grammar,
/// the exit codes and the log's environment variable.
fn after_help() -> String {
    format!(
        "{}\n\n{}\n\nEnvironment:\n  RUST_LOG  the VMM's log on stderr: error, warn (the default), info, debug, \
         trace,\n            or per module, e.g. RUST_LOG=memvisor::host=debug",
        memvisor::contract::workload::GRAMMAR_HELP,
        stop::EXIT_CODES_HELP
    )
}

#[derive(Parser)]
#[command(
    name = "memvisor",
    version,
    about = "A KVM hypervisor that makes guest memory visible",
    after_long_help = after_help()
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
    #[command(after_long_help = after_help())]
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
    /// A live, esxtop-like view of a running `run` or `host` (its control socket) or of a `--json`
    /// stream on standard input: q quits, s sorts, f chooses the fields, d shows the detail.
    Top(memvisor::top::TopOptions),
    /// Summarise a PMP-MMP map file written by `run --map-out`.
    Map {
        /// The map file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script to standard output, e.g.
    /// `memvisor completions bash > /etc/bash_completion.d/memvisor`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output, e.g. `memvisor man | man -l -`; with a
    /// subcommand's name, that subcommand's page (memvisor-run(1): `memvisor man run`).
    Man {
        /// run, host, plot, map, completions or man.
        subcommand: Option<String>,
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
    /// The table's columns, comma-separated, in the order given, e.g. time,phase,host,est,ci
    /// (README lists them; the default view of 13 is at most 120 characters wide).
    #[arg(long, value_name = "LIST", value_parser = output::table::Table::arg,
          conflicts_with_all = ["json", "csv", "wide"])]
    columns: Option<output::table::Table>,
    /// The table with every column (about 210 characters wide).
    #[arg(long, conflicts_with_all = ["json", "csv"])]
    wide: bool,
    /// Serve the latest interval to Prometheus at http://ADDR/metrics: IP:PORT (127.0.0.1:9464),
    /// localhost:PORT, or :PORT for every interface (reachable from the network: see README).
    #[arg(long, value_name = "ADDR", value_parser = output::socket_addr_arg)]
    prometheus: Option<std::net::SocketAddr>,
    /// The VM's name: the `vm` column of --csv (default: vm) and the `vm` label of the Prometheus
    /// metrics (default: the process id). `memvisor host` passes each VM's own.
    #[arg(long)]
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
        (_, true) => output::Format::Csv {
            name: args.name.clone().unwrap_or_else(|| "vm".into()),
        },
        _ => output::Format::Table {
            table: match (args.columns, args.wide) {
                (Some(t), _) => t,
                (None, true) => output::table::Table::wide(),
                (None, false) => output::table::Table::default(),
            },
            header_every: output::table::header_every_for_stdout(),
        },
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

/// Writes what `render` makes of the command line's definition to stdout (rendered in memory
/// first: the generators panic on a failed write, and a closed pipe must be a quiet exit).
fn print_generated(
    render: impl FnOnce(&mut clap::Command, &mut Vec<u8>) -> io::Result<()>,
) -> Result<(), Failure> {
    let mut text = Vec::new();
    render(&mut Cli::command(), &mut text).map_err(|e| Failure::new(1, &e))?;
    let mut out = io::stdout().lock();
    out.write_all(&text)
        .and_then(|_| out.flush())
        .map_err(write_failure)
}

/// The man page of the top level, or of one subcommand (`memvisor-run(1)`, as the top level's
/// page names them).
fn man(cmd: &mut clap::Command, subcommand: Option<String>, out: &mut Vec<u8>) -> io::Result<()> {
    // Built, subcommands carry their display names (`memvisor-run`).
    cmd.build();
    let page = match subcommand {
        None => cmd.clone(),
        Some(name) => cmd
            .find_subcommand(&name)
            .filter(|_| name != "help")
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = (cmd.get_subcommands())
                    .map(|c| c.get_name())
                    .filter(|n| *n != "help")
                    .collect();
                io::Error::other(format!(
                    "man: no subcommand {name:?}; the subcommands are: {}",
                    names.join(", ")
                ))
            })?,
    };
    clap_mangen::Man::new(page).render(out)
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
        Command::Completions { shell } => print_generated(|cmd, out| {
            clap_complete::generate(shell, cmd, "memvisor", out);
            Ok(())
        }),
        Command::Man { subcommand } => print_generated(|cmd, out| man(cmd, subcommand, out)),
        Command::Top(opts) => match memvisor::top::run(&opts) {
            Ok(0) => Ok(()),
            // A signal ended the view: its exit code, no message.
            Ok(code) => Err(Failure {
                code,
                message: None,
            }),
            Err(e) => Err(Failure::new(1, &e)),
        },
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
