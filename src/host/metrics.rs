//! `memvisor host --prometheus ADDR`: the latest period in the Prometheus text format at
//! `/metrics`, one endpoint for the whole host with a `vm` label on each VM's metrics.
//!
//! It is served by the hardened server of [`crate::output::http`] on its own thread, as
//! `run --prometheus` is: the host loop only swaps the latest period in under a short lock, and a
//! scrape copies it out and encodes it, so a slow, stuck or hostile client never delays the loop.
//!
//! The host: `memvisor_build_info{version}`, `memvisor_host_budget_bytes`, `_free_bytes`,
//! `_targets_bytes`, `_running_vms`, `_time_seconds`, the state as an enum-style gauge
//! (`memvisor_host_state{state="soft"} 1`, the other states 0), and the counters
//! `memvisor_host_state_transitions_total` and `memvisor_host_periods_total`. Each VM, labelled
//! `vm="NAME"`: `memvisor_run_info{vm,workload,seed}`, `memvisor_host_configured_bytes` (MEMSZ),
//! `_target_bytes` (SZTGT), `_granted_bytes` (GRANT), `_active_bytes` (TCHD, with a `source`
//! label: `accesses` or `writes`, one series per VM), `_balloon_bytes` and
//! `_balloon_target_bytes` (MCTLSZ, MCTLTGT), `_swapped_bytes` and `_swap_target_bytes` (SWCUR,
//! SWTGT), `_overhead_bytes` (OVHD), `_shares`, `_reservation_bytes`, `_limit_bytes` (only a VM
//! with a limit), the guest's `_work_rate_accesses_per_second` (once it reports one),
//! `_balloon_stuck` (1 while swap stands in for a balloon that does not move), `_paused` (1 while
//! its vCPU is held in `low`), its status as an enum-style gauge
//! (`memvisor_host_vm_status{vm="web",status="running"} 1`) and `_order_errors_total`. Beside
//! those, each VM's latest row as `run --prometheus` serves it (the same names, from
//! [`crate::output::prometheus::add_row`]): its phase and end reason for every VM that reported a
//! row, its memory (by state, the estimates, balloon, swap) while it runs. Every family's labels
//! mean one thing each: summing over `vm` adds VMs up; `state`, `status` and `source` are
//! enum-style (one series is 1, or one series per VM).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Unit;

use super::scheduler::ActiveSource;
use super::spec::VmSpec;
use super::state::MemState;
use super::supervisor::{HostRow, VmLine};
use crate::output::http::{Document, Server};
use crate::output::prometheus::{self as prom, Metrics, PATH, PrometheusError};
use crate::units::MIB;

/// The states, in the order the enum-style gauge lists them.
const STATES: [MemState; 4] = [
    MemState::High,
    MemState::Soft,
    MemState::Hard,
    MemState::Low,
];
/// A VM's statuses (see [`VmLine::status`]).
const STATUSES: [&str; 3] = ["running", "ended", "failed"];

/// The latest period and the totals over the periods so far.
#[derive(Default)]
struct Latest {
    row: Option<HostRow>,
    totals: Totals,
}

/// What the counters count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub periods: u64,
    /// Orders each VM refused or did not answer, by name.
    pub order_errors: HashMap<String, u64>,
}

/// What `memvisor_run_info` says of one VM: its name, workload and seed, from its spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub workload: String,
    pub seed: Option<u64>,
}

impl VmInfo {
    /// From the VM's spec: its `--workload=` and `--seed=` words (the run's default workload
    /// without one).
    pub fn of(spec: &VmSpec) -> Self {
        let arg = |key: &str| {
            spec.run_args
                .iter()
                .rev()
                .find_map(|a| a.strip_prefix(key).map(str::to_string))
        };
        VmInfo {
            name: spec.name.clone(),
            workload: arg("--workload=")
                .unwrap_or_else(|| crate::vmm::config::RunOptions::default().workload),
            seed: arg("--seed=").and_then(|s| s.parse().ok()),
        }
    }
}

/// The HTTP server and the period it serves; dropping it stops the server without waiting on any
/// client.
pub struct Exporter {
    latest: Arc<Mutex<Latest>>,
    server: Server,
}

impl Exporter {
    /// Listens on `addr` (port 0 picks a free port) and serves from a new thread; a bad address
    /// fails here, before any VM starts. `vms`: what the info metric says of each VM.
    pub fn start(addr: SocketAddr, vms: Vec<VmInfo>) -> Result<Self, PrometheusError> {
        let latest = Arc::new(Mutex::new(Latest::default()));
        let doc = Document {
            paths: &[PATH, "/"],
            content_type: prometheus_text::CONTENT_TYPE,
            render: Box::new({
                let latest = latest.clone();
                move || {
                    let (row, totals) = {
                        let l = latest.lock().unwrap_or_else(|e| e.into_inner());
                        (l.row.clone(), l.totals.clone())
                    };
                    encode(row.as_ref(), &totals, &vms)
                }
            }),
        };
        let server = Server::start(addr, "host-prometheus", doc)
            .map_err(|source| PrometheusError::Start { addr, source })?;
        Ok(Exporter { latest, server })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Makes `row` the one served and counts it.
    pub fn update(&self, row: &HostRow) {
        let row = row.clone();
        let mut l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        l.totals.periods += 1;
        for v in &row.vms {
            *l.totals.order_errors.entry(v.name.clone()).or_default() += v.order_errors;
        }
        l.row = Some(row);
    }

    /// Keeps serving the latest period for `linger`, or until `stop` says so (see
    /// [`crate::output::http::linger`]).
    pub fn linger(&self, linger: Duration, stop: &dyn Fn() -> bool) {
        crate::output::http::linger(self.local_addr(), linger, stop);
    }
}

/// A per-VM gauge: `value` of each VM (none where it gives `None`).
fn per_vm(
    m: &mut Metrics,
    vms: &[VmLine],
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: impl Fn(&VmLine) -> Option<f64>,
) {
    for v in vms {
        if let Some(x) = value(v) {
            m.gauge(name, help, unit.clone(), &[("vm", &v.name)], x);
        }
    }
}

/// The `source` label: the JSON's word for it.
fn source_name(s: ActiveSource) -> &'static str {
    match s {
        ActiveSource::Accesses => "accesses",
        ActiveSource::Writes => "writes",
    }
}

fn bytes(mib: f64) -> f64 {
    mib * MIB as f64
}

/// The metrics of the latest period in the Prometheus text format. Before the first period,
/// only the period counter (0) and the info metrics.
pub fn encode(row: Option<&HostRow>, totals: &Totals, vms: &[VmInfo]) -> String {
    let mut m = Metrics::default();
    prom::add_build_info(&mut m, &[]);
    for v in vms {
        prom::add_run_info(&mut m, &[("vm", &v.name)], &v.workload, v.seed);
    }
    m.counter(
        "memvisor_host_periods",
        "Host periods completed (one block of the table each)",
        None,
        &[],
        totals.periods as f64,
    );
    if let Some(r) = row {
        add_host(&mut m, r);
        add_vms(&mut m, &r.vms, totals);
        for v in &r.vms {
            if let Some(latest) = &v.row {
                let base = [("vm", v.name.as_str())];
                prom::add_row_state(&mut m, &base, latest);
                // An ended VM holds nothing any more: only its phase and end are told.
                if v.status == "running" {
                    prom::add_row(&mut m, &base, latest);
                }
            }
        }
    }
    m.encode()
}

fn add_host(m: &mut Metrics, r: &HostRow) {
    let h = &r.host;
    m.gauge(
        "memvisor_host_time",
        "Time since the host started, at the end of the latest period",
        Some(Unit::Seconds),
        &[],
        r.time_s,
    );
    for (name, help, mib) in [
        (
            "memvisor_host_budget",
            "Machine memory the VMs may use together (--budget)",
            h.budget_mib,
        ),
        (
            "memvisor_host_free",
            "The budget less every running VM's granted memory and overhead",
            h.free_mib,
        ),
        (
            "memvisor_host_targets",
            "The sum of the running VMs' targets (SZTGT)",
            h.targets_mib,
        ),
    ] {
        m.gauge(name, help, Some(Unit::Bytes), &[], bytes(mib));
    }
    m.gauge(
        "memvisor_host_running_vms",
        "VMs still running",
        None,
        &[],
        h.running as f64,
    );
    for s in STATES {
        m.gauge(
            "memvisor_host_state",
            "The host's memory state, from the budget's free part: 1 for the current one (high: nothing; soft: balloon; hard: also hypervisor swap; low: also pause VMs above their target)",
            None,
            &[("state", s.as_str())],
            f64::from(u8::from(s == h.state)),
        );
    }
    m.counter(
        "memvisor_host_state_transitions",
        "Changes of the host's memory state",
        None,
        &[],
        h.transitions as f64,
    );
}

fn add_vms(m: &mut Metrics, vms: &[VmLine], totals: &Totals) {
    type Field = (&'static str, &'static str, fn(&VmLine) -> Option<f64>);
    let sizes: [Field; 11] = [
        (
            "memvisor_host_configured",
            "The VM's configured memory (MEMSZ)",
            |v| Some(v.mem_mib),
        ),
        (
            "memvisor_host_target",
            "The VM's target allocation (SZTGT): machine memory, by min-funding revocation with the idle memory tax",
            |v| Some(v.target_mib),
        ),
        (
            "memvisor_host_guest_target",
            "The guest memory the VM may hold on its target: SZTGT plus its sharing savings (SHRDSVD), at most its size or limit; balloon and swap reclaim what it holds beyond this",
            |v| Some(v.guest_target_mib),
        ),
        (
            "memvisor_host_granted",
            "The VM's guest pages backed by machine memory (GRANT)",
            |v| Some(v.granted_mib),
        ),
        (
            "memvisor_host_balloon",
            "Memory in the VM's balloon (MCTLSZ)",
            |v| Some(v.balloon_mib),
        ),
        (
            "memvisor_host_balloon_target",
            "The VM's balloon target (MCTLTGT)",
            |v| Some(v.balloon_target_mib),
        ),
        (
            "memvisor_host_swapped",
            "The VM's memory in hypervisor swap (SWCUR)",
            |v| Some(v.swapped_mib),
        ),
        (
            "memvisor_host_swap_target",
            "The VM's hypervisor swap target (SWTGT)",
            |v| Some(v.swap_target_mib),
        ),
        (
            "memvisor_host_overhead",
            "The VM's VMM overhead, charged against the budget (OVHD)",
            |v| Some(v.overhead_mib),
        ),
        (
            "memvisor_host_reservation",
            "The VM's reservation: its target is never below it",
            |v| Some(v.reservation_mib),
        ),
        (
            "memvisor_host_limit",
            "The VM's limit: its target is never above it (VMs without a limit have none)",
            |v| v.limit_mib,
        ),
    ];
    for (name, help, value) in sizes {
        per_vm(m, vms, name, help, Some(Unit::Bytes), |v| {
            value(v).map(bytes)
        });
    }
    for v in vms {
        m.gauge(
            "memvisor_host_active",
            "The VM's active memory as the scheduler used it (TCHD): the max of the moving averages of the access estimate (source=accesses), or of the write estimate where reads are not seen (source=writes); one series per VM",
            Some(Unit::Bytes),
            &[("vm", &v.name), ("source", source_name(v.active_source))],
            bytes(v.active_mib),
        );
    }
    per_vm(
        m,
        vms,
        "memvisor_host_shares",
        "The VM's shares",
        None,
        |v| Some(v.shares as f64),
    );
    per_vm(
        m,
        vms,
        "memvisor_host_work_rate",
        "The guest's work rate: page accesses per second, from its exact count",
        Some(Unit::Other("accesses_per_second".into())),
        |v| v.rate,
    );
    per_vm(
        m,
        vms,
        "memvisor_host_balloon_stuck",
        "1 while hypervisor swap stands in for the VM's balloon (none, or it did not move)",
        None,
        |v| Some(f64::from(u8::from(v.balloon_stuck))),
    );
    per_vm(
        m,
        vms,
        "memvisor_host_paused",
        "1 while the VM's vCPU is held out of the guest (the low state, above its target)",
        None,
        |v| Some(f64::from(u8::from(v.paused))),
    );
    for v in vms {
        for s in STATUSES {
            m.gauge(
                "memvisor_host_vm_status",
                "The VM's status: 1 for the current one (running; ended: exit code 0; failed: any other end)",
                None,
                &[("vm", &v.name), ("status", s)],
                f64::from(u8::from(s == v.status)),
            );
        }
    }
    for v in vms {
        m.counter(
            "memvisor_host_order_errors",
            "Balloon and swap orders the VM refused or did not answer",
            None,
            &[("vm", &v.name)],
            totals.order_errors.get(&v.name).copied().unwrap_or(0) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = s
            .samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        match found[0].value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    }

    const M: f64 = MIB as f64;

    #[test]
    fn each_vm_is_labelled_and_the_host_is_not() {
        let rows = testing::rows(5);
        let r = &rows[4];
        let totals = Totals {
            periods: 5,
            order_errors: [("web".to_string(), 2)].into_iter().collect(),
        };
        let text = encode(Some(r), &totals, &infos());
        let s = parse(&text);
        assert_eq!(value(&s, "memvisor_host_budget_bytes", &[]), 200.0 * M);
        assert_eq!(
            value(&s, "memvisor_host_free_bytes", &[]),
            r.host.free_mib * M
        );
        assert_eq!(value(&s, "memvisor_host_periods_total", &[]), 5.0);
        assert_eq!(value(&s, "memvisor_host_state_transitions_total", &[]), 1.0);
        assert_eq!(value(&s, "memvisor_host_running_vms", &[]), 1.0);
        assert_eq!(value(&s, "memvisor_host_state", &[("state", "soft")]), 1.0);
        for other in ["high", "hard", "low"] {
            assert_eq!(value(&s, "memvisor_host_state", &[("state", other)]), 0.0);
        }
        for v in &r.vms {
            let vm = [("vm", v.name.as_str())];
            assert_eq!(
                value(&s, "memvisor_host_target_bytes", &vm),
                v.target_mib * M
            );
            assert_eq!(
                value(&s, "memvisor_host_guest_target_bytes", &vm),
                v.guest_target_mib * M
            );
            assert_eq!(
                value(&s, "memvisor_host_granted_bytes", &vm),
                v.granted_mib * M
            );
            assert_eq!(
                value(&s, "memvisor_host_balloon_target_bytes", &vm),
                v.balloon_target_mib * M
            );
            assert_eq!(
                value(&s, "memvisor_host_swap_target_bytes", &vm),
                v.swap_target_mib * M
            );
            assert_eq!(value(&s, "memvisor_host_shares", &vm), v.shares as f64);
            assert_eq!(
                value(
                    &s,
                    "memvisor_host_active_bytes",
                    &[("vm", &v.name), ("source", source_name(v.active_source))]
                ),
                v.active_mib * M
            );
            assert_eq!(
                value(
                    &s,
                    "memvisor_host_vm_status",
                    &[("vm", &v.name), ("status", v.status)]
                ),
                1.0
            );
        }
        // Only db has a limit; db has ended and reports no rate.
        assert_eq!(
            value(&s, "memvisor_host_limit_bytes", &[("vm", "db")]),
            100.0 * M
        );
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric == "memvisor_host_limit_bytes"
                    && x.labels.get("vm") == Some("web"))
        );
        assert_eq!(
            value(
                &s,
                "memvisor_host_work_rate_accesses_per_second",
                &[("vm", "web")]
            ),
            1.5e6
        );
        assert_eq!(
            value(
                &s,
                "memvisor_host_vm_status",
                &[("vm", "db"), ("status", "running")]
            ),
            0.0
        );
        assert_eq!(
            value(&s, "memvisor_host_order_errors_total", &[("vm", "web")]),
            2.0
        );
        assert_eq!(
            value(&s, "memvisor_host_order_errors_total", &[("vm", "db")]),
            0.0
        );
        // Host metrics carry no vm label; every family has help text.
        for x in &s.samples {
            let per_vm = x.labels.get("vm").is_some();
            let host_only = [
                "memvisor_build_info",
                "memvisor_host_budget_bytes",
                "memvisor_host_free_bytes",
                "memvisor_host_targets_bytes",
                "memvisor_host_state",
                "memvisor_host_periods_total",
                "memvisor_host_state_transitions_total",
                "memvisor_host_running_vms",
                "memvisor_host_time_seconds",
            ]
            .contains(&x.metric.as_str());
            assert_ne!(per_vm, host_only, "{}", x.metric);
            assert!(s.docs.contains_key(&x.metric), "no help for {}", x.metric);
        }
        assert!(text.contains("# TYPE memvisor_host_periods_total counter"));
    }

    fn infos() -> Vec<VmInfo> {
        vec![
            VmInfo {
                name: "web".into(),
                workload: "alloc 8M".into(),
                seed: Some(3),
            },
            VmInfo {
                name: "db".into(),
                workload: "idle 1s".into(),
                seed: None,
            },
        ]
    }

    #[test]
    fn before_the_first_period_only_the_counter_and_the_info() {
        let s = parse(&encode(None, &Totals::default(), &infos()));
        assert_eq!(s.samples.len(), 4);
        assert_eq!(value(&s, "memvisor_host_periods_total", &[]), 0.0);
        assert_eq!(
            value(
                &s,
                "memvisor_run_info",
                &[("vm", "web"), ("workload", "alloc 8M"), ("seed", "3")]
            ),
            1.0
        );
        assert_eq!(
            value(&s, "memvisor_run_info", &[("vm", "db"), ("seed", "random")]),
            1.0
        );
        assert!(s.samples.iter().any(|x| x.metric == "memvisor_build_info"));
    }

    #[test]
    fn each_vms_row_is_served_with_its_name_memory_only_while_it_runs() {
        let mut rows = testing::rows(5);
        let r = &mut rows[4];
        let row = |phase: &str, end| crate::row::Row {
            phase: phase.into(),
            end,
            configured_mib: 128.0,
            host: Some(crate::row::HostUsage {
                backed_mib: 40.0,
                shared_mib: 1.0,
                zero_mib: 8.0,
                untouched_mib: 80.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        r.vms[0].row = Some(row("touch", None));
        r.vms[1].row = Some(row("idle", Some(crate::row::EndReason::Done)));
        let s = parse(&encode(Some(r), &Totals::default(), &infos()));
        for vm in ["web", "db"] {
            let phase = if vm == "web" { "touch" } else { "idle" };
            assert_eq!(
                value(&s, "memvisor_phase_info", &[("vm", vm), ("phase", phase)]),
                1.0
            );
        }
        assert_eq!(
            value(
                &s,
                "memvisor_end_reason",
                &[("vm", "db"), ("reason", "done")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "memvisor_end_reason",
                &[("vm", "web"), ("reason", "done")]
            ),
            0.0
        );
        // web's states sum to its configured RAM; db has ended and holds nothing.
        let states: f64 = s
            .samples
            .iter()
            .filter(|x| x.metric == "memvisor_guest_memory_bytes")
            .map(|x| {
                assert_eq!(x.labels.get("vm"), Some("web"));
                match x.value {
                    prometheus_parse::Value::Gauge(v) => v,
                    ref v => panic!("{v:?}"),
                }
            })
            .sum();
        assert_eq!(states, 128.0 * M);
        // Each family once, however many VMs add to it.
        let text = encode(Some(r), &Totals::default(), &infos());
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert_eq!(text.matches(&format!("{line}\n")).count(), 1, "{line}");
        }
    }

    #[test]
    fn a_vms_info_comes_from_its_spec() {
        let spec = crate::host::spec::parse("name=a,mem=64M,seed=9,workload=alloc 8M; idle 1s", 0)
            .unwrap();
        assert_eq!(
            VmInfo::of(&spec),
            VmInfo {
                name: "a".into(),
                workload: "alloc 8M; idle 1s".into(),
                seed: Some(9),
            }
        );
        let spec = crate::host::spec::parse("mem=512M", 1).unwrap();
        let i = VmInfo::of(&spec);
        assert_eq!((i.name.as_str(), i.seed), ("vm2", None));
        assert_eq!(
            i.workload,
            crate::vmm::config::RunOptions::default().workload
        );
    }

    #[test]
    fn the_endpoint_serves_the_latest_period_and_a_stuck_client_blocks_nothing() {
        let e = Exporter::start("127.0.0.1:0".parse().unwrap(), infos()).unwrap();
        let mut stuck = TcpStream::connect(e.local_addr()).unwrap();
        write!(stuck, "GET /metr").unwrap();
        let rows = testing::rows(3);
        for r in &rows {
            e.update(r);
        }
        let mut c = TcpStream::connect(e.local_addr()).unwrap();
        write!(c, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(" 200 "), "{head}");
        let s = parse(body);
        assert_eq!(value(&s, "memvisor_host_periods_total", &[]), 3.0);
        assert_eq!(value(&s, "memvisor_host_time_seconds", &[]), rows[2].time_s);
        drop(stuck);
    }
}
