//! The work at each interval boundary, with the vCPU stopped: read KVM's dirty log, close the
//! sampler's round (t of n sampled pages written), harvest the PMP-MMP map, and arm a fresh sample
//! for the next interval. `docs/design.md` walks through it step by step.

use thiserror::Error;

use crate::pmp_mmp::{MapError, PmpMmpMap};
use crate::sampler::Sampler;
use crate::stats::{Estimate, Smoother};
use crate::usage::{self, Active, HostUsage};
use crate::vm::{Vm, VmError};

/// Why an interval's measurement failed.
#[derive(Debug, Error)]
pub enum IntervalError {
    #[error("the VM's dirty log")]
    Vm(#[from] VmError),
    #[error("the PMP-MMP map")]
    Map(#[from] MapError),
}

/// What one interval measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub host: HostUsage,
    /// The write estimate, if this interval was sampled.
    pub active: Option<Active>,
}

/// The map, the samplers and the moving averages, kept across intervals.
pub struct IntervalWork {
    map: PmpMmpMap,
    /// Cycled interval by interval (usually one); `None`: an interval without sampling.
    samplers: Vec<Option<Sampler>>,
    /// The sampler whose sample is armed now.
    armed: Option<usize>,
    /// Whole-slot bitmap holding the armed sample's bits, for `KVM_CLEAR_DIRTY_LOG`.
    mask: Vec<u64>,
    smoother: Smoother,
}

impl IntervalWork {
    /// Starts measuring `vm`'s RAM; arms the first sample.
    pub fn new(
        vm: &Vm,
        samplers: Vec<Option<Sampler>>,
        smoother: Smoother,
    ) -> Result<Self, IntervalError> {
        let ram = vm.ram();
        let mut work = IntervalWork {
            map: PmpMmpMap::new(ram.host_addr(), ram.pages())?,
            samplers,
            armed: None,
            mask: vec![0u64; ram.pages().div_ceil(64) as usize],
            smoother,
        };
        work.arm(vm, 0)?;
        Ok(work)
    }

    /// The PMP-MMP map.
    pub fn map(&self) -> &PmpMmpMap {
        &self.map
    }

    /// Ends interval `interval`: the estimate from the armed sample, then the harvest (and, when
    /// `last`, a full refresh of the map). Unless `last`, arms the next interval's sample.
    pub fn end(&mut self, vm: &Vm, interval: u64, last: bool) -> Result<Measured, IntervalError> {
        let ram = vm.ram();
        let dirty = vm.dirty_log()?;
        let vmm_dirty = ram.take_vmm_dirty();
        let ram_mib = usage::mib(ram.size());
        let active = self.armed.and_then(|i| self.samplers[i].as_ref()).map(|s| {
            let n = s.armed().len() as u64;
            let t = s.count_touched(&dirty);
            let est = Estimate::from_counts(t, n);
            let sm = self.smoother.update(est.fraction);
            Active {
                n,
                t,
                estimate_mib: est.fraction * ram_mib,
                ci_low_mib: est.low * ram_mib,
                ci_high_mib: est.high * ram_mib,
                fast_mib: sm.fast * ram_mib,
                slow_mib: sm.slow * ram_mib,
                max_mib: sm.max * ram_mib,
                error_mib: None,
            }
        });
        // The map's interval numbers are u32; a run would need 136 years of 1 s intervals to wrap.
        self.map.harvest(
            &dirty,
            &vmm_dirty,
            u32::try_from(interval).unwrap_or(u32::MAX - 1),
        )?;
        if last {
            self.map.refresh()?;
        } else {
            self.arm(vm, interval + 1)?;
        }
        let host = HostUsage::new(&self.map.summary(), usage::rss_bytes().unwrap_or(0));
        Ok(Measured { host, active })
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
        let dirty = vm.dirty_log()?;
        let interval = u32::try_from(interval).unwrap_or(u32::MAX - 1);
        for r in ranges {
            self.map.note_released(r.clone(), &dirty, interval);
        }
        let mut mask = vec![0u64; self.mask.len()];
        let pages = vm.ram().pages();
        for r in ranges {
            for gfn in r.start..r.end.min(pages) {
                mask[(gfn / 64) as usize] |= 1 << (gfn % 64);
            }
        }
        vm.clear_dirty(&mask)?;
        self.map.note_cleared(&mask);
        Ok(())
    }

    /// Write-protects a fresh random sample for `interval` (only its bits are cleared in KVM).
    fn arm(&mut self, vm: &Vm, interval: u64) -> Result<(), IntervalError> {
        if let Some(s) = self.armed.take().and_then(|i| self.samplers[i].as_ref()) {
            s.unmask_from(&mut self.mask);
        }
        let i = (interval % self.samplers.len() as u64) as usize;
        let Some(s) = &mut self.samplers[i] else {
            return Ok(());
        };
        s.arm();
        s.mask_into(&mut self.mask);
        vm.clear_dirty(&self.mask)?;
        self.map.note_cleared(&self.mask);
        self.armed = Some(i);
        Ok(())
    }
}
