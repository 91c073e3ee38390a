//! When rows leave and what they carry: each row as soon as its interval's truth is in, nothing
//! kept for the whole run, the last partial interval marked, a check phase's counts on its row.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{memvisor, memvisor_output};

#[test]
fn each_row_is_read_before_the_next_boundary() {
    if !common::kvm("each_row_is_read_before_the_next_boundary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let interval = 2.0;
    let spawned = Instant::now();
    let mut child = memvisor()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload",
            "alloc 4M; touch 4M write 5s; idle 2s",
            "--interval",
            "2s",
            "--json",
            "--console",
            console.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor");
    // (read at, seconds after the spawn; the row). The guest's clock starts after the spawn, so
    // a row's `time_s` is at most this far from the spawn: reading before `time_s` plus half an
    // interval means before the next boundary, with a wide margin (this checks order, not speed).
    let mut rows = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let row: serde_json::Value = serde_json::from_str(&line).unwrap();
        rows.push((spawned.elapsed().as_secs_f64(), row));
    }
    let status = common::wait_bounded(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(rows.len() >= 4, "{} rows", rows.len());
    for (read_at, row) in &rows {
        let t = row["time_s"].as_f64().unwrap();
        assert!(
            *read_at < t + interval / 2.0,
            "row {} (time {t:.2} s) was read at {read_at:.2} s after the spawn",
            row["interval"]
        );
    }
    // The rows still carry their truth (it is what completes them): all but an odd one that a
    // loaded host kept waiting past its grace.
    let with_truth = rows.iter().filter(|(_, r)| !r["truth"].is_null()).count();
    assert!(
        with_truth * 2 > rows.len(),
        "{with_truth} of {} rows",
        rows.len()
    );
    // Numbered by one clock, in order, none lost.
    let numbers: Vec<u64> = rows
        .iter()
        .map(|(_, r)| r["interval"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..rows.len() as u64).collect::<Vec<_>>());
}

#[test]
fn memory_stays_flat_over_a_long_run_of_short_intervals() {
    if !common::kvm("memory_stays_flat_over_a_long_run_of_short_intervals") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let mut child = memvisor()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload",
            "alloc 4M; touch 4M write 15s",
            "--interval",
            "10ms",
            "--json",
            "--console",
            console.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor");
    // Keep only each row's time and the VMM's overhead (its RSS less resident guest RAM).
    let mut overhead = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let row: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if row["end"].is_null() {
            let mib = row["host"]["overhead_mib"].as_f64().unwrap();
            overhead.push((row["time_s"].as_f64().unwrap(), mib));
        }
    }
    let status = common::wait_bounded(&mut child, Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    // Early (after 2 s, once everything is set up) against the highest of the last 3 s: a row
    // kept per interval would add about 0.8 KiB each, over 1 MiB in these ~1300 intervals.
    let early = overhead
        .iter()
        .find(|(t, _)| *t >= 2.0)
        .expect("a row after 2 s")
        .1;
    let end = overhead.last().expect("rows").0;
    assert!(end > 12.0, "the run lasted {end} s");
    let late = overhead
        .iter()
        .filter(|(t, _)| *t >= end - 3.0)
        .map(|(_, m)| *m)
        .fold(f64::MIN, f64::max);
    assert!(
        late - early < 0.5,
        "overhead grew from {early:.2} MiB to {late:.2} MiB over {} intervals",
        overhead.len()
    );
}

#[test]
fn the_last_partial_interval_is_marked_in_the_table_and_the_json() {
    if !common::kvm("the_last_partial_interval_is_marked_in_the_table_and_the_json") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let args = |json: bool| {
        let mut a = vec![
            "run",
            "--mem",
            "64M",
            "--workload",
            "alloc 4M; touch 4M write 1s",
            "--interval",
            "400ms",
            "--console",
            console.to_str().unwrap(),
        ];
        if json {
            a.push("--json");
        }
        a
    };
    let out = memvisor_output(&args(false));
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let last = table.lines().last().unwrap();
    // About 1.2 s of run: two full intervals and a part of a third.
    assert!(last.contains("  (partial: 0."), "{last}");
    assert!(last.ends_with(" s)  (end)"), "{last}");
    assert!(
        !table.lines().rev().skip(1).any(|l| l.contains("partial")),
        "{table}"
    );
    let out = memvisor_output(&args(true));
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, full) = rows.split_last().unwrap();
    assert_eq!(last["partial"], true, "{last}");
    assert!(last["length_s"].as_f64().unwrap() < 0.4, "{last}");
    // Full intervals end on the grid's boundaries: about 0.4 s each (one that began late, after
    // the tick's work, is that much shorter).
    for r in full {
        assert_eq!(r["partial"], false, "{r}");
        assert!(r["length_s"].as_f64().unwrap() > 0.3, "{r}");
    }
}

#[test]
fn a_check_phase_shows_its_counts_on_the_row_where_it_ended() {
    if !common::kvm("a_check_phase_shows_its_counts_on_the_row_where_it_ended") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    // Half the heap written, then all of it checked: 4 MiB intact, 4 MiB zero.
    let args = |format: &'static str| {
        vec![
            "run".to_string(),
            "--mem".into(),
            "64M".into(),
            "--workload".into(),
            "alloc 8M; touch 4M write; idle 300ms; check 8M; idle 200ms".into(),
            "--interval".into(),
            "100ms".into(),
            "--console".into(),
            console.to_str().unwrap().into(),
            format.into(),
        ]
    };
    let out = memvisor().args(args("--json")).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let checked: Vec<&serde_json::Value> = rows.iter().filter(|r| !r["check"].is_null()).collect();
    assert_eq!(checked.len(), 1, "one row has the check: {rows:?}");
    let c = &checked[0]["check"];
    assert_eq!(c["phase"], "check 8M");
    assert_eq!(c["checked_pages"], 2048);
    assert_eq!(c["intact_pages"], 1024);
    assert_eq!(c["zero_pages"], 1024);
    assert_eq!(c["intact_mib"], 4.0);
    // It is the row of the interval in which the check ended: the check is over at its end, and
    // the phase after it had not begun at the end of any row before.
    let at = rows.iter().position(|r| !r["check"].is_null()).unwrap();
    assert_ne!(rows[at]["phase"], "check 8M", "{}", rows[at]);
    assert!(
        rows[..at].iter().all(|r| r["phase"] != "idle 200ms"),
        "{rows:?}"
    );
    // The CSV has the same numbers in its check columns, on one row.
    let out = memvisor().args(args("--csv")).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut rd = csv::Reader::from_reader(text.as_bytes());
    let headers = rd.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (intact, zero) = (col("check_intact_pages"), col("check_zero_pages"));
    let found: Vec<(String, String)> = rd
        .records()
        .map(|r| r.unwrap())
        .filter(|r| !r[intact].is_empty())
        .map(|r| (r[intact].to_string(), r[zero].to_string()))
        .collect();
    assert_eq!(found, [("1024".to_string(), "1024".to_string())]);
}
