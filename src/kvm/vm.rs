//! The KVM VM, and the owner of its memory: guest RAM as memslots with dirty logging in
//! manual-protect mode (the first guest write to each page is logged and only
//! `KVM_CLEAR_DIRTY_LOG` re-arms protection), and every release of guest pages
//! ([`Vm::release`]).
//!
//! The VM owns guest memory (as Firecracker's `Vm` owns its regions), and a
//! [`crate::kvm::vcpu::Vcpu`] borrows the VM, so the memslots cannot outlive the mapping behind
//! them and no vCPU can outlive the VM: both hold by construction.
//!
//! Guest RAM is one mapping, registered as consecutive memslots of [`SLOT_PAGES`] pages (fewer
//! larger ones only if KVM has too few slots), because KVM reads a dirty log only a whole slot at a
//! time: a release then reads the log of the slots it touches, not of all of RAM.

use std::ops::Range;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::kvm::ioctls;
use crate::memory::bitmap::{WORD_BITS, Window, words_for};
use crate::memory::{GuestMemory, GuestRam, MemoryError};
use crate::units::PAGE_SIZE;

/// Guest pages per memslot (1 GiB), unless KVM has too few slots for the RAM.
pub const SLOT_PAGES: u64 = (1 << 30) / PAGE_SIZE;
/// Memslots left for others (a device's memory, say) when RAM is split.
const SPARE_SLOTS: usize = 8;
/// Where KVM may put the three-page TSS it needs on Intel (outside guest RAM).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Errors while creating or driving the VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM lacks a capability memvisor needs: {0}")]
    Capability(ioctls::KvmExtError),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("enabling manual dirty-log protection: {0}")]
    ManualProtect(ioctls::KvmExtError),
    #[error("KVM_SET_USER_MEMORY_REGION for guest RAM: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("reading the dirty log: {0}")]
    GetDirtyLog(ioctls::KvmExtError),
    #[error("KVM_CLEAR_DIRTY_LOG: {0}")]
    ClearDirtyLog(ioctls::KvmExtError),
    #[error("releasing guest pages: {0}")]
    Release(#[source] MemoryError),
}

/// Pages per memslot for `pages` pages of RAM when KVM offers `max_slots` slots: [`SLOT_PAGES`],
/// doubled until the slots fit with `SPARE_SLOTS` to spare (one slot when even that fails).
pub fn slot_pages_for(pages: u64, max_slots: usize) -> u64 {
    let room = max_slots.saturating_sub(SPARE_SLOTS).max(1) as u64;
    let mut size = SLOT_PAGES;
    while pages.div_ceil(size) > room && size < pages {
        size *= 2;
    }
    size
}

/// One release: guest pages `pages`, and KVM's dirty bits over them just before (bits of the
/// window's other pages are as KVM had them, untouched). The map and the samplers must be told
/// (`IntervalWork::release`, the one caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub pages: Range<u64>,
    pub dirty: Window,
}

/// A VM with guest RAM registered. Fields drop in order: the VM's file descriptor (and with it the
/// memslots) before the memory they point at.
pub struct Vm {
    fd: VmFd,
    kvm: Kvm,
    memory: GuestMemory,
    /// Guest pages per memslot (the last may be shorter); slot `i` starts at page `i * slot_pages`.
    slot_pages: u64,
}

impl Vm {
    /// Opens KVM, checks capabilities, creates the VM and registers `ram` with dirty logging.
    pub fn new(ram: GuestRam) -> Result<Self, VmError> {
        Self::with_slot_pages(ram, None)
    }

    /// [`Vm::new`] with memslots of `slot_pages` pages (rounded up to a multiple of 64), if KVM has
    /// slots enough: for tests and benchmarks, which compare slot sizes.
    #[doc(hidden)]
    pub fn with_slot_pages(ram: GuestRam, slot_pages: Option<u64>) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        ioctls::check_capabilities(&kvm).map_err(VmError::Capability)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDR).map_err(VmError::SetTss)?;
        ioctls::enable_manual_dirty_log_protect(&fd).map_err(VmError::ManualProtect)?;
        let max = kvm.get_nr_memslots();
        let slot_pages = match slot_pages.map(|p| p.max(1).next_multiple_of(WORD_BITS)) {
            Some(p) if ram.pages().div_ceil(p) as usize + SPARE_SLOTS <= max => p,
            _ => slot_pages_for(ram.pages(), max),
        };
        let vm = Vm {
            fd,
            kvm,
            memory: GuestMemory::new(ram),
            slot_pages,
        };
        for (slot, pages) in vm.slots() {
            let region = kvm_userspace_memory_region {
                slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: pages.start * PAGE_SIZE,
                memory_size: (pages.end - pages.start) * PAGE_SIZE,
                userspace_addr: (vm.ram().host_addr() as u64) + pages.start * PAGE_SIZE,
            };
            // SAFETY: the region is part of guest RAM's own mapping, which the VM owns and drops
            // only after its file descriptor (field order), so no memslot outlives it; vCPUs
            // borrow the VM, so none can keep the VM alive past that either.
            unsafe { vm.fd.set_user_memory_region(region) }.map_err(VmError::SetMemory)?;
        }
        Ok(vm)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        self.memory.ram()
    }

    /// Guest memory: RAM and its userfaultfd.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest pages per memslot.
    pub fn slot_pages(&self) -> u64 {
        self.slot_pages
    }

    /// The memslots and the guest pages each holds.
    fn slots(&self) -> impl Iterator<Item = (u32, Range<u64>)> + use<> {
        let (pages, size) = (self.ram().pages(), self.slot_pages);
        (0..pages.div_ceil(size)).map(move |i| (i as u32, i * size..((i + 1) * size).min(pages)))
    }

    /// The memslots that hold pages of `range`, each with its part of the range.
    fn slots_of(&self, range: &Range<u64>) -> impl Iterator<Item = (u32, Range<u64>, Range<u64>)> {
        self.slots().filter_map(move |(slot, pages)| {
            let part = range.start.max(pages.start)..range.end.min(pages.end);
            (part.start < part.end).then_some((slot, pages, part))
        })
    }

    /// Reads slot `slot` (holding `pages`) into `out`, its part of a RAM-wide bitmap.
    fn get_slot(&self, slot: u32, pages: &Range<u64>, out: &mut [u64]) -> Result<(), VmError> {
        // SAFETY: `slot` was registered over exactly `pages` (see `new`).
        unsafe { ioctls::get_dirty_log(&self.fd, slot, pages.end - pages.start, out) }
            .map_err(VmError::GetDirtyLog)
    }

    /// KVM's dirty bitmap for guest RAM (bit i = guest page i): bits stay set until cleared
    /// (manual protect).
    pub fn dirty_log(&self) -> Result<(Vec<u64>, u64), VmError> {
        let mut out = vec![0u64; words_for(self.ram().pages())];
        let mut n = 0;
        for (slot, pages) in self.slots() {
            let w = (pages.start / WORD_BITS) as usize;
            self.get_slot(slot, &pages, &mut out[w..])?;
            n += 1;
        }
        Ok((out, n))
    }

    /// Reads KVM's dirty log into `out` (one word per 64 guest pages, kept between calls) for
    /// the words `windows` at least: every memslot they meet is read whole (`None`: every
    /// memslot); words of slots read last time (`read`, updated) and not now are zeroed, so no
    /// stale bit stays behind. Returns how many slots were read. The cost is the slots'.
    pub fn dirty_log_in(
        &self,
        out: &mut Vec<u64>,
        windows: Option<&[Range<usize>]>,
        read: &mut Vec<u32>,
    ) -> Result<u64, VmError> {
        let pages = self.ram().pages();
        out.resize(words_for(pages), 0);
        let slot_words = (self.slot_pages / WORD_BITS) as usize;
        let mut now: Vec<u32> = match windows {
            None => self.slots().map(|(s, _)| s).collect(),
            Some(ws) => {
                let mut v: Vec<u32> = Vec::new();
                for w in ws.iter().filter(|w| w.start < w.end) {
                    for s in w.start / slot_words..=(w.end - 1) / slot_words {
                        if v.last() != Some(&(s as u32)) {
                            v.push(s as u32);
                        }
                    }
                }
                v.dedup();
                v
            }
        };
        for &s in read.iter() {
            if now.binary_search(&s).is_err() {
                let first = s as usize * slot_words;
                let end = (first + slot_words).min(out.len());
                out[first..end].fill(0);
            }
        }
        for &s in &now {
            let start = u64::from(s) * self.slot_pages;
            let pages = start..(start + self.slot_pages).min(pages);
            let w = (start / WORD_BITS) as usize;
            self.get_slot(s, &pages, &mut out[w..])?;
        }
        std::mem::swap(read, &mut now);
        Ok(read.len() as u64)
    }

    /// Clears the dirty bits of guest pages `pages` (ascending) and write-protects them again:
    /// one `KVM_CLEAR_DIRTY_LOG` per memslot, over the words from its first page's to its last's.
    /// The cost is those windows' and the pages', not the RAM's.
    pub fn clear_dirty_pages(&self, pages: &[u64]) -> Result<(), VmError> {
        let total = self.ram().pages();
        let mut i = 0;
        while i < pages.len() {
            let slot = pages[i] / self.slot_pages;
            let slot_start = slot * self.slot_pages;
            let slot_end = (slot_start + self.slot_pages).min(total);
            let mut j = i;
            while j < pages.len() && pages[j] < slot_end {
                j += 1;
            }
            let part = &pages[i..j];
            i = j.max(i + 1);
            let Some(&last) = part.last() else {
                continue;
            };
            if last >= total {
                break;
            }
            let lo = part[0] - part[0] % WORD_BITS;
            let hi = (last + 1).next_multiple_of(WORD_BITS).min(slot_end);
            let mut mask = vec![0u64; words_for(hi - lo)];
            for &p in part {
                mask[((p - lo) / WORD_BITS) as usize] |= 1 << ((p - lo) % WORD_BITS);
            }
            ioctls::clear_dirty_log(
                &self.fd,
                slot as u32,
                lo - slot_start,
                (hi - lo) as u32,
                &mask,
            )
            .map_err(VmError::ClearDirtyLog)?;
        }
        Ok(())
    }

    /// Clears the bits in `mask` (a RAM-wide bitmap; missing words clear nothing) and
    /// write-protects those pages again. Slots with no bit set in `mask` are not asked.
    pub fn clear_dirty(&self, mask: &[u64]) -> Result<(), VmError> {
        for (slot, pages) in self.slots() {
            let first = (pages.start / WORD_BITS) as usize;
            let last = words_for(pages.end).min(mask.len());
            let Some(words) = mask.get(first..last.max(first)) else {
                break;
            };
            if words.iter().all(|&w| w == 0) {
                continue;
            }
            let n = pages.end - pages.start;
            let padded;
            let words = if words.len() < words_for(n) {
                padded = [words, &vec![0; words_for(n) - words.len()]].concat();
                &padded[..]
            } else {
                words
            };
            ioctls::clear_dirty_log(&self.fd, slot, 0, n as u32, words)
                .map_err(VmError::ClearDirtyLog)?;
        }
        Ok(())
    }

    /// Gives guest pages `ranges` back to the host: the one way guest memory is released, keeping
    /// in step everything that knows a page. For each range, with the guest stopped: KVM's dirty
    /// bits over it are read (so the map can record what the guest wrote there since the last
    /// harvest), the pages are discarded (a sampled page among them loses its stashed contents:
    /// [`GuestMemory::discard`]), and their dirty bits are cleared, which write-protects them
    /// again so that a write after the release shows as a new one. The map and the samplers get
    /// the returned records (`IntervalWork::release`, the one caller).
    ///
    /// The cost is the ranges' and their memslots' (a `KVM_GET_DIRTY_LOG` of each slot touched,
    /// 32 KiB of bitmap per GiB slot), not the RAM's.
    pub fn release(&self, ranges: &[Range<u64>]) -> Result<Vec<Released>, VmError> {
        let mut out = Vec::with_capacity(ranges.len());
        let mut slot_words = Vec::new();
        for r in ranges {
            if r.start >= r.end || r.end > self.ram().pages() {
                return Err(VmError::Release(MemoryError::DiscardOutside {
                    pages: r.clone(),
                    ram_pages: self.ram().pages(),
                }));
            }
            // The window: whole words around the range, filled slot by slot.
            let first_word = r.start / WORD_BITS;
            let mut window = vec![0u64; words_for(r.end) - first_word as usize];
            for (slot, pages, part) in self.slots_of(r) {
                slot_words.clear();
                slot_words.resize(words_for(pages.end - pages.start), 0);
                self.get_slot(slot, &pages, &mut slot_words)?;
                // Slots start on a word: the part's words copy over whole.
                let from = (part.start / WORD_BITS - pages.start / WORD_BITS) as usize;
                let to = (part.start / WORD_BITS - first_word) as usize;
                let n = words_for(part.end) - (part.start / WORD_BITS) as usize;
                window[to..to + n].copy_from_slice(&slot_words[from..from + n]);
            }
            self.memory.discard(r.clone()).map_err(VmError::Release)?;
            for (slot, pages, part) in self.slots_of(r) {
                self.clear_part(slot, &pages, &part)?;
            }
            out.push(Released {
                pages: r.clone(),
                dirty: Window::new(r.start, window),
            });
        }
        Ok(out)
    }

    /// Clears the dirty bits of `part` (inside slot `slot`, holding `pages`) with one
    /// `KVM_CLEAR_DIRTY_LOG` over the whole words around it.
    fn clear_part(&self, slot: u32, pages: &Range<u64>, part: &Range<u64>) -> Result<(), VmError> {
        // The window's first page is a multiple of 64; it ends on one too, or at the slot's end.
        let lo = part.start - part.start % WORD_BITS;
        let hi = part.end.next_multiple_of(WORD_BITS).min(pages.end);
        let mut mask = vec![0u64; words_for(hi - lo)];
        for (w, m) in crate::memory::bitmap::word_masks(part.start - lo..part.end - lo) {
            mask[w] = m;
        }
        ioctls::clear_dirty_log(&self.fd, slot, lo - pages.start, (hi - lo) as u32, &mask)
            .map_err(VmError::ClearDirtyLog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::ioctls::test_support::{kvm_or_skip, run_to_hlt};

    #[test]
    fn slots_are_a_gib_unless_kvm_has_too_few() {
        let gib = SLOT_PAGES;
        assert_eq!(slot_pages_for(1000, 32764), gib, "a small RAM is one slot");
        assert_eq!(slot_pages_for(64 * gib, 32764), gib);
        assert_eq!(
            slot_pages_for(1024 * gib, 509),
            4 * gib,
            "1 TiB in 256 slots"
        );
        assert_eq!(
            slot_pages_for(1024 * gib, 0),
            1024 * gib,
            "no room: one slot"
        );
        assert_eq!(slot_pages_for(3 * gib + 5, 9), 4 * gib);
    }

    /// Guest code: `mov byte [addr], 1` for each address, then `hlt` (16-bit real mode, DS = 0).
    fn writes(addrs: &[u16]) -> Vec<u8> {
        let mut code = Vec::new();
        for a in addrs {
            code.extend([0xc6, 0x06]);
            code.extend(a.to_le_bytes());
            code.push(1);
        }
        code.push(0xf4);
        code
    }

    #[test]
    fn a_release_across_slots_reads_and_clears_each_slots_part() {
        let Some(_) = kvm_or_skip("a_release_across_slots_reads_and_clears_each_slots_part") else {
            return;
        };
        // Slots of 64 pages; the guest writes pages 1, 63, 64 and 65 (DS moved to page 63).
        let vm = Vm::with_slot_pages(GuestRam::new(4 << 20, false).unwrap(), Some(64)).unwrap();
        assert_eq!(vm.slot_pages(), 64);
        let mut code = vec![0xc6, 0x06, 0x00, 0x10, 0x01]; // mov byte [0x1000], 1
        code.extend([0xb8, 0x00, 0x3f, 0x8e, 0xd8]); // mov ax, 0x3f00 ; mov ds, ax
        code.extend(&writes(&[0x0000, 0x1000, 0x2000])[..]);
        vm.ram().write(0, &code).unwrap();
        let mut vcpu = vm.fd().create_vcpu(0).unwrap();
        run_to_hlt(&mut vcpu);
        let ones = |log: &[u64]| -> Vec<u64> {
            crate::memory::bitmap::Bitmap::from_words(log, vm.ram().pages())
                .iter_ones()
                .collect()
        };
        assert_eq!(ones(&vm.dirty_log().unwrap().0), vec![1, 63, 64, 65]);
        let rel = vm.release(&[Range { start: 62, end: 65 }]).unwrap();
        assert_eq!(rel[0].dirty.first_page(), 0);
        let seen: Vec<u64> = (0..200).filter(|&p| rel[0].dirty.get(p)).collect();
        assert_eq!(
            seen,
            vec![1, 63, 64, 65],
            "both slots' words, as KVM had them"
        );
        assert_eq!(ones(&vm.dirty_log().unwrap().0), vec![1, 65]);
        // A RAM-wide clear reaches every slot it has bits for.
        let mut mask = vec![0u64; 16];
        mask[0] = 1 << 1;
        mask[1] = 1 << 1;
        vm.clear_dirty(&mask).unwrap();
        assert!(ones(&vm.dirty_log().unwrap().0).is_empty());
        drop(vcpu);
    }

    #[test]
    fn release_reads_and_clears_only_its_window_and_discards() {
        let Some(_) = kvm_or_skip("release_reads_and_clears_only_its_window_and_discards") else {
            return;
        };
        let vm = Vm::new(GuestRam::new(4 << 20, false).unwrap()).unwrap();
        // The guest writes pages 1, 2, 3 and 9; its code is on page 0.
        vm.ram()
            .write(0, &writes(&[0x1000, 0x2000, 0x3000, 0x9000]))
            .unwrap();
        let mut vcpu = vm.fd().create_vcpu(0).unwrap();
        run_to_hlt(&mut vcpu);
        let dirty = |vm: &Vm| -> Vec<u64> {
            let (log, _) = vm.dirty_log().unwrap();
            crate::memory::bitmap::Bitmap::from_words(&log, vm.ram().pages())
                .iter_ones()
                .collect()
        };
        assert_eq!(dirty(&vm), vec![1, 2, 3, 9]);
        let rel = vm.release(&[Range { start: 2, end: 4 }]).unwrap();
        assert_eq!(rel.len(), 1);
        assert_eq!(rel[0].pages, 2..4);
        let seen: Vec<u64> = (0..64).filter(|&p| rel[0].dirty.get(p)).collect();
        assert_eq!(seen, vec![1, 2, 3, 9], "the window's bits as KVM had them");
        assert_eq!(dirty(&vm), vec![1, 9], "only the range's bits cleared");
        let v: u8 = vm.ram().read_obj(0x2000).unwrap();
        assert_eq!(v, 0, "released pages read zero");
        let v: u8 = vm.ram().read_obj(0x1000).unwrap();
        assert_eq!(v, 1, "the page before is kept");
        // A write after the release is logged again.
        run_to_hlt(&mut vcpu);
        assert_eq!(dirty(&vm), vec![1, 2, 3, 9]);
        // Bad ranges are refused before anything is done.
        let pages = vm.ram().pages();
        for bad in [3..3, pages..pages + 1] {
            assert!(matches!(
                vm.release(&[bad]),
                Err(VmError::Release(MemoryError::DiscardOutside { .. }))
            ));
        }
        drop(vcpu);
    }
}
