//! `--prometheus ADDR`: serves the latest interval in the Prometheus text format (version 0.0.4)
//! at `/metrics`, through the hardened server of [`super::http`] (its own thread; limits on every
//! client). The run loop only swaps the latest row in under a short lock; a scrape copies it out
//! and encodes it, so a slow, stuck or hostile client never holds up the run.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::http::{Document, HttpError, Server};
use crate::row::Row;

const MIB: f64 = (1u64 << 20) as f64;

/// The path the metrics are served at.
pub const PATH: &str = "/metrics";

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
    /// Listens on `addr` (port 0 picks a free port) and serves from a new thread. `name` is the
    /// `vm` label on every metric, so that one Prometheus can scrape several memvisors.
    pub fn start(addr: SocketAddr, name: String) -> Result<Self, PrometheusError> {
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
                    encode(row.as_ref(), totals, &name)
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

/// Labels of the active-memory metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActiveLabels {
    /// "writes" (the dirty log) or "access" (reads too).
    kind: String,
    /// estimate, ci_low, ci_high, fast, slow or max.
    stat: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
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

fn bytes(reg: &mut Registry, name: &str, help: &str, mib: f64) {
    gauge(reg, name, help, Some(Unit::Bytes), mib * MIB);
}

/// The metrics of one row in the Prometheus text format. Without a row yet, only the interval
/// counter (0).
pub fn encode(row: Option<&Row>, totals: Totals, name: &str) -> String {
    let mut reg =
        Registry::with_labels([(Cow::Borrowed("vm"), Cow::Owned(name.to_string()))].into_iter());
    let c: Counter = Counter::default();
    c.inc_by(totals.intervals);
    reg.register(
        "memvisor_intervals",
        "Reporting intervals completed (one row of the table each)",
        c,
    );
    if let Some(r) = row {
        add_row(&mut reg, r);
        if let Some(s) = &r.swap {
            add_swap(&mut reg, s, totals);
        }
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

/// Hypervisor swap (`--swap`): the swapped total and target now, and bytes read back and written
/// out over the run.
fn add_swap(reg: &mut Registry, s: &crate::row::Swap, totals: Totals) {
    bytes(
        reg,
        "memvisor_swapped",
        "Guest RAM in the VMM's swap file (hypervisor swap, --swap)",
        s.swapped_mib,
    );
    bytes(
        reg,
        "memvisor_swap_target",
        "The hypervisor swap target",
        s.target_mib,
    );
    for (name, help, pages) in [
        (
            "memvisor_swap_in",
            "Bytes hypervisor swap brought back into guest RAM (page-ins)",
            totals.swap_in_pages,
        ),
        (
            "memvisor_swap_out",
            "Bytes hypervisor swap wrote out and dropped from guest RAM (page-outs)",
            totals.swap_out_pages,
        ),
    ] {
        let c: Counter = Counter::default();
        c.inc_by(pages * crate::units::PAGE_SIZE);
        reg.register_with_unit(name, help, Unit::Bytes, c);
    }
    for (name, help, secs) in [
        (
            "memvisor_swap_out",
            "Time the VMM spent swapping out at interval boundaries, with the vCPU stopped",
            totals.swap_out_seconds,
        ),
        (
            "memvisor_swap_in_wait",
            "Time the guest's page-ins waited for swapped pages, as the fault handler measured it",
            totals.swap_in_wait_seconds,
        ),
    ] {
        let c: Counter<f64, AtomicU64> = Counter::default();
        c.inc_by(secs);
        reg.register_with_unit(name, help, Unit::Seconds, c);
    }
}

fn add_row(reg: &mut Registry, r: &Row) {
    gauge(
        reg,
        "memvisor_time",
        "Guest run time at the end of the latest interval, from the VMM's clock",
        Some(Unit::Seconds),
        r.time_s,
    );
    bytes(
        reg,
        "memvisor_guest_configured",
        "Configured guest RAM (guest-physical memory size)",
        r.configured_mib,
    );
    bytes(
        reg,
        "memvisor_guest_allocated",
        "Guest pages on the guest kernel's allocated list, as the guest reports them (the guest's own view)",
        r.guest.allocated_mib,
    );
    bytes(
        reg,
        "memvisor_guest_free",
        "Guest pages on the guest kernel's free list, as the guest reports them",
        r.guest.free_mib,
    );
    if let Some(t) = &r.truth {
        bytes(
            reg,
            "memvisor_truth_touched",
            "Distinct pages the guest's workload read or wrote in the interval, counted exactly by the guest (checks the estimator)",
            t.touched_mib,
        );
        bytes(
            reg,
            "memvisor_truth_written",
            "Distinct pages the guest's workload wrote in the interval, counted exactly by the guest (checks the estimator)",
            t.written_mib,
        );
    }
    if let Some(h) = &r.host {
        bytes(
            reg,
            "memvisor_host_usage",
            "Machine memory this VM costs the host: backed guest pages plus VMM overhead",
            h.host_mib,
        );
        bytes(
            reg,
            "memvisor_backed",
            "Guest pages with a machine page of their own, from KVM's dirty log and /proc/self/pagemap (the PMP-MMP map)",
            h.backed_mib,
        );
        bytes(
            reg,
            "memvisor_overhead",
            "VMM overhead: the VMM's resident set minus resident guest RAM",
            h.overhead_mib,
        );
        bytes(
            reg,
            "memvisor_zero",
            "Guest pages read but never written: they map the host's shared zero page and cost nothing",
            h.zero_mib,
        );
        bytes(
            reg,
            "memvisor_untouched",
            "Guest pages never touched: no machine page",
            h.untouched_mib,
        );
        bytes(
            reg,
            "memvisor_host_swapped",
            "Guest pages the host kernel swapped out (from /proc/self/pagemap); the VMM's own swap is memvisor_swapped_bytes",
            h.swapped_mib,
        );
        bytes(
            reg,
            "memvisor_shared",
            "Guest pages whose machine page backs several guest pages (e.g. KSM), from /proc/self/pagemap",
            h.shared_mib,
        );
        bytes(
            reg,
            "memvisor_shared_saved",
            "Machine memory page sharing saves, this VM's part (esxtop SHRDSVD): a machine page that m guest pages map saves m - 1 pages, charged (m - 1)/m to each",
            h.shared_saved_mib,
        );
    }
    let active = Family::<ActiveLabels, GaugeF>::default();
    let samples = Family::<KindLabel, GaugeF>::default();
    let touched = Family::<KindLabel, GaugeF>::default();
    let mut any = false;
    for (kind, a) in r.actives() {
        any = true;
        for (stat, mib) in [
            ("estimate", a.estimate_mib),
            ("ci_low", a.ci_low_mib),
            ("ci_high", a.ci_high_mib),
            ("fast", a.fast_mib),
            ("slow", a.slow_mib),
            ("max", a.max_mib),
        ] {
            let l = ActiveLabels {
                kind: kind.into(),
                stat: stat.into(),
            };
            active.get_or_create(&l).set(mib * MIB);
        }
        let k = KindLabel { kind: kind.into() };
        samples.get_or_create(&k).set(a.n as f64);
        touched.get_or_create(&k).set(a.t as f64);
    }
    if let Some(w) = &r.active_writes {
        gauge(
            reg,
            "memvisor_dirty_rate",
            "Bytes written per second: the write estimate of the interval over its length; a page written many times counts once (as QEMU's calc-dirty-rate)",
            Some(Unit::Other("bytes_per_second".into())),
            w.dirty_rate_mib_s * MIB,
        );
    }
    if any {
        reg.register_with_unit(
            "memvisor_active",
            "Active guest memory in the interval, a stratified estimate (kind=writes: pages written, from KVM's dirty log; kind=access: reads too): pages touched for the first time are counted exactly, pages touched before are sampled (t of n) and scaled up to their stratum (with --plain-sampling: no exact part, the stratum is all of RAM); estimate = exact + t/n x stratum, its 95% interval (ci_low, ci_high; Wilson's with the finite population correction), fast and slow moving averages and their max",
            Unit::Bytes,
            active,
        );
        reg.register(
            "memvisor_samples",
            "Pages sampled in the interval (n) from the stratum of pages touched before, for the active-memory estimate",
            samples,
        );
        reg.register(
            "memvisor_samples_touched",
            "Sampled pages touched in the interval (t), scaled up to the stratum in the active-memory estimate",
            touched,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{Active, HostUsage};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn row() -> Row {
        Row {
            time_s: 2.0,
            interval: 1,
            phase: "touch".into(),
            configured_mib: 256.0,
            host: Some(HostUsage {
                host_mib: 68.5,
                backed_mib: 64.25,
                overhead_mib: 4.25,
                zero_mib: 1.0,
                ..HostUsage::default()
            }),
            active_writes: Some(Active {
                n: 1000,
                t: 250,
                estimate_mib: 64.0,
                ci_low_mib: 60.0,
                ci_high_mib: 70.0,
                fast_mib: 50.0,
                slow_mib: 40.0,
                max_mib: 50.0,
                dirty_rate_mib_s: 32.0,
                error_mib: None,
                ..Active::default()
            }),
            ..Row::default()
        }
    }

    /// Parses a scrape with prometheus-parse.
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
        let text = encode(Some(&r), t, "vm1");
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
            ..crate::row::Swap::default()
        });
        let totals = Totals {
            intervals: 2,
            swap_in_pages: 3,
            swap_out_pages: 5,
            swap_out_seconds: 0.25,
            swap_in_wait_seconds: 0.0125,
        };
        let text = encode(Some(&r), totals, "vm1");
        let s = parse(&text);
        assert_eq!(value(&s, "memvisor_host_usage_bytes", &[]), 68.5 * MIB);
        assert_eq!(value(&s, "memvisor_backed_bytes", &[]), 64.25 * MIB);
        assert_eq!(
            value(&s, "memvisor_guest_configured_bytes", &[]),
            256.0 * MIB
        );
        assert_eq!(
            value(
                &s,
                "memvisor_active_bytes",
                &[("kind", "writes"), ("stat", "ci_high")]
            ),
            70.0 * MIB
        );
        assert_eq!(
            value(&s, "memvisor_dirty_rate_bytes_per_second", &[]),
            32.0 * MIB
        );
        assert_eq!(value(&s, "memvisor_samples", &[("kind", "writes")]), 1000.0);
        assert_eq!(value(&s, "memvisor_intervals_total", &[]), 2.0);
        assert_eq!(value(&s, "memvisor_swapped_bytes", &[]), 24.0 * MIB);
        assert_eq!(value(&s, "memvisor_swap_target_bytes", &[]), 32.0 * MIB);
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
        assert!(s.samples.iter().all(|x| x.labels.get("vm") == Some("vm1")));
        // _total only on the counter; every metric has help text.
        assert!(
            text.contains("# TYPE memvisor_intervals_total counter"),
            "{text}"
        );
        for x in &s.samples {
            assert!(
                !x.metric.ends_with("_total")
                    || [
                        "memvisor_intervals_total",
                        "memvisor_swap_in_bytes_total",
                        "memvisor_swap_out_bytes_total",
                        "memvisor_swap_out_seconds_total",
                        "memvisor_swap_in_wait_seconds_total"
                    ]
                    .contains(&x.metric.as_str()),
                "{}",
                x.metric
            );
            let family = x.metric.as_str();
            assert!(s.docs.contains_key(family), "no help for {family}");
        }
    }

    #[test]
    fn before_the_first_row_only_the_counter() {
        let s = parse(&encode(None, Totals::default(), "x"));
        assert_eq!(s.samples.len(), 1);
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
        let e = Exporter::start("127.0.0.1:0".parse().unwrap(), "t".into()).unwrap();
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
    fn a_port_in_use_is_a_clear_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let err = Exporter::start(addr, "t".into()).err().unwrap().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.to_lowercase().contains("in use"), "{err}");
    }
}
