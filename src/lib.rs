//! memvisor: a small KVM hypervisor that shows, side by side, what a virtual machine costs the host
//! (machine pages backing guest RAM, plus the VMM's own overhead) and what the guest actually uses
//! (active memory, estimated by stratified random sampling of writes and of all accesses).
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
//! - `vmm`: one run: options, the recipe and run loop, clock, stops, outcome;
//! - `control`: the control socket through which a running VM is driven;
//! - `host`: a host of several VMs: its policy (targets, memory states, reclamation), pure, and
//!   each VM as its own `memvisor run` process.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod contract;
pub mod control;
pub mod devices;
pub mod files;
pub mod host;
pub mod kvm;
pub mod memory;
pub mod observe;
pub mod output;
pub mod row;
pub mod units;
pub mod vmm;
