//! memvisor: a small KVM hypervisor that shows, side by side, what a virtual machine costs the host
//! (machine pages backing guest RAM, plus the VMM's own overhead) and what the guest actually uses
//! (active memory, estimated by stratified random sampling of writes and of all accesses).
//!
//! # Using it as a library
//!
//! Integration tests on a KVM host (`/dev/kvm`, usually root) run a guest with [`Run`], a builder
//! over the `memvisor run` options with the same defaults, and assert on its [`Row`]s (one per
//! interval, the object `run --json` prints) and its [`RunSummary`]. A run started on its own
//! thread ([`Run::start`]) is driven through its [`Controller`]: set the balloon target, stop it,
//! read its latest row. That is the whole surface: [`Run`], [`Running`], [`Row`] (module [`row`]),
//! [`RunSummary`], [`Error`] (with [`ConfigError`] and [`RunError`]), [`Controller`] with
//! [`Command`] and [`CommandError`], [`RunOptions`] and [`Console`]. The other modules are the
//! binary's and the tests' internals and change without notice. `examples/guest_test.rs` is a
//! complete test of another project's kind.
//!
//! ```no_run
//! use std::time::Duration;
//! use memvisor::{Console, Run};
//!
//! # fn main() -> Result<(), memvisor::Error> {
//! let vm = Run::new()
//!     .mem(128 << 20)
//!     .workload("alloc 32M; touch 32M; idle 5s")
//!     .interval(Duration::from_millis(200))
//!     .console(Console::Discard)
//!     .start()?;
//! // Take 16 MiB back through the balloon; the guest gives it up over the next intervals.
//! vm.controller().set_balloon_target(16)?;
//! let backed: Vec<f64> = vm.rows().iter().filter_map(|r| Some(r.host?.backed_mib)).collect();
//! let summary = vm.wait()?;
//! assert!(summary.guest.allocated_mib >= 32.0 && !backed.is_empty());
//! # Ok(()) }
//! ```
//!
//! Build with `--no-default-features` to leave out the plot and the Prometheus endpoint.
//!
//! # Layers
//!
//! The folders are the layers, each using only those below it:
//! - `units`, `row`, `files`: sizes and durations; the row schema every output reads; writing and
//!   reading files safely (never through links, devices or FIFOs);
//! - `memory`: guest RAM and its kernel interfaces (userfaultfd, pagemap, bitmaps);
//! - `contract`: the test guest's ABI, protocol and workload;
//! - `kvm`: one VM's KVM plumbing (VM, vCPU, ioctls, boot);
//! - `devices`: serial console, report channel, virtio-balloon;
//! - `observe`: interval work, samplers, statistics, the PMP-MMP map;
//! - `output`: table, JSON, CSV, plot, Prometheus;
//! - `vmm`: one run: options, set-up and the run loop, commands, clock, stops, outcome, the
//!   library's builder;
//! - `control`: the control socket through which a running VM is driven;
//! - `host`: a host of several VMs: its policy (targets, memory states, reclamation), pure, and
//!   each VM as its own `memvisor run` process;
//! - `top`: `memvisor top`, the live terminal view of a run or a host (its state and drawing
//!   pure, the terminal loop thin).
#![deny(clippy::undocumented_unsafe_blocks)]

// Internal modules: public for the binary, the tests and the benchmarks, not a stable interface.
#[doc(hidden)]
pub mod contract;
#[doc(hidden)]
pub mod control;
#[doc(hidden)]
pub mod devices;
#[doc(hidden)]
pub mod files;
#[doc(hidden)]
pub mod host;
#[doc(hidden)]
pub mod kvm;
#[doc(hidden)]
pub mod memory;
#[doc(hidden)]
pub mod observe;
#[doc(hidden)]
pub mod output;
pub mod row;
#[doc(hidden)]
pub mod top;
#[doc(hidden)]
pub mod units;
#[doc(hidden)]
pub mod vmm;

pub use row::Row;
pub use vmm::builder::{Error, ROW_QUEUE, Run, Running};
pub use vmm::command::{Command, CommandError, Controller};
pub use vmm::config::{ConfigError, Console, RunOptions};
pub use vmm::outcome::{RunError, RunSummary};
