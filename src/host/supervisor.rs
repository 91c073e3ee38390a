//! The host loop (`memvisor host`): admits the VMs, starts each as its own `memvisor run`
//! process, and every period reads each VM's latest row, decides (state, targets, balloon and
//! swap orders) and sends the orders over the VMs' control sockets. It never waits on a VM: a VM
//! that crashes or is killed is reported and its memory returns to the pool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::row::Row;
use crate::units::{MIB, PAGE_SIZE, mib, pages_mib};
use crate::vmm::stop;

use super::process::VmProcess;
use super::reclaim::{self, History, VmMemory};
use super::scheduler::{self, ActiveSource, AdmissionError, SchedError, VmInput};
use super::spec::VmSpec;
use super::state::{self, MemState, StateMachine};

/// The VMM overhead a VM is assumed to need before its first row says (README, "Set-up and VMM
/// overhead by guest size": 6 MiB at 1 GiB, 16 MiB at 64 GiB): 8 MiB plus 1/4096 of its RAM.
pub fn overhead_estimate(mem: u64) -> u64 {
    8 * MIB + mem / 4096
}

/// How long a VM has to end after `stop` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The host's settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Machine memory the VMs may use together, bytes.
    pub budget: u64,
    /// The idle memory tax, 0 to 1.
    pub tax: f64,
    pub period: Duration,
    pub vms: Vec<VmSpec>,
    /// The `memvisor` binary the VMs run.
    pub exe: PathBuf,
}

/// Why the host could not run.
#[derive(Debug, Error)]
pub enum HostError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Sched(SchedError),
    #[error("two VMs are named {0}")]
    DuplicateName(String),
    #[error("no VM to run (give --vm)")]
    NoVms,
    #[error("cannot make the directory for the VMs' sockets: {0}")]
    Dir(std::io::Error),
    #[error("cannot start VM {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("writing the host's rows: {0}")]
    Output(std::io::Error),
}

/// The host line of a period.
#[derive(Clone, Debug, Serialize)]
pub struct HostLine {
    pub budget_mib: f64,
    /// The budget less every running VM's granted memory and overhead.
    pub free_mib: f64,
    pub state: MemState,
    /// Changes of state so far.
    pub transitions: u64,
    /// The sum of the running VMs' targets.
    pub targets_mib: f64,
    pub running: usize,
    /// Machine memory page sharing saves, the running VMs' parts added up (each VM's
    /// `saved_mib`); `free_mib` counts it as free.
    pub saved_mib: f64,
    /// The kernel's host-wide `/sys/kernel/mm/ksm/pages_sharing` in MiB, to compare with
    /// `saved_mib` (when a VM reports KSM figures).
    pub ksm_pages_sharing_mib: Option<f64>,
}

/// One VM's line of a period, with esxtop's memory-screen names in the comments.
#[derive(Clone, Debug, Serialize)]
pub struct VmLine {
    pub name: String,
    /// `running`, `ended` (exit code 0), `failed` (any other end).
    pub status: &'static str,
    pub exit_code: Option<i32>,
    /// MEMSZ.
    pub mem_mib: f64,
    /// SZTGT: machine memory, what the VM is charged for (its sharing savings are not).
    pub target_mib: f64,
    /// The guest memory it may hold on that target: SZTGT plus its SHRDSVD, at most its size or
    /// limit. Its balloon and swap targets are what it holds beyond this.
    pub guest_target_mib: f64,
    /// GRANT: guest pages backed by machine memory now.
    pub granted_mib: f64,
    /// TCHD: the active estimate the scheduler used, and where it came from.
    pub active_mib: f64,
    pub active_source: ActiveSource,
    /// %ACTV: active over granted, percent.
    pub active_pct: f64,
    /// MCTLSZ, MCTLTGT.
    pub balloon_mib: f64,
    pub balloon_target_mib: f64,
    /// SWCUR, SWTGT.
    pub swapped_mib: f64,
    pub swap_target_mib: f64,
    /// OVHD.
    pub overhead_mib: f64,
    /// SHRD: guest pages whose machine page is shared (with this VM's or other VMs' pages).
    pub shared_mib: f64,
    /// SHRDSVD: this VM's part of the machine memory sharing saves (1/m of each m-way saving
    /// per sharer page), subtracted from what it uses of the budget.
    pub saved_mib: f64,
    pub shares: u64,
    pub reservation_mib: f64,
    pub limit_mib: Option<f64>,
    /// The guest's work rate (page accesses per second), from its truth.
    pub rate: Option<f64>,
    /// The balloon does not answer (or there is none): swap stands in.
    pub balloon_stuck: bool,
    /// Orders the VM refused or did not answer this period.
    /// Its vCPU is held out of the guest (`low`, above its target).
    pub paused: bool,
    pub order_errors: u64,
    /// The VM's latest row (the object `run --json` prints), for the host's control socket
    /// (`memvisor top`'s detail pane); not in `host --json`.
    #[serde(skip)]
    pub row: Option<Row>,
}

/// One period.
#[derive(Clone, Debug, Serialize)]
pub struct HostRow {
    /// The schema's version (`docs/schema.json`), as in `run`'s rows.
    pub schema_version: crate::row::SchemaVersion,
    pub time_s: f64,
    pub period: u64,
    pub host: HostLine,
    pub vms: Vec<VmLine>,
}

/// One VM and what the host remembers of it.
struct Managed {
    process: VmProcess,
    history: History,
    /// Orders last sent (MiB), so that only changes are sent.
    sent_balloon: Option<u64>,
    sent_swap: Option<u64>,
    /// Its vCPU is held out of the guest (`pause` sent and taken).
    paused: bool,
    /// The first refusal of each order, logged once.
    warned: bool,
}

/// Checks the VMs against the budget before any starts: reservations plus estimated overheads.
pub fn admit(cfg: &HostConfig) -> Result<(), HostError> {
    if cfg.vms.is_empty() {
        return Err(HostError::NoVms);
    }
    let mut names = BTreeMap::new();
    for vm in &cfg.vms {
        if names.insert(vm.name.as_str(), ()).is_some() {
            return Err(HostError::DuplicateName(vm.name.clone()));
        }
    }
    let inputs: Vec<VmInput> = cfg
        .vms
        .iter()
        .map(|v| {
            input(
                v,
                overhead_estimate(v.mem) / PAGE_SIZE,
                0,
                ActiveSource::Accesses,
            )
        })
        .collect();
    match scheduler::targets(&inputs, cfg.budget / PAGE_SIZE, cfg.tax) {
        Ok(_) => Ok(()),
        Err(SchedError::Admission(a)) => Err(HostError::Admission(a)),
        Err(e) => Err(HostError::Sched(e)),
    }
}

fn input(spec: &VmSpec, overhead_pages: u64, active_pages: u64, source: ActiveSource) -> VmInput {
    VmInput {
        name: spec.name.clone(),
        mem_pages: spec.mem / PAGE_SIZE,
        shares: spec.shares,
        reservation_pages: spec.reservation.div_ceil(PAGE_SIZE),
        limit_pages: spec.limit.map(|l| l / PAGE_SIZE),
        overhead_pages,
        active_pages,
        active_source: source,
        saved_pages: 0,
    }
}

/// The scheduler's view of a VM from its latest row (before any row: nothing granted, the
/// estimated overhead, no activity).
fn observed(spec: &VmSpec, row: Option<&Row>) -> (VmInput, VmMemory, Option<f64>) {
    let pages = |m: f64| (m.max(0.0) * (MIB / PAGE_SIZE) as f64).round() as u64;
    let host = row.and_then(|r| r.host.as_ref());
    let overhead = host.map_or(overhead_estimate(spec.mem) / PAGE_SIZE, |h| {
        pages(h.overhead_mib)
    });
    let (active, source) = match row {
        Some(r) if r.reads_seen && r.active.is_some() => (
            r.active.as_ref().map_or(0.0, |a| a.max_mib),
            ActiveSource::Accesses,
        ),
        Some(r) => (
            r.active_writes.as_ref().map_or(0.0, |a| a.max_mib),
            ActiveSource::Writes,
        ),
        None => (0.0, ActiveSource::Accesses),
    };
    let balloon = row.and_then(|r| r.balloon.as_ref());
    let memory = VmMemory {
        mem_pages: spec.mem / PAGE_SIZE,
        target_pages: 0,
        granted_pages: host.map_or(0, |h| h.backed_pages),
        balloon_pages: balloon.map_or(0, |b| pages(b.balloon_mib)),
        // Swapped by the VMM (`--swap`), what the host's swap targets move.
        swapped_pages: row
            .and_then(|r| r.swap.as_ref())
            .map_or(0, |w| pages(w.swapped_mib)),
        // Every VM has the balloon unless its RAM covers the device's registers: before its first
        // row, assume it has.
        balloon_device: row.is_none() || balloon.is_some(),
    };
    (
        input(spec, overhead, pages(active), source),
        memory,
        row.and_then(|r| r.truth.as_ref()).map(|t| t.rate),
    )
}

/// Runs the host until every VM has ended or a stop signal comes, handing each period's row to
/// `on_row`. Every VM is stopped gracefully at the end.
pub fn run(
    cfg: &HostConfig,
    on_row: &mut dyn FnMut(&HostRow) -> std::io::Result<()>,
) -> Result<Vec<VmLine>, HostError> {
    admit(cfg)?;
    let dir = tempfile::Builder::new()
        .prefix("memvisor-host-")
        .tempdir()
        .map_err(HostError::Dir)?;
    let mut vms: Vec<Managed> = Vec::new();
    for spec in &cfg.vms {
        let process =
            VmProcess::spawn(&cfg.exe, spec, dir.path(), cfg.period).map_err(|source| {
                HostError::Spawn {
                    name: spec.name.clone(),
                    source,
                }
            })?;
        vms.push(Managed {
            process,
            history: History::default(),
            sent_balloon: None,
            sent_swap: None,
            paused: false,
            warned: false,
        });
    }
    let start = Instant::now();
    let budget_pages = cfg.budget / PAGE_SIZE;
    let mut machine = StateMachine::new();
    let mut last = Vec::new();
    let mut result = Ok(());
    for period in 0u64.. {
        sleep_until(start + cfg.period.saturating_mul(period as u32 + 1));
        let row = decide(cfg, &mut vms, &mut machine, budget_pages, start, period);
        last.clone_from(&row.vms);
        if let Err(e) = on_row(&row) {
            result = Err(HostError::Output(e));
            break;
        }
        if row.host.running == 0 || stop::requested().is_some() {
            break;
        }
    }
    for vm in &mut vms {
        vm.process.stop(STOP_GRACE);
    }
    result.map(|()| last)
}

/// Sleeps until `t`, waking early for a stop signal.
fn sleep_until(t: Instant) {
    while stop::requested().is_none() {
        let now = Instant::now();
        if now >= t {
            return;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(20)));
    }
}

/// The longest wait for an ended VM's last row (its stdout ends as it exits; once).
const LAST_ROW_WAIT: Duration = Duration::from_secs(2);

/// One period: observe, decide, order, report.
fn decide(
    cfg: &HostConfig,
    vms: &mut [Managed],
    machine: &mut StateMachine,
    budget_pages: u64,
    start: Instant,
    period: u64,
) -> HostRow {
    // Observe. A VM that has ended holds nothing any more.
    let mut views = Vec::with_capacity(vms.len());
    for vm in vms.iter_mut() {
        let status = vm.process.exited();
        // An ended VM's last row (why it ended) may still be in its pipe: read it to the end.
        let row = match status {
            Some(_) => vm.process.rows_to_the_end(LAST_ROW_WAIT).latest.clone(),
            None => vm.process.rows().latest.clone(),
        };
        let (mut input, memory, rate) = observed(&vm.process.spec, row.as_ref());
        let sharing = sharing_of(row.as_ref());
        // Its savings are not charged: the scheduler gives it machine memory.
        input.saved_pages = sharing.saved_pages;
        views.push((status, input, memory, rate, row, sharing));
    }
    let used: u64 = views
        .iter()
        .filter(|v| v.0.is_none())
        .map(|v| (v.2.granted_pages + v.1.overhead_pages).saturating_sub(v.5.saved_pages))
        .sum();
    let running_sharing = views.iter().filter(|v| v.0.is_none()).map(|v| &v.5);
    let saved_pages: u64 = running_sharing.clone().map(|s| s.saved_pages).sum();
    let ksm_pages_sharing = running_sharing
        .filter_map(|s| s.kernel_pages_sharing)
        .max()
        .map(pages_mib);
    let free = budget_pages.saturating_sub(used);
    if let Some(t) = machine.observe(free, budget_pages) {
        log::info!(
            "host: {} -> {} ({:.1} of {:.1} MiB free)",
            t.from.as_str(),
            t.to.as_str(),
            pages_mib(t.free_pages),
            pages_mib(t.budget_pages)
        );
    }
    let state = machine.state();
    // Decide over the running VMs.
    let running: Vec<usize> = (0..views.len()).filter(|&i| views[i].0.is_none()).collect();
    let inputs: Vec<VmInput> = running.iter().map(|&i| views[i].1.clone()).collect();
    let targets = match scheduler::targets(&inputs, state::schedulable_pages(budget_pages), cfg.tax)
    {
        Ok(t) => t,
        Err(e) => {
            // Measured overheads can outgrow the admission's estimate: hold everyone at their
            // reservation and say so.
            log::warn!("host: {e}; holding every VM at its reservation");
            inputs
                .iter()
                .map(|v| scheduler::Target {
                    pages: v.reservation_pages,
                    guest_pages: v.guest_pages(v.reservation_pages),
                    active_fraction: 0.0,
                    active_source: v.active_source,
                    rho: None,
                    bound: scheduler::Bound::Reservation,
                })
                .collect()
        }
    };
    let mut lines = Vec::with_capacity(vms.len());
    let mut targets_pages = 0;
    // (machine, guest) target pages.
    let mut target_of = vec![None; views.len()];
    for (&i, t) in running.iter().zip(&targets) {
        target_of[i] = Some((t.pages, t.guest_pages));
        targets_pages += t.pages;
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        let (status, mut input, mut memory, rate, row, mut sharing) = views[i].clone();
        if status.is_some() {
            // Its process is gone, and with it everything it held.
            memory.granted_pages = 0;
            memory.balloon_pages = 0;
            memory.swapped_pages = 0;
            input.active_pages = 0;
            input.overhead_pages = 0;
            sharing = Sharing::default();
        }
        let spec = vm.process.spec.clone();
        let mut errors = 0;
        let mut stuck = false;
        let mut plan_balloon = memory.balloon_pages;
        let mut plan_swap = memory.swapped_pages;
        if let Some((_, guest_target)) = target_of[i] {
            // Reclamation keeps the VM's guest pages (held, ballooned, swapped) within its
            // machine target plus its savings (`docs/design.md`, "Sharing and the targets").
            memory.target_pages = guest_target;
            let plan = reclaim::plan(&memory, state, vm.history);
            vm.history = plan.history;
            stuck = plan.balloon_stuck;
            plan_balloon = plan.balloon_target_pages;
            plan_swap = plan.swap_target_pages;
            let balloon_mib = plan.balloon_target_pages * PAGE_SIZE / MIB;
            if memory.balloon_device && vm.sent_balloon != Some(balloon_mib) {
                match vm.process.command("set-balloon-target", Some(balloon_mib)) {
                    Ok(()) => vm.sent_balloon = Some(balloon_mib),
                    Err(e) => {
                        errors += 1;
                        warn_once(&mut vm.warned, &spec.name, &e);
                    }
                }
            }
            let swap_mib = plan.swap_target_pages * PAGE_SIZE / MIB;
            if vm.sent_swap != Some(swap_mib) && (swap_mib > 0 || vm.sent_swap.is_some()) {
                match vm.process.command("set-swap-target", Some(swap_mib)) {
                    Ok(()) => vm.sent_swap = Some(swap_mib),
                    Err(e) => {
                        errors += 1;
                        warn_once(&mut vm.warned, &spec.name, &e);
                    }
                }
            }
            if plan.pause != vm.paused {
                match vm
                    .process
                    .command(if plan.pause { "pause" } else { "resume" }, None)
                {
                    Ok(()) => {
                        vm.paused = plan.pause;
                        log::info!(
                            "host: {} {}",
                            spec.name,
                            if plan.pause { "paused" } else { "resumed" }
                        );
                    }
                    Err(e) => {
                        errors += 1;
                        warn_once(&mut vm.warned, &spec.name, &e);
                    }
                }
            }
        }
        let granted = pages_mib(memory.granted_pages);
        let active = pages_mib(input.active_pages);
        lines.push(VmLine {
            name: spec.name.clone(),
            status: match status {
                None => "running",
                Some(s) if s.success() => "ended",
                Some(_) => "failed",
            },
            exit_code: status.and_then(|s| s.code()),
            mem_mib: mib(spec.mem),
            target_mib: target_of[i].map_or(0.0, |t| pages_mib(t.0)),
            guest_target_mib: target_of[i].map_or(0.0, |t| pages_mib(t.1)),
            granted_mib: granted,
            active_mib: active,
            active_source: input.active_source,
            active_pct: if granted > 0.0 {
                (100.0 * active / granted).min(100.0)
            } else {
                0.0
            },
            balloon_mib: pages_mib(memory.balloon_pages),
            balloon_target_mib: pages_mib(plan_balloon),
            swapped_mib: pages_mib(memory.swapped_pages),
            swap_target_mib: pages_mib(plan_swap),
            overhead_mib: pages_mib(input.overhead_pages),
            shared_mib: pages_mib(sharing.shared_pages),
            saved_mib: pages_mib(sharing.saved_pages),
            shares: spec.shares,
            reservation_mib: mib(spec.reservation),
            limit_mib: spec.limit.map(mib),
            rate,
            balloon_stuck: stuck,
            paused: vm.paused && status.is_none(),
            order_errors: errors,
            row,
        });
    }
    HostRow {
        schema_version: crate::row::SchemaVersion,
        time_s: start.elapsed().as_secs_f64(),
        period,
        host: HostLine {
            budget_mib: pages_mib(budget_pages),
            free_mib: pages_mib(free),
            state,
            transitions: machine.transitions(),
            targets_mib: pages_mib(targets_pages),
            running: running.len(),
            saved_mib: pages_mib(saved_pages),
            ksm_pages_sharing_mib: ksm_pages_sharing,
        },
        vms: lines,
    }
}

/// A VM's page sharing as its latest row says (pages).
#[derive(Clone, Copy, Debug, Default)]
struct Sharing {
    shared_pages: u64,
    /// Its part of the saving, rounded to whole pages.
    saved_pages: u64,
    /// The kernel's host-wide `pages_sharing`, as the VM read it.
    kernel_pages_sharing: Option<u64>,
}

fn sharing_of(row: Option<&crate::row::Row>) -> Sharing {
    let Some(h) = row.and_then(|r| r.host.as_ref()) else {
        return Sharing::default();
    };
    let pages = |mib: f64| (mib.max(0.0) * (MIB / PAGE_SIZE) as f64).round() as u64;
    Sharing {
        shared_pages: pages(h.shared_mib),
        saved_pages: pages(h.shared_saved_mib),
        kernel_pages_sharing: h.ksm.as_ref().map(|k| k.host_pages_sharing),
    }
}

fn warn_once(warned: &mut bool, name: &str, e: &dyn std::fmt::Display) {
    if !*warned {
        *warned = true;
        log::warn!("host: VM {name} did not take an order: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::spec;

    fn cfg(budget_mib: u64, specs: &[&str]) -> HostConfig {
        HostConfig {
            budget: budget_mib * MIB,
            tax: 0.75,
            period: Duration::from_secs(1),
            vms: specs
                .iter()
                .enumerate()
                .map(|(i, s)| spec::parse(s, i).unwrap())
                .collect(),
            exe: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn admission_counts_reservations_and_overheads() {
        assert!(admit(&cfg(1024, &["mem=512M,reservation=256M", "mem=512M"])).is_ok());
        let e = admit(&cfg(
            512,
            &["mem=512M,reservation=256M", "mem=512M,reservation=250M"],
        ))
        .unwrap_err();
        assert!(matches!(e, HostError::Admission(_)), "{e}");
        assert!(e.to_string().contains("over the budget"), "{e}");
        assert!(matches!(
            admit(&cfg(512, &["name=a", "name=a"])),
            Err(HostError::DuplicateName(_))
        ));
        assert!(matches!(admit(&cfg(512, &[])), Err(HostError::NoVms)));
    }

    #[test]
    fn a_row_becomes_the_schedulers_view() {
        let spec = spec::parse("name=a,mem=1G", 0).unwrap();
        let row: Row = serde_json::from_value(serde_json::json!({
            "reads_seen": true,
            "host": {"backed_pages": 25600, "overhead_mib": 6.0, "swapped_mib": 9.0},
            "swap": {"swapped_mib": 2.0},
            "active": {"max_mib": 40.0},
            "active_writes": {"max_mib": 10.0},
            "balloon": {"balloon_mib": 64.0},
            "truth": {"rate": 1000.0}
        }))
        .unwrap();
        let (input, memory, rate) = observed(&spec, Some(&row));
        assert_eq!(input.active_pages, 40 * 256);
        assert_eq!(input.active_source, ActiveSource::Accesses);
        assert_eq!(input.overhead_pages, 6 * 256);
        assert_eq!(memory.granted_pages, 25600);
        assert_eq!(memory.balloon_pages, 64 * 256);
        assert_eq!(memory.swapped_pages, 2 * 256);
        assert!(memory.balloon_device);
        assert_eq!(rate, Some(1000.0));
        // Without reads seen, the write estimate; without a row, the estimate of the overhead.
        let mut w = row.clone();
        w.reads_seen = false;
        w.balloon = None;
        let (input, memory, _) = observed(&spec, Some(&w));
        assert_eq!(input.active_pages, 10 * 256);
        assert_eq!(input.active_source, ActiveSource::Writes);
        assert!(!memory.balloon_device);
        let (input, memory, rate) = observed(&spec, None);
        assert_eq!(
            input.overhead_pages,
            overhead_estimate(spec.mem) / PAGE_SIZE
        );
        assert_eq!(memory.granted_pages, 0);
        assert_eq!(rate, None);
    }

    /// The loop the host closes with sharing: the guest target is the machine target plus the
    /// VM's savings, and reclamation may take shared pages, which lowers the savings. A VM of
    /// 10 000 pages holds 8 000, 4 000 of them 4 to a frame (3 000 saved), on a machine target
    /// of 4 000, in `soft`. Whatever pages the balloon takes, the balloon target only grows while
    /// the savings fall (no back and forth), and it stops at or below what it would be without
    /// sharing (8 000 − 4 000).
    #[test]
    fn falling_savings_only_raise_the_balloon_up_to_the_unshared_need() {
        use crate::host::reclaim;
        let (mem, machine_target, frames, per_frame) = (10_000u64, 4_000u64, 1_000u64, 4u64);
        let cap = reclaim::balloon_max(mem);
        // Which pages the guest gives: unshared ones (its free pages are private), or the worst
        // case, shared ones first, each of which lowers the saving and frees nothing while its
        // frame has other sharers.
        for shared_first in [false, true] {
            let mut vm = VmInput::new("a", mem, 0);
            let mut memory = VmMemory {
                mem_pages: mem,
                target_pages: 0,
                granted_pages: 8_000,
                balloon_pages: 0,
                swapped_pages: 0,
                balloon_device: true,
            };
            let (mut history, mut targets) = (History::default(), Vec::new());
            // Sharers left on each frame (all frames alike: the balloon takes frame by frame).
            let mut sharers = vec![per_frame; frames as usize];
            let mut unshared = 8_000 - frames * per_frame;
            for _ in 0..60 {
                vm.saved_pages = sharers.iter().map(|&m| m.saturating_sub(1)).sum();
                memory.target_pages = vm.guest_pages(machine_target);
                let plan = reclaim::plan(&memory, MemState::Soft, history);
                history = plan.history;
                targets.push(plan.balloon_target_pages);
                // The guest inflates to the target, giving the pages as chosen.
                for _ in memory.balloon_pages..plan.balloon_target_pages {
                    let frame = sharers.iter_mut().find(|m| **m > 0);
                    match frame {
                        Some(m) if shared_first || unshared == 0 => *m -= 1,
                        _ => unshared -= 1,
                    }
                }
                memory.balloon_pages = memory.balloon_pages.max(plan.balloon_target_pages);
                memory.granted_pages = mem - memory.balloon_pages - 2_000;
            }
            assert!(
                targets.windows(2).all(|w| w[0] <= w[1]),
                "shared_first {shared_first}: {targets:?}"
            );
            let last = *targets.last().unwrap();
            let held: u64 = unshared + sharers.iter().sum::<u64>();
            let saved: u64 = sharers.iter().map(|&m| m.saturating_sub(1)).sum();
            // Settled: charged no more than the machine target.
            assert!(held - saved <= machine_target, "{held} - {saved}");
            if shared_first {
                // Every saving gone, then what is left reclaimed as without sharing.
                assert_eq!((saved, last), (0, (8_000 - machine_target).min(cap)));
            } else {
                // Only the machine excess: 8 000 − 3 000 − 4 000.
                assert_eq!((saved, last), (3_000, 1_000));
            }
        }
    }
}
