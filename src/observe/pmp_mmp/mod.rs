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
//! * `Swapped`: in the host kernel's swap (pagemap bit 62).
//! * `VmmSwapped`: in the VMM's own swap file (hypervisor swap, `--swap`;
//!   [`PmpMmpMap::note_vmm_swapped`]); a later access brings it back, and the residency pass or a
//!   write finds it `Backed` again.
//! * `Discarded`: touched before, now neither present nor in swap (the VMM dropped it, e.g.
//!   `MADV_DONTNEED`); costs nothing.
//! * `Released`: given back to the host by the balloon (inflated, or reported free) with
//!   `MADV_DONTNEED` and not touched since ([`PmpMmpMap::note_released`]); costs nothing. A later
//!   write makes it `Backed` again (the VMM clears the pages' dirty bits when it releases them, so
//!   the write shows in the dirty log), a later read `Zero` (the residency pass sees it).
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
//! resident since the last pass, by `mincore` or `PAGEMAP_SCAN` (see the `residency` module for
//! their costs; [`ResidencyMethod::Auto`] picks one per pass). Only pages newly written, newly
//! resident or newly gone get a `/proc/self/pagemap` lookup. [`PmpMmpMap::refresh`] re-reads the
//! pagemap of every touched page (finds KSM sharing, swap-out, compaction moves) and counts PFN
//! duplicates for `Shared`.
//!
//! Limits, by design: "touched" means seen written or seen resident, so the neighbours that a
//! transparent huge page backs along with a written page count as touched (and backed) too; a
//! frame that changes under a page without a write or a residency change (KSM merge, compaction,
//! khugepaged) is seen only by `refresh`; a harvest that re-reads a `Shared` page keeps it
//! `Shared` while its PFN is unchanged, but sharing that ends is noticed only by `refresh`.
//!
//! # When PFNs are hidden
//!
//! Without `CAP_SYS_ADMIN` the pagemap reads every PFN as zero (Linux 4.2+), so a present page
//! cannot be told apart as the shared zero page or a machine page of its own by its frame. The
//! map then classifies present pages by what is still visible, their writes: guest RAM is private
//! anonymous memory, which gets a machine page of its own only when written (a read maps the
//! shared zero page), and every write reaches the map, the guest's through KVM's dirty log
//! (enabled from the slot's creation) and the VMM's through its own bitmap. So a present page
//! that neither wrote since it was last released is counted `Zero`, a written one `Backed(0)`: a
//! release (`MADV_DONTNEED`) frees the page's machine page, so a page written, released and then
//! only read maps the zero page again, and the map keeps a bit per page for "written since its
//! last release" apart from the "ever written" flags it reports. Caveat: with transparent
//! huge pages (`--hugepages`) a read may be given a huge page of its own, and a write backs the
//! whole 2 MiB around it, so never-written pages can be backed; such pages are counted `Zero`
//! here, and host usage is under-reported by them. Sharing (`Shared`) cannot be seen at all.
//! [`MapSummary::pfn_visible`] says which way a map was made.
//!
//! # Layout
//!
//! This module is the map itself (bitmap pass, pagemap lookups, refresh, summary); `record`
//! holds the per-page records, `residency` the residency pass, `file` the map file format.
//!
//! Storage is three dense 1-bit-per-page sets plus four more for bookkeeping (known dirty bits,
//! last residency, written since the last release, a scratch set of pages to look up): 7 bits per
//! guest page, 14 MiB for a 64 GiB guest. Per-page records (PFN and state, first-touch and last-write intervals: 16 bytes) live in
//! chunks of 512 pages (2 MiB of guest RAM, 8 KiB of records) allocated on the first touch of a
//! page in the chunk.

pub mod file;
mod record;
mod residency;
mod windows;

use std::fmt;
use std::ops::Range;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

pub use file::{MapFile, MapFileError, MapHeader, check_target};
pub use record::{PageInfo, PageState};
pub use residency::ResidencyMethod;
pub use windows::{MIN_SKIP_WORDS, ScanStats};

use crate::memory::bitmap::{
    AndNotRanks, Bitmap, Counted, Ranks, SPARSE_BLOCK_WORDS, WORD_BITS, Window, words_for,
};
use crate::memory::pagemap::{
    PageCounts, PageEntry, PageRegion, Pagemap, PagemapError, READ_CHUNK_ENTRIES, Residency,
};
use crate::units::PAGE_SIZE;
use record::{
    NO_WRITE, Record, Records, ST_BACKED, ST_DISCARDED, ST_RELEASED, ST_SHARED, ST_SWAPPED,
    ST_VMM_SWAPPED, ST_ZERO,
};

/// Pages of gap a pagemap read reads through rather than starting a new `pread`.
const LOOKUP_GAP_PAGES: u64 = 64;

/// Pages per block of the map's record of where the VMM mapped untouched pages to the zero page.
const ZERO_BLOCK_PAGES: u64 = SPARSE_BLOCK_WORDS as u64 * WORD_BITS;

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
    /// Pages the balloon gave back to the host, untouched since.
    pub released: u64,
    /// Pages in the VMM's swap file (hypervisor swap), not in the host kernel's swap (`swapped`).
    pub vmm_swapped: u64,
    /// Pages ever written by the guest.
    pub guest_written: u64,
    /// Pages ever written by the VMM.
    pub vmm_written: u64,
    /// Bytes per page (4096 for a live map; a map file's header says).
    pub page_size: u64,
    /// Whether PFNs were visible. Without them no page is Shared, and present pages are Zero
    /// when never written, Backed when written (see the module docs).
    pub pfn_visible: bool,
    /// Last harvested interval + 1.
    pub intervals: u32,
}

impl fmt::Display for MapSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |p: u64| p as f64 * self.page_size as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "guest pages   {:>12} ({:.1} MiB), {} intervals{}",
            self.pages,
            mib(self.pages),
            self.intervals,
            if self.pfn_visible {
                ""
            } else {
                ", PFNs hidden: never-written pages count as zero, written ones as backed, \
                 sharing unseen"
            }
        )?;
        for (name, n) in [
            ("untouched", self.untouched),
            ("zero", self.zero),
            ("backed", self.backed),
            ("shared", self.shared),
            ("swapped", self.swapped),
            ("discarded", self.discarded),
            ("released", self.released),
            ("vmm-swapped", self.vmm_swapped),
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
    /// Pages the guest wrote for the first time.
    pub newly_written: u64,
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

/// Page sharing as the last [`PmpMmpMap::refresh`] found it, exact from PFNs.
///
/// The rule: a machine page that m guest pages map (of this VM and of any other, counted by
/// `/proc/kpagecount`) saves m − 1 machine pages, and each of the m guest pages is charged
/// (m − 1)/m of that saving, so the savings of all VMs add up to the host's. Pages on the shared
/// zero page (never written, or merged into it by KSM's `use_zero_pages`) are `zero`, never
/// shared: they have no machine page, so they save nothing here and cost nothing in `backed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sharing {
    /// Guest pages whose machine page other guest pages map too (esxtop's SHRD).
    pub shared: u64,
    /// This VM's part of the machine pages saved, in pages (esxtop's SHRDSVD).
    pub saved: f64,
    /// Distinct machine pages behind the shared pages.
    pub frames: u64,
    /// Whether sharers were counted across the host (`/proc/kpagecount`); without it (no
    /// `CAP_SYS_ADMIN`) only this VM's own pages are counted, and sharing with other VMs is missed.
    pub across_host: bool,
}

/// Tuning of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Run the residency pass on every n-th harvest (the first harvest always runs it; 0 = never
    /// again after the first). Pages only read by the guest are found by it, so with n > 1 their
    /// first-touch interval may be up to n - 1 intervals late.
    pub residency_every: u32,
    /// How to find resident pages (the whole-RAM harvest only).
    pub residency: ResidencyMethod,
    /// Harvest over the populated windows only (`windows` module; the default where the kernel
    /// has `PAGEMAP_SCAN`), or, when false, by passes over all of guest RAM (kept to check the
    /// windowed one against).
    pub windowed: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            residency_every: 1,
            residency: ResidencyMethod::Auto,
            windowed: true,
        }
    }
}

/// The PMP-MMP map of one guest RAM region.
#[derive(Debug)]
pub struct PmpMmpMap {
    host_addr: usize,
    pages: u64,
    options: MapOptions,
    pagemap: Pagemap,
    touched: Counted,
    guest_written: Counted,
    vmm_written: Counted,
    /// Pages written (by the guest or the VMM) since the balloon last released them: with PFNs
    /// hidden, a present page has a machine page of its own exactly when set.
    written_since_release: Bitmap,
    /// Bits known set in KVM's dirty log.
    known_dirty: Bitmap,
    /// Pages present (resident) at the last look.
    resident: Bitmap,
    /// Blocks of [`ZERO_BLOCK_PAGES`] pages where the VMM mapped untouched pages to the zero page
    /// ([`PmpMmpMap::note_zero_mapped`]): the only places an untouched page can be resident.
    zero_blocks: Bitmap,
    /// Scratch: pages to look up in this harvest.
    pending: Bitmap,
    records: Records,
    interval_count: u32,
    harvests: u64,
    /// The residency method: `Auto` only when the kernel has `PAGEMAP_SCAN`.
    method: ResidencyMethod,
    mincore_buf: Vec<u8>,
    scan_buf: Vec<PageRegion>,
    entry_buf: Vec<u64>,
    /// `/proc/kpagecount`, when readable: sharers across the host.
    counts: Option<PageCounts>,
    sharing: Sharing,
    /// The windowed harvest's state (`windows` module).
    windows: windows::State,
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
        // Sharers across the host need kpagecount, which is readable where PFNs are.
        let counts = if pagemap.pfn_visible() {
            PageCounts::open()
                .inspect_err(|e| log::debug!("pmp-mmp: {e}; sharing counted within this VM"))
                .ok()
        } else {
            None
        };
        Ok(PmpMmpMap {
            host_addr,
            pages: guest_pages,
            options,
            pagemap,
            touched: Counted::new(guest_pages),
            guest_written: Counted::new(guest_pages),
            vmm_written: Counted::new(guest_pages),
            written_since_release: Bitmap::new(guest_pages),
            known_dirty: Bitmap::new(guest_pages),
            resident: Bitmap::new(guest_pages),
            zero_blocks: Bitmap::new(guest_pages.div_ceil(ZERO_BLOCK_PAGES)),
            pending: Bitmap::new(guest_pages),
            records: Records::new(guest_pages),
            interval_count: 0,
            harvests: 0,
            method,
            mincore_buf: Vec::new(),
            scan_buf: Vec::new(),
            entry_buf: Vec::new(),
            counts,
            sharing: Sharing::default(),
            windows: windows::State::default(),
        })
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages ever seen touched (written, or resident after a read).
    pub fn touched(&self) -> &Bitmap {
        self.touched.bitmap()
    }

    /// The rank index of [`PmpMmpMap::touched`], from the map's counts (O(pages / 4096)).
    pub fn touched_ranks(&self) -> Ranks {
        self.touched.ranks()
    }

    /// Pages ever seen written by the guest.
    pub fn guest_written(&self) -> &Bitmap {
        self.guest_written.bitmap()
    }

    /// Pages ever seen written by the guest: counted as they are, not recounted.
    pub fn guest_written_pages(&self) -> u64 {
        self.guest_written.count_ones()
    }

    /// The rank index of [`PmpMmpMap::guest_written`], from the map's counts.
    pub fn guest_written_ranks(&self) -> Ranks {
        self.guest_written.ranks()
    }

    /// Whether the map believes `gfn`'s bit is set in KVM's dirty log.
    pub fn known_dirty(&self, gfn: u64) -> bool {
        gfn < self.pages && self.known_dirty.get(gfn)
    }

    /// The residency method in use (`Auto` only when the kernel has `PAGEMAP_SCAN`).
    pub fn residency_method(&self) -> ResidencyMethod {
        self.method
    }

    /// Whether PFNs are visible to this process.
    pub fn pfn_visible(&self) -> bool {
        self.pagemap.pfn_visible()
    }

    /// Marks `gfn` touched in `interval` (its record starts in the untouched state).
    fn touch(&mut self, gfn: u64, interval: u32) {
        self.touched.set(gfn);
        self.records.reset(gfn, Record::touched_in(interval));
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
        if self.windowed() {
            return self.harvest_windowed(guest_dirty, vmm_dirty, interval);
        }
        let mut stats = HarvestStats::default();
        let t0 = Instant::now();
        self.bitmap_pass(guest_dirty, vmm_dirty, interval, &mut stats);
        let t1 = Instant::now();
        stats.bitmap_ms = ms(t1 - t0);

        let every = u64::from(self.options.residency_every);
        if self.harvests == 0 || (every > 0 && self.harvests.is_multiple_of(every)) {
            stats.residency_method = Some(self.residency_pass()?);
            stats.residency_ran = true;
        }
        let t2 = Instant::now();
        stats.residency_ms = ms(t2 - t1);

        let (lookups, newly) = self.lookup_pending(interval, None)?;
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
        for w in 0..words_for(self.pages) {
            self.bitmap_word(w, guest_dirty, vmm_dirty, interval, stats);
        }
    }

    /// The bitmap pass for word `w`.
    fn bitmap_word(
        &mut self,
        w: usize,
        guest_dirty: &[u64],
        vmm_dirty: &[u64],
        interval: u32,
        stats: &mut HarvestStats,
    ) {
        let valid = self.touched.bitmap().word_mask(w);
        let g = guest_dirty.get(w).map_or(0, |x| x & valid);
        let v = vmm_dirty.get(w).map_or(0, |x| x & valid);
        if g == 0 && v == 0 && self.known_dirty.words()[w] == 0 {
            return;
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
            return;
        }
        let was_touched = self.touched.word(w);
        self.touched.or_word(w, written);
        stats.newly_written += u64::from(self.guest_written.or_word(w, new_g).count_ones());
        self.vmm_written.or_word(w, v);
        self.written_since_release.words_mut()[w] |= written;
        // A write to a page resident and Backed (a machine page of its own, not shared) changes
        // nothing the pagemap would say: only the others are looked up. (A frame the kernel
        // moved under such a page is found by `refresh`, as for unwritten pages.)
        let mut lookup = written;
        let mut stay = written & was_touched & self.resident.words()[w];
        while stay != 0 {
            let b = stay.trailing_zeros();
            stay &= stay - 1;
            let gfn = w as u64 * WORD_BITS + u64::from(b);
            if self
                .records
                .get(gfn)
                .is_some_and(|r| r.state_code() == ST_BACKED)
            {
                lookup &= !(1 << b);
            }
        }
        self.pending.words_mut()[w] |= lookup;
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
            self.records.get_mut(gfn).last_write = interval;
        }
    }

    /// Looks up every pending page (found among `ranges` of pages, or by a pass over the
    /// whole bitmap when `None`), then clears them; returns (lookups, newly touched).
    fn lookup_pending(
        &mut self,
        interval: u32,
        ranges: Option<Vec<Range<u64>>>,
    ) -> Result<(u64, u64), MapError> {
        let pending = std::mem::take(&mut self.pending);
        let ranges = ranges
            .unwrap_or_else(|| pending.gap_ranges(LOOKUP_GAP_PAGES, READ_CHUNK_ENTRIES as u64));
        let mut lookups = 0u64;
        let mut newly = 0u64;
        let result = self.for_each_entry(&pending, &ranges, "harvest", |map, gfn, e| {
            lookups += 1;
            newly += u64::from(map.apply_entry(gfn, e, Some(interval)));
        });
        self.pending = pending;
        for r in &ranges {
            self.pending.clear_range(r.clone());
        }
        result.map(|()| (lookups, newly))
    }

    /// Reads the pagemap entries of the pages set in `pages` within `ranges` (ascending, see
    /// [`Bitmap::gap_ranges`]), one read per range, and calls `f` with each of those pages and
    /// its entry, in ascending order. A failed read ends the walk with [`MapError::Lookup`] for
    /// `step`.
    fn for_each_entry(
        &mut self,
        pages: &Bitmap,
        ranges: &[Range<u64>],
        step: &'static str,
        mut f: impl FnMut(&mut Self, u64, PageEntry),
    ) -> Result<(), MapError> {
        for r in ranges {
            self.read_entries(r.clone())
                .map_err(|source| MapError::Lookup { step, source })?;
            let entries = std::mem::take(&mut self.entry_buf);
            for gfn in pages.ones_in(r.clone()) {
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
            .records
            .get(gfn)
            .map_or(PageState::Untouched, Record::state);
        self.set_residency(gfn, res, |pfn| match old {
            PageState::Shared(p) if p == pfn && pfn != 0 => old,
            _ => PageState::Backed(pfn),
        });
        newly
    }

    /// Sets the state and the residency bit of touched page `gfn` from `res`; `frame` gives the
    /// state of a page a machine page backs, from its PFN (0 when hidden).
    ///
    /// With PFNs hidden, a present page that neither the guest nor the VMM wrote since it was
    /// last released (or ever) is taken for the shared zero page (see "When PFNs are hidden" in
    /// the module docs).
    fn set_residency(&mut self, gfn: u64, res: Residency, frame: impl FnOnce(u64) -> PageState) {
        let code = self.records.get(gfn).map(|r| r.state_code());
        let state = match res {
            Residency::Absent if code == Some(ST_RELEASED) => PageState::Released,
            Residency::Absent if code == Some(ST_VMM_SWAPPED) => PageState::VmmSwapped,
            Residency::Absent => PageState::Discarded,
            Residency::Swapped => PageState::Swapped,
            Residency::Zero => PageState::Zero,
            Residency::Frame(None) if !self.written_since_release.get(gfn) => PageState::Zero,
            Residency::Frame(pfn) => frame(pfn.unwrap_or(0)),
        };
        if matches!(res, Residency::Zero | Residency::Frame(_)) {
            self.resident.set(gfn);
        } else {
            self.resident.clear(gfn);
        }
        self.records.set_state(gfn, state);
    }

    /// The VM released guest pages `pages` (`MADV_DONTNEED`) during interval `interval`;
    /// `guest_dirty` is KVM's dirty log over them, read just before the VM cleared their bits
    /// (tell [`PmpMmpMap::note_cleared_in`] too). The cost is the range's. Pages written since the last harvest are recorded as
    /// touched and written in `interval` first, so nothing the guest wrote is lost; then every
    /// touched page in the range becomes `Released` and not resident, so a later write (a new
    /// dirty bit) or read (the residency pass) is seen afresh, and none counts as written since
    /// its release (a later read maps the zero page). Untouched pages stay untouched (and
    /// not resident, if the VMM had mapped them to the zero page).
    pub fn note_released(&mut self, pages: Range<u64>, guest_dirty: &Window, interval: u32) {
        let end = pages.end.min(self.pages);
        let interval = interval.min(NO_WRITE - 1);
        if pages.start < end {
            self.windows.released.push(pages.start..end);
        }
        for gfn in pages.start..end {
            let (w, bit) = ((gfn / WORD_BITS) as usize, 1u64 << (gfn % WORD_BITS));
            let dirty = guest_dirty.get(gfn);
            if dirty && self.known_dirty.words()[w] & bit == 0 {
                if !self.touched.get(gfn) {
                    self.touch(gfn, interval);
                }
                self.guest_written.set(gfn);
                self.records.get_mut(gfn).last_write = interval;
            }
            if self.touched.get(gfn) {
                self.records.set_state(gfn, PageState::Released);
                self.written_since_release.clear(gfn);
            }
            // An untouched page the VMM had mapped to the zero page is no longer resident
            // either: a later read of it is seen afresh.
            self.resident.clear(gfn);
        }
    }

    /// The VMM mapped guest pages `pages` to the shared zero page without touching them (the
    /// fault handler does so for the never-touched pages of a region before registering it, so
    /// that their first touch does not fault to it). Untouched ones among them stay untouched:
    /// they are taken as resident already, so the residency pass does not count them as read. A
    /// write gives one a machine page, which the dirty log shows; a guest read of one shows
    /// nowhere, so the access sampler draws these pages too ([`PmpMmpMap::zero_mapped_ranks`]).
    /// Tell the map before the next harvest.
    pub fn note_zero_mapped(&mut self, pages: Range<u64>) {
        for gfn in pages.start..pages.end.min(self.pages) {
            if !self.touched.get(gfn) {
                self.resident.set(gfn);
                self.zero_blocks.set(gfn / ZERO_BLOCK_PAGES);
            }
        }
    }

    /// The rank index of the pages [`PmpMmpMap::vmm_zero_mapped`] counts: a guest read of one
    /// shows nowhere, so the access sampler draws them too. The cost is the blocks that hold
    /// such pages (512 pages each), not the RAM.
    pub fn zero_mapped_ranks(&mut self) -> AndNotRanks {
        let (ranks, empty) = AndNotRanks::new(
            &self.resident,
            self.touched.bitmap(),
            self.zero_blocks.iter_ones(),
        );
        for b in empty {
            self.zero_blocks.clear(b);
        }
        ranks
    }

    /// The `r`-th page of [`PmpMmpMap::zero_mapped_ranks`] (`ranks`, built since the last change
    /// to the map).
    pub fn select_zero_mapped(&self, ranks: &AndNotRanks, r: u64) -> Option<u64> {
        ranks.select(&self.resident, self.touched.bitmap(), r)
    }

    /// Untouched pages the VMM mapped to the zero page ([`PmpMmpMap::note_zero_mapped`]) and
    /// that no harvest has seen touched since: resident to `mincore`, in no state of the map.
    pub fn vmm_zero_mapped(&self) -> u64 {
        let blocks = self.zero_blocks.iter_ones();
        AndNotRanks::new(&self.resident, self.touched.bitmap(), blocks)
            .0
            .total()
    }

    /// The VMM swapped guest pages `pages` out (hypervisor swap) just after releasing them
    /// through the VM ([`PmpMmpMap::note_released`] first): each touched one becomes
    /// `VmmSwapped` while it is absent. `true` beside a page: it had contents other than zero,
    /// so when it comes back it has a machine page of its own (with PFNs hidden, it counts as
    /// written since its release).
    pub fn note_vmm_swapped(&mut self, pages: &[(u64, bool)]) {
        for &(gfn, contents) in pages {
            if gfn >= self.pages || !self.touched.get(gfn) {
                continue;
            }
            self.records.set_state(gfn, PageState::VmmSwapped);
            self.resident.clear(gfn);
            if contents {
                self.written_since_release.set(gfn);
            }
        }
    }

    /// Touched pages in state Backed with the last interval they were seen accessed (their
    /// last write, else their first touch), ascending by page: hypervisor swap's candidates.
    pub fn backed_pages(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.touched.bitmap().iter_ones().filter_map(|gfn| {
            let r = self.records.get(gfn)?;
            (r.state_code() == ST_BACKED).then(|| {
                let seen = if r.last_write == NO_WRITE {
                    r.first_touch
                } else {
                    r.last_write.max(r.first_touch)
                };
                (gfn, seen)
            })
        })
    }

    /// The sampler cleared the bits of `mask` (bit i = page i) in KVM's dirty log: a later set
    /// bit there is a new write. Touched and first-touch records are kept.
    pub fn note_cleared(&mut self, mask: &[u64]) {
        self.known_dirty.and_not_assign(mask);
    }

    /// The sampler cleared the dirty bits of guest pages `pages` in KVM's log: a later set bit
    /// there is a new write. [`PmpMmpMap::note_cleared`] at the pages' cost.
    pub fn note_cleared_pages(&mut self, pages: &[u64]) {
        for &p in pages {
            self.known_dirty.clear(p);
        }
    }

    /// The VM cleared the dirty bits of guest pages `pages` in KVM's log: a later set bit there is
    /// a new write. [`PmpMmpMap::note_cleared`] for one range, at the range's cost.
    pub fn note_cleared_in(&mut self, pages: Range<u64>) {
        self.known_dirty.clear_range(pages);
    }

    /// Re-reads the pagemap of every touched page (finds swap-out, KSM merging, moved frames) and
    /// marks as Shared every PFN that more than one guest page maps (the zero page excluded).
    pub fn refresh(&mut self) -> Result<RefreshStats, MapError> {
        let t0 = Instant::now();
        let mut stats = RefreshStats::default();
        let touched = std::mem::take(&mut self.touched);
        // (PFN, gfn, old record word) of present pages not mapped exclusively: the only ones
        // that can be shared (a frame two guest pages map has a map count of at least 2).
        let mut candidates: Vec<(u64, u64, Option<Record>)> = Vec::new();
        let ranges = touched
            .bitmap()
            .gap_ranges(LOOKUP_GAP_PAGES, READ_CHUNK_ENTRIES as u64);
        let result = self.for_each_entry(touched.bitmap(), &ranges, "refresh", |map, gfn, e| {
            stats.pages_read += 1;
            let old = map.records.get(gfn);
            let res = map.pagemap.classify(e);
            let mut candidate = false;
            map.set_residency(gfn, res, |pfn| {
                if pfn != 0 && !e.exclusive() {
                    candidates.push((pfn, gfn, old));
                    candidate = true;
                }
                PageState::Backed(pfn)
            });
            if !candidate && old != map.records.get(gfn) {
                stats.changed += 1;
            }
        });
        self.touched = touched;
        result?;
        candidates.sort_unstable_by_key(|&(pfn, gfn, _)| (pfn, gfn));
        // Each distinct frame's mappings across the host (this VM's count without kpagecount).
        let mut frames: Vec<u64> = candidates.iter().map(|c| c.0).collect();
        frames.dedup();
        let host_counts = match self.counts.as_mut().map(|c| c.counts(&frames)) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                log::warn!("pmp-mmp refresh: {e}; sharing is counted within this VM only");
                self.counts = None;
                None
            }
            None => None,
        };
        let mut sharing = Sharing {
            across_host: host_counts.is_some(),
            ..Sharing::default()
        };
        let mut i = 0;
        let mut frame = 0;
        while i < candidates.len() {
            let pfn = candidates[i].0;
            let mut j = i + 1;
            while j < candidates.len() && candidates[j].0 == pfn {
                j += 1;
            }
            let here = (j - i) as u64;
            // Sharers: at least this VM's own (kpagecount is read a moment later than the
            // pagemap; ksmd may have moved in between).
            let m = host_counts.as_ref().map_or(here, |c| c[frame].max(here));
            frame += 1;
            if m > 1 {
                sharing.shared += here;
                sharing.frames += 1;
                sharing.saved += here as f64 * (m - 1) as f64 / m as f64;
            }
            for &(_, gfn, old) in &candidates[i..j] {
                if m > 1 {
                    self.records.set_state(gfn, PageState::Shared(pfn));
                    stats.shared += 1;
                }
                if old != self.records.get(gfn) {
                    stats.changed += 1;
                }
            }
            i = j;
        }
        self.sharing = sharing;
        stats.ms = ms(t0.elapsed());
        log::debug!("pmp-mmp refresh: {stats:?}");
        Ok(stats)
    }

    /// Sharing as the last [`PmpMmpMap::refresh`] found it.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// Page counts.
    pub fn summary(&self) -> MapSummary {
        let r = &self.records;
        MapSummary {
            pages: self.pages,
            untouched: self.pages.saturating_sub(r.touched()),
            zero: r.count(ST_ZERO),
            backed: r.count(ST_BACKED),
            swapped: r.count(ST_SWAPPED),
            shared: r.count(ST_SHARED),
            discarded: r.count(ST_DISCARDED),
            released: r.count(ST_RELEASED),
            vmm_swapped: r.count(ST_VMM_SWAPPED),
            guest_written: self.guest_written.count_ones(),
            vmm_written: self.vmm_written.count_ones(),
            page_size: PAGE_SIZE,
            pfn_visible: self.pagemap.pfn_visible(),
            intervals: self.interval_count,
        }
    }

    /// Backed pages (state Backed, not Shared) among guest pages `range` (clipped to the RAM).
    pub fn backed_in(&self, range: Range<u64>) -> u64 {
        self.records
            .count_in(ST_BACKED, range.start..range.end.min(self.pages))
    }

    /// What the map knows about page `gfn`; `None` past the end of guest RAM.
    pub fn page(&self, gfn: u64) -> Option<PageInfo> {
        if gfn >= self.pages {
            return None;
        }
        if !self.touched.get(gfn) {
            return Some(PageInfo::untouched(gfn));
        }
        let r = self.records.get(gfn).unwrap_or_default();
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
        let counted = [&self.touched, &self.guest_written, &self.vmm_written]
            .iter()
            .map(|b| b.heap_bytes())
            .sum::<usize>();
        let bitmaps = [
            &self.written_since_release,
            &self.known_dirty,
            &self.resident,
            &self.pending,
        ]
        .iter()
        .map(|b| b.heap_bytes())
        .sum::<usize>();
        counted
            + bitmaps
            + self.records.heap_bytes()
            + self.mincore_buf.capacity()
            + self.scan_buf.capacity() * std::mem::size_of::<PageRegion>()
            + self.entry_buf.capacity() * std::mem::size_of::<u64>()
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::pagemap::AnonMapping;

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
    pub(super) struct Ram {
        mem: AnonMapping,
        pages: u64,
    }

    impl Ram {
        pub(super) fn new(pages: u64) -> Ram {
            let mem = AnonMapping::new((pages * PAGE_SIZE) as usize)
                .unwrap_or_else(|e| panic!("mmap of {pages} pages: {e}"));
            Ram { mem, pages }
        }
        pub(super) fn host(&self) -> usize {
            self.mem.addr()
        }
        pub(super) fn write(&self, gfn: u64, val: u8) {
            assert!(gfn < self.pages);
            self.mem.write_volatile((gfn * PAGE_SIZE) as usize, val);
        }
        pub(super) fn read(&self, gfn: u64) -> u8 {
            assert!(gfn < self.pages);
            self.mem.read_volatile((gfn * PAGE_SIZE) as usize)
        }
        /// Discards pages `r` (`MADV_DONTNEED`), as a release does.
        pub(super) fn discard(&self, r: Range<u64>) {
            assert!(r.start <= r.end && r.end <= self.pages);
            // SAFETY: pages of our own mapping, which no Rust reference covers.
            let rc = unsafe {
                libc::madvise(
                    (self.host() + (r.start * PAGE_SIZE) as usize) as *mut libc::c_void,
                    ((r.end - r.start) * PAGE_SIZE) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(rc, 0);
        }
        fn resident(&self) -> u64 {
            let mut v = vec![0u8; self.pages as usize];
            crate::memory::pagemap::mincore(self.host(), (self.pages * PAGE_SIZE) as usize, &mut v)
                .unwrap();
            v.iter().filter(|b| *b & 1 != 0).count() as u64
        }
    }

    pub(super) fn dirty_of(pages: u64, gfns: &[u64]) -> Vec<u64> {
        let mut b = Bitmap::new(pages);
        for &g in gfns {
            b.set(g);
        }
        b.words().to_vec()
    }

    fn map_with(ram: &Ram, method: ResidencyMethod) -> PmpMmpMap {
        let opts = MapOptions {
            residency: method,
            windowed: false,
            ..Default::default()
        };
        let map = PmpMmpMap::with_options(ram.host(), ram.pages, opts).unwrap();
        assert_eq!(map.residency_method(), method);
        map
    }

    #[test]
    fn auto_scans_sparse_ram_and_mincores_dense_ram() {
        let ram = Ram::new(200);
        let whole = MapOptions {
            windowed: false,
            ..Default::default()
        };
        let mut map = PmpMmpMap::with_options(ram.host(), 200, whole).unwrap();
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
        ram.discard(2..4);
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

    per_method!(check_released: released_with_mincore, released_with_pagemap_scan);

    /// The balloon's release: pages become Released (not Discarded), stay so through harvests and
    /// refreshes, and a write (a new dirty bit, the VMM having cleared the old ones) or a read
    /// (the residency pass) brings them back as Backed or Zero.
    fn check_released(method: ResidencyMethod) {
        let ram = Ram::new(128);
        let mut map = map_with(&ram, method);
        for g in 0..8 {
            ram.write(g, 1);
        }
        let all = dirty_of(128, &[0, 1, 2, 3, 4, 5, 6, 7]);
        map.harvest(&all, &[], 0).unwrap();
        // Page 9 is written after the harvest: the release records it before releasing it.
        ram.write(9, 1);
        for (first, n) in [(2u64, 4u64), (9, 1)] {
            ram.discard(first..first + n);
        }
        let log = dirty_of(128, &[0, 1, 2, 3, 4, 5, 6, 7, 9]);
        let log = Window::new(0, log);
        map.note_released(2..6, &log, 1);
        map.note_released(9..10, &log, 1);
        map.note_released(100..200, &log, 1); // untouched and past the end: nothing
        map.note_cleared_in(2..6);
        map.note_cleared_in(9..10);
        let s = map.summary();
        assert_eq!((s.backed, s.released, s.discarded), (4, 5, 0));
        assert_eq!(map.page(100).unwrap().state, PageState::Untouched);
        let p9 = map.page(9).unwrap();
        assert_eq!(p9.state, PageState::Released);
        assert_eq!((p9.first_touch, p9.last_write), (Some(1), Some(1)));
        assert!(p9.guest_written);
        // Pages 2..6 were written before the harvest: their records are kept.
        assert_eq!(map.page(3).unwrap().last_write, Some(0));
        // The dirty log without the cleared bits: nothing new, the residency pass agrees.
        let after = dirty_of(128, &[0, 1, 6, 7]);
        map.harvest(&after, &[], 1).unwrap();
        assert_eq!(map.summary().released, 5);
        assert_eq!(map.page(3).unwrap().state, PageState::Released);
        assert_eq!(
            map.refresh().unwrap().changed,
            0,
            "refresh keeps them released"
        );
        // Page 2 is written again, page 3 read.
        ram.write(2, 9);
        assert_eq!(ram.read(3), 0, "released pages read back zero");
        map.harvest(&dirty_of(128, &[0, 1, 2, 6, 7]), &[], 2)
            .unwrap();
        assert!(matches!(map.page(2).unwrap().state, PageState::Backed(_)));
        assert_eq!(map.page(2).unwrap().last_write, Some(2));
        assert_eq!(map.page(2).unwrap().first_touch, Some(0));
        assert_eq!(map.page(3).unwrap().state, PageState::Zero);
        let s = map.summary();
        assert_eq!((s.backed, s.zero, s.released), (5, 1, 3));
        assert_eq!(s.backed, ram.resident() - s.zero);
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
    fn hidden_pfns_classify_unwritten_present_pages_as_zero() {
        let ram = Ram::new(64);
        ram.write(1, 1); // guest write
        ram.read(2); // guest read only
        ram.write(3, 1); // VMM write
        ram.read(4); // read now, written by the guest later
        let pm = Pagemap::open_without_pfns().unwrap();
        let mut map = PmpMmpMap::with_pagemap(ram.host(), 64, MapOptions::default(), pm).unwrap();
        map.harvest(&dirty_of(64, &[1]), &dirty_of(64, &[3]), 0)
            .unwrap();
        let s = map.summary();
        assert!(!s.pfn_visible);
        assert_eq!((s.backed, s.zero), (2, 2));
        assert_eq!(map.page(1).unwrap().state, PageState::Backed(0));
        assert_eq!(map.page(2).unwrap().state, PageState::Zero);
        assert_eq!(map.page(3).unwrap().state, PageState::Backed(0));
        assert_eq!(map.page(4).unwrap().state, PageState::Zero);
        // The same pages through a reader that sees PFNs: the inference agrees.
        let mut seen = PmpMmpMap::new(ram.host(), 64).unwrap();
        seen.harvest(&dirty_of(64, &[1]), &dirty_of(64, &[3]), 0)
            .unwrap();
        let v = seen.summary();
        assert!(v.pfn_visible);
        assert_eq!((v.backed, v.zero), (s.backed, s.zero));
        // The read page gets written: backed from then on.
        ram.write(4, 1);
        map.harvest(&dirty_of(64, &[1, 4]), &[], 1).unwrap();
        assert_eq!(map.page(4).unwrap().state, PageState::Backed(0));
        assert_eq!(map.page(4).unwrap().first_touch, Some(0));
        let s = map.summary();
        assert_eq!((s.backed, s.zero), (3, 1));
        // Refresh re-reads every page with the same inference and finds no sharing.
        let rs = map.refresh().unwrap();
        assert_eq!((rs.pages_read, rs.changed, rs.shared), (4, 0, 0));
        assert_eq!(map.summary(), s);
    }

    /// Issue: without PFNs, pages written, released by the balloon and then only read were still
    /// counted backed (their old written bit), though the release freed their machine pages.
    #[test]
    fn hidden_pfns_released_then_read_pages_are_zero() {
        let ram = Ram::new(64);
        for g in 0..8 {
            ram.write(g, 1);
        }
        let pm = Pagemap::open_without_pfns().unwrap();
        let mut hidden =
            PmpMmpMap::with_pagemap(ram.host(), 64, MapOptions::default(), pm).unwrap();
        let mut seen = PmpMmpMap::new(ram.host(), 64).unwrap();
        let all = dirty_of(64, &[0, 1, 2, 3, 4, 5, 6, 7]);
        for m in [&mut hidden, &mut seen] {
            m.harvest(&all, &[], 0).unwrap();
            assert_eq!(m.summary().backed, 8);
        }
        // The balloon releases pages 2..6 (the VMM clears their dirty bits); the guest reads 3
        // and 4 and writes 5 again.
        ram.discard(2..6);
        assert_eq!(ram.read(3) + ram.read(4), 0);
        ram.write(5, 2);
        let after = dirty_of(64, &[0, 1, 5, 6, 7]);
        for m in [&mut hidden, &mut seen] {
            m.note_released(2..6, &Window::new(0, all.clone()), 1);
            m.note_cleared_in(2..6);
            m.harvest(&after, &[], 1).unwrap();
        }
        assert_eq!(hidden.page(3).unwrap().state, PageState::Zero);
        assert_eq!(hidden.page(4).unwrap().state, PageState::Zero);
        assert_eq!(hidden.page(5).unwrap().state, PageState::Backed(0));
        assert_eq!(hidden.page(2).unwrap().state, PageState::Released);
        // Still reported as ever written by the guest.
        assert!(hidden.page(3).unwrap().guest_written);
        let (h, v) = (hidden.summary(), seen.summary());
        assert_eq!((h.backed, h.zero, h.released), (5, 2, 1));
        assert_eq!(
            (v.backed, v.zero, v.released),
            (h.backed, h.zero, h.released)
        );
        assert_eq!(h.backed, ram.resident() - h.zero);
        // A refresh re-reads them with the same inference.
        hidden.refresh().unwrap();
        assert_eq!(hidden.summary(), h);
    }

    /// A real guest: writes one page, reads another, through KVM with the manual-protect dirty
    /// log; the VMM wrote the code page itself.
    #[test]
    fn kvm_guest_write_read_and_vmm_write() {
        use crate::kvm::ioctls::test_support::{kvm_or_skip, run_to_hlt};
        use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        let Some(kvm) = kvm_or_skip("kvm_guest_write_read_and_vmm_write") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        crate::kvm::ioctls::enable_manual_dirty_log_protect(&vm).unwrap();
        let pages = 64u64;
        let ram = Ram::new(pages);
        // mov byte [0x3000], 1 ; mov al, [0x5000] ; hlt   (real mode)
        let code = [0xc6u8, 0x06, 0x00, 0x30, 0x01, 0xa0, 0x00, 0x50, 0xf4];
        for (i, &b) in code.iter().enumerate() {
            ram.mem.write_volatile(i, b);
        }
        // SAFETY: the mapping outlives the VM (dropped at the end of the test, before `ram`).
        unsafe { crate::kvm::ioctls::set_user_memory(&vm, 0, KVM_MEM_LOG_DIRTY_PAGES, &ram.mem) }
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

    per_method!(check_zero_mapped: zero_mapped_with_mincore, zero_mapped_with_pagemap_scan);

    /// Pages the VMM mapped to the zero page stay untouched; a write to one is a first touch.
    fn check_zero_mapped(method: ResidencyMethod) {
        let ram = Ram::new(128);
        let mut map = map_with(&ram, method);
        ram.write(0, 1);
        map.harvest(&dirty_of(128, &[0]), &[], 0).unwrap();
        // The VMM maps pages 1..64 to the zero page (as a read would) and says so.
        for g in 1..64 {
            assert_eq!(ram.read(g), 0);
        }
        map.note_zero_mapped(0..64);
        let st = map.harvest(&dirty_of(128, &[0]), &[], 1).unwrap();
        assert_eq!(st.newly_touched, 0, "{st:?}");
        let s = map.summary();
        assert_eq!((s.backed, s.zero, s.untouched), (1, 0, 127));
        assert_eq!(map.vmm_zero_mapped(), 63, "resident, in no state");
        assert_eq!(map.page(5).unwrap().state, PageState::Untouched);
        // A write to one is seen (the dirty log), a read of another page still is.
        ram.write(5, 2);
        ram.read(100);
        let st = map.harvest(&dirty_of(128, &[0, 5]), &[], 2).unwrap();
        assert_eq!(st.newly_touched, 2, "{st:?}");
        assert_eq!(map.page(5).unwrap().first_touch, Some(2));
        let s = map.summary();
        assert_eq!((s.backed, s.zero, s.untouched), (2, 1, 125));
        assert_eq!(map.vmm_zero_mapped(), 62, "page 5 is backed now");
        // Released, an untouched zero-mapped page is no longer resident.
        map.note_released(10..12, &Window::default(), 3);
        assert_eq!(map.vmm_zero_mapped(), 60);
        // The access sampler's index of them: every one, by rank, and nothing else.
        let ranks = map.zero_mapped_ranks();
        assert_eq!(ranks.total(), 60);
        let drawn: Vec<u64> = (0..60)
            .map(|r| map.select_zero_mapped(&ranks, r).unwrap())
            .collect();
        let want: Vec<u64> = (1..64).filter(|&g| g != 5 && g != 10 && g != 11).collect();
        assert_eq!(drawn, want);
    }

    #[test]
    fn residency_every_k_delays_read_only_pages() {
        let ram = Ram::new(64);
        let opts = MapOptions {
            residency_every: 3,
            windowed: false,
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
        // 7 dense bitmaps of 2 MiB, the 256 KiB chunk table, 4 chunks, scratch.
        let over = map.overhead_bytes();
        assert!(over < 18 << 20, "overhead {over}");
        assert!(over >= 7 * (2 << 20));
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
            windowed: false,
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

    /// The summary from the map's counters, against a recount of every page.
    fn assert_summary_is_a_recount(map: &PmpMmpMap) {
        let s = map.summary();
        let mut counts = [0u64; 8];
        let (mut gw, mut vw) = (0, 0);
        for g in 0..map.pages() {
            let p = map.page(g).unwrap();
            counts[p.state.code() as usize] += 1;
            gw += u64::from(p.guest_written);
            vw += u64::from(p.vmm_written);
        }
        let recount = MapSummary {
            untouched: map.pages() - map.touched().count_ones(),
            zero: counts[ST_ZERO as usize],
            backed: counts[ST_BACKED as usize],
            swapped: counts[ST_SWAPPED as usize],
            shared: counts[ST_SHARED as usize],
            discarded: counts[ST_DISCARDED as usize],
            released: counts[ST_RELEASED as usize],
            vmm_swapped: counts[ST_VMM_SWAPPED as usize],
            guest_written: gw,
            vmm_written: vw,
            ..s.clone()
        };
        assert_eq!(s, recount);
        assert_eq!(map.guest_written_pages(), map.guest_written().count_ones());
        assert_eq!(
            map.touched_ranks().total(),
            map.touched().count_ones(),
            "the touched pages' ranks"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(24))]
        /// Whatever the guest and the VMM write, read and release, the map's counters are what
        /// a recount of its pages finds.
        #[test]
        fn summary_counters_equal_a_recount(
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..4, 0u64..600), 0..40), 1..6),
        ) {
            const PAGES: u64 = 600;
            let ram = Ram::new(PAGES);
            let mut map = PmpMmpMap::new(ram.host(), PAGES).unwrap();
            let mut log = Bitmap::new(PAGES);
            for (i, ops) in steps.into_iter().enumerate() {
                let mut vmm = Bitmap::new(PAGES);
                for (op, g) in ops {
                    match op {
                        0 => {
                            ram.write(g, 1);
                            log.set(g);
                        }
                        1 => {
                            ram.read(g);
                        }
                        2 => {
                            ram.write(g, 2);
                            vmm.set(g);
                        }
                        _ => {
                            let r = g..(g + 7).min(PAGES);
                            let window = Window::of(log.words(), r.clone());
                            log.clear_range(r.clone());
                            ram.discard(r.clone());
                            map.note_released(r.clone(), &window, i as u32);
                            map.note_cleared_in(r);
                        }
                    }
                }
                map.harvest(log.words(), vmm.words(), i as u32).unwrap();
                assert_summary_is_a_recount(&map);
            }
            map.refresh().unwrap();
            assert_summary_is_a_recount(&map);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(32))]
        /// The windowed harvest and the whole-RAM passes give the same map and the same first
        /// touches and first writes, interval by interval, whatever the guest and the VMM write,
        /// read, release, swap out and clear. Long runs read or written make wholly present
        /// words, which the windowed scan skips in the next harvests until a release meets them.
        #[test]
        fn windowed_and_whole_ram_harvests_agree(
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..8, 0u64..3000), 0..60), 1..7),
        ) {
            const PAGES: u64 = 3000;
            let ram = Ram::new(PAGES);
            let whole = MapOptions {
                residency: ResidencyMethod::PagemapScan,
                windowed: false,
                ..Default::default()
            };
            let mut old = PmpMmpMap::with_options(ram.host(), PAGES, whole).unwrap();
            let mut new = PmpMmpMap::new(ram.host(), PAGES).unwrap();
            let mut log = Bitmap::new(PAGES);
            for (i, ops) in steps.into_iter().enumerate() {
                let mut vmm = Bitmap::new(PAGES);
                for (op, g) in ops {
                    match op {
                        0 => {
                            ram.write(g, 1);
                            log.set(g);
                        }
                        1 => {
                            ram.read(g);
                        }
                        2 => {
                            ram.write(g, 2);
                            vmm.set(g);
                        }
                        3 => {
                            // The sampler clears a dirty bit (write-protects the page again).
                            log.clear(g);
                            old.note_cleared_in(g..g + 1);
                            new.note_cleared_in(g..g + 1);
                        }
                        5 => {
                            for p in g..(g + 1100).min(PAGES) {
                                ram.read(p);
                            }
                        }
                        6 => {
                            for p in g..(g + 1100).min(PAGES) {
                                ram.write(p, 3);
                                log.set(p);
                            }
                        }
                        _ => {
                            // A release (op 4), or a swap-out (op 7: released, then swapped).
                            let r = g..(g + 70).min(PAGES);
                            let window = Window::of(log.words(), r.clone());
                            log.clear_range(r.clone());
                            ram.discard(r.clone());
                            let swapped: Vec<(u64, bool)> =
                                r.clone().step_by(3).map(|p| (p, p % 2 == 0)).collect();
                            for m in [&mut old, &mut new] {
                                m.note_released(r.clone(), &window, i as u32);
                                m.note_cleared_in(r.clone());
                                if op == 7 {
                                    m.note_vmm_swapped(&swapped);
                                }
                            }
                        }
                    }
                }
                harvest_both(&mut old, &mut new, &log, &vmm, i as u32);
            }
        }
    }

    /// Harvests `old` (whole-RAM passes) and `new` (windowed) in interval `i`, KVM's dirty log
    /// reading `log` and the VMM having written `vmm`, and asserts that they agree: first
    /// touches, first writes, every page's record, the summary. The windowed map's dirty logs are
    /// right in its windows only: garbage elsewhere.
    fn harvest_both(old: &mut PmpMmpMap, new: &mut PmpMmpMap, log: &Bitmap, vmm: &Bitmap, i: u32) {
        let windows: Vec<_> = new.windows().unwrap().expect("windowed").to_vec();
        let mut partial = vec![u64::MAX; log.words().len()];
        for w in windows.iter().flat_map(Clone::clone) {
            partial[w] = log.words()[w];
        }
        let mut vmm_partial = partial.clone();
        for w in windows.iter().flat_map(Clone::clone) {
            vmm_partial[w] = vmm.words()[w];
        }
        let a = old.harvest(log.words(), vmm.words(), i).unwrap();
        let b = new.harvest(&partial, &vmm_partial, i).unwrap();
        assert_eq!(
            (
                a.newly_touched,
                a.newly_written,
                a.guest_writes,
                a.vmm_writes
            ),
            (
                b.newly_touched,
                b.newly_written,
                b.guest_writes,
                b.vmm_writes
            ),
            "interval {i}"
        );
        for g in 0..old.pages() {
            assert_eq!(old.page(g), new.page(g), "page {g} interval {i}");
        }
        assert_eq!(old.summary(), new.summary(), "interval {i}");
    }

    /// The windowed scan skips the words wholly present at the last scan, and stays exact when
    /// the access sampler moves pages of them out and back (a real `UFFDIO_MOVE`), and when a
    /// release or a swap-out meets them (those words are scanned again).
    #[test]
    fn skipped_words_stay_exact_across_move_out_release_and_swap() {
        use crate::memory::GuestMemory;
        use crate::memory::faults::Sampled;
        use crate::memory::ram::GuestRam;

        let mem = GuestMemory::new(GuestRam::new(8 << 20, false).unwrap());
        let ram = mem.ram();
        let pages = ram.pages();
        let whole = MapOptions {
            residency: ResidencyMethod::PagemapScan,
            windowed: false,
            ..Default::default()
        };
        let Ok(mut old) = PmpMmpMap::with_options(ram.host_addr(), pages, whole) else {
            eprintln!("SKIPPED: no PAGEMAP_SCAN");
            return;
        };
        let mut new = PmpMmpMap::new(ram.host_addr(), pages).unwrap();
        let (mut log, none) = (Bitmap::new(pages), Bitmap::new(pages));
        let read = |g: u64| ram.read_obj::<u8>(g * PAGE_SIZE).unwrap();
        // Pages 0..1600 written: words 0..25 wholly present.
        for g in 0..1600 {
            ram.write(g * PAGE_SIZE, &[g as u8 | 1]).unwrap();
            log.set(g);
        }
        harvest_both(&mut old, &mut new, &log, &none, 0);
        assert_eq!(new.last_scan().skipped_pages, 0, "nothing known yet");
        harvest_both(&mut old, &mut new, &log, &none, 1);
        let skips = !new.last_scan().kernel_swap;
        if skips {
            assert_eq!(new.last_scan().skipped_pages, 1600);
            assert_eq!(new.last_scan().ioctls, 1, "the rest, 1600..2048");
        }

        // The access sampler moves pages 100 and 700 out; the guest reads 700 (the handler moves
        // it back), the round's end moves 100 back. Both words stay skipped, and exact.
        match mem.start_faults(4) {
            Ok(f) => {
                assert!(matches!(f.sample(100, 0).unwrap(), Sampled::Armed { .. }));
                assert!(matches!(f.sample(700, 1).unwrap(), Sampled::Armed { .. }));
                assert_eq!(read(700), (700u64 as u8) | 1);
                assert_eq!(f.end_samples().unwrap().len(), 2);
                for r in f.take_zero_mapped() {
                    old.note_zero_mapped(r.clone());
                    new.note_zero_mapped(r);
                }
                harvest_both(&mut old, &mut new, &log, &none, 2);
                if skips {
                    assert_eq!(new.last_scan().skipped_pages, 1600);
                }
            }
            Err(e) => eprintln!("SKIPPED (move-out part): {e}"),
        }

        // A release in word 2 (pages 128..192): words 0..3 are scanned again (fewer than
        // MIN_SKIP_WORDS skippable before it), 3..25 still skipped.
        assert_eq!(MIN_SKIP_WORDS, 4);
        let release =
            |old: &mut PmpMmpMap, new: &mut PmpMmpMap, log: &mut Bitmap, r: Range<u64>| {
                let window = Window::of(log.words(), r.clone());
                log.clear_range(r.clone());
                mem.discard(r.clone()).unwrap();
                for m in [old, new] {
                    m.note_released(r.clone(), &window, 3);
                    m.note_cleared_in(r.clone());
                }
            };
        release(&mut old, &mut new, &mut log, 130..140);
        harvest_both(&mut old, &mut new, &log, &none, 3);
        if skips {
            assert_eq!(new.last_scan().skipped_pages, 22 * 64);
        }
        // Word 2 is not wholly present any more: the next scan looks at 0..3 again.
        harvest_both(&mut old, &mut new, &log, &none, 4);
        if skips {
            assert_eq!(new.last_scan().skipped_pages, 22 * 64);
        }

        // A swap-out in word 22 (released, then swapped): scanned again, and exact.
        release(&mut old, &mut new, &mut log, 1450..1453);
        let swapped = [(1450, true), (1451, false), (1452, true)];
        old.note_vmm_swapped(&swapped);
        new.note_vmm_swapped(&swapped);
        harvest_both(&mut old, &mut new, &log, &none, 5);
        if skips {
            // Words 3..22 skipped; 23..25 are too few to skip.
            assert_eq!(new.last_scan().skipped_pages, 19 * 64);
        }

        // Read back, words 2 and 22 are wholly present again: skipped from the harvest after.
        for g in (130..140).chain(1450..1453) {
            read(g);
        }
        harvest_both(&mut old, &mut new, &log, &none, 6);
        harvest_both(&mut old, &mut new, &log, &none, 7);
        if skips {
            assert_eq!(new.last_scan().skipped_pages, 1600);
        }
    }
}
