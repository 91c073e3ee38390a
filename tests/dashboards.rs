//! The metrics endpoint as dashboards use it, against the real binary: `--prometheus-linger`
//! serves the final row after the run (and host) ended, so a scrape after the last row is
//! printed sees the end; guest RAM by state sums to configured RAM on every row; and every metric
//! the Grafana dashboard and the Prometheus rules in `dashboards/` query is in a real scrape of a
//! run or a host, with the labels they match on.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use memvisor::output::prometheus::memory_states;
use memvisor::row::{EndReason, Row};

const MIB: f64 = (1u64 << 20) as f64;

/// A `memvisor` with `--prometheus` in progress: its endpoint's address, its stdout's lines as
/// they come, and its stderr drained by a thread.
struct Served {
    child: Child,
    addr: SocketAddr,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
}

impl Served {
    /// Starts `memvisor ARGS` and waits for the endpoint's address on stderr.
    fn start(args: &[&str]) -> Served {
        let mut child = common::memvisor()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn memvisor");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("Prometheus metrics at")
                    && let Some(url) = line.split("http://").nth(1)
                {
                    let _ = tx.send(url.trim_end_matches("/metrics").to_string());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no metrics address: {}", stderr.join().unwrap());
            }
        };
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Served {
            child,
            addr,
            lines,
            stderr,
        }
    }

    /// Reads stdout lines until `last` says one is the last (or stdout ends): all of them.
    fn read_until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.lines.by_ref() {
            let l = l.expect("a line");
            let done = last(&l);
            out.push(l);
            if done {
                break;
            }
        }
        out
    }

    /// Sends `sig` to the process.
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, not yet reaped (`wait` consumes self).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit (killed after `limit`: a process that lingers on fails here); its code
    /// and stderr.
    fn wait(mut self, limit: Duration) -> (Option<i32>, String) {
        let status = common::wait_bounded(&mut self.child, limit);
        (status.code(), self.stderr.join().unwrap())
    }
}

/// One scrape of `addr`, as text (asserting a 200).
fn scrape_text(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    body.to_string()
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("a Prometheus text-format body")
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

/// A short run with the balloon and hypervisor swap on (so that their metrics are there), its
/// endpoint lingering `linger` after the end.
fn run_args<'a>(dir: &'a str, linger: &'a str) -> Vec<String> {
    [
        "run",
        "--mem",
        "64M",
        "--workload",
        "alloc 16M; touch 16M write 600ms; idle 600ms; check 16M",
        "--interval",
        "200ms",
        "--seed",
        "3",
        "--timeout",
        "60s",
        "--balloon",
        "8M",
        "--swap-target",
        "8M",
        "--json",
        "--prometheus",
        "127.0.0.1:0",
        "--prometheus-linger",
        linger,
        "--name",
        "dash",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--console".to_string(),
        format!("{dir}/console"),
        "--swap".to_string(),
        format!("{dir}/swap"),
    ])
    .collect()
}

/// Runs to the end row, then scrapes: (the rows, the scrape's text, the still-running process).
fn run_to_the_end(dir: &str, linger: &str) -> (Vec<Row>, String, Served) {
    let args = run_args(dir, linger);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = Served::start(&args);
    let lines = s.read_until(|l| {
        serde_json::from_str::<Row>(l)
            .map(|r| r.end.is_some())
            .unwrap_or(false)
    });
    let rows: Vec<Row> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The last row is printed: the run has ended, and only the linger keeps the endpoint up.
    let text = scrape_text(s.addr);
    (rows, text, s)
}

#[test]
fn a_scrape_after_the_last_row_sees_the_end_and_the_linger_ends_by_itself() {
    if !common::kvm("a_scrape_after_the_last_row_sees_the_end_and_the_linger_ends_by_itself") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (rows, text, served) = run_to_the_end(dir.path().to_str().unwrap(), "3s");
    let (code, stderr) = served.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("serving the final metrics"), "{stderr}");
    let last = rows.last().expect("rows");
    assert_eq!(last.end, Some(EndReason::Done), "{stderr}");
    let s = parse(&text);
    // The final row, and every row counted.
    assert_eq!(
        value(&s, "memvisor_intervals_total", &[]),
        rows.len() as f64
    );
    assert_eq!(value(&s, "memvisor_time_seconds", &[]), last.time_s);
    assert_eq!(
        value(&s, "memvisor_interval_length_seconds", &[]),
        last.length_s
    );
    assert_eq!(value(&s, "memvisor_end_reason", &[("reason", "done")]), 1.0);
    let ends: f64 = s
        .samples
        .iter()
        .filter(|x| x.metric == "memvisor_end_reason")
        .map(sample_value)
        .sum();
    assert_eq!(ends, 1.0);
    assert_eq!(
        value(&s, "memvisor_phase_info", &[("phase", last.phase.as_str())]),
        1.0
    );
    // Guest RAM by state sums to configured RAM, in the scrape and on every row of the run.
    let states: f64 = s
        .samples
        .iter()
        .filter(|x| x.metric == "memvisor_guest_memory_bytes")
        .map(sample_value)
        .sum();
    assert_eq!(states, 64.0 * MIB, "{text}");
    for r in &rows {
        let h = r.host.as_ref().expect("host usage");
        let sum: f64 = memory_states(h).iter().map(|(_, mib)| mib).sum();
        assert_eq!(sum, r.configured_mib, "row {}: {h:?}", r.interval);
        assert!(memory_states(h).iter().all(|(_, mib)| *mib >= 0.0), "{h:?}");
    }
    // Hypervisor swap took pages, and the partition held with them out.
    assert!(
        rows.iter()
            .any(|r| r.host.as_ref().unwrap().vmm_swapped_mib > 0.0),
        "no row with vmm-swapped pages"
    );
}

#[test]
fn a_signal_ends_a_long_linger() {
    if !common::kvm("a_signal_ends_a_long_linger") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (rows, text, served) = run_to_the_end(dir.path().to_str().unwrap(), "1h");
    assert!(text.contains("memvisor_end_reason"));
    assert_eq!(rows.last().unwrap().end, Some(EndReason::Done));
    served.signal(libc::SIGTERM);
    // An hour's linger, ended by the signal: the run's own result (done, 0) is the exit code.
    let (code, stderr) = served.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn the_signal_that_stops_a_run_does_not_end_its_linger_the_next_one_does() {
    if !common::kvm("the_signal_that_stops_a_run_does_not_end_its_linger_the_next_one_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let console = format!("{d}/console");
    let mut s = Served::start(&[
        "run",
        "--mem",
        "64M",
        "--workload",
        "alloc 8M; touch 8M write 400ms; idle 60s",
        "--interval",
        "200ms",
        "--timeout",
        "120s",
        "--console",
        &console,
        "--json",
        "--prometheus",
        "127.0.0.1:0",
        "--prometheus-linger",
        "1h",
    ]);
    // Stop it once it has printed a row.
    let _ = s.read_until(|_| true);
    s.signal(libc::SIGTERM);
    let rows = s.read_until(|l| {
        serde_json::from_str::<Row>(l)
            .map(|r| r.end.is_some())
            .unwrap_or(false)
    });
    let last: Row = serde_json::from_str(rows.last().expect("the last row")).unwrap();
    assert_eq!(last.end, Some(EndReason::Sigterm));
    // A second later the endpoint still serves the end: the stopping signal did not end the
    // linger.
    std::thread::sleep(Duration::from_secs(1));
    let p = parse(&scrape_text(s.addr));
    assert_eq!(
        value(&p, "memvisor_end_reason", &[("reason", "sigterm")]),
        1.0
    );
    s.signal(libc::SIGTERM);
    let (code, stderr) = s.wait(Duration::from_secs(60));
    assert_eq!(code, Some(143), "{stderr}");
}

/// A short `memvisor host` of one VM, scraped after its last period (all VMs ended).
fn host_scrape() -> String {
    let mut s = Served::start(&[
        "host",
        "--budget",
        "256M",
        "--period",
        "200ms",
        "--vm",
        "name=h1,mem=64M,seed=5,workload=alloc 16M; touch 16M write 1s; idle 400ms",
        "--json",
        "--prometheus",
        "127.0.0.1:0",
        "--prometheus-linger",
        "30s",
    ]);
    let lines = s.read_until(|l| {
        let v: serde_json::Value = serde_json::from_str(l).expect("a JSON period");
        v["host"]["running"] == 0
    });
    assert!(!lines.is_empty());
    // The last period is printed: the VM has ended, the linger serves on.
    let last = scrape_text(s.addr);
    s.signal(libc::SIGTERM);
    let (code, stderr) = s.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    let p = parse(&last);
    assert_eq!(
        value(
            &p,
            "memvisor_end_reason",
            &[("vm", "h1"), ("reason", "done")]
        ),
        1.0,
        "{last}"
    );
    assert_eq!(
        value(&p, "memvisor_run_info", &[("vm", "h1"), ("seed", "5")]),
        1.0
    );
    last
}

/// Metric names (and the label names matched on) that a PromQL expression refers to: every
/// identifier starting `memvisor_` or holding a `:` (a recorded series), with the label names of
/// the `{...}` selector after it. Strings are skipped, `by (...)`/`on (...)` labels are not
/// selectors.
fn metric_refs(expr: &str) -> Vec<(String, Vec<String>)> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ident(c) && !c.is_ascii_digit() {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let mut labels = Vec::new();
            if j < b.len() && b[j] == b'{' {
                // Matchers `label op "value"`, split at commas outside the quoted values.
                let mut k = j + 1;
                let mut key = String::new();
                let mut in_key = true;
                while k < b.len() && b[k] != b'}' {
                    match b[k] {
                        b'"' => {
                            k += 1;
                            while k < b.len() && b[k] != b'"' {
                                k += if b[k] == b'\\' { 2 } else { 1 };
                            }
                        }
                        b',' => {
                            labels.push(std::mem::take(&mut key));
                            in_key = true;
                        }
                        c if in_key && (c.is_ascii_alphanumeric() || c == b'_') => {
                            key.push(c as char)
                        }
                        b' ' => {}
                        _ => in_key = false,
                    }
                    k += 1;
                }
                labels.push(key);
                labels.retain(|l| !l.is_empty());
                i = k + 1;
            }
            if name.starts_with("memvisor_") || name.contains(':') {
                out.push((name.to_string(), labels));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The `expr` of every target of the dashboard, at any depth.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains("memvisor_") => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_metric_name_scanner_finds_names_and_selector_labels() {
    let refs = metric_refs(
        r#"max by (vm) (memvisor_a_bytes{kind="x,}", window=~"f"}) / on (vm) (vm:rec:ratio > 0.9) or label_values(memvisor_b, vm)"#,
    );
    assert_eq!(
        refs,
        [
            (
                "memvisor_a_bytes".to_string(),
                vec!["kind".to_string(), "window".to_string()]
            ),
            ("vm:rec:ratio".to_string(), vec![]),
            ("memvisor_b".to_string(), vec![]),
        ]
    );
}

#[test]
fn every_metric_the_dashboard_and_rules_query_is_in_a_real_scrape() {
    if !common::kvm("every_metric_the_dashboard_and_rules_query_is_in_a_real_scrape") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/dashboards/grafana-memvisor.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    let rules = std::fs::read_to_string(format!("{root}/dashboards/memvisor-rules.yml")).unwrap();
    let mut recorded = BTreeSet::new();
    for line in rules.lines().map(str::trim) {
        if let Some(e) = line.strip_prefix("expr:") {
            exprs.push(e.trim().to_string());
        } else if let Some(r) = line.strip_prefix("- record:") {
            recorded.insert(r.trim().to_string());
        }
    }
    assert!(
        exprs.len() >= 20 && recorded.len() >= 4,
        "{exprs:?} {recorded:?}"
    );

    // Every metric name and label in a scrape of a run and of a host.
    let dir = tempfile::tempdir().unwrap();
    let (_, run_text, served) = run_to_the_end(dir.path().to_str().unwrap(), "1h");
    served.signal(libc::SIGTERM);
    let (code, stderr) = served.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    let mut have: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for text in [run_text, host_scrape()] {
        for x in parse(&text).samples {
            have.entry(x.metric.clone())
                .or_default()
                .extend(x.labels.keys().cloned());
        }
    }
    let mut missing = Vec::new();
    for e in &exprs {
        for (name, labels) in metric_refs(e) {
            if name.contains(':') {
                if !recorded.contains(&name) {
                    missing.push(format!("{name} (not recorded) in {e}"));
                }
                continue;
            }
            match have.get(&name) {
                None => missing.push(format!("{name} in {e}")),
                Some(l) => {
                    for label in labels {
                        if !l.contains(&label) {
                            missing.push(format!("{name}{{{label}}} in {e}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not scraped:\n{}\nscraped: {:?}",
        missing.join("\n"),
        have.keys().collect::<Vec<_>>()
    );
}
