//! `memvisor host --prometheus ADDR`: the latest period in the Prometheus text format at
//! `/metrics`, one endpoint for the whole host with a `vm` label on each VM's metrics.
//!
//! It is served by the hardened server of [`crate::output::http`] on its own thread, as
//! `run --prometheus` is: the host loop only swaps the latest period in under a short lock, and a
//! scrape copies it out and encodes it, so a slow, stuck or hostile client never delays the loop.
//!
//! The host: `memvisor_host_budget_bytes`, `_free_bytes`, `_targets_bytes`, `_running_vms`,
//! `_time_seconds`, the state as an enum-style gauge (`memvisor_host_state{state="soft"} 1`, the
//! other states 0), and the counters `memvisor_host_state_transitions_total` and
//! `memvisor_host_periods_total`. Each VM, labelled `vm="NAME"`: `memvisor_host_configured_bytes`
//! (MEMSZ), `_target_bytes` (SZTGT), `_granted_bytes` (GRANT), `_active_bytes` (TCHD, with a
//! `source` label: `accesses` or `writes`), `_balloon_bytes` and `_balloon_target_bytes` (MCTLSZ,
//! MCTLTGT), `_swapped_bytes` and `_swap_target_bytes` (SWCUR, SWTGT), `_overhead_bytes` (OVHD),
//! `_shares`, `_reservation_bytes`, `_limit_bytes` (only a VM with a limit), the guest's
//! `_work_rate_accesses_per_second` (once it reports one), `_balloon_stuck` (1 while swap stands in
//! for a balloon that does not move), `_paused` (1 while its vCPU is held in `low`), its status as an enum-style gauge
//! (`memvisor_host_vm_status{vm="web",status="running"} 1`) and `_order_errors_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::scheduler::ActiveSource;
use super::state::MemState;
use super::supervisor::{HostRow, VmLine};
use crate::output::http::{Document, Server};
use crate::output::prometheus::{PATH, PrometheusError};
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

/// The HTTP server and the period it serves; dropping it stops the server without waiting on any
/// client.
pub struct Exporter {
    latest: Arc<Mutex<Latest>>,
    server: Server,
}

impl Exporter {
    /// Listens on `addr` (port 0 picks a free port) and serves from a new thread; a bad address
    /// fails here, before any VM starts.
    pub fn start(addr: SocketAddr) -> Result<Self, PrometheusError> {
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
                    encode(row.as_ref(), &totals)
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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActiveLabels {
    vm: String,
    /// `accesses` or `writes`: the estimate the scheduler used.
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    vm: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

fn gauge(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: f64) {
    let g = GaugeF::default();
    g.set(v);
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, g),
        None => reg.register(name, help, g),
    }
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// A per-VM gauge family: `value` of each VM (none where it gives `None`).
fn per_vm(
    reg: &mut Registry,
    vms: &[VmLine],
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: impl Fn(&VmLine) -> Option<f64>,
) {
    let family = Family::<VmLabel, GaugeF>::default();
    let mut any = false;
    for v in vms {
        if let Some(x) = value(v) {
            any = true;
            family.get_or_create(&VmLabel { vm: v.name.clone() }).set(x);
        }
    }
    if any {
        match unit {
            Some(u) => reg.register_with_unit(name, help, u, family),
            None => reg.register(name, help, family),
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
/// only the period counter (0).
pub fn encode(row: Option<&HostRow>, totals: &Totals) -> String {
    let mut reg = Registry::default();
    counter(
        &mut reg,
        "memvisor_host_periods",
        "Host periods completed (one block of the table each)",
        totals.periods,
    );
    if let Some(r) = row {
        add_host(&mut reg, r);
        add_vms(&mut reg, &r.vms, totals);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

fn add_host(reg: &mut Registry, r: &HostRow) {
    let h = &r.host;
    gauge(
        reg,
        "memvisor_host_time",
        "Time since the host started, at the end of the latest period",
        Some(Unit::Seconds),
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
        gauge(reg, name, help, Some(Unit::Bytes), bytes(mib));
    }
    gauge(
        reg,
        "memvisor_host_running_vms",
        "VMs still running",
        None,
        h.running as f64,
    );
    let state = Family::<StateLabel, GaugeF>::default();
    for s in STATES {
        state
            .get_or_create(&StateLabel {
                state: s.as_str().into(),
            })
            .set(if s == h.state { 1.0 } else { 0.0 });
    }
    reg.register(
        "memvisor_host_state",
        "The host's memory state, from the budget's free part: 1 for the current one (high: nothing; soft: balloon; hard: also hypervisor swap; low: also pause VMs above their target)",
        state,
    );
    counter(
        reg,
        "memvisor_host_state_transitions",
        "Changes of the host's memory state",
        h.transitions,
    );
}

fn add_vms(reg: &mut Registry, vms: &[VmLine], totals: &Totals) {
    type Field = (&'static str, &'static str, fn(&VmLine) -> Option<f64>);
    let sizes: [Field; 10] = [
        (
            "memvisor_host_configured",
            "The VM's configured memory (MEMSZ)",
            |v| Some(v.mem_mib),
        ),
        (
            "memvisor_host_target",
            "The VM's target allocation (SZTGT): min-funding revocation with the idle memory tax",
            |v| Some(v.target_mib),
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
        per_vm(reg, vms, name, help, Some(Unit::Bytes), |v| {
            value(v).map(bytes)
        });
    }
    let active = Family::<ActiveLabels, GaugeF>::default();
    for v in vms {
        active
            .get_or_create(&ActiveLabels {
                vm: v.name.clone(),
                source: source_name(v.active_source).into(),
            })
            .set(bytes(v.active_mib));
    }
    if !vms.is_empty() {
        reg.register_with_unit(
            "memvisor_host_active",
            "The VM's active memory as the scheduler used it (TCHD): the max of the moving averages of the access estimate (source=accesses), or of the write estimate where reads are not seen (source=writes)",
            Unit::Bytes,
            active,
        );
    }
    per_vm(
        reg,
        vms,
        "memvisor_host_shares",
        "The VM's shares",
        None,
        |v| Some(v.shares as f64),
    );
    per_vm(
        reg,
        vms,
        "memvisor_host_work_rate",
        "The guest's work rate: page accesses per second, from its exact count",
        Some(Unit::Other("accesses_per_second".into())),
        |v| v.rate,
    );
    per_vm(
        reg,
        vms,
        "memvisor_host_balloon_stuck",
        "1 while hypervisor swap stands in for the VM's balloon (none, or it did not move)",
        None,
        |v| Some(f64::from(u8::from(v.balloon_stuck))),
    );
    per_vm(
        reg,
        vms,
        "memvisor_host_paused",
        "1 while the VM's vCPU is held out of the guest (the low state, above its target)",
        None,
        |v| Some(f64::from(u8::from(v.paused))),
    );
    let status = Family::<StatusLabels, GaugeF>::default();
    for v in vms {
        for s in STATUSES {
            status
                .get_or_create(&StatusLabels {
                    vm: v.name.clone(),
                    status: s.into(),
                })
                .set(if s == v.status { 1.0 } else { 0.0 });
        }
    }
    let errors = Family::<VmLabel, Counter>::default();
    for v in vms {
        errors
            .get_or_create(&VmLabel { vm: v.name.clone() })
            .inc_by(totals.order_errors.get(&v.name).copied().unwrap_or(0));
    }
    if !vms.is_empty() {
        reg.register(
            "memvisor_host_vm_status",
            "The VM's status: 1 for the current one (running; ended: exit code 0; failed: any other end)",
            status,
        );
        reg.register(
            "memvisor_host_order_errors",
            "Balloon and swap orders the VM refused or did not answer",
            errors,
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
        let text = encode(Some(r), &totals);
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

    #[test]
    fn before_the_first_period_only_the_counter() {
        let s = parse(&encode(None, &Totals::default()));
        assert_eq!(s.samples.len(), 1);
        assert_eq!(value(&s, "memvisor_host_periods_total", &[]), 0.0);
    }

    #[test]
    fn the_endpoint_serves_the_latest_period_and_a_stuck_client_blocks_nothing() {
        let e = Exporter::start("127.0.0.1:0".parse().unwrap()).unwrap();
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
