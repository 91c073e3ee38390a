//! Per-page records of the PMP-MMP map: what backs each touched guest page and since when.
//!
//! A record is 16 bytes (PFN and state packed in one word, first-touch and last-write
//! intervals). Records live in chunks of [`PAGES_PER_CHUNK`] pages (2 MiB of guest RAM, 8 KiB of
//! records) allocated on the first touch of a page in the chunk, so a sparse 64 GiB guest costs
//! a chunk table and a few chunks.

use std::ops::Range;

use serde::Serialize;

/// Guest pages per record chunk (2 MiB).
const PAGES_PER_CHUNK: u64 = 512;
/// `last_write` of a page with no observed write (also reserved as an interval number).
pub const NO_WRITE: u32 = u32::MAX;
/// Largest PFN a record holds (55 bits, as in the pagemap).
pub const PFN_MASK: u64 = (1 << 55) - 1;

const STATE_SHIFT: u32 = 56;

pub(crate) const ST_UNTOUCHED: u8 = 0;
pub(crate) const ST_ZERO: u8 = 1;
pub(crate) const ST_BACKED: u8 = 2;
pub(crate) const ST_SWAPPED: u8 = 3;
pub(crate) const ST_SHARED: u8 = 4;
pub(crate) const ST_DISCARDED: u8 = 5;
pub(crate) const ST_RELEASED: u8 = 6;
pub(crate) const ST_VMM_SWAPPED: u8 = 7;
const N_STATES: usize = 8;

/// What backs a guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PageState {
    /// Never seen touched.
    Untouched,
    /// Read, never written: the shared zero page.
    Zero,
    /// A machine page of its own: its PFN (0 when PFNs are hidden).
    Backed(u64),
    /// In swap.
    Swapped,
    /// A machine page other guest pages map too: its PFN.
    Shared(u64),
    /// Touched before, now neither present nor swapped.
    Discarded,
    /// Given back to the host by the balloon (inflated or reported free) and not touched since.
    Released,
    /// Swapped out by the VMM (hypervisor swap, `--swap`), not by the host kernel (`Swapped`).
    VmmSwapped,
}

impl PageState {
    /// The state's code in records and map files.
    pub(crate) fn code(self) -> u8 {
        match self {
            PageState::Untouched => ST_UNTOUCHED,
            PageState::Zero => ST_ZERO,
            PageState::Backed(_) => ST_BACKED,
            PageState::Swapped => ST_SWAPPED,
            PageState::Shared(_) => ST_SHARED,
            PageState::Discarded => ST_DISCARDED,
            PageState::Released => ST_RELEASED,
            PageState::VmmSwapped => ST_VMM_SWAPPED,
        }
    }

    /// The PFN of a Backed or Shared page, else 0.
    pub(crate) fn pfn(self) -> u64 {
        match self {
            PageState::Backed(p) | PageState::Shared(p) => p,
            _ => 0,
        }
    }

    /// The state of `code` with `pfn`; `None` for an unknown code.
    pub(crate) fn from_code(code: u8, pfn: u64) -> Option<PageState> {
        Some(match code {
            ST_UNTOUCHED => PageState::Untouched,
            ST_ZERO => PageState::Zero,
            ST_BACKED => PageState::Backed(pfn),
            ST_SWAPPED => PageState::Swapped,
            ST_SHARED => PageState::Shared(pfn),
            ST_DISCARDED => PageState::Discarded,
            ST_RELEASED => PageState::Released,
            ST_VMM_SWAPPED => PageState::VmmSwapped,
            _ => return None,
        })
    }
}

/// Everything the map knows about one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PageInfo {
    /// Guest page number.
    pub gfn: u64,
    /// What backs it.
    pub state: PageState,
    /// Interval of the first touch (`None`: untouched).
    pub first_touch: Option<u32>,
    /// Interval of the last observed write.
    pub last_write: Option<u32>,
    /// Ever written by the guest (per KVM's dirty log).
    pub guest_written: bool,
    /// Ever written by the VMM through its own mapping.
    pub vmm_written: bool,
}

impl PageInfo {
    /// Page `gfn`, never touched.
    pub(crate) fn untouched(gfn: u64) -> PageInfo {
        PageInfo {
            gfn,
            state: PageState::Untouched,
            first_touch: None,
            last_write: None,
            guest_written: false,
            vmm_written: false,
        }
    }
}

/// One page's record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Record {
    /// PFN in bits 0-54, state code in bits 56-63.
    pfn_state: u64,
    pub(crate) first_touch: u32,
    pub(crate) last_write: u32,
}

impl Record {
    /// A page first touched in `interval`, state untouched until looked up, never written.
    pub(crate) fn touched_in(interval: u32) -> Record {
        Record {
            pfn_state: 0,
            first_touch: interval,
            last_write: NO_WRITE,
        }
    }
    pub(crate) fn state_code(self) -> u8 {
        (self.pfn_state >> STATE_SHIFT) as u8
    }
    pub(crate) fn pfn(self) -> u64 {
        self.pfn_state & PFN_MASK
    }
    pub(crate) fn state(self) -> PageState {
        PageState::from_code(self.state_code(), self.pfn()).unwrap_or(PageState::Untouched)
    }
}

type Chunk = [Record; PAGES_PER_CHUNK as usize];

/// The records of a guest RAM of `pages` pages, in lazily allocated chunks, with a count of the
/// records per state.
#[derive(Debug)]
pub(crate) struct Records {
    chunks: Vec<Option<Box<Chunk>>>,
    /// Records per state code (untouched ones not counted).
    counts: [u64; N_STATES],
}

impl Records {
    pub(crate) fn new(pages: u64) -> Records {
        let nchunks = pages.div_ceil(PAGES_PER_CHUNK) as usize;
        let mut chunks = Vec::with_capacity(nchunks);
        chunks.resize_with(nchunks, || None);
        Records {
            chunks,
            counts: [0; N_STATES],
        }
    }

    /// The record of `gfn`, when its chunk exists.
    pub(crate) fn get(&self, gfn: u64) -> Option<Record> {
        let c = self
            .chunks
            .get((gfn / PAGES_PER_CHUNK) as usize)?
            .as_ref()?;
        c.get((gfn % PAGES_PER_CHUNK) as usize).copied()
    }

    /// The record of `gfn` (below the RAM's pages), its chunk allocated if need be.
    pub(crate) fn get_mut(&mut self, gfn: u64) -> &mut Record {
        let chunk = self.chunks[(gfn / PAGES_PER_CHUNK) as usize]
            .get_or_insert_with(|| Box::new([Record::default(); PAGES_PER_CHUNK as usize]));
        &mut chunk[(gfn % PAGES_PER_CHUNK) as usize]
    }

    /// Resets `gfn`'s record to `r` (keeping the counts right).
    pub(crate) fn reset(&mut self, gfn: u64, r: Record) {
        let rec = self.get_mut(gfn);
        let old = rec.state_code();
        *rec = r;
        let new = r.state_code();
        self.recount(old, new);
    }

    /// Sets `gfn`'s state; returns whether the record's state or PFN changed.
    pub(crate) fn set_state(&mut self, gfn: u64, state: PageState) -> bool {
        let r = self.get_mut(gfn);
        let old = r.state_code();
        let new_word = (u64::from(state.code()) << STATE_SHIFT) | (state.pfn() & PFN_MASK);
        let changed = r.pfn_state != new_word;
        r.pfn_state = new_word;
        self.recount(old, state.code());
        changed
    }

    fn recount(&mut self, old: u8, new: u8) {
        self.counts[old as usize] -= u64::from(old != ST_UNTOUCHED);
        self.counts[new as usize] += u64::from(new != ST_UNTOUCHED);
    }

    /// Records in state `code`.
    pub(crate) fn count(&self, code: u8) -> u64 {
        self.counts[code as usize]
    }

    /// Records in any state but untouched.
    pub(crate) fn touched(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Records in state `code` among pages `range` (clipped to the RAM's chunks).
    pub(crate) fn count_in(&self, code: u8, range: Range<u64>) -> u64 {
        let end = range.end.min(self.chunks.len() as u64 * PAGES_PER_CHUNK);
        let mut n = 0;
        let mut gfn = range.start;
        while gfn < end {
            let c = (gfn / PAGES_PER_CHUNK) as usize;
            let chunk_end = ((c as u64 + 1) * PAGES_PER_CHUNK).min(end);
            if let Some(chunk) = &self.chunks[c] {
                let base = c as u64 * PAGES_PER_CHUNK;
                n += chunk[(gfn - base) as usize..(chunk_end - base) as usize]
                    .iter()
                    .filter(|r| r.state_code() == code)
                    .count() as u64;
            }
            gfn = chunk_end;
        }
        n
    }

    /// Heap bytes held (chunk table and chunks).
    pub(crate) fn heap_bytes(&self) -> usize {
        let table = self.chunks.capacity() * std::mem::size_of::<Option<Box<Chunk>>>();
        table + self.chunks.iter().flatten().count() * std::mem::size_of::<Chunk>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_codes_and_counts_follow() {
        for s in [
            PageState::Untouched,
            PageState::Zero,
            PageState::Backed(7),
            PageState::Swapped,
            PageState::Shared(9),
            PageState::Discarded,
            PageState::Released,
            PageState::VmmSwapped,
        ] {
            assert_eq!(PageState::from_code(s.code(), s.pfn()), Some(s));
        }
        assert_eq!(PageState::from_code(8, 0), None);
        let mut r = Records::new(1000);
        assert_eq!(r.get(5), None, "no chunk yet");
        r.reset(5, Record::touched_in(3));
        assert_eq!(r.get(5).unwrap().first_touch, 3);
        assert_eq!(r.get(5).unwrap().last_write, NO_WRITE);
        assert!(r.set_state(5, PageState::Backed(42)));
        assert!(!r.set_state(5, PageState::Backed(42)), "no change");
        assert!(r.set_state(600, PageState::Zero));
        assert_eq!(r.get(5).unwrap().state(), PageState::Backed(42));
        assert_eq!(
            (r.count(ST_BACKED), r.count(ST_ZERO), r.touched()),
            (1, 1, 2)
        );
        assert_eq!(r.count_in(ST_BACKED, 0..5), 0);
        assert_eq!(r.count_in(ST_BACKED, 5..6), 1);
        assert_eq!(r.count_in(ST_ZERO, 0..u64::MAX), 1);
        // Resetting a looked-up page takes it out of its state's count.
        r.reset(5, Record::touched_in(4));
        assert_eq!((r.count(ST_BACKED), r.touched()), (0, 1));
        assert_eq!(r.heap_bytes(), 2 * 8 + 2 * 512 * 16);
    }
}
