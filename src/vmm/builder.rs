//! The library's way to run a guest: [`Run`] is a builder over the command line's options (with
//! the same defaults), [`Run::run`] runs on the calling thread, and [`Run::start`] runs on a
//! thread of its own and hands back a [`Running`] VM: its rows as they come, its [`Controller`],
//! and its outcome at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TrySendError, sync_channel};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::row::Row;
use crate::vmm::command::{CommandError, Controller};
use crate::vmm::config::{ConfigError, Console, RunConfig, RunOptions};
use crate::vmm::outcome::{RunError, RunSummary};

/// Rows a [`Running`] VM keeps for its reader; beyond it new rows are dropped (and counted), as
/// the VM never waits for its reader. At the shortest interval (10 ms) that is 40 s of rows.
pub const ROW_QUEUE: usize = 4096;

/// Why a run could not be made or did not finish.
#[derive(Debug, Error)]
pub enum Error {
    /// The options are invalid; the message names the option.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Set-up failed, the guest failed, or the run was stopped early (its last row was given).
    #[error(transparent)]
    Run(#[from] RunError),
    /// The VM did not take a command.
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("cannot start the VM's thread")]
    Thread(#[source] std::io::Error),
    #[error("the VM's thread panicked")]
    Panicked,
}

/// A run to make: the command line's `run` options with their defaults, and the console.
///
/// ```no_run
/// # fn main() -> Result<(), memvisor::Error> {
/// use std::time::Duration;
/// let summary = memvisor::Run::new()
///     .mem(128 << 20)
///     .workload("alloc 32M; touch 32M write 1s")
///     .interval(Duration::from_millis(200))
///     .run(|row| println!("{}: {:?} MiB backed", row.interval, row.host.as_ref().map(|h| h.backed_mib)))?;
/// assert!(summary.guest.out_of_memory == false);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Run {
    options: RunOptions,
    console: Option<Console>,
}

impl Default for Run {
    fn default() -> Self {
        Run::new()
    }
}

impl Run {
    /// The command line's defaults (`memvisor run` with no options).
    pub fn new() -> Self {
        Run::from_options(RunOptions::default())
    }

    /// Exactly these options.
    pub fn from_options(options: RunOptions) -> Self {
        Run {
            options,
            console: None,
        }
    }

    /// Every option, for those without a method here.
    pub fn options_mut(&mut self) -> &mut RunOptions {
        &mut self.options
    }

    /// Guest RAM in bytes (`--mem`).
    pub fn mem(mut self, bytes: u64) -> Self {
        self.options.mem = bytes;
        self
    }

    /// The workload the guest runs (`--workload`, README "Workloads").
    pub fn workload(mut self, spec: impl Into<String>) -> Self {
        self.options.workload = spec.into();
        self
    }

    /// The reporting interval (`--interval`).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.options.interval = interval;
        self
    }

    /// Stop a guest that has not finished after this long (`--timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Reproducible sampling and guest access patterns (`--seed`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.options.seed = Some(seed);
        self
    }

    /// Hold the guest to this many bytes of RAM through the balloon (`--limit`).
    pub fn limit(mut self, bytes: u64) -> Self {
        self.options.limit = Some(bytes);
        self
    }

    /// Start with this many bytes in the balloon (`--balloon`).
    pub fn balloon(mut self, bytes: u64) -> Self {
        self.options.balloon = Some(bytes);
        self
    }

    /// Free page reporting (`--free-page-reporting`).
    pub fn free_page_reporting(mut self, on: bool) -> Self {
        self.options.free_page_reporting = on;
        self
    }

    /// Write the PMP-MMP map here at the end (`--map-out`).
    pub fn map_out(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.map_out = Some(path.into());
        self
    }

    /// Where the guest's console goes (default: as `--console` says, stderr).
    pub fn console(mut self, console: Console) -> Self {
        self.console = Some(console);
        self
    }

    /// The validated run.
    pub fn config(self) -> Result<RunConfig, ConfigError> {
        let mut cfg = RunConfig::new(self.options)?;
        if let Some(c) = self.console {
            cfg.console = c;
        }
        Ok(cfg)
    }

    /// Runs on this thread to the end, handing each row to `on_row` as soon as it is complete
    /// (on the vCPU thread: keep it short).
    pub fn run(self, mut on_row: impl FnMut(&Row)) -> Result<RunSummary, Error> {
        let cfg = self.config()?;
        Ok(crate::vmm::run(cfg, &mut |row: &Row| {
            on_row(row);
            Ok(())
        })?)
    }

    /// Sets the VM up and runs it on a thread of its own. Returns once set-up is done (its
    /// errors come here), with the running VM.
    pub fn start(self) -> Result<Running, Error> {
        let cfg = self.config()?;
        let (rows_tx, rows) = sync_channel(ROW_QUEUE);
        let (ready_tx, ready_rx) = mpsc::channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("memvisor-vcpu".into())
            .spawn(move || {
                let ready = match crate::vmm::setup(cfg) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(None);
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(Some(ready.controller()));
                ready.run(&mut |row: &Row| {
                    // The reader may be slow or gone: the VM never waits for it.
                    if let Err(TrySendError::Full(_)) = rows_tx.try_send(row.clone()) {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .map_err(Error::Thread)?;
        match ready_rx.recv() {
            Ok(Some(controller)) => Ok(Running {
                controller,
                rows,
                dropped,
                thread,
            }),
            _ => Err(join(thread).err().unwrap_or(Error::Panicked)),
        }
    }
}

fn join(thread: JoinHandle<Result<RunSummary, RunError>>) -> Result<RunSummary, Error> {
    thread
        .join()
        .map_err(|_| Error::Panicked)?
        .map_err(Error::Run)
}

/// A VM running on its own thread.
pub struct Running {
    controller: Controller,
    rows: Receiver<Row>,
    dropped: Arc<AtomicU64>,
    thread: JoinHandle<Result<RunSummary, RunError>>,
}

impl Running {
    /// Sets its targets, stops it, reads its latest row; clone it for other threads.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Its rows, in order, as each is complete; the channel ends when the run does (iterate it,
    /// or use `recv_timeout`).
    pub fn rows(&self) -> &Receiver<Row> {
        &self.rows
    }

    /// Rows dropped because [`ROW_QUEUE`] were waiting unread.
    pub fn dropped_rows(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits for the run to end: its summary, or why it failed or stopped (a stop through the
    /// controller is [`RunError::Stopped`]).
    pub fn wait(self) -> Result<RunSummary, Error> {
        join(self.thread)
    }
}
