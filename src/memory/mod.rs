//! Guest memory and the kernel interfaces behind it: the RAM mapping, its owner (every discard, and
//! the VM's one userfaultfd with its fault handler), userfaultfd itself, pagemap and `mincore`,
//! the kernel's KSM, and dense page bitmaps.

pub mod bitmap;
pub mod faults;
pub mod ksm;
pub mod owner;
pub mod pagemap;
pub mod ram;
pub mod swap;
pub mod uffd;

pub use owner::GuestMemory;
pub use ram::{GuestMemoryMmap, GuestRam, MAX_GUEST_BYTES, MIN_GUEST_BYTES, MemoryError};
