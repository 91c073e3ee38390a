//! The residency pass: which pages of guest RAM became resident, or stopped being resident,
//! since the last pass. Pages read but never written leave no trace in KVM's dirty log; this pass
//! is how the map finds them (and pages the VMM dropped).
//!
//! Two ways to do the pass, measured here (`benches/harvest.rs`): `mincore` costs about 0.5 ns
//! per guest page (9 ms for 64 GiB) whatever is resident; the `PAGEMAP_SCAN` ioctl (Linux 6.7+)
//! walks only populated page tables and returns runs of present pages, about 11 ns per
//! *resident* page and next to nothing for the rest (1.4 ms for 64 GiB with 256 MiB resident).
//! [`ResidencyMethod::Auto`] picks the scan while fewer than 1/[`AUTO_SCAN_DIVISOR`] of the
//! pages were resident at the last look, else `mincore`. Either way the result is a diff against
//! the last pass: the pages that changed are queued for a pagemap lookup.

use serde::Serialize;

use super::{MapError, PmpMmpMap};
use crate::memory::bitmap::{Bitmap, WORD_BITS, word_masks};
use crate::memory::pagemap::{self, MINCORE_CHUNK_PAGES, PAGE_IS_PRESENT, PagemapError};
use crate::units::PAGE_SIZE;

/// How the residency pass finds the resident pages of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ResidencyMethod {
    /// Per pass: `PAGEMAP_SCAN` while fewer than 1/`AUTO_SCAN_DIVISOR` of the pages were
    /// resident at the last look (and the kernel has it), else `mincore`.
    Auto,
    /// `mincore(2)`: a byte per page, O(pages).
    Mincore,
    /// The `PAGEMAP_SCAN` ioctl: runs of present pages, O(populated page tables).
    PagemapScan,
}

/// [`ResidencyMethod::Auto`] scans while resident pages < guest pages / this.
pub const AUTO_SCAN_DIVISOR: u64 = 20;

impl PmpMmpMap {
    /// Runs the residency pass with the configured method (`Auto` choosing per pass); returns
    /// the method used.
    pub(super) fn residency_pass(&mut self) -> Result<ResidencyMethod, MapError> {
        let method = match self.method {
            ResidencyMethod::Auto
                if self.resident.count_ones().saturating_mul(AUTO_SCAN_DIVISOR) < self.pages =>
            {
                ResidencyMethod::PagemapScan
            }
            ResidencyMethod::Auto => ResidencyMethod::Mincore,
            m => m,
        };
        let r = match method {
            ResidencyMethod::PagemapScan => self.scan_pass(),
            _ => self.mincore_pass(),
        };
        r.map_err(|source| MapError::Residency { method, source })?;
        Ok(method)
    }

    /// Compares residency with the last pass: pages newly resident or newly gone are queued for a
    /// lookup.
    fn mincore_pass(&mut self) -> Result<(), PagemapError> {
        let chunk_pages = MINCORE_CHUNK_PAGES as u64;
        self.mincore_buf.resize(MINCORE_CHUNK_PAGES, 0);
        let mut p0 = 0u64;
        while p0 < self.pages {
            let n = (self.pages - p0).min(chunk_pages);
            let addr = self.host_addr + (p0 * PAGE_SIZE) as usize;
            pagemap::mincore(addr, (n * PAGE_SIZE) as usize, &mut self.mincore_buf)?;
            // p0 is a multiple of 64, so byte 64k of the buffer starts word p0/64 + k.
            let w0 = (p0 / WORD_BITS) as usize;
            for (k, bytes) in self.mincore_buf[..n as usize].chunks(64).enumerate() {
                settle_residency(
                    &mut self.resident,
                    &mut self.pending,
                    self.touched.bitmap(),
                    w0 + k,
                    pack_residency(bytes),
                );
            }
            p0 += n;
        }
        Ok(())
    }

    /// The residency pass with `PAGEMAP_SCAN`: the same diff as [`Self::mincore_pass`], built from
    /// runs of present pages.
    fn scan_pass(&mut self) -> Result<(), PagemapError> {
        let base = self.host_addr as u64;
        let mut diff = ResidencyDiff {
            resident: &mut self.resident,
            pending: &mut self.pending,
            touched: self.touched.bitmap(),
            next_word: 0,
            cur: None,
        };
        self.pagemap.scan(
            self.host_addr,
            self.pages as usize,
            PAGE_IS_PRESENT,
            &mut self.scan_buf,
            |r| {
                let first = (r.start.saturating_sub(base)) / PAGE_SIZE;
                let end = (r.end.saturating_sub(base)) / PAGE_SIZE;
                diff.add_run(first, end);
            },
        )?;
        diff.finish();
        Ok(())
    }
}

/// [`settle_residency`] on the map's own bitmaps.
pub(super) fn settle(map: &mut PmpMmpMap, w: usize, now: u64) {
    settle_residency(
        &mut map.resident,
        &mut map.pending,
        map.touched.bitmap(),
        w,
        now,
    );
}

/// Word `w` of the residency bitmap now reads `now`: pages newly resident, and touched pages no
/// longer resident, are queued in `pending` for a lookup.
fn settle_residency(
    resident: &mut Bitmap,
    pending: &mut Bitmap,
    touched: &Bitmap,
    w: usize,
    now: u64,
) {
    let prev = resident.words()[w];
    if prev != now {
        let appeared = now & !prev;
        let gone = prev & !now & touched.words()[w];
        pending.words_mut()[w] |= appeared | gone;
        resident.words_mut()[w] = now;
    }
}

/// Residency diff built word by word from ascending runs of present pages: words between runs
/// are "nothing resident".
struct ResidencyDiff<'a> {
    resident: &'a mut Bitmap,
    pending: &'a mut Bitmap,
    touched: &'a Bitmap,
    /// Words below this are settled.
    next_word: usize,
    /// The word being assembled and its bits.
    cur: Option<(usize, u64)>,
}

impl ResidencyDiff<'_> {
    fn add_run(&mut self, start: u64, end: u64) {
        let start = start.max(self.next_word as u64 * WORD_BITS);
        for (w, mask) in word_masks(start..end.min(self.resident.len())) {
            match self.cur {
                Some((cw, ref mut bits)) if cw == w => *bits |= mask,
                _ => {
                    self.settle_cur();
                    self.settle_empty(w);
                    self.cur = Some((w, mask));
                }
            }
        }
    }

    fn settle_cur(&mut self) {
        if let Some((w, now)) = self.cur.take() {
            self.settle(w, now);
            self.next_word = w + 1;
        }
    }

    /// Settles words `next_word..upto` as holding nothing resident.
    fn settle_empty(&mut self, upto: usize) {
        for w in self.next_word..upto.min(self.resident.words().len()) {
            if self.resident.words()[w] != 0 {
                self.settle(w, 0);
            }
        }
        self.next_word = self.next_word.max(upto);
    }

    fn settle(&mut self, w: usize, now: u64) {
        settle_residency(self.resident, self.pending, self.touched, w, now);
    }

    fn finish(mut self) {
        self.settle_cur();
        let n = self.resident.words().len();
        self.settle_empty(n);
    }
}

/// Packs up to 64 mincore bytes (bit 0 = resident) into one word, byte i -> bit i.
fn pack_residency(bytes: &[u8]) -> u64 {
    // Moves bit 0 of byte k of a little-endian u64 to bit 56 + k (the partial products land on
    // distinct bits, so nothing carries).
    let gather = |b: [u8; 8]| {
        let x = u64::from_le_bytes(b) & 0x0101_0101_0101_0101;
        x.wrapping_mul(0x0102_0408_1020_4080) >> 56
    };
    let (groups, rest) = bytes.as_chunks::<8>();
    let mut word = 0u64;
    for (i, g) in groups.iter().enumerate().take(8) {
        word |= gather(*g) << (8 * i);
    }
    if !rest.is_empty() && groups.len() < 8 {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        word |= gather(b) << (8 * groups.len());
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_mincore_bytes() {
        let mut bytes = [0u8; 64];
        for i in [0usize, 3, 8, 9, 63] {
            bytes[i] = 1;
        }
        bytes[5] = 0xfe; // only bit 0 counts
        assert_eq!(
            pack_residency(&bytes),
            (1 << 0) | (1 << 3) | (1 << 8) | (1 << 9) | (1 << 63)
        );
        let all = [1u8; 64];
        assert_eq!(pack_residency(&all), u64::MAX);
        assert_eq!(pack_residency(&all[..5]), 0b11111);
    }

    #[test]
    fn settling_queues_appeared_and_gone_touched_pages() {
        let mut resident = Bitmap::new(128);
        let mut pending = Bitmap::new(128);
        let mut touched = Bitmap::new(128);
        resident.words_mut()[0] = 0b0110;
        touched.words_mut()[0] = 0b0010;
        // Page 1 gone (touched: queued), page 2 gone (never touched: not queued), page 3 new.
        settle_residency(&mut resident, &mut pending, &touched, 0, 0b1000);
        assert_eq!(pending.iter_ones().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(resident.words()[0], 0b1000);
        // Runs across words: 60..70 resident, word 1 had 100 resident before.
        resident.words_mut()[1] = 1 << (100 - 64);
        pending.clear_all();
        let mut diff = ResidencyDiff {
            resident: &mut resident,
            pending: &mut pending,
            touched: &touched,
            next_word: 0,
            cur: None,
        };
        diff.add_run(60, 70);
        diff.finish();
        assert_eq!(
            resident.iter_ones().collect::<Vec<_>>(),
            (60..70).collect::<Vec<_>>()
        );
        assert_eq!(
            pending.iter_ones().collect::<Vec<_>>(),
            (60..70).collect::<Vec<_>>(),
            "page 3 gone but untouched, page 100 gone but untouched"
        );
    }
}
