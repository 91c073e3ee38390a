//! The contract with the test guest: its ABI (generated from `guest/abi.h`), the report protocol
//! as a state machine, and the workload it is asked to run.

pub mod abi;
pub mod protocol;
pub mod workload;
