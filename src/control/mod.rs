//! The control socket (`run --control PATH`): something outside the process (the host scheduler,
//! a test harness, an operator) reads a running VM's latest row and sets its targets, one JSON
//! object per line (`docs/control.md`).

pub mod client;
pub mod protocol;
pub mod server;
pub mod vm;

pub use client::{Client, ClientError};
pub use protocol::{Answer, ErrorClass, Request};
pub use server::{ControlError, ControlServer, Handler};
