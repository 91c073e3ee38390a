//! The run loop: build memory, load the guest, create the VM and vCPU, run, and once per interval
//! harvest the PMP-MMP map, close the sampler's round and emit a [`Row`].
//!
//! Exit handling ([`ExitHandler::handle`]) is separate from `KVM_RUN` so that unit tests can feed it
//! synthetic exits.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::abi::{self, Message, MsgKind, PAGE_SIZE};
use crate::boot::{self, BootError};
use crate::devices::{Console, ReportChannel};
use crate::memory::{GuestRam, MemoryError};
use crate::pmp_mmp::{MapError, MapSummary, PmpMmpMap};
use crate::sampler::{Sampler, SamplerError};
use crate::stats::{Estimate, Smoother};
use crate::usage::{self, Active, GuestView, HostUsage, Row, Truth, pages_mib};
use crate::vcpu::{self, Exit, Vcpu, VcpuError};
use crate::vm::{Vm, VmError};
use crate::workload::Workload;

/// Everything a run needs.
pub struct RunConfig {
    pub mem_bytes: u64,
    pub hugepages: bool,
    pub workload: Workload,
    /// The guest ELF image.
    pub image: Vec<u8>,
    pub timeout: Option<Duration>,
    pub interval: Duration,
    /// Pages sampled per interval; `None` turns sampling off.
    pub samples: Option<u64>,
    /// For benchmarks: sample sizes cycled interval by interval (`None` = off for that interval),
    /// so that sampling costs can be compared inside one run. Empty: always `samples`.
    pub sample_cycle: Vec<Option<u64>>,
    pub seed: Option<u64>,
    pub ewma_fast: f64,
    pub ewma_slow: f64,
    /// Write the PMP-MMP map here at the end (and every `map_every` intervals).
    pub map_out: Option<PathBuf>,
    pub map_every: Option<u64>,
    /// Where the guest's console goes.
    pub console: Box<dyn Write + Send>,
}

impl RunConfig {
    /// Defaults for a given workload and image (256 MiB, 1 s interval, 1000 samples).
    pub fn new(workload: Workload, image: Vec<u8>) -> Self {
        RunConfig {
            mem_bytes: 256 << 20,
            hugepages: false,
            workload,
            image,
            timeout: None,
            interval: Duration::from_secs(1),
            samples: Some(1000),
            sample_cycle: Vec::new(),
            seed: None,
            ewma_fast: crate::stats::DEFAULT_FAST_ALPHA,
            ewma_slow: crate::stats::DEFAULT_SLOW_ALPHA,
            map_out: None,
            map_every: None,
            console: Box::new(std::io::stderr()),
        }
    }

    /// The sample size of each interval, cycled.
    fn sample_sizes(&self) -> Vec<Option<u64>> {
        if self.sample_cycle.is_empty() {
            vec![self.samples]
        } else {
            self.sample_cycle.clone()
        }
    }

    /// Checks the options before anything is built, with messages that name the bad value.
    pub fn validate(&self) -> Result<(), RunError> {
        GuestRam::validate_size(self.mem_bytes)?;
        if self.interval < MIN_INTERVAL {
            return Err(RunError::Config(format!(
                "--interval {:?} is too short; the minimum is {MIN_INTERVAL:?}",
                self.interval
            )));
        }
        if self.interval > MAX_INTERVAL {
            return Err(RunError::Config(format!(
                "--interval {:?} is too long; the maximum is {MAX_INTERVAL:?}",
                self.interval
            )));
        }
        for n in self.sample_sizes().into_iter().flatten() {
            Sampler::new(n, self.mem_bytes / PAGE_SIZE, Some(0))
                .map_err(|e| RunError::Config(format!("--samples {n}: {e}")))?;
        }
        Smoother::new(self.ewma_fast, self.ewma_slow)
            .map_err(|e| RunError::Config(e.to_string()))?;
        if self.timeout == Some(Duration::ZERO) {
            return Err(RunError::Config("--timeout must be more than 0".into()));
        }
        Ok(())
    }
}

/// Shortest reporting interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest reporting interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Why a run failed.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("vCPU: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("PMP-MMP map: {0}")]
    Map(#[from] MapError),
    #[error("sampler: {0}")]
    Sampler(#[from] SamplerError),
    #[error("writing the map file {path}: {source}")]
    MapFile { path: String, source: MapError },
    #[error("the guest triple-faulted (KVM shutdown exit) at RIP {rip:#x}")]
    TripleFault { rip: u64 },
    #[error(
        "the guest took exception {name} (vector {vector}, error code {error:#x}) in {ring} at RIP {rip:#x}{cr2}"
    )]
    GuestException {
        name: &'static str,
        vector: u64,
        error: u64,
        ring: &'static str,
        rip: u64,
        cr2: String,
    },
    #[error("the guest kernel could not boot: {0}")]
    GuestBoot(&'static str),
    #[error("the guest did not finish within {timeout:?} (last phase: {phase})")]
    Timeout { timeout: Duration, phase: String },
    #[error("the guest halted before finishing its workload (last phase: {phase}){device}")]
    HaltedEarly { phase: String, device: String },
    #[error("the guest ran out of memory in phase {phase} ({name})")]
    GuestOutOfMemory { phase: u64, name: String },
    #[error("the guest reported failure status {status} in phase {phase} ({name})")]
    GuestPhaseFailed {
        phase: u64,
        name: String,
        status: u64,
    },
    #[error("VM entry failed (hardware reason {0:#x})")]
    EntryFailed(u64),
    #[error("KVM internal error (emulation failure?) at RIP {rip:#x}")]
    Internal { rip: u64 },
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
}

/// What the exit handler wants the run loop to do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Run the guest again.
    Continue,
    /// A decoded report-channel message at a guest-physical address.
    Report { msg: Message, addr: u64 },
    /// The guest halted.
    Halted,
    /// The guest triple-faulted.
    TripleFault,
    /// VM entry failed.
    EntryFailed(u64),
    /// KVM gave up.
    Internal,
    /// The run loop was kicked.
    Kicked,
    /// Anything else.
    Unexpected(String),
}

/// Port and MMIO dispatch; owns the devices.
pub struct ExitHandler {
    pub console: Console,
    pub report: ReportChannel,
    /// Accesses to ports or MMIO nobody handles.
    pub unhandled: u64,
}

impl ExitHandler {
    /// Devices for a guest with `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64, console: Box<dyn Write + Send>) -> Self {
        ExitHandler {
            console: Console::new(console),
            report: ReportChannel::new(ram_bytes),
            unhandled: 0,
        }
    }

    fn note_unhandled(&mut self, what: String) {
        self.unhandled += 1;
        if self.unhandled <= 5 {
            log::warn!("unhandled guest access: {what}");
        }
    }

    /// Handles one exit. Never panics on guest input: garbage is counted and logged.
    pub fn handle(&mut self, exit: Exit<'_>, ram: &GuestRam) -> Action {
        let serial = abi::SERIAL_PORT_BASE..abi::SERIAL_PORT_BASE + 8;
        match exit {
            Exit::IoOut { port, data } if serial.contains(&port) => {
                self.console
                    .write((port - abi::SERIAL_PORT_BASE) as u8, data);
                Action::Continue
            }
            Exit::IoIn { port, data } if serial.contains(&port) => {
                self.console
                    .read((port - abi::SERIAL_PORT_BASE) as u8, data);
                Action::Continue
            }
            Exit::IoOut { port, data } if port == abi::REPORT_PORT => {
                let Ok(addr) = self.report.write(0, data) else {
                    return Action::Continue;
                };
                let mut buf = [0u8; abi::MSG_SIZE];
                if let Err(e) = ram.read(addr, &mut buf) {
                    self.report.note_error(e.to_string());
                    return Action::Continue;
                }
                match Message::parse(&buf) {
                    Ok(msg) => Action::Report { msg, addr },
                    Err(e) => {
                        self.report.note_error(format!("message at {addr:#x}: {e}"));
                        Action::Continue
                    }
                }
            }
            Exit::IoIn { port, data } if port == abi::REPORT_PORT => {
                self.report.read(0, data);
                Action::Continue
            }
            Exit::IoOut { port, data } => {
                self.note_unhandled(format!("out to port {port:#x} ({} bytes)", data.len()));
                Action::Continue
            }
            Exit::IoIn { port, data } => {
                data.fill(0xff);
                self.note_unhandled(format!("in from port {port:#x}"));
                Action::Continue
            }
            Exit::MmioRead { addr, data } => {
                data.fill(0xff);
                self.note_unhandled(format!("MMIO read at {addr:#x}"));
                Action::Continue
            }
            Exit::MmioWrite { addr, data } => {
                self.note_unhandled(format!("MMIO write at {addr:#x} ({} bytes)", data.len()));
                Action::Continue
            }
            Exit::Hlt => Action::Halted,
            Exit::Shutdown => Action::TripleFault,
            Exit::Interrupted => Action::Kicked,
            Exit::FailEntry(r) => Action::EntryFailed(r),
            Exit::InternalError => Action::Internal,
            Exit::Other(s) => Action::Unexpected(s),
        }
    }
}

/// A phase as the guest ran it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PhaseRecord {
    pub index: u64,
    pub name: String,
    pub started: bool,
    pub ended: bool,
    pub start_s: f64,
    pub end_s: f64,
    /// Distinct heap pages touched / written over the whole phase.
    pub touched_pages: u64,
    pub written_pages: u64,
    pub iterations: u64,
    pub status: u64,
    /// The guest's lists when the phase ended.
    pub allocated_pages: u64,
    pub free_pages: u64,
    pub heap_pages: u64,
    /// Guest seconds the phase took (from its TSC).
    pub guest_seconds: f64,
    /// The VMM's clock when the phase started, as the guest read it with the TIME hypercall (ns).
    pub vmm_start_ns: u64,
}

/// What the guest kernel said at boot.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct BootReport {
    pub pool_start: u64,
    pub pool_pages: u64,
    pub reserved_pages: u64,
}

/// The outcome of a run.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// From the start of set-up to the first `KVM_RUN`.
    pub setup_ms: f64,
    pub elapsed_s: f64,
    pub boot: Option<BootReport>,
    pub phases: Vec<PhaseRecord>,
    pub rows: Vec<Row>,
    pub guest: GuestView,
    pub map: MapSummary,
    /// At the end: guest pages mincore() calls resident (backed + zero-page mappings).
    pub mincore_resident: u64,
    /// At the end: backed pages inside the guest kernel's pool (the pages its lists manage).
    pub pool_backed: u64,
    pub report_errors: u64,
    pub unhandled_exits: u64,
    pub tsc_khz: u64,
}

/// Per-run state behind the loop.
struct Vmm {
    ram: GuestRam,
    vm: Vm,
    handler: ExitHandler,
    map: PmpMmpMap,
    /// Samplers cycled interval by interval (usually one); `None` entries are intervals without.
    samplers: Vec<Option<Sampler>>,
    /// The sampler whose sample is armed in the current interval.
    armed: Option<usize>,
    mask: Vec<u64>,
    smoother: Smoother,
    interval: Duration,
    map_out: Option<PathBuf>,
    map_every: Option<u64>,
    tsc_khz: u64,
    start: Instant,
    next_tick: Instant,
    window: u64,
    phases: Vec<PhaseRecord>,
    current_phase: Option<usize>,
    boot: Option<BootReport>,
    guest: GuestView,
    done: bool,
    truths: HashMap<u64, Truth>,
    pending: Option<Row>,
    rows: Vec<Row>,
    failure: Option<RunError>,
}

/// Boots the guest and runs its workload to the end, calling `on_row` once per interval.
///
/// The recipe: build guest memory and load the guest, create the VM and the vCPU, run until the
/// guest halts (with an interval tick now and then), and summarise.
pub fn run(cfg: RunConfig, on_row: &mut dyn FnMut(&Row)) -> Result<RunSummary, RunError> {
    cfg.validate()?;
    let timeout = cfg.timeout;
    let t0 = Instant::now();
    let (mut vmm, mut vcpu) = Vmm::new(cfg)?;
    let setup = t0.elapsed();
    log::info!("set-up took {:.1} ms", setup.as_secs_f64() * 1e3);

    vmm.start = Instant::now();
    vmm.next_tick = vmm.start + vmm.interval;
    let deadline = timeout.map(|t| vmm.start + t);
    let stop = Arc::new(AtomicBool::new(false));
    let kicker = spawn_kicker(vmm.start, vmm.interval, deadline, stop.clone());
    let result = vmm.run_loop(&mut vcpu, deadline, timeout, on_row);
    stop.store(true, Ordering::Relaxed);
    let _ = kicker.join();
    vmm.handler.console.flush();
    result?;
    vmm.summary(setup)
}

/// A thread that kicks the vCPU thread out of `KVM_RUN` at every interval tick and at the deadline.
fn spawn_kicker(
    start: Instant,
    interval: Duration,
    deadline: Option<Instant>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    // SAFETY: pthread_self has no preconditions.
    let target = unsafe { libc::pthread_self() };
    std::thread::spawn(move || {
        let mut k = 1u32;
        let mut deadline_kicked = false;
        while !stop.load(Ordering::Relaxed) {
            let tick = start + interval * k;
            let wake = match deadline {
                Some(d) if !deadline_kicked && d < tick => d,
                _ => tick,
            };
            let now = Instant::now();
            if now < wake {
                std::thread::sleep((wake - now).min(Duration::from_millis(20)));
                continue;
            }
            if wake == tick {
                k += 1;
            } else {
                deadline_kicked = true;
            }
            vcpu::kick(target);
        }
    })
}

impl Vmm {
    /// Guest RAM with the image and boot structures, the VM, the vCPU, the map and the samplers.
    fn new(cfg: RunConfig) -> Result<(Self, Vcpu), RunError> {
        let ram = GuestRam::new(cfg.mem_bytes, cfg.hugepages)?;
        let image = boot::load_image(&ram, &cfg.image)?;
        let vm = Vm::new(&ram)?;
        let vcpu = Vcpu::new(&vm, 0, image.entry)?;
        let tsc_khz = vcpu.tsc_khz()? as u64;
        let entries: Vec<_> = cfg.workload.phases.iter().map(|p| p.entry()).collect();
        let seed = cfg.seed.unwrap_or_else(rand::random);
        boot::write_boot_structures(&ram, tsc_khz, seed, &entries, &cfg.workload.text)?;
        let map = PmpMmpMap::new(ram.host_addr(), ram.pages())?;
        let samplers = cfg
            .sample_sizes()
            .into_iter()
            .map(|n| {
                n.map(|n| Sampler::new(n, ram.pages(), cfg.seed))
                    .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let smoother = Smoother::new(cfg.ewma_fast, cfg.ewma_slow)
            .map_err(|e| RunError::Config(e.to_string()))?;
        let phases = cfg
            .workload
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| PhaseRecord {
                index: i as u64,
                name: p.to_string(),
                ..Default::default()
            })
            .collect();
        let now = Instant::now();
        let mut vmm = Vmm {
            mask: vec![0u64; ram.pages().div_ceil(64) as usize],
            handler: ExitHandler::new(ram.size(), cfg.console),
            ram,
            vm,
            map,
            samplers,
            armed: None,
            smoother,
            interval: cfg.interval,
            map_out: cfg.map_out,
            map_every: cfg.map_every,
            tsc_khz,
            start: now,
            next_tick: now,
            window: 0,
            phases,
            current_phase: None,
            boot: None,
            guest: GuestView::default(),
            done: false,
            truths: HashMap::new(),
            pending: None,
            rows: Vec::new(),
            failure: None,
        };
        vmm.arm_sampler(0)?;
        Ok((vmm, vcpu))
    }

    /// The outcome, once the guest has halted.
    fn summary(self, setup: Duration) -> Result<RunSummary, RunError> {
        let pool_backed = self.boot.map_or(0, |b| {
            let first = b.pool_start / PAGE_SIZE;
            self.map.backed_in(first..first + b.pool_pages)
        });
        Ok(RunSummary {
            mincore_resident: self.mincore_resident()?,
            pool_backed,
            setup_ms: setup.as_secs_f64() * 1e3,
            elapsed_s: self.start.elapsed().as_secs_f64(),
            boot: self.boot,
            map: self.map.summary(),
            report_errors: self.handler.report.errors,
            unhandled_exits: self.handler.unhandled,
            tsc_khz: self.tsc_khz,
            phases: self.phases,
            rows: self.rows,
            guest: self.guest,
        })
    }

    fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn phase_name(&self) -> String {
        match self.current_phase {
            Some(i) => self.phases[i].name.clone(),
            None if self.done => "done".into(),
            None if self.boot.is_none() => "boot".into(),
            None => "-".into(),
        }
    }

    fn run_loop(
        &mut self,
        vcpu: &mut Vcpu,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
        on_row: &mut dyn FnMut(&Row),
    ) -> Result<(), RunError> {
        loop {
            let exit = vcpu.run()?;
            let action = self.handler.handle(exit, &self.ram);
            match action {
                Action::Continue | Action::Kicked => {}
                Action::Report { msg, addr } => self.on_message(msg, addr, deadline, on_row)?,
                Action::Halted => {
                    if let Some(failure) = self.failure.take() {
                        return Err(failure);
                    }
                    if self.done {
                        self.tick(true, on_row)?;
                        return Ok(());
                    }
                    return Err(RunError::HaltedEarly {
                        phase: self.phase_name(),
                        device: match &self.handler.report.first_error {
                            Some(e) => format!(
                                "; it sent {} malformed report(s), the first: {e}",
                                self.handler.report.errors
                            ),
                            None => String::new(),
                        },
                    });
                }
                Action::TripleFault => {
                    return Err(RunError::TripleFault {
                        rip: vcpu.rip().unwrap_or(0),
                    });
                }
                Action::EntryFailed(r) => return Err(RunError::EntryFailed(r)),
                Action::Internal => {
                    return Err(RunError::Internal {
                        rip: vcpu.rip().unwrap_or(0),
                    });
                }
                Action::Unexpected(s) => return Err(RunError::UnexpectedExit(s)),
            }
            if Instant::now() >= self.next_tick {
                self.tick(false, on_row)?;
            }
            if let (Some(d), Some(t)) = (deadline, timeout)
                && Instant::now() >= d
            {
                return Err(RunError::Timeout {
                    timeout: t,
                    phase: self.phase_name(),
                });
            }
        }
    }

    fn set_reply(&self, addr: u64, v: u64) -> Result<(), RunError> {
        Ok(self.ram.write_u64(addr + abi::MSG_REPLY_OFFSET, v)?)
    }

    fn on_message(
        &mut self,
        msg: Message,
        addr: u64,
        deadline: Option<Instant>,
        on_row: &mut dyn FnMut(&Row),
    ) -> Result<(), RunError> {
        self.guest = GuestView {
            allocated_pages: msg.alloc_pages,
            free_pages: msg.free_pages,
            heap_pages: msg.heap_pages,
            allocated_mib: pages_mib(msg.alloc_pages),
            free_mib: pages_mib(msg.free_pages),
        };
        let now = self.elapsed_s();
        let phase_index = msg.phase as usize;
        match msg.kind {
            MsgKind::Boot => {
                self.boot = Some(BootReport {
                    pool_start: msg.args[0],
                    pool_pages: msg.args[1],
                    reserved_pages: msg.args[2],
                });
                log::info!(
                    "guest kernel up: pool of {:.1} MiB at {:#x}",
                    pages_mib(msg.args[1]),
                    msg.args[0]
                );
            }
            MsgKind::PhaseStart => {
                if let Some(p) = self.phases.get_mut(phase_index) {
                    p.started = true;
                    p.start_s = now;
                    p.vmm_start_ns = msg.args[0];
                    self.current_phase = Some(phase_index);
                    log::info!("phase {phase_index} ({}) started", p.name);
                } else {
                    self.handler
                        .report
                        .note_error(format!("PHASE_START for unknown phase {phase_index}"));
                }
            }
            MsgKind::PhaseEnd => {
                let tsc_khz = self.tsc_khz.max(1);
                if let Some(p) = self.phases.get_mut(phase_index) {
                    p.ended = true;
                    p.end_s = now;
                    p.touched_pages = msg.touched;
                    p.written_pages = msg.written;
                    p.iterations = msg.iterations;
                    p.status = msg.args[1];
                    p.allocated_pages = msg.alloc_pages;
                    p.free_pages = msg.free_pages;
                    p.heap_pages = msg.heap_pages;
                    p.guest_seconds = msg.args[0] as f64 / (tsc_khz as f64 * 1e3);
                    self.current_phase = None;
                    match p.status {
                        0 => {}
                        1 => {
                            self.failure = Some(RunError::GuestOutOfMemory {
                                phase: p.index,
                                name: p.name.clone(),
                            })
                        }
                        s => {
                            self.failure = Some(RunError::GuestPhaseFailed {
                                phase: p.index,
                                name: p.name.clone(),
                                status: s,
                            })
                        }
                    }
                } else {
                    self.handler
                        .report
                        .note_error(format!("PHASE_END for unknown phase {phase_index}"));
                }
            }
            MsgKind::Window if msg.window > self.window => {
                self.handler.report.note_error(format!(
                    "WINDOW report for window {} from the future (current {})",
                    msg.window, self.window
                ));
            }
            MsgKind::Window => {
                let secs = msg.args[0] as f64 / (self.tsc_khz.max(1) as f64 * 1e3);
                let truth = Truth {
                    touched_pages: msg.touched,
                    written_pages: msg.written,
                    touched_mib: pages_mib(msg.touched),
                    written_mib: pages_mib(msg.written),
                    iterations: msg.iterations,
                    rate: if secs > 0.0 {
                        msg.iterations as f64 / secs
                    } else {
                        0.0
                    },
                };
                if let Some(mut row) = self.pending.take() {
                    if row.window == msg.window {
                        row.attach_truth(truth);
                        self.emit(row, on_row);
                        return Ok(());
                    }
                    self.pending = Some(row);
                }
                // Keep only truths that a row can still claim (bounded, whatever the guest sends).
                let oldest = self.window.saturating_sub(1);
                self.truths.retain(|&w, _| w >= oldest);
                if msg.window >= oldest {
                    self.truths.insert(msg.window, truth);
                }
            }
            MsgKind::Sleep => {
                let until = Instant::now() + Duration::from_nanos(msg.args[0]);
                let mut wake = until.min(self.next_tick);
                if let Some(d) = deadline {
                    wake = wake.min(d);
                }
                let now = Instant::now();
                if wake > now {
                    std::thread::sleep(wake - now);
                }
                let ticked = Instant::now() >= self.next_tick;
                if ticked {
                    self.tick(false, on_row)?;
                }
                self.set_reply(addr, u64::from(ticked))?;
            }
            MsgKind::Time => {
                let ns = self.start.elapsed().as_nanos() as u64;
                self.set_reply(addr, ns)?;
            }
            MsgKind::Done => {
                self.done = true;
                self.current_phase = None;
            }
            MsgKind::Fault if msg.args[0] >= abi::FAULT_BOOT_ERROR => {
                self.failure = Some(RunError::GuestBoot(match msg.args[0] {
                    abi::BOOT_ERR_MAGIC => "the boot-info page has a bad magic",
                    abi::BOOT_ERR_APP => "the embedded app has a bad header",
                    abi::BOOT_ERR_NO_MEMORY => {
                        "its reserved area (page tables, truth bitmaps) does not fit in guest RAM"
                    }
                    _ => "unknown boot error",
                }));
            }
            MsgKind::Fault => {
                self.failure = Some(RunError::GuestException {
                    name: exception_name(msg.args[0]),
                    vector: msg.args[0],
                    error: msg.args[1],
                    ring: if msg.cs & 3 == 3 {
                        "the app (ring 3)"
                    } else {
                        "the guest kernel (ring 0)"
                    },
                    rip: msg.args[2],
                    cr2: if msg.args[0] == 14 {
                        format!(", address {:#x}", msg.extra)
                    } else {
                        String::new()
                    },
                });
            }
        }
        Ok(())
    }

    fn emit(&mut self, row: Row, on_row: &mut dyn FnMut(&Row)) {
        on_row(&row);
        self.rows.push(row);
    }

    /// Re-arms write protection on a fresh random sample for interval `window`.
    fn arm_sampler(&mut self, window: u64) -> Result<(), RunError> {
        if let Some(s) = self.armed.take().and_then(|i| self.samplers[i].as_ref()) {
            s.unmask_from(&mut self.mask);
        }
        let i = (window % self.samplers.len() as u64) as usize;
        let Some(s) = &mut self.samplers[i] else {
            return Ok(());
        };
        s.arm();
        s.mask_into(&mut self.mask);
        self.vm.clear_dirty(&self.mask)?;
        self.map.note_cleared(&self.mask);
        self.armed = Some(i);
        Ok(())
    }

    /// End of an interval (or of the run): harvest, close the sampling round, emit a row.
    fn tick(&mut self, last: bool, on_row: &mut dyn FnMut(&Row)) -> Result<(), RunError> {
        if let Some(row) = self.pending.take() {
            self.emit(row, on_row);
        }
        let dirty = self.vm.dirty_log()?;
        let vmm_dirty = self.ram.take_vmm_dirty();
        let armed = self.armed.and_then(|i| self.samplers[i].as_ref());
        let active = armed.map(|s| {
            let n = s.armed().len() as u64;
            let t = s.count_touched(&dirty);
            let est = Estimate::from_counts(t, n);
            let sm = self.smoother.update(est.fraction);
            let ram_mib = usage::mib(self.ram.size());
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
                dirty_rate_mib_s: usage::dirty_rate_mib_s(est.fraction * ram_mib, self.interval),
            }
        });
        self.map.harvest(&dirty, &vmm_dirty, self.window as u32)?;
        if last {
            self.map.refresh()?;
        }
        let summary = self.map.summary();
        let host = HostUsage::new(&summary, usage::rss_bytes().unwrap_or(0));
        let mut row = Row {
            time_s: self.elapsed_s(),
            window: self.window,
            phase: self.phase_name(),
            final_row: last,
            configured_mib: usage::mib(self.ram.size()),
            guest: self.guest.clone(),
            truth: None,
            host: Some(host),
            active,
        };
        let due_map = self
            .map_every
            .is_some_and(|n| n > 0 && (self.window + 1).is_multiple_of(n));
        if last || due_map {
            self.write_map()?;
        }
        if let Some(t) = self.truths.remove(&self.window) {
            row.attach_truth(t);
            self.emit(row, on_row);
        } else if last {
            self.emit(row, on_row);
        } else {
            self.pending = Some(row);
        }
        if !last {
            self.arm_sampler(self.window + 1)?;
            self.window += 1;
            self.ram
                .write_u64(abi::BOOT_INFO_ADDR + abi::boot::WINDOW, self.window)?;
            // Skip ticks missed while the loop was busy, keeping the phase of the grid.
            let now = Instant::now();
            while self.next_tick <= now {
                self.next_tick += self.interval;
            }
        }
        Ok(())
    }

    /// Guest pages the kernel reports resident (mincore counts zero-page mappings too).
    fn mincore_resident(&self) -> Result<u64, RunError> {
        let mut vec = vec![0u8; self.ram.pages() as usize];
        crate::pagemap::mincore(self.ram.host_addr(), self.ram.size() as usize, &mut vec).map_err(
            |source| {
                RunError::Map(MapError::Lookup {
                    step: "final mincore count",
                    source,
                })
            },
        )?;
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
    }

    fn write_map(&self) -> Result<(), RunError> {
        if let Some(path) = &self.map_out {
            self.map
                .write_file(path)
                .map_err(|source| RunError::MapFile {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// The name of an x86 exception vector.
pub fn exception_name(v: u64) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        GuestRam::new(8 << 20, false).unwrap()
    }

    fn handler() -> ExitHandler {
        ExitHandler::new(8 << 20, Box::new(std::io::sink()))
    }

    #[test]
    fn report_exit_decodes_the_message_in_guest_memory() {
        let ram = ram();
        let mut msg = Message::new(MsgKind::Window);
        msg.window = 3;
        msg.written = 42;
        ram.write(0x7000, &msg.to_bytes()).unwrap();
        let mut h = handler();
        let data = 0x7000u32.to_le_bytes();
        let a = h.handle(
            Exit::IoOut {
                port: abi::REPORT_PORT,
                data: &data,
            },
            &ram,
        );
        assert_eq!(a, Action::Report { msg, addr: 0x7000 });
    }

    #[test]
    fn garbage_on_the_report_channel_is_counted_not_fatal() {
        let ram = ram();
        let mut h = handler();
        // Wrong width, address outside RAM, and a message with a bad magic.
        let junk = [
            vec![1u8],
            (64u32 << 20).to_le_bytes().to_vec(),
            0x9000u32.to_le_bytes().to_vec(),
        ];
        for data in &junk {
            let a = h.handle(
                Exit::IoOut {
                    port: abi::REPORT_PORT,
                    data,
                },
                &ram,
            );
            assert_eq!(a, Action::Continue);
        }
        assert_eq!(h.report.errors, 3);
        assert!(h.report.first_error.as_deref().unwrap().contains("4"));
    }

    #[test]
    fn unknown_ports_and_mmio_read_all_ones_and_continue() {
        let ram = ram();
        let mut h = handler();
        let mut data = [0u8; 4];
        let a = h.handle(
            Exit::IoIn {
                port: 0x80,
                data: &mut data,
            },
            &ram,
        );
        assert_eq!(a, Action::Continue);
        assert_eq!(data, [0xff; 4]);
        let mut m = [0u8; 8];
        let a = h.handle(
            Exit::MmioRead {
                addr: 0xfee0_0000,
                data: &mut m,
            },
            &ram,
        );
        assert_eq!(a, Action::Continue);
        assert_eq!(m, [0xff; 8]);
        let a = h.handle(
            Exit::MmioWrite {
                addr: 0xfee0_0000,
                data: &[1, 2],
            },
            &ram,
        );
        assert_eq!(a, Action::Continue);
        assert_eq!(h.unhandled, 3);
    }

    #[test]
    fn stop_exits_map_to_actions() {
        let ram = ram();
        let mut h = handler();
        assert_eq!(h.handle(Exit::Hlt, &ram), Action::Halted);
        assert_eq!(h.handle(Exit::Shutdown, &ram), Action::TripleFault);
        assert_eq!(h.handle(Exit::Interrupted, &ram), Action::Kicked);
        assert_eq!(h.handle(Exit::FailEntry(7), &ram), Action::EntryFailed(7));
        assert_eq!(h.handle(Exit::InternalError, &ram), Action::Internal);
    }

    #[test]
    fn serial_output_goes_to_the_console() {
        let ram = ram();
        let mut h = handler();
        let a = h.handle(
            Exit::IoOut {
                port: abi::SERIAL_PORT_BASE,
                data: b"x",
            },
            &ram,
        );
        assert_eq!(a, Action::Continue);
        assert_eq!(h.unhandled, 0);
    }
}
