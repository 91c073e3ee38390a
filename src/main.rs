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
enum Command {
    /// Boot the test guest, run a workload, print host and guest memory usage per interval.
    Run(RunArgs),
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
    #[arg(long)]
    json: bool,
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
        Some(p) => boot::read_image(p, args.mem).map_err(|e| e.to_string())?,
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

    let json = args.json;
    let mut stdout = std::io::stdout().lock();
    if !json {
        let _ = writeln!(stdout, "{}", output::table_header());
    }
    let mut print = |row: &memvisor::usage::Row| {
        let line = if json {
            output::json_row(row)
        } else {
            output::table_row(row)
        };
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    };
    let summary = vmm::run(cfg, &mut print).map_err(|e| e.to_string())?;
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memvisor: error: {e}");
            ExitCode::FAILURE
        }
    }
}
