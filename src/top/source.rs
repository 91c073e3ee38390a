//! Where the snapshots come from, each on a thread of its own that leaves the latest in a
//! [`Mailbox`] for the view to take: a control socket polled at the interval (a `run`'s or a
//! `host`'s), or a `--json` stream read line by line. Neither ever waits on the view, so a slow
//! terminal never holds up the writer of the stream (a `memvisor host --json` blocked on a full
//! pipe would delay its decisions); the socket is asked once per interval, each request within a
//! timeout, so that a VM is never asked more often than that.

use std::io::{BufRead, ErrorKind, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::control::{Client, ClientError};

use super::data::{Snapshot, parse_line, parse_value};

/// Longest line of a stream read (a host period with its VMs' rows is a few KiB per VM).
pub const MAX_LINE: usize = 4 << 20;
/// How long one request on the control socket may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What a source left for the view.
#[derive(Debug, Default)]
pub struct Inbox {
    /// The latest snapshot not taken yet.
    pub latest: Option<Snapshot>,
    /// When the latest snapshot came.
    pub at: Option<Instant>,
    /// The last problem, or what the source waits for.
    pub note: Option<String>,
    /// The source ended: nothing more will come.
    pub ended: bool,
}

/// Shared between a source's thread and the view.
#[derive(Debug, Default)]
pub struct Mailbox {
    inbox: Mutex<Inbox>,
    /// The view is gone: the thread stops at its next look.
    quit: AtomicBool,
}

impl Mailbox {
    fn with<T>(&self, f: impl FnOnce(&mut Inbox) -> T) -> T {
        f(&mut self.inbox.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn put(&self, s: Snapshot) {
        self.with(|i| {
            i.latest = Some(s);
            i.at = Some(Instant::now());
            i.note = None;
        });
    }

    fn note(&self, note: impl Into<String>) {
        let note = note.into();
        self.with(|i| i.note = Some(note));
    }

    /// The latest snapshot (taken: `None` until the next), when it came, the note and whether
    /// the source ended.
    pub fn take(&self) -> (Option<Snapshot>, Option<Instant>, Option<String>, bool) {
        self.with(|i| (i.latest.take(), i.at, i.note.clone(), i.ended))
    }

    /// Tells the thread to stop.
    pub fn quit(&self) {
        self.quit.store(true, Ordering::Relaxed);
    }

    fn quitting(&self) -> bool {
        self.quit.load(Ordering::Relaxed)
    }
}

/// Polls a control socket every `interval` until told to quit; reconnects after an error.
pub fn poll_control(path: PathBuf, interval: Duration, name: String, mail: Arc<Mailbox>) {
    let mut client: Option<Client> = None;
    let mut served = false;
    while !mail.quitting() {
        let started = Instant::now();
        if client.is_none() {
            match Client::connect(&path, REQUEST_TIMEOUT) {
                Ok(c) => client = Some(c),
                Err(ClientError::Io(e))
                    if served
                        && matches!(
                            e.kind(),
                            ErrorKind::NotFound | ErrorKind::ConnectionRefused
                        ) =>
                {
                    mail.note(format!("{} is gone: it ended", path.display()));
                }
                Err(e) => mail.note(format!("{}: {e}", path.display())),
            }
        }
        if let Some(c) = &mut client {
            match c.command("query", None) {
                Ok(v) => {
                    served = true;
                    match parse_value(v, &name) {
                        Ok(Some(s)) => mail.put(s),
                        Ok(None) => mail.note("waiting for the first row"),
                        Err(e) => mail.note(e.to_string()),
                    }
                }
                Err(ClientError::Refused { class, desc }) if class == "Ended" => {
                    mail.note(format!("it ended ({desc})"));
                    client = None;
                }
                Err(e) => {
                    mail.note(e.to_string());
                    client = None;
                }
            }
        }
        // The next request one interval after this one began, watching for quit meanwhile.
        while !mail.quitting() && started.elapsed() < interval {
            std::thread::sleep((interval - started.elapsed()).min(Duration::from_millis(50)));
        }
    }
}

/// Reads a `--json` stream (of `run` or `host`) to its end, leaving each snapshot as it comes.
/// A line that does not read is skipped and said; a line longer than [`MAX_LINE`] is skipped.
pub fn read_stream(mut input: impl BufRead, name: String, mail: Arc<Mailbox>) {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        if mail.quitting() {
            return;
        }
        line.clear();
        number += 1;
        let read = (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                mail.note(format!("reading standard input: {e}"));
                break;
            }
        }
        if line.len() > MAX_LINE {
            mail.note(format!(
                "line {number} is longer than {} MiB: skipped",
                MAX_LINE >> 20
            ));
            if !skip_line(&mut input) {
                break;
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match parse_line(text, &name) {
            Ok(Some(s)) => mail.put(s),
            Ok(None) => {}
            Err(e) => mail.note(format!("line {number}: {e}")),
        }
    }
    mail.with(|i| {
        i.ended = true;
        if i.note.is_none() {
            i.note = Some("end of the stream".into());
        }
    });
}

/// Reads up to the end of the current line. False: the input ended.
fn skip_line(input: &mut impl BufRead) -> bool {
    loop {
        let (done, used) = match input.fill_buf() {
            Ok([]) => return false,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        input.consume(used);
        if done {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Answer, ControlServer, ErrorClass, Handler, Request};
    use crate::host::testing;

    #[test]
    fn a_stream_leaves_its_latest_snapshot_and_says_what_it_skipped() {
        let rows = testing::rows(3);
        let mut text = String::new();
        text.push_str("  time state budget\n\n");
        text.push_str(&serde_json::to_string(&rows[0]).unwrap());
        text.push('\n');
        text.push_str(&"x".repeat(MAX_LINE + 10));
        text.push('\n');
        text.push_str(&serde_json::to_string(&rows[2]).unwrap());
        text.push_str("\n{\"half\":");
        let mail = Arc::new(Mailbox::default());
        read_stream(text.as_bytes(), "-".into(), mail.clone());
        let (latest, at, note, ended) = mail.take();
        let s = latest.expect("a snapshot");
        assert!(s.is_host());
        assert_eq!(s.vms[1].state, "end", "the last whole period");
        assert!(at.is_some());
        assert!(ended);
        assert!(note.unwrap().contains("line 6"), "the half line at the end");
        // Taken: nothing new until the next.
        assert!(mail.take().0.is_none());

        let mail = Arc::new(Mailbox::default());
        read_stream(&b"garbage\n"[..], "-".into(), mail.clone());
        let (latest, _, note, _) = mail.take();
        assert!(latest.is_none());
        assert!(note.unwrap().contains("line 1: not JSON"));
        let mail = Arc::new(Mailbox::default());
        let long = "y".repeat(MAX_LINE + 1);
        read_stream(long.as_bytes(), "-".into(), mail.clone());
        assert!(mail.take().2.unwrap().contains("longer than"));
    }

    #[test]
    fn a_control_socket_is_polled_until_quit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let row = serde_json::to_value(crate::top::data::tests::run_row()).unwrap();
        let mut n = 0;
        let handler: Handler = Box::new(move |r| match r {
            Request::Query => {
                n += 1;
                if n == 1 {
                    Answer::Return(serde_json::Value::Null)
                } else {
                    Answer::Return(row.clone())
                }
            }
            _ => Answer::error(ErrorClass::GenericError, "no"),
        });
        let server = ControlServer::start(&path, handler).unwrap();
        let mail = Arc::new(Mailbox::default());
        let m = mail.clone();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            poll_control(p, Duration::from_millis(100), "web".into(), m)
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let snap = loop {
            if let Some(s) = mail.take().0 {
                break s;
            }
            assert!(Instant::now() < deadline, "no snapshot came");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(snap.vms[0].name, "web");
        // The socket goes away: the view is told, the thread goes on trying until quit.
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if mail.take().2.is_some_and(|n| n.contains("gone")) {
                break;
            }
            assert!(Instant::now() < deadline, "the end was not said");
            std::thread::sleep(Duration::from_millis(20));
        }
        mail.quit();
        t.join().unwrap();
    }
}
