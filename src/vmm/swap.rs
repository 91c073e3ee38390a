//! Hypervisor swap for one VM (`--swap`): at each interval boundary, with the vCPU stopped, guest
//! pages are written to the swap file and dropped from guest RAM until the swapped total reaches
//! the target; the VM's one fault handler reads each back on its next access
//! ([`crate::memory::faults`]). `docs/design.md` ("Hypervisor swap") walks through it.
//!
//! A page leaves guest RAM only through the VM's release path ([`Vm::release`]), after its write
//! succeeded, so the dirty log, the fault handler and the map stay in step exactly as for the
//! balloon's releases; the map then calls it `VmmSwapped`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::kvm::vcpu::kick;
use crate::kvm::vm::Vm;
use crate::memory::bitmap::gap_ranges_of;
use crate::memory::faults::{Access, Faults, FaultsError, Stored};
use crate::memory::pagemap::PageCounts;
use crate::memory::swap::policy::{Candidate, SharedFrame, choose, choose_shared};
use crate::memory::swap::{Policy, Slot, SwapFile, SwapFileError};
use crate::observe::interval::{IntervalError, IntervalWork};
use crate::observe::pmp_mmp::{PageState, PmpMmpMap};
use crate::row::Swap;
use crate::units::{PAGE_SIZE, pages_mib};
use crate::vmm::config::SwapConfig;

/// The most pages swapped out at one boundary (64 MiB): the guest waits while they are written,
/// so a large target is reached over a few intervals.
pub const MAX_OUT_PER_INTERVAL: u64 = 16384;

/// What went wrong with hypervisor swap.
#[derive(Debug, Error)]
pub enum SwapError {
    #[error("hypervisor swap")]
    File(#[source] SwapFileError),
    #[error("hypervisor swap needs userfaultfd")]
    Faults(#[source] FaultsError),
    #[error("reading guest page {gfn:#x} to swap it out")]
    Read {
        gfn: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("dropping swapped pages from guest RAM")]
    Release(#[source] IntervalError),
    #[error(
        "a swapped page could not be read back, so the guest cannot get its memory; the run ends here"
    )]
    PageIn(#[source] SwapFileError),
}

/// Hypervisor swap's state across intervals.
pub struct HypervisorSwap {
    policy: Policy,
    target_pages: u64,
    rng: StdRng,
    /// The swap file could not take more pages: no more swapping this run.
    stopped: bool,
    /// The last interval in which each page was brought back (an access the map does not see when
    /// it is a read: a page the guest only reads, its kernel's code and page tables, looks cold
    /// to the dirty log). At most one entry per page ever swapped in.
    paged_in: HashMap<u64, u32>,
    /// `/proc/kpagecount`, opened the first time shared pages must be swapped out (`None` after:
    /// not readable, and only this VM's sharers are counted).
    counts: Option<Option<PageCounts>>,
}

impl HypervisorSwap {
    /// Turns hypervisor swap on for `vm` (after the access sampler has started the fault handler
    /// with its stash, if it runs).
    pub fn new(vm: &Vm, cfg: SwapConfig) -> Result<Self, SwapError> {
        let faults = vm.memory().start_faults(0).map_err(SwapError::Faults)?;
        // A failed page-in kicks this thread (the vCPU's, which runs the whole loop) out of
        // `KVM_RUN`, so that the run ends before the guest goes on with a page of zeros.
        // SAFETY: pthread_self has no preconditions.
        let vcpu_thread = unsafe { libc::pthread_self() };
        let file = SwapFile::create(&cfg.path).map_err(SwapError::File)?;
        faults.enable_swap(file, Box::new(move || kick(vcpu_thread)));
        Ok(HypervisorSwap {
            policy: cfg.policy,
            target_pages: cfg.target_pages,
            rng: StdRng::seed_from_u64(cfg.seed.unwrap_or_else(rand::random)),
            stopped: false,
            paged_in: HashMap::new(),
            counts: None,
        })
    }

    /// Sets the target (pages to keep swapped out), e.g. from the control socket; it is reached
    /// from the next interval boundary on. Lowering it brings nothing back: pages come back when
    /// the guest touches them.
    pub fn set_target(&mut self, pages: u64) {
        self.target_pages = pages;
    }

    /// A page-in failure, once: the run must end with it (after its final row). Ask after every
    /// exit, before anything else: the failed page was filled with zeros so that the access could
    /// go on, and the vCPU was kicked at once, so the guest ran briefly at most, and nothing it
    /// reported since is to be believed.
    pub fn failure(&self, vm: &Vm) -> Option<SwapError> {
        let e = vm.memory().faults()?.take_swap_error()?;
        Some(SwapError::PageIn(e))
    }

    /// Ends interval `interval` (which lasted `length`; `last`: the run's last): takes the
    /// page-ins the fault handler made, tells the interval work about them, and, unless `last`,
    /// swaps pages out towards the target. Call before [`IntervalWork::end`], with the vCPU
    /// stopped. Returns the row's `swap` object.
    pub fn end_interval(
        &mut self,
        vm: &Vm,
        work: &mut IntervalWork,
        interval: u64,
        length: Duration,
        last: bool,
    ) -> Result<Swap, SwapError> {
        let faults = vm.memory().start_faults(0).map_err(SwapError::Faults)?;
        let ins = faults.take_swap_ins();
        let now_interval = u32::try_from(interval).unwrap_or(u32::MAX - 1);
        for &(gfn, _) in &ins.pages {
            self.paged_in.insert(gfn, now_interval);
        }
        work.note_remapped(
            ins.pages
                .iter()
                .map(|&(gfn, access)| (gfn, access == Access::Read)),
        );
        let mut page_outs = 0;
        let mut shared_page_outs = 0;
        let mut out_ms = 0.0;
        let now = faults.swapped_pages();
        if !last && !self.stopped && self.target_pages > now {
            let want = (self.target_pages - now).min(MAX_OUT_PER_INTERVAL);
            let t0 = Instant::now();
            (page_outs, shared_page_outs) = self.swap_out(vm, faults, work, want, interval)?;
            out_ms = t0.elapsed().as_secs_f64() * 1e3;
            log::debug!("interval {interval}: swapped out {page_outs} pages in {out_ms:.1} ms");
        }
        let secs = length.as_secs_f64();
        let rate = |pages: u64| {
            if secs > 0.0 {
                pages_mib(pages) / secs
            } else {
                0.0
            }
        };
        let page_ins = ins.pages.len() as u64;
        let mut waits = ins.wait_us;
        // Folded from +0.0: an empty f64 sum is -0.0, which JSON would print as such.
        let in_ms = waits.iter().fold(0.0, |a, w| a + w) / 1e3;
        waits.sort_unstable_by(f64::total_cmp);
        Ok(Swap {
            swapped_mib: pages_mib(faults.swapped_pages()),
            target_mib: pages_mib(self.target_pages),
            in_mib_s: rate(page_ins),
            out_mib_s: rate(page_outs),
            page_ins,
            page_outs,
            shared_page_outs,
            page_in_us_p50: percentile(&waits, 0.50),
            page_in_us_p99: percentile(&waits, 0.99),
            out_ms,
            in_ms,
            stopped: self.stopped,
        })
    }

    /// Swaps out up to `want` pages, chosen by the policy among the pages the map calls backed
    /// (not shared); when those are not enough, pages on shared machine pages follow, in the
    /// order of [`choose_shared`]. Returns how many left guest RAM, and how many of them were
    /// shared.
    fn swap_out(
        &mut self,
        vm: &Vm,
        faults: &Faults,
        work: &mut IntervalWork,
        want: u64,
        interval: u64,
    ) -> Result<(u64, u64), SwapError> {
        let paged_in = &self.paged_in;
        let candidates = work.map().backed_pages().map(|(page, seen)| Candidate {
            page,
            last_seen: Some(paged_in.get(&page).map_or(seen, |&p| p.max(seen))),
        });
        let want = want as usize;
        let mut chosen = choose(self.policy, candidates, want, &mut self.rng);
        let mut shared = std::collections::HashSet::new();
        if chosen.len() < want {
            let frames = self.shared_frames(work.map());
            let more = choose_shared(frames, want - chosen.len(), &mut self.rng);
            shared.extend(more.iter().copied());
            chosen.extend(more);
        }
        chosen.sort_unstable();
        let mut stored: Vec<(u64, Option<Slot>)> = Vec::with_capacity(chosen.len());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for gfn in chosen {
            vm.ram()
                .mem()
                .read_slice(&mut page, GuestAddress(gfn * PAGE_SIZE))
                .map_err(|source| SwapError::Read { gfn, source })?;
            match faults.swap_store(gfn, &page).map_err(SwapError::Faults)? {
                Stored::Zero => stored.push((gfn, None)),
                Stored::Slot(s) => stored.push((gfn, Some(s))),
                Stored::Refused => {}
                Stored::Full(e) => {
                    log::warn!(
                        "hypervisor swap stops: {e}; the page stays in guest RAM, and so does \
                         every page not swapped out yet"
                    );
                    self.stopped = true;
                    break;
                }
            }
        }
        if stored.is_empty() {
            return Ok((0, 0));
        }
        let ranges = gap_ranges_of(stored.iter().map(|&(gfn, _)| gfn), 0, u64::MAX);
        if let Err(e) = work.release(vm, &ranges, interval) {
            faults.swap_abort(stored.iter().filter_map(|&(_, s)| s));
            return Err(SwapError::Release(e));
        }
        // The vCPU is stopped: nothing touches the dropped pages before they are marked.
        faults.swap_commit(&stored);
        let pages: Vec<(u64, bool)> = stored.iter().map(|&(g, s)| (g, s.is_some())).collect();
        work.note_swapped_out(&pages);
        let shared_outs = stored.iter().filter(|(g, _)| shared.contains(g)).count();
        Ok((stored.len() as u64, shared_outs as u64))
    }

    /// This VM's pages on shared machine pages, as the map last found them (its refresh, every
    /// interval with `--ksm`), by frame, with each frame's sharers across the host from
    /// `/proc/kpagecount` (this VM's own where it cannot be read).
    fn shared_frames(&mut self, map: &PmpMmpMap) -> Vec<SharedFrame> {
        let mut on: Vec<(u64, u64)> = map
            .touched()
            .iter_ones()
            .filter_map(|gfn| match map.page(gfn)?.state {
                PageState::Shared(pfn) => Some((pfn, gfn)),
                _ => None,
            })
            .collect();
        if on.is_empty() {
            return Vec::new();
        }
        on.sort_unstable();
        let mut frames: Vec<(u64, SharedFrame)> = Vec::new();
        for (pfn, gfn) in on {
            match frames.last_mut() {
                Some((p, f)) if *p == pfn => f.pages.push(gfn),
                _ => frames.push((
                    pfn,
                    SharedFrame {
                        pages: vec![gfn],
                        sharers: 0,
                    },
                )),
            }
        }
        let pfns: Vec<u64> = frames.iter().map(|(p, _)| *p).collect();
        let counts = self
            .counts
            .get_or_insert_with(|| {
                PageCounts::open()
                    .inspect_err(|e| log::debug!("hypervisor swap: {e}; sharers within this VM"))
                    .ok()
            })
            .as_mut()
            .and_then(|c| {
                c.counts(&pfns)
                    .inspect_err(|e| log::debug!("hypervisor swap: {e}; sharers within this VM"))
                    .ok()
            });
        frames
            .into_iter()
            .enumerate()
            .map(|(i, (_, mut f))| {
                let here = f.pages.len() as u64;
                f.sharers = counts.as_ref().map_or(here, |c| c[i].max(here));
                f
            })
            .collect()
    }
}

/// The `q` quantile of sorted `v` (nearest rank), `None` when empty.
fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
