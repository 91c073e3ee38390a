//! virtio over MMIO, split as Firecracker splits it: the transport ([`mmio::MmioTransport`]: the
//! register file, feature negotiation, device status and queue set-up) and a device behind the
//! small [`VirtioDevice`] interface (its queues, its configuration space and what its buffers
//! mean). Both are plain state machines, tested without KVM.
//!
//! The guest is not trusted, and everything here runs on the vCPU thread, so the work one
//! notification can cause is bounded: a device does at most a fixed amount of work per call of
//! [`VirtioDevice::process`] and keeps the rest ([`VirtioDevice::has_work`]), which the VMM
//! carries over to its next exit (it kicks its own vCPU out of `KVM_RUN` so that the guest does not
//! run in between, and looks at its clock and at signals between two calls). Descriptor chains
//! are walked by [`chain::ChainWalk`], which never follows an indirect table (the transport never
//! offers `VIRTIO_F_INDIRECT_DESC`).

pub mod chain;
pub mod mmio;

use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};

use crate::memory::GuestRam;
use crate::memory::ram::GuestMemoryMmap;

pub use mmio::MmioTransport;

/// How many malformed requests of one device are logged; the rest are only counted.
const LOGGED_ERRORS: u64 = 5;

/// Queue faults that put the device in its error state (`DEVICE_NEEDS_RESET`): the rings
/// themselves are malformed, so nothing more can be taken from them.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue {queue}: avail ring unreadable")]
    AvailRing { queue: usize },
    #[error("queue {queue}: {pending} buffers pending in a ring of {size}")]
    Overrun {
        queue: usize,
        pending: u16,
        size: u16,
    },
    #[error("queue {queue}: chain head {head} outside the descriptor table of {size}")]
    HeadOutside { queue: usize, head: u16, size: u16 },
    #[error("queue {queue}: used ring unwritable")]
    UsedRing { queue: usize },
}

/// The device half of a virtio-mmio device; [`MmioTransport`] drives it.
pub trait VirtioDevice {
    /// The name in log messages.
    const NAME: &'static str;
    /// The virtio device ID.
    fn device_id(&self) -> u32;
    /// Feature bits offered, `VIRTIO_F_VERSION_1` included.
    fn features(&self) -> u64;
    /// Every queue the device can have; the transport sets them up.
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    /// A read of configuration space at `offset` (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A write to configuration space at `offset` (read-only fields ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Changes whenever the device changes its configuration (the transport's
    /// `ConfigGeneration`, and the configuration-change interrupt bit until acknowledged).
    fn config_generation(&self) -> u32;
    /// The driver set DRIVER_OK having negotiated `features`: returns how many queues are in use.
    fn activate(&mut self, features: u64) -> usize;
    /// The driver reset the device (the transport resets the queues): forget buffers in flight.
    fn reset(&mut self);
    /// The driver notified queue `queue` (in use and ready): remember it has buffers.
    fn notified(&mut self, queue: usize);
    /// Does a bounded amount of the pending work; true if a used ring was written.
    fn process(&mut self, ram: &GuestRam) -> Result<bool, QueueError>;
    /// Whether [`VirtioDevice::process`] has work left.
    fn has_work(&self) -> bool;
    /// Malformed requests counted by the device.
    fn errors(&self) -> u64;
}

/// A count of malformed requests, of which the first few are logged. Noting one allocates
/// nothing unless it is logged.
#[derive(Debug)]
pub struct ErrorCount {
    name: &'static str,
    count: u64,
}

impl ErrorCount {
    pub fn new(name: &'static str) -> Self {
        ErrorCount { name, count: 0 }
    }

    pub fn note(&mut self, what: fmt::Arguments<'_>) {
        self.count += 1;
        if self.count <= LOGGED_ERRORS {
            log::warn!("{}: {what}", self.name);
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Takes the head of the next available chain of queue `qi`, if the driver made one available.
/// An avail index more than a ring ahead of the device is a malformed ring.
pub fn pop_head(
    q: &mut Queue,
    qi: usize,
    mem: &GuestMemoryMmap,
) -> Result<Option<u16>, QueueError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| QueueError::AvailRing { queue: qi })?;
    let pending = (avail - Wrapping(q.next_avail())).0;
    if pending == 0 {
        return Ok(None);
    }
    let size = q.size();
    if pending > size {
        return Err(QueueError::Overrun {
            queue: qi,
            pending,
            size,
        });
    }
    let chain = q
        .pop_descriptor_chain(mem)
        .ok_or(QueueError::AvailRing { queue: qi })?;
    let head = chain.head_index();
    if head >= size {
        return Err(QueueError::HeadOutside {
            queue: qi,
            head,
            size,
        });
    }
    Ok(Some(head))
}

/// Returns chain `head` of queue `qi` to the driver (no bytes written).
pub fn add_used(
    q: &mut Queue,
    qi: usize,
    head: u16,
    mem: &GuestMemoryMmap,
) -> Result<(), QueueError> {
    q.add_used(mem, head, 0)
        .map_err(|_| QueueError::UsedRing { queue: qi })
}
