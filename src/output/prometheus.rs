//! `--prometheus ADDR`: serves the latest interval in the Prometheus text format (version 0.0.4)
//! at `/metrics`, through the hardened server of [`super::http`] (its own thread; limits on every
//! client). The run loop only swaps the latest row in under a short lock; a scrape copies it out
//! and encodes it, so a slow, stuck or hostile client never holds up the run.
//!
//! The metrics are laid out for dashboards: one metric per meaning, so that `sum()` over a label
//! means something. The estimate, its interval's bounds and its moving averages are separate
//! metrics (`memvisor_active_bytes`, `_ci_low_bytes`, `_ci_high_bytes`, `_avg_bytes`), and guest
//! RAM by page state is one family whose states partition it (`memvisor_guest_memory_bytes`
//! summed over `state` is configured RAM). `kind` and `window` tell estimates apart and are not
//! to be summed over (the access estimate includes the writes); `vm` may be. [`add_row`] is
//! shared with `memvisor host --prometheus`, which labels each VM's row metrics with its name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

pub use super::RunInfo;
use super::http::{Document, HttpError, Server};
use crate::row::{Active, EndReason, Row};

const MIB: f64 = (1u64 << 20) as f64;

/// The path the metrics are served at.
pub const PATH: &str = "/metrics";

/// The longest label value written (a workload can be long): a longer one is cut and ends with
/// `~`.
pub const MAX_LABEL_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("--prometheus {addr}: {source}")]
    Start {
        addr: SocketAddr,
        #[source]
        source: HttpError,
    },
}

/// The latest row and how many rows were reported so far.
#[derive(Default)]
struct Latest {
    row: Option<Row>,
    totals: Totals,
}

/// What the counters count: totals over the rows so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub intervals: u64,
    /// Pages hypervisor swap read back and wrote out.
    pub swap_in_pages: u64,
    pub swap_out_pages: u64,
    /// Seconds the VMM spent swapping out at boundaries, and seconds the page-ins waited.
    pub swap_out_seconds: f64,
    pub swap_in_wait_seconds: f64,
}

/// The HTTP server and the latest row it serves; dropping it stops the server without waiting
/// on any client.
pub struct Exporter {
    latest: Arc<Mutex<Latest>>,
    server: Server,
}

impl Exporter {
    /// Listens on `addr` (port 0 picks a free port) and serves from a new thread. `info.name` is
    /// the `vm` label on every metric, so that one Prometheus can scrape several memvisors.
    pub fn start(addr: SocketAddr, info: RunInfo) -> Result<Self, PrometheusError> {
        let latest = Arc::new(Mutex::new(Latest::default()));
        let doc = Document {
            paths: &[PATH, "/"],
            content_type: prometheus_text::CONTENT_TYPE,
            render: Box::new({
                let latest = latest.clone();
                move || {
                    let (row, totals) = {
                        let l = latest.lock().unwrap_or_else(|e| e.into_inner());
                        (l.row.clone(), l.totals)
                    };
                    encode(row.as_ref(), totals, &info)
                }
            }),
        };
        let server = Server::start(addr, "prometheus", doc)
            .map_err(|source| PrometheusError::Start { addr, source })?;
        Ok(Exporter { latest, server })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Makes `row` the one served and counts it.
    pub fn update(&self, row: &Row) {
        let row = row.clone();
        let mut l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        l.totals.add(&row);
        l.row = Some(row);
    }

    /// Keeps serving the latest row for `linger`, or until `stop` says so (see
    /// [`super::http::linger`]).
    pub fn linger(&self, linger: Duration, stop: &dyn Fn() -> bool) {
        super::http::linger(self.local_addr(), linger, stop);
    }
}

impl Totals {
    /// Counts one more row.
    fn add(&mut self, row: &Row) {
        self.intervals += 1;
        if let Some(s) = &row.swap {
            self.swap_in_pages += s.page_ins;
            self.swap_out_pages += s.page_outs;
            self.swap_out_seconds += s.out_ms / 1e3;
            self.swap_in_wait_seconds += s.in_ms / 1e3;
        }
    }
}

type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;
/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

enum Fam {
    Gauge(Family<Labels, GaugeF>),
    Counter(Family<Labels, CounterF>),
}

/// The metric families of one scrape, built sample by sample: a family is registered (with its
/// help and unit) at its first sample, so that each appears once in the text however many VMs
/// add samples to it.
#[derive(Default)]
pub struct Metrics {
    reg: Registry,
    families: HashMap<String, Fam>,
}

/// `s` cut to [`MAX_LABEL_CHARS`] characters.
pub fn label_value(s: &str) -> String {
    if s.chars().count() <= MAX_LABEL_CHARS {
        return s.to_string();
    }
    let mut t: String = s.chars().take(MAX_LABEL_CHARS - 1).collect();
    t.push('~');
    t
}

fn labels(l: &[(&str, &str)]) -> Labels {
    l.iter()
        .map(|(k, v)| (k.to_string(), label_value(v)))
        .collect()
}

impl Metrics {
    fn family(&mut self, name: &str, help: &str, unit: Option<Unit>, counter: bool) -> &Fam {
        let key = format!("{name}\0{}", unit.as_ref().map_or("", |u| u.as_str()));
        let Metrics { reg, families } = self;
        families.entry(key).or_insert_with(|| {
            if counter {
                let f = Family::<Labels, CounterF>::default();
                match unit {
                    Some(u) => reg.register_with_unit(name, help, u, f.clone()),
                    None => reg.register(name, help, f.clone()),
                }
                Fam::Counter(f)
            } else {
                let f = Family::<Labels, GaugeF>::default();
                match unit {
                    Some(u) => reg.register_with_unit(name, help, u, f.clone()),
                    None => reg.register(name, help, f.clone()),
                }
                Fam::Gauge(f)
            }
        })
    }

    /// Sets the gauge `name` (with `unit`'s suffix) at labels `l` to `v`.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        l: &[(&str, &str)],
        v: f64,
    ) {
        if let Fam::Gauge(f) = self.family(name, help, unit, false) {
            f.get_or_create(&labels(l)).set(v);
        }
    }

    /// A gauge in bytes, from MiB.
    pub fn bytes(&mut self, name: &str, help: &str, l: &[(&str, &str)], mib: f64) {
        self.gauge(name, help, Some(Unit::Bytes), l, mib * MIB);
    }

    /// Adds `v` to the counter `name` (`_total` is appended) at labels `l`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        l: &[(&str, &str)],
        v: f64,
    ) {
        if let Fam::Counter(f) = self.family(name, help, unit, true) {
            f.get_or_create(&labels(l)).inc_by(v);
        }
    }

    /// The families in the text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.reg);
        out
    }
}

/// Appends `(k, v)` to `base`.
fn with<'a>(base: &[(&'a str, &'a str)], k: &'a str, v: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut l = base.to_vec();
    l.push((k, v));
    l
}

/// `memvisor_build_info{version}`: 1, the version of this memvisor.
pub fn add_build_info(m: &mut Metrics, base: &[(&str, &str)]) {
    m.gauge(
        "memvisor_build_info",
        "1, labelled with the version of the memvisor serving these metrics",
        None,
        &with(base, "version", env!("CARGO_PKG_VERSION")),
        1.0,
    );
}

/// `memvisor_run_info{workload,seed}`: 1, labelled with the run's workload and seed.
pub fn add_run_info(m: &mut Metrics, base: &[(&str, &str)], workload: &str, seed: Option<u64>) {
    let seed = seed.map_or_else(|| "random".to_string(), |s| s.to_string());
    let mut l = with(base, "workload", workload);
    l.push(("seed", &seed));
    m.gauge(
        "memvisor_run_info",
        "1, labelled with the run's --workload and --seed (seed=\"random\" without one)",
        None,
        &l,
        1.0,
    );
}

/// The metrics of one run in the Prometheus text format: the info metrics and the interval
/// counter always, the latest row's metrics once there is one.
pub fn encode(row: Option<&Row>, totals: Totals, info: &RunInfo) -> String {
    let mut m = Metrics::default();
    let base = [("vm", info.name.as_str())];
    add_build_info(&mut m, &base);
    add_run_info(&mut m, &base, &info.workload, info.seed);
    m.counter(
        "memvisor_intervals",
        "Reporting intervals completed (one row of the table each)",
        None,
        &base,
        totals.intervals as f64,
    );
    if let Some(r) = row {
        add_row_state(&mut m, &base, r);
        add_row(&mut m, &base, r);
        if r.swap.is_some() {
            add_swap_totals(&mut m, &base, totals);
        }
    }
    m.encode()
}

/// Hypervisor swap's counters over the run: bytes read back and written out, and the times.
fn add_swap_totals(m: &mut Metrics, base: &[(&str, &str)], totals: Totals) {
    let page = crate::units::PAGE_SIZE as f64;
    m.counter(
        "memvisor_swap_in",
        "Bytes hypervisor swap brought back into guest RAM (page-ins)",
        Some(Unit::Bytes),
        base,
        totals.swap_in_pages as f64 * page,
    );
    m.counter(
        "memvisor_swap_out",
        "Bytes hypervisor swap wrote out and dropped from guest RAM (page-outs)",
        Some(Unit::Bytes),
        base,
        totals.swap_out_pages as f64 * page,
    );
    m.counter(
        "memvisor_swap_out",
        "Time the VMM spent swapping out at interval boundaries, with the vCPU stopped",
        Some(Unit::Seconds),
        base,
        totals.swap_out_seconds,
    );
    m.counter(
        "memvisor_swap_in_wait",
        "Time the guest's page-ins waited for swapped pages, as the fault handler measured it",
        Some(Unit::Seconds),
        base,
        totals.swap_in_wait_seconds,
    );
}

/// Where a row is: its phase (info-style), why it ended (enum-style: every reason, 1 for the one
/// that ended the run, all 0 while it runs) and its time.
pub fn add_row_state(m: &mut Metrics, base: &[(&str, &str)], r: &Row) {
    m.gauge(
        "memvisor_phase_info",
        "1, labelled with the workload phase running at the end of the latest interval (\"-\" between phases)",
        None,
        &with(base, "phase", &r.phase),
        1.0,
    );
    for why in EndReason::ALL {
        m.gauge(
            "memvisor_end_reason",
            "Why the run ended: 1 for the reason on its last row, 0 for the others (all 0 while it runs)",
            None,
            &with(base, "reason", why.as_str()),
            f64::from(u8::from(r.end == Some(why))),
        );
    }
    m.gauge(
        "memvisor_time",
        "Guest run time at the end of the latest interval, from the VMM's clock",
        Some(Unit::Seconds),
        base,
        r.time_s,
    );
    m.gauge(
        "memvisor_interval_length",
        "The latest interval's real length (the last one is usually cut short)",
        Some(Unit::Seconds),
        base,
        r.length_s,
    );
}

/// The `kind` label of an estimate: `accesses` (reads and writes) or `writes`, as the host's
/// `source` label says it.
fn kind_label(kind: &str) -> &'static str {
    if kind == "writes" {
        "writes"
    } else {
        "accesses"
    }
}

/// Guest RAM by page state, from the row's host usage: states that partition it, so that they
/// sum to configured RAM.
pub fn memory_states(h: &crate::row::HostUsage) -> [(&'static str, f64); 8] {
    [
        ("untouched", h.untouched_mib),
        ("zero", h.zero_mib),
        // The row's backed includes the shared pages: here they are apart.
        ("backed", h.backed_mib - h.shared_mib),
        ("shared", h.shared_mib),
        ("host_swapped", h.swapped_mib),
        ("vmm_swapped", h.vmm_swapped_mib),
        ("released", h.released_mib),
        ("discarded", h.discarded_mib),
    ]
}

/// The memory metrics of one row (the VM's memory, as a run measures it).
pub fn add_row(m: &mut Metrics, base: &[(&str, &str)], r: &Row) {
    m.bytes(
        "memvisor_guest_configured",
        "Configured guest RAM (guest-physical memory size)",
        base,
        r.configured_mib,
    );
    m.bytes(
        "memvisor_guest_allocated",
        "Guest pages on the guest kernel's allocated list, as the guest reports them (the guest's own view)",
        base,
        r.guest.allocated_mib,
    );
    m.bytes(
        "memvisor_guest_free",
        "Guest pages on the guest kernel's free list, as the guest reports them",
        base,
        r.guest.free_mib,
    );
    if let Some(t) = &r.truth {
        m.bytes(
            "memvisor_truth_touched",
            "Distinct pages the guest's workload read or wrote in the interval, counted exactly by the guest (checks the estimator)",
            base,
            t.touched_mib,
        );
        m.bytes(
            "memvisor_truth_written",
            "Distinct pages the guest's workload wrote in the interval, counted exactly by the guest (checks the estimator)",
            base,
            t.written_mib,
        );
    }
    if let Some(h) = &r.host {
        m.bytes(
            "memvisor_host_usage",
            "Machine memory this VM costs the host: guest pages with a machine page (backed and shared) plus VMM overhead",
            base,
            h.host_mib,
        );
        m.bytes(
            "memvisor_overhead",
            "VMM overhead: the VMM's resident set minus resident guest RAM",
            base,
            h.overhead_mib,
        );
        for (state, mib) in memory_states(h) {
            m.bytes(
                "memvisor_guest_memory",
                "Guest RAM by page state, from the PMP-MMP map; the states partition it (their sum is configured RAM): untouched (never touched), zero (read, never written: the host's zero page), backed (a machine page of its own), shared (a machine page other guest pages map too, e.g. KSM), host_swapped (in the host kernel's swap), vmm_swapped (in the VMM's swap file, --swap), released (given back by the balloon, untouched since), discarded (dropped by the VMM, untouched since)",
                &with(base, "state", state),
                mib,
            );
        }
        m.bytes(
            "memvisor_shared_saved",
            "Machine memory page sharing saves, this VM's part (esxtop SHRDSVD): a machine page that m guest pages map saves m - 1 pages, charged (m - 1)/m to each",
            base,
            h.shared_saved_mib,
        );
    }
    for (kind, a) in r.actives() {
        add_active(m, base, kind_label(kind), a);
    }
    if let Some(rate) = r.active_writes.as_ref().and_then(|w| w.dirty_rate_mib_s) {
        m.gauge(
            "memvisor_dirty_rate",
            "Bytes written per second: the write estimate of the interval over its length; a page written many times counts once (as QEMU's calc-dirty-rate)",
            Some(Unit::Other("bytes_per_second".into())),
            base,
            rate * MIB,
        );
    }
    if let Some(w) = &r.vmm {
        m.gauge(
            "memvisor_pause",
            "The VMM's work at the latest interval boundary with the guest paused (part=all), and its parts (harvest, access_round, write_round, map, row: sum over part != all to get near all)",
            Some(Unit::Seconds),
            &with(base, "part", "all"),
            w.work_ms / 1e3,
        );
        for (part, ms) in [
            ("harvest", w.harvest_ms),
            ("access_round", w.access_round_ms),
            ("write_round", w.write_round_ms),
            ("map", w.map_ms),
            ("row", w.row_ms),
        ] {
            m.gauge(
                "memvisor_pause",
                "",
                Some(Unit::Seconds),
                &with(base, "part", part),
                ms / 1e3,
            );
        }
    }
    if let Some(b) = &r.balloon {
        add_balloon(m, base, b);
    }
    if let Some(s) = &r.swap {
        m.bytes(
            "memvisor_swapped",
            "Guest RAM in the VMM's swap file (hypervisor swap, --swap)",
            base,
            s.swapped_mib,
        );
        m.bytes(
            "memvisor_swap_target",
            "The hypervisor swap target",
            base,
            s.target_mib,
        );
        m.gauge(
            "memvisor_swap_in_rate",
            "Bytes hypervisor swap brought back per second in the latest interval (page-ins; ESX's SWR/s)",
            Some(Unit::Other("bytes_per_second".into())),
            base,
            s.in_mib_s * MIB,
        );
        m.gauge(
            "memvisor_swap_out_rate",
            "Bytes hypervisor swap wrote out per second in the latest interval (page-outs; ESX's SWW/s)",
            Some(Unit::Other("bytes_per_second".into())),
            base,
            s.out_mib_s * MIB,
        );
    }
}

/// One active-memory estimate: a metric each for the estimate, its bounds, its averages and its
/// parts, labelled with its `kind`.
fn add_active(m: &mut Metrics, base: &[(&str, &str)], kind: &str, a: &Active) {
    let k = with(base, "kind", kind);
    m.bytes(
        "memvisor_active",
        "Active guest memory in the interval, a stratified estimate (kind=writes: pages written, from KVM's dirty log; kind=accesses: reads too, so it includes the writes: never sum over kind): pages touched for the first time are counted exactly, pages touched before are sampled (t of n) and scaled up to their stratum",
        &k,
        a.estimate_mib,
    );
    m.bytes(
        "memvisor_active_ci_low",
        "The lower bound of the active estimate's 95% interval (Wilson's with the finite population correction)",
        &k,
        a.ci_low_mib,
    );
    m.bytes(
        "memvisor_active_ci_high",
        "The upper bound of the active estimate's 95% interval (Wilson's with the finite population correction)",
        &k,
        a.ci_high_mib,
    );
    for (window, mib) in [("fast", a.fast_mib), ("slow", a.slow_mib)] {
        let mut l = k.clone();
        l.push(("window", window));
        m.bytes(
            "memvisor_active_avg",
            "Moving averages of the active estimate: window=fast follows changes, window=slow remembers (never sum over window)",
            &l,
            mib,
        );
    }
    m.bytes(
        "memvisor_active_max_avg",
        "The larger of the active estimate's fast and slow moving averages: what a host scheduler takes for the VM's active memory",
        &k,
        a.max_mib,
    );
    m.bytes(
        "memvisor_active_exact",
        "The part of the active estimate counted exactly: pages touched (written) for the first time",
        &k,
        a.exact_mib,
    );
    m.bytes(
        "memvisor_active_stratum",
        "The guest RAM the active estimate's sample was drawn from (pages touched before; all of RAM with --plain-sampling)",
        &k,
        a.sampled_from_mib,
    );
    if let Some(e) = a.error_mib {
        m.bytes(
            "memvisor_active_error",
            "The active estimate minus the guest's exact count (touched for kind=accesses, written for kind=writes)",
            &k,
            e,
        );
    }
    m.gauge(
        "memvisor_samples",
        "Pages sampled in the interval (n) from the stratum of pages touched before, for the active-memory estimate",
        None,
        &k,
        a.n as f64,
    );
    m.gauge(
        "memvisor_samples_touched",
        "Sampled pages touched in the interval (t), scaled up to the stratum in the active-memory estimate",
        None,
        &k,
        a.t as f64,
    );
}

/// The virtio-balloon: its size and target, free page reporting, and the guest's own view from
/// the statistics queue (as libvirt's exporter has them).
fn add_balloon(m: &mut Metrics, base: &[(&str, &str)], b: &crate::row::BalloonView) {
    m.bytes(
        "memvisor_balloon",
        "Guest RAM in the balloon (inflated minus deflated); what it gave back to the host is memvisor_guest_memory_bytes{state=\"released\"}",
        base,
        b.balloon_mib,
    );
    m.bytes(
        "memvisor_balloon_target",
        "The balloon's target size",
        base,
        b.target_mib,
    );
    m.counter(
        "memvisor_balloon_reported",
        "Guest RAM the guest reported free through free page reporting, over the run",
        Some(Unit::Bytes),
        base,
        b.reported_mib * MIB,
    );
    if let Some(g) = &b.guest_stats {
        for (name, help, v) in [
            (
                "memvisor_balloon_guest_free",
                "The guest's free memory, from the balloon's statistics queue (libvirt's unused)",
                g.free_mib,
            ),
            (
                "memvisor_balloon_guest_available",
                "The guest's available memory, from the balloon's statistics queue (libvirt's usable)",
                g.available_mib,
            ),
            (
                "memvisor_balloon_guest_total",
                "The guest's total memory, from the balloon's statistics queue (libvirt's available)",
                g.total_mib,
            ),
        ] {
            if let Some(v) = v {
                m.bytes(name, help, base, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{Active, BalloonView, GuestStats, HostUsage};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn info() -> RunInfo {
        RunInfo {
            name: "vm1".into(),
            workload: "alloc 8M; touch 8M write 1s".into(),
            seed: Some(7),
        }
    }

    fn row() -> Row {
        Row {
            time_s: 2.0,
            interval: 1,
            length_s: 0.5,
            phase: "touch".into(),
            configured_mib: 256.0,
            host: Some(HostUsage {
                host_mib: 68.5,
                backed_mib: 64.25,
                overhead_mib: 4.25,
                zero_mib: 1.0,
                shared_mib: 2.0,
                swapped_mib: 3.0,
                vmm_swapped_mib: 4.0,
                released_mib: 5.0,
                discarded_mib: 0.75,
                untouched_mib: 256.0 - 64.25 - 1.0 - 3.0 - 4.0 - 5.0 - 0.75,
                ..HostUsage::default()
            }),
            active_writes: Some(Active {
                n: 1000,
                t: 250,
                exact_mib: 10.0,
                sampled_from_mib: 200.0,
                estimate_mib: 64.0,
                ci_low_mib: 60.0,
                ci_high_mib: 70.0,
                fast_mib: 50.0,
                slow_mib: 40.0,
                max_mib: 50.0,
                dirty_rate_mib_s: Some(32.0),
                error_mib: None,
                ..Active::default()
            }),
            active: Some(Active {
                n: 500,
                t: 400,
                estimate_mib: 100.0,
                ci_low_mib: 90.0,
                ci_high_mib: 110.0,
                fast_mib: 80.0,
                slow_mib: 60.0,
                max_mib: 80.0,
                error_mib: Some(-1.5),
                ..Active::default()
            }),
            ..Row::default()
        }
    }

    /// Parses a scrape with prometheus-parse.
    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn sample_value(x: &prometheus_parse::Sample) -> f64 {
        match x.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{}: {other:?}", x.metric),
        }
    }

    fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = s
            .samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        sample_value(found[0])
    }

    fn sum(s: &prometheus_parse::Scrape, name: &str) -> f64 {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .map(sample_value)
            .sum()
    }

    #[test]
    fn totals_add_up_the_rows_swap_counts_and_times() {
        let mut t = Totals::default();
        let mut r = row();
        t.add(&r);
        r.swap = Some(crate::row::Swap {
            page_ins: 2,
            page_outs: 100,
            out_ms: 40.0,
            in_ms: 0.5,
            ..crate::row::Swap::default()
        });
        t.add(&r);
        t.add(&r);
        assert_eq!(t.intervals, 3);
        assert_eq!((t.swap_in_pages, t.swap_out_pages), (4, 200));
        assert!((t.swap_out_seconds - 0.08).abs() < 1e-12, "{t:?}");
        assert!((t.swap_in_wait_seconds - 0.001).abs() < 1e-12, "{t:?}");
        let text = encode(Some(&r), t, &info());
        let s = parse(&text);
        assert!((value(&s, "memvisor_swap_out_seconds_total", &[]) - 0.08).abs() < 1e-12);
        assert!(
            text.contains("# TYPE memvisor_swap_out_seconds_total counter"),
            "{text}"
        );
    }

    #[test]
    fn metrics_are_named_with_base_units_and_typed() {
        let mut r = row();
        r.swap = Some(crate::row::Swap {
            swapped_mib: 24.0,
            target_mib: 32.0,
            in_mib_s: 1.5,
            ..crate::row::Swap::default()
        });
        let totals = Totals {
            intervals: 2,
            swap_in_pages: 3,
            swap_out_pages: 5,
            swap_out_seconds: 0.25,
            swap_in_wait_seconds: 0.0125,
        };
        let text = encode(Some(&r), totals, &info());
        let s = parse(&text);
        assert_eq!(value(&s, "memvisor_host_usage_bytes", &[]), 68.5 * MIB);
        assert_eq!(value(&s, "memvisor_overhead_bytes", &[]), 4.25 * MIB);
        assert_eq!(
            value(&s, "memvisor_guest_configured_bytes", &[]),
            256.0 * MIB
        );
        let w = [("kind", "writes")];
        assert_eq!(value(&s, "memvisor_active_bytes", &w), 64.0 * MIB);
        assert_eq!(value(&s, "memvisor_active_ci_low_bytes", &w), 60.0 * MIB);
        assert_eq!(value(&s, "memvisor_active_ci_high_bytes", &w), 70.0 * MIB);
        assert_eq!(
            value(
                &s,
                "memvisor_active_avg_bytes",
                &[("kind", "writes"), ("window", "slow")]
            ),
            40.0 * MIB
        );
        assert_eq!(value(&s, "memvisor_active_max_avg_bytes", &w), 50.0 * MIB);
        assert_eq!(value(&s, "memvisor_active_exact_bytes", &w), 10.0 * MIB);
        assert_eq!(value(&s, "memvisor_active_stratum_bytes", &w), 200.0 * MIB);
        assert_eq!(
            value(&s, "memvisor_active_bytes", &[("kind", "accesses")]),
            100.0 * MIB
        );
        assert_eq!(
            value(&s, "memvisor_active_error_bytes", &[("kind", "accesses")]),
            -1.5 * MIB
        );
        // No error without the truth.
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric == "memvisor_active_error_bytes"
                    && x.labels.get("kind") == Some("writes"))
        );
        assert_eq!(
            value(&s, "memvisor_dirty_rate_bytes_per_second", &[]),
            32.0 * MIB
        );
        assert_eq!(value(&s, "memvisor_samples", &w), 1000.0);
        assert_eq!(value(&s, "memvisor_intervals_total", &[]), 2.0);
        assert_eq!(value(&s, "memvisor_swapped_bytes", &[]), 24.0 * MIB);
        assert_eq!(value(&s, "memvisor_swap_target_bytes", &[]), 32.0 * MIB);
        assert_eq!(
            value(&s, "memvisor_swap_in_rate_bytes_per_second", &[]),
            1.5 * MIB
        );
        assert_eq!(value(&s, "memvisor_swap_in_bytes_total", &[]), 3.0 * 4096.0);
        assert_eq!(
            value(&s, "memvisor_swap_out_bytes_total", &[]),
            5.0 * 4096.0
        );
        assert_eq!(value(&s, "memvisor_swap_out_seconds_total", &[]), 0.25);
        assert_eq!(
            value(&s, "memvisor_swap_in_wait_seconds_total", &[]),
            0.0125
        );
        assert_eq!(value(&s, "memvisor_interval_length_seconds", &[]), 0.5);
        assert!(s.samples.iter().all(|x| x.labels.get("vm") == Some("vm1")));
        // _total only on counters; every metric has help text and a TYPE line, once.
        for x in &s.samples {
            let counter = matches!(x.value, prometheus_parse::Value::Counter(_));
            assert_eq!(x.metric.ends_with("_total"), counter, "{}", x.metric);
            assert!(s.docs.contains_key(&x.metric), "no help for {}", x.metric);
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert_eq!(text.matches(&format!("{line}\n")).count(), 1, "{line}");
        }
    }

    #[test]
    fn no_family_mixes_an_estimate_with_its_bounds_or_averages() {
        let s = parse(&encode(Some(&row()), Totals::default(), &info()));
        // Each active family has one sample per kind (and window), and nothing else labels it.
        for (name, per_kind) in [
            ("memvisor_active_bytes", 1),
            ("memvisor_active_ci_low_bytes", 1),
            ("memvisor_active_ci_high_bytes", 1),
            ("memvisor_active_avg_bytes", 2),
            ("memvisor_active_max_avg_bytes", 1),
        ] {
            for kind in ["accesses", "writes"] {
                let n = s
                    .samples
                    .iter()
                    .filter(|x| x.metric == name && x.labels.get("kind") == Some(kind))
                    .count();
                assert_eq!(n, per_kind, "{name}{{kind={kind}}}");
            }
        }
        assert!(s.samples.iter().all(|x| x.labels.get("stat").is_none()));
        // Summing the estimate over VMs (one here) is the estimate: bounds are not in it.
        assert_eq!(
            s.samples
                .iter()
                .filter(|x| x.metric == "memvisor_active_bytes"
                    && x.labels.get("kind") == Some("writes"))
                .map(sample_value)
                .sum::<f64>(),
            64.0 * MIB
        );
    }

    #[test]
    fn guest_memory_by_state_sums_to_configured_ram() {
        let r = row();
        let s = parse(&encode(Some(&r), Totals::default(), &info()));
        assert_eq!(sum(&s, "memvisor_guest_memory_bytes"), 256.0 * MIB);
        let h = r.host.as_ref().unwrap();
        for (state, want) in [
            ("backed", 62.25),
            ("shared", 2.0),
            ("zero", 1.0),
            ("host_swapped", 3.0),
            ("vmm_swapped", 4.0),
            ("released", 5.0),
            ("discarded", 0.75),
            ("untouched", h.untouched_mib),
        ] {
            assert_eq!(
                value(&s, "memvisor_guest_memory_bytes", &[("state", state)]),
                want * MIB,
                "{state}"
            );
        }
        // The states are the partition, one sample each.
        assert_eq!(
            s.samples
                .iter()
                .filter(|x| x.metric == "memvisor_guest_memory_bytes")
                .count(),
            8
        );
    }

    #[test]
    fn info_phase_and_end_reason() {
        let mut r = row();
        let s = parse(&encode(Some(&r), Totals::default(), &info()));
        assert_eq!(
            value(
                &s,
                "memvisor_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "memvisor_run_info",
                &[("workload", "alloc 8M; touch 8M write 1s"), ("seed", "7")]
            ),
            1.0
        );
        assert_eq!(value(&s, "memvisor_phase_info", &[("phase", "touch")]), 1.0);
        // Running: every reason listed, all 0.
        assert_eq!(
            s.samples
                .iter()
                .filter(|x| x.metric == "memvisor_end_reason")
                .count(),
            EndReason::ALL.len()
        );
        assert_eq!(sum(&s, "memvisor_end_reason"), 0.0);
        r.end = Some(EndReason::Timeout);
        let s = parse(&encode(Some(&r), Totals::default(), &info()));
        assert_eq!(sum(&s, "memvisor_end_reason"), 1.0);
        assert_eq!(
            value(&s, "memvisor_end_reason", &[("reason", "timeout")]),
            1.0
        );
        // No seed: "random"; a long workload is cut, quotes and newlines escaped.
        let long = format!("\"x\"\n{}", "touch 1M; ".repeat(100));
        let s = parse(&encode(
            None,
            Totals::default(),
            &RunInfo {
                name: "a".into(),
                workload: long,
                seed: None,
            },
        ));
        let ri = s
            .samples
            .iter()
            .find(|x| x.metric == "memvisor_run_info")
            .unwrap();
        assert_eq!(ri.labels.get("seed"), Some("random"));
        // prometheus-parse leaves the escapes in: the text format was escaped.
        let w = ri.labels.get("workload").unwrap();
        assert!(w.starts_with(r#"\"x\"\n"#), "{w}");
        let unescaped = w.replace(r#"\""#, "\"").replace(r"\n", "\n");
        assert_eq!(unescaped.chars().count(), MAX_LABEL_CHARS, "{w}");
        assert!(w.ends_with('~'));
    }

    #[test]
    fn balloon_metrics_and_the_guests_view() {
        let mut r = row();
        r.balloon = Some(BalloonView {
            balloon_mib: 12.0,
            target_mib: 16.0,
            reported_mib: 7.5,
            guest_stats: Some(GuestStats {
                free_mib: Some(100.0),
                total_mib: Some(250.0),
                available_mib: Some(120.0),
                source: "virtio-balloon".into(),
            }),
            ..BalloonView::default()
        });
        let s = parse(&encode(Some(&r), Totals::default(), &info()));
        assert_eq!(value(&s, "memvisor_balloon_bytes", &[]), 12.0 * MIB);
        assert_eq!(value(&s, "memvisor_balloon_target_bytes", &[]), 16.0 * MIB);
        assert_eq!(
            value(&s, "memvisor_balloon_reported_bytes_total", &[]),
            7.5 * MIB
        );
        assert_eq!(
            value(&s, "memvisor_balloon_guest_free_bytes", &[]),
            100.0 * MIB
        );
        assert_eq!(
            value(&s, "memvisor_balloon_guest_available_bytes", &[]),
            120.0 * MIB
        );
        assert_eq!(
            value(&s, "memvisor_balloon_guest_total_bytes", &[]),
            250.0 * MIB
        );
        // Without a balloon, none of them.
        let s = parse(&encode(Some(&row()), Totals::default(), &info()));
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric.starts_with("memvisor_balloon"))
        );
    }

    #[test]
    fn before_the_first_row_only_the_counter_and_the_info() {
        let s = parse(&encode(None, Totals::default(), &info()));
        let mut names: Vec<_> = s.samples.iter().map(|x| x.metric.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "memvisor_build_info",
                "memvisor_intervals_total",
                "memvisor_run_info"
            ]
        );
        assert_eq!(value(&s, "memvisor_intervals_total", &[]), 0.0);
    }

    fn scrape(addr: SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_string()
    }

    #[test]
    fn a_stuck_client_does_not_block_updates_or_other_scrapes() {
        let e = Exporter::start("127.0.0.1:0".parse().unwrap(), info()).unwrap();
        // A client that sends half a request and then nothing.
        let mut stuck = TcpStream::connect(e.local_addr()).unwrap();
        write!(stuck, "GET /metr").unwrap();
        let mut r = row();
        for i in 0..5 {
            r.time_s = i as f64;
            e.update(&r);
        }
        let s = parse(&scrape(e.local_addr()));
        assert_eq!(value(&s, "memvisor_intervals_total", &[]), 5.0);
        assert_eq!(value(&s, "memvisor_time_seconds", &[]), 4.0);
        drop(stuck);
        drop(e);
    }

    #[test]
    fn serves_on_every_interface_for_a_colon_port() {
        let addr = crate::output::socket_addr_arg(":0").unwrap();
        let e = Exporter::start(addr, info()).unwrap();
        let port = e.local_addr().port();
        assert_ne!(port, 0);
        // Reached over IPv4 loopback (and so any IPv4 interface) too.
        let s = parse(&scrape(SocketAddr::from(([127, 0, 0, 1], port))));
        assert_eq!(value(&s, "memvisor_intervals_total", &[]), 0.0);
    }

    #[test]
    fn a_port_in_use_is_a_clear_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let err = Exporter::start(addr, info()).err().unwrap().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.to_lowercase().contains("in use"), "{err}");
    }
}
