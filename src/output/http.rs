//! A small HTTP/1 server for one read-only document (the metrics), built for a hostile network.
//! It runs hyper on a one-thread tokio runtime in a thread of its own, so that a connection costs
//! a task (a few KiB), not a thread, and nothing a client does can reach the run loop:
//!
//! - the request line and headers must arrive within [`HEADER_TIMEOUT`] and fit in
//!   [`MAX_HEADER_BYTES`] (else the connection is closed, or answered 431);
//! - a request body is never read: a request that declares one is answered 413, any method but
//!   GET and HEAD 405, and the connection is closed after each answer (no keep-alive);
//! - a connection lives at most [`CONNECTION_DEADLINE`], which bounds the time spent writing to a
//!   client that does not read (the write timeout);
//! - at most [`MAX_CONNECTIONS`] are served at once, and at most a quarter of the file
//!   descriptors the process may open (`RLIMIT_NOFILE`), so that the endpoint never takes those
//!   the VMM needs: a further one is answered 503 with a non-blocking write and closed at once;
//!   when the process is out of file descriptors all the same, accepting pauses for
//!   [`ACCEPT_BACKOFF`] and resumes (the listener never goes away);
//! - stopping the server drops every connection where it stands: it never waits on a client.
//!
//! So the server's memory is bounded by about `MAX_CONNECTIONS` times a connection's buffers
//! (well under 2 MiB in all), whatever clients send; it is part of the VMM overhead that memvisor
//! reports, as every byte of the process is.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};

/// Time for a client to send the whole request head, counted from its connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a connection lives, its answer's writing included.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The request line and headers, together, in bytes; also the connection's read buffer.
pub const MAX_HEADER_BYTES: usize = 8192;
/// Connections served at once (fewer under a low `RLIMIT_NOFILE`: [`connection_cap`]).
pub const MAX_CONNECTIONS: usize = 32;
/// The pause before accepting again after `accept` failed (e.g. out of file descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The answer to a connection beyond [`MAX_CONNECTIONS`].
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen there: {0}")]
    Listen(#[source] std::io::Error),
    #[error("cannot start the server's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the server thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the server serves: the document's paths, its content type, and a function that renders
/// it for each request (called on the server's thread; it must not block).
pub struct Document {
    pub paths: &'static [&'static str],
    pub content_type: &'static str,
    pub render: Box<dyn Fn() -> String + Send + Sync>,
}

/// A running server; dropping it stops the server without waiting on any client.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` (port 0 picks a free port) and serves `doc` from a new thread named
    /// `name`. A bad address fails here, before anything runs.
    pub fn start(addr: SocketAddr, name: &str, doc: Document) -> Result<Self, HttpError> {
        let listener = bind(addr).map_err(HttpError::Listen)?;
        listener.set_nonblocking(true).map_err(HttpError::Listen)?;
        let bound = listener.local_addr().map_err(HttpError::Listen)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(HttpError::Runtime)?;
        let listener = {
            let _in_runtime = rt.enter();
            TcpListener::from_std(listener).map_err(HttpError::Listen)?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let doc = Arc::new(doc);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                rt.spawn(accept_loop(listener, doc));
                // Until the owner stops the server (or drops the sender).
                let _ = rt.block_on(stopped);
                // Dropping the runtime drops every connection's task where it stands: no task
                // blocks, so this never waits on a client.
                drop(rt);
            })
            .map_err(HttpError::Thread)?;
        Ok(Server {
            addr: bound,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr`. `[::]:PORT` (what `:PORT` means, as for node_exporter: every interface) takes
/// IPv4 too where the kernel allows it (`bindv6only` off, the default); where IPv6 is off, it
/// falls back to `0.0.0.0:PORT`.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    match std::net::TcpListener::bind(addr) {
        Err(e)
            if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
        {
            log::info!(
                "IPv6 unavailable ({e}): listening on 0.0.0.0:{}",
                addr.port()
            );
            std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, addr.port()))
        }
        r => r,
    }
}

/// The step at which [`linger`] checks its stop.
pub const LINGER_STEP: Duration = Duration::from_millis(20);

/// Keeps the calling thread (and so a server that serves the final figures) for `linger` after
/// the run ended, so that the last scrape sees them, returning early once `stop()` is true (a
/// second SIGINT or SIGTERM). Says so on stderr. Never longer than `linger`.
pub fn linger(addr: SocketAddr, linger: Duration, stop: &dyn Fn() -> bool) {
    if linger.is_zero() {
        return;
    }
    // stderr may be closed: the note is a courtesy.
    let _ = writeln!(
        std::io::stderr(),
        "memvisor: serving the final metrics at http://{addr} for {:.1} s more (SIGINT or SIGTERM ends it)",
        linger.as_secs_f64()
    );
    let end = std::time::Instant::now() + linger;
    while !stop() {
        let now = std::time::Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(LINGER_STEP));
    }
}

/// Connections served at once: [`MAX_CONNECTIONS`], or a quarter of the file descriptors this
/// process may open when that is fewer (at least 1). The rest stay the VMM's: it reads
/// `/proc/self/statm` at every interval and writes map files, and a failed open there would
/// falsify a row.
pub fn connection_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own and pass by pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return MAX_CONNECTIONS;
    }
    // RLIM_INFINITY is u64::MAX: a quarter of it is more than the cap.
    usize::try_from(lim.rlim_cur / 4)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_CONNECTIONS)
}

/// Accepts connections for ever, serving at most [`connection_cap`] at once.
async fn accept_loop(listener: TcpListener, doc: Arc<Document>) {
    let slots = Arc::new(Semaphore::new(connection_cap()));
    let mut warned = false;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM or a connection aborted before it was taken:
                // none ends the server. Say so once, wait and go on; the kernel keeps the
                // waiting connections in the listen backlog meanwhile.
                if !warned {
                    log::warn!("cannot accept a connection ({e}); retrying");
                    warned = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let doc = doc.clone();
                tokio::spawn(async move {
                    serve(stream, &doc).await;
                    drop(slot);
                });
            }
            Err(_) => {
                // Refused: a best-effort answer that cannot block, then close.
                let _ = stream.try_write(BUSY);
            }
        }
    }
}

/// Serves one connection: one request, then close; cut off at [`CONNECTION_DEADLINE`].
async fn serve(stream: TcpStream, doc: &Document) {
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(false)
        .serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(|req| {
                std::future::ready(Ok::<_, std::convert::Infallible>(answer(&req, doc)))
            }),
        );
    // A timeout or a protocol error only ends this connection.
    let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
}

/// The answer to one request; its body is never read.
fn answer(req: &Request<Incoming>, doc: &Document) -> Response<String> {
    let h = req.headers();
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let (status, body, content_type) =
        if req.method() != Method::GET && req.method() != Method::HEAD {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD\n".to_string(),
                "text/plain",
            )
        } else if has_body {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "a request body is not accepted\n".to_string(),
                "text/plain",
            )
        } else if doc.paths.contains(&req.uri().path()) {
            (StatusCode::OK, (doc.render)(), doc.content_type)
        } else {
            (
                StatusCode::NOT_FOUND,
                format!(
                    "not found; see {}\n",
                    doc.paths.first().copied().unwrap_or("/")
                ),
                "text/plain",
            )
        };
    let mut resp = Response::new(if req.method() == Method::HEAD {
        String::new()
    } else {
        body
    });
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};

    fn server() -> Server {
        Server::start(
            "127.0.0.1:0".parse().unwrap(),
            "http-test",
            Document {
                paths: &["/metrics", "/"],
                content_type: "text/plain; version=0.0.4",
                render: Box::new(|| "doc 1\n".into()),
            },
        )
        .unwrap()
    }

    /// Sends `request` and reads the whole answer (the server closes after one).
    fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(request).unwrap();
        let mut resp = Vec::new();
        // A reset after the answer (the server closed with unread input) still leaves it here.
        let _ = c.read_to_end(&mut resp);
        String::from_utf8_lossy(&resp).into_owned()
    }

    #[test]
    fn a_linger_ends_when_told_and_a_zero_one_at_once() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let asked = std::cell::Cell::new(0);
        // An hour, ended by the third look at the stop: the call returns (the test would hang
        // otherwise), having looked exactly three times.
        linger(addr, Duration::from_secs(3600), &|| {
            asked.set(asked.get() + 1);
            asked.get() >= 3
        });
        assert_eq!(asked.get(), 3);
        linger(addr, Duration::ZERO, &|| {
            panic!("a zero linger looks at nothing")
        });
    }

    #[test]
    fn answers_get_and_head_and_refuses_the_rest() {
        let s = server();
        let a = s.local_addr();
        let r = ask(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.contains("text/plain; version=0.0.4") && r.ends_with("doc 1\n"),
            "{r}"
        );
        let r = ask(a, b"GET /?x=1 HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        let r = ask(a, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200") && !r.contains("doc 1"), "{r}");
        let r = ask(a, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = ask(
            a,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("allow: GET, HEAD"),
            "{r}"
        );
    }

    #[test]
    fn a_body_is_refused_unread_whatever_its_declared_length() {
        let s = server();
        for len in ["99999999999", "18446744073709551615", "5"] {
            let req = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
            let r = ask(s.local_addr(), req.as_bytes());
            // 413, or hyper's own 4xx where the length is not even a valid one (over u64::MAX
            // - 2); never a hang or a crash.
            assert!(
                r.starts_with("HTTP/1.1 413") || (len.len() == 20 && r.starts_with("HTTP/1.1 4")),
                "{len}: {r}"
            );
        }
        let r = ask(
            s.local_addr(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        let r = ask(s.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    #[test]
    fn an_oversized_head_is_refused() {
        let s = server();
        let mut req = b"GET /".to_vec();
        req.extend(std::iter::repeat_n(b'a', 4 * MAX_HEADER_BYTES));
        req.extend(b" HTTP/1.1\r\n\r\n");
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server stops reading at the cap: the rest of the write may fail.
        let _ = c.write_all(&req);
        let mut resp = Vec::new();
        let _ = c.read_to_end(&mut resp);
        let r = String::from_utf8_lossy(&resp);
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
        let r = ask(s.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_and_served_again_once_free() {
        let s = server();
        // Fill every slot with a client that sent half a request.
        let mut idle: Vec<TcpStream> = (0..connection_cap())
            .map(|_| {
                let mut c = TcpStream::connect(s.local_addr()).unwrap();
                c.write_all(b"GET /met").unwrap();
                c
            })
            .collect();
        // Each of those is taken in turn; the next ones are refused with 503 (bounded retries:
        // the accept loop may not have reached the last idle one yet).
        let mut refused = false;
        for _ in 0..50 {
            let r = ask(s.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            if r.starts_with("HTTP/1.1 503") {
                refused = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(refused, "no 503 with every slot taken");
        // Closing the idle ones frees the slots.
        for c in idle.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let mut served = false;
        for _ in 0..100 {
            let r = ask(s.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            if r.starts_with("HTTP/1.1 200") {
                served = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(served, "slots were not freed");
    }

    #[test]
    fn stopping_does_not_wait_on_clients() {
        let s = server();
        // A client stuck mid-request and one that never reads its answers.
        let mut half = TcpStream::connect(s.local_addr()).unwrap();
        half.write_all(b"GET /metr").unwrap();
        let mut deaf = TcpStream::connect(s.local_addr()).unwrap();
        deaf.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for _ in 0..10_000 {
            if deaf
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .is_err()
            {
                break;
            }
        }
        // The join in drop returns although both clients are still connected (bounded wait:
        // a drop that hangs fails the test); after it, the port is closed.
        let addr = s.local_addr();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(s);
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "stopping the server waited on a client"
        );
        assert!(TcpStream::connect(addr).is_err());
        drop((half, deaf));
    }
}
