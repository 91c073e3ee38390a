//! The PMP-MMP map: for every guest-physical page (PMP) of guest RAM, which machine page (MMP)
//! backs it, if any, and since when.
//!
//! Guest RAM is one private anonymous mapping at host address `host_addr`, registered as KVM
//! memslot 0 at guest-physical 0, so guest page `gfn` lives at `host_addr + gfn * 4096`.
//!
//! # Page states
//!
//! * `Untouched`: never seen touched; costs nothing.
//! * `Zero`: read but never written; mapped to the host's shared zero page (or the huge zero
//!   page); costs nothing.
//! * `Backed(pfn)`: a machine page of its own (PFN 0 when PFNs are hidden from this process).
//! * `Shared(pfn)`: a machine page that another guest page maps too (KSM); found by
//!   [`PmpMmpMap::refresh`].
//! * `Swapped`: in swap.
//! * `Discarded`: touched before, now neither present nor in swap (the VMM dropped it, e.g.
//!   `MADV_DONTNEED`); costs nothing.
//!
//! # How the map is kept
//!
//! [`PmpMmpMap::harvest`] runs once per interval with KVM's dirty bitmap (manual-protect mode:
//! bits stay set until `KVM_CLEAR_DIRTY_LOG`) and the pages the VMM wrote since the previous
//! harvest. The bitmap pass is O(pages / 64): it ORs both into dense 1-bit-per-page sets (touched,
//! guest-written, VMM-written) and finds the *observed writes*: guest bits set now that were not
//! known set (bits stay set in KVM until the sampler clears them and says so with
//! [`PmpMmpMap::note_cleared`]), plus every VMM-written page. Pages read but never written leave no
//! trace in the dirty log, so a residency pass over guest RAM (every
//! [`MapOptions::residency_every`]-th harvest) finds pages that became resident or stopped being
//! resident since the last pass. Two ways to do the pass, measured here (`benches/harvest.rs`):
//! `mincore` costs about 0.5 ns per guest page (9 ms for 64 GiB) whatever is resident; the
//! `PAGEMAP_SCAN` ioctl (Linux 6.7+) walks only populated page tables and returns runs of present
//! pages, about 11 ns per *resident* page and next to nothing for the rest (1.4 ms for 64 GiB with
//! 256 MiB resident). [`ResidencyMethod::Auto`] picks the scan while fewer than 1/20 of the pages
//! were resident at the last look, else `mincore`. Only pages newly written, newly resident or
//! newly gone get a `/proc/self/pagemap` lookup. [`PmpMmpMap::refresh`] re-reads the pagemap of
//! every touched page (finds KSM sharing, swap-out, compaction moves) and counts PFN duplicates
//! for `Shared`.
//!
//! Limits, by design: "touched" means seen written or seen resident, so the neighbours that a
//! transparent huge page backs along with a written page count as touched (and backed) too; a
//! frame that changes under a page without a write or a residency change (KSM merge, compaction,
//! khugepaged) is seen only by `refresh`; a harvest that re-reads a `Shared` page keeps it
//! `Shared` while its PFN is unchanged, but sharing that ends is noticed only by `refresh`.
//!
//! Storage is three dense 1-bit-per-page sets plus three more for bookkeeping (known dirty bits,
//! last residency, a scratch set of pages to look up): 6 bits per guest page, 12 MiB for a 64 GiB
//! guest. Per-page records (PFN and state, first-touch and last-write intervals: 16 bytes) live in
//! chunks of 512 pages (2 MiB of guest RAM, 8 KiB of records) allocated on the first touch of a
//! page in the chunk.
//!
//! # Map file format (version 1)
//!
//! All fields little endian. A 40-byte header:
//!
//! | offset | type | field |
//! | --- | --- | --- |
//! | 0 | 8 bytes | magic `b"MVPMPMMP"` |
//! | 8 | u32 | version, 1 |
//! | 12 | u32 | page size in bytes (4096) |
//! | 16 | u64 | guest pages |
//! | 24 | u32 | interval count: last harvested interval + 1 (0: never harvested) |
//! | 28 | u32 | flags: bit 0 = PFNs visible (else PFNs are 0 and no page is `Zero` or `Shared`) |
//! | 32 | u64 | record count |
//!
//! then `record count` records of 28 bytes, one per touched page, in ascending gfn order:
//!
//! | offset | type | field |
//! | --- | --- | --- |
//! | 0 | u64 | gfn (guest page number) |
//! | 8 | u64 | PFN (0 unless state is Backed or Shared, or when PFNs are hidden) |
//! | 16 | u32 | interval of first touch |
//! | 20 | u32 | interval of the last observed write (`0xffff_ffff`: none) |
//! | 24 | u8 | state: 1 Zero, 2 Backed, 3 Swapped, 4 Shared, 5 Discarded |
//! | 25 | u8 | flags: bit 0 guest-written, bit 1 VMM-written |
//! | 26 | u16 | reserved, 0 |
//!
//! Untouched pages have no record. In Python:
//!
//! ```text
//! import struct
//! HDR = struct.Struct("<8sIIQIIQ")   # magic, version, page_size, guest_pages, intervals, flags, nrec
//! REC = struct.Struct("<QQIIBBH")    # gfn, pfn, first_touch, last_write, state, flags, reserved
//! data = open("guest.map", "rb").read()
//! magic, version, page_size, pages, intervals, flags, nrec = HDR.unpack_from(data, 0)
//! assert magic == b"MVPMPMMP" and version == 1
//! recs = [REC.unpack_from(data, HDR.size + i * REC.size) for i in range(nrec)]
//! ```

use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::bitmap::{Bitmap, WORD_BITS, word_masks, words_for};
use crate::pagemap::{
    self, MINCORE_CHUNK_PAGES, PAGE_IS_PRESENT, PageEntry, PageRegion, Pagemap, PagemapError,
    READ_CHUNK_ENTRIES, Residency,
};

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Guest pages per record chunk (2 MiB).
pub const PAGES_PER_CHUNK: u64 = 512;
/// Map file magic.
pub const MAP_MAGIC: [u8; 8] = *b"MVPMPMMP";
/// Map file version.
pub const MAP_VERSION: u32 = 1;
/// Map file header size.
pub const HEADER_SIZE: usize = 40;
/// Map file record size.
pub const RECORD_SIZE: usize = 28;
/// `last_write` of a page with no observed write, in the file.
pub const NO_WRITE: u32 = u32::MAX;
/// Header flag: PFNs visible.
pub const FLAG_PFN_VISIBLE: u32 = 1;
/// Record flag: written by the guest.
pub const REC_GUEST_WRITTEN: u8 = 1;
/// Record flag: written by the VMM.
pub const REC_VMM_WRITTEN: u8 = 2;

/// Pages of gap a pagemap read reads through rather than starting a new `pread`.
const LOOKUP_GAP_PAGES: u64 = 64;
const STATE_SHIFT: u32 = 56;
const PFN_MASK: u64 = (1 << 55) - 1;

const ST_UNTOUCHED: u8 = 0;
const ST_ZERO: u8 = 1;
const ST_BACKED: u8 = 2;
const ST_SWAPPED: u8 = 3;
const ST_SHARED: u8 = 4;
const ST_DISCARDED: u8 = 5;
const N_STATES: usize = 6;

/// Errors of the map, naming the step that failed.
#[derive(Debug, Error)]
pub enum MapError {
    /// The guest RAM address is not page aligned.
    #[error("creating the map: host address {0:#x} is not 4 KiB aligned")]
    UnalignedHost(usize),
    /// Guest RAM has no pages, or its range overflows the address space.
    #[error("creating the map: guest RAM of {pages} pages at {host_addr:#x} is empty or too large")]
    BadSize { host_addr: usize, pages: u64 },
    /// The host page size is not the guest's 4 KiB.
    #[error("creating the map: host page size {0} is not 4096")]
    HostPageSize(usize),
    /// Opening or probing the pagemap failed.
    #[error("creating the map: {0}")]
    OpenPagemap(#[source] PagemapError),
    /// The interval number is reserved.
    #[error("harvest: interval {0} is reserved (must be below {NO_WRITE})")]
    BadInterval(u32),
    /// `PAGEMAP_SCAN` residency was asked for but the kernel lacks it.
    #[error("creating the map: PAGEMAP_SCAN residency asked for, but this kernel lacks it")]
    ScanUnsupported,
    /// The residency pass failed.
    #[error("harvest: residency pass ({method:?}): {source}")]
    Residency {
        method: ResidencyMethod,
        #[source]
        source: PagemapError,
    },
    /// A pagemap lookup failed.
    #[error("{step}: pagemap lookup: {source}")]
    Lookup {
        step: &'static str,
        #[source]
        source: PagemapError,
    },
    /// Writing the map file failed.
    #[error("writing the map{}: {source}", path_note(.path))]
    Write {
        path: Option<PathBuf>,
        #[source]
        source: std::io::Error,
    },
    /// Opening or reading the map file failed.
    #[error("reading the map{}: {source}", path_note(.path))]
    Read {
        path: Option<PathBuf>,
        #[source]
        source: std::io::Error,
    },
    /// The map file ends inside its header.
    #[error("reading the map: truncated header: {got} of {HEADER_SIZE} bytes")]
    TruncatedHeader { got: usize },
    /// The map file does not start with the magic.
    #[error("reading the map: bad magic {found:02x?} (not a memvisor map file)")]
    BadMagic { found: [u8; 8] },
    /// The map file has a version this reader does not know.
    #[error("reading the map: unsupported version {0} (this reader knows {MAP_VERSION})")]
    UnsupportedVersion(u32),
    /// A header field is out of range.
    #[error("reading the map: bad header: {0}")]
    BadHeader(String),
    /// The file holds fewer records than the header says.
    #[error("reading the map: truncated records: header says {expected}, file holds {got} whole")]
    TruncatedRecords { expected: u64, got: u64 },
    /// The file holds more data than the header's records.
    #[error("reading the map: record count mismatch: data continues after the {expected} records")]
    TrailingData { expected: u64 },
    /// A record is invalid.
    #[error("reading the map: record {index}: {reason}")]
    BadRecord { index: u64, reason: String },
}

fn path_note(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

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
}

impl PageState {
    fn code(self) -> u8 {
        match self {
            PageState::Untouched => ST_UNTOUCHED,
            PageState::Zero => ST_ZERO,
            PageState::Backed(_) => ST_BACKED,
            PageState::Swapped => ST_SWAPPED,
            PageState::Shared(_) => ST_SHARED,
            PageState::Discarded => ST_DISCARDED,
        }
    }

    fn pfn(self) -> u64 {
        match self {
            PageState::Backed(p) | PageState::Shared(p) => p,
            _ => 0,
        }
    }

    fn from_code(code: u8, pfn: u64) -> Option<PageState> {
        Some(match code {
            ST_UNTOUCHED => PageState::Untouched,
            ST_ZERO => PageState::Zero,
            ST_BACKED => PageState::Backed(pfn),
            ST_SWAPPED => PageState::Swapped,
            ST_SHARED => PageState::Shared(pfn),
            ST_DISCARDED => PageState::Discarded,
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
    fn untouched(gfn: u64) -> PageInfo {
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

/// Page counts of a map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapSummary {
    /// Guest pages.
    pub pages: u64,
    pub untouched: u64,
    pub zero: u64,
    /// Pages with a machine page of their own (shared ones not included).
    pub backed: u64,
    pub swapped: u64,
    /// Pages whose machine page another guest page maps too.
    pub shared: u64,
    pub discarded: u64,
    /// Pages ever written by the guest.
    pub guest_written: u64,
    /// Pages ever written by the VMM.
    pub vmm_written: u64,
    /// Whether PFNs were visible (else no page is Zero or Shared: present pages count as backed).
    pub pfn_visible: bool,
    /// Last harvested interval + 1.
    pub intervals: u32,
}

impl fmt::Display for MapSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |p: u64| p as f64 * PAGE_SIZE as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "guest pages   {:>12} ({:.1} MiB), {} intervals{}",
            self.pages,
            mib(self.pages),
            self.intervals,
            if self.pfn_visible {
                ""
            } else {
                ", PFNs hidden: zero pages count as backed"
            }
        )?;
        for (name, n) in [
            ("untouched", self.untouched),
            ("zero", self.zero),
            ("backed", self.backed),
            ("shared", self.shared),
            ("swapped", self.swapped),
            ("discarded", self.discarded),
            ("guest-written", self.guest_written),
            ("vmm-written", self.vmm_written),
        ] {
            writeln!(f, "{name:<13} {n:>12} ({:.1} MiB)", mib(n))?;
        }
        Ok(())
    }
}

/// What one harvest did and what it cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HarvestStats {
    /// Pages touched for the first time.
    pub newly_touched: u64,
    /// Guest writes observed (bits newly set in the dirty log).
    pub guest_writes: u64,
    /// Pages the VMM wrote since the previous harvest.
    pub vmm_writes: u64,
    /// Pages looked up in the pagemap.
    pub lookups: u64,
    /// Whether this harvest ran the residency pass.
    pub residency_ran: bool,
    /// How it did (`Mincore` or `PagemapScan`), when it ran.
    pub residency_method: Option<ResidencyMethod>,
    /// Milliseconds in the bitmap pass.
    pub bitmap_ms: f64,
    /// Milliseconds in the residency pass.
    pub residency_ms: f64,
    /// Milliseconds in pagemap lookups.
    pub lookup_ms: f64,
}

/// What one refresh found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RefreshStats {
    /// Touched pages re-read.
    pub pages_read: u64,
    /// Pages whose state or PFN changed.
    pub changed: u64,
    /// Pages now Shared.
    pub shared: u64,
    /// Milliseconds taken.
    pub ms: f64,
}

/// How the residency pass finds the resident pages of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ResidencyMethod {
    /// Per pass: `PAGEMAP_SCAN` while fewer than 1/[`AUTO_SCAN_DIVISOR`] of the pages were
    /// resident at the last look (and the kernel has it), else `mincore`.
    Auto,
    /// `mincore(2)`: a byte per page, O(pages).
    Mincore,
    /// The `PAGEMAP_SCAN` ioctl: runs of present pages, O(populated page tables).
    PagemapScan,
}

/// [`ResidencyMethod::Auto`] scans while resident pages < guest pages / this.
pub const AUTO_SCAN_DIVISOR: u64 = 20;

/// Tuning of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Run the residency pass on every n-th harvest (the first harvest always runs it; 0 = never
    /// again after the first). Pages only read by the guest are found by it, so with n > 1 their
    /// first-touch interval may be up to n - 1 intervals late.
    pub residency_every: u32,
    /// How to find resident pages.
    pub residency: ResidencyMethod,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            residency_every: 1,
            residency: ResidencyMethod::Auto,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Record {
    /// PFN in bits 0-54, state code in bits 56-63.
    pfn_state: u64,
    first_touch: u32,
    last_write: u32,
}

impl Record {
    fn state_code(self) -> u8 {
        (self.pfn_state >> STATE_SHIFT) as u8
    }
    fn pfn(self) -> u64 {
        self.pfn_state & PFN_MASK
    }
    fn state(self) -> PageState {
        PageState::from_code(self.state_code(), self.pfn()).unwrap_or(PageState::Untouched)
    }
}

type Chunk = [Record; PAGES_PER_CHUNK as usize];

/// The PMP-MMP map of one guest RAM region.
#[derive(Debug)]
pub struct PmpMmpMap {
    host_addr: usize,
    pages: u64,
    options: MapOptions,
    pagemap: Pagemap,
    touched: Bitmap,
    guest_written: Bitmap,
    vmm_written: Bitmap,
    /// Bits known set in KVM's dirty log.
    known_dirty: Bitmap,
    /// Pages present (resident) at the last look.
    resident: Bitmap,
    /// Scratch: pages to look up in this harvest.
    pending: Bitmap,
    chunks: Vec<Option<Box<Chunk>>>,
    /// Touched pages per state code.
    counts: [u64; N_STATES],
    interval_count: u32,
    harvests: u64,
    /// The residency method: `Auto` only when the kernel has `PAGEMAP_SCAN`.
    method: ResidencyMethod,
    mincore_buf: Vec<u8>,
    scan_buf: Vec<PageRegion>,
    entry_buf: Vec<u64>,
}

impl PmpMmpMap {
    /// A map of `guest_pages` pages of guest RAM at `host_addr`, with default options.
    ///
    /// The map never dereferences guest RAM; it only asks the kernel about it, and an unmapped
    /// range yields errors, not undefined behaviour.
    pub fn new(host_addr: usize, guest_pages: u64) -> Result<Self, MapError> {
        Self::with_options(host_addr, guest_pages, MapOptions::default())
    }

    /// [`PmpMmpMap::new`] with options.
    pub fn with_options(
        host_addr: usize,
        guest_pages: u64,
        options: MapOptions,
    ) -> Result<Self, MapError> {
        let pagemap = Pagemap::open().map_err(MapError::OpenPagemap)?;
        Self::with_pagemap(host_addr, guest_pages, options, pagemap)
    }

    /// [`PmpMmpMap::with_options`] with a given pagemap reader (e.g. one opened with
    /// [`Pagemap::open_without_pfns`]).
    pub fn with_pagemap(
        host_addr: usize,
        guest_pages: u64,
        options: MapOptions,
        pagemap: Pagemap,
    ) -> Result<Self, MapError> {
        if pagemap.page_size() as u64 != PAGE_SIZE {
            return Err(MapError::HostPageSize(pagemap.page_size()));
        }
        if !(host_addr as u64).is_multiple_of(PAGE_SIZE) {
            return Err(MapError::UnalignedHost(host_addr));
        }
        let fits = guest_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| (host_addr as u64).checked_add(len))
            .is_some_and(|end| end <= usize::MAX as u64);
        if guest_pages == 0 || !fits {
            return Err(MapError::BadSize {
                host_addr,
                pages: guest_pages,
            });
        }
        let method = match options.residency {
            ResidencyMethod::Auto if !pagemap.scan_supported() => ResidencyMethod::Mincore,
            ResidencyMethod::PagemapScan if !pagemap.scan_supported() => {
                return Err(MapError::ScanUnsupported);
            }
            m => m,
        };
        let nchunks = guest_pages.div_ceil(PAGES_PER_CHUNK) as usize;
        let mut chunks = Vec::with_capacity(nchunks);
        chunks.resize_with(nchunks, || None);
        Ok(PmpMmpMap {
            host_addr,
            pages: guest_pages,
            options,
            pagemap,
            touched: Bitmap::new(guest_pages),
            guest_written: Bitmap::new(guest_pages),
            vmm_written: Bitmap::new(guest_pages),
            known_dirty: Bitmap::new(guest_pages),
            resident: Bitmap::new(guest_pages),
            pending: Bitmap::new(guest_pages),
            chunks,
            counts: [0; N_STATES],
            interval_count: 0,
            harvests: 0,
            method,
            mincore_buf: Vec::new(),
            scan_buf: Vec::new(),
            entry_buf: Vec::new(),
        })
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The residency method in use (`Auto` only when the kernel has `PAGEMAP_SCAN`).
    pub fn residency_method(&self) -> ResidencyMethod {
        self.method
    }

    /// Whether PFNs are visible to this process.
    pub fn pfn_visible(&self) -> bool {
        self.pagemap.pfn_visible()
    }

    fn record(&self, gfn: u64) -> Option<&Record> {
        let c = self
            .chunks
            .get((gfn / PAGES_PER_CHUNK) as usize)?
            .as_ref()?;
        c.get((gfn % PAGES_PER_CHUNK) as usize)
    }

    fn record_mut(&mut self, gfn: u64) -> &mut Record {
        let chunk = self.chunks[(gfn / PAGES_PER_CHUNK) as usize]
            .get_or_insert_with(|| Box::new([Record::default(); PAGES_PER_CHUNK as usize]));
        &mut chunk[(gfn % PAGES_PER_CHUNK) as usize]
    }

    /// Marks `gfn` touched in `interval` (its record is allocated in the untouched state).
    fn touch(&mut self, gfn: u64, interval: u32) {
        self.touched.set(gfn);
        let r = self.record_mut(gfn);
        *r = Record {
            pfn_state: 0,
            first_touch: interval,
            last_write: NO_WRITE,
        };
    }

    fn set_state(&mut self, gfn: u64, state: PageState) -> bool {
        let r = self.record_mut(gfn);
        let old = r.state_code();
        let new_word = (u64::from(state.code()) << STATE_SHIFT) | (state.pfn() & PFN_MASK);
        let changed = r.pfn_state != new_word;
        r.pfn_state = new_word;
        self.counts[old as usize] -= u64::from(old != ST_UNTOUCHED);
        self.counts[state.code() as usize] += u64::from(state.code() != ST_UNTOUCHED);
        changed
    }

    /// Folds one interval's dirty information in.
    ///
    /// `guest_dirty` is KVM's dirty bitmap for the slot just read (bits stay set until cleared);
    /// `vmm_dirty` the pages the VMM wrote since the previous harvest. Either may be shorter than
    /// the slot or empty: missing words mean no news. `interval` is the number of the interval
    /// that just ended (monotonic; `u32::MAX` is reserved).
    pub fn harvest(
        &mut self,
        guest_dirty: &[u64],
        vmm_dirty: &[u64],
        interval: u32,
    ) -> Result<HarvestStats, MapError> {
        if interval == NO_WRITE {
            return Err(MapError::BadInterval(interval));
        }
        let mut stats = HarvestStats::default();
        let t0 = Instant::now();
        self.bitmap_pass(guest_dirty, vmm_dirty, interval, &mut stats);
        let t1 = Instant::now();
        stats.bitmap_ms = ms(t1 - t0);

        let every = u64::from(self.options.residency_every);
        if self.harvests == 0 || (every > 0 && self.harvests.is_multiple_of(every)) {
            let method = match self.method {
                ResidencyMethod::Auto
                    if self.resident.count_ones().saturating_mul(AUTO_SCAN_DIVISOR)
                        < self.pages =>
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
            stats.residency_ran = true;
            stats.residency_method = Some(method);
        }
        let t2 = Instant::now();
        stats.residency_ms = ms(t2 - t1);

        let (lookups, newly) = self.lookup_pending(interval)?;
        stats.lookups = lookups;
        stats.newly_touched += newly;
        stats.lookup_ms = ms(t2.elapsed());

        self.interval_count = self.interval_count.max(interval + 1);
        self.harvests += 1;
        log::debug!("pmp-mmp harvest {interval}: {stats:?}");
        Ok(stats)
    }

    fn bitmap_pass(
        &mut self,
        guest_dirty: &[u64],
        vmm_dirty: &[u64],
        interval: u32,
        stats: &mut HarvestStats,
    ) {
        let nwords = words_for(self.pages);
        for w in 0..nwords {
            let valid = self.touched.word_mask(w);
            let g = guest_dirty.get(w).map_or(0, |x| x & valid);
            let v = vmm_dirty.get(w).map_or(0, |x| x & valid);
            if g == 0 && v == 0 && self.known_dirty.words()[w] == 0 {
                continue;
            }
            let mut new_g = 0;
            if w < guest_dirty.len() {
                new_g = g & !self.known_dirty.words()[w];
                // KVM's log is authoritative for the words it gave: a bit that is clear now was
                // cleared (told or not), so its next set is a new write.
                self.known_dirty.words_mut()[w] = g;
            }
            let written = new_g | v;
            if written == 0 {
                continue;
            }
            let was_touched = self.touched.words()[w];
            self.touched.words_mut()[w] |= written;
            self.guest_written.words_mut()[w] |= new_g;
            self.vmm_written.words_mut()[w] |= v;
            self.pending.words_mut()[w] |= written;
            stats.guest_writes += u64::from(new_g.count_ones());
            stats.vmm_writes += u64::from(v.count_ones());
            stats.newly_touched += u64::from((written & !was_touched).count_ones());
            let mut bits = written;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let gfn = w as u64 * WORD_BITS + u64::from(b);
                if was_touched & (1 << b) == 0 {
                    self.touch(gfn, interval);
                }
                self.record_mut(gfn).last_write = interval;
            }
        }
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
                    &self.touched,
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
            touched: &self.touched,
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

    /// Looks up every pending page; returns (lookups, newly touched).
    fn lookup_pending(&mut self, interval: u32) -> Result<(u64, u64), MapError> {
        let pending = std::mem::take(&mut self.pending);
        let mut lookups = 0u64;
        let mut newly = 0u64;
        let result = self.for_each_entry(&pending, "harvest", |map, gfn, e| {
            lookups += 1;
            newly += u64::from(map.apply_entry(gfn, e, Some(interval)));
        });
        self.pending = pending;
        self.pending.clear_all();
        result.map(|()| (lookups, newly))
    }

    /// Reads the pagemap entries of the pages set in `pages`, a range of nearby ones (see
    /// [`gap_ranges`]) per read, and calls `f` with each of those pages and its entry, in
    /// ascending order. A failed read ends the walk with [`MapError::Lookup`] for `step`.
    fn for_each_entry(
        &mut self,
        pages: &Bitmap,
        step: &'static str,
        mut f: impl FnMut(&mut Self, u64, PageEntry),
    ) -> Result<(), MapError> {
        for r in gap_ranges(pages, LOOKUP_GAP_PAGES, READ_CHUNK_ENTRIES as u64) {
            self.read_entries(r.clone())
                .map_err(|source| MapError::Lookup { step, source })?;
            let entries = std::mem::take(&mut self.entry_buf);
            for gfn in ones_in(pages, r.clone()) {
                f(self, gfn, PageEntry(entries[(gfn - r.start) as usize]));
            }
            self.entry_buf = entries;
        }
        Ok(())
    }

    fn read_entries(&mut self, r: Range<u64>) -> Result<(), PagemapError> {
        let n = (r.end - r.start) as usize;
        if self.entry_buf.len() < n {
            self.entry_buf.resize(n, 0);
        }
        let addr = self.host_addr + (r.start * PAGE_SIZE) as usize;
        self.pagemap.read(addr, n, &mut self.entry_buf)
    }

    /// Applies a pagemap entry to `gfn`. With `touch_in`, a present untouched page becomes touched
    /// in that interval (returns true). Returns whether the page was newly touched.
    fn apply_entry(&mut self, gfn: u64, e: PageEntry, touch_in: Option<u32>) -> bool {
        let res = self.pagemap.classify(e);
        let mut newly = false;
        if !self.touched.get(gfn) {
            match (res, touch_in) {
                (Residency::Absent, _) | (_, None) => {
                    self.resident.clear(gfn);
                    return false;
                }
                (_, Some(i)) => {
                    self.touch(gfn, i);
                    newly = true;
                }
            }
        }
        let old = self
            .record(gfn)
            .map(|r| r.state())
            .unwrap_or(PageState::Untouched);
        self.set_residency(gfn, res, |pfn| match old {
            PageState::Shared(p) if p == pfn && pfn != 0 => old,
            _ => PageState::Backed(pfn),
        });
        newly
    }

    /// Sets the state and the residency bit of touched page `gfn` from `res`; `frame` gives the
    /// state of a page a machine page backs, from its PFN (0 when hidden).
    fn set_residency(&mut self, gfn: u64, res: Residency, frame: impl FnOnce(u64) -> PageState) {
        let state = match res {
            Residency::Absent => PageState::Discarded,
            Residency::Swapped => PageState::Swapped,
            Residency::Zero => PageState::Zero,
            Residency::Frame(pfn) => frame(pfn.unwrap_or(0)),
        };
        if matches!(res, Residency::Zero | Residency::Frame(_)) {
            self.resident.set(gfn);
        } else {
            self.resident.clear(gfn);
        }
        self.set_state(gfn, state);
    }

    /// The sampler cleared the bits of `mask` (bit i = page i) in KVM's dirty log: a later set
    /// bit there is a new write. Touched and first-touch records are kept.
    pub fn note_cleared(&mut self, mask: &[u64]) {
        self.known_dirty.and_not_assign(mask);
    }

    /// Re-reads the pagemap of every touched page (finds swap-out, KSM merging, moved frames) and
    /// marks as Shared every PFN that more than one guest page maps (the zero page excluded).
    pub fn refresh(&mut self) -> Result<RefreshStats, MapError> {
        let t0 = Instant::now();
        let mut stats = RefreshStats::default();
        let touched = std::mem::take(&mut self.touched);
        // (PFN, gfn, old record word) of present pages not mapped exclusively: the only ones
        // that can be shared (a frame two guest pages map has a map count of at least 2).
        let mut candidates: Vec<(u64, u64, u64)> = Vec::new();
        let result = self.for_each_entry(&touched, "refresh", |map, gfn, e| {
            stats.pages_read += 1;
            let old = map.record(gfn).map_or(0, |r| r.pfn_state);
            let res = map.pagemap.classify(e);
            let mut candidate = false;
            map.set_residency(gfn, res, |pfn| {
                if pfn != 0 && !e.exclusive() {
                    candidates.push((pfn, gfn, old));
                    candidate = true;
                }
                PageState::Backed(pfn)
            });
            if !candidate && old != map.record(gfn).map_or(0, |r| r.pfn_state) {
                stats.changed += 1;
            }
        });
        self.touched = touched;
        result?;
        candidates.sort_unstable();
        let mut i = 0;
        while i < candidates.len() {
            let pfn = candidates[i].0;
            let mut j = i + 1;
            while j < candidates.len() && candidates[j].0 == pfn {
                j += 1;
            }
            for &(_, gfn, old) in &candidates[i..j] {
                if j - i > 1 {
                    self.set_state(gfn, PageState::Shared(pfn));
                    stats.shared += 1;
                }
                if old != self.record(gfn).map_or(0, |r| r.pfn_state) {
                    stats.changed += 1;
                }
            }
            i = j;
        }
        stats.ms = ms(t0.elapsed());
        log::debug!("pmp-mmp refresh: {stats:?}");
        Ok(stats)
    }

    /// Page counts.
    pub fn summary(&self) -> MapSummary {
        let touched: u64 = self.counts.iter().sum();
        MapSummary {
            pages: self.pages,
            untouched: self.pages.saturating_sub(touched),
            zero: self.counts[ST_ZERO as usize],
            backed: self.counts[ST_BACKED as usize],
            swapped: self.counts[ST_SWAPPED as usize],
            shared: self.counts[ST_SHARED as usize],
            discarded: self.counts[ST_DISCARDED as usize],
            guest_written: self.guest_written.count_ones(),
            vmm_written: self.vmm_written.count_ones(),
            pfn_visible: self.pagemap.pfn_visible(),
            intervals: self.interval_count,
        }
    }

    /// Backed pages (state Backed, not Shared) among guest pages `range` (clipped to the RAM).
    pub fn backed_in(&self, range: Range<u64>) -> u64 {
        let end = range.end.min(self.pages);
        let mut n = 0;
        let mut gfn = range.start;
        while gfn < end {
            let c = (gfn / PAGES_PER_CHUNK) as usize;
            let chunk_end = ((c as u64 + 1) * PAGES_PER_CHUNK).min(end);
            if let Some(chunk) = &self.chunks[c] {
                let base = c as u64 * PAGES_PER_CHUNK;
                n += chunk[(gfn - base) as usize..(chunk_end - base) as usize]
                    .iter()
                    .filter(|r| r.state_code() == ST_BACKED)
                    .count() as u64;
            }
            gfn = chunk_end;
        }
        n
    }

    /// What the map knows about page `gfn`; `None` past the end of guest RAM.
    pub fn page(&self, gfn: u64) -> Option<PageInfo> {
        if gfn >= self.pages {
            return None;
        }
        if !self.touched.get(gfn) {
            return Some(PageInfo::untouched(gfn));
        }
        let r = self.record(gfn).copied().unwrap_or_default();
        Some(PageInfo {
            gfn,
            state: r.state(),
            first_touch: Some(r.first_touch),
            last_write: (r.last_write != NO_WRITE).then_some(r.last_write),
            guest_written: self.guest_written.get(gfn),
            vmm_written: self.vmm_written.get(gfn),
        })
    }

    /// Heap bytes the map itself holds (bitmaps, record chunks, scratch buffers).
    pub fn overhead_bytes(&self) -> usize {
        let bitmaps = [
            &self.touched,
            &self.guest_written,
            &self.vmm_written,
            &self.known_dirty,
            &self.resident,
            &self.pending,
        ]
        .iter()
        .map(|b| b.heap_bytes())
        .sum::<usize>();
        let chunk_table = self.chunks.capacity() * std::mem::size_of::<Option<Box<Chunk>>>();
        let chunks = self.chunks.iter().flatten().count() * std::mem::size_of::<Chunk>();
        bitmaps
            + chunk_table
            + chunks
            + self.mincore_buf.capacity()
            + self.scan_buf.capacity() * std::mem::size_of::<PageRegion>()
            + self.entry_buf.capacity() * std::mem::size_of::<u64>()
    }

    /// Writes the map file (format in the module docs).
    pub fn write(&self, w: impl Write) -> Result<(), MapError> {
        self.write_inner(w)
            .map_err(|source| MapError::Write { path: None, source })
    }

    fn write_inner(&self, w: impl Write) -> std::io::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 16, w);
        let header = MapHeader {
            page_size: PAGE_SIZE as u32,
            guest_pages: self.pages,
            intervals: self.interval_count,
            pfn_visible: self.pagemap.pfn_visible(),
            records: self.touched.count_ones(),
        };
        w.write_all(&header.encode())?;
        for gfn in self.touched.iter_ones() {
            let r = self.record(gfn).copied().unwrap_or_default();
            let flags = (u8::from(self.guest_written.get(gfn)) * REC_GUEST_WRITTEN)
                | (u8::from(self.vmm_written.get(gfn)) * REC_VMM_WRITTEN);
            let mut rec = [0u8; RECORD_SIZE];
            rec[0..8].copy_from_slice(&gfn.to_le_bytes());
            rec[8..16].copy_from_slice(&r.pfn().to_le_bytes());
            rec[16..20].copy_from_slice(&r.first_touch.to_le_bytes());
            rec[20..24].copy_from_slice(&r.last_write.to_le_bytes());
            rec[24] = r.state_code();
            rec[25] = flags;
            w.write_all(&rec)?;
        }
        w.flush()
    }

    /// Writes the map file at `path` (through a temporary file renamed into place, so readers
    /// never see half a map).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), MapError> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let err = |source| MapError::Write {
            path: Some(path.to_owned()),
            source,
        };
        let f = File::create(&tmp).map_err(err)?;
        self.write_inner(&f).map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err)
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

/// Ranges covering the set bits of `b`, merging runs separated by at most `gap` clear bits, each
/// at most `max` pages long.
fn gap_ranges(b: &Bitmap, gap: u64, max: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for run in b.runs() {
        let mut start = run.start;
        while start < run.end {
            match out.last_mut() {
                Some(last) if start - last.end <= gap && run.end.min(last.start + max) > start => {
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

/// Set bits of `b` within `r`.
fn ones_in(b: &Bitmap, r: Range<u64>) -> impl Iterator<Item = u64> + '_ {
    let w0 = (r.start / WORD_BITS) as usize;
    let w1 = words_for(r.end).min(b.words().len());
    let (lo, hi) = (r.start, r.end);
    (w0..w1).flat_map(move |w| {
        let mut bits = b.words()[w];
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            Some(w as u64 * WORD_BITS + u64::from(i))
        })
        .filter(move |g| (lo..hi).contains(g))
    })
}

/// The header of a map file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapHeader {
    pub page_size: u32,
    pub guest_pages: u64,
    /// Last harvested interval + 1.
    pub intervals: u32,
    pub pfn_visible: bool,
    pub records: u64,
}

impl MapHeader {
    fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..8].copy_from_slice(&MAP_MAGIC);
        h[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.page_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.guest_pages.to_le_bytes());
        h[24..28].copy_from_slice(&self.intervals.to_le_bytes());
        let flags = if self.pfn_visible {
            FLAG_PFN_VISIBLE
        } else {
            0
        };
        h[28..32].copy_from_slice(&flags.to_le_bytes());
        h[32..40].copy_from_slice(&self.records.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_SIZE]) -> Result<Self, MapError> {
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[0..8]);
        if magic != MAP_MAGIC {
            return Err(MapError::BadMagic { found: magic });
        }
        let version = u32_at(8);
        if version != MAP_VERSION {
            return Err(MapError::UnsupportedVersion(version));
        }
        let page_size = u32_at(12);
        if !page_size.is_power_of_two() || page_size < 512 {
            return Err(MapError::BadHeader(format!(
                "page size {page_size} is not a power of two of at least 512"
            )));
        }
        let guest_pages = u64_at(16);
        let flags = u32_at(28);
        if flags & !FLAG_PFN_VISIBLE != 0 {
            return Err(MapError::BadHeader(format!("unknown flags {flags:#x}")));
        }
        let records = u64_at(32);
        if records > guest_pages {
            return Err(MapError::BadHeader(format!(
                "record count {records} exceeds the {guest_pages} guest pages"
            )));
        }
        Ok(MapHeader {
            page_size,
            guest_pages,
            intervals: u32_at(24),
            pfn_visible: flags & FLAG_PFN_VISIBLE != 0,
            records,
        })
    }
}

/// A map file read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFile {
    pub header: MapHeader,
    /// One per touched page, ascending gfn.
    pub records: Vec<PageInfo>,
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl MapFile {
    /// Reads and validates a map file.
    pub fn read(r: impl Read) -> Result<Self, MapError> {
        Self::read_inner(r, None)
    }

    /// Reads and validates the map file at `path`.
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self, MapError> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|source| MapError::Read {
            path: Some(path.to_owned()),
            source,
        })?;
        Self::read_inner(f, Some(path))
    }

    fn read_inner(r: impl Read, path: Option<&Path>) -> Result<Self, MapError> {
        let io = |source| MapError::Read {
            path: path.map(Path::to_owned),
            source,
        };
        let mut r = BufReader::with_capacity(1 << 16, r);
        let mut h = [0u8; HEADER_SIZE];
        let got = read_full(&mut r, &mut h).map_err(io)?;
        if got < HEADER_SIZE {
            return Err(MapError::TruncatedHeader { got });
        }
        let header = MapHeader::decode(&h)?;
        // Never trust the count for the allocation.
        let mut records = Vec::with_capacity(header.records.min(1 << 16) as usize);
        let mut prev: Option<u64> = None;
        for index in 0..header.records {
            let mut rec = [0u8; RECORD_SIZE];
            let got = read_full(&mut r, &mut rec).map_err(io)?;
            if got < RECORD_SIZE {
                return Err(MapError::TruncatedRecords {
                    expected: header.records,
                    got: index,
                });
            }
            let info = decode_record(&header, &rec, prev)
                .map_err(|reason| MapError::BadRecord { index, reason })?;
            prev = Some(info.gfn);
            records.push(info);
        }
        let mut extra = [0u8; 1];
        if read_full(&mut r, &mut extra).map_err(io)? != 0 {
            return Err(MapError::TrailingData {
                expected: header.records,
            });
        }
        Ok(MapFile { header, records })
    }

    /// Page counts, as [`PmpMmpMap::summary`] gave them when the file was written.
    pub fn summary(&self) -> MapSummary {
        let mut s = MapSummary {
            pages: self.header.guest_pages,
            untouched: self
                .header
                .guest_pages
                .saturating_sub(self.records.len() as u64),
            pfn_visible: self.header.pfn_visible,
            intervals: self.header.intervals,
            ..Default::default()
        };
        for r in &self.records {
            match r.state {
                PageState::Zero => s.zero += 1,
                PageState::Backed(_) => s.backed += 1,
                PageState::Swapped => s.swapped += 1,
                PageState::Shared(_) => s.shared += 1,
                PageState::Discarded => s.discarded += 1,
                PageState::Untouched => {}
            }
            s.guest_written += u64::from(r.guest_written);
            s.vmm_written += u64::from(r.vmm_written);
        }
        s
    }

    /// The record of page `gfn`: untouched when it has none, `None` past the guest's end.
    pub fn page(&self, gfn: u64) -> Option<PageInfo> {
        if gfn >= self.header.guest_pages {
            return None;
        }
        Some(match self.records.binary_search_by_key(&gfn, |r| r.gfn) {
            Ok(i) => self.records[i],
            Err(_) => PageInfo::untouched(gfn),
        })
    }
}

fn decode_record(
    header: &MapHeader,
    rec: &[u8; RECORD_SIZE],
    prev: Option<u64>,
) -> Result<PageInfo, String> {
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rec[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |o: usize| u32::from_le_bytes([rec[o], rec[o + 1], rec[o + 2], rec[o + 3]]);
    let gfn = u64_at(0);
    let pfn = u64_at(8);
    let first_touch = u32_at(16);
    let last_write = u32_at(20);
    let (code, flags) = (rec[24], rec[25]);
    if gfn >= header.guest_pages {
        return Err(format!(
            "gfn {gfn} past the {} guest pages",
            header.guest_pages
        ));
    }
    if prev.is_some_and(|p| gfn <= p) {
        return Err(format!(
            "gfn {gfn} out of order (after {})",
            prev.unwrap_or(0)
        ));
    }
    let state = match PageState::from_code(code, pfn) {
        Some(PageState::Untouched) | None => return Err(format!("bad state {code}")),
        Some(s) => s,
    };
    if pfn > PFN_MASK {
        return Err(format!("PFN {pfn:#x} out of range"));
    }
    if first_touch >= header.intervals {
        return Err(format!(
            "first touch {first_touch} not below the interval count {}",
            header.intervals
        ));
    }
    if last_write != NO_WRITE && last_write >= header.intervals {
        return Err(format!(
            "last write {last_write} not below the interval count {}",
            header.intervals
        ));
    }
    if flags & !(REC_GUEST_WRITTEN | REC_VMM_WRITTEN) != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    Ok(PageInfo {
        gfn,
        state,
        first_touch: Some(first_touch),
        last_write: (last_write != NO_WRITE).then_some(last_write),
        guest_written: flags & REC_GUEST_WRITTEN != 0,
        vmm_written: flags & REC_VMM_WRITTEN != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::AnonMapping;

    /// Two tests running `check` with each explicit residency method.
    macro_rules! per_method {
        ($check:ident: $mincore:ident, $scan:ident) => {
            #[test]
            fn $mincore() {
                $check(ResidencyMethod::Mincore);
            }

            #[test]
            fn $scan() {
                $check(ResidencyMethod::PagemapScan);
            }
        };
    }

    /// Guest RAM stand-in: an anonymous mapping of `pages` guest pages.
    struct Ram {
        mem: AnonMapping,
        pages: u64,
    }

    impl Ram {
        fn new(pages: u64) -> Ram {
            let mem = AnonMapping::new((pages * PAGE_SIZE) as usize)
                .unwrap_or_else(|e| panic!("mmap of {pages} pages: {e}"));
            Ram { mem, pages }
        }
        fn host(&self) -> usize {
            self.mem.addr()
        }
        fn write(&self, gfn: u64, val: u8) {
            assert!(gfn < self.pages);
            self.mem.write_volatile((gfn * PAGE_SIZE) as usize, val);
        }
        fn read(&self, gfn: u64) -> u8 {
            assert!(gfn < self.pages);
            self.mem.read_volatile((gfn * PAGE_SIZE) as usize)
        }
        fn resident(&self) -> u64 {
            let mut v = vec![0u8; self.pages as usize];
            pagemap::mincore(self.host(), (self.pages * PAGE_SIZE) as usize, &mut v).unwrap();
            v.iter().filter(|b| *b & 1 != 0).count() as u64
        }
    }

    fn dirty_of(pages: u64, gfns: &[u64]) -> Vec<u64> {
        let mut b = Bitmap::new(pages);
        for &g in gfns {
            b.set(g);
        }
        b.words().to_vec()
    }

    fn map_with(ram: &Ram, method: ResidencyMethod) -> PmpMmpMap {
        let opts = MapOptions {
            residency: method,
            ..Default::default()
        };
        let map = PmpMmpMap::with_options(ram.host(), ram.pages, opts).unwrap();
        assert_eq!(map.residency_method(), method);
        map
    }

    #[test]
    fn auto_scans_sparse_ram_and_mincores_dense_ram() {
        let ram = Ram::new(200);
        let mut map = PmpMmpMap::new(ram.host(), 200).unwrap();
        assert_eq!(map.residency_method(), ResidencyMethod::Auto);
        let st = map.harvest(&[], &[], 0).unwrap();
        assert_eq!(st.residency_method, Some(ResidencyMethod::PagemapScan));
        for g in 0..20 {
            ram.read(g);
        }
        let st = map.harvest(&[], &[], 1).unwrap();
        assert_eq!(st.residency_method, Some(ResidencyMethod::PagemapScan));
        assert_eq!(st.newly_touched, 20);
        // 20 of 200 resident is above 1/20: mincore from now on, and it still sees changes.
        ram.read(150);
        let st = map.harvest(&[], &[], 2).unwrap();
        assert_eq!(st.residency_method, Some(ResidencyMethod::Mincore));
        assert_eq!(st.newly_touched, 1);
        assert_eq!(map.summary().zero, 21);
    }

    per_method!(check_states: states_with_mincore, states_with_pagemap_scan);

    fn check_states(method: ResidencyMethod) {
        let ram = Ram::new(1024);
        let mut map = map_with(&ram, method);
        let written = [0u64, 1, 2, 100, 1023];
        let read = [10u64, 11, 500];
        for &g in &written {
            ram.write(g, 7);
        }
        for &g in &read {
            assert_eq!(ram.read(g), 0);
        }
        let vmm = [600u64];
        ram.write(600, 1);
        let st = map
            .harvest(&dirty_of(1024, &written), &dirty_of(1024, &vmm), 0)
            .unwrap();
        assert_eq!(st.guest_writes, 5);
        assert_eq!(st.vmm_writes, 1);
        assert_eq!(st.newly_touched, 9);
        assert!(st.residency_ran);
        let pm = Pagemap::open().unwrap();
        assert!(pm.pfn_visible(), "tests run as root: PFNs must be visible");
        for &g in written.iter().chain(&vmm) {
            let p = map.page(g).unwrap();
            match p.state {
                PageState::Backed(pfn) => {
                    assert_ne!(pfn, 0);
                    assert!(!pm.is_zero_pfn(pfn));
                }
                s => panic!("gfn {g}: {s:?}"),
            }
            assert_eq!(p.first_touch, Some(0));
            assert_eq!(p.last_write, Some(0));
        }
        assert!(map.page(0).unwrap().guest_written);
        assert!(map.page(600).unwrap().vmm_written && !map.page(600).unwrap().guest_written);
        for &g in &read {
            let p = map.page(g).unwrap();
            assert_eq!(p.state, PageState::Zero, "gfn {g}");
            assert_eq!(p.first_touch, Some(0));
            assert_eq!(p.last_write, None);
        }
        assert_eq!(map.page(50).unwrap().state, PageState::Untouched);
        assert_eq!(map.page(50).unwrap().first_touch, None);
        assert_eq!(map.page(1024), None);
        let s = map.summary();
        assert_eq!(s.backed, 6);
        assert_eq!(s.zero, 3);
        assert_eq!(s.untouched, 1024 - 9);
        assert_eq!(s.guest_written, 5);
        assert_eq!(s.vmm_written, 1);
        assert_eq!(s.backed, ram.resident() - s.zero);
        assert_eq!(map.backed_in(0..1024), 6);
        assert_eq!(map.backed_in(0..3), 3);
        assert_eq!(map.backed_in(3..100), 0);
        assert_eq!(map.backed_in(100..5000), 3);
        let (hi, lo) = (900, 10);
        assert_eq!(map.backed_in(hi..lo), 0);

        // Interval 1: a read page gets written, more reads.
        ram.write(10, 1);
        ram.read(700);
        let mut d = dirty_of(1024, &written);
        d[0] |= 1 << 10;
        let st = map.harvest(&d, &[], 1).unwrap();
        assert_eq!(st.guest_writes, 1, "only gfn 10 is a new write");
        assert_eq!(st.newly_touched, 1, "gfn 700");
        assert!(matches!(map.page(10).unwrap().state, PageState::Backed(_)));
        assert_eq!(map.page(10).unwrap().first_touch, Some(0));
        assert_eq!(map.page(10).unwrap().last_write, Some(1));
        assert_eq!(map.page(700).unwrap().state, PageState::Zero);
        assert_eq!(map.page(700).unwrap().first_touch, Some(1));
        let s = map.summary();
        assert_eq!((s.backed, s.zero), (7, 3));
        assert_eq!(s.backed, ram.resident() - s.zero);
        assert_eq!(s.intervals, 2);
    }

    #[test]
    fn note_cleared_then_rewrite_keeps_first_touch() {
        let ram = Ram::new(256);
        let mut map = PmpMmpMap::new(ram.host(), ram.pages).unwrap();
        ram.write(5, 1);
        ram.write(70, 1);
        let d = dirty_of(256, &[5, 70]);
        map.harvest(&d, &[], 0).unwrap();
        // The bits stay set in KVM: no new write in interval 1.
        let st = map.harvest(&d, &[], 1).unwrap();
        assert_eq!(st.guest_writes, 0);
        assert_eq!(st.lookups, 0);
        assert_eq!(map.page(5).unwrap().last_write, Some(0));
        // The sampler clears page 5's bit; the guest writes it again in interval 2.
        map.note_cleared(&dirty_of(256, &[5]));
        let st = map.harvest(&d, &[], 2).unwrap();
        assert_eq!(st.guest_writes, 1);
        assert_eq!(st.newly_touched, 0);
        let p5 = map.page(5).unwrap();
        assert_eq!(p5.first_touch, Some(0));
        assert_eq!(p5.last_write, Some(2));
        assert_eq!(map.page(70).unwrap().last_write, Some(0));
        // Cleared and not written again: still touched, still backed, no new write.
        map.note_cleared(&dirty_of(256, &[5, 70]));
        let st = map.harvest(&[0; 4], &[], 3).unwrap();
        assert_eq!(st.guest_writes, 0);
        assert!(matches!(map.page(70).unwrap().state, PageState::Backed(_)));
        assert_eq!(map.page(70).unwrap().first_touch, Some(0));
        assert_eq!(map.summary().guest_written, 2);
        // A bit that went clear without note_cleared is known clear from the log itself.
        let st = map.harvest(&dirty_of(256, &[70]), &[], 4).unwrap();
        assert_eq!(st.guest_writes, 1);
        assert_eq!(map.page(70).unwrap().last_write, Some(4));
    }

    per_method!(check_discarded: discarded_with_mincore, discarded_with_pagemap_scan);

    fn check_discarded(method: ResidencyMethod) {
        let ram = Ram::new(128);
        let mut map = map_with(&ram, method);
        for g in 0..4 {
            ram.write(g, 1);
        }
        ram.read(8);
        map.harvest(&dirty_of(128, &[0, 1, 2, 3]), &[], 0).unwrap();
        assert_eq!(map.summary().backed, 4);
        // The VMM drops pages 2 and 3 (balloon-style): the mincore pass notices.
        // SAFETY: discards two pages of our own mapping; nothing holds references into them.
        let r = unsafe {
            libc::madvise(
                ram.mem.as_ptr().add(2 * PAGE_SIZE as usize).cast(),
                2 * PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        map.harvest(&dirty_of(128, &[0, 1, 2, 3]), &[], 1).unwrap();
        let s = map.summary();
        assert_eq!((s.backed, s.discarded, s.zero), (2, 2, 1));
        assert_eq!(map.page(2).unwrap().state, PageState::Discarded);
        // Written again, it is backed again; first touch is kept.
        ram.write(3, 1);
        map.note_cleared(&dirty_of(128, &[3]));
        map.harvest(&dirty_of(128, &[0, 1, 2, 3]), &[], 2).unwrap();
        assert!(matches!(map.page(3).unwrap().state, PageState::Backed(_)));
        assert_eq!(map.page(3).unwrap().first_touch, Some(0));
        assert_eq!(map.page(3).unwrap().last_write, Some(2));
        let s = map.summary();
        assert_eq!((s.backed, s.discarded), (3, 1));
        assert_eq!(s.backed, ram.resident() - s.zero);
        // Refresh re-reads every touched page and agrees.
        let rs = map.refresh().unwrap();
        assert_eq!(rs.pages_read, 5);
        assert_eq!(rs.shared, 0);
        assert_eq!(map.summary(), s);
    }

    #[test]
    fn refresh_counts_pfn_duplicates_as_shared() {
        // Two guest pages mapping one frame: a MAP_SHARED memfd page mapped twice inside "guest
        // RAM" stands in for a KSM merge.
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"pmp-shared".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is ours.
        assert_eq!(unsafe { libc::ftruncate(fd, PAGE_SIZE as i64) }, 0);
        let ram = Ram::new(16);
        for g in [3u64, 9] {
            // SAFETY: MAP_FIXED over a page of our own mapping, which nothing references.
            let p = unsafe {
                libc::mmap(
                    ram.mem.as_ptr().add((g * PAGE_SIZE) as usize).cast(),
                    PAGE_SIZE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
        }
        // SAFETY: fd is ours and no longer needed (the mappings hold the file).
        unsafe { libc::close(fd) };
        ram.write(3, 9);
        assert_eq!(ram.read(9), 9, "both pages map the same frame");
        ram.write(0, 1);
        let mut map = PmpMmpMap::new(ram.host(), ram.pages).unwrap();
        map.harvest(&dirty_of(16, &[0, 3]), &[], 0).unwrap();
        assert_eq!(map.summary().shared, 0, "harvest does not look for sharing");
        let rs = map.refresh().unwrap();
        assert_eq!(rs.shared, 2);
        assert_eq!(
            rs.changed, 2,
            "page 9 (found by residency as backed) and page 3"
        );
        let s = map.summary();
        assert_eq!((s.shared, s.backed), (2, 1));
        assert_eq!(
            map.refresh().unwrap().changed,
            0,
            "a second refresh changes nothing"
        );
        let (PageState::Shared(a), PageState::Shared(b)) =
            (map.page(3).unwrap().state, map.page(9).unwrap().state)
        else {
            panic!("pages 3 and 9 should be shared");
        };
        assert_eq!(a, b);
        assert_ne!(a, 0);
        assert_eq!(map.backed_in(0..16), 1);
        // A harvest that re-looks at a shared page keeps it shared while its frame is the same.
        map.harvest(&dirty_of(16, &[0, 3]), &dirty_of(16, &[3]), 1)
            .unwrap();
        assert_eq!(map.page(3).unwrap().state, PageState::Shared(a));
    }

    #[test]
    fn hidden_pfns_count_present_pages_as_backed() {
        let ram = Ram::new(64);
        ram.write(1, 1);
        ram.read(2);
        let pm = Pagemap::open_without_pfns().unwrap();
        let mut map = PmpMmpMap::with_pagemap(ram.host(), 64, MapOptions::default(), pm).unwrap();
        map.harvest(&dirty_of(64, &[1]), &[], 0).unwrap();
        let s = map.summary();
        assert!(!s.pfn_visible);
        assert_eq!((s.backed, s.zero), (2, 0));
        assert_eq!(map.page(1).unwrap().state, PageState::Backed(0));
        map.refresh().unwrap();
        assert_eq!(map.summary().shared, 0);
    }

    /// A real guest: writes one page, reads another, through KVM with the manual-protect dirty
    /// log; the VMM wrote the code page itself.
    #[test]
    fn kvm_guest_write_read_and_vmm_write() {
        use crate::kvm_ext::test_support::{kvm_or_skip, run_to_hlt};
        use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        let Some(kvm) = kvm_or_skip("kvm_guest_write_read_and_vmm_write") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        crate::kvm_ext::enable_manual_dirty_log_protect(&vm).unwrap();
        let pages = 64u64;
        let ram = Ram::new(pages);
        // mov byte [0x3000], 1 ; mov al, [0x5000] ; hlt   (real mode)
        let code = [0xc6u8, 0x06, 0x00, 0x30, 0x01, 0xa0, 0x00, 0x50, 0xf4];
        for (i, &b) in code.iter().enumerate() {
            ram.mem.write_volatile(i, b);
        }
        // SAFETY: the mapping outlives the VM (dropped at the end of the test, before `ram`).
        unsafe { crate::kvm_ext::set_user_memory(&vm, 0, KVM_MEM_LOG_DIRTY_PAGES, &ram.mem) }
            .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_to_hlt(&mut vcpu);
        let mut map = PmpMmpMap::new(ram.host(), pages).unwrap();
        let dirty = vm.get_dirty_log(0, (pages * PAGE_SIZE) as usize).unwrap();
        map.harvest(&dirty, &dirty_of(pages, &[0]), 0).unwrap();
        let p3 = map.page(3).unwrap();
        assert!(
            matches!(p3.state, PageState::Backed(pfn) if pfn != 0),
            "{p3:?}"
        );
        assert!(p3.guest_written && !p3.vmm_written);
        let p5 = map.page(5).unwrap();
        assert_eq!(p5.state, PageState::Zero, "a guest read maps the zero page");
        assert!(!p5.guest_written);
        let p0 = map.page(0).unwrap();
        assert!(matches!(p0.state, PageState::Backed(_)));
        assert!(p0.vmm_written && !p0.guest_written);
        let s = map.summary();
        assert_eq!(
            (s.backed, s.zero, s.guest_written, s.vmm_written),
            (2, 1, 1, 1)
        );
        assert_eq!(s.backed, ram.resident() - s.zero);
        drop(vcpu);
        drop(vm);
    }

    #[test]
    fn residency_every_k_delays_read_only_pages() {
        let ram = Ram::new(64);
        let opts = MapOptions {
            residency_every: 3,
            ..Default::default()
        };
        let mut map = PmpMmpMap::with_options(ram.host(), 64, opts).unwrap();
        assert!(map.harvest(&[], &[], 0).unwrap().residency_ran);
        ram.read(4);
        assert!(!map.harvest(&[], &[], 1).unwrap().residency_ran);
        assert_eq!(map.page(4).unwrap().state, PageState::Untouched);
        assert!(!map.harvest(&[], &[], 2).unwrap().residency_ran);
        assert!(map.harvest(&[], &[], 3).unwrap().residency_ran);
        assert_eq!(map.page(4).unwrap().state, PageState::Zero);
        assert_eq!(map.page(4).unwrap().first_touch, Some(3));
    }

    per_method!(check_sparse_64_gib: sparse_64_gib_with_mincore, sparse_64_gib_with_pagemap_scan);

    fn check_sparse_64_gib(method: ResidencyMethod) {
        let pages = 64u64 << 18; // 64 GiB
        let ram = Ram::new(pages);
        let written = [0u64, 1 << 20, pages / 2 + 5, pages - 1];
        for &g in &written {
            ram.write(g, 3);
        }
        ram.read(12345);
        let mut map = map_with(&ram, method);
        let st = map.harvest(&dirty_of(pages, &written), &[], 0).unwrap();
        assert_eq!(st.newly_touched, 5);
        assert_eq!(st.lookups, 5);
        let s = map.summary();
        assert_eq!((s.backed, s.zero, s.untouched), (4, 1, pages - 5));
        assert_eq!(map.page(pages - 1).unwrap().first_touch, Some(0));
        // 6 dense bitmaps of 2 MiB, the 256 KiB chunk table, 4 chunks, scratch.
        let over = map.overhead_bytes();
        assert!(over < 16 << 20, "overhead {over}");
        assert!(over >= 6 * (2 << 20));
        let st = map.harvest(&dirty_of(pages, &written), &[], 1).unwrap();
        assert_eq!((st.lookups, st.newly_touched), (0, 0));
        // A read at the very end of the range shows up in the next pass.
        ram.read(pages - 2);
        let st = map.harvest(&dirty_of(pages, &written), &[], 2).unwrap();
        assert_eq!((st.lookups, st.newly_touched), (1, 1));
        assert_eq!(map.page(pages - 2).unwrap().state, PageState::Zero);
        assert_eq!(map.summary().zero, 2);
    }

    #[test]
    fn round_trip_and_bad_files() {
        let ram = Ram::new(300);
        for g in [0u64, 7, 299] {
            ram.write(g, 1);
        }
        ram.read(64);
        ram.write(200, 1);
        let mut map = PmpMmpMap::new(ram.host(), 300).unwrap();
        map.harvest(&dirty_of(300, &[0, 7, 299]), &dirty_of(300, &[200]), 0)
            .unwrap();
        map.harvest(&dirty_of(300, &[0, 7, 299]), &[], 1).unwrap();
        let mut buf = Vec::new();
        map.write(&mut buf).unwrap();
        assert_eq!(buf.len(), HEADER_SIZE + 5 * RECORD_SIZE);
        let f = MapFile::read(&buf[..]).unwrap();
        assert_eq!(f.summary(), map.summary());
        assert_eq!(f.records.len(), 5);
        for r in &f.records {
            assert_eq!(Some(*r), map.page(r.gfn));
        }
        assert_eq!(f.page(1), map.page(1));
        assert_eq!(f.page(300), None);

        // Through a file.
        let dir = std::env::temp_dir().join(format!("memvisor-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.map");
        map.write_file(&path).unwrap();
        assert_eq!(MapFile::read_file(&path).unwrap(), f);
        assert!(matches!(
            MapFile::read_file(dir.join("missing.map")),
            Err(MapError::Read { path: Some(_), .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();

        // Bad inputs.
        assert!(matches!(
            MapFile::read(&buf[..10]),
            Err(MapError::TruncatedHeader { got: 10 })
        ));
        assert!(matches!(
            MapFile::read(&[][..]),
            Err(MapError::TruncatedHeader { got: 0 })
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::BadMagic { .. })
        ));
        let mut bad = buf.clone();
        bad[8] = 2;
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            MapFile::read(&buf[..buf.len() - 1]),
            Err(MapError::TruncatedRecords {
                expected: 5,
                got: 4
            })
        ));
        let mut bad = buf.clone();
        bad.push(0);
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::TrailingData { expected: 5 })
        ));
        let mut bad = buf.clone();
        bad[32] = 4; // record count 4, 5 records follow
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::TrailingData { .. })
        ));
        let mut bad = buf.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::BadHeader(_))
        ));
        let mut bad = buf.clone();
        bad[32..40].copy_from_slice(&300u64.to_le_bytes()); // plausible but truncated
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::TruncatedRecords { expected: 300, .. })
        ));
        let mut bad = buf.clone();
        bad[HEADER_SIZE + 24] = 9; // state
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::BadRecord { index: 0, .. })
        ));
        let mut bad = buf.clone();
        bad[HEADER_SIZE + RECORD_SIZE..HEADER_SIZE + RECORD_SIZE + 8]
            .copy_from_slice(&0u64.to_le_bytes()); // gfn repeats
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::BadRecord { index: 1, .. })
        ));
        let mut bad = buf.clone();
        bad[HEADER_SIZE + 16] = 7; // first touch beyond the interval count
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::BadRecord { index: 0, .. })
        ));
        let mut bad = buf.clone();
        bad[12] = 3; // page size
        assert!(matches!(
            MapFile::read(&bad[..]),
            Err(MapError::BadHeader(_))
        ));
        let text = MapError::TruncatedRecords {
            expected: 5,
            got: 4,
        }
        .to_string();
        assert!(text.contains("truncated records"));
    }

    #[test]
    fn bad_construction_and_interval() {
        assert!(matches!(
            PmpMmpMap::new(4097, 1),
            Err(MapError::UnalignedHost(4097))
        ));
        assert!(matches!(
            PmpMmpMap::new(4096, 0),
            Err(MapError::BadSize { .. })
        ));
        assert!(matches!(
            PmpMmpMap::new(4096, u64::MAX / 2),
            Err(MapError::BadSize { .. })
        ));
        let ram = Ram::new(8);
        let mut map = PmpMmpMap::new(ram.host(), 8).unwrap();
        assert!(matches!(
            map.harvest(&[], &[], u32::MAX),
            Err(MapError::BadInterval(_))
        ));
        // Over-long and garbage-tailed bitmaps are clipped to the RAM.
        ram.write(7, 1);
        let st = map.harvest(&[u64::MAX << 7, 5, 6], &[], 0).unwrap();
        assert_eq!(st.guest_writes, 1);
        // A map over unmapped memory: mincore fails with an error, PAGEMAP_SCAN finds nothing.
        // (Mappings are placed top-down and nothing asks for the page at 4096.)
        let addr = 4096;
        let opts = MapOptions {
            residency: ResidencyMethod::Mincore,
            ..Default::default()
        };
        let mut map = PmpMmpMap::with_options(addr, 4, opts).unwrap();
        assert!(matches!(
            map.harvest(&[], &[], 0),
            Err(MapError::Residency { .. })
        ));
        let mut map = PmpMmpMap::new(addr, 4).unwrap();
        assert_eq!(map.harvest(&[], &[], 0).unwrap().newly_touched, 0);
        assert_eq!(map.summary().untouched, 4);
    }

    #[test]
    fn packing_and_ranges() {
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
        let mut b = Bitmap::new(1000);
        for i in [1u64, 2, 50, 200, 201, 999] {
            b.set(i);
        }
        assert_eq!(
            gap_ranges(&b, 64, 1 << 20),
            vec![1..51, 200..202, 999..1000]
        );
        assert_eq!(gap_ranges(&b, 1000, 100), vec![1..51, 200..202, 999..1000]);
        assert_eq!(gap_ranges(&b, 1000, 1000), vec![1..1000]);
        assert_eq!(
            gap_ranges(&b, 10, 1000),
            vec![1..3, 50..51, 200..202, 999..1000]
        );
        let mut long = Bitmap::new(300);
        long.set_range(0..250);
        assert_eq!(gap_ranges(&long, 64, 100), vec![0..100, 100..200, 200..250]);
        assert_eq!(ones_in(&b, 2..201).collect::<Vec<_>>(), vec![2, 50, 200]);
    }
}
