//! A host of several VMs on one memory budget (`memvisor host`).

pub mod spec;
