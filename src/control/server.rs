//! The control socket's server: a Unix stream socket served from a thread of its own, so that a
//! slow or hostile client never delays the VM. The thread only frames lines, parses them
//! ([`super::protocol`]) and hands each request to the caller's handler, which must not block (it
//! reads the latest row and posts commands to the running VM).
//!
//! Every client is bounded: at most [`MAX_CLIENTS`] at once (the next one is told so and closed),
//! a line of at most [`MAX_LINE`](super::protocol::MAX_LINE) bytes, at most [`MAX_PENDING`] bytes
//! of answers it has not read, [`LINE_TIMEOUT`] to finish a line it started, [`WRITE_TIMEOUT`] to
//! read what it was sent, and [`IDLE_TIMEOUT`] of silence. Breaking a bound closes that client
//! only.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::protocol::{Answer, ErrorClass, Framed, LineBuffer, Request, parse};

/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;
/// Answer bytes a client may leave unread before it is closed (a few hundred rows).
pub const MAX_PENDING: usize = 1 << 20;
/// Time to finish a line once its first byte came.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to read an answer that is waiting.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence after which a client is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(50);

/// Why the socket could not be served.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {0}: the path exists and is not a socket; remove it or choose another")]
    NotASocket(PathBuf),
    #[error("control socket {0}: another process is serving it")]
    InUse(PathBuf),
    #[error(
        "control socket {path}: the path is too long for a Unix socket ({len} bytes, at most 107)"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket: cannot start its thread: {0}")]
    Thread(io::Error),
}

/// Answers one request; must not block.
pub type Handler = Box<dyn FnMut(Request) -> Answer + Send>;

/// A running control socket; dropping it stops the thread and removes the socket.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's identity, so that only our own file is removed.
    inode: (u64, u64),
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (mode 0600) and serves it with `handler`. A stale socket that nobody serves
    /// is replaced; any other existing path is refused.
    pub fn start(path: &Path, handler: Handler) -> Result<Self, ControlError> {
        let listener = bind(path)?;
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, handler, &flag))
            .map_err(ControlError::Thread)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            done,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.inode
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the listening socket with mode 0600 from the start (the mode is set on the socket
/// before `bind` creates its file, so there is no moment when others could connect).
fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() > 107 || bytes.contains(&0) {
        return Err(ControlError::PathTooLong {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
        Ok(_) => return Err(ControlError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a descriptor we own; Linux gives the socket file this mode at bind.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: a zeroed sockaddr_un is valid; the path (checked above to fit, with no NUL) is
    // copied into sun_path, which stays NUL-terminated.
    let rc = unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == ErrorKind::AddrInUse {
            ControlError::InUse(path.to_path_buf())
        } else {
            io_err(e)
        });
    }
    // SAFETY: listen(2) on the bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(fd))
}

/// One connected client.
struct Client {
    stream: UnixStream,
    input: LineBuffer,
    /// Answers not written yet.
    output: Vec<u8>,
    /// Close once `output` is written (or its time is up).
    closing: bool,
    last_read: Instant,
    /// When the current partial line began.
    line_started: Option<Instant>,
    /// When `output` last became non-empty.
    write_started: Option<Instant>,
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        Client {
            stream,
            input: LineBuffer::default(),
            output: Vec::new(),
            closing: false,
            last_read: Instant::now(),
            line_started: None,
            write_started: None,
        }
    }

    fn queue(&mut self, answer: &Answer) {
        if self.output.is_empty() {
            self.write_started = Some(Instant::now());
        }
        self.output.extend_from_slice(answer.to_line().as_bytes());
        if self.output.len() > MAX_PENDING {
            // It does not read what it asks for: stop answering it.
            self.output.clear();
            self.closing = true;
        }
    }

    /// Reads what is there and answers each whole line. False: drop the client now.
    fn read(&mut self, handler: &mut Handler) -> bool {
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                self.last_read = Instant::now();
                self.input.push(&buf[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                return true;
            }
            Err(_) => return false,
        }
        loop {
            match self.input.next_line() {
                Framed::Line(line) => {
                    self.line_started = None;
                    let answer = match parse(&line) {
                        Ok(request) => handler(request),
                        Err(answer) => answer,
                    };
                    self.queue(&answer);
                    if self.closing {
                        return true;
                    }
                }
                Framed::Partial => break,
                Framed::TooLong => {
                    self.queue(&Answer::error(
                        ErrorClass::GenericError,
                        "the line is too long; closing",
                    ));
                    self.closing = true;
                    return true;
                }
            }
        }
        if self.input.has_partial() {
            self.line_started.get_or_insert(self.last_read);
        }
        true
    }

    /// Writes what it can without blocking. False: drop the client now.
    fn write(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                    self.write_started = Some(Instant::now());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.write_started = None;
        !self.closing
    }

    /// Whether a bound of time is broken.
    fn timed_out(&mut self, now: Instant) -> bool {
        if self.write_started.is_some_and(|t| now - t > WRITE_TIMEOUT) {
            return true;
        }
        if !self.closing && self.line_started.is_some_and(|t| now - t > LINE_TIMEOUT) {
            self.queue(&Answer::error(
                ErrorClass::GenericError,
                "the line was not finished in time; closing",
            ));
            self.closing = true;
            return !self.write();
        }
        now - self.last_read > IDLE_TIMEOUT
    }
}

fn serve(listener: UnixListener, mut handler: Handler, done: &AtomicBool) {
    let mut clients: Vec<Client> = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let mut fds = Vec::with_capacity(clients.len() + 1);
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &clients {
            let mut events = 0;
            if !c.closing {
                events |= libc::POLLIN;
            }
            if !c.output.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that outlives the call.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                TICK.as_millis() as libc::c_int,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                log::warn!("control socket: poll failed, no longer serving: {e}");
                return;
            }
            continue;
        }
        let now = Instant::now();
        let mut keep = Vec::with_capacity(clients.len());
        for (c, fd) in clients.drain(..).zip(&fds[1..]) {
            let mut c = c;
            let mut alive = true;
            if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.closing {
                alive = c.read(&mut handler);
            }
            if alive && (fd.revents & libc::POLLOUT != 0 || !c.output.is_empty()) {
                alive = c.write();
            } else if alive && c.closing && c.output.is_empty() {
                alive = false;
            }
            if alive && c.timed_out(now) {
                alive = false;
            }
            if alive {
                keep.push(c);
            }
        }
        clients = keep;
        if fds[0].revents & libc::POLLIN != 0 {
            accept(&listener, &mut clients);
        }
    }
}

/// Takes every waiting connection; beyond [`MAX_CLIENTS`], each is told so and closed.
fn accept(listener: &UnixListener, clients: &mut Vec<Client>) {
    // Bounded: at most the listen backlog is waiting.
    for _ in 0..64 {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if clients.len() >= MAX_CLIENTS {
                    let line = Answer::error(
                        ErrorClass::Busy,
                        format!("too many clients (at most {MAX_CLIENTS}); closing"),
                    )
                    .to_line();
                    let _ = (&stream).write(line.as_bytes());
                    continue;
                }
                clients.push(Client::new(stream));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::sync::Mutex;

    use super::*;

    /// A server whose handler records requests and answers a query with a fixed object.
    fn server(dir: &Path) -> (ControlServer, Arc<Mutex<Vec<Request>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let handler: Handler = Box::new(move |r| {
            log.lock().unwrap().push(r);
            match r {
                Request::Query => Answer::Return(serde_json::json!({"interval": 7})),
                _ => Answer::ok(),
            }
        });
        let s = ControlServer::start(&dir.join("ctl.sock"), handler).unwrap();
        (s, seen)
    }

    fn ask(stream: &UnixStream, line: &str) -> serde_json::Value {
        let mut w = stream;
        w.write_all(line.as_bytes()).unwrap();
        let mut r = BufReader::new(stream);
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    #[test]
    fn answers_requests_and_garbage_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (s, seen) = server(dir.path());
        let path = s.path().to_path_buf();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        let c = connect(&path);
        assert_eq!(
            ask(&c, "{\"execute\":\"query\"}\n")["return"]["interval"],
            7
        );
        assert_eq!(
            ask(&c, "garbage\n")["error"]["class"],
            "GenericError",
            "garbage gets an error and the client stays"
        );
        assert_eq!(
            ask(&c, "{\"execute\":\"set-balloon-target\",\"mib\":64}\n")["return"],
            serde_json::json!({})
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [Request::Query, Request::SetBalloonTarget { mib: 64 }]
        );
        drop(s);
        assert!(!path.exists(), "the socket is removed at the end");
    }

    #[test]
    fn refuses_paths_that_are_not_its_own_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let h = || -> Handler { Box::new(|_| Answer::ok()) };
        assert!(matches!(
            ControlServer::start(&file, h()),
            Err(ControlError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            ControlServer::start(&link, h()),
            Err(ControlError::NotASocket(_))
        ));
        // A socket someone serves is in use; one nobody serves is stale and replaced.
        let (s, _) = server(dir.path());
        assert!(matches!(
            ControlServer::start(s.path(), h()),
            Err(ControlError::InUse(_))
        ));
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let again = ControlServer::start(&stale, h()).unwrap();
        assert_eq!(
            ask(&connect(&stale), "{\"execute\":\"stop\"}\n")["return"],
            serde_json::json!({})
        );
        drop(again);
        let long = dir.path().join("x".repeat(120));
        assert!(matches!(
            ControlServer::start(&long, h()),
            Err(ControlError::PathTooLong { .. })
        ));
    }

    #[test]
    fn a_too_long_line_is_answered_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (s, seen) = server(dir.path());
        let mut c = connect(s.path());
        // More than a line may hold, without a newline: the server answers and closes.
        let _ = c.write_all(&vec![b'x'; super::super::protocol::MAX_LINE + 100]);
        let mut all = String::new();
        let _ = c.read_to_string(&mut all);
        assert!(all.contains("too long"), "{all}");
        assert!(seen.lock().unwrap().is_empty());
        // Others are still served.
        let d = connect(s.path());
        assert_eq!(
            ask(&d, "{\"execute\":\"query\"}\n")["return"]["interval"],
            7
        );
    }

    #[test]
    fn a_half_line_is_cut_off_and_the_slot_freed() {
        let dir = tempfile::tempdir().unwrap();
        let (s, seen) = server(dir.path());
        let mut slow = connect(s.path());
        slow.write_all(b"{\"execute\":").unwrap();
        // The server gives up on the line after LINE_TIMEOUT, says so, and closes.
        let mut all = String::new();
        let _ = slow.read_to_string(&mut all);
        assert!(all.contains("not finished in time"), "{all}");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn clients_beyond_the_bound_are_refused_and_the_rest_served() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = server(dir.path());
        let held: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| connect(s.path())).collect();
        // Make sure all of them were accepted before the next one comes.
        for c in &held {
            assert_eq!(ask(c, "{\"execute\":\"query\"}\n")["return"]["interval"], 7);
        }
        let mut extra = connect(s.path());
        let mut all = String::new();
        let _ = extra.read_to_string(&mut all);
        assert!(all.contains("too many clients"), "{all}");
        drop(held);
        // Slots free up once clients leave (the server notices within its tick).
        let mut answered = false;
        for _ in 0..100 {
            let c = connect(s.path());
            let mut w = &c;
            let _ = w.write_all(b"{\"execute\":\"query\"}\n");
            let mut line = String::new();
            let _ = BufReader::new(&c).read_line(&mut line);
            if line.contains("\"return\"") {
                answered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(answered, "a slot was freed");
    }

    #[test]
    fn a_client_that_never_reads_is_closed_and_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let (s, seen) = server(dir.path());
        let mut hog = UnixStream::connect(s.path()).unwrap();
        hog.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Ask for far more answer bytes than MAX_PENDING and never read them.
        let req = b"{\"execute\":\"query\"}\n".repeat(MAX_PENDING / 10);
        let _ = hog.write_all(&req);
        let c = connect(s.path());
        assert_eq!(
            ask(&c, "{\"execute\":\"query\"}\n")["return"]["interval"],
            7
        );
        // The server stopped answering the hog well before it had asked all it could.
        let asked = seen.lock().unwrap().len();
        assert!(asked < MAX_PENDING / 10, "{asked}");
    }
}
