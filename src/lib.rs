//! memvisor: a small KVM hypervisor that shows, side by side, what a virtual machine costs the host
//! (machine pages backing guest RAM, plus the VMM's own overhead) and what the guest actually uses
//! (active memory, estimated by random write-protect sampling).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod abi;
pub mod access;
pub mod bitmap;
pub mod boot;
pub mod clock;
pub mod config;
pub mod csv;
pub mod devices;
pub mod exits;
pub mod gdt;
pub mod interval;
pub mod kvm_ext;
pub mod memory;
pub mod outcome;
pub mod output;
pub mod pagemap;
pub mod plot;
pub mod pmp_mmp;
pub mod prometheus;
pub mod protocol;
pub mod sampler;
pub mod stats;
pub mod stop;
pub mod uffd;
pub mod units;
pub mod usage;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub mod workload;
