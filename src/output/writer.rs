//! The writer thread: printed lines go to standard output through a bounded queue, so the VM never
//! waits on whoever reads them.
//!
//! The run loop only queues a line ([`LineWriter::send`] never blocks). When the reader falls so
//! far behind that the queue is full, the line is dropped and counted: rows are not coalesced
//! (each has its own interval), the Prometheus endpoint and the plot still get every row, and the
//! first drop is announced once on stderr. At the end, [`LineWriter::finish`] waits a bounded
//! time ([`FINISH_WAIT`]) for the queue to drain, then gives up on a reader that is not reading:
//! the lines still queued count as not written.
//!
//! A failed write (a closed pipe, a full disk) stops the thread; the next `send` returns that
//! error, so the run stops as it always did when its output went away.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Lines the queue holds (a table line is ~330 bytes, a JSON line ~2 KiB).
pub const QUEUE_LINES: usize = 256;

/// How long [`LineWriter::finish`] waits for the queue to drain.
pub const FINISH_WAIT: Duration = Duration::from_secs(1);

/// A failed write, kept so that every later `send` can return it.
#[derive(Debug, Clone)]
struct Failed {
    kind: io::ErrorKind,
    os: Option<i32>,
    text: String,
}

impl Failed {
    fn new(e: &io::Error) -> Self {
        Failed {
            kind: e.kind(),
            os: e.raw_os_error(),
            text: e.to_string(),
        }
    }

    fn error(&self) -> io::Error {
        match self.os {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

/// What the writer thread and the run share.
#[derive(Default)]
struct Shared {
    written: AtomicU64,
    failed: Mutex<Option<Failed>>,
}

impl Shared {
    fn failed(&self) -> Option<Failed> {
        self.failed.lock().map_or(None, |f| f.clone())
    }
}

/// Lines that did not reach the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotWritten {
    /// Dropped because the queue was full.
    pub dropped: u64,
    /// Still queued when [`FINISH_WAIT`] ran out.
    pub abandoned: u64,
}

impl NotWritten {
    pub fn total(&self) -> u64 {
        self.dropped + self.abandoned
    }
}

/// A writer thread and its queue.
pub struct LineWriter {
    tx: Option<SyncSender<String>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the thread ends.
    ended: Receiver<()>,
    queued: u64,
    dropped: u64,
    /// Where the one warning goes (stderr in the binary).
    warn: fn(String),
}

impl LineWriter {
    /// Starts a thread writing each queued line, and a line break, to `out`. `warn` says once
    /// that lines are being dropped; it must not block (see [`warn_stderr`]).
    pub fn spawn<W: Write + Send + 'static>(out: W, capacity: usize, warn: fn(String)) -> Self {
        let (tx, rx) = mpsc::sync_channel::<String>(capacity);
        let (ended_tx, ended) = mpsc::channel::<()>();
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::spawn(move || {
            let _ended = ended_tx;
            write_lines(out, &rx, &theirs);
        });
        LineWriter {
            tx: Some(tx),
            shared,
            thread: Some(thread),
            ended,
            queued: 0,
            dropped: 0,
            warn,
        }
    }

    /// Queues a line without ever blocking. A full queue drops it (counted; the first time,
    /// said once). Fails once the thread failed to write.
    pub fn send(&mut self, line: String) -> io::Result<()> {
        if let Some(f) = self.shared.failed() {
            return Err(f.error());
        }
        let Some(tx) = &self.tx else {
            return Err(io::Error::other("the output was finished"));
        };
        match tx.try_send(line) {
            Ok(()) => {
                self.queued += 1;
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.dropped += 1;
                if self.dropped == 1 {
                    (self.warn)(format!(
                        "memvisor: standard output is not read fast enough: rows that do not fit \
                         its queue of {QUEUE_LINES} lines are dropped and counted (the plot and \
                         Prometheus still get every row)"
                    ));
                }
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => Err(self.shared.failed().map_or_else(
                || io::Error::other("the writer thread ended"),
                |f| f.error(),
            )),
        }
    }

    /// Closes the queue and waits up to `wait` for the thread to write what is in it. The lines
    /// that did not reach the output, or the write error that stopped the thread.
    pub fn finish(mut self, wait: Duration) -> io::Result<NotWritten> {
        drop(self.tx.take());
        let drained = !matches!(
            self.ended.recv_timeout(wait),
            Err(RecvTimeoutError::Timeout)
        );
        if drained && let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Not drained: the thread is blocked in a write nobody reads; it is left behind (the
        // process is about to exit).
        if let Some(f) = self.shared.failed() {
            return Err(f.error());
        }
        let written = self.shared.written.load(Ordering::SeqCst);
        Ok(NotWritten {
            dropped: self.dropped,
            abandoned: self.queued.saturating_sub(written),
        })
    }
}

fn write_lines(mut out: impl Write, rx: &Receiver<String>, shared: &Shared) {
    for line in rx {
        let wrote = out
            .write_all(line.as_bytes())
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush());
        if let Err(e) = wrote {
            if let Ok(mut f) = shared.failed.lock() {
                *f = Some(Failed::new(&e));
            }
            return;
        }
        shared.written.fetch_add(1, Ordering::SeqCst);
    }
}

/// Writes `text` and a line break to stderr on a thread of its own, so that a stderr nobody
/// reads cannot stop the caller; waits at most `wait` for it.
pub fn say_on_stderr(text: String, wait: Duration) {
    let (tx, rx) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().spawn(move || {
        let _done = tx;
        // stderr may be closed: the message is a courtesy.
        let _ = writeln!(io::stderr(), "{text}");
    });
    if spawned.is_ok() {
        let _ = rx.recv_timeout(wait);
    }
}

/// The binary's `warn` for [`LineWriter::spawn`]: stderr, without waiting.
pub fn warn_stderr(text: String) {
    say_on_stderr(text, Duration::ZERO);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    /// Lines written so far, shared with the test.
    #[derive(Clone, Default)]
    struct Shelf(Arc<Mutex<Vec<u8>>>);

    impl Write for Shelf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An output that blocks every write until the test opens its gate.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>, Shelf);

    impl Gate {
        fn open(&self) {
            *self.0.0.lock().unwrap() = true;
            self.0.1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut open = self.0.0.lock().unwrap();
            while !*open {
                open = self.0.1.wait(open).unwrap();
            }
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Fails every write with `kind`.
    struct Broken(io::ErrorKind);

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    static WARNINGS: AtomicU64 = AtomicU64::new(0);

    fn count_warning(text: String) {
        assert!(text.contains("dropped"), "{text}");
        WARNINGS.fetch_add(1, Ordering::SeqCst);
    }

    fn quiet(_: String) {}

    #[test]
    fn lines_arrive_in_order_and_nothing_is_lost_with_a_reader() {
        let shelf = Shelf::default();
        let mut w = LineWriter::spawn(shelf.clone(), 4, quiet);
        for i in 0..100 {
            w.send(format!("line {i}")).unwrap();
            // A reader that keeps up: wait for the thread before the queue fills.
            while w.queued > w.shared.written.load(Ordering::SeqCst) + 2 {
                std::thread::yield_now();
            }
        }
        assert_eq!(w.finish(FINISH_WAIT).unwrap(), NotWritten::default());
        let text = String::from_utf8(shelf.0.lock().unwrap().clone()).unwrap();
        let want: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), want);
    }

    #[test]
    fn a_reader_that_does_not_read_never_blocks_the_sender_and_the_loss_is_counted() {
        let gate = Gate::default();
        let mut w = LineWriter::spawn(gate.clone(), 4, count_warning);
        // The first line is taken by the thread (then blocked), four fill the queue.
        for i in 0..50 {
            w.send(format!("line {i}")).unwrap();
        }
        assert_eq!(WARNINGS.load(Ordering::SeqCst), 1, "said once");
        let not = w.finish(Duration::from_millis(50)).unwrap();
        assert_eq!(not.total(), 50, "none written: {not:?}");
        assert!(
            (45..=46).contains(&not.dropped),
            "queue of 4 and the line in the thread: {not:?}"
        );
        gate.open();
    }

    #[test]
    fn a_slow_reader_gets_the_queue_at_the_end() {
        let gate = Gate::default();
        let mut w = LineWriter::spawn(gate.clone(), 8, quiet);
        for i in 0..5 {
            w.send(format!("line {i}")).unwrap();
        }
        let opener = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            opener.open();
        });
        assert_eq!(w.finish(Duration::from_secs(30)).unwrap().total(), 0);
        assert_eq!(gate.1.0.lock().unwrap().split(|&b| b == b'\n').count(), 6);
    }

    #[test]
    fn a_failed_write_is_returned_by_the_next_send_and_by_finish() {
        let mut w = LineWriter::spawn(Broken(io::ErrorKind::BrokenPipe), 4, quiet);
        w.send("first".into()).unwrap();
        let e = loop {
            match w.send("next".into()) {
                Ok(()) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        let e = w.finish(FINISH_WAIT).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        // An OS error keeps its code (and so its message).
        let mut w = LineWriter::spawn(Broken(io::ErrorKind::Other), 4, quiet);
        w.send("x".into()).unwrap();
        assert!(w.finish(FINISH_WAIT).is_err());
        let f = Failed::new(&io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(f.error().raw_os_error(), Some(libc::ENOSPC));
    }
}
