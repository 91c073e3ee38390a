//! The overcommitted host's policy, as pure functions and state machines: no KVM, no processes,
//! no I/O. The `memvisor host` command (not built yet) feeds them each VM's latest row and acts on
//! what they return.
//!
//! - `scheduler`: each VM's target allocation (ESX's SZTGT) by min-funding revocation with the
//!   idle memory tax, and admission;
//! - `state`: the host's memory state (high, soft, hard, low) from the budget's free part, with
//!   hysteresis, and the part of the budget the targets may share;
//! - `reclaim`: per VM and period, how much of its reclamation goes to the balloon and how much to
//!   hypervisor swap, with the balloon's rate limit.
//!
//! All sizes are in pages (`units::PAGE_SIZE`); MiB only in messages. See docs/design.md, "The host
//! scheduler".

pub mod reclaim;
pub mod scheduler;
pub mod state;
