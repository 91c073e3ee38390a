//! Observation and estimation: the work at each interval boundary, the two samplers (writes through
//! the dirty log, reads and writes through userfaultfd), their statistics, the PMP-MMP map, and
//! host usage.

pub mod access;
pub mod interval;
pub mod pmp_mmp;
pub mod sampler;
pub mod stats;
pub mod usage;
