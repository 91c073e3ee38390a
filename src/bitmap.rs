//! Dense page bitmaps (one bit per guest page, packed in `u64` words the way KVM's dirty log is)
//! and the range arithmetic behind `KVM_CLEAR_DIRTY_LOG`.
//!
//! Bit `i` of a bitmap lives in word `i / 64` at bit position `i % 64`, which is the layout
//! `KVM_GET_DIRTY_LOG` returns and `KVM_CLEAR_DIRTY_LOG` takes on x86-64 (little endian).
//!
//! # `KVM_CLEAR_DIRTY_LOG` windows
//!
//! KVM accepts a clear request `(first_page, num_pages, bitmap)` on a slot of `N` pages only when
//! `first_page` is a multiple of 64, `first_page + num_pages <= N`, and `num_pages` is a multiple
//! of 64 unless the window reaches exactly the end of the slot. Bit `i` of the bitmap refers to
//! page `first_page + i`; only pages whose bit is set are cleared and write-protected again. A
//! [`ClearWindow`] is such a legal window; since `first_page` is a multiple of 64, the bitmap to
//! pass for a window over a slot-wide mask is the word slice [`ClearWindow::words`] of that mask.

use std::ops::Range;

use thiserror::Error;

/// Bits per bitmap word.
pub const WORD_BITS: u64 = 64;

/// Largest `num_pages` a window built here carries: a multiple of 64 that fits `u32` (KVM's field).
pub const MAX_WINDOW_PAGES: u32 = u32::MAX - 63;

/// Errors of the clear-window arithmetic.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BitmapError {
    /// `first_page` of a clear window is not a multiple of 64.
    #[error("clear window: first_page {first_page} is not a multiple of 64")]
    UnalignedFirstPage { first_page: u64 },
    /// The window starts or ends past the slot.
    #[error("clear window: pages {first_page}..{end} run past the slot's {slot_pages} pages")]
    PastSlotEnd {
        first_page: u64,
        end: u64,
        slot_pages: u64,
    },
    /// `num_pages` is not a multiple of 64 and the window does not end at the slot's end.
    #[error(
        "clear window: num_pages {num_pages} at first_page {first_page} is not a multiple of 64 \
         and does not reach the slot end ({slot_pages} pages)"
    )]
    UnalignedNumPages {
        first_page: u64,
        num_pages: u32,
        slot_pages: u64,
    },
    /// The bitmap handed with a window has fewer words than the window needs.
    #[error("clear window: bitmap has {have} words, {num_pages} pages need {need}")]
    BitmapTooShort {
        num_pages: u32,
        have: usize,
        need: usize,
    },
}

/// The words that the bits of `range` lie in, ascending, each with the mask of its bits inside
/// `range`; nothing when `range` is empty.
pub fn word_masks(range: Range<u64>) -> impl Iterator<Item = (usize, u64)> {
    let end = range.end;
    let mut i = range.start;
    std::iter::from_fn(move || {
        if i >= end {
            return None;
        }
        let w = i / WORD_BITS;
        let lo = i % WORD_BITS;
        let hi = (end - w * WORD_BITS).min(WORD_BITS);
        let mask = if hi - lo == WORD_BITS {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        i = (w + 1) * WORD_BITS;
        Some((w as usize, mask))
    })
}

/// Number of `u64` words that hold `bits` bits.
pub fn words_for(bits: u64) -> usize {
    // A 64-bit host: bits / 64 always fits usize.
    bits.div_ceil(WORD_BITS) as usize
}

/// A growable-once, fixed-size bitmap of `u64` words.
///
/// Bits at or past [`Bitmap::len`] are kept zero by every method except [`Bitmap::words_mut`];
/// the counting and iterating methods ignore them anyway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
}

impl Bitmap {
    /// A bitmap of `bits` zero bits.
    pub fn new(bits: u64) -> Self {
        Bitmap {
            words: vec![0; words_for(bits)],
            bits,
        }
    }

    /// A bitmap of `bits` bits taken from `words`: missing words read as zero, extra words and
    /// bits past `bits` are dropped.
    pub fn from_words(words: &[u64], bits: u64) -> Self {
        let mut b = Bitmap::new(bits);
        b.or_assign(words);
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, mutable. Callers should leave bits past [`Bitmap::len`] clear; counting and
    /// iteration ignore them regardless.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }

    /// Mask of the valid bits in word `w`.
    pub fn word_mask(&self, w: usize) -> u64 {
        let start = w as u64 * WORD_BITS;
        if start >= self.bits {
            0
        } else if self.bits - start >= WORD_BITS {
            u64::MAX
        } else {
            (1u64 << (self.bits - start)) - 1
        }
    }

    /// Bit `i`; false past the end.
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / WORD_BITS) as usize] & (1 << (i % WORD_BITS)) != 0
    }

    /// Sets bit `i`; returns false (and does nothing) when `i` is past the end.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        self.words[(i / WORD_BITS) as usize] |= 1 << (i % WORD_BITS);
        true
    }

    /// Clears bit `i`; returns false (and does nothing) when `i` is past the end.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        self.words[(i / WORD_BITS) as usize] &= !(1 << (i % WORD_BITS));
        true
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Sets every bit of `range` (clipped to the bitmap).
    pub fn set_range(&mut self, range: Range<u64>) {
        self.apply_range(range, |w, m| *w |= m);
    }

    /// Clears every bit of `range` (clipped to the bitmap).
    pub fn clear_range(&mut self, range: Range<u64>) {
        self.apply_range(range, |w, m| *w &= !m);
    }

    fn apply_range(&mut self, range: Range<u64>, f: impl Fn(&mut u64, u64)) {
        for (w, mask) in word_masks(range.start..range.end.min(self.bits)) {
            f(&mut self.words[w], mask);
        }
    }

    /// ORs `other` into this bitmap: word `w` of `other` covers bits `64w..64w+63`. A shorter
    /// `other` leaves the remaining words alone; words and bits past the end are ignored.
    pub fn or_assign(&mut self, other: &[u64]) {
        let n = other.len().min(self.words.len());
        for (d, s) in self.words[..n].iter_mut().zip(&other[..n]) {
            *d |= *s;
        }
        self.mask_tail();
    }

    /// Clears every bit that is set in `other` (`self &= !other`); a shorter `other` clears nothing
    /// past its end.
    pub fn and_not_assign(&mut self, other: &[u64]) {
        let n = other.len().min(self.words.len());
        for (d, s) in self.words[..n].iter_mut().zip(&other[..n]) {
            *d &= !*s;
        }
    }

    fn mask_tail(&mut self) {
        if let Some(last) = self.words.len().checked_sub(1) {
            let m = self.word_mask(last);
            self.words[last] &= m;
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(w, x)| u64::from((x & self.word_mask(w)).count_ones()))
            .sum()
    }

    /// Number of set bits in `range` (clipped to the bitmap).
    pub fn count_ones_in(&self, range: Range<u64>) -> u64 {
        word_masks(range.start..range.end.min(self.bits))
            .map(|(w, mask)| u64::from((self.words[w] & mask).count_ones()))
            .sum()
    }

    /// Indices of the set bits, ascending.
    pub fn iter_ones(&self) -> IterOnes<'_> {
        IterOnes {
            bitmap: self,
            word: 0,
            cur: self.words.first().map_or(0, |&x| x & self.word_mask(0)),
        }
    }

    /// Maximal runs of consecutive set bits, ascending, as `start..end` ranges.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            ones: self.iter_ones(),
            pending: None,
        }
    }
}

/// Iterator over set bits; see [`Bitmap::iter_ones`].
pub struct IterOnes<'a> {
    bitmap: &'a Bitmap,
    word: usize,
    cur: u64,
}

impl Iterator for IterOnes<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.cur == 0 {
            self.word += 1;
            if self.word >= self.bitmap.words.len() {
                return None;
            }
            self.cur = self.bitmap.words[self.word] & self.bitmap.word_mask(self.word);
        }
        let bit = u64::from(self.cur.trailing_zeros());
        self.cur &= self.cur - 1;
        Some(self.word as u64 * WORD_BITS + bit)
    }
}

/// Iterator over runs of set bits; see [`Bitmap::runs`].
pub struct Runs<'a> {
    ones: IterOnes<'a>,
    pending: Option<Range<u64>>,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        loop {
            match self.ones.next() {
                Some(i) => match &mut self.pending {
                    Some(r) if r.end == i => r.end += 1,
                    Some(_) => {
                        let done = self.pending.replace(i..i + 1);
                        return done;
                    }
                    None => self.pending = Some(i..i + 1),
                },
                None => return self.pending.take(),
            }
        }
    }
}

/// One legal `KVM_CLEAR_DIRTY_LOG` window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClearWindow {
    /// First page, a multiple of 64.
    pub first_page: u64,
    /// Pages covered: a multiple of 64, or reaching exactly the slot end.
    pub num_pages: u32,
}

impl ClearWindow {
    /// Pages covered.
    pub fn pages(&self) -> Range<u64> {
        self.first_page..self.first_page + u64::from(self.num_pages)
    }

    /// The words of a slot-wide mask that form this window's bitmap.
    pub fn words(&self) -> Range<usize> {
        let first = (self.first_page / WORD_BITS) as usize;
        first..first + words_for(u64::from(self.num_pages))
    }
}

/// Checks `(first_page, num_pages)` against KVM's rules for a slot of `slot_pages` pages (when
/// known) and that `bitmap_words` words cover the window.
pub fn validate_clear_window(
    slot_pages: Option<u64>,
    first_page: u64,
    num_pages: u32,
    bitmap_words: usize,
) -> Result<(), BitmapError> {
    if !first_page.is_multiple_of(WORD_BITS) {
        return Err(BitmapError::UnalignedFirstPage { first_page });
    }
    let need = words_for(u64::from(num_pages));
    if bitmap_words < need {
        return Err(BitmapError::BitmapTooShort {
            num_pages,
            have: bitmap_words,
            need,
        });
    }
    let end = first_page.saturating_add(u64::from(num_pages));
    match slot_pages {
        Some(slot_pages) if end > slot_pages => Err(BitmapError::PastSlotEnd {
            first_page,
            end,
            slot_pages,
        }),
        Some(slot_pages) if u64::from(num_pages) % WORD_BITS != 0 && end != slot_pages => {
            Err(BitmapError::UnalignedNumPages {
                first_page,
                num_pages,
                slot_pages,
            })
        }
        _ => Ok(()),
    }
}

/// Legal windows covering every page of `pages` (clipped to the slot) on a slot of `slot_pages`
/// pages. Windows are widened to 64-page boundaries (or the slot end), so they may cover pages
/// outside `pages`: only the pages whose bit is set in the bitmap handed to KVM are cleared.
/// Consecutive windows never overlap; each carries at most [`MAX_WINDOW_PAGES`] pages.
pub fn clear_windows_for_range(pages: Range<u64>, slot_pages: u64) -> Vec<ClearWindow> {
    let end = pages.end.min(slot_pages);
    if pages.start >= end {
        return Vec::new();
    }
    let mut first = pages.start / WORD_BITS * WORD_BITS;
    let aligned_end = end.div_ceil(WORD_BITS).saturating_mul(WORD_BITS);
    let mut out = Vec::new();
    while first < end {
        let window_end = aligned_end
            .min(first + u64::from(MAX_WINDOW_PAGES))
            .min(slot_pages);
        // window_end - first <= MAX_WINDOW_PAGES, so it fits u32.
        out.push(ClearWindow {
            first_page: first,
            num_pages: (window_end - first) as u32,
        });
        first = window_end;
    }
    out
}

/// Legal windows covering every set bit of the slot-wide `mask` (bit `i` = page `i`) on a slot of
/// `slot_pages` pages; bits at or past `slot_pages` are ignored. Runs of non-zero words separated
/// by at most `max_gap_words` zero words share one window (fewer ioctls, more bitmap copied).
/// Pass `&mask[w.words()]` with each window.
pub fn clear_windows_for_mask(
    mask: &[u64],
    slot_pages: u64,
    max_gap_words: usize,
) -> Vec<ClearWindow> {
    let nwords = mask.len().min(words_for(slot_pages));
    let mut out = Vec::new();
    let mut run: Option<(usize, usize)> = None; // word range [start, end)
    let flush = |start: usize, end: usize, out: &mut Vec<ClearWindow>| {
        let pages = start as u64 * WORD_BITS..(end as u64 * WORD_BITS).min(slot_pages);
        out.extend(clear_windows_for_range(pages, slot_pages));
    };
    for (w, &word) in mask[..nwords].iter().enumerate() {
        let tail = if (w as u64 + 1) * WORD_BITS > slot_pages {
            (1u64 << (slot_pages % WORD_BITS)) - 1
        } else {
            u64::MAX
        };
        if word & tail == 0 {
            continue;
        }
        run = match run {
            Some((s, e)) if w - e <= max_gap_words => Some((s, w + 1)),
            Some((s, e)) => {
                flush(s, e, &mut out);
                Some((w, w + 1))
            }
            None => Some((w, w + 1)),
        };
    }
    if let Some((s, e)) = run {
        flush(s, e, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear_and_bounds() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.words().len(), 3);
        assert!(b.set(0));
        assert!(b.set(64));
        assert!(b.set(129));
        assert!(!b.set(130), "past the end must be refused");
        assert!(b.get(0) && b.get(64) && b.get(129));
        assert!(!b.get(1) && !b.get(130) && !b.get(u64::MAX));
        assert_eq!(b.count_ones(), 3);
        assert!(b.clear(64));
        assert!(!b.clear(500));
        assert!(!b.get(64));
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 129]);
    }

    #[test]
    fn or_assign_masks_tail_and_accepts_short() {
        let mut b = Bitmap::new(70);
        b.or_assign(&[1, u64::MAX, u64::MAX]);
        assert_eq!(b.count_ones(), 1 + 6);
        assert_eq!(b.words()[1], 0x3f);
        b.or_assign(&[]);
        assert_eq!(b.count_ones(), 7);
        b.and_not_assign(&[1]);
        assert_eq!(b.count_ones(), 6);
        let c = Bitmap::from_words(&[0b101], 2);
        assert_eq!(c.iter_ones().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn word_masks_cover_exactly_the_range() {
        assert_eq!(
            word_masks(3..5).collect::<Vec<_>>(),
            vec![(0, 0b11000)],
            "within one word"
        );
        assert_eq!(
            word_masks(60..130).collect::<Vec<_>>(),
            vec![(0, 0xf << 60), (1, u64::MAX), (2, 0b11)]
        );
        assert_eq!(word_masks(64..128).collect::<Vec<_>>(), vec![(1, u64::MAX)]);
        assert_eq!(word_masks(7..7).count(), 0);
        let (hi, lo) = (200, 100);
        assert_eq!(word_masks(hi..lo).count(), 0);
    }

    #[test]
    fn ranges_count_and_runs() {
        let mut b = Bitmap::new(300);
        b.set_range(10..200);
        assert_eq!(b.count_ones(), 190);
        assert_eq!(b.count_ones_in(0..300), 190);
        assert_eq!(b.count_ones_in(0..10), 0);
        assert_eq!(b.count_ones_in(63..65), 2);
        assert_eq!(b.count_ones_in(190..1000), 10);
        let (hi, lo) = (250, 100);
        assert_eq!(b.count_ones_in(hi..lo), 0);
        b.clear_range(64..128);
        assert_eq!(b.count_ones(), 190 - 64);
        b.set(299);
        b.set_range(290..5000);
        assert_eq!(b.count_ones_in(290..300), 10);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![10..64, 128..200, 290..300]
        );
        assert_eq!(Bitmap::new(0).runs().count(), 0);
        assert_eq!(Bitmap::new(0).iter_ones().count(), 0);
    }

    #[test]
    fn words_mut_garbage_past_end_is_ignored() {
        let mut b = Bitmap::new(3);
        b.words_mut()[0] = u64::MAX;
        assert_eq!(b.count_ones(), 3);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    fn assert_legal(ws: &[ClearWindow], slot: u64) {
        for w in ws {
            validate_clear_window(
                Some(slot),
                w.first_page,
                w.num_pages,
                words_for(u64::from(w.num_pages)),
            )
            .unwrap_or_else(|e| panic!("{w:?} illegal on slot {slot}: {e}"));
        }
        for pair in ws.windows(2) {
            assert!(pair[0].pages().end <= pair[1].first_page);
        }
    }

    #[test]
    fn windows_for_range_alignment() {
        // Aligned slot, interior range.
        let ws = clear_windows_for_range(70..100, 1024);
        assert_eq!(
            ws,
            vec![ClearWindow {
                first_page: 64,
                num_pages: 64
            }]
        );
        // Slot not a multiple of 64: a range at the end gets a short window to the slot end.
        let ws = clear_windows_for_range(990..1000, 1000);
        assert_eq!(
            ws,
            vec![ClearWindow {
                first_page: 960,
                num_pages: 40
            }]
        );
        assert_legal(&ws, 1000);
        // Whole slot, odd size.
        let ws = clear_windows_for_range(0..u64::MAX, 1000);
        assert_eq!(
            ws,
            vec![ClearWindow {
                first_page: 0,
                num_pages: 1000
            }]
        );
        // Range past the slot is clipped; wholly past it gives nothing.
        assert!(clear_windows_for_range(1000..2000, 1000).is_empty());
        assert!(clear_windows_for_range(5..5, 1000).is_empty());
        assert!(clear_windows_for_range(0..10, 0).is_empty());
        // Tiny slot.
        let ws = clear_windows_for_range(0..1, 1);
        assert_eq!(ws[0].num_pages, 1);
        assert_legal(&ws, 1);
        // Huge slot: split into u32-sized windows that stay aligned.
        let slot = 3 * u64::from(u32::MAX);
        let ws = clear_windows_for_range(0..slot, slot);
        assert!(ws.len() >= 3);
        assert_legal(&ws, slot);
        assert_eq!(ws.last().unwrap().pages().end, slot);
        assert_eq!(ws.iter().map(|w| u64::from(w.num_pages)).sum::<u64>(), slot);
    }

    #[test]
    fn windows_for_mask() {
        let slot = 1000u64;
        let mut m = Bitmap::new(slot);
        assert!(clear_windows_for_mask(m.words(), slot, 0).is_empty());
        m.set(3);
        m.set(65);
        m.set(600);
        m.set(999);
        let ws = clear_windows_for_mask(m.words(), slot, 0);
        assert_eq!(
            ws.iter().map(|w| w.pages()).collect::<Vec<_>>(),
            vec![0..128, 576..640, 960..1000]
        );
        assert_legal(&ws, slot);
        // Every set bit is covered and the word slice holds it at the right offset.
        for i in m.iter_ones() {
            let w = ws.iter().find(|w| w.pages().contains(&i)).unwrap();
            let words = &m.words()[w.words()];
            let off = i - w.first_page;
            assert!(words[(off / 64) as usize] & (1 << (off % 64)) != 0);
        }
        // A wide gap allowance merges everything into one window to the slot end.
        let ws = clear_windows_for_mask(m.words(), slot, 100);
        assert_eq!(
            ws.iter().map(|w| w.pages()).collect::<Vec<_>>(),
            vec![0..1000]
        );
        // Bits past the slot end are ignored.
        let ws = clear_windows_for_mask(&[0, u64::MAX], 70, 0);
        assert_eq!(
            ws.iter().map(|w| w.pages()).collect::<Vec<_>>(),
            vec![64..70]
        );
        let ws = clear_windows_for_mask(&[0, 0xffff_0000], 70, 0);
        assert!(ws.is_empty());
        // A mask shorter than the slot is fine.
        let ws = clear_windows_for_mask(&[1], 1 << 20, 0);
        assert_eq!(
            ws.iter().map(|w| w.pages()).collect::<Vec<_>>(),
            vec![0..64]
        );
    }

    #[test]
    fn validate_rules() {
        assert_eq!(
            validate_clear_window(Some(1000), 3, 64, 1),
            Err(BitmapError::UnalignedFirstPage { first_page: 3 })
        );
        assert!(matches!(
            validate_clear_window(Some(1000), 0, 65, 1),
            Err(BitmapError::BitmapTooShort { need: 2, .. })
        ));
        assert!(matches!(
            validate_clear_window(Some(1000), 64, 10, 1),
            Err(BitmapError::UnalignedNumPages { .. })
        ));
        assert!(matches!(
            validate_clear_window(Some(1000), 960, 64, 1),
            Err(BitmapError::PastSlotEnd { .. })
        ));
        assert_eq!(validate_clear_window(Some(1000), 960, 40, 1), Ok(()));
        assert_eq!(validate_clear_window(None, 960, 40, 1), Ok(()));
        assert_eq!(validate_clear_window(Some(1000), 0, 0, 0), Ok(()));
    }
}
