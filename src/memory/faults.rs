//! The VM's one userfaultfd and its fault handler. A range of memory can be registered with only
//! one descriptor, so guest memory owns it and every user of page faults goes through here: the
//! access sampler (pages moved out to a stash, brought back on their first access) and hypervisor
//! swap (pages written to the swap file and dropped, read back on their next access).
//!
//! Guest RAM is registered in MISSING mode by 2 MiB region, the first time a page of the region is
//! moved out, and stays registered: a present page never faults (unless write-protected, below), so a region costs nothing until a
//! page in it goes missing. Just before a region is registered, its never-touched pages (no page,
//! never released, not moved out) are mapped to the shared zero page (`MADV_POPULATE_READ`), so
//! that their first touch does not fault here either: a guest read is native, a write an ordinary
//! copy-on-write fault in the kernel. The pages so mapped are queued for the PMP-MMP map
//! ([`Faults::take_zero_mapped`]), which keeps them untouched (`docs/design.md` says why, with
//! the figures). One handler thread resolves every fault by what the page is:
//!
//! - a page moved out (`MovedOut`): its kind says what to do (a sampled page records its first
//!   access, read or write, and comes back from the stash as a copy; a swapped page is read from its slot of
//!   the swap file into a bounce page and copied into place with `UFFDIO_COPY`, or filled as zero
//!   when it read as zero at swap-out, and its slot is freed);
//! - any other missing page in a registered region (released since its last touch; a
//!   never-touched one only if mapping it to the zero page failed): filled as the kernel would
//!   have, with the zero page for a read and a zeroed page for a write, and counted
//!   ([`Faults::take_fills`]).
//!
//! Regions are registered in WP mode as well: a page put back into guest RAM with no access (a
//! sampled page nobody touched) is write-protected there (`protect_returned`), because KVM has
//! no mapping of it and would map it writable on the guest's next read, logging that read as a
//! write; protected, the read maps it read-only, and a write faults here once and is let through.
//!
//! A sampled page moves out (`UFFDIO_MOVE`, the same physical page, nothing copied) and, if
//! accessed, comes back as a copy (`UFFDIO_COPY` from the stash: cheaper than moving it back,
//! `docs/design.md` has the figures; the original is dropped when the round ends); a page nobody
//! touched moves back at the round's end. The handler never reads or writes guest memory itself:
//! it puts pages into it. Every operation here takes guest page numbers and checks them against
//! guest RAM, so no page outside guest RAM and the stash can move.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use thiserror::Error;
use vmm_sys_util::errno;

use crate::memory::bitmap::{Bitmap, gap_ranges_of};
use crate::memory::pagemap::{AnonMapping, PageEntry, Pagemap};
use crate::memory::ram::GuestRam;
use crate::memory::swap::{Slot, SwapFile, SwapFileError};
use crate::memory::uffd::{Fault, Uffd, UffdError};
use crate::units::PAGE_SIZE;

/// Guest pages per registered region (2 MiB).
pub const REGION_PAGES: u64 = 512;

/// Why page-fault handling could not start, or a page could not be moved.
#[derive(Debug, Error)]
pub enum FaultsError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("mapping the stash of {pages} pages for moved-out guest pages")]
    Stash {
        pages: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning the userfaultfd fault-handler thread")]
    Spawn(#[source] std::io::Error),
    #[error("guest page {gfn:#x} is outside guest RAM ({pages} pages)")]
    OutsideRam { gfn: u64, pages: u64 },
    #[error("stash slot {slot} is past the stash's {capacity} pages")]
    NoSlot { slot: u64, capacity: u64 },
    #[error("guest page {gfn:#x} is moved out already")]
    AlreadyOut { gfn: u64 },
    #[error(
        "write-protecting guest page {gfn:#x}, moved back untouched, failed ({source}): KVM would log its next read as a write"
    )]
    Protect {
        gfn: u64,
        #[source]
        source: errno::Error,
    },
    #[error(
        "moving sampled page {gfn:#x} back into guest RAM failed ({source}); its contents are in the stash"
    )]
    MoveBack {
        gfn: u64,
        #[source]
        source: errno::Error,
    },
}

/// What went wrong on the handler thread (kept until [`Faults::take_handler_error`]).
#[derive(Debug, Error)]
pub enum HandlerError {
    #[error("reading userfaultfd events")]
    Read(#[source] UffdError),
    #[error("a page fault at {addr:#x}, outside guest RAM (filled with zeros)")]
    OutsideRam { addr: u64 },
    #[error("resolving a {} fault on guest page {gfn:#x}", if *write { "write" } else { "read" })]
    Resolve {
        gfn: u64,
        write: bool,
        #[source]
        source: errno::Error,
    },
}

/// The first access to a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A guest page that is not in guest RAM now, by why: the kind decides how its fault resolves.
#[derive(Clone, Copy, Debug)]
enum MovedOut {
    /// Moved out for the access sampler to stash slot `slot` (`None`: it had no page, or it was
    /// released since): the first access is recorded and the page moves back (or is filled).
    Sampled {
        slot: Option<u64>,
        first: Option<Access>,
        /// It was the shared zero page when armed: an access moves it back, where a copy would
        /// give it a machine page the guest never wrote.
        shared: bool,
    },
    /// Swapped out by the VMM to slot `slot` of the swap file (`None`: it read as zero, and comes
    /// back as zero): the first access reads it back and frees the slot.
    Swapped { slot: Option<Slot> },
}

/// Swapped pages brought back since the last [`Faults::take_swap_ins`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SwapIns {
    /// The pages, in the order they came back, with the access that brought each.
    pub pages: Vec<(u64, Access)>,
    /// Each page-in's wait as the handler measured it (from reading the fault to the page in
    /// place), in microseconds, in the same order.
    pub wait_us: Vec<f64>,
}

/// What [`Faults::swap_store`] did with a page.
#[derive(Debug)]
pub enum Stored {
    /// The page reads as zero: nothing written, it comes back as zero.
    Zero,
    /// Written to this slot.
    Slot(Slot),
    /// The page is moved out already (a sampled page) or its region cannot be registered: left
    /// alone.
    Refused,
    /// The swap file cannot take it (full, a short write, an I/O error): the page stays in RAM.
    Full(SwapFileError),
}

/// What the owner and the handler thread share.
#[derive(Default)]
struct Table {
    /// Pages moved out, by guest page number.
    out: HashMap<u64, MovedOut>,
    /// The handler's first failure.
    error: Option<HandlerError>,
    /// The swap file, once hypervisor swap is on.
    swap: Option<SwapFile>,
    /// Pages swapped out now (`MovedOut::Swapped` entries).
    swapped: u64,
    /// Page-ins since the last take.
    swap_ins: SwapIns,
    /// The first failure to read a swapped page back (the guest cannot get its page).
    swap_error: Option<SwapFileError>,
    /// Called (on the handler thread) when a swapped page cannot be read back.
    on_swap_failure: Option<Box<dyn Fn() + Send>>,
    /// Missing pages not moved out that the handler filled since the last take (first touches
    /// that came through the handler).
    fills: u64,
}

/// Where things are: guest RAM, the stash and its zero page. Plain addresses, valid while the
/// [`Faults`] that holds them lives (it joins the handler thread before it goes).
#[derive(Clone, Copy, Debug)]
struct Layout {
    ram_addr: u64,
    pages: u64,
    stash_addr: u64,
    zeros: u64,
    /// A page of ours the handler reads a swapped page into before copying it into place.
    bounce: u64,
}

impl Layout {
    fn page_addr(&self, gfn: u64) -> u64 {
        self.ram_addr + gfn * PAGE_SIZE
    }

    fn slot_addr(&self, slot: u64) -> u64 {
        self.stash_addr + slot * PAGE_SIZE
    }

    /// The guest page at host address `addr`, if it is in guest RAM.
    fn gfn(&self, addr: u64) -> Option<u64> {
        let gfn = addr.checked_sub(self.ram_addr)? / PAGE_SIZE;
        (gfn < self.pages).then_some(gfn)
    }
}

/// A sampled page's outcome at the end of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleOutcome {
    pub gfn: u64,
    /// Its first access, if any.
    pub first: Option<Access>,
    /// It was the shared zero page when armed: it came back as the zero page, which KVM maps
    /// read-only, so a read of it cannot have set its dirty bit.
    pub zero: bool,
}

/// What moving a page out for sampling did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampled {
    /// The page is out (or had no page and is watched all the same); `new_region` is the 2 MiB
    /// region registered for it, if it was not registered before.
    Armed { new_region: Option<u64> },
    /// The page cannot be moved (pinned, KSM-shared, part of a huge page) or its region cannot
    /// be registered: it was left alone.
    Refused,
}

/// The VM's userfaultfd, its handler thread and the pages moved out.
pub struct Faults {
    uffd: Arc<Uffd>,
    table: Arc<Mutex<Table>>,
    /// Regions registered (one bit per 2 MiB of guest RAM).
    registered: Mutex<Bitmap>,
    /// Pages ever released ([`Faults::released`]; one bit per guest page): a missing page that is
    /// not one of these, nor moved out, was never touched.
    released_ever: Mutex<Bitmap>,
    /// Page ranges mapped to the zero page since the last [`Faults::take_zero_mapped`].
    zero_mapped: Mutex<Vec<Range<u64>>>,
    /// Tells missing pages from swapped and present ones in a region about to be registered
    /// (`None`: the pagemap cannot be read, and never-touched pages are left to the handler).
    pagemap: Option<Pagemap>,
    layout: Layout,
    /// The sample stash, then one zeroed page (the source for filling a written missing page),
    /// then the swap-in bounce page; held for its mapping, reached through `layout`.
    _stash: AnonMapping,
    capacity: u64,
    done: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-updated that matters more than carrying
    // on with what is there.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Faults {
    /// Opens the userfaultfd for guest RAM `ram` with a stash of `stash_pages` pages for sampled
    /// pages, and starts the handler thread.
    pub(super) fn start(ram: &GuestRam, stash_pages: u64) -> Result<Self, FaultsError> {
        let uffd = Arc::new(Uffd::new()?);
        let stash =
            AnonMapping::new(((stash_pages + 2) * PAGE_SIZE) as usize).map_err(|source| {
                FaultsError::Stash {
                    pages: stash_pages,
                    source,
                }
            })?;
        // A move's destination must be registered with the descriptor: the stash, once.
        if stash_pages > 0 {
            uffd.register(stash.addr() as u64, stash_pages * PAGE_SIZE)?;
        }
        let layout = Layout {
            ram_addr: ram.host_addr() as u64,
            pages: ram.pages(),
            stash_addr: stash.addr() as u64,
            zeros: stash.addr() as u64 + stash_pages * PAGE_SIZE,
            bounce: stash.addr() as u64 + (stash_pages + 1) * PAGE_SIZE,
        };
        let table = Arc::new(Mutex::new(Table::default()));
        let done = Arc::new(AtomicBool::new(false));
        let handler = {
            let (uffd, table, done) = (uffd.clone(), table.clone(), done.clone());
            std::thread::Builder::new()
                .name("memvisor-uffd".into())
                .spawn(move || handle_faults(&uffd, &table, &done, layout))
                .map_err(FaultsError::Spawn)?
        };
        let pagemap = Pagemap::open()
            .map_err(|e| {
                log::warn!(
                    "faults: the pagemap cannot be read ({e}): first touches in registered regions go through the fault handler"
                )
            })
            .ok();
        Ok(Faults {
            uffd,
            table,
            registered: Mutex::new(Bitmap::new(ram.pages().div_ceil(REGION_PAGES))),
            released_ever: Mutex::new(Bitmap::new(ram.pages())),
            zero_mapped: Mutex::new(Vec::new()),
            pagemap,
            layout,
            _stash: stash,
            capacity: stash_pages,
            done,
            handler: Some(handler),
        })
    }

    /// Pages the sample stash holds: the most pages one round can move out.
    pub fn stash_pages(&self) -> u64 {
        self.capacity
    }

    /// Registers the 2 MiB region of `gfn` unless it is already, after mapping its never-touched
    /// pages to the zero page; returns the region if it was registered now.
    fn ensure_registered(&self, gfn: u64) -> Result<Option<u64>, UffdError> {
        let region = gfn / REGION_PAGES;
        let mut registered = lock(&self.registered);
        if registered.get(region) {
            return Ok(None);
        }
        let first = region * REGION_PAGES;
        let end = (first + REGION_PAGES).min(self.layout.pages);
        // Before registering: once registered, populating a missing page would fault here.
        self.map_never_touched(first..end);
        self.uffd
            .register(self.layout.page_addr(first), (end - first) * PAGE_SIZE)?;
        registered.set(region);
        Ok(Some(region))
    }

    /// Maps the never-touched pages of `pages` (one region, not registered yet) to the shared zero
    /// page: each run of pages that have no page and are neither in swap, nor released since
    /// faults started, nor moved out, with one `MADV_POPULATE_READ`. A run that fails is left
    /// missing (its first touch then comes to the handler, as before). Call with the guest
    /// stopped.
    fn map_never_touched(&self, pages: Range<u64>) {
        let Some(pagemap) = &self.pagemap else {
            return;
        };
        let n = (pages.end - pages.start) as usize;
        let mut entries = [0u64; REGION_PAGES as usize];
        let base = self.layout.page_addr(pages.start) as usize;
        if let Err(e) = pagemap.read(base, n, &mut entries) {
            log::debug!("faults: pagemap of pages {pages:?}: {e}; left to the handler");
            return;
        }
        let runs: Vec<Range<u64>> = {
            let released = lock(&self.released_ever);
            let table = lock(&self.table);
            let never = |gfn: u64| {
                let e = PageEntry(entries[(gfn - pages.start) as usize]);
                !e.present() && !e.swapped() && !released.get(gfn) && !table.out.contains_key(&gfn)
            };
            gap_ranges_of(pages.clone().filter(|&g| never(g)), 0, u64::MAX)
        };
        let mut mapped = lock(&self.zero_mapped);
        for run in runs {
            match populate_read(self.layout.page_addr(run.start), run.end - run.start) {
                Ok(()) => mapped.push(run),
                Err(e) => log::debug!("faults: mapping pages {run:?} to the zero page: {e}"),
            }
        }
    }

    /// The page ranges mapped to the zero page since the last call (never touched, and untouched
    /// by the guest or the VMM when mapped; a write since gives the page a machine page of its
    /// own, which the dirty log or the VMM's bitmap shows).
    pub fn take_zero_mapped(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut lock(&self.zero_mapped))
    }

    /// Missing pages, not moved out, that the handler filled since the last call: first touches
    /// that went through the handler (pages released since their last touch; never-touched pages
    /// are mapped to the zero page when their region is registered, and do not come here).
    pub fn take_fills(&self) -> u64 {
        std::mem::take(&mut lock(&self.table).fills)
    }

    /// Moves guest page `gfn` out to stash slot `slot` for the access sampler: its next access,
    /// by the guest or the VMM, faults to the handler, which records it and moves the page back.
    /// Call with the guest stopped.
    pub fn sample(&self, gfn: u64, slot: u64) -> Result<Sampled, FaultsError> {
        if gfn >= self.layout.pages {
            return Err(FaultsError::OutsideRam {
                gfn,
                pages: self.layout.pages,
            });
        }
        if slot >= self.capacity {
            return Err(FaultsError::NoSlot {
                slot,
                capacity: self.capacity,
            });
        }
        match lock(&self.table).out.get(&gfn) {
            Some(MovedOut::Sampled { .. }) => return Err(FaultsError::AlreadyOut { gfn }),
            // Swapped out: it has no page to watch; its page-in is the swap's to count.
            Some(MovedOut::Swapped { .. }) => return Ok(Sampled::Refused),
            None => {}
        }
        let new_region = match self.ensure_registered(gfn) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("faults: the region of page {gfn:#x}: {e}; page left alone");
                return Ok(Sampled::Refused);
            }
        };
        let (addr, to) = (self.layout.page_addr(gfn), self.layout.slot_addr(slot));
        // The shared zero page (mapped by this process not only here) must come back as itself.
        let mut entry = [0u64; 1];
        let shared = self.pagemap.as_ref().is_some_and(|p| {
            p.read(addr as usize, 1, &mut entry).is_ok()
                && PageEntry(entry[0]).present()
                && !PageEntry(entry[0]).exclusive()
        });
        // The table stays locked from the move to the insert: a fault on this page still queued
        // from before (a vCPU the pause interrupted in one) must find it moved out, not fill the
        // hole with the zero page behind the sampler's back.
        let mut table = lock(&self.table);
        // SAFETY: `addr` is a page of guest RAM (checked above), which the VMM reaches only through
        // vm-memory's volatile copies, never a Rust reference, and which outlives `self` (the owner
        // drops `Faults` first); `to` is a slot of our own stash, which nothing else uses.
        let slot = match unsafe { self.uffd.move_page(to, addr, PAGE_SIZE, false) } {
            Ok(()) => Some(slot),
            // No page there (dropped since it was touched): a fault still shows an access.
            Err(e) if e.errno() == libc::ENOENT => None,
            Err(e) => {
                log::debug!("faults: page {gfn:#x} cannot move ({e}); left alone");
                return Ok(Sampled::Refused);
            }
        };
        table.out.insert(
            gfn,
            MovedOut::Sampled {
                slot,
                first: None,
                shared,
            },
        );
        Ok(Sampled::Armed { new_region })
    }

    /// Ends a sampling round: moves back every sampled page nobody touched and gives each sampled
    /// page's first access, ascending by page. Call with the guest stopped.
    pub fn end_samples(&self) -> Result<Vec<SampleOutcome>, FaultsError> {
        let mut table = lock(&self.table);
        let mut sampled: Vec<(u64, MovedOut)> = Vec::new();
        table.out.retain(|&gfn, m| match m {
            MovedOut::Sampled { .. } => {
                sampled.push((gfn, *m));
                false
            }
            MovedOut::Swapped { .. } => true,
        });
        drop(table);
        sampled.sort_unstable_by_key(|(gfn, _)| *gfn);
        let mut out = Vec::with_capacity(sampled.len());
        // The slots past the last one used hold nothing.
        let used = sampled
            .iter()
            .filter_map(|(_, m)| match m {
                MovedOut::Sampled { slot: Some(s), .. } => Some(s + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        for (gfn, m) in sampled {
            let MovedOut::Sampled {
                slot,
                first,
                shared,
            } = m
            else {
                continue;
            };
            if let (None, Some(s)) = (first, slot) {
                // SAFETY: as in `sample`: a page of guest RAM (it was in the table) and a slot of
                // our own stash.
                unsafe {
                    self.uffd.move_page(
                        self.layout.page_addr(gfn),
                        self.layout.slot_addr(s),
                        PAGE_SIZE,
                        false,
                    )
                }
                .map_err(|source| FaultsError::MoveBack { gfn, source })?;
                protect_returned(&self.uffd, &self.layout, gfn)
                    .map_err(|source| FaultsError::Protect { gfn, source })?;
            }
            out.push(SampleOutcome {
                gfn,
                first,
                zero: shared,
            });
        }
        // The pages accessed came back as copies: their originals are still in the stash.
        drop_stash(self.layout, 0..used);
        Ok(out)
    }

    /// The handler thread's first failure since the last call.
    pub fn take_handler_error(&self) -> Option<HandlerError> {
        lock(&self.table).error.take()
    }

    /// Guest pages `pages` were just discarded: a page moved out among them must not come back
    /// with its old contents. A sampled page not accessed yet loses its stash copy, so it stays
    /// missing and, if touched again, is filled as released memory reads: zero. The cost is one
    /// look at each page moved out, whatever the range's size.
    pub(super) fn released(&self, pages: &Range<u64>) {
        lock(&self.released_ever).set_range(pages.start..pages.end.min(self.layout.pages));
        let mut guard = lock(&self.table);
        let t = &mut *guard;
        let mut freed = Vec::new();
        let at = self.layout;
        t.out.retain(|gfn, m| {
            if !pages.contains(gfn) {
                return true;
            }
            match m {
                // A swapped page released: its contents are gone for good, and so is its slot.
                MovedOut::Swapped { slot, .. } => {
                    freed.push(*slot);
                    false
                }
                MovedOut::Sampled { first: Some(_), .. } => true,
                MovedOut::Sampled {
                    slot, first: None, ..
                } => {
                    if let Some(s) = slot.take() {
                        drop_stash(at, s..s + 1);
                    }
                    true
                }
            }
        });
        t.swapped -= t.swapped.min(freed.len() as u64);
        if let Some(f) = &mut t.swap {
            for s in freed.into_iter().flatten() {
                f.release(s);
            }
        }
    }

    /// Turns hypervisor swap on with `file` (the first call only; later ones are ignored).
    /// `on_failure` is called on the handler thread when a swapped page cannot be read back: the
    /// faulting access cannot wait (KVM retries it at once, without returning to the VMM), so the
    /// page is filled with zeros, the failure kept ([`Faults::take_swap_error`]), and the caller
    /// told, so that it stops the guest and ends the run.
    pub fn enable_swap(&self, file: SwapFile, on_failure: Box<dyn Fn() + Send>) {
        let mut t = lock(&self.table);
        if t.swap.is_none() {
            t.swap = Some(file);
            t.on_swap_failure = Some(on_failure);
        }
    }

    /// First half of swapping guest page `gfn` out, whose contents are `page`: registers its
    /// region (so that its next access faults here, not to a zero page) and writes the contents
    /// to a free slot unless they are zero. The page stays in RAM: the caller drops it through
    /// the VM's release path and then calls [`Faults::swap_commit`] (or [`Faults::swap_abort`]).
    /// Call with the guest stopped.
    pub fn swap_store(&self, gfn: u64, page: &[u8]) -> Result<Stored, FaultsError> {
        if gfn >= self.layout.pages {
            return Err(FaultsError::OutsideRam {
                gfn,
                pages: self.layout.pages,
            });
        }
        if lock(&self.table).out.contains_key(&gfn) {
            return Ok(Stored::Refused);
        }
        if let Err(e) = self.ensure_registered(gfn) {
            log::debug!("faults: the region of page {gfn:#x}: {e}; not swapped");
            return Ok(Stored::Refused);
        }
        if page.iter().all(|&b| b == 0) {
            return Ok(Stored::Zero);
        }
        let mut t = lock(&self.table);
        let Some(f) = &mut t.swap else {
            return Ok(Stored::Refused);
        };
        Ok(match f.store(page) {
            Ok(slot) => Stored::Slot(slot),
            Err(e) => Stored::Full(e),
        })
    }

    /// Second half: guest pages `pages` (with their slots, `None` for a zero page) were stored
    /// and have just been dropped from guest RAM; their next access reads them back.
    pub fn swap_commit(&self, pages: &[(u64, Option<Slot>)]) {
        let mut t = lock(&self.table);
        for &(gfn, slot) in pages {
            let old = t.out.insert(gfn, MovedOut::Swapped { slot });
            debug_assert!(old.is_none(), "page {gfn:#x} was moved out twice");
        }
        t.swapped += pages.len() as u64;
    }

    /// Frees the slots of pages stored but not dropped (their release failed).
    pub fn swap_abort(&self, slots: impl IntoIterator<Item = Slot>) {
        let mut t = lock(&self.table);
        if let Some(f) = &mut t.swap {
            for s in slots {
                f.release(s);
            }
        }
    }

    /// Whether guest page `gfn` is swapped out now.
    pub fn is_swapped(&self, gfn: u64) -> bool {
        matches!(
            lock(&self.table).out.get(&gfn),
            Some(MovedOut::Swapped { .. })
        )
    }

    /// Pages swapped out now.
    pub fn swapped_pages(&self) -> u64 {
        lock(&self.table).swapped
    }

    /// The pages swapped in since the last call, with their waits.
    pub fn take_swap_ins(&self) -> SwapIns {
        std::mem::take(&mut lock(&self.table).swap_ins)
    }

    /// The first failure to read a swapped page back, if any: the guest cannot get that page.
    pub fn take_swap_error(&self) -> Option<SwapFileError> {
        lock(&self.table).swap_error.take()
    }
}

/// Maps the missing pages of `[addr, addr + pages pages)` (guest RAM, not registered with the
/// userfaultfd) as a read would: to the shared zero page (`MADV_POPULATE_READ`, Linux 5.14).
fn populate_read(addr: u64, pages: u64) -> std::io::Result<()> {
    // SAFETY: the range lies in guest RAM (the caller's region), which no Rust reference covers;
    // MADV_POPULATE_READ only faults pages in for reading, which changes no contents (a missing
    // anonymous page reads as zero before and after).
    let rc = unsafe {
        libc::madvise(
            addr as *mut libc::c_void,
            (pages * PAGE_SIZE) as usize,
            libc::MADV_POPULATE_READ,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops the contents of stash slots `slots` (pages moved out or copied back already, or of
/// released guest pages).
fn drop_stash(at: Layout, slots: Range<u64>) {
    if slots.is_empty() {
        return;
    }
    let addr = at.slot_addr(slots.start);
    // SAFETY: the slots are pages of our own stash mapping, which nothing else uses;
    // MADV_DONTNEED only drops their contents.
    let rc = unsafe {
        libc::madvise(
            addr as *mut libc::c_void,
            ((slots.end - slots.start) * PAGE_SIZE) as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        log::warn!(
            "faults: dropping stash slots {slots:?}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

/// Write-protects guest page `gfn`, just put back into guest RAM without being accessed (a
/// swapped-in page put back before its first access needs the same).
///
/// Why: moving a page out drops KVM's mapping of it, and KVM maps a page that is writable on the
/// host writable even on a read fault (with shadow paging, whenever the guest's own PTE is dirty),
/// logging it dirty: the guest's first read after the page came back would pass for a write, and
/// its dirty bit stays set until the next clear. Measured on this host with 5000 access samples
/// at 100 ms in a read-only phase: 80-140 of 1000 write-sampled pages showed a dirty bit, all of
/// them moved back untouched 2-9 intervals before (`docs/design.md`). Write-protected, the read
/// maps it read-only and logs nothing; a write faults to the handler once, which lifts the
/// protection, and KVM logs the write.
fn protect_returned(uffd: &Uffd, at: &Layout, gfn: u64) -> Result<(), errno::Error> {
    uffd.write_protect(at.page_addr(gfn), PAGE_SIZE, true)
}

/// The handler thread: resolves each fault by what the page is, until `done`.
fn handle_faults(uffd: &Uffd, table: &Mutex<Table>, done: &AtomicBool, at: Layout) {
    let mut faults: Vec<Fault> = Vec::new();
    let mut trace = TrapTrace::from_env();
    while !done.load(Ordering::Relaxed) {
        if !uffd.wait(20) {
            continue;
        }
        let woke = Instant::now();
        faults.clear();
        if let Err(e) = uffd.read_faults(&mut faults) {
            lock(table).error.get_or_insert(HandlerError::Read(e));
            continue;
        }
        let read_at = Instant::now();
        let mut guard = lock(table);
        let t = &mut *guard;
        for f in &faults {
            let Some(gfn) = at.gfn(f.page) else {
                // Only the stash is registered besides guest RAM, and nothing touches it: fill the
                // page all the same, so that nobody sleeps for ever.
                t.error
                    .get_or_insert(HandlerError::OutsideRam { addr: f.page });
                // SAFETY: a registered page outside guest RAM is in our stash, which no reference
                // covers; `zeros` is our zeroed page.
                let _ = unsafe { uffd.fill_missing(f.page, f.write, at.zeros) };
                continue;
            };
            if f.protected {
                // A write to a page put back write-protected: let it through (this wakes the
                // writer), so KVM maps the page writable for a real write and logs it.
                if let Err(source) = uffd.write_protect(f.page, PAGE_SIZE, false) {
                    t.error.get_or_insert(HandlerError::Resolve {
                        gfn,
                        write: true,
                        source,
                    });
                }
                continue;
            }
            let result = match t.out.get_mut(&gfn) {
                Some(MovedOut::Sampled {
                    slot,
                    first,
                    shared,
                }) if first.is_none() => {
                    *first = Some(if f.write { Access::Write } else { Access::Read });
                    match slot {
                        // SAFETY: as below; the page moves back whole (the zero page stays one).
                        Some(s) if *shared => unsafe {
                            uffd.move_page(f.page, at.slot_addr(*s), PAGE_SIZE, true)
                        },
                        // SAFETY: a page of guest RAM (no reference covers it) and a slot of our
                        // own stash; both stay mapped while this thread runs.
                        // Back as a copy (`UFFDIO_COPY`), not moved: moving clears the stash's
                        // page-table entry, which flushes the TLBs of every CPU this process ran
                        // on (an IPI, costly under a nested hypervisor); a copy only fills the
                        // missing entry. The stash keeps the old page until the round ends.
                        Some(s) => unsafe { uffd.copy_page(f.page, at.slot_addr(*s)) },
                        // SAFETY: a registered page of guest RAM; `zeros` is our zeroed page.
                        None => unsafe { uffd.fill_missing(f.page, f.write, at.zeros) },
                    }
                }
                // Resolved already (its resolution woke everyone), or released since and missing
                // again. Filled as the kernel would; a page that is there just wakes the toucher.
                // SAFETY: a registered page of guest RAM; `zeros` is our zeroed page.
                Some(MovedOut::Sampled { .. }) => unsafe {
                    uffd.fill_missing(f.page, f.write, at.zeros)
                },
                // Not moved out: a touch after a release (or a first touch, if mapping the page
                // to the zero page failed). Filled the same way, and counted.
                None => {
                    t.fills += 1;
                    // SAFETY: as above.
                    unsafe { uffd.fill_missing(f.page, f.write, at.zeros) }
                }
                Some(MovedOut::Swapped { slot }) => {
                    let slot = *slot;
                    let result = swap_in(uffd, t.swap.as_ref(), at, f, slot);
                    let resolved = match result {
                        Ok(()) => Ok(()),
                        Err(SwapIn::Read(e)) => {
                            // The access cannot wait for a page that will never come: it is
                            // filled with zeros, and the VMM ends the run at once.
                            log::error!("faults: swapped page {gfn:#x}: {e}");
                            t.swap_error.get_or_insert(e);
                            if let Some(tell) = &t.on_swap_failure {
                                tell();
                            }
                            // SAFETY: a registered page of guest RAM; `zeros` is our zeroed page.
                            unsafe { uffd.fill_missing(f.page, f.write, at.zeros) }
                        }
                        Err(SwapIn::Resolve(e)) => Err(e),
                    };
                    if resolved.is_ok() {
                        if let Some(s) = slot
                            && let Some(file) = &mut t.swap
                        {
                            file.release(s);
                        }
                        t.out.remove(&gfn);
                        t.swapped = t.swapped.saturating_sub(1);
                        let access = if f.write { Access::Write } else { Access::Read };
                        t.swap_ins.pages.push((gfn, access));
                        t.swap_ins
                            .wait_us
                            .push(read_at.elapsed().as_secs_f64() * 1e6);
                    }
                    resolved
                }
            };

            if let Err(source) = result {
                t.error.get_or_insert(HandlerError::Resolve {
                    gfn,
                    write: f.write,
                    source,
                });
            }
        }
        if let Some(tr) = &mut trace {
            tr.record(woke, read_at, faults.len());
        }
    }
    if let Some(tr) = trace {
        tr.write();
    }
}

/// The handler's own timestamps, one line per batch of faults read, for the trap's per-step
/// breakdown: on when `MEMVISOR_TRAP_TRACE` names a file, which gets them when the handler stops
/// (`cargo bench --bench access -- trap` reads it; `docs/design.md`, "The trap's cost"). A line is
/// `woke read resolved faults`: nanoseconds since the handler started at which `poll` returned,
/// the faults were read and all of them were resolved, and how many there were.
struct TrapTrace {
    path: std::path::PathBuf,
    start: Instant,
    batches: Vec<[u64; 4]>,
}

impl TrapTrace {
    fn from_env() -> Option<Self> {
        let path = std::env::var_os("MEMVISOR_TRAP_TRACE")?;
        Some(TrapTrace {
            path: path.into(),
            start: Instant::now(),
            batches: Vec::new(),
        })
    }

    fn record(&mut self, woke: Instant, read: Instant, faults: usize) {
        let ns = |t: Instant| t.duration_since(self.start).as_nanos() as u64;
        let done = ns(Instant::now());
        self.batches.push([ns(woke), ns(read), done, faults as u64]);
    }

    fn write(self) {
        let text: String = (self.batches.iter())
            .map(|b| format!("{} {} {} {}\n", b[0], b[1], b[2], b[3]))
            .collect();
        if let Err(e) = std::fs::write(&self.path, text) {
            log::warn!(
                "faults: writing the trap trace to {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Why a swapped page could not come back.
enum SwapIn {
    Read(SwapFileError),
    Resolve(errno::Error),
}

/// Brings swapped page `f` back: slot `slot` read into the bounce page and copied into place, or
/// (a zero page) filled as the kernel would.
fn swap_in(
    uffd: &Uffd,
    file: Option<&SwapFile>,
    at: Layout,
    f: &Fault,
    slot: Option<Slot>,
) -> Result<(), SwapIn> {
    let (Some(s), Some(file)) = (slot, file) else {
        // SAFETY: a registered page of guest RAM; `zeros` is our zeroed page.
        return unsafe { uffd.fill_missing(f.page, f.write, at.zeros) }.map_err(SwapIn::Resolve);
    };
    // SAFETY: the bounce page is one page of our own stash mapping, mapped while this thread runs
    // and used by this thread only, so no other reference to it exists during the borrow.
    let buf = unsafe { std::slice::from_raw_parts_mut(at.bounce as *mut u8, PAGE_SIZE as usize) };
    file.load(s, buf).map_err(SwapIn::Read)?;
    // SAFETY: `f.page` is a registered page of guest RAM, which no reference covers; the bounce
    // page is ours and page aligned.
    unsafe { uffd.copy_page(f.page, at.bounce) }.map_err(SwapIn::Resolve)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::memory::GuestMemory;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE as usize]
    }

    /// Guest memory with swap on (a file in a temp dir), or `None` without userfaultfd.
    fn swapping(dir: &std::path::Path) -> Option<GuestMemory> {
        let mem = GuestMemory::new(GuestRam::new(4 << 20, false).unwrap());
        if let Err(e) = mem.start_faults(2) {
            eprintln!("SKIPPED: {e}");
            return None;
        }
        mem.faults()
            .unwrap()
            .enable_swap(SwapFile::create(dir).unwrap(), Box::new(|| {}));
        Some(mem)
    }

    /// Swaps pages out the way the VMM does: store, discard, commit.
    fn swap_out(mem: &GuestMemory, gfns: &[u64]) -> Vec<(u64, Option<Slot>)> {
        let f = mem.faults().unwrap();
        let mut buf = page(0);
        let mut stored = Vec::new();
        for &gfn in gfns {
            mem.ram()
                .mem()
                .read_slice(&mut buf, vm_memory::GuestAddress(gfn * PAGE_SIZE))
                .unwrap();
            match f.swap_store(gfn, &buf).unwrap() {
                Stored::Zero => stored.push((gfn, None)),
                Stored::Slot(s) => stored.push((gfn, Some(s))),
                other => panic!("page {gfn}: {other:?}"),
            }
        }
        for &(gfn, _) in &stored {
            mem.discard(gfn..gfn + 1).unwrap();
        }
        f.swap_commit(&stored);
        stored
    }

    #[test]
    fn swapped_pages_come_back_on_a_vmm_read_and_free_their_slots() {
        let dir = tempfile::tempdir().unwrap();
        let Some(mem) = swapping(dir.path()) else {
            return;
        };
        let ram = mem.ram();
        let f = mem.faults().unwrap();
        for gfn in 10..14 {
            ram.write(gfn * PAGE_SIZE, &page(gfn as u8)).unwrap();
        }
        // Page 14 is written with zeros: it is dropped but not written to the file.
        ram.write(14 * PAGE_SIZE, &page(0)).unwrap();
        let stored = swap_out(&mem, &[10, 11, 12, 13, 14]);
        assert_eq!(stored[4], (14, None), "a zero page takes no slot");
        assert!(stored[..4].iter().all(|(_, s)| s.is_some()));
        assert_eq!(f.swapped_pages(), 5);
        assert!(f.is_swapped(11));
        // A VMM read of a swapped page faults to the handler, which reads it back.
        let v: u64 = ram.read_obj(11 * PAGE_SIZE + 64).unwrap();
        assert_eq!(v, u64::from_ne_bytes([11; 8]));
        let v: u64 = ram.read_obj(14 * PAGE_SIZE).unwrap();
        assert_eq!(v, 0);
        let ins = f.take_swap_ins();
        let got: Vec<u64> = ins.pages.iter().map(|&(g, _)| g).collect();
        assert_eq!(got, vec![11, 14]);
        assert_eq!(ins.wait_us.len(), 2);
        assert_eq!(f.swapped_pages(), 3);
        assert!(!f.is_swapped(11));
        // A write brings a page back as a write, with its contents under the write.
        ram.write(12 * PAGE_SIZE, &[0xee]).unwrap();
        let v: [u8; 2] = ram.read_obj(12 * PAGE_SIZE).unwrap();
        assert_eq!(v, [0xee, 12]);
        assert_eq!(f.take_swap_ins().pages, vec![(12, Access::Write)]);
        // A release of a swapped page frees its slot: it reads zero afterwards, and the slot is
        // the lowest free one again.
        let slot13 = stored[3].1.unwrap();
        mem.discard(13..14).unwrap();
        assert_eq!(f.swapped_pages(), 1);
        let v: u64 = ram.read_obj(13 * PAGE_SIZE).unwrap();
        assert_eq!(v, 0, "a released swapped page reads zero");
        assert!(f.take_swap_ins().pages.is_empty(), "not a page-in");
        ram.write(20 * PAGE_SIZE, &page(20)).unwrap();
        let again = swap_out(&mem, &[20]);
        assert!(again[0].1.unwrap() <= slot13, "{again:?}");
        let v: u8 = ram.read_obj(20 * PAGE_SIZE + 5).unwrap();
        assert_eq!(v, 20);
        let v: u8 = ram.read_obj(10 * PAGE_SIZE + 5).unwrap();
        assert_eq!(v, 10);
        assert_eq!(f.swapped_pages(), 0);
        assert!(f.take_swap_error().is_none());
        assert!(f.take_handler_error().is_none());
    }

    #[test]
    fn registering_a_region_maps_its_never_touched_pages_so_they_never_fault() {
        let mem = GuestMemory::new(GuestRam::new(4 << 20, false).unwrap());
        let ram = mem.ram();
        for gfn in 0..4 {
            ram.write(gfn * PAGE_SIZE, &page(gfn as u8 + 1)).unwrap();
        }
        // Page 2 is released before faults start... and page 3 after: neither was never touched.
        mem.discard(2..3).unwrap();
        let f = match mem.start_faults(2) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
        };
        mem.discard(3..4).unwrap();
        assert!(f.pagemap.is_some(), "the pagemap reads");
        assert_eq!(
            f.sample(1, 0).unwrap(),
            Sampled::Armed {
                new_region: Some(0)
            }
        );
        // Page 2 was released before the handler knew: it is mapped with the never-touched ones
        // (a missing page reads zero either way). Page 3's release was seen.
        assert_eq!(f.take_zero_mapped(), vec![2..3, 4..REGION_PAGES]);
        assert!(f.take_zero_mapped().is_empty(), "once");
        // A page mapped to the zero page can be sampled (plain sampling draws from all of RAM).
        assert_eq!(
            f.sample(10, 1).unwrap(),
            Sampled::Armed { new_region: None }
        );
        // First writes to never-touched pages do not come to the handler...
        for gfn in 4..REGION_PAGES {
            ram.write(gfn * PAGE_SIZE + 8, &[gfn as u8]).unwrap();
        }
        assert_eq!(f.take_fills(), 0);
        // ... a touch after a release does; a sampled page's trap is not a fill.
        ram.write(3 * PAGE_SIZE, &[9]).unwrap();
        let v: u8 = ram.read_obj(PAGE_SIZE).unwrap();
        assert_eq!(v, 2, "the sampled page came back intact");
        assert_eq!(f.take_fills(), 1);
        let out = f.end_samples().unwrap();
        assert_eq!(
            out,
            vec![
                SampleOutcome {
                    gfn: 1,
                    first: Some(Access::Read),
                    zero: false
                },
                SampleOutcome {
                    gfn: 10,
                    first: Some(Access::Write),
                    zero: true
                }
            ]
        );
        // Both came back as copies; their originals left the stash with the round.
        let mut stash = [0u64; 2];
        let at = f.layout.slot_addr(0) as usize;
        f.pagemap.as_ref().unwrap().read(at, 2, &mut stash).unwrap();
        assert!(
            stash.iter().all(|&e| !PageEntry(e).present()),
            "stash slots still hold pages: {stash:x?}"
        );
        // Contents: page 0 as written, 2 zero, 3 and the never-touched ones as written since.
        let got: Vec<[u8; 9]> = [0u64, 2, 3, 4, 300]
            .iter()
            .map(|&g| ram.read_obj(g * PAGE_SIZE).unwrap())
            .collect();
        let with = |b0: u8, b8: u8| {
            let mut v = [0u8; 9];
            v[0] = b0;
            v[8] = b8;
            v
        };
        assert_eq!(got[0], [1; 9]);
        assert_eq!(got[1..], [with(0, 0), with(9, 0), with(0, 4), with(0, 44)]);
        // The other region was not registered: nothing mapped there.
        assert!(f.take_zero_mapped().is_empty());
        assert!(f.take_handler_error().is_none());
    }

    #[test]
    fn a_swapped_page_is_not_sampled_and_a_sampled_one_not_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let Some(mem) = swapping(dir.path()) else {
            return;
        };
        let ram = mem.ram();
        let f = mem.faults().unwrap();
        ram.write(3 * PAGE_SIZE, &page(3)).unwrap();
        ram.write(4 * PAGE_SIZE, &page(4)).unwrap();
        swap_out(&mem, &[3]);
        assert_eq!(f.sample(3, 0).unwrap(), Sampled::Refused);
        assert!(matches!(f.sample(4, 0).unwrap(), Sampled::Armed { .. }));
        assert!(matches!(
            f.swap_store(4, &page(4)).unwrap(),
            Stored::Refused
        ));
        // Ending the round leaves the swapped page swapped.
        let out = f.end_samples().unwrap();
        assert_eq!(out.len(), 1);
        assert!(f.is_swapped(3));
        let v: u8 = ram.read_obj(3 * PAGE_SIZE).unwrap();
        assert_eq!(v, 3);
        let v: u8 = ram.read_obj(4 * PAGE_SIZE).unwrap();
        assert_eq!(v, 4);
    }

    #[test]
    fn a_slot_that_cannot_be_read_is_an_error_that_is_told_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mem = GuestMemory::new(GuestRam::new(4 << 20, false).unwrap());
        if let Err(e) = mem.start_faults(0) {
            eprintln!("SKIPPED: {e}");
            return;
        }
        let f = mem.faults().unwrap();
        let told = Arc::new(AtomicBool::new(false));
        let flag = told.clone();
        f.enable_swap(
            SwapFile::create(&path).unwrap(),
            Box::new(move || flag.store(true, Ordering::SeqCst)),
        );
        mem.ram().write(7 * PAGE_SIZE, &page(7)).unwrap();
        swap_out(&mem, &[7]);
        // The file loses its contents behind the VMM's back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(!told.load(Ordering::SeqCst));
        let v: u8 = mem.ram().read_obj(7 * PAGE_SIZE).unwrap();
        assert_eq!(v, 0, "filled, so that nobody waits for ever");
        assert!(told.load(Ordering::SeqCst), "the VMM is told at once");
        let err = f.take_swap_error().expect("the failure is kept");
        assert!(matches!(err, SwapFileError::ShortRead { .. }), "{err}");
        assert!(f.take_swap_error().is_none(), "once");
    }
}
