//! How a run ends when it does not end by itself: timeouts, signals, a closed pipe, an output that
//! cannot be written. Each must lose no result: a last row marked with why, the map written, and
//! the exit code a shell expects.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{memvisor, memvisor_output};

/// Starts a long run, waits for its second row, sends `signal`, and checks what it left.
fn stop_with_signal(signal: libc::c_int, code: i32, word: &str) {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("run.map");
    let mut child = memvisor()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload",
            "alloc 8M; touch 8M write 60s",
            "--interval",
            "200ms",
            "--map-out",
            map.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Two header lines, then two rows: the guest is running its 60 s phase.
    for _ in 0..4 {
        lines.next().expect("a line").expect("utf-8");
    }
    // SAFETY: kill only sends a signal to the child we spawned (its pid is live: not reaped yet).
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = common::wait_bounded(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&format!("stopped by {}", word.to_uppercase())),
        "{stderr}"
    );
    let last = rest.last().expect("a final row after the signal");
    assert!(last.ends_with(&format!("(end: {word})")), "{last}");
    assert!(last.contains("touch 8M write 60s"), "{last}");
    // The map was written, and it holds the pages the guest wrote.
    let out = memvisor_output(&["map", map.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["backed"].as_u64().unwrap() >= 8 * 256, "{summary}");
}

#[test]
fn sigint_ends_the_run_with_a_last_row_and_the_map() {
    if !common::kvm("sigint_ends_the_run_with_a_last_row_and_the_map") {
        return;
    }
    stop_with_signal(libc::SIGINT, 130, "sigint");
}

#[test]
fn sigterm_ends_the_run_with_a_last_row_and_the_map() {
    if !common::kvm("sigterm_ends_the_run_with_a_last_row_and_the_map") {
        return;
    }
    stop_with_signal(libc::SIGTERM, 143, "sigterm");
}

#[test]
fn a_timeout_keeps_the_partial_interval_and_writes_the_map() {
    if !common::kvm("a_timeout_keeps_the_partial_interval_and_writes_the_map") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("t.map");
    let out = memvisor_output(&[
        "run",
        "--mem",
        "64M",
        "--workload",
        "alloc 4M; touch 4M write 60s",
        "--timeout",
        "1s",
        "--json",
        "--map-out",
        map.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = rows.last().expect("rows");
    assert_eq!(last["end"], "timeout");
    assert!(last["host"]["backed_pages"].as_u64().unwrap() >= 4 * 256);
    assert!(map.exists(), "the map is written on a timeout");
}

#[test]
fn a_timeout_too_large_to_represent_never_fires_and_never_panics() {
    if !common::kvm("a_timeout_too_large_to_represent_never_fires_and_never_panics") {
        return;
    }
    let out = memvisor_output(&[
        "run",
        "--mem",
        "64M",
        "--workload",
        "alloc 1M; touch 1M write",
        "--timeout",
        "18446744073709551615s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    if !common::kvm("a_closed_pipe_ends_the_run_quietly") {
        return;
    }
    let mut child = memvisor()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload",
            "alloc 4M; touch 4M write 60s",
            "--interval",
            "100ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap();
    drop(lines); // like `| head -1`
    let status = common::wait_bounded(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(141), "stderr: {stderr}");
    assert!(!stderr.contains("memvisor: error"), "quiet: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unwritable_stdout_is_an_error_not_a_panic() {
    if !common::root("an_unwritable_stdout_is_an_error_not_a_panic") {
        return;
    }
    // Our own /dev/full (char 1:7) in a temp dir: every write fails with ENOSPC.
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    common::mknod_char(&full, 1, 7);
    let sink = std::fs::OpenOptions::new().write(true).open(&full).unwrap();
    // `map` of a missing file fails before printing; a run fails at the header.
    let out = memvisor()
        .args(["run", "--mem", "64M", "--workload", "idle 10ms"])
        .stdout(sink)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn ram_the_built_in_guest_cannot_boot_is_refused_before_boot() {
    let out = memvisor_output(&["run", "--mem", "500G"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("at most 458752.0 MiB"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing ran");
}

#[test]
fn the_largest_ram_the_built_in_guest_accepts_boots() {
    if !common::kvm("the_largest_ram_the_built_in_guest_accepts_boots") {
        return;
    }
    let out = memvisor_output(&[
        "run",
        "--mem",
        "448G",
        "--workload",
        "alloc 4M; touch 4M write",
        "--no-sampling",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
}

/// Starts a run of short intervals whose stdout is a pipe nobody reads (held open, never read).
fn spawn_unread(dir: &std::path::Path, more: &[&str]) -> std::process::Child {
    memvisor()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload",
            "alloc 4M; touch 4M write 60s",
            "--interval",
            "10ms",
            "--json",
            "--console",
            dir.join("console").to_str().unwrap(),
            "--map-out",
            dir.join("run.map").to_str().unwrap(),
        ])
        .args(more)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor")
}

/// Checks what a run stopped while its stdout was not read left: the exit code, the lost rows
/// said on stderr (once), and the map.
fn assert_unread_run_ended(
    status: std::process::ExitStatus,
    stderr: &str,
    dir: &std::path::Path,
    code: i32,
) {
    assert_eq!(status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.matches("not read fast enough: rows").count(),
        1,
        "said once: {stderr}"
    );
    assert!(
        stderr.contains("row(s) were not written to standard output"),
        "{stderr}"
    );
    let map = dir.join("run.map");
    let out = memvisor_output(&["map", map.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "the map was written: {out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["backed"].as_u64().unwrap() >= 4 * 256, "{summary}");
}

#[test]
fn a_stdout_nobody_reads_does_not_stop_a_timeout() {
    if !common::kvm("a_stdout_nobody_reads_does_not_stop_a_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ~2 KiB JSON rows every 10 ms fill a 64 KiB pipe within a second; the run then goes on.
    let mut child = spawn_unread(dir.path(), &["--timeout", "4s"]);
    let status = common::wait_bounded(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_unread_run_ended(status, &stderr, dir.path(), 124);
}

#[test]
fn a_stdout_nobody_reads_does_not_stop_a_sigterm() {
    if !common::kvm("a_stdout_nobody_reads_does_not_stop_a_sigterm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_unread(dir.path(), &["--timeout", "60s"]);
    // Wait (bounded) until the pipe and the queue are full (memvisor says so), then stop it.
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("not read fast enough") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no word of the unread stdout ({e}): {}",
                    String::from_utf8_lossy(&seen)
                );
            }
        }
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill only sends a signal to the child we spawned (its pid is live: not reaped yet).
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = common::wait_bounded(&mut child, Duration::from_secs(20));
    seen.extend(rx.iter().flatten());
    let seen = String::from_utf8_lossy(&seen).into_owned();
    assert_unread_run_ended(status, &seen, dir.path(), 143);
}

#[test]
fn a_console_or_plot_fifo_without_a_reader_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out.svg");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (option, needle) in [("--console", "--console"), ("--plot", "--plot")] {
        let mut child = memvisor()
            .args(["run", "--mem", "64M", "--workload", "idle 10ms", option])
            .arg(&fifo)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn memvisor");
        let status = common::wait_bounded(&mut child, Duration::from_secs(20));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{option}: {stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(stderr.contains("a FIFO"), "{stderr}");
    }
}
