//! Emulated devices. Each is a plain state machine (`read(offset, data)`, `write(offset, data)`)
//! that can be tested without KVM. The virtio-balloon sits behind the virtio-mmio transport.

pub mod balloon;
pub mod report;
pub mod serial;
pub mod virtio;

pub use balloon::Balloon;
pub use report::{ReportChannel, ReportError};
pub use serial::Console;
pub use virtio::MmioTransport;

/// The virtio-balloon as the guest sees it: the device behind its transport.
pub type BalloonMmio = MmioTransport<Balloon>;
