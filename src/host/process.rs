//! One VM of a host as its own `memvisor run` process: started with `--json` and `--control`, its
//! rows read from its stdout by a thread of their own, its stderr passed on with its name in
//! front, its targets set over its control socket. The host never waits on a VM: a VM that stops
//! answering is reported and, at the end, killed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::{Client, ClientError};
use crate::row::Row;

use super::spec::VmSpec;

/// Longest row line read from a VM (a row is a few KiB).
const MAX_LINE: u64 = 1 << 20;
/// How long a control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// What the row reader saw.
#[derive(Debug, Default)]
pub struct Rows {
    /// The newest row.
    pub latest: Option<Row>,
    /// Rows read so far.
    pub count: u64,
    /// Lines that were not rows (counted, the first kept).
    pub bad_lines: u64,
    pub first_bad: Option<String>,
    /// The VM closed its stdout: it has ended or is ending.
    pub closed: bool,
}

/// A VM process.
pub struct VmProcess {
    pub spec: VmSpec,
    child: Child,
    socket: PathBuf,
    client: Option<Client>,
    rows: Arc<Mutex<Rows>>,
    threads: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl VmProcess {
    /// Starts `exe run` for `spec`, its control socket in `dir`, rows every `period`.
    pub fn spawn(exe: &Path, spec: &VmSpec, dir: &Path, period: Duration) -> io::Result<Self> {
        let socket = dir.join(format!("{}.sock", spec.name));
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .arg("--json")
            .arg(format!("--interval={}ms", period.as_millis().max(1)))
            .arg("--control")
            .arg(&socket)
            .arg(format!("--name={}", spec.name))
            .args(&spec.run_args);
        // Hypervisor swap for the host's `hard` state: an unnamed file in the host's directory
        // (gone with the VM, even killed), unless the VM's spec chose its own.
        if !spec
            .run_args
            .iter()
            .any(|a| a.starts_with("--swap=") || a == "--swap")
        {
            cmd.arg(format!("--swap={}", dir.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::start(cmd, spec.clone(), socket)
    }

    /// Starts `cmd` as the VM `spec` (its stdout and stderr piped).
    fn start(mut cmd: Command, spec: VmSpec, socket: PathBuf) -> io::Result<Self> {
        let mut child = cmd.spawn()?;
        let rows = Arc::new(Mutex::new(Rows::default()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut threads = Vec::new();
        let r = rows.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("rows-{}", spec.name))
            .spawn(move || read_rows(stdout, &r))
            .and_then(|t| {
                threads.push(t);
                let name = spec.name.clone();
                std::thread::Builder::new()
                    .name(format!("stderr-{}", spec.name))
                    .spawn(move || pass_stderr(stderr, &name))
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        Ok(VmProcess {
            spec,
            child,
            socket,
            client: None,
            rows,
            threads,
            status: None,
        })
    }

    /// What the row reader has seen.
    pub fn rows(&self) -> MutexGuard<'_, Rows> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the row reader has seen, once it has read the VM's stdout to its end (its last row,
    /// the one that says why it ended), waiting at most `limit` for that: for a VM that has
    /// exited, whose stdout ends at once.
    pub fn rows_to_the_end(&self, limit: Duration) -> MutexGuard<'_, Rows> {
        let until = Instant::now() + limit;
        loop {
            let r = self.rows();
            if r.closed || Instant::now() >= until {
                return r;
            }
            drop(r);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The VM's exit status once it has ended (never blocks).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends a control command, connecting first if needed; a failed connection is dropped so
    /// that the next call connects afresh.
    pub fn command(&mut self, command: &str, mib: Option<u64>) -> Result<(), ClientError> {
        let client = match &mut self.client {
            Some(c) => c,
            None => self
                .client
                .insert(Client::connect(&self.socket, CONTROL_TIMEOUT)?),
        };
        let result = client.command(command, mib).map(drop);
        if matches!(
            result,
            Err(ClientError::Io(_) | ClientError::Closed | ClientError::NotJson(_))
        ) {
            self.client = None;
        }
        result
    }

    /// Ends the VM gracefully: `stop` over its socket (SIGTERM if that fails), then waits up to
    /// `grace` for it to exit, and kills it after that. Returns its exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() && self.command("stop", None).is_err() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (`exited`
            // is None), so it cannot name another process.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let until = Instant::now() + grace;
        while self.exited().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.status
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads JSON rows until the VM closes its stdout.
fn read_rows(stdout: ChildStdout, rows: &Mutex<Rows>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut r = rows.lock().unwrap_or_else(|p| p.into_inner());
        if n == 0 {
            r.closed = true;
            return;
        }
        match serde_json::from_slice::<Row>(&line) {
            Ok(row) => {
                r.latest = Some(row);
                r.count += 1;
            }
            Err(e) => {
                r.bad_lines += 1;
                if r.first_bad.is_none() {
                    r.first_bad = Some(e.to_string());
                }
                if line.last() != Some(&b'\n') {
                    // An over-long line: skip to its end, bounded by what the VM writes.
                    let _ = reader.skip_until(b'\n');
                }
            }
        }
    }
}

/// Passes the VM's stderr on, each line with the VM's name in front (lines cut at 4 KiB).
fn pass_stderr(stderr: ChildStderr, name: &str) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(4096).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    let _ = reader.skip_until(b'\n');
                    line.push(b'\n');
                }
                let mut err = io::stderr().lock();
                let _ = write!(err, "[{name}] ");
                let _ = err.write_all(&line);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        super::super::spec::parse("name=t", 0).unwrap()
    }

    fn sh(script: &str) -> VmProcess {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        VmProcess::start(cmd, spec(), PathBuf::from("/nonexistent/t.sock")).unwrap()
    }

    fn wait_closed(vm: &VmProcess) {
        for _ in 0..500 {
            if vm.rows().closed {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the reader never saw the end");
    }

    #[test]
    fn rows_are_read_and_garbage_is_counted() {
        let mut vm = sh(
            r#"echo '{"interval":0,"time_s":1.0}'; echo 'garbage'; echo '{"interval":1,"time_s":2.0}'; exit 3"#,
        );
        wait_closed(&vm);
        {
            let r = vm.rows();
            assert_eq!(r.count, 2);
            assert_eq!(r.bad_lines, 1);
            assert_eq!(r.latest.as_ref().map(|r| r.interval), Some(1));
        }
        let status = vm.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(3));
    }

    #[test]
    fn a_vm_that_ignores_stop_is_killed_after_its_grace() {
        let mut vm = sh("trap '' TERM; while :; do sleep 0.05; done");
        assert!(vm.exited().is_none());
        assert!(
            vm.command("query", None).is_err(),
            "no socket: the command fails, it does not hang"
        );
        let status = vm.stop(Duration::from_millis(300)).unwrap();
        assert!(!status.success());
    }

    #[test]
    fn an_endless_line_is_skipped_with_bounded_memory() {
        // 3 MiB without a newline, then a row.
        let vm = sh(r#"head -c 3145728 /dev/zero | tr '\0' x; echo; echo '{"interval":5}'"#);
        wait_closed(&vm);
        let r = vm.rows();
        assert_eq!(r.bad_lines, 1);
        assert_eq!(r.latest.as_ref().map(|r| r.interval), Some(5));
    }
}
