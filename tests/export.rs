//! The outputs for other tools: Prometheus scrapes during a run, CSV, plots, and their flags.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::mpsc;

use common::{assert_clean_failure, memvisor, memvisor_output};
use memvisor::row::Row;

const MIB: f64 = (1u64 << 20) as f64;
const SPEC: &str = "alloc 16M; touch 16M write 600ms; free 12M; idle 600ms";

/// `memvisor run` of SPEC on 64 MiB with a 200 ms interval, guest console discarded.
fn run_args<'a>(console: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        "--mem",
        "64M",
        "--workload",
        SPEC,
        "--interval",
        "200ms",
        "--seed",
        "3",
        "--timeout",
        "30s",
        "--console",
        console,
    ];
    a.extend_from_slice(more);
    a
}

/// JSON keys of a value, nested objects flattened with `_` (a key that begins with its section's
/// name is not prefixed again: `host` + `host_mib` is `host_mib`).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() || k.starts_with(&format!("{prefix}_")) {
                    k.clone()
                } else {
                    format!("{prefix}_{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(c, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("a Prometheus text-format body")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}");
    match found[0].value {
        prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn prometheus_scrape_during_a_run_matches_the_json_row() {
    if !common::kvm("prometheus_scrape_during_a_run_matches_the_json_row") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let console = console.to_str().unwrap();
    let args = run_args(
        console,
        &["--json", "--prometheus", "127.0.0.1:0", "--name", "vm-a"],
    );
    let mut child = memvisor()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The server says where it listens (port 0: a free one) on stderr.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("http://").nth(1) {
                let addr = url.trim_end_matches("/metrics").to_string();
                let _ = tx.send(addr);
            }
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let addr: SocketAddr = rx
        .recv()
        .expect("memvisor printed the metrics address")
        .parse()
        .unwrap();
    // Scrape until two intervals are in (the run takes well over a second), bounded.
    let mut got = None;
    for _ in 0..400 {
        let s = scrape(addr);
        if value(&s, "memvisor_intervals_total", &[]) >= 2.0 {
            got = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = got.expect("two intervals reported while the run was going");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "{stderr}");

    let rows: Vec<Row> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let n = value(&s, "memvisor_intervals_total", &[]) as usize;
    assert!(n <= rows.len());
    let r = &rows[n - 1];
    assert!(s.samples.iter().all(|x| x.labels.get("vm") == Some("vm-a")));
    let close = |name: &str, labels: &[(&str, &str)], want: f64| {
        let got = value(&s, name, labels);
        assert!(
            (got - want).abs() <= want.abs() * 1e-12,
            "{name} {labels:?}: scraped {got}, JSON row {want}"
        );
    };
    close("memvisor_time_seconds", &[], r.time_s);
    close("memvisor_guest_configured_bytes", &[], 64.0 * MIB);
    close(
        "memvisor_guest_allocated_bytes",
        &[],
        r.guest.allocated_mib * MIB,
    );
    let h = r.host.as_ref().unwrap();
    close("memvisor_host_usage_bytes", &[], h.host_mib * MIB);
    close(
        "memvisor_guest_memory_bytes",
        &[("state", "backed")],
        (h.backed_mib - h.shared_mib) * MIB,
    );
    close("memvisor_overhead_bytes", &[], h.overhead_mib * MIB);
    close(
        "memvisor_guest_memory_bytes",
        &[("state", "zero")],
        h.zero_mib * MIB,
    );
    let a = r.active_writes.as_ref().unwrap();
    let w = [("kind", "writes")];
    close("memvisor_active_bytes", &w, a.estimate_mib * MIB);
    close("memvisor_active_ci_low_bytes", &w, a.ci_low_mib * MIB);
    close("memvisor_active_ci_high_bytes", &w, a.ci_high_mib * MIB);
    close(
        "memvisor_active_avg_bytes",
        &[("kind", "writes"), ("window", "fast")],
        a.fast_mib * MIB,
    );
    close(
        "memvisor_active_avg_bytes",
        &[("kind", "writes"), ("window", "slow")],
        a.slow_mib * MIB,
    );
    close("memvisor_active_max_avg_bytes", &w, a.max_mib * MIB);
    close("memvisor_phase_info", &[("phase", r.phase.as_str())], 1.0);
    close(
        "memvisor_dirty_rate_bytes_per_second",
        &[],
        a.dirty_rate_mib_s.expect("the write estimate's rate") * MIB,
    );
    close("memvisor_samples", &[("kind", "writes")], a.n as f64);
    close(
        "memvisor_samples_touched",
        &[("kind", "writes")],
        a.t as f64,
    );
    assert!(h.backed_mib > 0.0);
}

#[test]
fn csv_columns_are_the_json_fields() {
    if !common::kvm("csv_columns_are_the_json_fields") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let console = console.to_str().unwrap();
    let csv_out = memvisor_output(&run_args(console, &["--csv", "--name", "web"]));
    assert!(csv_out.status.success());
    let json_out = memvisor_output(&run_args(console, &["--json"]));
    assert!(json_out.status.success());

    let mut rd = csv::Reader::from_reader(&csv_out.stdout[..]);
    let headers: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    let records: Vec<csv::StringRecord> = rd.records().collect::<Result<_, _>>().unwrap();
    assert!(records.len() >= 4, "{} rows", records.len());
    assert!(headers.contains(&"host_MiB".to_string()), "{headers:?}");
    assert!(headers.contains(&"balloon_MiB".to_string()), "{headers:?}");
    assert_eq!(headers[..2], ["timestamp", "vm"]);
    for r in &records {
        assert_eq!(&r[1], "web");
        // RFC 3339 UTC with milliseconds, e.g. 2025-06-01T12:00:00.250Z.
        let t = &r[0];
        assert!(
            t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    // A JSON row with every section carries exactly the CSV's columns, in order.
    let full = String::from_utf8(json_out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| {
            ["truth", "host", "active_writes"]
                .iter()
                .all(|k| v[k].is_object())
                && v["active_writes"]["error_mib"].is_number()
        })
        .expect("a JSON row with truth, host usage and an estimate");
    let mut keys = Vec::new();
    flatten("", &full, &mut keys);
    let lower: Vec<String> = headers[2..].iter().map(|h| h.to_lowercase()).collect();
    // The `check` object is on a check phase's row only (this workload has none): its columns
    // stand where its null is.
    let check_columns = [
        "check_phase",
        "check_checked_pages",
        "check_intact_pages",
        "check_zero_pages",
        "check_intact_mib",
        "check_zero_mib",
    ];
    assert_eq!(full["check"], serde_json::Value::Null);
    // So is `swap` without `--swap`.
    let swap_columns = [
        "swap_swapped_mib",
        "swap_target_mib",
        "swap_in_mib_s",
        "swap_out_mib_s",
        "swap_page_ins",
        "swap_page_outs",
        "swap_shared_page_outs",
        "swap_page_in_us_p50",
        "swap_page_in_us_p99",
        "swap_out_ms",
        "swap_in_ms",
        "swap_stopped",
    ];
    assert_eq!(full["swap"], serde_json::Value::Null);
    // And the kernel's KSM figures without `--ksm`.
    let ksm_columns = [
        "host_ksm_merging_pages",
        "host_ksm_zero_pages",
        "host_ksm_process_profit_mib",
        "host_ksm_host_pages_sharing",
        "host_ksm_host_pages_shared",
        "host_ksm_full_scans",
    ];
    assert_eq!(full["host"]["ksm"], serde_json::Value::Null);
    let keys: Vec<String> = keys
        .into_iter()
        .flat_map(|k| match k.as_str() {
            "check" => check_columns.iter().map(|c| c.to_string()).collect(),
            "swap" => swap_columns.iter().map(|c| c.to_string()).collect(),
            "host_ksm" => ksm_columns.iter().map(|c| c.to_string()).collect(),
            _ => vec![k],
        })
        .collect();
    assert_eq!(lower, keys);

    // Every record has every column, and numbers where the JSON has numbers.
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    for r in &records {
        assert_eq!(r.len(), headers.len());
        let t: f64 = r[col("time_s")].parse().unwrap();
        let backed: f64 = r[col("host_backed_MiB")].parse().unwrap();
        assert!(t > 0.0 && backed > 0.0, "{r:?}");
    }
}

#[test]
fn plots_of_a_run_and_of_its_json_are_the_same_and_host_usage_stays_flat_over_the_free() {
    if !common::kvm("plots_of_a_run_and_of_its_json_are_the_same") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let run_svg = dir.path().join("run.svg");
    let run_png = dir.path().join("run.png");
    let out = memvisor_output(&run_args(
        console.to_str().unwrap(),
        &["--json", "--plot", run_svg.to_str().unwrap()],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jsonl = dir.path().join("run.jsonl");
    std::fs::write(&jsonl, &out.stdout).unwrap();
    let again = dir.path().join("again.svg");
    for target in [&again, &run_png] {
        let out = memvisor_output(&[
            "plot",
            jsonl.to_str().unwrap(),
            "-o",
            target.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let svg = std::fs::read_to_string(&run_svg).unwrap();
    assert_eq!(svg, std::fs::read_to_string(&again).unwrap());
    assert!(svg.contains("touch 16M write 600ms"));
    let png = std::fs::read(&run_png).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // The series drawn: over the free, the guest's allocated memory drops and host usage does not.
    let s = memvisor::output::plot::read_jsonl(&jsonl).unwrap().series();
    let i = (1..s.allocated.len())
        .find(|&i| s.allocated[i - 1].unwrap() - s.allocated[i].unwrap() >= 12.0)
        .expect("an interval in which the guest freed 12 MiB");
    let (before, after) = (s.backed[i - 1].unwrap(), s.backed[i].unwrap());
    assert!(before >= 16.0, "backed {before} MiB before the free");
    assert!(
        after >= before,
        "backed {before} -> {after} MiB over the free"
    );
    let (before, after) = (s.host[i - 1].unwrap(), s.host[i].unwrap());
    assert!(
        after >= before - 1.0,
        "host usage {before} -> {after} MiB over the free"
    );
    for later in &s.backed[i..] {
        assert!(later.unwrap() >= s.backed[i - 1].unwrap());
    }
}

#[test]
fn output_flags_conflict_and_bad_addresses_are_clear_errors() {
    let out = memvisor_output(&["run", "--json", "--csv"]);
    assert_clean_failure(&out, "cannot be used with");
    let out = memvisor_output(&["run", "--prometheus", "localhost"]);
    assert_clean_failure(&out, "expected IP:PORT");
    let out = memvisor_output(&["run", "--prometheus", "127.0.0.1:99999"]);
    assert_clean_failure(&out, "expected IP:PORT");
    // An address of no interface here (TEST-NET-1): binding fails, nothing is sent.
    let out = memvisor_output(&["run", "--prometheus", "192.0.2.1:9464"]);
    assert_clean_failure(&out, "cannot listen there");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = memvisor_output(&["run", "--prometheus", &addr]);
    assert_clean_failure(&out, "in use");
    let out = memvisor_output(&["run", "--plot", "run.jpg"]);
    assert_clean_failure(&out, ".svg or .png");
    let out = memvisor_output(&["plot", "/nonexistent/run.jsonl", "-o", "x.svg"]);
    assert_clean_failure(&out, "/nonexistent/run.jsonl");
}
