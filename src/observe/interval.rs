//! The work at each interval boundary, with the vCPU stopped: close the access sampler's round,
//! read KVM's dirty log, close the write sampler's round, harvest the PMP-MMP map, form both
//! estimates, and arm fresh samples for the next interval. `docs/design.md` walks through it.
//!
//! Both estimates are stratified: the harvest knows exactly which pages were touched (written)
//! for the first time in the interval, so only the pages touched (written) before are sampled,
//! and the estimate is `exact + t/n × stratum`. The two samples are kept disjoint: resolving a
//! trapped read can set the page's dirty bit, which must not pass for a write.
//!
//! Two parts: [`Estimator`], the estimator core, takes what KVM and the fault handler gave as
//! data (the dirty bitmap, the access round, releases) and gives the estimates and the pages to
//! write-protect, so it is tested with synthetic bitmaps; [`IntervalWork`] asks KVM and guest
//! memory for that data and applies the core's answers.

use std::ops::Range;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::kvm::vm::{Released, Vm, VmError};
use crate::memory::bitmap::{AndNotRanks, Bitmap, Ranks, Window};
use crate::observe::access::{AccessError, AccessSampler, Arming, Population, Round};
use crate::observe::pmp_mmp::{MapError, PmpMmpMap};
use crate::observe::sampler::Sampler;
use crate::observe::stats::{Smoother, Stratified};
use crate::observe::usage;
use crate::row::{Active, HostUsage, VmmWork};
use crate::units::PAGE_SIZE;

/// Why an interval's measurement failed.
#[derive(Debug, Error)]
pub enum IntervalError {
    #[error("the VM's dirty log")]
    Vm(#[from] VmError),
    #[error("the PMP-MMP map")]
    Map(#[from] MapError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("releasing guest pages")]
    Release(#[source] VmError),
}

/// What one interval measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub host: HostUsage,
    /// The access estimate (reads and writes), if the access sampler runs.
    pub active: Option<Active>,
    /// The write estimate, if this interval was sampled.
    pub active_writes: Option<Active>,
    /// What it cost, the guest paused.
    pub work: VmmWork,
}

/// How the estimators sample.
pub struct Estimators {
    /// Write samplers cycled interval by interval (usually one); `None`: no write sampling then.
    pub write: Vec<Option<Sampler>>,
    pub write_smoother: Smoother,
    /// The access sampler, if it runs.
    pub access: Option<AccessSampler>,
    /// Access sample sizes cycled interval by interval (0: none that interval), for benchmarks;
    /// empty: the sampler's own size every interval.
    pub access_cycle: Vec<u64>,
    pub access_smoother: Smoother,
    /// Stratify (sample only pages touched before); false: sample all of RAM, as ESX does.
    pub stratify: bool,
}

/// The write sample armed now.
struct WriteRound {
    sampler: usize,
    population: u64,
}

/// Both estimates of one interval.
#[derive(Clone, Debug, Default)]
pub struct Estimates {
    /// The access estimate, if an access round was closed.
    pub access: Option<Active>,
    /// The write estimate, if a write round was armed.
    pub writes: Option<Active>,
}

/// The estimator core: the map, the write samplers, the moving averages and the sampling
/// bookkeeping, driven by data. It never calls KVM or userfaultfd: [`Estimator::close`] takes
/// the dirty bitmap and the access round, [`Estimator::arm_writes`] answers with the pages whose
/// dirty bits to clear, and [`Estimator::note_released`] takes a release's dirty window.
pub struct Estimator {
    map: PmpMmpMap,
    write: Vec<Option<Sampler>>,
    write_smoother: Smoother,
    access_smoother: Smoother,
    access_cycle: Vec<u64>,
    stratify: bool,
    write_round: Option<WriteRound>,
    /// Pages whose dirty bit a trapped read may have set: write-protected again at the next arm.
    reprotect: Vec<u64>,
    /// All of RAM, the population of plain (unstratified) sampling, and its rank index.
    everything: Bitmap,
    everything_ranks: Ranks,
    /// The rank index of the access sample's population: the pages touched so far (all of RAM
    /// when not stratifying), built by the count after each harvest.
    population: Ranks,
    /// The rank index of the untouched pages the VMM mapped to the zero page (stratified
    /// sampling only): the access sample draws them too, since a guest read of one shows only
    /// there.
    zero_mapped: AndNotRanks,
    /// Scratch: pages the write sample leaves out (the access sample, moved out now, and the one
    /// before; pages moved back untouched come back write-protected, so a read of them is not
    /// logged as a write: `memory::faults`).
    exclude: Bitmap,
    /// Pages the map knows written (the last harvest's count).
    written_pages: u64,
    /// Pages the VMM put back into guest RAM in the interval (hypervisor swap's page-ins), with
    /// whether a read brought each: [`Estimator::note_remapped`].
    remapped: Vec<(u64, bool)>,
}

impl Estimator {
    /// The core over `map` (one bit per guest page), sampling as `est` says (its access sampler
    /// is not used here).
    pub fn new(map: PmpMmpMap, est: &mut Estimators) -> Self {
        let pages = map.pages();
        let mut everything = Bitmap::new(pages);
        if !est.stratify {
            everything.set_range(0..pages);
        }
        // Plain sampling draws from all of RAM, indexed once; stratified sampling from the pages
        // touched so far, indexed after each harvest.
        let everything_ranks = Ranks::new(&everything);
        let population = if est.stratify {
            Ranks::default()
        } else {
            everything_ranks.clone()
        };
        Estimator {
            map,
            write: std::mem::take(&mut est.write),
            write_smoother: est.write_smoother.clone(),
            access_smoother: est.access_smoother.clone(),
            access_cycle: std::mem::take(&mut est.access_cycle),
            stratify: est.stratify,
            write_round: None,
            reprotect: Vec::new(),
            everything,
            everything_ranks,
            population,
            zero_mapped: AndNotRanks::default(),
            exclude: Bitmap::new(pages),
            written_pages: 0,
            remapped: Vec::new(),
        }
    }

    /// The PMP-MMP map.
    pub fn map(&self) -> &PmpMmpMap {
        &self.map
    }

    /// The PMP-MMP map, mutable (the final refresh).
    pub fn map_mut(&mut self) -> &mut PmpMmpMap {
        &mut self.map
    }

    /// The pages armed for the write round now (sorted; empty when none).
    pub fn write_armed(&self) -> &[u64] {
        self.write_round
            .as_ref()
            .and_then(|w| self.write[w.sampler].as_ref())
            .map_or(&[], |s| s.armed())
    }

    /// The access sample's population for `interval` and how many pages to draw (`u64::MAX`:
    /// the sampler's own size). Stratified: the pages touched so far, then the untouched ones
    /// the VMM mapped to the zero page (a guest read of one shows nowhere else); plain: all of
    /// RAM.
    pub fn access_draw(&self, interval: u64) -> (Population<'_>, u64) {
        let cycle = &self.access_cycle;
        let n = if cycle.is_empty() {
            u64::MAX
        } else {
            cycle[(interval % cycle.len() as u64) as usize]
        };
        if !self.stratify {
            return (Population::of(&self.everything, &self.population), n);
        }
        let (map, touched, zero) = (&self.map, &self.population, &self.zero_mapped);
        let population = Population {
            size: touched.total() + zero.total(),
            untouched_from: touched.total(),
            select: Box::new(move |r| match r.checked_sub(touched.total()) {
                None => touched.select(map.touched(), r),
                Some(z) => map.select_zero_mapped(zero, z),
            }),
        };
        (population, n)
    }

    /// Ends interval `interval`, which lasted `length`: `dirty` is KVM's dirty bitmap (whole RAM;
    /// pages first accessed by a read in `round` are hidden from it where the map did not know
    /// them dirty, and write-protected again at the next arm), `vmm_dirty` the pages the VMM
    /// wrote, `round` the access round just closed. Harvests the map and forms both estimates.
    pub fn close(
        &mut self,
        dirty: &mut [u64],
        vmm_dirty: &[u64],
        round: Option<Round>,
        interval: u64,
        length: Duration,
    ) -> Result<Estimates, MapError> {
        if let Some(r) = &round {
            self.hide_trapped_reads(dirty, r);
        }
        self.hide_remapped_reads(dirty);
        let write_t = self.write_round.as_ref().map(|w| {
            let s = self.write[w.sampler].as_ref().expect("armed sampler");
            (s.armed().len() as u64, s.count_touched(dirty), w.population)
        });
        // The map's interval numbers are u32; a run would need 136 years of 1 s intervals to wrap.
        let harvested = self.map.harvest(
            dirty,
            vmm_dirty,
            u32::try_from(interval).unwrap_or(u32::MAX - 1),
        )?;
        if self.stratify {
            self.population = self.map.touched_ranks();
            self.zero_mapped = self.map.zero_mapped_ranks();
        }
        self.written_pages = self.map.guest_written_pages();
        let pages = self.map.pages();
        // The pages touched (written) for the first time are counted exactly when stratifying;
        // plain sampling estimates them with the rest. The populations are all of RAM then.
        let exact = |newly| if self.stratify { newly } else { 0 };
        let (new_touches, new_writes) = (
            exact(harvested.newly_touched),
            exact(harvested.newly_written),
        );
        let access = round.map(|r| {
            // An untouched page's access counts unless the harvest counted it as a first touch
            // (a write, or a read KVM mapped afresh): only its reads of the zero page are news.
            let unseen = r
                .untouched_hits
                .iter()
                .filter(|&&gfn| !self.map.touched().get(gfn))
                .count() as u64;
            let s = Stratified::new(new_touches, r.t + unseen, r.n, r.population);
            active(s, r.skipped, &mut self.access_smoother, pages, None)
        });
        let writes = write_t.map(|(n, t, population)| {
            let s = Stratified::new(new_writes, t, n, population);
            active(s, 0, &mut self.write_smoother, pages, Some(length))
        });
        Ok(Estimates { access, writes })
    }

    /// Guest pages `pages` were released during `interval`; `dirty` is KVM's dirty log over them
    /// read just before their bits were cleared. The map records what the guest wrote there since
    /// the last harvest and marks the pages released, and knows their bits clear: a write after
    /// the release shows as a new write (a page in the armed write sample then counts as active
    /// only if written again). The cost is the range's.
    pub fn note_released(&mut self, pages: Range<u64>, dirty: &Window, interval: u64) {
        let interval = u32::try_from(interval).unwrap_or(u32::MAX - 1);
        self.map.note_released(pages.clone(), dirty, interval);
        self.map.note_cleared_in(pages);
    }

    /// Resolving a trapped read may set the page's dirty bit: for pages first accessed by a read,
    /// show the map only what it already knew, and write-protect them again at the next arm.
    fn hide_trapped_reads(&mut self, dirty: &mut [u64], round: &Round) {
        for &gfn in &round.read_first {
            let (w, bit) = ((gfn / 64) as usize, 1u64 << (gfn % 64));
            let Some(word) = dirty.get_mut(w) else {
                continue;
            };
            if *word & bit != 0 && !self.map.known_dirty(gfn) {
                *word &= !bit;
                self.reprotect.push(gfn);
            }
        }
    }

    /// Guest pages `pages` were put back into guest RAM by the VMM in this interval (hypervisor
    /// swap's page-ins; `true`: a read brought the page back). KVM maps such a page afresh, and
    /// may log the fault's read as a write, as it does for the access sampler's pages: a read
    /// one's dirty bit is hidden at the next close where the map did not know it dirty (and the
    /// page write-protected again), and all of them are left out of the next write sample, as
    /// the access sample is. (To be joined with the access sampler's remapped pages.)
    pub fn note_remapped(&mut self, pages: impl IntoIterator<Item = (u64, bool)>) {
        self.remapped.extend(pages);
    }

    /// [`Estimator::hide_trapped_reads`] for the pages of [`Estimator::note_remapped`].
    fn hide_remapped_reads(&mut self, dirty: &mut [u64]) {
        for &(gfn, read) in &self.remapped {
            let (w, bit) = ((gfn / 64) as usize, 1u64 << (gfn % 64));
            let Some(word) = dirty.get_mut(w) else {
                continue;
            };
            if read && *word & bit != 0 && !self.map.known_dirty(gfn) {
                *word &= !bit;
                self.reprotect.push(gfn);
            }
        }
    }

    /// Arms the write sample for `interval`: drawn from the pages written so far minus the
    /// access sample `arming` and the one before (all of RAM when not stratifying), through the
    /// map's rank index, at a cost of the sample's size, not the RAM's. Returns the pages whose
    /// dirty bits to clear in KVM (the write sample, and any page a trapped read may have
    /// dirtied), ascending, or `None` when there are none; the map counts them cleared, so the
    /// caller must clear them ([`Vm::clear_dirty_pages`]).
    pub fn arm_writes(&mut self, interval: u64, arming: &Arming) -> Option<Vec<u64>> {
        let (written, ranks) = if self.stratify {
            (self.map.guest_written(), self.map.guest_written_ranks())
        } else {
            (&self.everything, self.everything_ranks.clone())
        };
        let remapped: Vec<u64> = self.remapped.drain(..).map(|(gfn, _)| gfn).collect();
        let mut excluded: Vec<u64> = arming
            .pages
            .iter()
            .chain(&arming.previous)
            .chain(&remapped)
            .copied()
            .collect();
        excluded.sort_unstable();
        excluded.dedup();
        for &gfn in &excluded {
            self.exclude.set(gfn);
        }
        self.write_round = None;
        let i = (interval % self.write.len() as u64) as usize;
        let mut population = 0;
        let mut clear = Vec::new();
        if let Some(s) = &mut self.write[i] {
            let (armed, _) = s.arm_ranked(written, &ranks, &self.exclude, &excluded);
            clear.extend_from_slice(armed);
            // The sample stands for the whole stratum, the few excluded pages included: they are
            // not different, only watched by the access sampler (or briefly unsafe to watch).
            population = if self.stratify {
                self.written_pages
            } else {
                self.everything.len()
            };
            self.write_round = Some(WriteRound {
                sampler: i,
                population,
            });
        }
        for &gfn in &excluded {
            self.exclude.clear(gfn);
        }
        log::debug!(
            "interval {interval}: access sample {} pages ({} regions newly registered), write \
             sample from {population}",
            arming.pages.len(),
            arming.new_regions.len()
        );
        // Pages a trapped read may have dirtied are write-protected again, this once.
        clear.append(&mut self.reprotect);
        clear.sort_unstable();
        clear.dedup();
        if clear.is_empty() {
            return None;
        }
        self.map.note_cleared_pages(&clear);
        Some(clear)
    }
}

/// The map, the samplers and the moving averages, kept across intervals, with the KVM and
/// guest-memory calls that feed the [`Estimator`].
pub struct IntervalWork {
    core: Estimator,
    access: Option<AccessSampler>,
    /// Guest RAM is mergeable (`--ksm`).
    ksm: bool,
    /// KVM's dirty log and the VMM's, one word per 64 guest pages, kept between intervals (only
    /// the windows' words are read and filled in a windowed harvest).
    dirty: Vec<u64>,
    vmm_dirty: Vec<u64>,
    /// The memslots whose dirty log was read last.
    slots_read: Vec<u32>,
}

impl IntervalWork {
    /// Starts measuring `vm`'s RAM; arms the first samples.
    pub fn new(vm: &Vm, mut est: Estimators) -> Result<Self, IntervalError> {
        let ram = vm.ram();
        let map = PmpMmpMap::new(ram.host_addr(), ram.pages())?;
        let mut work = IntervalWork {
            core: Estimator::new(map, &mut est),
            access: est.access.take(),
            ksm: false,
            dirty: Vec::new(),
            vmm_dirty: Vec::new(),
            slots_read: Vec::new(),
        };
        work.arm(vm, 0)?;
        Ok(work)
    }

    /// Guest RAM is mergeable by KSM: refresh the map every interval (merges change frames
    /// without a write) and report the kernel's KSM figures beside the map's.
    pub fn watch_sharing(&mut self) {
        self.ksm = true;
    }

    /// The PMP-MMP map.
    pub fn map(&self) -> &PmpMmpMap {
        self.core.map()
    }

    /// Whether reads are seen (the access sampler runs).
    pub fn reads_seen(&self) -> bool {
        self.access.is_some()
    }

    /// Ends interval `interval`, which lasted `length` (the last one is partial): closes both
    /// samples, harvests the map (and, when `last`, refreshes it in full), forms the estimates
    /// and, unless `last`, arms the next interval's samples.
    pub fn end(
        &mut self,
        vm: &Vm,
        interval: u64,
        length: Duration,
        last: bool,
    ) -> Result<Measured, IntervalError> {
        let t0 = Instant::now();
        let mut work = VmmWork::default();
        // The access round first: pages nobody touched go back, so the harvest sees them.
        let round = match &mut self.access {
            Some(a) => a.disarm(vm.memory())?,
            None => None,
        };
        let t1 = Instant::now();
        work.access_round_ms = ms(t1 - t0);
        let fills = round.as_ref().map(|r| r.fills);
        // Pages the fault handler mapped to the zero page (never touched) stay untouched.
        if let Some(f) = vm.memory().faults() {
            for pages in f.take_zero_mapped() {
                self.core.map_mut().note_zero_mapped(pages);
            }
        }
        // The windows that can hold news (a windowed map), then the dirty logs over them.
        let windows = self.core.map_mut().windows()?.map(<[_]>::to_vec);
        let scan = self.core.map().last_scan();
        (work.scan_ms, work.scan_ioctls) = (scan.ms, scan.ioctls);
        work.dirty_log_slots =
            vm.dirty_log_in(&mut self.dirty, windows.as_deref(), &mut self.slots_read)?;
        match &windows {
            Some(w) => {
                self.vmm_dirty.resize(self.dirty.len(), 0);
                vm.ram().take_vmm_dirty_in(w, &mut self.vmm_dirty);
            }
            None => self.vmm_dirty = vm.ram().take_vmm_dirty(),
        }
        let mut est = self
            .core
            .close(&mut self.dirty, &self.vmm_dirty, round, interval, length)?;
        if let (Some(a), Some(fills)) = (&mut est.access, fills) {
            a.handler_fills = fills;
        }
        let t2 = Instant::now();
        work.harvest_ms = ms(t2 - t1);
        // Merging changes frames without a write: with KSM the map is re-read every interval.
        if last || self.ksm {
            self.core.map_mut().refresh()?;
        }
        let t3 = Instant::now();
        work.map_ms = ms(t3 - t2);
        if !last {
            let (access_ms, write_ms) = self.arm(vm, interval + 1)?;
            work.access_round_ms += access_ms;
            work.write_round_ms = write_ms;
        }
        let t4 = Instant::now();
        let map = self.core.map();
        let host = usage::host_usage(
            &map.summary(),
            &map.sharing(),
            usage::rss_bytes().unwrap_or(0),
            self.ksm.then(usage::ksm_kernel).flatten(),
        );
        work.row_ms = ms(t4.elapsed());
        work.work_ms = ms(t0.elapsed());
        Ok(Measured {
            host,
            active: est.access,
            active_writes: est.writes,
            work,
        })
    }

    /// Gives guest pages `ranges` back to the host during `interval`: the one path of every
    /// release of guest memory (the balloon's, hypervisor swap's). The VM discards them and keeps
    /// the dirty log and the fault handler in step ([`Vm::release`]); then the map is told. The
    /// cost is the ranges', not the RAM's. Call with the vCPU stopped.
    pub fn release(
        &mut self,
        vm: &Vm,
        ranges: &[Range<u64>],
        interval: u64,
    ) -> Result<(), IntervalError> {
        let released = vm.release(ranges).map_err(IntervalError::Release)?;
        self.note_released(&released, interval);
        Ok(())
    }

    /// Tells the map about guest pages just released through the VM (by [`IntervalWork::release`]).
    fn note_released(&mut self, released: &[Released], interval: u64) {
        for r in released {
            self.core.note_released(r.pages.clone(), &r.dirty, interval);
        }
    }

    /// Guest pages the VMM swapped out (hypervisor swap), released already
    /// ([`IntervalWork::release`]): `VmmSwapped` in the map (`true` beside a page: it had contents
    /// other than zero).
    pub fn note_swapped_out(&mut self, pages: &[(u64, bool)]) {
        self.core.map.note_vmm_swapped(pages);
    }

    /// Pages hypervisor swap brought back in the interval now ending ([`Estimator::note_remapped`]).
    pub fn note_remapped(&mut self, pages: impl IntoIterator<Item = (u64, bool)>) {
        self.core.note_remapped(pages);
    }

    /// Arms both samples for `interval`: the access sample from the pages touched so far, then
    /// the write sample, write-protected with one `KVM_CLEAR_DIRTY_LOG`.
    /// Returns the milliseconds of each: (access, write).
    fn arm(&mut self, vm: &Vm, interval: u64) -> Result<(f64, f64), IntervalError> {
        let t0 = Instant::now();
        let arming = match &mut self.access {
            Some(a) => {
                let (population, n) = self.core.access_draw(interval);
                a.arm(vm.memory(), &population, n)?
            }
            None => Arming::default(),
        };
        let t1 = Instant::now();
        if let Some(pages) = self.core.arm_writes(interval, &arming) {
            vm.clear_dirty_pages(&pages)?;
        }
        Ok((ms(t1 - t0), ms(t1.elapsed())))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// An estimate in MiB, with its moving averages; with `rate_over` (the write estimate's interval
/// length), its dirty rate.
fn active(
    s: Stratified,
    skipped: u64,
    smoother: &mut Smoother,
    pages: u64,
    rate_over: Option<Duration>,
) -> Active {
    let mib = |p: f64| p * PAGE_SIZE as f64 / (1u64 << 20) as f64;
    let sm = smoother.update(s.pages / pages as f64);
    let ram_mib = mib(pages as f64);
    Active {
        n: s.n,
        t: s.t,
        exact_mib: mib(s.exact as f64),
        sampled_from_mib: mib(s.population as f64),
        skipped,
        handler_fills: 0,
        estimate_mib: mib(s.pages),
        ci_low_mib: mib(s.low),
        ci_high_mib: mib(s.high),
        fast_mib: sm.fast * ram_mib,
        slow_mib: sm.slow * ram_mib,
        max_mib: sm.max * ram_mib,
        error_mib: None,
        dirty_rate_mib_s: rate_over.map(|l| usage::dirty_rate_mib_s(mib(s.pages), l)),
    }
}

#[cfg(test)]
mod tests {
    //! The estimator core on synthetic data: a fake dirty log with KVM's manual-protect rules (a
    //! write sets a page's bit, only a clear resets it) over a mapping of our own, which the map
    //! reads as it reads guest RAM. No KVM, no userfaultfd.

    use super::*;
    use crate::memory::pagemap::AnonMapping;

    const PAGES: u64 = 1024;
    const SEC: Duration = Duration::from_secs(1);

    fn mib(pages: f64) -> f64 {
        pages * PAGE_SIZE as f64 / f64::from(1 << 20)
    }

    struct Rig {
        mem: AnonMapping,
        log: Bitmap,
        core: Estimator,
    }

    impl Rig {
        fn new(write_samples: Option<u64>, stratify: bool) -> Rig {
            let mem = AnonMapping::new((PAGES * PAGE_SIZE) as usize).unwrap();
            let map = PmpMmpMap::new(mem.addr(), PAGES).unwrap();
            let smoother = Smoother::new(1.0, 1.0).unwrap();
            let mut est = Estimators {
                write: vec![write_samples.map(|n| Sampler::new(n, PAGES, Some(5)).unwrap())],
                write_smoother: smoother.clone(),
                access: None,
                access_cycle: vec![3, 0],
                access_smoother: smoother,
                stratify,
            };
            let mut rig = Rig {
                mem,
                log: Bitmap::new(PAGES),
                core: Estimator::new(map, &mut est),
            };
            rig.arm(0, &Arming::default());
            rig
        }

        /// The guest writes `pages`: the memory, and KVM's log.
        fn write(&mut self, pages: impl IntoIterator<Item = u64>) {
            for p in pages {
                self.mem.write_volatile((p * PAGE_SIZE) as usize, 1);
                self.log.set(p);
            }
        }

        /// The guest reads `page`: the zero page is mapped; the log sees nothing.
        fn read(&mut self, page: u64) {
            self.mem.read_volatile((page * PAGE_SIZE) as usize);
        }

        fn close(&mut self, round: Option<Round>, interval: u64) -> Estimates {
            let mut dirty = self.log.words().to_vec();
            self.core
                .close(&mut dirty, &[], round, interval, SEC)
                .unwrap()
        }

        /// Arms the write sample; clears what the core asks, as KVM would. Returns the cleared
        /// pages.
        fn arm(&mut self, interval: u64, arming: &Arming) -> Vec<u64> {
            match self.core.arm_writes(interval, arming) {
                Some(pages) => {
                    for &p in &pages {
                        self.log.clear(p);
                    }
                    pages
                }
                None => Vec::new(),
            }
        }

        /// What `Vm::release` does to the log, then the core told: the window read, the range's
        /// bits cleared, the pages discarded.
        fn release(&mut self, pages: Range<u64>, interval: u64) {
            let window = Window::of(self.log.words(), pages.clone());
            self.log.clear_range(pages.clone());
            for p in pages.clone() {
                // SAFETY: one page of our own mapping, which no reference covers.
                let rc = unsafe {
                    libc::madvise(
                        (self.mem.addr() + (p * PAGE_SIZE) as usize) as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                assert_eq!(rc, 0);
            }
            self.core.note_released(pages, &window, interval);
        }
    }

    #[test]
    fn first_writes_are_counted_exactly() {
        let mut rig = Rig::new(Some(10), true);
        rig.write(0..100);
        let e = rig.close(None, 0);
        let w = e.writes.expect("a write round was armed");
        assert_eq!(
            (w.n, w.t),
            (0, 0),
            "nothing written before: nothing to sample"
        );
        assert_eq!(w.exact_mib, mib(100.0));
        assert_eq!(w.estimate_mib, mib(100.0));
        assert_eq!((w.ci_low_mib, w.ci_high_mib), (mib(100.0), mib(100.0)));
        assert!(e.access.is_none(), "no access round was closed");
    }

    #[test]
    fn the_sampled_stratum_scales_by_t_over_n() {
        let mut rig = Rig::new(Some(10), true);
        rig.write(0..100);
        rig.close(None, 0);
        let cleared = rig.arm(1, &Arming::default());
        let armed = rig.core.write_armed().to_vec();
        assert_eq!(armed.len(), 10);
        assert!(
            armed.iter().all(|&p| p < 100),
            "drawn from the written pages"
        );
        assert_eq!(cleared, armed, "exactly the sample is write-protected");
        // Half the sample is written again, and 20 pages for the first time.
        rig.write(armed.iter().copied().step_by(2));
        rig.write(100..120);
        let w = rig.close(None, 1).writes.unwrap();
        assert_eq!((w.n, w.t), (10, 5));
        assert_eq!(w.exact_mib, mib(20.0));
        assert_eq!(w.sampled_from_mib, mib(100.0));
        assert_eq!(w.estimate_mib, mib(20.0 + 0.5 * 100.0));
        assert!(w.ci_low_mib < w.estimate_mib && w.estimate_mib < w.ci_high_mib);
    }

    #[test]
    fn plain_sampling_has_no_exact_part_and_samples_all_of_ram() {
        let mut rig = Rig::new(Some(64), false);
        let armed = rig.core.write_armed().to_vec();
        assert_eq!(
            armed.len(),
            64,
            "armed from all of RAM before anything was written"
        );
        rig.write(armed.iter().copied().take(16));
        rig.write(armed.last().map_or(0, |&p| p) + 1..PAGES);
        let t = armed.iter().filter(|&&p| rig.log.get(p)).count() as u64;
        let w = rig.close(None, 0).writes.unwrap();
        assert_eq!(w.exact_mib, 0.0);
        assert_eq!(w.sampled_from_mib, mib(PAGES as f64));
        assert_eq!((w.n, w.t), (64, t));
        assert_eq!(w.estimate_mib, mib(t as f64 / 64.0 * PAGES as f64));
    }

    #[test]
    fn released_pages_are_masked_from_the_write_round() {
        let mut rig = Rig::new(Some(10), true);
        rig.write(0..100);
        rig.close(None, 0);
        rig.arm(1, &Arming::default());
        let armed = rig.core.write_armed().to_vec();
        // Every sampled page is written, then the first four are released with some new pages;
        // page 150 is written for the first time just before its release.
        rig.write(armed.iter().copied());
        rig.write([150]);
        for &p in &armed[..4] {
            rig.release(p..p + 1, 1);
        }
        rig.release(150..151, 1);
        // One released sampled page is written again after its release.
        rig.write([armed[0]]);
        let w = rig.close(None, 1).writes.unwrap();
        assert_eq!(
            (w.n, w.t),
            (10, 7),
            "a released page counts only if written after its release"
        );
        assert_eq!(
            w.exact_mib, 0.0,
            "a page written then released is not a first write"
        );
        let map = rig.core.map();
        assert_eq!(
            map.summary().released,
            4,
            "three sampled pages and page 150"
        );
        let p150 = map.page(150).unwrap();
        assert!(
            p150.guest_written,
            "what the guest wrote before a release is kept"
        );
        assert_eq!(p150.first_touch, Some(1));
    }

    #[test]
    fn the_access_estimate_and_trapped_reads() {
        let mut rig = Rig::new(Some(10), true);
        rig.write(0..100);
        rig.close(None, 0);
        rig.arm(1, &Arming::default());
        let (population, n) = rig.core.access_draw(1);
        assert_eq!(
            (population.size, population.untouched_from, n),
            (100, 100, 0)
        );
        assert_eq!((population.select)(99), Some(99));
        assert_eq!((population.select)(100), None);
        drop(population);
        assert_eq!(
            rig.core.access_draw(0).1,
            3,
            "the cycle's size for interval 0"
        );
        // Page 150 is read for the first time while armed: resolving the read set its dirty
        // bit, which must not pass for a write. Page 160 is read too (not armed).
        rig.read(150);
        rig.log.set(150);
        rig.read(160);
        let round = Round {
            n: 20,
            t: 5,
            read_first: vec![150],
            skipped: 2,
            population: 100,
            ..Round::default()
        };
        let e = rig.close(Some(round), 1);
        let a = e.access.expect("an access round was closed");
        assert_eq!((a.n, a.t, a.skipped), (20, 5, 2));
        assert_eq!(
            a.exact_mib,
            mib(2.0),
            "pages 150 and 160, first touched by reads"
        );
        assert_eq!(a.estimate_mib, mib(2.0 + 5.0 / 20.0 * 100.0));
        let w = e.writes.unwrap();
        assert_eq!(w.exact_mib, 0.0, "the trapped read is not a write");
        assert!(!rig.core.map().page(150).unwrap().guest_written);
        // The page is write-protected again at the next arm, and only then.
        let armed_access = Arming {
            pages: vec![7],
            ..Arming::default()
        };
        let cleared = rig.arm(2, &armed_access);
        assert!(cleared.contains(&150), "{cleared:?}");
        assert!(
            !rig.core.write_armed().contains(&7),
            "the write sample leaves out the access sample"
        );
        rig.close(None, 2);
        let cleared = rig.arm(3, &Arming::default());
        assert!(
            !cleared.contains(&150),
            "re-protected once, not every interval"
        );
    }

    #[test]
    fn untouched_pages_the_vmm_zero_mapped_are_drawn_and_only_their_unseen_reads_count() {
        let mut rig = Rig::new(Some(10), true);
        rig.write(0..100);
        rig.close(None, 0);
        // The fault handler maps pages 200..300 to the zero page (as a read would) and says so.
        for p in 200..300 {
            rig.read(p);
        }
        rig.core.map_mut().note_zero_mapped(200..300);
        let e = rig.close(None, 1);
        assert!(e.access.is_none());
        assert_eq!(rig.core.map().vmm_zero_mapped(), 100);
        // The population: the 100 touched pages, then the 100 zero-mapped ones, by rank.
        let (population, _) = rig.core.access_draw(2);
        assert_eq!((population.size, population.untouched_from), (200, 100));
        let drawn: Vec<u64> = (0..200).map(|r| (population.select)(r).unwrap()).collect();
        assert_eq!(drawn, (0..100).chain(200..300).collect::<Vec<_>>());
        assert_eq!((population.select)(200), None);
        drop(population);
        // Sampled and accessed in the round: 210 only read (nothing else sees it), 220 written
        // (the dirty log shows a first touch, counted exactly).
        rig.write([220]);
        let round = Round {
            n: 20,
            t: 3,
            untouched_hits: vec![210, 220],
            population: 200,
            ..Round::default()
        };
        let a = rig.close(Some(round), 2).access.unwrap();
        assert_eq!(a.exact_mib, mib(1.0), "page 220's first touch");
        assert_eq!(a.t, 4, "three touched pages and page 210's read");
        assert_eq!(a.estimate_mib, mib(1.0 + 4.0 / 20.0 * 200.0));
        // Page 220 left the stratum; 210 stays in it (no harvest saw it).
        let (population, _) = rig.core.access_draw(3);
        assert_eq!((population.size, population.untouched_from), (200, 101));
        drop(population);
        // Plain sampling draws from all of RAM, which holds them already.
        let mut plain = Rig::new(Some(10), false);
        plain.write(0..10);
        plain.core.map_mut().note_zero_mapped(200..300);
        plain.close(None, 0);
        let (population, _) = plain.core.access_draw(1);
        assert_eq!((population.size, population.untouched_from), (PAGES, PAGES));
    }
}
