//! Guest memory and the kernel interfaces behind it: the RAM mapping, userfaultfd, pagemap and
//! `mincore`, and dense page bitmaps.

pub mod bitmap;
pub mod pagemap;
pub mod ram;
pub mod swap;
pub mod uffd;

pub use ram::{GuestMemoryMmap, GuestRam, MAX_GUEST_BYTES, MIN_GUEST_BYTES, MemoryError};
