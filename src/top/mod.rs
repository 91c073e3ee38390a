//! `memvisor top`: an esxtop-like live view of one `memvisor run` or of a `memvisor host` of
//! several VMs, in the terminal: the host line on top, one line per VM with esxtop's memory-screen
//! columns, sortable, a field list to choose them, and a detail pane with the selected VM's
//! estimates and their intervals, balloon, swap and the guest's own view.
//!
//! It reads a running `run`'s or `host`'s control socket (`--control PATH`, asked `query` once
//! per `--interval`) or a `--json` stream on standard input (`--stdin` or `-`), from its own
//! process: it never slows the VMs.
//!
//! - `data`: either source's JSON to a snapshot (told apart by shape);
//! - `state`: the view as plain data and its key handling;
//! - `render`: pure functions from a state to a frame;
//! - `source`: the threads that poll the socket or read the stream;
//! - `term`: raw mode, the alternate screen, keys and the loop (the only part that needs a
//!   terminal).
//!
//! It sits above `control`, `output` and `host` (whose rows it reads), and nothing imports it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use thiserror::Error;

#[cfg(feature = "top")]
pub mod data;
#[cfg(feature = "top")]
pub mod render;
#[cfg(feature = "top")]
pub mod source;
#[cfg(feature = "top")]
pub mod state;
#[cfg(feature = "top")]
mod term;

/// Shortest `--interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn duration_arg(s: &str) -> Result<Duration, String> {
    crate::units::parse_duration(s).map_err(|e| e.to_string())
}

fn dash_arg(s: &str) -> Result<bool, String> {
    if s == "-" {
        Ok(true)
    } else {
        Err(
            "the only operand is `-` (read a --json stream on standard input); a control socket \
             is given with --control PATH"
                .into(),
        )
    }
}

/// The options of `memvisor top`.
#[derive(Args, Clone, Debug, Default)]
pub struct TopOptions {
    /// `-`: read a `memvisor run --json` or `memvisor host --json` stream on standard input (as
    /// --stdin).
    #[arg(value_name = "-", value_parser = dash_arg, conflicts_with_all = ["control", "stdin"])]
    pub dash: Option<bool>,
    /// Poll the control socket of a running `memvisor run --control PATH` or
    /// `memvisor host --control PATH`.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["stdin", "dash"], conflicts_with = "stdin")]
    pub control: Option<PathBuf>,
    /// Read a `memvisor run --json` or `memvisor host --json` stream on standard input, e.g.
    /// `memvisor host --json ... 2>host.log | memvisor top --stdin` (keys come from the terminal).
    #[arg(long)]
    pub stdin: bool,
    /// How often the control socket is asked (at least 100 ms).
    #[arg(long, value_parser = duration_arg, default_value = "1s")]
    pub interval: Duration,
    /// The name of a single run's VM in the table (default: the socket's file name, or `vm`).
    #[arg(long)]
    pub name: Option<String>,
}

/// Why `memvisor top` could not run.
#[derive(Debug, Error)]
pub enum TopError {
    #[error("memvisor top draws on a terminal, and standard output is not one")]
    NotATerminal,
    #[error(
        "--stdin reads a --json stream, and standard input is the terminal: pipe one in, e.g. \
         memvisor host --json ... | memvisor top --stdin"
    )]
    StdinIsTerminal,
    #[error("--interval must be at least {} ms", MIN_INTERVAL.as_millis())]
    Interval,
    #[error("the terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error("cannot start the thread that reads the rows: {0}")]
    Thread(std::io::Error),
    #[error("memvisor top is not built in (build with the `top` feature)")]
    FeatureOff,
}

/// Runs the view until `q` or a signal; returns the exit code (0 after `q`, 130 or 143 after
/// SIGINT or SIGTERM).
#[cfg(feature = "top")]
pub fn run(opts: &TopOptions) -> Result<u8, TopError> {
    use std::io::IsTerminal;
    use std::sync::Arc;

    if opts.interval < MIN_INTERVAL {
        return Err(TopError::Interval);
    }
    if !term::stdout_is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let mail = Arc::new(source::Mailbox::default());
    let m = mail.clone();
    let thread = std::thread::Builder::new().name("top-source".into());
    let label = match &opts.control {
        Some(path) => {
            let name = (opts.name.clone())
                .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "vm".into());
            let (p, interval) = (path.clone(), opts.interval);
            thread
                .spawn(move || source::poll_control(p, interval, name, m))
                .map_err(TopError::Thread)?;
            format!("control {}", path.display())
        }
        None => {
            if std::io::stdin().is_terminal() {
                return Err(TopError::StdinIsTerminal);
            }
            let name = opts.name.clone().unwrap_or_else(|| "vm".into());
            thread
                .spawn(move || source::read_stream(std::io::stdin().lock(), name, m))
                .map_err(TopError::Thread)?;
            "stdin".into()
        }
    };
    if let Err(e) = crate::vmm::stop::install_handlers() {
        log::warn!("cannot catch SIGINT/SIGTERM, a signal will leave the terminal raw: {e}");
    }
    Ok(term::run(state::State::new(label), mail)?)
}

/// Without the `top` feature: says so.
#[cfg(not(feature = "top"))]
pub fn run(_opts: &TopOptions) -> Result<u8, TopError> {
    Err(TopError::FeatureOff)
}
