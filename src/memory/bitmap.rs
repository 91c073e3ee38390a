//! Dense page bitmaps: one bit per guest page, packed in `u64` words the way KVM's dirty log is.
//!
//! Bit `i` of a bitmap lives in word `i / 64` at bit position `i % 64`, which is the layout
//! `KVM_GET_DIRTY_LOG` returns and `KVM_CLEAR_DIRTY_LOG` takes on x86-64 (little endian).

use std::ops::Range;

/// Bits per bitmap word.
pub const WORD_BITS: u64 = 64;

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

    /// Number of bits set here and not in `other` (over the shorter of the two).
    pub fn count_and_not(&self, other: &Bitmap) -> u64 {
        self.words
            .iter()
            .zip(&other.words)
            .enumerate()
            .map(|(w, (x, y))| u64::from((x & !y & self.word_mask(w)).count_ones()))
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

    /// Set bits within `range`, ascending.
    pub fn ones_in(&self, range: Range<u64>) -> impl Iterator<Item = u64> + '_ {
        word_masks(range.start..range.end.min(self.bits)).flat_map(move |(w, mask)| {
            let mut bits = self.words[w] & mask;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u64 * WORD_BITS + u64::from(i))
            })
        })
    }

    /// Ranges covering every set bit, ascending and disjoint: runs separated by at most `gap`
    /// clear bits share a range, and no range is longer than `max` bits (`max` >= 1).
    pub fn gap_ranges(&self, gap: u64, max: u64) -> Vec<Range<u64>> {
        let max = max.max(1);
        let mut out: Vec<Range<u64>> = Vec::new();
        for run in self.runs() {
            let mut start = run.start;
            while start < run.end {
                match out.last_mut() {
                    Some(last)
                        if start - last.end <= gap && run.end.min(last.start + max) > start =>
                    {
                        let end = run.end.min(last.start + max);
                        last.end = end;
                        start = end;
                    }
                    _ => {
                        let end = run.end.min(start + max);
                        out.push(start..end);
                        start = end;
                    }
                }
            }
        }
        out
    }
}

/// [`Bitmap::gap_ranges`] of the set bits `ones` (ascending), found some other way than a pass over
/// all the words: O(ones).
pub fn gap_ranges_of(ones: impl IntoIterator<Item = u64>, gap: u64, max: u64) -> Vec<Range<u64>> {
    let max = max.max(1);
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in ones {
        match out.last_mut() {
            Some(last) if i >= last.end && i - last.end <= gap && i + 1 - last.start <= max => {
                last.end = i + 1;
            }
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Sorted, disjoint ranges of words covering `ranges` of bits (ascending), adjacent ones merged.
pub fn word_windows(ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        if r.start >= r.end {
            continue;
        }
        let w = (r.start / WORD_BITS) as usize..words_for(r.end);
        match out.last_mut() {
            Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
            _ => out.push(w),
        }
    }
    out
}

/// The union of two sorted, disjoint lists of word ranges, sorted, disjoint, adjacent ones merged.
pub fn union_windows(a: &[Range<usize>], b: &[Range<usize>]) -> Vec<Range<usize>> {
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(a.len() + b.len());
    while i < a.len() || j < b.len() {
        let next = if j >= b.len() || (i < a.len() && a[i].start <= b[j].start) {
            i += 1;
            a[i - 1].clone()
        } else {
            j += 1;
            b[j - 1].clone()
        };
        match out.last_mut() {
            Some(last) if next.start <= last.end => last.end = last.end.max(next.end),
            _ => out.push(next),
        }
    }
    out
}

/// The words lying wholly inside ascending page ranges `ranges` (word `w`: pages
/// `64w..64w + 64`), ascending, disjoint, adjacent ones merged.
pub fn inner_words(ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        let w = r.start.div_ceil(WORD_BITS) as usize..(r.end / WORD_BITS) as usize;
        if w.start >= w.end {
            continue;
        }
        match out.last_mut() {
            Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
            _ => out.push(w),
        }
    }
    out
}

/// The words of `a` not in `b` (both sorted and disjoint), sorted and disjoint.
pub fn difference_windows(a: &[Range<usize>], b: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(a.len());
    let mut j = 0;
    for r in a {
        let mut start = r.start;
        while j < b.len() && b[j].end <= start {
            j += 1;
        }
        let mut k = j;
        while start < r.end && k < b.len() && b[k].start < r.end {
            if b[k].start > start {
                out.push(start..b[k].start);
            }
            start = start.max(b[k].end);
            k += 1;
        }
        if start < r.end {
            out.push(start..r.end);
        }
    }
    out
}

/// The bits of a stretch of pages, word-aligned: bit `i` of the words is page `first_page + i`,
/// with `first_page` a multiple of 64, the way `KVM_CLEAR_DIRTY_LOG` takes a window of a slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    first_page: u64,
    words: Vec<u64>,
}

impl Window {
    /// The window of `words` from page `first_page` rounded down to a multiple of 64.
    pub fn new(first_page: u64, words: Vec<u64>) -> Self {
        Window {
            first_page: first_page - first_page % WORD_BITS,
            words,
        }
    }

    /// The words of `range` (clipped to `words`, a bitmap of the whole RAM), as a window.
    pub fn of(words: &[u64], range: Range<u64>) -> Self {
        let first = (range.start / WORD_BITS) as usize;
        let end = (words_for(range.end)).min(words.len());
        Window::new(
            range.start,
            words.get(first..end.max(first)).unwrap_or(&[]).to_vec(),
        )
    }

    /// The first page (a multiple of 64).
    pub fn first_page(&self) -> u64 {
        self.first_page
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Page `page`'s bit; false outside the window.
    pub fn get(&self, page: u64) -> bool {
        page >= self.first_page && {
            let i = page - self.first_page;
            self.words
                .get((i / WORD_BITS) as usize)
                .is_some_and(|w| w & (1 << (i % WORD_BITS)) != 0)
        }
    }
}

/// The position of the `n`-th (from 0) set bit of `x`, which has more than `n` set bits.
fn nth_set_bit(mut x: u64, n: u64) -> u64 {
    for _ in 0..n {
        x &= x - 1;
    }
    u64::from(x.trailing_zeros())
}

/// Words per block of a [`Ranks`] index (4096 bits).
const RANK_BLOCK_WORDS: usize = 64;

/// A rank index over a bitmap: how many bits are set before each block of 4096 bits. Built in
/// one pass over the words (the pass that counts the bits anyway), it finds the r-th set bit in
/// O(log(bits / 4096) + 64) steps, so drawing from a population costs the same whatever the
/// guest's size.
#[derive(Clone, Debug, Default)]
pub struct Ranks {
    /// Set bits before each block; ascending.
    before: Vec<u64>,
    total: u64,
}

impl Ranks {
    /// The index of `bitmap`.
    pub fn new(bitmap: &Bitmap) -> Self {
        let mut before = Vec::with_capacity(bitmap.words.len().div_ceil(RANK_BLOCK_WORDS));
        let mut total = 0u64;
        for (b, block) in bitmap.words.chunks(RANK_BLOCK_WORDS).enumerate() {
            before.push(total);
            let first = b * RANK_BLOCK_WORDS;
            total += block
                .iter()
                .enumerate()
                .map(|(i, x)| u64::from((x & bitmap.word_mask(first + i)).count_ones()))
                .sum::<u64>();
        }
        Ranks { before, total }
    }

    /// Set bits in the bitmap.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The index of the `r`-th set bit (from 0) of `bitmap`, which must be the bitmap this index
    /// was built from, unchanged; `None` when `r` is not below [`Ranks::total`].
    pub fn select(&self, bitmap: &Bitmap, r: u64) -> Option<u64> {
        if r >= self.total {
            return None;
        }
        // The last block with fewer than r + 1 bits before it holds the bit.
        let block = self.before.partition_point(|&b| b <= r) - 1;
        let mut left = r - self.before[block];
        let first = block * RANK_BLOCK_WORDS;
        let last = (first + RANK_BLOCK_WORDS).min(bitmap.words.len());
        for w in first..last {
            let x = bitmap.words[w] & bitmap.word_mask(w);
            let c = u64::from(x.count_ones());
            if left < c {
                return Some(w as u64 * WORD_BITS + nth_set_bit(x, left));
            }
            left -= c;
        }
        None
    }

    /// [`Ranks::select`] of each of the ascending ranks `rs`, in one sweep over the words they
    /// fall in (each word counted once, not once per rank): the bits' indexes, ascending. Ranks
    /// not below [`Ranks::total`] give nothing.
    pub fn select_sorted(&self, bitmap: &Bitmap, rs: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(rs.len());
        // The word the sweep is at, and the set bits before it.
        let (mut w, mut before_w) = (0usize, 0u64);
        for &r in rs {
            if r >= self.total {
                break;
            }
            let block = self.before.partition_point(|&b| b <= r) - 1;
            if block * RANK_BLOCK_WORDS > w || out.is_empty() {
                (w, before_w) = (block * RANK_BLOCK_WORDS, self.before[block]);
            }
            while w < bitmap.words.len() {
                let x = bitmap.words[w] & bitmap.word_mask(w);
                let c = u64::from(x.count_ones());
                if r - before_w < c {
                    out.push(w as u64 * WORD_BITS + nth_set_bit(x, r - before_w));
                    break;
                }
                before_w += c;
                w += 1;
            }
        }
        out
    }
}

impl Ranks {
    /// The index of a bitmap whose blocks of 4096 bits hold `blocks` set bits each (a
    /// [`Counted`] keeps them): O(bits / 4096), no pass over the words.
    pub fn from_block_counts(blocks: &[u32]) -> Self {
        let mut before = Vec::with_capacity(blocks.len());
        let mut total = 0u64;
        for &c in blocks {
            before.push(total);
            total += u64::from(c);
        }
        Ranks { before, total }
    }
}

/// Words per block of an [`AndNotRanks`] index (512 bits).
pub const SPARSE_BLOCK_WORDS: usize = 8;

/// A rank index over the bits set in one bitmap and not in another, kept to some blocks of 512
/// bits (the only ones that can hold such bits): built in O(blocks), it finds the r-th such bit
/// in O(log blocks + 8), so a stratum that lives in a few places of a large guest is drawn from
/// at the cost of those places, not of the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AndNotRanks {
    /// Each block with some bits: its first word, and the bits before it; ascending.
    blocks: Vec<(usize, u64)>,
    total: u64,
}

impl AndNotRanks {
    /// The index of the bits set in `a` and not in `b` within `blocks` (block numbers, each
    /// [`SPARSE_BLOCK_WORDS`] words; ascending), and the blocks found empty.
    pub fn new(a: &Bitmap, b: &Bitmap, blocks: impl IntoIterator<Item = u64>) -> (Self, Vec<u64>) {
        let mut out = AndNotRanks::default();
        let mut empty = Vec::new();
        for block in blocks {
            let first = usize::try_from(block).unwrap_or(usize::MAX) * SPARSE_BLOCK_WORDS;
            let c = Self::block_words(a, b, first)
                .map(|x| u64::from(x.count_ones()))
                .sum::<u64>();
            if c == 0 {
                empty.push(block);
                continue;
            }
            out.blocks.push((first, out.total));
            out.total += c;
        }
        (out, empty)
    }

    /// The words of `a & !b` in the block that starts at word `first` (those that exist).
    fn block_words<'a>(
        a: &'a Bitmap,
        b: &'a Bitmap,
        first: usize,
    ) -> impl Iterator<Item = u64> + 'a {
        let last = first.saturating_add(SPARSE_BLOCK_WORDS).min(a.words.len());
        (first.min(last)..last)
            .map(move |w| a.words[w] & !b.words.get(w).copied().unwrap_or(0) & a.word_mask(w))
    }

    /// The bits indexed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The `r`-th (from 0) bit set in `a` and not in `b`, which must be the bitmaps this index was
    /// built from, unchanged; `None` when `r` is not below [`AndNotRanks::total`].
    pub fn select(&self, a: &Bitmap, b: &Bitmap, r: u64) -> Option<u64> {
        if r >= self.total {
            return None;
        }
        let i = self.blocks.partition_point(|&(_, before)| before <= r) - 1;
        let (first, before) = self.blocks[i];
        let mut left = r - before;
        for (k, x) in Self::block_words(a, b, first).enumerate() {
            let c = u64::from(x.count_ones());
            if left < c {
                return Some((first + k) as u64 * WORD_BITS + nth_set_bit(x, left));
            }
            left -= c;
        }
        None
    }
}

/// Bits per block of a [`Counted`] bitmap's counts (as a [`Ranks`] block).
const COUNT_BLOCK_BITS: u64 = RANK_BLOCK_WORDS as u64 * WORD_BITS;

/// A bitmap that keeps count of its set bits as they are set and cleared, in all and per block of
/// 4096 bits: its count is O(1) and its [`Ranks`] O(bits / 4096), where [`Bitmap::count_ones`]
/// and [`Ranks::new`] read every word. Every change goes through its methods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    bits: Bitmap,
    blocks: Vec<u32>,
    total: u64,
}

impl Counted {
    /// `bits` zero bits.
    pub fn new(bits: u64) -> Self {
        Counted {
            bits: Bitmap::new(bits),
            blocks: vec![0; bits.div_ceil(COUNT_BLOCK_BITS) as usize],
            total: 0,
        }
    }

    /// The bits.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bits
    }

    /// Set bits: kept, not counted.
    pub fn count_ones(&self) -> u64 {
        self.total
    }

    /// Bit `i`; false past the end.
    pub fn get(&self, i: u64) -> bool {
        self.bits.get(i)
    }

    /// Word `w` (0 past the end).
    pub fn word(&self, w: usize) -> u64 {
        self.bits.words.get(w).copied().unwrap_or(0)
    }

    /// Sets bit `i` (ignored past the end); returns whether it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        let new = i < self.bits.len() && !self.bits.get(i);
        if new {
            self.bits.set(i);
            self.add(i / COUNT_BLOCK_BITS, 1);
        }
        new
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        let was = self.bits.get(i);
        if was {
            self.bits.clear(i);
            let b = (i / COUNT_BLOCK_BITS) as usize;
            self.blocks[b] -= 1;
            self.total -= 1;
        }
        was
    }

    /// ORs `x` into word `w` (bits past the end dropped); returns the bits newly set.
    pub fn or_word(&mut self, w: usize, x: u64) -> u64 {
        let Some(word) = self.bits.words.get(w).copied() else {
            return 0;
        };
        let new = x & !word & self.bits.word_mask(w);
        if new != 0 {
            self.bits.words[w] |= new;
            self.add(w as u64 / RANK_BLOCK_WORDS as u64, new.count_ones());
        }
        new
    }

    fn add(&mut self, block: u64, n: u32) {
        self.blocks[block as usize] += n;
        self.total += u64::from(n);
    }

    /// The rank index of the bits, from the counts.
    pub fn ranks(&self) -> Ranks {
        Ranks::from_block_counts(&self.blocks)
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.bits.heap_bytes() + self.blocks.capacity() * std::mem::size_of::<u32>()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn and_not_ranks_select_every_bit_of_a_minus_b_in_their_blocks() {
        // 3000 bits: blocks 0..6 (512 each), the last one partial.
        let (mut a, mut b) = (Bitmap::new(3000), Bitmap::new(3000));
        for i in (0..3000).step_by(3) {
            a.set(i);
        }
        for i in (0..3000).step_by(5) {
            b.set(i);
        }
        // Blocks 1 and 5 (partial) indexed, block 3 named but empty once cleared.
        a.clear_range(3 * 512..4 * 512);
        let (r, empty) = AndNotRanks::new(&a, &b, [1, 3, 5]);
        assert_eq!(empty, vec![3]);
        let want: Vec<u64> = (512..1024)
            .chain(2560..3000)
            .filter(|&i| a.get(i) && !b.get(i))
            .collect();
        assert_eq!(r.total(), want.len() as u64);
        let got: Vec<u64> = (0..r.total())
            .map(|k| r.select(&a, &b, k).unwrap())
            .collect();
        assert_eq!(got, want);
        assert_eq!(r.select(&a, &b, r.total()), None);
        // Nothing indexed: nothing to select; a block past the end counts nothing.
        let (none, empty) = AndNotRanks::new(&a, &b, [99]);
        assert_eq!((none.total(), empty), (0, vec![99]));
        assert_eq!(none.select(&a, &b, 0), None);
    }

    #[test]
    fn ranks_select_every_set_bit_in_order() {
        // Sizes around the block (4096 bits) and word edges, densities from empty to full.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for bits in [0u64, 1, 63, 64, 65, 4095, 4096, 4097, 3 * 4096 + 77, 40_000] {
            for density in [0u64, 1, 50, 100] {
                let mut b = Bitmap::new(bits);
                for i in 0..bits {
                    if next() % 100 < density {
                        b.set(i);
                    }
                }
                let ones: Vec<u64> = b.iter_ones().collect();
                let ranks = Ranks::new(&b);
                assert_eq!(
                    ranks.total(),
                    ones.len() as u64,
                    "{bits} bits at {density}%"
                );
                for (r, &i) in ones.iter().enumerate() {
                    assert_eq!(
                        ranks.select(&b, r as u64),
                        Some(i),
                        "rank {r} of {bits} bits"
                    );
                }
                assert_eq!(ranks.select(&b, ones.len() as u64), None);
                assert_eq!(ranks.select(&b, u64::MAX), None);
            }
        }
    }

    #[test]
    fn ranks_ignore_bits_past_the_end() {
        let words = vec![u64::MAX; 2];
        let b = Bitmap::from_words(&words, 70);
        let ranks = Ranks::new(&b);
        assert_eq!(ranks.total(), 70);
        assert_eq!(ranks.select(&b, 69), Some(69));
        assert_eq!(ranks.select(&b, 70), None);
    }

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
    fn windows_read_their_own_pages_only() {
        let mut b = Bitmap::new(300);
        for p in [3, 64, 130, 199, 250] {
            b.set(p);
        }
        let w = Window::of(b.words(), 70..200);
        assert_eq!(w.first_page(), 64);
        assert_eq!(w.words().len(), 3, "pages 64..256");
        let ones: Vec<u64> = (0..400).filter(|&p| w.get(p)).collect();
        assert_eq!(
            ones,
            vec![64, 130, 199, 250],
            "the words' bits, nothing before or past them"
        );
        assert_eq!(Window::new(70, vec![1]).first_page(), 64);
        assert!(!Window::default().get(0));
        assert!(Window::of(b.words(), 1000..2000).words().is_empty());
    }

    #[test]
    fn count_and_not_counts_the_bits_only_here() {
        let (mut a, mut b) = (Bitmap::new(130), Bitmap::new(130));
        for i in [0, 5, 64, 100, 129] {
            a.set(i);
        }
        for i in [5, 100, 128] {
            b.set(i);
        }
        assert_eq!(a.count_and_not(&b), 3);
        assert_eq!(b.count_and_not(&a), 1);
        assert_eq!(a.count_and_not(&a), 0);
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

    #[test]
    fn gap_ranges_and_ones_in() {
        let mut b = Bitmap::new(1000);
        for i in [1u64, 2, 50, 200, 201, 999] {
            b.set(i);
        }
        assert_eq!(b.gap_ranges(64, 1 << 20), vec![1..51, 200..202, 999..1000]);
        assert_eq!(b.gap_ranges(1000, 100), vec![1..51, 200..202, 999..1000]);
        assert_eq!(b.gap_ranges(1000, 1000), vec![1..1000]);
        assert_eq!(
            b.gap_ranges(10, 1000),
            vec![1..3, 50..51, 200..202, 999..1000]
        );
        let mut long = Bitmap::new(300);
        long.set_range(0..250);
        assert_eq!(long.gap_ranges(64, 100), vec![0..100, 100..200, 200..250]);
        assert_eq!(
            long.gap_ranges(0, 0),
            long.gap_ranges(0, 1),
            "max 0 acts as 1"
        );
        assert!(Bitmap::new(100).gap_ranges(5, 5).is_empty());
        assert_eq!(b.ones_in(2..201).collect::<Vec<_>>(), vec![2, 50, 200]);
        assert_eq!(b.ones_in(0..u64::MAX).count(), 6, "clipped to the bitmap");
        let (hi, lo) = (500, 3);
        assert_eq!(b.ones_in(hi..lo).count(), 0);
        // Garbage past the end is ignored.
        let mut g = Bitmap::new(3);
        g.words_mut()[0] = u64::MAX;
        assert_eq!(g.ones_in(0..64).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    proptest::proptest! {
        /// A counted bitmap's counts and ranks are those a recount finds, whatever is set and
        /// cleared.
        #[test]
        fn counted_bitmaps_count_exactly(
            bits in 1u64..20_000,
            ops in proptest::collection::vec((0u8..3, 0u64..20_100, proptest::num::u64::ANY), 0..200),
        ) {
            let mut c = Counted::new(bits);
            for (op, i, x) in ops {
                match op {
                    0 => { c.set(i); }
                    1 => { c.clear(i); }
                    _ => { c.or_word((i / 64) as usize, x); }
                }
            }
            let plain = c.bitmap();
            proptest::prop_assert_eq!(c.count_ones(), plain.count_ones());
            let (a, b) = (c.ranks(), Ranks::new(plain));
            proptest::prop_assert_eq!(a.total(), b.total());
            for r in [0, a.total() / 2, a.total().saturating_sub(1), a.total()] {
                proptest::prop_assert_eq!(a.select(plain, r), b.select(plain, r));
            }
            // One sweep for many ascending ranks (repeats and one past the end among them).
            let mut rs: Vec<u64> = (0..=a.total()).step_by(1 + (bits as usize % 7)).collect();
            rs.extend([a.total() / 3, a.total() / 3, a.total() + 5]);
            rs.sort_unstable();
            let one_by_one: Vec<u64> = rs.iter().filter_map(|&r| a.select(plain, r)).collect();
            proptest::prop_assert_eq!(a.select_sorted(plain, &rs), one_by_one);
        }
    }

    #[test]
    fn windows_cover_runs_and_unite() {
        assert_eq!(
            word_windows([0..1, 63..65, 200..201, 256..300]),
            vec![0..2, 3..5]
        );
        assert_eq!(
            word_windows(std::iter::once(5..5)),
            Vec::<Range<usize>>::new()
        );
        assert_eq!(
            inner_words([0..64, 64..130, 190..256, 300..310, 320..448]),
            vec![0..2, 3..4, 5..7]
        );
        assert_eq!(
            difference_windows(&[0..10, 12..14, 20..30], &[2..3, 9..13, 25..40]),
            vec![0..2, 3..9, 13..14, 20..25]
        );
        assert_eq!(difference_windows(&[0..4, 6..7], &[]), [0..4, 6..7]);
        assert!(difference_windows(&[3..4, 5..6], &[0..10, 12..13]).is_empty());
        assert_eq!(
            union_windows(&[0..2, 10..12], &[1..3, 5..6, 12..13]),
            vec![0..3, 5..6, 10..13]
        );
        let mut b = Bitmap::new(5000);
        for i in [1u64, 2, 3, 70, 71, 200, 4000, 4001, 4999] {
            b.set(i);
        }
        for (gap, max) in [(0, 100), (64, 3), (64, 512), (1000, 5000)] {
            assert_eq!(
                gap_ranges_of(b.iter_ones(), gap, max),
                b.gap_ranges(gap, max),
                "{gap} {max}"
            );
        }
    }
}
