//! The work at each interval boundary, with the vCPU stopped: close the access sampler's round,
//! read KVM's dirty log, close the write sampler's round, harvest the PMP-MMP map, form both
//! estimates, and arm fresh samples for the next interval. `docs/design.md` walks through it.
//!
//! Both estimates are stratified: the harvest knows exactly which pages were touched (written)
//! for the first time in the interval, so only the pages touched (written) before are sampled,
//! and the estimate is `exact + t/n × stratum`. The two samples are kept disjoint: resolving a
//! trapped read can set the page's dirty bit, which must not pass for a write.

use std::time::Duration;

use thiserror::Error;

use crate::kvm::vm::{Vm, VmError};
use crate::memory::bitmap::{Bitmap, Ranks};
use crate::observe::access::{AccessError, AccessSampler, Arming, Round};
use crate::observe::pmp_mmp::{MapError, PmpMmpMap};
use crate::observe::sampler::Sampler;
use crate::observe::stats::{Smoother, Stratified};
use crate::observe::usage;
use crate::row::{Active, HostUsage};
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
}

/// What one interval measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub host: HostUsage,
    /// The access estimate (reads and writes), if the access sampler runs.
    pub active: Option<Active>,
    /// The write estimate, if this interval was sampled.
    pub active_writes: Option<Active>,
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

/// The map, the samplers and the moving averages, kept across intervals.
pub struct IntervalWork {
    map: PmpMmpMap,
    est: Estimators,
    write_round: Option<WriteRound>,
    /// Whole-slot bitmap holding the bits to clear in KVM (the armed write sample).
    mask: Vec<u64>,
    /// Pages whose dirty bit a trapped read may have set: write-protected again at the next arm.
    reprotect: Vec<u64>,
    /// All of RAM, the population of plain (unstratified) sampling.
    everything: Bitmap,
    /// The rank index of the access sample's population: the pages touched so far (all of RAM
    /// when not stratifying), built by the count after each harvest.
    population: Ranks,
    /// Scratch: pages the write sample must leave out (the access sample, and the one before:
    /// a page moved out and back has no KVM mapping until the guest touches it again).
    exclude: Bitmap,
}

impl IntervalWork {
    /// Starts measuring `vm`'s RAM; arms the first samples.
    pub fn new(vm: &Vm, est: Estimators) -> Result<Self, IntervalError> {
        let ram = vm.ram();
        let mut everything = Bitmap::new(ram.pages());
        if !est.stratify {
            everything.set_range(0..ram.pages());
        }
        // Plain sampling draws from all of RAM, indexed once; stratified sampling from the pages
        // touched so far, indexed after each harvest.
        let population = if est.stratify {
            Ranks::default()
        } else {
            Ranks::new(&everything)
        };
        let mut work = IntervalWork {
            map: PmpMmpMap::new(ram.host_addr(), ram.pages())?,
            est,
            write_round: None,
            mask: vec![0u64; ram.pages().div_ceil(64) as usize],
            reprotect: Vec::new(),
            everything,
            population,
            exclude: Bitmap::new(ram.pages()),
        };
        work.arm(vm, 0, 0)?;
        Ok(work)
    }

    /// The PMP-MMP map.
    pub fn map(&self) -> &PmpMmpMap {
        &self.map
    }

    /// Whether reads are seen (the access sampler runs).
    pub fn reads_seen(&self) -> bool {
        self.est.access.is_some()
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
        let ram = vm.ram();
        // The access round first: pages nobody touched go back, so the harvest sees them.
        let round = match &mut self.est.access {
            Some(a) => a.disarm()?,
            None => None,
        };
        let mut dirty = vm.dirty_log()?;
        if let Some(r) = &round {
            self.hide_trapped_reads(&mut dirty, r);
        }
        let vmm_dirty = ram.take_vmm_dirty();
        let write_t = self.write_round.as_ref().map(|w| {
            let s = self.est.write[w.sampler].as_ref().expect("armed sampler");
            (
                s.armed().len() as u64,
                s.count_touched(&dirty),
                w.population,
            )
        });
        // The map's interval numbers are u32; a run would need 136 years of 1 s intervals to wrap.
        let harvested = self.map.harvest(
            &dirty,
            &vmm_dirty,
            u32::try_from(interval).unwrap_or(u32::MAX - 1),
        )?;
        if self.est.stratify && self.est.access.is_some() {
            self.population = Ranks::new(self.map.touched());
        }
        let written = self.map.guest_written().count_ones();
        let pages = ram.pages();
        // The pages touched (written) for the first time are counted exactly when stratifying;
        // plain sampling estimates them with the rest. The populations are all of RAM then.
        let exact = |newly| if self.est.stratify { newly } else { 0 };
        let (new_touches, new_writes) = (
            exact(harvested.newly_touched),
            exact(harvested.newly_written),
        );
        let access = round.map(|r| {
            let s = Stratified::new(new_touches, r.t, r.n, r.population);
            active(s, r.skipped, &mut self.est.access_smoother, pages, length)
        });
        let writes = write_t.map(|(n, t, population)| {
            let s = Stratified::new(new_writes, t, n, population);
            active(s, 0, &mut self.est.write_smoother, pages, length)
        });
        if last {
            self.map.refresh()?;
        } else {
            self.arm(vm, interval + 1, written)?;
        }
        let host = usage::host_usage(&self.map.summary(), usage::rss_bytes().unwrap_or(0));
        Ok(Measured {
            host,
            active: access,
            active_writes: writes,
        })
    }

    /// The balloon released guest pages `ranges` (`MADV_DONTNEED`, with the vCPU stopped) during
    /// interval `interval`: the map records what the guest wrote there since the last harvest
    /// and marks the pages released; their bits in KVM's dirty log are cleared, so that a write
    /// after the release shows as a new write (a page in the armed sample then counts as active
    /// only if written again).
    pub fn note_released(
        &mut self,
        vm: &Vm,
        ranges: &[std::ops::Range<u64>],
        interval: u64,
    ) -> Result<(), IntervalError> {
        if let Some(a) = &mut self.est.access {
            a.forget(ranges);
        }
        let dirty = vm.dirty_log()?;
        let interval = u32::try_from(interval).unwrap_or(u32::MAX - 1);
        for r in ranges {
            self.map.note_released(r.clone(), &dirty, interval);
        }
        let mut mask = Bitmap::new(vm.ram().pages());
        for r in ranges {
            mask.set_range(r.clone());
        }
        vm.clear_dirty(mask.words())?;
        self.map.note_cleared(mask.words());
        Ok(())
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

    /// Arms both samples for `interval`: the access sample from the pages touched so far, the
    /// write sample from the pages written so far minus the access sample (all of RAM for both
    /// when not stratifying); one `KVM_CLEAR_DIRTY_LOG` write-protects the write sample (and any
    /// page a trapped read may have dirtied). `written_pages` is how many pages the map knows written
    /// (the harvest just counted them).
    fn arm(&mut self, vm: &Vm, interval: u64, written_pages: u64) -> Result<(), IntervalError> {
        let (touched, written) = if self.est.stratify {
            (self.map.touched(), self.map.guest_written())
        } else {
            (&self.everything, &self.everything)
        };
        let arming = match &mut self.est.access {
            Some(a) => {
                let cycle = &self.est.access_cycle;
                let n = if cycle.is_empty() {
                    u64::MAX
                } else {
                    cycle[(interval % cycle.len() as u64) as usize]
                };
                a.arm(touched, &self.population, n)?
            }
            None => Arming::default(),
        };
        for &gfn in arming.pages.iter().chain(&arming.previous) {
            self.exclude.set(gfn);
        }
        if let Some(w) = self.write_round.take() {
            let s = self.est.write[w.sampler].as_ref().expect("armed sampler");
            s.unmask_from(&mut self.mask);
        }
        let i = (interval % self.est.write.len() as u64) as usize;
        let mut population = 0;
        if let Some(s) = &mut self.est.write[i] {
            s.arm_from(written, Some(&self.exclude));
            // The sample stands for the whole stratum, the few excluded pages included: they are
            // not different, only watched by the access sampler (or briefly unsafe to watch).
            population = if self.est.stratify {
                written_pages
            } else {
                self.everything.len()
            };
            s.mask_into(&mut self.mask);
            self.write_round = Some(WriteRound {
                sampler: i,
                population,
            });
        }
        for &gfn in &self.reprotect {
            self.mask[(gfn / 64) as usize] |= 1 << (gfn % 64);
        }
        if self.write_round.is_some() || !self.reprotect.is_empty() {
            vm.clear_dirty(&self.mask)?;
            self.map.note_cleared(&self.mask);
        }
        for gfn in self.reprotect.drain(..) {
            let armed = self.write_round.is_some()
                && self.est.write[i]
                    .as_ref()
                    .is_some_and(|s| s.armed().binary_search(&gfn).is_ok());
            if !armed {
                self.mask[(gfn / 64) as usize] &= !(1 << (gfn % 64));
            }
        }
        for &gfn in arming.pages.iter().chain(&arming.previous) {
            self.exclude.clear(gfn);
        }
        log::debug!(
            "interval {interval}: access sample {} pages ({} regions newly registered), write \
             sample from {population}",
            arming.pages.len(),
            arming.new_regions.len()
        );
        Ok(())
    }
}

/// An estimate in MiB, with its moving averages.
fn active(
    s: Stratified,
    skipped: u64,
    smoother: &mut Smoother,
    pages: u64,
    length: Duration,
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
        estimate_mib: mib(s.pages),
        ci_low_mib: mib(s.low),
        ci_high_mib: mib(s.high),
        fast_mib: sm.fast * ram_mib,
        slow_mib: sm.slow * ram_mib,
        max_mib: sm.max * ram_mib,
        error_mib: None,
        dirty_rate_mib_s: usage::dirty_rate_mib_s(mib(s.pages), length),
    }
}
