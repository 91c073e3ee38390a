//! How a run ended: the error that ended it early (and the exit code's reason), or the summary
//! of a run that finished.

use std::io;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::contract::protocol::{BootReport, GuestError, PhaseRecord};
use crate::devices::balloon::BalloonCounters;
use crate::kvm::boot::BootError;
use crate::kvm::vcpu::VcpuError;
use crate::kvm::vm::VmError;
use crate::memory::MemoryError;
use crate::observe::interval::IntervalError;
use crate::observe::pmp_mmp::{MapFileError, MapSummary};
use crate::row::{EndReason, GuestView};
use crate::vmm::config::ConfigError;
use crate::vmm::exits::ExitError;
use crate::vmm::swap::SwapError;

/// Why a run failed or stopped early. Every variant but the VMM's own failures (memory, VM,
/// vCPU, interval, map file) comes after a last row and the map were written.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("setting up guest memory")]
    Memory(#[from] MemoryError),
    #[error("loading the guest")]
    Boot(#[from] BootError),
    #[error("creating the VM")]
    Vm(#[from] VmError),
    #[error("the vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("at an interval boundary")]
    Interval(#[from] IntervalError),
    #[error("hypervisor swap")]
    Swap(#[from] SwapError),
    #[error(transparent)]
    MapFile(#[from] MapFileError),
    #[error("{error}{}", rip.map(|r| format!(" at RIP {r:#x}")).unwrap_or_default())]
    Exit { error: ExitError, rip: Option<u64> },
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(
        "the guest did not finish within {timeout:?} (last phase: {phase}){}",
        fault.as_ref().map(|f| format!("; it had reported: {f}")).unwrap_or_default()
    )]
    Timeout {
        timeout: Duration,
        phase: String,
        fault: Option<GuestError>,
    },
    #[error("stopped by {} (last phase: {phase})", if *.reason == EndReason::Sigint { "SIGINT" } else { "SIGTERM" })]
    Signal { reason: EndReason, phase: String },
    #[error("stopped through the control socket (last phase: {phase})")]
    Stopped { phase: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the rows' reader went away (closed pipe)")]
    OutputClosed,
    #[error("writing a row")]
    Output(#[source] io::Error),
}

impl RunError {
    /// A failed write of a row: a closed pipe is the reader going away, not an error to report.
    pub fn from_output(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            RunError::OutputClosed
        } else {
            RunError::Output(e)
        }
    }

    /// Why the run ended, as its last row says (and the exit code follows).
    pub fn end_reason(&self) -> EndReason {
        match self {
            RunError::Timeout { .. } => EndReason::Timeout,
            RunError::Signal { reason, .. } => *reason,
            RunError::Stopped { .. } => EndReason::Stopped,
            RunError::OutputClosed => EndReason::OutputClosed,
            RunError::Swap(SwapError::PageIn(_)) => EndReason::SwapError,
            _ => EndReason::GuestError,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// From the start of set-up to the first `KVM_RUN`.
    pub setup_ms: f64,
    pub elapsed_s: f64,
    pub boot: Option<BootReport>,
    pub phases: Vec<PhaseRecord>,
    pub guest: GuestView,
    pub map: MapSummary,
    /// At the end: guest pages mincore() calls resident (backed + zero-page mappings).
    pub mincore_resident: u64,
    /// At the end: untouched guest pages the VMM mapped to the shared zero page (the fault
    /// handler does so before registering a region; they stay `untouched` in the map, with no
    /// machine page of their own). `mincore_resident` counts them, the map's states do not.
    pub vmm_zero_mapped: u64,
    /// At the end: backed pages inside the guest kernel's pool (the pages its lists manage).
    pub pool_backed: u64,
    /// Malformed report-channel accesses and protocol violations.
    pub report_errors: u64,
    pub unhandled_exits: u64,
    pub tsc_khz: u64,
    /// What the virtio-balloon did, when the guest had one.
    pub balloon: Option<BalloonCounters>,
}
