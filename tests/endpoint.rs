//! Hostile clients of the `--prometheus` endpoint, against the real binary: huge declared bodies,
//! a client that never reads, an endless request line, hundreds of idle connections under a low
//! file-descriptor limit, and a slowloris. Each must leave the endpoint serving, the VM's
//! reported overhead where it was, and the run ending as it would without them, with its exit
//! code. All traffic goes to 127.0.0.1; every loop is bounded in count.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use memvisor::row::{EndReason, Row};

/// A request for the metrics.
const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// A `memvisor run --json --prometheus 127.0.0.1:0` in progress, its outputs drained by threads.
struct Run {
    /// Holds the guest's console file.
    _dir: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

/// How a run ended.
struct Ended {
    /// The exit code; `None`: killed by a signal, or killed by the test because it did not end.
    code: Option<i32>,
    rows: Vec<Row>,
    stderr: String,
}

impl Run {
    /// Starts a run of `workload` on 64 MiB at a 200 ms interval; `nofile`: the child's
    /// RLIMIT_NOFILE. Returns once the endpoint's address is printed.
    fn start(workload: &str, timeout: &str, nofile: Option<u64>) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console");
        let mut cmd = common::memvisor();
        cmd.args([
            "run",
            "--mem",
            "64M",
            "--workload",
            workload,
            "--interval",
            "200ms",
            "--seed",
            "5",
            "--timeout",
            timeout,
            "--console",
            console.to_str().unwrap(),
            "--json",
            "--prometheus",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
            // which is async-signal-safe, on a local struct; it touches no lock or allocation.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn memvisor");
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(url) = line.split("http://").nth(1) {
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
        Run {
            _dir: dir,
            child,
            addr,
            stdout,
            stderr,
        }
    }

    /// Sends `sig` to the run.
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid (not yet reaped: `wait` consumes the Run).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits at most `limit` for the run to end (then kills it: a run that does not end is a
    /// failure the caller sees as `code: None`).
    fn wait(mut self, limit: Duration) -> Ended {
        let step = Duration::from_millis(50);
        let mut status = None;
        for _ in 0..(limit.as_millis() / step.as_millis()).max(1) {
            if let Some(s) = self.child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            std::thread::sleep(step);
        }
        let code = match status {
            Some(s) => s.code().or_else(|| s.signal().map(|sig| 128 + sig)),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                None
            }
        };
        let stdout = self.stdout.join().unwrap();
        let rows = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ended {
            code,
            rows,
            stderr: self.stderr.join().unwrap(),
        }
    }
}

impl Ended {
    /// Asserts the exit code and a last row that says why the run ended.
    fn assert_ended(&self, code: i32, why: EndReason) {
        assert_eq!(
            self.code,
            Some(code),
            "exit code (None: did not end in time)\n{}",
            self.stderr
        );
        let last = self.rows.last().expect("rows");
        assert_eq!(last.end, Some(why), "{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }

    /// The largest VMM overhead of the run's rows, in MiB.
    fn max_overhead_mib(&self) -> f64 {
        self.rows
            .iter()
            .filter_map(|r| r.host.as_ref().map(|h| h.overhead_mib))
            .fold(0.0, f64::max)
    }
}

/// Sends `request` and reads what comes back until the server closes (at most 10 s of silence).
/// An error (refused, reset) is returned as such.
fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.set_write_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(request)?;
    let mut resp = Vec::new();
    match c.read_to_end(&mut resp) {
        Ok(_) => {}
        // A reset after the answer (unread input at close) still leaves the answer read.
        Err(_) if !resp.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&resp).into_owned())
}

/// A scrape that must be answered 200 with the metrics.
fn scrape_ok(addr: SocketAddr) -> Result<(), String> {
    let r = exchange(addr, GET).map_err(|e| format!("scrape: {e}"))?;
    if r.starts_with("HTTP/1.1 200") && r.contains("memvisor_intervals_total") {
        Ok(())
    } else {
        Err(format!("scrape answered: {r:?}"))
    }
}

/// Scrapes until one is answered 200, at most `tries` times 100 ms apart.
fn scrape_eventually(addr: SocketAddr, tries: u32) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..tries {
        match scrape_ok(addr) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// A client that sends `GET`s back to back and never reads an answer: the writes stop when the
/// server stops reading (or after `max` requests). The connection stays open while it lives.
fn deaf_client(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..20_000 {
        if c.write_all(GET).is_err() {
            break;
        }
    }
    c
}

/// A GET declaring a body of `len` bytes is refused unread; the endpoint serves on and the run
/// ends as usual.
fn huge_declared_body(len: &str) {
    let run = Run::start("alloc 8M; touch 8M write 600ms; idle 1s", "60s", None);
    let req = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n\r\n");
    let r = exchange(run.addr, req.as_bytes());
    // Refused with a 4xx (413; hyper's own 4xx for a length past u64::MAX - 2), unread.
    let refused = r.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 4"));
    // The endpoint still serves after it.
    let after = scrape_ok(run.addr);
    let ended = run.wait(Duration::from_secs(60));
    assert!(
        refused && after.is_ok(),
        "Content-Length {len}: answered {r:?}; then {after:?}; exit {:?}\n{}",
        ended.code,
        ended.stderr
    );
    ended.assert_ended(0, EndReason::Done);
}

#[test]
fn a_declared_body_of_99999999999_bytes_is_refused_and_the_run_goes_on() {
    if !common::kvm("a_declared_body_of_99999999999_bytes_is_refused_and_the_run_goes_on") {
        return;
    }
    huge_declared_body("99999999999");
}

#[test]
fn a_declared_body_of_u64_max_bytes_is_refused_and_the_endpoint_lives_on() {
    if !common::kvm("a_declared_body_of_u64_max_bytes_is_refused_and_the_endpoint_lives_on") {
        return;
    }
    huge_declared_body("18446744073709551615");
}

/// A client that never reads, present through the run: other scrapes are answered, and the run
/// still ends at `stop` (a signal, or `--timeout` when `None`) with the exit code `code`.
fn deaf_client_then(stop: Option<libc::c_int>, timeout: &str, code: i32, why: EndReason) {
    let run = Run::start("alloc 8M; touch 8M write 600ms; idle 60s", timeout, None);
    let deaf = deaf_client(run.addr);
    let mut answered = Vec::new();
    for _ in 0..3 {
        answered.push(scrape_ok(run.addr));
    }
    if let Some(sig) = stop {
        run.signal(sig);
    }
    let ended = run.wait(Duration::from_secs(60));
    drop(deaf);
    for a in answered {
        a.unwrap_or_else(|e| panic!("with a client that never reads: {e}\n{}", ended.stderr));
    }
    ended.assert_ended(code, why);
}

#[test]
fn a_client_that_never_reads_holds_up_no_scrape_and_no_sigterm() {
    if !common::kvm("a_client_that_never_reads_holds_up_no_scrape_and_no_sigterm") {
        return;
    }
    deaf_client_then(Some(libc::SIGTERM), "120s", 143, EndReason::Sigterm);
}

#[test]
fn a_client_that_never_reads_holds_up_no_timeout() {
    if !common::kvm("a_client_that_never_reads_holds_up_no_timeout") {
        return;
    }
    deaf_client_then(None, "4s", 124, EndReason::Timeout);
}

#[test]
fn an_endless_request_line_does_not_grow_the_reported_overhead() {
    if !common::kvm("an_endless_request_line_does_not_grow_the_reported_overhead") {
        return;
    }
    const WORKLOAD: &str = "alloc 16M; touch 16M write 600ms; idle 2s";
    let quiet = Run::start(WORKLOAD, "60s", None).wait(Duration::from_secs(60));
    quiet.assert_ended(0, EndReason::Done);

    let run = Run::start(WORKLOAD, "60s", None);
    let addr = run.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // Sends one request line for ever (up to 512 MiB in all), reconnecting whenever the server
    // cuts it off; at most 20,000 connections.
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'a'; 64 << 10];
            let mut sent = 0u64;
            let mut connections = 0u32;
            while !stop.load(Ordering::Relaxed) && sent < 512 << 20 && connections < 20_000 {
                connections += 1;
                let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                if c.write_all(b"GET /").is_err() {
                    continue;
                }
                while !stop.load(Ordering::Relaxed) && sent < 512 << 20 {
                    match c.write(&chunk) {
                        Ok(n) => sent += n as u64,
                        Err(_) => break,
                    }
                }
            }
            sent
        })
    };
    let attacked = run.wait(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let sent = attacker.join().unwrap();
    attacked.assert_ended(0, EndReason::Done);
    let (before, after) = (quiet.max_overhead_mib(), attacked.max_overhead_mib());
    eprintln!("overhead {before:.1} MiB quiet, {after:.1} MiB under attack ({sent} bytes sent)");
    assert!(
        sent >= 32 << 20,
        "the attack sent only {sent} bytes: it proves nothing"
    );
    assert!(
        after <= before + 8.0,
        "overhead {before:.1} MiB quiet, {after:.1} MiB with an endless request line"
    );
}

#[test]
fn hundreds_of_idle_connections_under_a_low_fd_limit_leave_the_endpoint_serving() {
    if !common::kvm("hundreds_of_idle_connections_under_a_low_fd_limit_leave_the_endpoint_serving")
    {
        return;
    }
    // 40 file descriptors: the VMM needs about 15 of them, and one more at every interval to read
    // its resident set.
    let run = Run::start("alloc 8M; touch 8M write 600ms; idle 6s", "60s", Some(40));
    // 400 connections that never send a byte, kept open through the run (ten times what the
    // process has file descriptors for).
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(c) = TcpStream::connect_timeout(&run.addr, Duration::from_secs(2)) {
            idle.push(c);
        }
    }
    let served = scrape_eventually(run.addr, 100);
    // And still serving later on, the idle ones still connected.
    std::thread::sleep(Duration::from_secs(1));
    let later = scrape_eventually(run.addr, 30);
    let ended = run.wait(Duration::from_secs(60));
    drop(idle);
    served.unwrap_or_else(|e| panic!("with idle connections: {e}\n{}", ended.stderr));
    later.unwrap_or_else(|e| panic!("later: {e}\n{}", ended.stderr));
    ended.assert_ended(0, EndReason::Done);
    // The endpoint left the VMM the descriptors it needs: every row read the resident set (an
    // overhead of 0 is a failed read).
    for r in &ended.rows {
        let h = r.host.as_ref().expect("host usage in every row");
        assert!(h.overhead_mib > 0.0, "row {}: {h:?}", r.interval);
    }
}

#[test]
fn a_slowloris_is_cut_off_by_the_header_timeout() {
    if !common::kvm("a_slowloris_is_cut_off_by_the_header_timeout") {
        return;
    }
    let run = Run::start("alloc 8M; touch 8M write 600ms; idle 60s", "120s", None);
    let mut c = TcpStream::connect(run.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
    // One header byte per 100 ms read wait, 300 at most (30 s): the head never ends.
    let mut dripped = 0;
    let mut cut = false;
    let mut buf = [0u8; 512];
    while dripped < 300 {
        if c.write_all(b"a").is_err() {
            cut = true;
            break;
        }
        dripped += 1;
        match c.read(&mut buf) {
            // Closed, or answered (408): either way the server is done with it.
            Ok(_) => {
                cut = true;
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    // Meanwhile and after, others are served.
    let served = scrape_ok(run.addr);
    run.signal(libc::SIGTERM);
    let ended = run.wait(Duration::from_secs(60));
    assert!(
        cut,
        "a client dripping {dripped} header bytes was never cut off\n{}",
        ended.stderr
    );
    served.unwrap_or_else(|e| panic!("{e}\n{}", ended.stderr));
    ended.assert_ended(143, EndReason::Sigterm);
}
