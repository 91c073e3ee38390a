//! A host of several VMs on one memory budget (`memvisor host`).

pub mod process;
pub mod spec;
