//! The recipe: build guest memory and load the guest, create the VM and its vCPU, run until the
//! guest halts (doing the interval work at every tick), and summarise. What each step means lives
//! elsewhere: `config` (the validated options), `clock` (the intervals and their numbers), `exits`
//! (what an exit means), `protocol` (what the guest says), `interval` (what an interval measures),
//! `rows` (when a row is complete), `stop` (signals).

pub mod builder;
pub mod clock;
pub mod command;
pub mod config;
pub mod console_file;
pub mod exits;
pub mod outcome;
pub mod pause;
pub mod rows;
pub mod stop;
pub mod swap;

use std::io;
use std::time::{Duration, Instant};

use crate::contract::abi;
use crate::contract::protocol::{News, Protocol, Reply};
use crate::contract::workload::Phase;
use crate::devices::{Balloon, BalloonMmio};
use crate::kvm::boot;
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::Vm;
use crate::memory::GuestRam;
use crate::observe::access::AccessSampler;
use crate::observe::interval::{Estimators, IntervalWork};
use crate::observe::sampler::Sampler;
use crate::row::{Check, EndReason, Row};
use crate::units;
use crate::units::PAGE_SIZE;
use crate::vmm::clock::{Clock, Kicker, POLL};
use crate::vmm::command::Inbox;
pub use crate::vmm::command::{Abilities, Command, CommandError, Controller};
use crate::vmm::config::RunConfig;
use crate::vmm::exits::{Action, ExitHandler};
pub use crate::vmm::outcome::{RunError, RunSummary};
use crate::vmm::pause::Pause;
use crate::vmm::rows::Joiner;
use crate::vmm::swap::HypervisorSwap;

/// Receives each row as soon as it is complete, on the vCPU thread: it must not block (the
/// binary queues it for a writer thread). An error stops the run (a closed pipe quietly).
pub type OnRow<'a> = &'a mut dyn FnMut(&Row) -> io::Result<()>;

/// Sets up and runs the guest's workload to the end, handing each interval's row to `on_row`.
pub fn run(cfg: RunConfig, on_row: OnRow<'_>) -> Result<RunSummary, RunError> {
    setup(cfg)?.run(on_row)
}

/// Builds everything a run needs but the vCPU: guest memory with the guest loaded, the VM, the
/// devices, the interval work and the console. The result is driven through its
/// [`Controller`](Ready::controller) and started with [`Ready::run`].
pub fn setup(cfg: RunConfig) -> Result<Ready, RunError> {
    let t0 = Instant::now();
    // Memory: guest RAM with the image, descriptor tables and page tables.
    let ram = GuestRam::new(cfg.mem_bytes, cfg.hugepages)?;
    if cfg.ksm {
        ram.merge()?;
    }
    let image = boot::load_image(&ram, &cfg.image()?)?;
    let tables = boot::write_cpu_tables(&ram)?;
    // The VM owns the RAM.
    let vm = Vm::new(ram)?;
    let balloon = cfg
        .balloon
        .map(|b| Balloon::new(vm.ram().pages(), b.reporting, b.target_pages, b.hard_limit))
        .map(BalloonMmio::new);
    let samplers = cfg.write_samplers()?;
    let (inbox, controller) = Inbox::new(Abilities {
        balloon: balloon.is_some(),
        swap: cfg.swap.is_some(),
    });
    let handler = ExitHandler::new(vm.ram().size(), cfg.console.open()?, balloon);
    Ok(Ready {
        entry: image.entry,
        tables,
        handler,
        samplers,
        inbox,
        controller,
        setup: t0.elapsed(),
        cfg,
        vm,
    })
}

/// A VM set up and not yet running. Its vCPU is created by [`run`](Ready::run) on the thread
/// that calls it (a vCPU belongs to its thread).
pub struct Ready {
    cfg: RunConfig,
    entry: u64,
    tables: boot::CpuTables,
    handler: ExitHandler,
    /// The write samplers (the access sampler and the interval work are made once the guest's
    /// boot information is written, as they watch guest memory from then on).
    samplers: Vec<Option<Sampler>>,
    inbox: Inbox,
    controller: Controller,
    setup: Duration,
    // Last: everything above may refer to guest memory, which the VM owns.
    vm: Vm,
}

impl Ready {
    /// A handle through which another thread sets the targets, stops the run and reads the
    /// latest row (clone it for as many controllers as wanted).
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Creates the vCPU on this thread, boots the guest and runs its workload to the end (or
    /// until a stop), handing each interval's row to `on_row`.
    pub fn run(self, on_row: OnRow<'_>) -> Result<RunSummary, RunError> {
        let t0 = Instant::now();
        let Ready {
            cfg,
            entry,
            tables,
            handler,
            samplers,
            inbox,
            controller,
            setup,
            vm,
        } = self;
        drop(controller);
        let mut vcpu = Vcpu::new(&vm, 0, entry, &tables)?;
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
        let mut work = IntervalWork::new(
            &vm,
            Estimators {
                write: samplers,
                write_smoother: cfg.smoother.clone(),
                access: AccessSampler::for_memory_or_announce(
                    vm.memory(),
                    cfg.access_samples,
                    cfg.access_seed,
                ),
                access_cycle: cfg.access_cycle.clone(),
                access_smoother: cfg.smoother.clone(),
                stratify: cfg.stratify,
            },
        )?;
        if cfg.ksm {
            work.watch_sharing();
        }
        // Hypervisor swap after the access sampler, which starts the fault handler with its stash.
        let swap = cfg
            .swap
            .clone()
            .map(|c| HypervisorSwap::new(&vm, c))
            .transpose()?;
        // The clock starts here, and with it the kicker thread (stopped when `vmm` is dropped).
        let clock = Clock::new(cfg.interval, cfg.timeout);
        let kicker = Kicker::spawn(clock.grid(), inbox.pending());
        let mut vmm = Vmm {
            vm: &vm,
            handler,
            protocol: Protocol::new(cfg.workload.phases.iter().map(|p| p.to_string()), tsc_khz),
            check_phases: (cfg.workload.phases.iter())
                .map(|p| matches!(p, Phase::Check { .. }))
                .collect(),
            work,
            swap,
            joiner: Joiner::new(rows::grace(cfg.interval)),
            clock,
            kicker,
            check: None,
            tsc_khz,
            map_out: cfg.map_out.clone(),
            map_every: cfg.map_every,
            output: Ok(()),
            on_row,
            inbox,
            stopped: false,
            pause: Pause::default(),
        };
        let setup = setup + t0.elapsed();
        log::info!("set-up took {:.1} ms", setup.as_secs_f64() * 1e3);

        let ended = vmm.run_loop(&mut vcpu);
        vmm.kicker.stop();
        vmm.handler.console.flush();

        // Report: the last row and the map, whatever ended the run, then the verdict.
        let failure = match ended? {
            Ended::Halted => {
                let device = (
                    vmm.handler.report.errors,
                    vmm.handler.report.first_error.as_deref(),
                );
                vmm.protocol
                    .verdict(device)
                    .err()
                    .map(|e| RunError::Guest(e.explained(&cfg.workload)))
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
}

/// Says how long a phase ran, in the guest's time (`RUST_LOG=memvisor=info`; benches time
/// phases with it).
fn log_phase(p: &crate::contract::protocol::PhaseRecord) {
    log::info!(
        "phase {} ({}) ran {:.3} s",
        p.index,
        p.name,
        p.end_s - p.start_s
    );
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
    /// Which phases are `check` phases (their results go on a row).
    check_phases: Vec<bool>,
    work: IntervalWork,
    /// Hypervisor swap, when on (`--swap`).
    swap: Option<HypervisorSwap>,
    /// Pairs each measured row with the guest's truth and lets it go.
    joiner: Joiner,
    /// The interval grid and the interval now running.
    clock: Clock,
    kicker: Kicker,
    /// The check phases that ended in the running interval.
    check: Option<Check>,
    tsc_khz: u64,
    map_out: Option<std::path::PathBuf>,
    map_every: Option<u64>,
    /// The first failure to hand out a row; no row is offered after one.
    output: io::Result<()>,
    on_row: OnRow<'o>,
    /// Commands from controllers, and where the latest row is published.
    inbox: Inbox,
    /// A controller asked the run to stop.
    stopped: bool,
    /// A controller holds the vCPU out of the guest.
    pause: Pause,
}

/// What one step of waiting outside the guest came to ([`Vmm::wait`]).
enum Waited {
    /// An interval ended, and its work was done.
    Ticked,
    /// The time waited for came, or a reason to stop.
    Over,
    /// Neither yet.
    Slept,
}

impl Vmm<'_, '_> {
    fn run_loop(&mut self, vcpu: &mut Vcpu<'_>) -> Result<Ended, RunError> {
        loop {
            if self.pause.is_paused() {
                self.hold()?;
                if let Some(e) = self.stop_due() {
                    return Ok(Ended::Early(e));
                }
                continue;
            }
            let exit = vcpu.run()?;
            // A swapped page that could not be read back ends the run before anything the guest
            // did after it (on a page of zeros) is believed.
            if let Some(e) = self.swap.as_ref().and_then(|s| s.failure(self.vm)) {
                return Ok(Ended::Early(e.into()));
            }
            let handled = self.handler.handle(exit, self.vm.ram());
            self.note_released()?;
            self.take_commands();
            match handled {
                Ok(Action::Continue | Action::Kicked) => {}
                Ok(Action::Report { msg, kind, addr }) => {
                    let (reply, news) = self.protocol.message(
                        &msg,
                        kind,
                        self.clock.elapsed(),
                        self.clock.current(),
                    );
                    self.news(news);
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
            let now = Instant::now();
            if now >= self.clock.ends() {
                self.tick(None)?;
            } else if let Some(row) = self.joiner.expired(now) {
                self.emit(row);
            }
        }
    }

    /// Acts on what a guest message told: a truth completes its row, which leaves at once; a
    /// check phase's result waits for the row of this interval.
    fn news(&mut self, news: News) {
        match news {
            News::Nothing => {}
            News::Truth { interval, truth } => {
                if let Some(mut row) = self.joiner.truth(interval, truth) {
                    self.attach_guest_stats(&mut row);
                    self.emit(row);
                    self.kicker.alarm(None);
                }
            }
            News::PhaseEnded(i) if self.check_phases.get(i) == Some(&true) => {
                let p = &self.protocol.phases()[i];
                log_phase(p);
                let check = Check {
                    phase: p.name.clone(),
                    checked_pages: p.touched_pages,
                    intact_pages: p.intact_pages,
                    zero_pages: p.zero_pages,
                    intact_mib: units::pages_mib(p.intact_pages),
                    zero_mib: units::pages_mib(p.zero_pages),
                };
                match &mut self.check {
                    Some(c) => c.add(check),
                    None => self.check = Some(check),
                }
            }
            News::PhaseEnded(i) => {
                if let Some(p) = self.protocol.phases().get(i) {
                    log_phase(p);
                }
            }
        }
    }

    /// Applies what controllers queued (bounded: the queue holds at most
    /// [`command::QUEUE`]); the vCPU is stopped meanwhile.
    fn take_commands(&mut self) {
        while let Some(c) = self.inbox.take() {
            match c {
                Command::SetBalloonTarget { mib } => {
                    if let Some(b) = &mut self.handler.balloon {
                        let pages = mib.saturating_mul(units::MIB / PAGE_SIZE);
                        let set = b.device_mut().set_target(pages);
                        log::info!(
                            "balloon target set to {}",
                            units::fmt_mib(u64::from(set) * PAGE_SIZE)
                        );
                    }
                }
                // The controller refuses it while swap is off.
                Command::SetSwapTarget { mib } => {
                    if let Some(swap) = &mut self.swap {
                        swap.set_target(mib.saturating_mul(units::MIB / PAGE_SIZE));
                    }
                }
                Command::Pause => self.pause.pause(Instant::now()),
                Command::Resume => self.pause.resume(Instant::now()),
                Command::Stop => self.stopped = true,
            }
        }
    }

    /// Hands a complete row out (unless an earlier one failed to go), and makes it the one
    /// controllers see.
    fn emit(&mut self, row: Row) {
        self.inbox.publish(&row);
        if self.output.is_ok() {
            self.output = (self.on_row)(&row);
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
        if self.stopped {
            return Some(RunError::Stopped { phase: phase() });
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

    /// The guest's SLEEP: until `d` has passed, the next tick or a reason to stop, whichever is
    /// first; does the tick's work if it came (and lets a row go whose grace ran out meanwhile).
    /// True if a tick ended the sleep.
    fn sleep(&mut self, d: Duration) -> Result<bool, RunError> {
        let until = Instant::now().checked_add(d);
        loop {
            match self.wait(until)? {
                Waited::Ticked => return Ok(true),
                Waited::Over => return Ok(false),
                Waited::Slept => {}
            }
        }
    }

    /// While a controller holds the vCPU out of the guest: the intervals go on (their work at
    /// each boundary, rows whose grace ran out) and commands are taken, until a resume or a
    /// reason to stop.
    fn hold(&mut self) -> Result<(), RunError> {
        while self.pause.is_paused() {
            if let Waited::Over = self.wait(None)? {
                break;
            }
        }
        Ok(())
    }

    /// One step of waiting outside the guest: the interval's work if its boundary came;
    /// otherwise a row whose grace ran out goes and commands are taken, and, unless `until` came
    /// or there is a reason to stop (the deadline, a signal, a controller's stop, a failed
    /// output), a sleep until the next thing due (at most [`POLL`]).
    fn wait(&mut self, until: Option<Instant>) -> Result<Waited, RunError> {
        let now = Instant::now();
        let tick = self.clock.ends();
        if now >= tick {
            self.tick(None)?;
            return Ok(Waited::Ticked);
        }
        if let Some(row) = self.joiner.expired(now) {
            self.emit(row);
        }
        self.take_commands();
        let stop = stop::requested().is_some() || self.stopped || self.output.is_err();
        if stop || until.is_some_and(|u| now >= u) || self.clock.past_deadline() {
            return Ok(Waited::Over);
        }
        let wake = [until, self.joiner.deadline()]
            .into_iter()
            .flatten()
            .fold(tick, Instant::min);
        std::thread::sleep(wake.saturating_duration_since(now).min(POLL));
        Ok(Waited::Slept)
    }

    /// The guest answers the statistics request of an interval tick on its next system call,
    /// which is the INTERVAL report that completes the row: the row shows those statistics.
    fn attach_guest_stats(&self, row: &mut Row) {
        let Some(stats) = self
            .handler
            .balloon
            .as_ref()
            .and_then(|b| b.device().stats())
        else {
            return;
        };
        if let Some(view) = row.balloon.as_mut() {
            view.guest_stats = Some(stats.clone());
        }
    }

    /// Releases the pages the balloon just handed out, through the VM (the one owner of every
    /// release: it discards them, keeping the dirty log and the fault handler in step), and tells
    /// the map (the vCPU is stopped: the guest has not run since). While the balloon has work left
    /// from a notification, the vCPU kicks itself, so that the next `KVM_RUN` returns at once: the
    /// work goes on at that exit, after the loop has looked at its clock and at signals, and the
    /// guest does not run until it is done.
    fn note_released(&mut self) -> Result<(), RunError> {
        if let Some(b) = &mut self.handler.balloon {
            let ranges = b.device_mut().take_released();
            if !ranges.is_empty() {
                self.work.release(self.vm, &ranges, self.clock.current())?;
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
    /// to the joiner (it leaves at once if its truth is here, else when the truth comes or its
    /// grace runs out), write the map when due, and publish the next interval's number.
    fn tick(&mut self, end: Option<EndReason>) -> Result<(), RunError> {
        let last = end.is_some();
        let ended = self.clock.end_interval(Instant::now(), last);
        let interval = ended.interval;
        let swap = match &mut self.swap {
            Some(s) => {
                Some(s.end_interval(self.vm, &mut self.work, interval, ended.length, last)?)
            }
            None => None,
        };
        let measured = self.work.end(self.vm, interval, ended.length, last)?;
        let paused = self.pause.end_interval(Instant::now());
        let row = Row {
            schema_version: crate::row::SchemaVersion,
            time_s: self.clock.elapsed().as_secs_f64(),
            interval,
            phase: self.protocol.phase_name(),
            end,
            length_s: ended.length.as_secs_f64(),
            partial: ended.partial,
            paused_s: paused.as_secs_f64(),
            configured_mib: units::mib(self.vm.ram().size()),
            guest: self.protocol.guest().clone(),
            truth: None,
            host: Some(measured.host),
            active: measured.active,
            reads_seen: self.work.reads_seen(),
            active_writes: measured.active_writes,
            balloon: self.handler.balloon.as_ref().map(BalloonMmio::view),
            swap,
            check: self.check.take(),
            vmm: Some(measured.work),
        };
        if !last && let Some(b) = &mut self.handler.balloon {
            b.request_stats(self.vm.ram());
        }
        for row in self.joiner.measured(row, last, Instant::now()) {
            self.emit(row);
        }
        self.kicker.alarm(self.joiner.deadline());
        let due = self
            .map_every
            .is_some_and(|n| (interval + 1).is_multiple_of(n));
        if last {
            self.write_map()?;
        } else if due && let Err(e) = self.write_map() {
            // A periodic map is a snapshot for watchers: a failed one (a full disk) warns and
            // the run goes on, keeping its rows; the next one retries, and the final one (after
            // the last row) is an error if it fails too.
            log::warn!("interval {interval}: {e}; the run goes on");
        }
        if !last {
            self.vm
                .ram()
                .write_obj(abi::BOOT_INFO_INTERVAL_ADDR, self.clock.current())?;
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
            vmm_zero_mapped: map.vmm_zero_mapped(),
            pool_backed,
            setup_ms: setup.as_secs_f64() * 1e3,
            elapsed_s: self.clock.elapsed().as_secs_f64(),
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
        })
    }
}
