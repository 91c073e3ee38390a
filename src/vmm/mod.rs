//! The recipe: build guest memory and load the guest, create the VM and its vCPU, run until the
//! guest halts (doing the interval work at every tick), and summarise. What each step means lives
//! elsewhere: `config` (the validated options), `exits` (what an exit means), `protocol` (what the
//! guest says), `interval` (what an interval measures), `stop` (signals).

pub mod clock;
pub mod config;
pub mod exits;
pub mod outcome;
pub mod stop;

use std::io;
use std::time::{Duration, Instant};

use crate::contract::abi::{self, MsgKind};
use crate::contract::protocol::{Protocol, Reply};
use crate::devices::{Balloon, BalloonMmio};
use crate::kvm::boot;
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::Vm;
use crate::memory::GuestRam;
use crate::observe::access::AccessSampler;
use crate::observe::interval::{Estimators, IntervalWork};
use crate::row::{EndReason, Row};
use crate::units;
use crate::units::PAGE_SIZE;
use crate::vmm::clock::{Clock, Kicker, POLL};
use crate::vmm::config::RunConfig;
use crate::vmm::exits::{Action, ExitHandler};
pub use crate::vmm::outcome::{RunError, RunSummary};

/// Receives each row as it is complete; an error stops the run (a closed pipe quietly).
pub type OnRow<'a> = &'a mut dyn FnMut(&Row) -> io::Result<()>;

/// Boots the guest and runs its workload to the end, handing each interval's row to `on_row`.
pub fn run(cfg: RunConfig, on_row: OnRow<'_>) -> Result<RunSummary, RunError> {
    let t0 = Instant::now();
    // Memory: guest RAM with the image, descriptor tables and page tables.
    let ram = GuestRam::new(cfg.mem_bytes, cfg.hugepages)?;
    let image = boot::load_image(&ram, &cfg.image)?;
    let tables = boot::write_cpu_tables(&ram)?;
    // The VM (which owns the RAM) and its vCPU (which borrows the VM).
    let vm = Vm::new(ram)?;
    let mut vcpu = Vcpu::new(&vm, 0, image.entry, &tables)?;
    let tsc_khz = u64::from(vcpu.tsc_khz()?);
    let entries: Vec<_> = cfg.workload.phases.iter().map(|p| p.entry()).collect();
    // The balloon is announced as Linux finds virtio-mmio devices on its command line
    // (`<size>@<base>:<irq>`; no interrupt is ever raised: the driver polls).
    let cmdline = cfg.balloon.map_or(String::new(), |_| {
        format!(
            "virtio_mmio.device={}K@{:#x}:0",
            abi::balloon::MMIO_SIZE / 1024,
            abi::balloon::MMIO_BASE
        )
    });
    boot::write_boot_info(
        vm.ram(),
        tsc_khz,
        cfg.guest_seed,
        &entries,
        &cfg.workload.text,
        &cmdline,
    )?;
    let balloon = cfg
        .balloon
        .map(|b| Balloon::new(vm.ram().pages(), b.reporting, b.target_pages, b.hard_limit))
        .map(BalloonMmio::new);
    let mut vmm = Vmm {
        vm: &vm,
        handler: ExitHandler::new(vm.ram().size(), cfg.console, balloon),
        protocol: Protocol::new(cfg.workload.phases.iter().map(|p| p.to_string()), tsc_khz),
        work: IntervalWork::new(
            &vm,
            Estimators {
                write: cfg.samplers,
                write_smoother: cfg.smoother.clone(),
                access: AccessSampler::for_ram_or_announce(vm.ram(), cfg.access_samples, cfg.seed),
                access_cycle: cfg.access_cycle,
                access_smoother: cfg.smoother,
                stratify: cfg.stratify,
            },
        )?,
        clock: Clock::new(cfg.interval, cfg.timeout),
        next_tick: Instant::now(),
        interval_start: Instant::now(),
        tsc_khz,
        map_out: cfg.map_out,
        map_every: cfg.map_every,
        rows: Vec::new(),
        output: Ok(()),
        on_row,
    };
    vmm.next_tick = vmm.clock.tick(0);
    vmm.interval_start = vmm.clock.start;
    let setup = t0.elapsed();
    log::info!("set-up took {:.1} ms", setup.as_secs_f64() * 1e3);

    // Run, with a kicker thread for the interval ticks, the deadline and stop signals.
    let kicker = Kicker::spawn(vmm.clock.clone());
    let ended = vmm.run_loop(&mut vcpu);
    kicker.stop();
    vmm.handler.console.flush();

    // Report: the last row and the map, whatever ended the run, then the verdict.
    let failure = match ended? {
        Ended::Halted => {
            let device = (
                vmm.handler.report.errors,
                vmm.handler.report.first_error.as_deref(),
            );
            vmm.protocol.verdict(device).err().map(RunError::Guest)
        }
        Ended::Early(e) => Some(e),
    };
    let reason = failure
        .as_ref()
        .map_or(EndReason::Done, RunError::end_reason);
    vmm.tick(Some(reason))?;
    if let Some(e) = failure {
        return Err(e);
    }
    std::mem::replace(&mut vmm.output, Ok(())).map_err(RunError::from_output)?;
    vmm.summary(setup)
}

/// How the run loop ended, when the VMM itself did not fail.
enum Ended {
    /// The guest halted: the protocol judges whether it finished.
    Halted,
    /// A guest failure the CPU saw, a timeout, a signal or the output going away.
    Early(RunError),
}

/// Per-run state behind the loop.
struct Vmm<'vm, 'o> {
    vm: &'vm Vm,
    handler: ExitHandler,
    protocol: Protocol,
    work: IntervalWork,
    clock: Clock,
    /// The end of the current interval; ticks the loop was too busy for are skipped.
    next_tick: Instant,
    /// When the current interval began (its length goes into the dirty rate).
    interval_start: Instant,
    tsc_khz: u64,
    map_out: Option<std::path::PathBuf>,
    map_every: Option<u64>,
    rows: Vec<Row>,
    /// The first failure to hand out a row; no row is offered after one.
    output: io::Result<()>,
    on_row: OnRow<'o>,
}

impl Vmm<'_, '_> {
    fn run_loop(&mut self, vcpu: &mut Vcpu<'_>) -> Result<Ended, RunError> {
        loop {
            let exit = vcpu.run()?;
            let handled = self.handler.handle(exit, self.vm.ram());
            self.note_released()?;
            match handled {
                Ok(Action::Continue | Action::Kicked) => {}
                Ok(Action::Report { msg, kind, addr }) => {
                    let reply = self
                        .protocol
                        .message(&msg, kind, self.clock.start.elapsed());
                    if kind == MsgKind::Interval {
                        self.attach_guest_stats(msg.interval);
                    }
                    match reply {
                        Reply::None => {}
                        Reply::Value(v) => self.reply(addr, v)?,
                        Reply::Sleep(d) => {
                            let ticked = self.sleep(d)?;
                            self.reply(addr, u64::from(ticked))?;
                        }
                    }
                }
                Ok(Action::Halted) => return Ok(Ended::Halted),
                Err(error) => {
                    let rip = vcpu.rip().ok();
                    return Ok(Ended::Early(RunError::Exit { error, rip }));
                }
            }
            if let Some(e) = self.stop_due() {
                return Ok(Ended::Early(e));
            }
            if Instant::now() >= self.next_tick {
                self.tick(None)?;
            }
        }
    }

    /// A reason to stop now: the output failed, the deadline passed, or a signal came.
    fn stop_due(&mut self) -> Option<RunError> {
        let phase = || self.protocol.phase_name();
        // The failure stays in `self.output`, so that no further row is offered.
        if let Err(e) = &self.output {
            return Some(RunError::from_output(io::Error::new(
                e.kind(),
                e.to_string(),
            )));
        }
        if let Some(reason) = stop::requested() {
            return Some(RunError::Signal {
                reason,
                phase: phase(),
            });
        }
        if self.clock.past_deadline() {
            return Some(RunError::Timeout {
                timeout: self.clock.timeout.unwrap_or_default(),
                phase: phase(),
                fault: self.protocol.failure().cloned(),
            });
        }
        None
    }

    /// The guest's SLEEP: until `d` has passed, the next tick or a stop, whichever is first;
    /// does the tick's work if it came. True if a tick ended the sleep.
    fn sleep(&mut self, d: Duration) -> Result<bool, RunError> {
        let until = Instant::now().checked_add(d);
        loop {
            let now = Instant::now();
            let tick = self.next_tick;
            if now >= tick {
                self.tick(None)?;
                return Ok(true);
            }
            if until.is_some_and(|u| now >= u) || self.clock.past_deadline() {
                return Ok(false);
            }
            if stop::requested().is_some() {
                return Ok(false);
            }
            let wake = until.map_or(tick, |u| u.min(tick));
            std::thread::sleep((wake - now).min(POLL));
        }
    }

    /// The guest answers the statistics request of an interval tick on its next system call,
    /// which is the INTERVAL report that completes the row: the row shows those statistics.
    fn attach_guest_stats(&mut self, interval: u64) {
        let Some(stats) = self
            .handler
            .balloon
            .as_ref()
            .and_then(|b| b.device().stats())
        else {
            return;
        };
        if let Some(view) = self
            .protocol
            .ready_row_mut(interval)
            .and_then(|r| r.balloon.as_mut())
        {
            view.guest_stats = Some(stats.clone());
        }
    }

    /// Releases the pages the balloon handed out and tells the dirty log and the map (the vCPU
    /// is stopped: the guest has not run since). While the balloon has work left from a
    /// notification, the vCPU kicks itself, so that the next `KVM_RUN` returns at once: the work
    /// goes on at that exit, after the loop has looked at its clock and at signals, and the guest
    /// does not run until it is done.
    fn note_released(&mut self) -> Result<(), RunError> {
        if let Some(b) = &mut self.handler.balloon {
            let released = b.device_mut().take_released();
            if !released.is_empty() {
                // The balloon's memory owner, until the per-VM one does it.
                for r in &released {
                    self.vm.ram().discard(r.clone())?;
                }
                let interval = self.protocol.interval();
                self.work.note_released(self.vm, &released, interval)?;
            }
            if b.has_work() {
                // SAFETY: pthread_self has no preconditions.
                crate::kvm::vcpu::kick(unsafe { libc::pthread_self() });
            }
        }
        Ok(())
    }

    fn reply(&self, msg_addr: u64, v: u64) -> Result<(), RunError> {
        Ok(self
            .vm
            .ram()
            .write_obj(msg_addr + abi::MSG_REPLY_OFFSET, v)?)
    }

    /// Ends the current interval (`end`: the run's last, for this reason): measure, hand the row
    /// to the protocol, emit what is complete, write the map when due, and publish the next
    /// interval's number to the guest.
    fn tick(&mut self, end: Option<EndReason>) -> Result<(), RunError> {
        let last = end.is_some();
        let interval = self.protocol.interval();
        let now = Instant::now();
        let length = now - std::mem::replace(&mut self.interval_start, now);
        let measured = self.work.end(self.vm, interval, length, last)?;
        let row = Row {
            time_s: self.clock.start.elapsed().as_secs_f64(),
            interval,
            phase: self.protocol.phase_name(),
            end,
            length_s: length.as_secs_f64(),
            partial: last && length < self.clock.interval,
            configured_mib: units::mib(self.vm.ram().size()),
            guest: self.protocol.guest().clone(),
            truth: None,
            host: Some(measured.host),
            active: measured.active,
            reads_seen: self.work.reads_seen(),
            active_writes: measured.active_writes,
            balloon: self.handler.balloon.as_ref().map(BalloonMmio::view),
        };
        if !last && let Some(b) = &mut self.handler.balloon {
            b.request_stats(self.vm.ram());
        }
        self.protocol.interval_ended(row, last);
        for row in self.protocol.take_rows() {
            if self.output.is_ok() {
                self.output = (self.on_row)(&row);
            }
            self.rows.push(row);
        }
        let due = self
            .map_every
            .is_some_and(|n| (interval + 1).is_multiple_of(n));
        if last || due {
            self.write_map()?;
        }
        if !last {
            self.vm
                .ram()
                .write_obj(abi::BOOT_INFO_INTERVAL_ADDR, self.protocol.interval())?;
            let now = Instant::now();
            while self.next_tick <= now {
                self.next_tick += self.clock.interval;
            }
        }
        Ok(())
    }

    fn write_map(&self) -> Result<(), RunError> {
        if let Some(path) = &self.map_out {
            self.work.map().write_file(path)?;
        }
        Ok(())
    }

    /// The outcome, once the guest has finished.
    fn summary(self, setup: Duration) -> Result<RunSummary, RunError> {
        let ram = self.vm.ram();
        let map = self.work.map();
        let pool_backed = self.protocol.boot().map_or(0, |b| {
            let first = b.pool_start / PAGE_SIZE;
            map.backed_in(first..first.saturating_add(b.pool_pages))
        });
        Ok(RunSummary {
            mincore_resident: ram.resident_pages().map_err(RunError::Memory)?,
            pool_backed,
            setup_ms: setup.as_secs_f64() * 1e3,
            elapsed_s: self.clock.start.elapsed().as_secs_f64(),
            boot: self.protocol.boot(),
            map: map.summary(),
            report_errors: self.handler.report.errors + self.protocol.violations().0,
            unhandled_exits: self.handler.unhandled,
            tsc_khz: self.tsc_khz,
            balloon: self
                .handler
                .balloon
                .as_ref()
                .map(|b| b.device().counters.clone()),
            phases: self.protocol.phases().to_vec(),
            guest: self.protocol.guest().clone(),
            rows: self.rows,
        })
    }
}
