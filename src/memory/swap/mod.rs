//! Hypervisor swap: guest pages the VMM writes out to a file of its own and drops from RAM, brought
//! back on the guest's next access through userfaultfd.

pub mod file;
pub mod policy;

pub use file::{Slot, SwapFile, SwapFileError};
pub use policy::{Candidate, Policy, SharedFrame};
