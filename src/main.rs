//! memvisor: boot a guest and show, side by side, what it costs the host and what it uses.
//!
//! The recipe: parse the command line, build guest memory, create the VM and vCPU, run, report
//! (the middle steps live in `memvisor::vmm::run`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use memvisor::boot;
use memvisor::memory::GuestRam;
use memvisor::output;
use memvisor::pmp_mmp::MapFile;
use memvisor::units::{parse_duration, parse_size};
use memvisor::vmm::{self, RunConfig};
use memvisor::workload::{DEFAULT_SPEC, Workload};

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

#[derive(Subcommand)]
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Boot the test guest, run a workload, print host and guest memory usage per interval.
    Run(RunArgs),
    /// Plot a run from its `run --json` output.
    Plot {
        /// The JSON lines written by `memvisor run --json`.
        file: PathBuf,
        /// The image to write: .svg or .png.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Summarise a PMP-MMP map file written by `run --map-out`.
    Map {
        /// The map file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct RunArgs {
    /// Guest RAM, e.g. 256M, 1G, 64G (untouched pages cost the host nothing).
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    mem: u64,
    /// The workload the guest app runs, e.g. "alloc 64M; touch 32M write 2s; idle 1s".
    #[arg(long, default_value = DEFAULT_SPEC)]
    workload: String,
    /// A guest ELF image instead of the built-in test guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Stop a guest that has not finished after this long, e.g. 30s.
    #[arg(long, value_parser = duration_arg)]
    timeout: Option<Duration>,
    /// Reporting and sampling interval.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    interval: Duration,
    /// Pages sampled per interval for the active-memory estimate.
    #[arg(long, default_value_t = 1000)]
    samples: u64,
    /// Turn active-memory sampling off.
    #[arg(long)]
    no_sampling: bool,
    /// Seed for sample selection and the guest's access patterns (reproducible runs).
    #[arg(long)]
    seed: Option<u64>,
    /// Weight of the newest interval in the fast moving average (0 < a <= 1).
    #[arg(long, default_value_t = memvisor::stats::DEFAULT_FAST_ALPHA)]
    ewma_fast: f64,
    /// Weight of the newest interval in the slow moving average (0 < a <= 1).
    #[arg(long, default_value_t = memvisor::stats::DEFAULT_SLOW_ALPHA)]
    ewma_slow: f64,
    /// Allow transparent huge pages for guest RAM (off by default).
    #[arg(long)]
    hugepages: bool,
    /// One JSON object per line instead of the table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV instead of the table: a header row (units in the names), then one row per interval.
    #[arg(long)]
    csv: bool,
    /// Serve the latest interval to Prometheus at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", value_parser = output::socket_addr_arg)]
    prometheus: Option<std::net::SocketAddr>,
    /// The `vm` label of the Prometheus metrics (default: the process id).
    #[arg(long, requires = "prometheus")]
    name: Option<String>,
    /// Draw the run's plot to this file at the end (.svg or .png).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Write the PMP-MMP map to this file at the end.
    #[arg(long)]
    map_out: Option<PathBuf>,
    /// Also write the map every N intervals (needs --map-out).
    #[arg(long, requires = "map_out")]
    map_every: Option<u64>,
    /// Where the guest console goes: a file, or "-" for stderr (default).
    #[arg(long)]
    console: Option<PathBuf>,
}

fn run(args: RunArgs) -> Result<(), String> {
    GuestRam::validate_size(args.mem).map_err(|e| format!("--mem: {e}"))?;
    let workload = Workload::parse(&args.workload, args.mem).map_err(|e| e.to_string())?;
    let image = match &args.guest {
        Some(p) => boot::read_image(p).map_err(|e| e.to_string())?,
        None => boot::DEFAULT_GUEST.to_vec(),
    };
    let console: Box<dyn Write + Send> = match &args.console {
        Some(p) if p.as_os_str() != "-" => Box::new(
            std::fs::File::create(p).map_err(|e| format!("console file {}: {e}", p.display()))?,
        ),
        _ => Box::new(std::io::stderr()),
    };
    let mut cfg = RunConfig::new(workload, image);
    cfg.mem_bytes = args.mem;
    cfg.hugepages = args.hugepages;
    cfg.timeout = args.timeout;
    cfg.interval = args.interval;
    cfg.samples = (!args.no_sampling).then_some(args.samples);
    cfg.seed = args.seed;
    cfg.ewma_fast = args.ewma_fast;
    cfg.ewma_slow = args.ewma_slow;
    cfg.map_out = args.map_out;
    cfg.map_every = args.map_every;
    cfg.console = console;
    cfg.validate().map_err(|e| e.to_string())?;

    let format = match (args.json, args.csv) {
        (true, _) => output::Format::Json,
        (_, true) => output::Format::Csv,
        _ => output::Format::Table,
    };
    let prometheus = args.prometheus.map(|addr| {
        let name = args.name.unwrap_or_else(|| std::process::id().to_string());
        (addr, name)
    });
    let mut sink = output::Sink::new(std::io::stdout().lock(), format, prometheus, args.plot)
        .map_err(|e| e.to_string())?;
    let summary = vmm::run(cfg, &mut |row| sink.row(row)).map_err(|e| e.to_string())?;
    sink.finish().map_err(|e| e.to_string())?;
    log::info!(
        "set-up to first instruction: {:.1} ms; ran {:.1} s",
        summary.setup_ms,
        summary.elapsed_s
    );
    Ok(())
}

fn map(file: PathBuf, json: bool) -> Result<(), String> {
    let m = MapFile::read_file(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let s = m.summary();
    if json {
        println!("{}", serde_json::to_string(&s).map_err(|e| e.to_string())?);
    } else {
        println!("{s}");
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Map { file, json } => map(file, json),
        Command::Plot { file, output } => memvisor::plot::read_jsonl(&file)
            .and_then(|rows| memvisor::plot::write(&output, &rows))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memvisor: error: {e}");
            ExitCode::FAILURE
        }
    }
}
