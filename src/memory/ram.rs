//! Guest RAM: one anonymous `MAP_NORESERVE` mapping, so a machine page is assigned only when the
//! guest (or the VMM) first touches a guest page. vm-memory's `AtomicBitmap` records every page
//! the VMM itself writes through this mapping; KVM's dirty log never sees those writes, so they
//! are tracked and reported apart from the guest's.

use std::num::NonZeroUsize;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use crate::units::PAGE_SIZE;
use crate::units::fmt_mib;

/// Guest memory with the VMM-write bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Smallest guest: the kernel, its tables and a 2 MiB-aligned pool must fit.
pub const MIN_GUEST_BYTES: u64 = 4 << 20;
/// Largest guest this VMM accepts (one memslot, identity maps below 1 GiB, pool above).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

/// Errors while building guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("guest memory size must not be zero")]
    Zero,
    #[error("guest memory size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("guest memory size {} is below the minimum of {}", fmt_mib(*.0), fmt_mib(MIN_GUEST_BYTES))]
    TooSmall(u64),
    #[error("guest memory size {} is above the maximum of {}", fmt_mib(*.0), fmt_mib(MAX_GUEST_BYTES))]
    TooLarge(u64),
    #[error("mapping guest memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    #[error("building the guest memory region failed")]
    Region,
    #[error("cannot discard guest pages {pages:?}: guest RAM has pages 0..{ram_pages}")]
    DiscardOutside {
        pages: std::ops::Range<u64>,
        ram_pages: u64,
    },
    #[error("madvise on guest memory failed: {0}")]
    Madvise(std::io::Error),
    #[error(
        "--ksm: MADV_MERGEABLE on guest memory failed: {0} (is the host kernel built with CONFIG_KSM? see /sys/kernel/mm/ksm)"
    )]
    Mergeable(std::io::Error),
    #[error("counting resident guest pages (mincore)")]
    Mincore(#[source] crate::memory::pagemap::PagemapError),
    #[error("VMM access to guest memory at {addr:#x} failed: {source}")]
    Access {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Guest RAM: one region at guest-physical 0.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    host_addr: usize,
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM. Transparent huge pages are disabled unless `hugepages`.
    pub fn new(size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        Self::validate_size(size)?;
        let len = size as usize;
        let bitmap = AtomicBitmap::new(len, NonZeroUsize::new(PAGE_SIZE as usize).unwrap());
        let region = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Mmap)?;
        let host_addr = region.as_ptr() as usize;
        let advice = if hugepages {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: the range is exactly the mapping we just created and still own; madvise only
        // changes paging hints and does not invalidate it.
        let rc = unsafe { libc::madvise(host_addr as *mut libc::c_void, len, advice) };
        if rc != 0 {
            return Err(MemoryError::Madvise(std::io::Error::last_os_error()));
        }
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Region)?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::Region)?;
        Ok(GuestRam {
            mem,
            size,
            host_addr,
        })
    }

    /// Lets the host kernel's KSM merge identical pages of guest RAM (`MADV_MERGEABLE`); ksmd
    /// merges only while it runs (`/sys/kernel/mm/ksm/run`). Merged pages are read-only to the
    /// guest until its next write, which copies the page again (copy-on-write).
    pub fn merge(&self) -> Result<(), MemoryError> {
        // SAFETY: the range is exactly our own guest RAM mapping, alive as long as `self`;
        // MADV_MERGEABLE only lets ksmd replace pages by identical write-protected ones, which
        // keeps every page's contents, so no reference into guest memory is invalidated.
        let rc = unsafe {
            libc::madvise(
                self.host_addr as *mut libc::c_void,
                self.size as usize,
                libc::MADV_MERGEABLE,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Mergeable(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Checks a requested guest size.
    pub fn validate_size(size: u64) -> Result<(), MemoryError> {
        if size == 0 {
            return Err(MemoryError::Zero);
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Unaligned(size));
        }
        if size < MIN_GUEST_BYTES {
            return Err(MemoryError::TooSmall(size));
        }
        if size > MAX_GUEST_BYTES {
            return Err(MemoryError::TooLarge(size));
        }
        Ok(())
    }

    /// The vm-memory view, for loaders and device emulation.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host virtual address of guest-physical 0.
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }

    /// Writes `data` at `addr` (a VMM write: recorded in the VMM-write bitmap).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|source| MemoryError::Access { addr, source })
    }

    /// Writes a plain value (an ABI structure, a little-endian integer) at `addr`.
    pub fn write_obj<T: ByteValued>(&self, addr: u64, v: T) -> Result<(), MemoryError> {
        self.mem
            .write_obj(v, GuestAddress(addr))
            .map_err(|source| MemoryError::Access { addr, source })
    }

    /// Reads a plain value at `addr` (reads leave no trace).
    pub fn read_obj<T: ByteValued>(&self, addr: u64) -> Result<T, MemoryError> {
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|source| MemoryError::Access { addr, source })
    }

    /// Guest pages the host kernel calls resident: backed ones and zero-page mappings (mincore).
    pub fn resident_pages(&self) -> Result<u64, MemoryError> {
        let mut vec = vec![0u8; self.pages() as usize];
        crate::memory::pagemap::mincore(self.host_addr, self.size as usize, &mut vec)
            .map_err(MemoryError::Mincore)?;
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
    }

    /// [`GuestRam::take_vmm_dirty`] for the words `windows` (word w: pages 64w..64w + 64) only:
    /// writes their bits into `out` (one word per 64 guest pages; other words are left alone)
    /// and resets them. The cost is the windows', not the RAM's.
    pub fn take_vmm_dirty_in(&self, windows: &[std::ops::Range<usize>], out: &mut [u64]) {
        let Some(region) = self.mem.iter().next() else {
            return;
        };
        let bitmap = vm_memory::MmapRegion::bitmap(region);
        let pages = self.pages() as usize;
        for w in windows.iter().flat_map(Clone::clone) {
            let Some(word) = out.get_mut(w) else {
                return;
            };
            let first = w * 64;
            *word = (first..(first + 64).min(pages))
                .filter(|&p| bitmap.is_bit_set(p))
                .fold(0, |acc, p| acc | 1 << (p - first));
            // Only the set bits are reset (an atomic read-modify-write each): usually few.
            let mut bits = *word;
            while bits != 0 {
                bitmap.reset_bit(first + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    /// Pages the VMM wrote since the last call, as bitmap words (bit i = guest page i); resets.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        self.mem
            .iter()
            .next()
            .map(|r| vm_memory::MmapRegion::bitmap(r).get_and_reset())
            .unwrap_or_default()
    }
}
