//! What `memvisor top` shows, from either source's JSON: a `run` row (`run --json`, a run's
//! control socket's `query`) or a host period (`host --json`, a host's control socket's `query`,
//! which adds each VM's latest row). They are told apart by shape: a host period has `vms`.
//!
//! Both become a [`Snapshot`]: a header (the host line, or the run's) and one [`VmView`] per VM
//! with the figures of esxtop's memory screen ([`Col`]), `None` where the source has no such
//! figure (a run has no SZTGT; a host's `--json` has no write estimate).

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use crate::row::Row;

/// Why a line or an answer is not something to show.
#[derive(Debug, Error, PartialEq)]
pub enum DataError {
    #[error("not JSON: {0} (memvisor run and memvisor host print JSON with --json)")]
    NotJson(String),
    #[error(
        "neither a run's row nor a host's period (a JSON object with \"interval\", or with \"host\" and \"vms\")"
    )]
    Shape,
    #[error("a host period that does not read: {0}")]
    Host(String),
    #[error("a run's row that does not read: {0}")]
    Run(String),
}

/// The table's columns: esxtop's memory-screen names where esxtop has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Col {
    Name,
    State,
    Memsz,
    Sztgt,
    Grant,
    Host,
    Tchd,
    PctActv,
    TchdW,
    Mctlsz,
    Mctltgt,
    Swcur,
    Swtgt,
    SwrS,
    SwwS,
    Ovhd,
    Shares,
    Resv,
    Limit,
    Rate,
}

impl Col {
    /// Every column, in the table's order.
    pub const ALL: [Col; 20] = [
        Col::Name,
        Col::State,
        Col::Memsz,
        Col::Sztgt,
        Col::Grant,
        Col::Host,
        Col::Tchd,
        Col::PctActv,
        Col::TchdW,
        Col::Mctlsz,
        Col::Mctltgt,
        Col::Swcur,
        Col::Swtgt,
        Col::SwrS,
        Col::SwwS,
        Col::Ovhd,
        Col::Shares,
        Col::Resv,
        Col::Limit,
        Col::Rate,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The header.
    pub fn title(self) -> &'static str {
        match self {
            Col::Name => "NAME",
            Col::State => "STATE",
            Col::Memsz => "MEMSZ",
            Col::Sztgt => "SZTGT",
            Col::Grant => "GRANT",
            Col::Host => "HOST",
            Col::Tchd => "TCHD",
            Col::PctActv => "%ACTV",
            Col::TchdW => "TCHD_W",
            Col::Mctlsz => "MCTLSZ",
            Col::Mctltgt => "MCTLTGT",
            Col::Swcur => "SWCUR",
            Col::Swtgt => "SWTGT",
            Col::SwrS => "SWR/s",
            Col::SwwS => "SWW/s",
            Col::Ovhd => "OVHD",
            Col::Shares => "SHARES",
            Col::Resv => "RESV",
            Col::Limit => "LIMIT",
            Col::Rate => "RATE",
        }
    }

    /// What the column shows (the field list's text).
    pub fn describe(self) -> &'static str {
        match self {
            Col::Name => "the VM's name",
            Col::State => "run, pause, swap (balloon stuck), end, FAIL; a run's end reason",
            Col::Memsz => "configured guest memory, MiB",
            Col::Sztgt => "the host's target for it, MiB",
            Col::Grant => "guest memory backed by machine pages, MiB",
            Col::Host => "machine memory charged: backed + overhead, MiB",
            Col::Tchd => "active memory, the estimate the host uses, MiB",
            Col::PctActv => "TCHD over GRANT, %",
            Col::TchdW => "active memory seen through writes (dirty log), MiB",
            Col::Mctlsz => "balloon size, MiB",
            Col::Mctltgt => "balloon target, MiB",
            Col::Swcur => "swapped out by the VMM, MiB",
            Col::Swtgt => "swap target, MiB",
            Col::SwrS => "swap-ins (page-ins), MiB/s",
            Col::SwwS => "swap-outs (page-outs), MiB/s",
            Col::Ovhd => "VMM overhead, MiB",
            Col::Shares => "memory shares",
            Col::Resv => "reservation, MiB",
            Col::Limit => "limit, MiB",
            Col::Rate => "the guest's page accesses per second",
        }
    }

    /// Width in the table (the header fits).
    pub fn width(self) -> u16 {
        match self {
            Col::Name => 12,
            Col::State => 6,
            Col::PctActv => 5,
            Col::TchdW | Col::Mctlsz | Col::Shares => 7,
            Col::Mctltgt => 7,
            Col::SwrS | Col::SwwS => 6,
            Col::Ovhd => 6,
            _ => 7,
        }
    }

    /// Which columns go first when the terminal is too narrow: the highest number first.
    pub fn drop_order(self) -> u8 {
        match self {
            Col::Name => 0,
            Col::State => 1,
            Col::Grant => 2,
            Col::Tchd => 3,
            Col::Memsz => 4,
            Col::PctActv => 5,
            Col::Sztgt => 6,
            Col::Host => 7,
            Col::Mctlsz => 8,
            Col::Swcur => 9,
            Col::Ovhd => 10,
            Col::TchdW => 11,
            Col::Mctltgt => 12,
            Col::Swtgt => 13,
            Col::Rate => 14,
            Col::SwrS => 15,
            Col::SwwS => 16,
            Col::Shares => 17,
            Col::Resv => 18,
            Col::Limit => 19,
        }
    }

    /// Whether the column holds text (sorted ascending first) rather than a number (descending).
    pub fn is_text(self) -> bool {
        matches!(self, Col::Name | Col::State)
    }
}

/// Numbers per VM, indexed by [`Col::index`] (the text columns' slots stay `None`).
pub type Figures = [Option<f64>; Col::ALL.len()];

/// One VM's line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmView {
    pub name: String,
    /// run, pause, swap, end, FAIL (host), or the run's state.
    pub state: String,
    pub figures: Figures,
    /// Its latest row, when the source has it: the detail pane's estimates and intervals.
    pub row: Option<Row>,
    /// A host's VM: where TCHD comes from (`accesses` or `writes`).
    pub active_source: Option<String>,
    /// A host's VM: orders it did not take this period.
    pub order_errors: u64,
}

impl VmView {
    pub fn get(&self, c: Col) -> Option<f64> {
        self.figures[c.index()]
    }

    fn set(&mut self, c: Col, v: Option<f64>) {
        self.figures[c.index()] = v.filter(|x| x.is_finite());
    }
}

/// The host line of a host's period.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostHeader {
    pub time_s: f64,
    pub period: u64,
    pub state: String,
    pub budget_mib: f64,
    pub free_mib: f64,
    pub targets_mib: f64,
    pub running: usize,
    pub transitions: u64,
}

/// The header of a single run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunHeader {
    pub time_s: f64,
    pub interval: u64,
    pub phase: String,
    pub end: Option<String>,
    pub configured_mib: f64,
    pub host_mib: Option<f64>,
    pub pfn_visible: bool,
}

/// The line on top.
#[derive(Clone, Debug, PartialEq)]
pub enum Header {
    Host(HostHeader),
    Run(RunHeader),
}

/// What one update shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub header: Header,
    pub vms: Vec<VmView>,
}

impl Snapshot {
    pub fn is_host(&self) -> bool {
        matches!(self.header, Header::Host(_))
    }
}

/// A host period as `host --json` prints it (and its control socket's `row`s). Read leniently:
/// a field it lacks reads as zero.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostIn {
    time_s: f64,
    period: u64,
    host: HostLineIn,
    vms: Vec<VmIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostLineIn {
    budget_mib: f64,
    free_mib: f64,
    state: String,
    transitions: u64,
    targets_mib: f64,
    running: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct VmIn {
    name: String,
    status: String,
    mem_mib: f64,
    target_mib: f64,
    granted_mib: f64,
    active_mib: f64,
    active_source: String,
    active_pct: f64,
    balloon_mib: f64,
    balloon_target_mib: f64,
    swapped_mib: f64,
    swap_target_mib: f64,
    overhead_mib: f64,
    shares: u64,
    reservation_mib: f64,
    limit_mib: Option<f64>,
    rate: Option<f64>,
    balloon_stuck: bool,
    paused: bool,
    order_errors: u64,
    row: Option<Row>,
}

/// Reads one JSON line of either stream.
pub fn parse_line(line: &str, run_name: &str) -> Result<Option<Snapshot>, DataError> {
    let v: Value = serde_json::from_str(line).map_err(|e| DataError::NotJson(e.to_string()))?;
    parse_value(v, run_name)
}

/// Reads one object of either stream (or a query's answer): `None` for `null` (a control socket
/// before the first row). `run_name` names a run's VM.
pub fn parse_value(v: Value, run_name: &str) -> Result<Option<Snapshot>, DataError> {
    let Value::Object(obj) = &v else {
        return if v.is_null() {
            Ok(None)
        } else {
            Err(DataError::Shape)
        };
    };
    if obj.get("vms").is_some_and(Value::is_array) && obj.contains_key("host") {
        let h: HostIn = serde_json::from_value(v).map_err(|e| DataError::Host(e.to_string()))?;
        Ok(Some(host_snapshot(h)))
    } else if obj.contains_key("interval") {
        let r: Row = serde_json::from_value(v).map_err(|e| DataError::Run(e.to_string()))?;
        Ok(Some(run_snapshot(r, run_name)))
    } else {
        Err(DataError::Shape)
    }
}

fn host_snapshot(h: HostIn) -> Snapshot {
    let header = Header::Host(HostHeader {
        time_s: h.time_s,
        period: h.period,
        state: h.host.state,
        budget_mib: h.host.budget_mib,
        free_mib: h.host.free_mib,
        targets_mib: h.host.targets_mib,
        running: h.host.running,
        transitions: h.host.transitions,
    });
    let vms = h
        .vms
        .into_iter()
        .map(|v| {
            let state = match v.status.as_str() {
                "running" if v.paused => "pause",
                "running" if v.balloon_stuck => "swap",
                "running" => "run",
                "ended" => "end",
                _ => "FAIL",
            };
            let mut out = VmView {
                name: v.name,
                state: state.into(),
                active_source: Some(v.active_source),
                order_errors: v.order_errors,
                ..VmView::default()
            };
            out.set(Col::Memsz, Some(v.mem_mib));
            out.set(Col::Sztgt, Some(v.target_mib));
            out.set(Col::Grant, Some(v.granted_mib));
            out.set(Col::Tchd, Some(v.active_mib));
            out.set(Col::PctActv, Some(v.active_pct));
            out.set(Col::Mctlsz, Some(v.balloon_mib));
            out.set(Col::Mctltgt, Some(v.balloon_target_mib));
            out.set(Col::Swcur, Some(v.swapped_mib));
            out.set(Col::Swtgt, Some(v.swap_target_mib));
            out.set(Col::Ovhd, Some(v.overhead_mib));
            out.set(Col::Shares, Some(v.shares as f64));
            out.set(Col::Resv, Some(v.reservation_mib));
            out.set(Col::Limit, v.limit_mib);
            out.set(Col::Rate, v.rate);
            // What only the VM's own row says (the host's control socket adds it).
            out.set(Col::Host, Some(v.granted_mib + v.overhead_mib));
            if let Some(r) = v.row.as_ref().filter(|_| v.status == "running") {
                out.set(Col::TchdW, r.active_writes.as_ref().map(|a| a.estimate_mib));
                out.set(Col::SwrS, r.swap.as_ref().map(|s| s.in_mib_s));
                out.set(Col::SwwS, r.swap.as_ref().map(|s| s.out_mib_s));
            }
            out.row = v.row;
            out
        })
        .collect();
    Snapshot { header, vms }
}

fn run_snapshot(r: Row, name: &str) -> Snapshot {
    let host = r.host.as_ref();
    let header = Header::Run(RunHeader {
        time_s: r.time_s,
        interval: r.interval,
        phase: r.phase.clone(),
        end: r.end.map(|e| e.as_str().to_string()),
        configured_mib: r.configured_mib,
        host_mib: host.map(|h| h.host_mib),
        pfn_visible: host.is_some_and(|h| h.pfn_visible),
    });
    let state = match (r.end, r.paused_s > 0.0) {
        (Some(e), _) => e.as_str(),
        (None, true) => "pause",
        (None, false) => "run",
    };
    // TCHD is the estimate the host would use: reads and writes when reads are seen.
    let tchd = match (&r.active, r.reads_seen) {
        (Some(a), true) => Some(a.estimate_mib),
        _ => r.active_writes.as_ref().map(|a| a.estimate_mib),
    };
    let grant = host.map(|h| h.backed_mib);
    let mut v = VmView {
        name: name.into(),
        state: state.into(),
        ..VmView::default()
    };
    v.set(Col::Memsz, Some(r.configured_mib));
    v.set(Col::Grant, grant);
    v.set(Col::Host, host.map(|h| h.host_mib));
    v.set(Col::Tchd, tchd);
    v.set(
        Col::PctActv,
        match (tchd, grant) {
            (Some(t), Some(g)) if g > 0.0 => Some((100.0 * t / g).min(100.0)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        },
    );
    v.set(Col::TchdW, r.active_writes.as_ref().map(|a| a.estimate_mib));
    v.set(Col::Mctlsz, r.balloon.as_ref().map(|b| b.balloon_mib));
    v.set(Col::Mctltgt, r.balloon.as_ref().map(|b| b.target_mib));
    // Swapped by the VMM (`--swap`), else whatever the host's kernel swapped.
    v.set(
        Col::Swcur,
        (r.swap.as_ref().map(|s| s.swapped_mib)).or(host.map(|h| h.swapped_mib)),
    );
    v.set(Col::Swtgt, r.swap.as_ref().map(|s| s.target_mib));
    v.set(Col::SwrS, r.swap.as_ref().map(|s| s.in_mib_s));
    v.set(Col::SwwS, r.swap.as_ref().map(|s| s.out_mib_s));
    v.set(Col::Ovhd, host.map(|h| h.overhead_mib));
    v.set(Col::Rate, r.truth.as_ref().map(|t| t.rate));
    v.row = Some(r);
    Snapshot {
        header,
        vms: vec![v],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::host::testing;
    use crate::row::{Active, BalloonView, EndReason, HostUsage};

    /// A run's row with both estimates, a balloon and a host side.
    pub fn run_row() -> Row {
        let est = |e: f64| Active {
            n: 400,
            t: 100,
            estimate_mib: e,
            ci_low_mib: e - 2.0,
            ci_high_mib: e + 2.0,
            fast_mib: e,
            slow_mib: e,
            max_mib: e,
            ..Active::default()
        };
        Row {
            time_s: 12.0,
            interval: 11,
            phase: "touch".into(),
            configured_mib: 256.0,
            reads_seen: true,
            active: Some(est(50.0)),
            active_writes: Some(est(20.0)),
            host: Some(HostUsage {
                host_mib: 110.0,
                backed_mib: 100.0,
                overhead_mib: 10.0,
                ..HostUsage::default()
            }),
            balloon: Some(BalloonView {
                balloon_mib: 16.0,
                target_mib: 32.0,
                ..BalloonView::default()
            }),
            ..Row::default()
        }
    }

    #[test]
    fn a_run_row_is_one_vm() {
        let line = serde_json::to_string(&run_row()).unwrap();
        let s = parse_line(&line, "web").unwrap().unwrap();
        assert!(!s.is_host());
        let v = &s.vms[0];
        assert_eq!(v.name, "web");
        assert_eq!(v.state, "run");
        assert_eq!(v.get(Col::Grant), Some(100.0));
        assert_eq!(v.get(Col::Host), Some(110.0));
        assert_eq!(v.get(Col::Tchd), Some(50.0));
        assert_eq!(v.get(Col::TchdW), Some(20.0));
        assert_eq!(v.get(Col::PctActv), Some(50.0));
        assert_eq!(v.get(Col::Mctltgt), Some(32.0));
        assert_eq!(v.get(Col::Sztgt), None, "a run has no host target");
        // Without reads, TCHD is the write estimate; the end reason is the state.
        let mut r = run_row();
        r.reads_seen = false;
        r.end = Some(EndReason::Done);
        let s = parse_value(serde_json::to_value(&r).unwrap(), "x")
            .unwrap()
            .unwrap();
        assert_eq!(s.vms[0].get(Col::Tchd), Some(20.0));
        assert_eq!(s.vms[0].state, "done");
    }

    #[test]
    fn a_host_period_is_told_apart_by_its_shape() {
        let rows = testing::rows(4);
        let line = serde_json::to_string(&rows[3]).unwrap();
        let s = parse_line(&line, "ignored").unwrap().unwrap();
        assert!(s.is_host());
        let names: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["web", "db"]);
        assert_eq!(s.vms[0].get(Col::Sztgt), Some(rows[3].vms[0].target_mib));
        assert_eq!(s.vms[1].get(Col::Limit), Some(100.0));
        assert_eq!(s.vms[1].state, "end");
        assert_eq!(s.vms[0].get(Col::TchdW), None, "host --json has no rows");
        let Header::Host(h) = &s.header else {
            panic!("not a host header")
        };
        assert_eq!(h.state, "soft");
        assert_eq!(h.budget_mib, 200.0);
    }

    #[test]
    fn null_waits_and_other_shapes_are_errors() {
        assert_eq!(parse_line("null", "x"), Ok(None));
        assert!(matches!(
            parse_line("  time  state", "x"),
            Err(DataError::NotJson(_))
        ));
        assert_eq!(parse_line("[1,2]", "x"), Err(DataError::Shape));
        assert_eq!(parse_line(r#"{"foo":1}"#, "x"), Err(DataError::Shape));
        assert!(matches!(
            parse_line(r#"{"interval":"soon"}"#, "x"),
            Err(DataError::Run(_))
        ));
        assert!(matches!(
            parse_line(r#"{"host":{},"vms":[{"name":3}]}"#, "x"),
            Err(DataError::Host(_))
        ));
    }
}
