//! A client of the control socket, for the host scheduler, `memvisor top` and tests: one request
//! line out, one answer line back, each within a timeout, the answer capped in size.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

/// Largest answer line read (a row is a few KiB).
pub const MAX_ANSWER: u64 = 1 << 20;

/// What went wrong with a request.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("control socket: the VM closed the connection")]
    Closed,
    #[error("control socket: the answer is longer than {MAX_ANSWER} bytes")]
    TooLong,
    #[error("control socket: the answer is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("control socket: {class}: {desc}")]
    Refused { class: String, desc: String },
    #[error("control socket: the answer has neither \"return\" nor \"error\"")]
    Malformed,
}

/// One connection to a VM's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects, with `timeout` for every later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends `request` and returns the value of its `return`.
    pub fn execute(&mut self, request: &Value) -> Result<Value, ClientError> {
        let mut line = serde_json::to_string(request).map_err(ClientError::NotJson)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut answer = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_ANSWER)
            .read_until(b'\n', &mut answer)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if answer.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_ANSWER {
                ClientError::TooLong
            } else {
                ClientError::Closed
            });
        }
        let mut v: Value = serde_json::from_slice(&answer).map_err(ClientError::NotJson)?;
        if let Some(r) = v.get_mut("return") {
            return Ok(r.take());
        }
        let e = v.get("error").ok_or(ClientError::Malformed)?;
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Err(ClientError::Refused {
            class: text("class"),
            desc: text("desc"),
        })
    }

    /// `{"execute": command}` with `mib` when given.
    pub fn command(&mut self, command: &str, mib: Option<u64>) -> Result<Value, ClientError> {
        let mut req = serde_json::json!({ "execute": command });
        if let Some(m) = mib {
            req["mib"] = m.into();
        }
        self.execute(&req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Answer, ControlServer, ErrorClass, Handler, Request};

    #[test]
    fn talks_to_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let handler: Handler = Box::new(|r| match r {
            Request::Query => Answer::Return(serde_json::json!({"interval": 3})),
            Request::SetSwapTarget { .. } => Answer::error(ErrorClass::DeviceNotActive, "no swap"),
            _ => Answer::ok(),
        });
        let _s = ControlServer::start(&path, handler).unwrap();
        let mut c = Client::connect(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(c.command("query", None).unwrap()["interval"], 3);
        assert_eq!(
            c.command("set-balloon-target", Some(5)).unwrap(),
            serde_json::json!({})
        );
        match c.command("set-swap-target", Some(5)) {
            Err(ClientError::Refused { class, desc }) => {
                assert_eq!(class, "DeviceNotActive");
                assert_eq!(desc, "no swap");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.command("nonsense", None),
            Err(ClientError::Refused { .. })
        ));
    }

    #[test]
    fn a_silent_or_hostile_server_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            // First client: never answers. Second: garbage. Third: a line with no end.
            let (_a, _) = listener.accept().unwrap();
            let request = |s: &std::os::unix::net::UnixStream| {
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).unwrap();
            };
            let (mut b, _) = listener.accept().unwrap();
            request(&b);
            b.write_all(b"not json\n").unwrap();
            let (mut c, _) = listener.accept().unwrap();
            request(&c);
            c.write_all(b"{\"return\":").unwrap();
            drop(c);
            std::thread::sleep(Duration::from_millis(500));
        });
        let short = Duration::from_millis(200);
        let mut a = Client::connect(&path, short).unwrap();
        assert!(matches!(a.command("query", None), Err(ClientError::Io(_))));
        let mut b = Client::connect(&path, short).unwrap();
        assert!(matches!(
            b.command("query", None),
            Err(ClientError::NotJson(_))
        ));
        let mut c = Client::connect(&path, short).unwrap();
        assert!(matches!(c.command("query", None), Err(ClientError::Closed)));
        t.join().unwrap();
    }
}
