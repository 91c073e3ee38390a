//! A host of several VMs on one memory budget (`memvisor host`).
//!
//! The policy is pure functions and state machines (no KVM, no processes, no I/O):
//! - `scheduler`: each VM's target allocation (ESX's SZTGT) by min-funding revocation with the
//!   idle memory tax, and admission;
//! - `state`: the host's memory state (high, soft, hard, low) from the budget's free part, with
//!   hysteresis, and the part of the budget the targets may share;
//! - `reclaim`: per VM and period, how much of its reclamation goes to the balloon and how much to
//!   hypervisor swap, with the balloon's rate limit.
//!
//! Around it: `spec`, one VM as the user gives it; `process`, one VM as its own `memvisor run`
//! process, driven over its control socket; `supervisor`, the host loop; `cli`, the command line
//! and the table and JSON; `control`, the host's control socket (`query` only, for `memvisor
//! top`); `csv`, `metrics` (Prometheus) and `plot`, the host's other outputs.
//!
//! All sizes are in pages (`units::PAGE_SIZE`); MiB only in messages. See docs/design.md, "The host
//! scheduler".

pub mod cli;
pub mod control;
pub mod csv;
#[cfg(feature = "prometheus")]
pub mod metrics;
#[cfg(feature = "plot")]
pub mod plot;
pub mod process;
pub mod reclaim;
pub mod scheduler;
pub mod spec;
pub mod state;
pub mod supervisor;
#[cfg(test)]
pub(crate) mod testing;
