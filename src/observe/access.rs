//! The access sampler: sees reads as well as writes, on a few sampled guest pages per interval,
//! with userfaultfd (`docs/design.md` says why this mechanism, with the figures).
//!
//! Arming a page moves it (the same physical page, `UFFDIO_MOVE`) out of guest RAM into a stash,
//! through guest memory's one userfaultfd ([`crate::memory::faults::Faults`], which registers its
//! 2 MiB region the first time and leaves it registered). The next access to an armed page, by the
//! guest (a vCPU blocks inside `KVM_RUN`) or by the VMM, faults to guest memory's handler thread,
//! which records whether it was a read or a write and moves the page back, waking the toucher.
//! Disarming moves back the pages nobody touched. No data is ever copied, so contents are intact.
//! This module is the sampling: which pages, how many, and what a round saw. The pages are drawn
//! from the ones touched so far and, since a guest read of one shows nowhere else, the untouched
//! ones the VMM mapped to the zero page ([`Population`]).
//!
//! Why whole regions, registered once: registering and unregistering single pages every interval
//! splits and merges the mapping, and on this development host (nested KVM, PVM) that makes KVM
//! rebuild the guest's mappings nearby, and a rebuilt read mapping of a write-protected page is
//! logged as a write. A region registered once and left registered shows no such effect
//! (measured: `docs/design.md`). A page moved out and back has no KVM mapping until the guest
//! touches it, and KVM would log that first read as a write (it maps a writable page writable),
//! so guest memory puts a page nobody touched back write-protected, and the write sample leaves
//! out the pages armed in this round (moved out now) and the one before.

use std::collections::HashSet;
use std::io::Write;

use thiserror::Error;

use crate::memory::GuestMemory;
use crate::memory::bitmap::{Bitmap, Ranks};
use crate::memory::faults::{Access, Faults, FaultsError, Sampled};
use crate::observe::sampler::{Sampler, SamplerError};

/// Why the access sampler failed.
#[derive(Debug, Error)]
pub enum AccessError {
    #[error("guest memory's page faults")]
    Faults(#[from] FaultsError),
    #[error("the access sampler")]
    Sampler(#[from] SamplerError),
    #[error("guest memory handles no page faults: the access sampler was built for other memory")]
    NoFaults,
}

/// One interval's round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Round {
    /// Pages armed.
    pub n: u64,
    /// Of them, accessed.
    pub t: u64,
    /// Pages first accessed by a read (KVM may have set their dirty bits while resolving it;
    /// not the zero page, which it maps read-only).
    pub read_first: Vec<u64>,
    /// Pages drawn from the untouched stratum ([`Population`]) that were accessed: not in `t`,
    /// since an access that the harvest saw as a first touch is counted there already; the
    /// estimate adds the others (reads of the zero page, which show nowhere else).
    pub untouched_hits: Vec<u64>,
    /// Picked pages that could not be armed (pinned, shared, part of a huge page), replaced.
    pub skipped: u64,
    /// The population the pages were drawn from.
    pub population: u64,
    /// Missing pages not moved out that the fault handler filled during the round: first touches
    /// that went through the handler ([`Faults::take_fills`]).
    pub fills: u64,
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

/// What one round's sample is drawn from, by rank: `size` pages, the `r`-th given by `select`.
/// Ranks from `untouched_from` on are untouched pages the VMM mapped to the zero page: a guest
/// read of one shows in no dirty log and no residency pass, so only a sample sees it (a write
/// does show, as a first touch).
pub struct Population<'a> {
    pub size: u64,
    pub untouched_from: u64,
    pub select: Box<dyn Fn(u64) -> Option<u64> + 'a>,
}

impl<'a> Population<'a> {
    /// The pages set in `pages`, indexed by `ranks`, and nothing else.
    pub fn of(pages: &'a Bitmap, ranks: &'a Ranks) -> Self {
        Population {
            size: ranks.total(),
            untouched_from: ranks.total(),
            select: Box::new(move |r| ranks.select(pages, r)),
        }
    }
}

/// The access sampler of one guest memory.
pub struct AccessSampler {
    sampler: Sampler,
    population: u64,
    skipped: u64,
    /// The pages of the last arming.
    last_armed: Vec<u64>,
    /// Those of them drawn from the untouched stratum (sorted).
    untouched: Vec<u64>,
    /// The stash's size: the most pages one round can arm.
    capacity: u64,
    /// Whether a round is armed now.
    round_open: bool,
}

fn faults(memory: &GuestMemory) -> Result<&Faults, AccessError> {
    memory.faults().ok_or(AccessError::NoFaults)
}

impl AccessSampler {
    /// A sampler of `samples` pages per interval over `memory`, whose page faults it starts
    /// handling (with a stash of `samples` pages) if nothing has yet.
    pub fn new(samples: u64, memory: &GuestMemory, seed: Option<u64>) -> Result<Self, AccessError> {
        let sampler = Sampler::new(samples, memory.ram().pages(), seed)?;
        let faults = memory.start_faults(samples)?;
        Ok(AccessSampler {
            sampler,
            population: 0,
            skipped: 0,
            last_armed: Vec::new(),
            untouched: Vec::new(),
            capacity: samples.min(faults.stash_pages()),
            round_open: false,
        })
    }

    /// The access sampler over `memory`, or `None` when it is off (`samples` 0) or cannot run,
    /// which it says on stderr: reads are then not seen, and every row says so.
    pub fn for_memory_or_announce(
        memory: &GuestMemory,
        samples: u64,
        seed: Option<u64>,
    ) -> Option<Self> {
        if samples == 0 {
            return None;
        }
        match Self::new(samples, memory, seed) {
            Ok(a) => Some(a),
            Err(e) => {
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                let _ = writeln!(
                    std::io::stderr(),
                    "memvisor: reads are not seen, only writes are estimated: {msg}"
                );
                None
            }
        }
    }

    /// Arms a fresh sample of `samples` pages (at most the stash's size; 0: none this round)
    /// drawn uniformly from `population`. Picked pages that refuse to move are replaced by fresh
    /// draws, so n stays what was asked for, up to four tries per page asked for. The cost is
    /// O(samples): it does not depend on the guest's size. Call with the guest stopped.
    pub fn arm(
        &mut self,
        memory: &GuestMemory,
        population: &Population<'_>,
        samples: u64,
    ) -> Result<Arming, AccessError> {
        let faults = faults(memory)?;
        let samples = samples.min(self.capacity);
        self.round_open = samples > 0;
        let mut out = Arming {
            previous: std::mem::take(&mut self.last_armed),
            ..Arming::default()
        };
        self.population = population.size;
        self.skipped = 0;
        self.untouched.clear();
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
                    .filter_map(|r| {
                        (population.select)(r).map(|gfn| (gfn, r >= population.untouched_from))
                    }),
            );
            if todo.is_empty() {
                break;
            }
            todo.sort_unstable();
            for &(gfn, untouched) in &todo {
                match faults.sample(gfn, out.pages.len() as u64)? {
                    Sampled::Armed { new_region } => {
                        out.new_regions.extend(new_region);
                        out.pages.push(gfn);
                        if untouched {
                            self.untouched.push(gfn);
                        }
                    }
                    Sampled::Refused => self.skipped += 1,
                }
            }
        }
        out.pages.sort_unstable();
        self.untouched.sort_unstable();
        self.last_armed = out.pages.clone();
        Ok(out)
    }

    /// Ends the round: moves back the pages nobody touched and says what was seen (`None` if
    /// nothing was armed this round). Call with the guest stopped.
    pub fn disarm(&mut self, memory: &GuestMemory) -> Result<Option<Round>, AccessError> {
        let open = std::mem::replace(&mut self.round_open, false);
        let faults = faults(memory)?;
        if let Some(e) = faults.take_handler_error() {
            let cause = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            log::warn!("access sampler: the fault handler failed: {e}{cause}");
        }
        let outcomes = faults.end_samples()?;
        let mut round = Round {
            n: outcomes.len() as u64,
            skipped: self.skipped,
            population: self.population,
            fills: faults.take_fills(),
            ..Round::default()
        };
        for o in outcomes {
            if o.first == Some(Access::Read) && !o.zero {
                round.read_first.push(o.gfn);
            }
            if o.first.is_none() {
                continue;
            }
            if self.untouched.binary_search(&o.gfn).is_ok() {
                round.untouched_hits.push(o.gfn);
                continue;
            }
            round.t += 1;
        }
        Ok(open.then_some(round))
    }
}
