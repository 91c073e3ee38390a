//! `docs/schema.json` describes the JSON rows of `memvisor run` and `memvisor host`: real rows of
//! both validate against it, so does a row with every optional section present, and a row with a
//! wrong type, a misspelt or unknown field, or another schema version does not.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use jsonschema::Validator;
use memvisor::host::scheduler::ActiveSource;
use memvisor::host::state::MemState;
use memvisor::host::supervisor::{HostLine, HostRow, VmLine};
use memvisor::row::{
    Active, BalloonView, Check, EndReason, GuestStats, GuestView, HostUsage, Row, SCHEMA_VERSION,
    SchemaVersion, Swap, Truth, VmmWork,
};
use serde_json::{Value, json};

/// The schema, checked against its meta-schema (draft 2020-12).
fn validator() -> Validator {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::meta::validate(&schema).expect("a valid JSON Schema");
    jsonschema::validator_for(&schema).expect("a usable schema")
}

/// Panics with every error if `row` does not validate.
fn assert_valid(v: &Validator, row: &Value) {
    let errors: Vec<String> = v
        .iter_errors(row)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\nin {row}");
}

/// A run row with every optional section present.
fn full_run_row() -> Row {
    let active = Active {
        n: 40,
        t: 12,
        exact_mib: 3.0,
        sampled_from_mib: 60.0,
        skipped: 1,
        handler_fills: 2,
        estimate_mib: 21.0,
        ci_low_mib: 15.5,
        ci_high_mib: 27.25,
        fast_mib: 20.0,
        slow_mib: 18.0,
        max_mib: 20.0,
        error_mib: None,
        dirty_rate_mib_s: None,
    };
    let mut r = Row {
        schema_version: SchemaVersion,
        time_s: 2.5,
        interval: 2,
        phase: "check 8M".into(),
        end: Some(EndReason::Done),
        length_s: 0.5,
        partial: true,
        paused_s: 0.25,
        configured_mib: 256.0,
        guest: GuestView {
            allocated_pages: 2048,
            free_pages: 60000,
            heap_pages: 2048,
            allocated_mib: 8.0,
            free_mib: 234.375,
            out_of_memory: false,
        },
        truth: None,
        host: Some(HostUsage {
            host_mib: 30.0,
            backed_mib: 24.0,
            overhead_mib: 6.0,
            untouched_mib: 200.0,
            zero_mib: 1.0,
            pfn_visible: true,
            backed_pages: 6144,
            ..HostUsage::default()
        }),
        active: Some(active.clone()),
        reads_seen: true,
        active_writes: Some(Active {
            dirty_rate_mib_s: Some(21.0),
            ..active
        }),
        balloon: Some(BalloonView {
            balloon_mib: 16.0,
            target_mib: 16.0,
            reported_extents: 3,
            reported_mib: 6.0,
            guest_stats: Some(GuestStats {
                free_mib: Some(200.0),
                total_mib: Some(250.0),
                available_mib: Some(210.0),
                source: "virtio-balloon stats queue".into(),
            }),
            errors: 0,
        }),
        swap: Some(Swap {
            swapped_mib: 4.0,
            target_mib: 4.0,
            in_mib_s: 1.0,
            out_mib_s: 8.0,
            page_ins: 256,
            page_outs: 1024,
            shared_page_outs: 24,
            page_in_us_p50: Some(12.5),
            page_in_us_p99: Some(80.0),
            out_ms: 3.5,
            in_ms: 2.0,
            stopped: false,
        }),
        check: Some(Check {
            phase: "check 8M".into(),
            checked_pages: 2048,
            intact_pages: 2000,
            zero_pages: 48,
            intact_mib: 7.8125,
            zero_mib: 0.1875,
        }),
        vmm: Some(VmmWork {
            work_ms: 1.5,
            harvest_ms: 0.5,
            access_round_ms: 0.5,
            write_round_ms: 0.25,
            map_ms: 0.0,
            row_ms: 0.125,
            dirty_log_slots: 1,
            scan_ms: 0.25,
            scan_ioctls: 2,
        }),
    };
    r.attach_truth(Truth {
        touched_pages: 5000,
        written_pages: 4000,
        touched_mib: 19.53125,
        written_mib: 15.625,
        iterations: 9000,
        rate: 1.5e6,
    });
    r
}

/// A host row whose VM line has every optional field set.
fn full_host_row() -> HostRow {
    HostRow {
        schema_version: SchemaVersion,
        time_s: 1.5,
        period: 3,
        host: HostLine {
            budget_mib: 200.0,
            free_mib: 20.0,
            state: MemState::Soft,
            transitions: 1,
            targets_mib: 170.0,
            running: 1,
            saved_mib: 3.0,
            ksm_pages_sharing_mib: Some(3.0),
        },
        vms: vec![VmLine {
            name: "web-1".into(),
            status: "ended",
            exit_code: Some(0),
            mem_mib: 128.0,
            target_mib: 90.0,
            guest_target_mib: 93.0,
            granted_mib: 100.0,
            active_mib: 60.0,
            active_source: ActiveSource::Writes,
            active_pct: 60.0,
            balloon_mib: 8.0,
            balloon_target_mib: 16.0,
            swapped_mib: 2.0,
            swap_target_mib: 4.0,
            overhead_mib: 9.5,
            shared_mib: 6.0,
            saved_mib: 3.0,
            shares: 1000,
            reservation_mib: 16.0,
            limit_mib: Some(120.0),
            rate: Some(2.5e6),
            balloon_stuck: true,
            paused: true,
            order_errors: 2,
            row: None,
        }],
    }
}

#[test]
fn rows_with_every_optional_section_validate() {
    let v = validator();
    let run = serde_json::to_value(full_run_row()).unwrap();
    for key in [
        "truth",
        "host",
        "active",
        "active_writes",
        "balloon",
        "swap",
        "check",
        "vmm",
    ] {
        assert!(run[key].is_object(), "{key}");
    }
    assert_eq!(run["schema_version"], SCHEMA_VERSION);
    assert_valid(&v, &run);
    // And with every one absent.
    assert_valid(&v, &serde_json::to_value(Row::default()).unwrap());
    let host = serde_json::to_value(full_host_row()).unwrap();
    assert_eq!(host["schema_version"], SCHEMA_VERSION);
    assert_valid(&v, &host);
}

/// Sets the value at a JSON pointer.
fn set(row: &Value, pointer: &str, to: Value) -> Value {
    let mut r = row.clone();
    *r.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer}")) = to;
    r
}

/// Renames the field at `pointer` (keeping its value).
fn rename(row: &Value, pointer: &str, to: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut r = row.clone();
    let obj = if parent.is_empty() {
        r.as_object_mut()
    } else {
        r.pointer_mut(parent).unwrap().as_object_mut()
    }
    .unwrap();
    let value = obj.remove(key).unwrap_or_else(|| panic!("no {pointer}"));
    obj.insert(to.into(), value);
    r
}

#[test]
fn a_wrong_type_or_a_misspelt_field_fails() {
    let v = validator();
    let run = serde_json::to_value(full_run_row()).unwrap();
    let host = serde_json::to_value(full_host_row()).unwrap();
    let bad = [
        // Wrong types.
        set(&run, "/time_s", json!("2.5")),
        set(&run, "/interval", json!(-1)),
        set(&run, "/interval", json!(1.5)),
        set(&run, "/partial", json!(1)),
        set(&run, "/guest", Value::Null),
        set(&run, "/host/backed_mib", json!("24")),
        set(&run, "/active/n", json!(null)),
        set(&run, "/vmm/work_ms", json!(null)),
        // Only the write estimate has a dirty rate, and it always has one.
        {
            let mut r = run.clone();
            r["active"]["dirty_rate_mib_s"] = json!(21.0);
            r
        },
        rename(&run, "/active_writes/dirty_rate_mib_s", "dirty_mib_s"),
        set(&run, "/balloon/guest_stats/source", json!(3)),
        set(&run, "/end", json!("finished")),
        set(&host, "/host/state", json!("medium")),
        set(&host, "/vms/0/status", json!("runing")),
        set(&host, "/vms/0/shares", json!(-5)),
        set(&host, "/vms", json!({})),
        // Another schema version.
        set(&run, "/schema_version", json!(SCHEMA_VERSION + 1)),
        set(&host, "/schema_version", json!(0)),
        // Misspelt required fields, at the top and nested.
        rename(&run, "/configured_mib", "configured_mb"),
        rename(&run, "/schema_version", "schema_versoin"),
        rename(&run, "/host/host_mib", "hots_mib"),
        rename(&run, "/swap/page_in_us_p99", "page_in_us_p90"),
        rename(&host, "/period", "periode"),
        rename(&host, "/vms/0/granted_mib", "grant_mib"),
    ];
    for (i, row) in bad.iter().enumerate() {
        assert!(!v.is_valid(row), "bad row {i} validates: {row}");
    }
    // An unknown field.
    let mut extra = run.clone();
    extra["surprise"] = json!(1);
    assert!(!v.is_valid(&extra));
}

/// The stdout lines of the binary run with `args`, parsed, and its exit code.
fn json_lines(args: &[&str]) -> (Vec<Value>, Option<i32>, String) {
    let mut child = common::memvisor()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rows: Vec<Value> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).expect("a JSON row"))
        .collect();
    let status = common::wait_bounded(&mut child, Duration::from_secs(120));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (rows, status.code(), stderr)
}

#[test]
fn real_run_rows_validate() {
    if !common::kvm("real_run_rows_validate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (rows, code, stderr) = json_lines(&[
        "run",
        "--json",
        "--mem",
        "64M",
        "--interval",
        "100ms",
        "--seed",
        "2",
        "--console",
        "/dev/null",
        "--swap",
        dir.path().to_str().unwrap(),
        "--swap-target",
        "2M",
        "--workload",
        "alloc 8M; touch 8M write 300ms; check 8M; idle 200ms",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(rows.len() >= 4, "{} rows: {stderr}", rows.len());
    let v = validator();
    for r in &rows {
        assert_valid(&v, r);
    }
    // The sections the schema describes were there to check.
    assert!(rows.iter().any(|r| r["swap"].is_object()));
    assert!(rows.iter().any(|r| r["check"].is_object()));
    assert!(rows.iter().any(|r| r["truth"].is_object()));
    assert!(rows.iter().any(|r| r["balloon"]["guest_stats"].is_object()));
    assert_eq!(rows.last().unwrap()["end"], "done");
    // Every row says what its boundary cost, the parts within the whole.
    for r in &rows {
        let w = &r["vmm"];
        let part = |k: &str| w[k].as_f64().unwrap_or_else(|| panic!("vmm.{k} in {r}"));
        let parts: f64 = [
            "harvest_ms",
            "access_round_ms",
            "write_round_ms",
            "map_ms",
            "row_ms",
        ]
        .iter()
        .map(|k| part(k))
        .sum();
        assert!(part("work_ms") > 0.0 && parts <= part("work_ms"), "{w}");
        assert!(w["dirty_log_slots"].as_u64().unwrap() >= 1, "{w}");
        assert!(
            part("scan_ms") <= part("harvest_ms"),
            "the scan is part of the harvest: {w}"
        );
        assert!(w["scan_ioctls"].as_u64().unwrap() >= 1, "{w}");
    }
}

#[test]
fn real_host_rows_validate() {
    if !common::kvm("real_host_rows_validate") {
        return;
    }
    let (rows, code, stderr) = json_lines(&[
        "host",
        "--json",
        "--budget",
        "200M",
        "--period",
        "200ms",
        "--vm",
        "name=a,mem=64M,limit=60M,workload=alloc 8M; touch 8M write 400ms",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(rows.len() >= 2, "{} rows: {stderr}", rows.len());
    let v = validator();
    for r in &rows {
        assert_valid(&v, r);
    }
    let last = &rows.last().unwrap()["vms"][0];
    assert_eq!(last["exit_code"], 0, "{last}");
    assert_eq!(last["limit_mib"], 60.0, "{last}");
}
