//! `memvisor run --control PATH` against the real binary: a query returns the row `--json`
//! prints, a balloon target moves the balloon, `stop` ends the run with its last row and map, and
//! hostile clients (garbage, a half line, a client that never reads, fifty at once) are answered
//! or closed while the VM keeps its interval.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memvisor::control::{Client, ClientError};
use serde_json::Value;

/// Generous: the machine is shared and KVM is nested.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `memvisor run --json --control` process, its rows collected as they come.
struct Vm {
    child: Child,
    socket: PathBuf,
    rows: Arc<Mutex<Vec<Value>>>,
    reader: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(more: &[&str]) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vm.sock");
        let map = dir.path().join("vm.map");
        let mut child = common::memvisor()
            .args(["run", "--json", "--interval", "200ms", "--mem", "128M"])
            .args(["--workload", "alloc 16M; touch 16M; idle 120s"])
            .args(["--console", "/dev/null", "--timeout", "300s"])
            .arg("--control")
            .arg(&socket)
            .arg("--map-out")
            .arg(&map)
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn memvisor");
        let stdout = child.stdout.take().unwrap();
        let rows = Arc::new(Mutex::new(Vec::new()));
        let r = rows.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).expect("a JSON row");
                r.lock().unwrap().push(v);
            }
        });
        let vm = Vm {
            child,
            socket,
            rows,
            reader: Some(reader),
            _dir: dir,
        };
        vm.wait_for(
            || vm.rows() >= 1 && vm.socket.exists(),
            "the first row and the socket",
        );
        vm
    }

    fn rows(&self) -> usize {
        self.rows.lock().unwrap().len()
    }

    fn map(&self) -> PathBuf {
        self._dir.path().join("vm.map")
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(20)).expect("connect")
    }

    fn wait_for(&self, mut done: impl FnMut() -> bool, what: &str) {
        let t = Instant::now();
        while !done() {
            assert!(t.elapsed() < PATIENCE, "waited too long for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to end; its exit code, stderr and every row, and whether the map
    /// and the socket exist then.
    fn finish(mut self) -> (Option<i32>, String, Vec<Value>, [bool; 2]) {
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        let rows = std::mem::take(&mut *self.rows.lock().unwrap());
        let exist = [self.map().exists(), self.socket.exists()];
        (status.code(), stderr, rows, exist)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn balloon_mib(row: &Value) -> f64 {
    row["balloon"]["balloon_mib"].as_f64().expect("a balloon")
}

#[test]
fn query_balloon_target_and_stop_drive_a_running_vm() {
    if !common::kvm("query_balloon_target_and_stop_drive_a_running_vm") {
        return;
    }
    let vm = Vm::start(&[]);
    let meta = std::fs::symlink_metadata(&vm.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let mut c = vm.client();
    let row = c.command("query", None).unwrap();
    // The run's own row: its RAM, an interval number, the fields `--json` has.
    assert_eq!(row["configured_mib"], 128.0);
    assert!(row["interval"].as_u64().is_some(), "{row}");
    assert!(row["host"]["backed_mib"].as_f64().is_some(), "{row}");
    assert_eq!(balloon_mib(&row), 0.0, "the balloon starts empty");
    // The same object as a printed row of the same interval.
    let printed = vm.rows.lock().unwrap().clone();
    if let Some(p) = printed.iter().find(|p| p["interval"] == row["interval"]) {
        assert_eq!(p, &row, "query returns the row --json printed");
    }

    // The balloon moves toward a new target over the next intervals.
    assert_eq!(
        c.command("set-balloon-target", Some(24)).unwrap(),
        serde_json::json!({})
    );
    let since = row["interval"].as_u64().unwrap();
    vm.wait_for(
        || {
            let r = c.command("query", None).unwrap();
            r["interval"].as_u64().unwrap() > since && balloon_mib(&r) >= 24.0
        },
        "the balloon to reach its target",
    );
    let r = c.command("query", None).unwrap();
    assert_eq!(r["balloon"]["target_mib"], 24.0);
    // Swap is not on: a clear refusal.
    match c.command("set-swap-target", Some(8)) {
        Err(ClientError::Refused { class, desc }) => {
            assert_eq!(class, "DeviceNotActive");
            assert!(desc.contains("swap is off"), "{desc}");
        }
        other => panic!("{other:?}"),
    }

    // Stop: the last row says so, the map is written, the socket is gone, exit 143.
    let before = vm.rows();
    assert_eq!(c.command("stop", None).unwrap(), serde_json::json!({}));
    let (code, stderr, rows, [map, socket]) = vm.finish();
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains("stopped through the control socket"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(rows.len() > before, "a last row after the stop");
    let last = rows.last().unwrap();
    assert_eq!(last["end"], "stopped");
    assert!(balloon_mib(last) >= 24.0);
    assert!(map, "the map is written at the stop");
    assert!(!socket, "the socket is removed at the end");
}

#[test]
fn pause_holds_the_guest_out_and_resume_lets_it_run() {
    if !common::kvm("pause_holds_the_guest_out_and_resume_lets_it_run") {
        return;
    }
    let vm = Vm::start(&[]);
    let mut c = vm.client();
    let paused_rows = || {
        (vm.rows.lock().unwrap().iter())
            .filter(|r| r["paused_s"].as_f64().unwrap() > 0.0)
            .count()
    };
    assert_eq!(paused_rows(), 0, "nothing is paused before a pause");
    assert_eq!(c.command("pause", None).unwrap(), serde_json::json!({}));
    assert_eq!(c.command("pause", None).unwrap(), serde_json::json!({}));
    // The intervals go on while paused: rows keep coming.
    vm.wait_for(|| paused_rows() >= 4, "four paused rows");
    let during = vm.rows();
    assert_eq!(c.command("resume", None).unwrap(), serde_json::json!({}));
    // After the resume, the guest reports its truth again and nothing is paused.
    vm.wait_for(
        || {
            let rows = vm.rows.lock().unwrap();
            rows.len() > during + 2 && {
                let last = rows.last().unwrap();
                last["paused_s"] == 0.0 && !last["truth"].is_null()
            }
        },
        "a whole, truthful row after the resume",
    );
    c.command("stop", None).unwrap();
    let (code, stderr, rows, _) = vm.finish();
    assert_eq!(code, Some(143), "{stderr}");
    // An interval paused from boundary to boundary has no truth: the guest never ran to send it.
    let whole: Vec<&Value> = (rows.iter())
        .filter(|r| {
            let (p, l) = (
                r["paused_s"].as_f64().unwrap(),
                r["length_s"].as_f64().unwrap(),
            );
            p > 0.0 && p >= l - 1e-3
        })
        .collect();
    assert!(whole.len() >= 2, "{} wholly paused rows", whole.len());
    for r in &whole {
        assert!(
            r["truth"].is_null(),
            "a wholly paused interval has a truth: {r}"
        );
    }
    for r in &rows {
        let (p, l) = (
            r["paused_s"].as_f64().unwrap(),
            r["length_s"].as_f64().unwrap(),
        );
        assert!(p <= l + 1e-3, "paused {p} s of a {l} s interval");
    }
}

/// Sends `bytes` on a fresh connection and returns what comes back before the server closes it
/// or goes quiet.
fn exchange(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

#[test]
fn hostile_clients_are_answered_or_closed_and_the_vm_keeps_its_interval() {
    if !common::kvm("hostile_clients_are_answered_or_closed_and_the_vm_keeps_its_interval") {
        return;
    }
    let vm = Vm::start(&[]);
    // Garbage and a request with an unknown argument: errors, and the connection stays.
    let answer = exchange(&vm.socket, b"\x00\xffnot json at all\n");
    assert!(answer.contains("GenericError"), "{answer}");
    let answer = exchange(&vm.socket, b"{\"execute\":\"stop\",\"now\":1}\n");
    assert!(answer.contains("takes no argument"), "{answer}");
    // A half line, held open; a client that asks and never reads.
    let mut half = UnixStream::connect(&vm.socket).unwrap();
    half.write_all(b"{\"execute\":\"que").unwrap();
    let mut hog = UnixStream::connect(&vm.socket).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = hog.write_all(&b"{\"execute\":\"query\"}\n".repeat(20_000));
    // Fifty at once: each is answered (a row, or Busy beyond the bound) or closed.
    let before = vm.rows();
    let fifty: Vec<_> = (0..50)
        .map(|_| {
            let path = vm.socket.clone();
            std::thread::spawn(move || exchange(&path, b"{\"execute\":\"query\"}\n"))
        })
        .collect();
    let answers: Vec<String> = fifty.into_iter().map(|t| t.join().unwrap()).collect();
    let served = answers.iter().filter(|a| a.contains("\"return\"")).count();
    let busy = answers.iter().filter(|a| a.contains("Busy")).count();
    let closed = answers.iter().filter(|a| a.is_empty()).count();
    assert_eq!(served + busy + closed, 50, "{answers:?}");
    assert!(served >= 1, "someone was served: {answers:?}");
    // Rows kept coming meanwhile (ordering only: several intervals after the abuse began).
    vm.wait_for(|| vm.rows() >= before + 3, "rows during the abuse");
    // The half line is cut off in time, with an error.
    let mut rest = String::new();
    half.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = half.read_to_string(&mut rest);
    assert!(rest.contains("not finished in time"), "{rest}");
    drop(hog);
    // And a well-behaved client is still served (a slot frees within the server's tick).
    vm.wait_for(
        || {
            Client::connect(&vm.socket, Duration::from_secs(20))
                .and_then(|mut c| c.command("stop", None))
                .is_ok()
        },
        "a slot for the stop",
    );
    let (code, stderr, rows, [_, socket]) = vm.finish();
    assert_eq!(code, Some(143), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(rows.last().unwrap()["end"], "stopped");
    assert!(!socket, "the socket is removed at the end");
    // Intervals stayed in order, none lost.
    for w in rows.windows(2) {
        assert_eq!(
            w[1]["interval"].as_u64().unwrap(),
            w[0]["interval"].as_u64().unwrap() + 1
        );
    }
}

#[test]
fn a_library_run_is_driven_through_its_controller() {
    if !common::kvm("a_library_run_is_driven_through_its_controller") {
        return;
    }
    let vm = memvisor::Run::new()
        .mem(64 << 20)
        .workload("alloc 8M; touch 8M; idle 120s")
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_secs(300))
        .console(memvisor::Console::Discard)
        .start()
        .expect("start");
    let c = vm.controller().clone();
    assert_eq!(c.set_swap_target(1), Err(memvisor::CommandError::SwapOff));
    let first = vm.rows().recv_timeout(PATIENCE).expect("a first row");
    assert_eq!(first.interval, 0);
    // Another thread stops it; the rows end with the stopped one.
    std::thread::spawn(move || c.stop().expect("stop queued"))
        .join()
        .unwrap();
    let rest: Vec<memvisor::Row> = vm.rows().iter().collect();
    let last = rest.last().expect("a last row");
    assert_eq!(last.end, Some(memvisor::row::EndReason::Stopped));
    assert_eq!(
        vm.controller().latest().map(|r| r.interval),
        Some(last.interval),
        "the controller's latest row is the last one"
    );
    assert_eq!(vm.dropped_rows(), 0);
    match vm.wait() {
        Err(memvisor::Error::Run(memvisor::RunError::Stopped { .. })) => {}
        other => panic!("{other:?}"),
    }
}
