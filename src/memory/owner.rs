//! Guest memory as one owner: the RAM mapping and the VM's one userfaultfd ([`Faults`]), and the
//! only way guest pages are given back to the host ([`GuestMemory::discard`]), which keeps the
//! pages moved out by the fault handler in step. Devices never discard: they hand page ranges to
//! the VM ([`crate::kvm::vm::Vm::release`]), which discards them here and keeps the dirty log in
//! step too.

use std::ops::Range;
use std::sync::OnceLock;

use crate::memory::faults::{Faults, FaultsError};
use crate::memory::ram::{GuestRam, MemoryError};
use crate::units::PAGE_SIZE;

/// Guest RAM with its userfaultfd. Fields drop in order: the fault handler stops before the RAM
/// it moves pages in and out of is unmapped.
pub struct GuestMemory {
    faults: OnceLock<Faults>,
    ram: GuestRam,
}

impl GuestMemory {
    /// Takes ownership of `ram`; page faults are not handled until [`GuestMemory::start_faults`].
    pub fn new(ram: GuestRam) -> Self {
        GuestMemory {
            faults: OnceLock::new(),
            ram,
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The userfaultfd and its handler, if started.
    pub fn faults(&self) -> Option<&Faults> {
        self.faults.get()
    }

    /// Starts handling page faults, with a stash of `stash_pages` pages for sampled pages; the
    /// second and later calls return the handler already running (with its stash).
    pub fn start_faults(&self, stash_pages: u64) -> Result<&Faults, FaultsError> {
        if let Some(f) = self.faults.get() {
            return Ok(f);
        }
        let f = Faults::start(&self.ram, stash_pages)?;
        Ok(self.faults.get_or_init(|| f))
    }

    /// Gives guest pages `pages` back to the host (`MADV_DONTNEED`): the guest reads them as zero
    /// afterwards, and its next write gets a fresh machine page. A page moved out among them (a
    /// sampled page) loses its stashed contents too. The range must lie in guest RAM. The cost is
    /// the range's, not the RAM's. Call with the guest stopped; the dirty log is the VM's part
    /// ([`crate::kvm::vm::Vm::release`], the one caller).
    pub fn discard(&self, pages: Range<u64>) -> Result<(), MemoryError> {
        if pages.start >= pages.end || pages.end > self.ram.pages() {
            return Err(MemoryError::DiscardOutside {
                pages,
                ram_pages: self.ram.pages(),
            });
        }
        let len = ((pages.end - pages.start) * PAGE_SIZE) as usize;
        let addr = self.ram.host_addr() + (pages.start * PAGE_SIZE) as usize;
        // SAFETY: [addr, addr + len) lies inside our own guest RAM mapping (checked above); the
        // VMM holds no references into guest pages (all accesses go through vm-memory's volatile
        // copies), so dropping their contents cannot invalidate any Rust reference.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(MemoryError::Madvise(std::io::Error::last_os_error()));
        }
        if let Some(f) = self.faults.get() {
            f.released(&pages);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_zeroes_its_range_only_and_refuses_outside() {
        let mem = GuestMemory::new(GuestRam::new(4 << 20, false).unwrap());
        let ram = mem.ram();
        for gfn in 0..8 {
            ram.write_obj(gfn * PAGE_SIZE, gfn + 1).unwrap();
        }
        mem.discard(2..5).unwrap();
        let got: Vec<u64> = (0..8)
            .map(|g| ram.read_obj::<u64>(g * PAGE_SIZE).unwrap())
            .collect();
        assert_eq!(got, vec![1, 2, 0, 0, 0, 6, 7, 8]);
        let pages = ram.pages();
        let (hi, lo) = (7, 3);
        for bad in [5..5, hi..lo, pages - 1..pages + 1, u64::MAX - 1..u64::MAX] {
            let e = mem.discard(bad.clone()).unwrap_err();
            assert!(
                matches!(e, MemoryError::DiscardOutside { ref pages, .. } if *pages == bad),
                "{e}"
            );
        }
    }
}
