//! Emulated devices. Each is a plain state machine (`read(offset, data)`, `write(offset, data)`)
//! that can be tested without KVM.

pub mod balloon;
pub mod report;
pub mod serial;

pub use balloon::Balloon;
pub use report::{ReportChannel, ReportError};
pub use serial::Console;
