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
//! `docs/design.md` ("A harvest that follows what was touched") has the measurements.

use std::ops::Range;
use std::time::Instant;

use super::{HarvestStats, LOOKUP_GAP_PAGES, MapError, PmpMmpMap, ResidencyMethod, ms};
use crate::memory::bitmap::{WORD_BITS, gap_ranges_of, union_windows, word_masks, word_windows};
use crate::memory::pagemap::{PAGE_IS_PRESENT, PAGE_IS_SWAPPED, READ_CHUNK_ENTRIES};
use crate::units::PAGE_SIZE;

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

    /// The scan: runs of present pages, and the windows around them, the swapped pages and the
    /// last scan's present pages.
    fn scan_populated(&mut self) -> Result<(), MapError> {
        let base = self.host_addr as u64;
        let mut present = std::mem::take(&mut self.windows.present);
        present.clear();
        let mut populated = Vec::new();
        self.pagemap
            .scan_any(
                self.host_addr,
                self.pages as usize,
                PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                &mut self.scan_buf,
                |r| {
                    let first = r.start.saturating_sub(base) / PAGE_SIZE;
                    let end = (r.end.saturating_sub(base) / PAGE_SIZE).min(self.pages);
                    if first >= end {
                        return;
                    }
                    populated.push(first..end);
                    if r.categories & PAGE_IS_PRESENT != 0 {
                        match present.last_mut() {
                            Some(last) if last.end == first => last.end = end,
                            _ => present.push(first..end),
                        }
                    }
                },
            )
            .map_err(|source| MapError::Residency {
                method: ResidencyMethod::PagemapScan,
                source,
            })?;
        self.windows.released.sort_unstable_by_key(|r| r.start);
        let released = word_windows(self.windows.released.drain(..));
        self.windows.windows = union_windows(
            &union_windows(&word_windows(populated), &self.windows.last_present),
            &released,
        );
        self.windows.present = present;
        self.windows.scanned = true;
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
