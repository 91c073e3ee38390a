//! The access sampler: sees reads as well as writes, on a few sampled guest pages per interval,
//! with userfaultfd (`docs/design.md` says why this mechanism, with the figures).
//!
//! Arming a page moves it (the same physical page, `UFFDIO_MOVE`) out of guest RAM into a stash.
//! Its 2 MiB region is registered with userfaultfd in MISSING mode the first time one of its pages
//! is armed, and stays registered: a present page never faults, so registration costs nothing
//! until a page goes missing. The next access to an armed page, by the guest (a vCPU blocks inside
//! `KVM_RUN`) or by the VMM, faults to the handler thread, which records whether it was a read or
//! a write and moves the page back, waking the toucher. Disarming moves back the pages nobody
//! touched. A page that is missing for another reason (never touched, in a registered region) is
//! filled as the kernel would: the zero page for a read, a zeroed page for a write. No data is
//! ever copied, so contents are intact; the handler thread never touches guest memory.
//!
//! Why whole regions, registered once: registering and unregistering single pages every interval
//! splits and merges the mapping, and on this development host (nested KVM, PVM) that makes KVM
//! rebuild the guest's mappings nearby, and a rebuilt read mapping of a write-protected page is
//! logged as a write. A region registered once and left registered shows no such effect
//! (measured: `docs/design.md`). A page moved out and back has no KVM mapping until the guest
//! touches it, and KVM logs that first read as a write on any x86 host (it maps a writable page
//! writable), so the write sample leaves out the pages armed in this round and the one before.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use thiserror::Error;

use crate::memory::GuestRam;
use crate::memory::bitmap::{Bitmap, Ranks};
use crate::memory::pagemap::AnonMapping;
use crate::memory::uffd::{Fault, Uffd, UffdError};
use crate::observe::sampler::{Sampler, SamplerError};
use crate::units::PAGE_SIZE;

/// Why the access sampler failed.
#[derive(Debug, Error)]
pub enum AccessError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("the access sampler's stash of {pages} pages")]
    Stash {
        pages: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the access sampler")]
    Sampler(#[from] SamplerError),
    #[error(
        "moving sampled page {gfn:#x} back into guest RAM failed ({source}); its contents are in the stash"
    )]
    MoveBack {
        gfn: u64,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

/// Guest pages per registered region (2 MiB).
pub const REGION_PAGES: u64 = 512;

/// One armed page.
#[derive(Clone, Copy, Debug)]
struct Armed {
    /// Its stash slot, if its page was moved out (`None`: it had no page, only registered).
    slot: Option<u64>,
    /// The first access: `Some(true)` a write, `Some(false)` a read.
    first: Option<bool>,
}

/// What the handler thread and the arming side share.
#[derive(Debug, Default)]
struct State {
    /// Armed pages by host address.
    armed: HashMap<u64, Armed>,
    /// The handler's first failure.
    error: Option<String>,
}

/// One interval's round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Round {
    /// Pages armed.
    pub n: u64,
    /// Of them, accessed.
    pub t: u64,
    /// Of the accessed, first by a write.
    pub writes: u64,
    /// Pages first accessed by a read (KVM may have set their dirty bits while resolving it).
    pub read_first: Vec<u64>,
    /// Picked pages that could not be armed (pinned, shared, part of a huge page), replaced.
    pub skipped: u64,
    /// The population the pages were drawn from.
    pub population: u64,
}

/// What arming did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Arming {
    /// The pages armed.
    pub pages: Vec<u64>,
    /// Regions (2 MiB, by index) registered for the first time.
    pub new_regions: Vec<u64>,
    /// The pages armed in the round before: moved out and back, so KVM may not map them yet.
    pub previous: Vec<u64>,
}

/// The access sampler of one guest RAM mapping.
pub struct AccessSampler {
    uffd: Arc<Uffd>,
    state: Arc<Mutex<State>>,
    stash: AnonMapping,
    ram_addr: u64,
    sampler: Sampler,
    population: u64,
    skipped: u64,
    /// Regions registered with userfaultfd (one bit per 2 MiB).
    registered: Bitmap,
    /// The pages of the last arming.
    last_armed: Vec<u64>,
    /// The stash's size: the most pages one round can arm.
    capacity: u64,
    /// Whether a round is armed now.
    round_open: bool,
    pages: u64,
    done: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the map half-updated in a way that matters
    // more than stopping: carry on with what is there.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl AccessSampler {
    /// A sampler of `samples` pages per interval over guest RAM at `ram_addr` (`pages` pages).
    pub fn new(
        samples: u64,
        ram_addr: u64,
        pages: u64,
        seed: Option<u64>,
    ) -> Result<Self, AccessError> {
        let sampler = Sampler::new(samples, pages, seed)?;
        let uffd = Arc::new(Uffd::new()?);
        // The stash, then one zeroed page (the source for filling a written missing page).
        let stash = AnonMapping::new(((samples + 1) * PAGE_SIZE) as usize).map_err(|source| {
            AccessError::Stash {
                pages: samples,
                source,
            }
        })?;
        // A move's destination must be registered with the descriptor: the stash, once.
        uffd.register(stash.addr() as u64, samples * PAGE_SIZE)?;
        let zeros = stash.addr() as u64 + samples * PAGE_SIZE;
        let state = Arc::new(Mutex::new(State::default()));
        let done = Arc::new(AtomicBool::new(false));
        let handler = {
            let (uffd, state, done) = (uffd.clone(), state.clone(), done.clone());
            let stash_addr = stash.addr() as u64;
            std::thread::Builder::new()
                .name("memvisor-uffd".into())
                .spawn(move || handle_faults(&uffd, &state, &done, stash_addr, zeros))
                .map_err(|source| AccessError::Stash {
                    pages: samples,
                    source,
                })?
        };
        Ok(AccessSampler {
            uffd,
            state,
            stash,
            ram_addr,
            sampler,
            population: 0,
            skipped: 0,
            registered: Bitmap::new(pages.div_ceil(REGION_PAGES)),
            last_armed: Vec::new(),
            capacity: samples,
            round_open: false,
            pages,
            done,
            handler: Some(handler),
        })
    }

    /// The access sampler over guest RAM `ram`, or `None` when it is off (`samples` 0) or cannot
    /// run, which it says on stderr: reads are then not seen, and every row says so.
    pub fn for_ram_or_announce(ram: &GuestRam, samples: u64, seed: Option<u64>) -> Option<Self> {
        if samples == 0 {
            return None;
        }
        match Self::new(samples, ram.host_addr() as u64, ram.pages(), seed) {
            Ok(a) => Some(a),
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "memvisor: reads are not seen, only writes are estimated: {e}"
                );
                None
            }
        }
    }

    /// Arms a fresh sample of `samples` pages (at most the stash's size; 0: none this round)
    /// drawn uniformly from `population` (one bit per guest page), whose rank index is `ranks`.
    /// Picked pages that refuse to move are replaced by fresh draws, so n stays what was asked
    /// for, up to four tries per page asked for. The cost is O(samples): it does not depend on
    /// the guest's size. Call with the guest stopped.
    pub fn arm(
        &mut self,
        population: &Bitmap,
        ranks: &Ranks,
        samples: u64,
    ) -> Result<Arming, AccessError> {
        let samples = samples.min(self.capacity);
        self.round_open = samples > 0;
        let mut out = Arming {
            previous: std::mem::take(&mut self.last_armed),
            ..Arming::default()
        };
        self.population = ranks.total();
        self.skipped = 0;
        let want = samples.min(self.population);
        let mut taken = HashSet::new();
        let mut todo = Vec::new();
        while (out.pages.len() as u64) < want && (taken.len() as u64) < 4 * want {
            let missing = want - out.pages.len() as u64;
            todo.clear();
            todo.extend(
                self.sampler
                    .draw_ranks(missing, self.population, &mut taken)
                    .into_iter()
                    .filter_map(|r| ranks.select(population, r)),
            );
            if todo.is_empty() {
                break;
            }
            todo.sort_unstable();
            for &gfn in &todo {
                if self.arm_page(gfn, out.pages.len() as u64, &mut out)? {
                    out.pages.push(gfn);
                }
            }
        }
        out.pages.sort_unstable();
        self.last_armed = out.pages.clone();
        Ok(out)
    }

    /// Arms one page into stash slot `slot`: registers its region if needed, moves the page out.
    /// False (and counted as skipped) when the page cannot be armed.
    fn arm_page(&mut self, gfn: u64, slot: u64, out: &mut Arming) -> Result<bool, AccessError> {
        let region = gfn / REGION_PAGES;
        if !self.registered.get(region) {
            let first = region * REGION_PAGES;
            let len = (first + REGION_PAGES).min(self.pages) - first;
            if let Err(e) = self
                .uffd
                .register(self.ram_addr + first * PAGE_SIZE, len * PAGE_SIZE)
            {
                log::debug!("access sampler: region {region}: {e}; page {gfn:#x} skipped");
                self.skipped += 1;
                return Ok(false);
            }
            self.registered.set(region);
            out.new_regions.push(region);
        }
        let addr = self.ram_addr + gfn * PAGE_SIZE;
        let stash = self.stash.addr() as u64 + slot * PAGE_SIZE;
        let slot = match self.uffd.move_page(stash, addr, PAGE_SIZE, false) {
            Ok(()) => Some(slot),
            // No page there (dropped since it was touched): a fault still shows an access.
            Err(e) if e.errno() == libc::ENOENT => None,
            Err(e) => {
                log::debug!("access sampler: page {gfn:#x} cannot move ({e}); skipped");
                self.skipped += 1;
                return Ok(false);
            }
        };
        lock(&self.state)
            .armed
            .insert(addr, Armed { slot, first: None });
        Ok(true)
    }

    /// The balloon released guest pages `ranges`: an armed page among them must not come back
    /// from the stash with its old contents. Its stash slot is emptied, so the page stays missing
    /// and, if the guest touches it again, is filled as released memory reads: zero.
    pub fn forget(&mut self, ranges: &[std::ops::Range<u64>]) {
        let mut state = lock(&self.state);
        for (addr, a) in state.armed.iter_mut() {
            let gfn = (*addr - self.ram_addr) / PAGE_SIZE;
            if !ranges.iter().any(|r| r.contains(&gfn)) || a.first.is_some() {
                continue;
            }
            if let Some(s) = a.slot.take() {
                let slot = self.stash.addr() + (s * PAGE_SIZE) as usize;
                // SAFETY: the slot is one page of our own stash mapping, which nothing else uses;
                // MADV_DONTNEED only drops its contents.
                let rc = unsafe {
                    libc::madvise(
                        slot as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    log::warn!(
                        "access sampler: dropping the stash copy of released page {gfn:#x}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    }

    /// Ends the round: moves back the pages nobody touched and says what was seen (`None` if
    /// nothing was armed this round). Call with the guest stopped.
    pub fn disarm(&mut self) -> Result<Option<Round>, AccessError> {
        let open = std::mem::replace(&mut self.round_open, false);
        let mut state = lock(&self.state);
        if let Some(e) = state.error.take() {
            log::warn!("access sampler: the fault handler failed: {e}");
        }
        let mut round = Round {
            n: state.armed.len() as u64,
            skipped: self.skipped,
            population: self.population,
            ..Round::default()
        };
        let mut armed: Vec<(u64, Armed)> = state.armed.drain().collect();
        armed.sort_unstable_by_key(|(a, _)| *a);
        for (addr, a) in armed {
            let gfn = (addr - self.ram_addr) / PAGE_SIZE;
            match a.first {
                Some(write) => {
                    round.t += 1;
                    if write {
                        round.writes += 1;
                    } else {
                        round.read_first.push(gfn);
                    }
                }
                None => {
                    if let Some(s) = a.slot {
                        let from = self.stash.addr() as u64 + s * PAGE_SIZE;
                        self.uffd
                            .move_page(addr, from, PAGE_SIZE, false)
                            .map_err(|source| AccessError::MoveBack { gfn, source })?;
                    }
                }
            }
        }
        Ok(open.then_some(round))
    }
}

impl Drop for AccessSampler {
    fn drop(&mut self) {
        if let Err(e) = self.disarm() {
            log::error!("{e}");
        }
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

/// The handler thread: resolves each fault in a registered region, recording the first access to
/// an armed page (moving its page back) and filling any other missing page as the kernel would.
fn handle_faults(
    uffd: &Uffd,
    state: &Mutex<State>,
    done: &AtomicBool,
    stash_addr: u64,
    zeros: u64,
) {
    let mut faults: Vec<Fault> = Vec::new();
    while !done.load(Ordering::Relaxed) {
        if !uffd.wait(20) {
            continue;
        }
        faults.clear();
        if let Err(e) = uffd.read_faults(&mut faults) {
            lock(state).error.get_or_insert(e.to_string());
            continue;
        }
        let mut st = lock(state);
        for f in &faults {
            let result = match st.armed.get_mut(&f.page) {
                Some(a) if a.first.is_none() => {
                    a.first = Some(f.write);
                    match a.slot {
                        Some(s) => {
                            uffd.move_page(f.page, stash_addr + s * PAGE_SIZE, PAGE_SIZE, true)
                        }
                        None => uffd.fill_missing(f.page, f.write, zeros),
                    }
                }
                // A second fault on a page already resolved: its resolution woke everyone.
                Some(_) => Ok(()),
                // Not armed: a first touch in a registered region.
                None => uffd.fill_missing(f.page, f.write, zeros),
            };
            if let Err(e) = result {
                st.error.get_or_insert(e.to_string());
            }
        }
    }
}
