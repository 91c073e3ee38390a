//! The VM's one userfaultfd and its fault handler. A range of memory can be registered with only
//! one descriptor, so guest memory owns it and every user of page faults goes through here: today
//! the access sampler (pages moved out to a stash, brought back on their first access); hypervisor
//! swap next.
//!
//! Guest RAM is registered in MISSING mode by 2 MiB region, the first time a page of the region is
//! moved out, and stays registered: a present page never faults (unless write-protected, below), so a region costs nothing until a
//! page in it goes missing. One handler thread resolves every fault by what the page is:
//!
//! - a page moved out (`MovedOut`): its kind says what to do (a sampled page records its first
//!   access, read or write, and moves back from the stash; the next kind, a swapped page, will read
//!   its contents back);
//! - any other missing page in a registered region (never touched, or released): filled as the
//!   kernel would have, with the zero page for a read and a zeroed page for a write.
//!
//! Regions are registered in WP mode as well: a page put back into guest RAM with no access (a
//! sampled page nobody touched) is write-protected there ([`protect_returned`]), because KVM has
//! no mapping of it and would map it writable on the guest's next read, logging that read as a
//! write; protected, the read maps it read-only, and a write faults here once and is let through.
//!
//! No data is copied: a page moves (`UFFDIO_MOVE`, the same physical page), so contents stay intact,
//! and the handler never reads or writes guest memory. Every operation here takes guest page
//! numbers and checks them against guest RAM, so no page outside guest RAM and the stash can move.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use thiserror::Error;
use vmm_sys_util::errno;

use crate::memory::bitmap::Bitmap;
use crate::memory::pagemap::AnonMapping;
use crate::memory::ram::GuestRam;
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
    },
}

/// What the owner and the handler thread share.
#[derive(Debug, Default)]
struct Table {
    /// Pages moved out, by guest page number.
    out: HashMap<u64, MovedOut>,
    /// The handler's first failure.
    error: Option<HandlerError>,
}

/// Where things are: guest RAM, the stash and its zero page. Plain addresses, valid while the
/// [`Faults`] that holds them lives (it joins the handler thread before it goes).
#[derive(Clone, Copy, Debug)]
struct Layout {
    ram_addr: u64,
    pages: u64,
    stash_addr: u64,
    zeros: u64,
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
    layout: Layout,
    /// The sample stash, then one zeroed page (the source for filling a written missing page);
    /// held for its mapping, reached through `layout`.
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
            AnonMapping::new(((stash_pages + 1) * PAGE_SIZE) as usize).map_err(|source| {
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
        Ok(Faults {
            uffd,
            table,
            registered: Mutex::new(Bitmap::new(ram.pages().div_ceil(REGION_PAGES))),
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

    /// Registers the 2 MiB region of `gfn` unless it is already; returns the region if it was
    /// registered now.
    fn ensure_registered(&self, gfn: u64) -> Result<Option<u64>, UffdError> {
        let region = gfn / REGION_PAGES;
        let mut registered = lock(&self.registered);
        if registered.get(region) {
            return Ok(None);
        }
        let first = region * REGION_PAGES;
        let len = (first + REGION_PAGES).min(self.layout.pages) - first;
        self.uffd
            .register(self.layout.page_addr(first), len * PAGE_SIZE)?;
        registered.set(region);
        Ok(Some(region))
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
        if lock(&self.table).out.contains_key(&gfn) {
            return Err(FaultsError::AlreadyOut { gfn });
        }
        let new_region = match self.ensure_registered(gfn) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("faults: the region of page {gfn:#x}: {e}; page left alone");
                return Ok(Sampled::Refused);
            }
        };
        let (addr, to) = (self.layout.page_addr(gfn), self.layout.slot_addr(slot));
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
        lock(&self.table)
            .out
            .insert(gfn, MovedOut::Sampled { slot, first: None });
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
        });
        drop(table);
        sampled.sort_unstable_by_key(|(gfn, _)| *gfn);
        let mut out = Vec::with_capacity(sampled.len());
        for (gfn, m) in sampled {
            let MovedOut::Sampled { slot, first } = m;
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
            out.push(SampleOutcome { gfn, first });
        }
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
        let mut table = lock(&self.table);
        for (gfn, m) in table.out.iter_mut() {
            let MovedOut::Sampled { slot, first } = m;
            if !pages.contains(gfn) || first.is_some() {
                continue;
            }
            if let Some(s) = slot.take() {
                let at = self.layout.slot_addr(s);
                // SAFETY: the slot is one page of our own stash mapping, which nothing else uses;
                // MADV_DONTNEED only drops its contents.
                let rc = unsafe {
                    libc::madvise(
                        at as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    log::warn!(
                        "faults: dropping the stash copy of released page {gfn:#x}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
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
    while !done.load(Ordering::Relaxed) {
        if !uffd.wait(20) {
            continue;
        }
        faults.clear();
        if let Err(e) = uffd.read_faults(&mut faults) {
            lock(table).error.get_or_insert(HandlerError::Read(e));
            continue;
        }
        let mut t = lock(table);
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
                Some(MovedOut::Sampled { slot, first }) if first.is_none() => {
                    *first = Some(if f.write { Access::Write } else { Access::Read });
                    match slot {
                        // SAFETY: a page of guest RAM (no reference covers it) and a slot of our
                        // own stash; both stay mapped while this thread runs.
                        Some(s) => unsafe {
                            uffd.move_page(f.page, at.slot_addr(*s), PAGE_SIZE, true)
                        },
                        // SAFETY: a registered page of guest RAM; `zeros` is our zeroed page.
                        None => unsafe { uffd.fill_missing(f.page, f.write, at.zeros) },
                    }
                }
                // Resolved already (its resolution woke everyone), or released since and missing
                // again; and any page not moved out: a first touch, or a touch after a release.
                // Filled as the kernel would; a page that is there just wakes the toucher.
                // SAFETY: a registered page of guest RAM; `zeros` is our zeroed page.
                Some(MovedOut::Sampled { .. }) | None => unsafe {
                    uffd.fill_missing(f.page, f.write, at.zeros)
                },
            };
            if let Err(source) = result {
                t.error.get_or_insert(HandlerError::Resolve {
                    gfn,
                    write: f.write,
                    source,
                });
            }
        }
    }
}
