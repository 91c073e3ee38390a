//! The windowed harvest: the same map as the whole-RAM passes, at a cost that follows what the
//! guest populated, not its configured size.
//!
//! One `PAGEMAP_SCAN` per harvest (O(populated page tables): 8 µs over an empty 64 GiB) finds the
//! runs of guest pages that are present or swapped. A page whose dirty bit is set, or that the
//! VMM wrote, is one of them: a write populates the page, and only a release (which clears the
//! page's dirty bit and tells the map) or swap-out (still found, as swapped) takes it away. A page
//! that stopped being resident was resident at the last scan; a page the VMM wrote and then
//! released is in a range released since the last harvest. So the *windows* (the words of
//! the bitmaps around this scan's runs, the last scan's present runs and the released ranges) hold every bit the
//! harvest can learn from: the bitmap pass, the residency diff and the lookups read only them,
//! and the VM reads the dirty log only of the memslots they meet ([`PmpMmpMap::windows`]).
//!
//! **The scan follows what is new.** `PAGEMAP_SCAN` walks the entry of every present page (about
//! 15 ns each), so a scan of all of RAM costs what is present, not what is new. A word (64 pages)
//! whose pages were all present at the last scan, and that no VMM unmap has met since, is still
//! wholly present, so its runs of at least [`MIN_SKIP_WORDS`] words are not scanned again: they
//! count as present runs, and only the rest of RAM is scanned, one range between two skipped runs
//! at a time. Why a present page of such a word is still present at the scan:
//!
//! - guest accesses, the fault handler's fills and moves back, `MADV_POPULATE_READ` (zero
//!   mapping) only make pages present;
//! - a release (balloon, free page reporting, hypervisor swap-out: all through
//!   [`crate::kvm::vm::Vm::release`], the one `MADV_DONTNEED` of guest RAM) tells the map
//!   ([`PmpMmpMap::note_released`]), whose released ranges are scanned again;
//! - the access sampler's move-out (`UFFDIO_MOVE` to the stash) is undone before the scan: the
//!   round is closed first (`IntervalWork::end`: every sampled page the guest touched was moved
//!   back by the handler, every other one by `Faults::end_samples`), and a sampled page that had no
//!   page to move (`ENOENT`) was not present, so not in such a word, unless released since (told);
//! - the host kernel's swap-out (reclaim, `MADV_PAGEOUT`) leaves a swap entry: the scan skips
//!   nothing while the process has any (`VmSwap` of `/proc/self/status` above 0; a page swapped
//!   out and back in between two scans is present again, with a new frame `refresh` finds, as the
//!   whole-RAM scan would);
//! - KSM merging replaces a present entry with a present one (the merged page) under the page
//!   table lock, which `PAGEMAP_SCAN` takes too; breaking the merge is a write fault: present;
//! - migration (compaction, NUMA balancing) replaces an entry with a migration entry for the
//!   time of the copy, under the same lock, and back: a whole-RAM scan at that moment would see
//!   the page as swapped for a harvest, the skip sees it as what it is again a moment later;
//!   NUMA hinting entries (`PROT_NONE`) are present; THP splits and collapses keep every page
//!   mapped (collapse holds the mmap lock for writing, the scan for reading);
//! - nothing else unmaps guest RAM: it is never `munmap`ped or `mremap`ped while the VM runs.
//!
//! A lookup that finds a page of a skipped word not resident (a migration entry at that moment)
//! clears its residency bit; the next harvest's diff sets it again (the word counts as present),
//! so the map corrects itself as the whole-RAM path would.
//! `docs/design.md` ("A harvest that follows what was touched") has the measurements.

use std::ops::Range;
use std::time::Instant;

use serde::Serialize;

use super::{HarvestStats, LOOKUP_GAP_PAGES, MapError, PmpMmpMap, ResidencyMethod, ms};
use crate::memory::bitmap::{
    WORD_BITS, difference_windows, gap_ranges_of, inner_words, union_windows, word_masks,
    word_windows,
};
use crate::memory::pagemap::{PAGE_IS_PRESENT, PAGE_IS_SWAPPED, READ_CHUNK_ENTRIES};
use crate::observe::usage::kernel_swap_bytes;
use crate::units::PAGE_SIZE;

/// Runs of wholly present words shorter than this are scanned again all the same: each skipped
/// run costs one more ioctl. 4 measured best (`cargo bench --bench harvest -- scan`: with
/// 256 MiB in random 2 MiB runs, 8 skipped 6–24 MiB of it, 4 skipped 226 MiB and halved the
/// scan; 1 and 2 added more ioctls than they saved).
pub const MIN_SKIP_WORDS: usize = 4;

/// What one scan did ([`PmpMmpMap::last_scan`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ScanStats {
    /// `PAGEMAP_SCAN` ioctls made.
    pub ioctls: u64,
    /// Pages not scanned: wholly present words kept from the last scan.
    pub skipped_pages: u64,
    /// Whether the host kernel held swapped pages of the process, so nothing was skipped.
    pub kernel_swap: bool,
    /// Milliseconds of it.
    pub ms: f64,
}

/// What the windowed harvest keeps between harvests.
#[derive(Debug, Default)]
pub(super) struct State {
    /// This harvest's scan has run ([`PmpMmpMap::windows`]).
    scanned: bool,
    /// Runs of present pages found by this harvest's scan, ascending.
    present: Vec<Range<u64>>,
    /// The words to look at in this harvest, ascending and disjoint.
    windows: Vec<Range<usize>>,
    /// The words around the last harvest's present runs.
    last_present: Vec<Range<usize>>,
    /// Pages released since the last harvest: the VMM may have written them before.
    pub(super) released: Vec<Range<u64>>,
    /// The words whose pages were all present at the last scan, ascending and disjoint.
    full: Vec<Range<usize>>,
    /// The last scan's figures.
    last: ScanStats,
}

impl PmpMmpMap {
    /// Whether this map harvests by windows.
    pub(super) fn windowed(&self) -> bool {
        self.options.windowed && self.pagemap.scan_supported()
    }

    /// The words of the bitmaps (word `w`: guest pages `64w..64w + 64`) that the next harvest
    /// reads, ascending and disjoint; a dirty log need only be correct there. Scans guest RAM
    /// with `PAGEMAP_SCAN` the first time it is asked before a harvest. `None` when this map
    /// harvests by whole-RAM passes (every word counts then).
    pub fn windows(&mut self) -> Result<Option<&[Range<usize>]>, MapError> {
        if !self.windowed() {
            return Ok(None);
        }
        if !self.windows.scanned {
            self.scan_populated()?;
        }
        Ok(Some(&self.windows.windows))
    }

    /// The last scan's figures (zero before the first, or when harvesting by whole-RAM passes).
    pub fn last_scan(&self) -> ScanStats {
        self.windows.last
    }

    /// The scan: runs of present pages, and the windows around them, the swapped pages and the
    /// last scan's present pages. Words wholly present at the last scan and not released since
    /// are taken as present without a look (module docs).
    fn scan_populated(&mut self) -> Result<(), MapError> {
        let t0 = Instant::now();
        let (base, pages) = (self.host_addr as u64, self.pages);
        let mut present = std::mem::take(&mut self.windows.present);
        present.clear();
        let mut populated = Vec::new();
        let mut add = |first: u64, end: u64, is_present: bool| {
            populated.push(first..end);
            if is_present {
                match present.last_mut() {
                    Some(last) if last.end == first => last.end = end,
                    _ => present.push(first..end),
                }
            }
        };
        self.windows.released.sort_unstable_by_key(|r| r.start);
        let released = word_windows(self.windows.released.drain(..));
        let kernel_swap = kernel_swap_bytes()
            .inspect_err(|e| log::debug!("pmp-mmp scan: {e}; nothing skipped"))
            .map_or(true, |b| b > 0);
        let full = std::mem::take(&mut self.windows.full);
        let skip: Vec<Range<u64>> = if kernel_swap {
            Vec::new()
        } else {
            difference_windows(&full, &released)
                .into_iter()
                .filter(|w| w.len() >= MIN_SKIP_WORDS)
                .map(|w| w.start as u64 * WORD_BITS..(w.end as u64 * WORD_BITS).min(pages))
                .collect()
        };
        let mut stats = ScanStats {
            kernel_swap,
            ..ScanStats::default()
        };
        let mut from = 0;
        for s in skip.iter().cloned().chain(std::iter::once(pages..pages)) {
            if from < s.start {
                stats.ioctls += self
                    .pagemap
                    .scan_any(
                        self.host_addr + (from * PAGE_SIZE) as usize,
                        (s.start - from) as usize,
                        PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                        &mut self.scan_buf,
                        |r| {
                            let first = r.start.saturating_sub(base) / PAGE_SIZE;
                            let end = (r.end.saturating_sub(base) / PAGE_SIZE).min(pages);
                            if first < end {
                                add(first, end, r.categories & PAGE_IS_PRESENT != 0);
                            }
                        },
                    )
                    .map_err(|source| MapError::Residency {
                        method: ResidencyMethod::PagemapScan,
                        source,
                    })?;
            }
            if s.start < s.end {
                add(s.start, s.end, true);
                stats.skipped_pages += s.end - s.start;
            }
            from = s.end;
        }
        self.windows.windows = union_windows(
            &union_windows(&word_windows(populated), &self.windows.last_present),
            &released,
        );
        self.windows.full = inner_words(present.iter().cloned());
        self.windows.present = present;
        self.windows.scanned = true;
        stats.ms = ms(t0.elapsed());
        self.windows.last = stats;
        Ok(())
    }

    /// [`PmpMmpMap::harvest`] over the windows: the bitmap pass, the residency diff (the scan's
    /// present runs against the last) and the lookups, each word of the windows once.
    pub(super) fn harvest_windowed(
        &mut self,
        guest_dirty: &[u64],
        vmm_dirty: &[u64],
        interval: u32,
    ) -> Result<HarvestStats, MapError> {
        let mut stats = HarvestStats::default();
        let t0 = Instant::now();
        if !self.windows.scanned {
            self.scan_populated()?;
        }
        let windows = std::mem::take(&mut self.windows.windows);
        for w in windows.iter().flat_map(Clone::clone) {
            self.bitmap_word(w, guest_dirty, vmm_dirty, interval, &mut stats);
        }
        let t1 = Instant::now();
        stats.bitmap_ms = ms(t1 - t0);

        // The residency diff, word by word: the present runs are ascending, as are the windows,
        // and every present page lies in a window.
        let present = std::mem::take(&mut self.windows.present);
        let mut runs = present.iter().peekable();
        for win in &windows {
            let first = win.start as u64 * WORD_BITS;
            let mut now = vec![0u64; win.end - win.start];
            while let Some(r) = runs.peek() {
                if r.start >= win.end as u64 * WORD_BITS {
                    break;
                }
                for (w, mask) in word_masks(r.start.max(first)..r.end) {
                    if let Some(x) = now.get_mut(w - win.start) {
                        *x |= mask;
                    }
                }
                if r.end > win.end as u64 * WORD_BITS {
                    break;
                }
                runs.next();
            }
            for (k, &bits) in now.iter().enumerate() {
                super::residency::settle(self, win.start + k, bits);
            }
        }
        stats.residency_ran = true;
        stats.residency_method = Some(ResidencyMethod::PagemapScan);
        let t2 = Instant::now();
        stats.residency_ms = ms(t2 - t1);

        let ones = windows.iter().flat_map(|w| {
            self.pending
                .ones_in(w.start as u64 * WORD_BITS..w.end as u64 * WORD_BITS)
        });
        let ranges = gap_ranges_of(ones, LOOKUP_GAP_PAGES, READ_CHUNK_ENTRIES as u64);
        let (lookups, newly) = self.lookup_pending(interval, Some(ranges))?;
        stats.lookups = lookups;
        stats.newly_touched += newly;
        stats.lookup_ms = ms(t2.elapsed());

        self.windows.last_present = word_windows(present.iter().cloned());
        self.windows.present = present;
        self.windows.windows = windows;
        self.windows.scanned = false;
        self.interval_count = self.interval_count.max(interval + 1);
        self.harvests += 1;
        log::debug!("pmp-mmp windowed harvest {interval}: {stats:?}");
        Ok(stats)
    }
}
