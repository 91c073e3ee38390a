//! The control protocol, as plain data: one JSON object per line in each direction, like QMP.
//!
//! - `{"execute":"query"}` returns the latest row (the same JSON object as `run --json` prints);
//! - `{"execute":"set-balloon-target","mib":N}` and `{"execute":"set-swap-target","mib":N}` set a
//!   target (MiB of guest memory to hold in the balloon, or swapped out by the VMM);
//! - `{"execute":"pause"}` holds the vCPU out of the guest until `{"execute":"resume"}` (the
//!   intervals, their rows and the swap at their boundaries go on; the guest does not run);
//! - `{"execute":"stop"}` ends the run gracefully, as SIGTERM does;
//! - every answer is `{"return":…}` or `{"error":{"class":…,"desc":…}}`.
//!
//! [`LineBuffer`] frames the byte stream into lines with a hard cap, and [`parse`] turns one line
//! into a [`Request`] or the error to answer; neither does I/O, so every case is unit-tested.

use serde::Serialize;
use serde_json::Value;

/// Longest request line, newline included. A longer one is answered with an error and the
/// connection is closed: no request of this protocol comes near it.
pub const MAX_LINE: usize = 4096;

/// A request a client may make.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Request {
    /// The latest row.
    Query,
    /// Hold this many MiB in the balloon.
    SetBalloonTarget { mib: u64 },
    /// Keep this many MiB of guest memory swapped out by the VMM.
    SetSwapTarget { mib: u64 },
    /// Hold the vCPU out of the guest.
    Pause,
    /// Let it run again.
    Resume,
    /// End the run gracefully.
    Stop,
}

/// The error classes an answer can carry (QMP's names where QMP has one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// The request is malformed, unknown, or its arguments are wrong.
    GenericError,
    /// The command exists but this VM cannot do it (no balloon device, swap off).
    DeviceNotActive,
    /// The VM is busy and did not take the command; try again.
    Busy,
    /// The VM has ended.
    Ended,
}

/// One answer line.
#[derive(Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Return(Value),
    Error { class: ErrorClass, desc: String },
}

impl Answer {
    /// An empty success, `{"return":{}}`.
    pub fn ok() -> Self {
        Answer::Return(Value::Object(Default::default()))
    }

    pub fn error(class: ErrorClass, desc: impl Into<String>) -> Self {
        Answer::Error {
            class,
            desc: desc.into(),
        }
    }

    /// The answer as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"error":{"class":"GenericError","desc":"cannot encode the answer"}}"#.into()
        });
        s.push('\n');
        s
    }
}

/// The largest target a request may name: 1 PiB, far beyond any guest, so that the MiB count
/// converts to bytes and pages without overflow.
pub const MAX_TARGET_MIB: u64 = 1 << 30;

/// Parses one request line (without its newline).
pub fn parse(line: &[u8]) -> Result<Request, Answer> {
    let generic = |desc: String| Answer::error(ErrorClass::GenericError, desc);
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| generic(format!("the line is not a JSON object: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(generic("the line is not a JSON object".into()));
    };
    let Some(command) = obj.get("execute").and_then(Value::as_str) else {
        return Err(generic(r#"the object has no "execute" string"#.into()));
    };
    let mib = || match obj.get("mib") {
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TARGET_MIB => Ok(n),
            _ => Err(generic(format!(
                r#"{command}: "mib" must be a whole number from 0 to {MAX_TARGET_MIB}"#
            ))),
        },
        None => Err(generic(format!(r#"{command} needs "mib""#))),
    };
    let allowed: &[&str] = match command {
        "query" | "stop" | "pause" | "resume" => &["execute"],
        "set-balloon-target" | "set-swap-target" => &["execute", "mib"],
        _ => {
            return Err(generic(format!(
                "unknown command {:?}: query, set-balloon-target, set-swap-target, pause, resume or stop",
                truncate(command, 64)
            )));
        }
    };
    if let Some(extra) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(generic(format!(
            "{command} takes no argument {:?}",
            truncate(extra, 64)
        )));
    }
    Ok(match command {
        "query" => Request::Query,
        "stop" => Request::Stop,
        "pause" => Request::Pause,
        "resume" => Request::Resume,
        "set-balloon-target" => Request::SetBalloonTarget { mib: mib()? },
        _ => Request::SetSwapTarget { mib: mib()? },
    })
}

/// At most `n` characters of `s`, for quoting client text in an error.
fn truncate(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// What [`LineBuffer::next_line`] found.
#[derive(Debug, PartialEq)]
pub enum Framed {
    /// A whole line, without its newline.
    Line(Vec<u8>),
    /// No whole line yet.
    Partial,
    /// The client sent more than [`MAX_LINE`] bytes without a newline: answer and close.
    TooLong,
}

/// Bytes from one client, framed into lines of at most [`MAX_LINE`] bytes. It never holds more
/// than `MAX_LINE` bytes plus one read.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Appends what a read returned.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole line, if any. After `TooLong` the buffer is useless: close the client.
    pub fn next_line(&mut self) -> Framed {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) if i < MAX_LINE => {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Framed::Line(line)
            }
            Some(_) => Framed::TooLong,
            None if self.buf.len() >= MAX_LINE => Framed::TooLong,
            None => Framed::Partial,
        }
    }

    /// Whether part of a line is waiting for its end.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(r: Result<Request, Answer>) -> ErrorClass {
        match r {
            Err(Answer::Error { class, .. }) => class,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn the_four_commands_parse() {
        assert_eq!(parse(br#"{"execute":"query"}"#), Ok(Request::Query));
        assert_eq!(parse(br#"{"execute":"stop"}"#), Ok(Request::Stop));
        assert_eq!(parse(br#"{"execute":"pause"}"#), Ok(Request::Pause));
        assert_eq!(parse(br#"{"execute":"resume"}"#), Ok(Request::Resume));
        assert_eq!(
            class(parse(br#"{"execute":"pause","mib":1}"#)),
            ErrorClass::GenericError
        );
        assert_eq!(
            parse(br#"{"execute":"set-balloon-target","mib":256}"#),
            Ok(Request::SetBalloonTarget { mib: 256 })
        );
        assert_eq!(
            parse(br#" {"mib":0, "execute":"set-swap-target"} "#),
            Ok(Request::SetSwapTarget { mib: 0 })
        );
    }

    #[test]
    fn bad_requests_get_a_generic_error() {
        for bad in [
            &b"garbage"[..],
            b"",
            b"[]",
            b"42",
            br#"{"execute":1}"#,
            br#"{"exec":"query"}"#,
            br#"{"execute":"reboot"}"#,
            br#"{"execute":"set-balloon-target"}"#,
            br#"{"execute":"set-balloon-target","mib":-1}"#,
            br#"{"execute":"set-balloon-target","mib":1.5}"#,
            br#"{"execute":"set-balloon-target","mib":"1"}"#,
            br#"{"execute":"set-swap-target","mib":18446744073709551615}"#,
            br#"{"execute":"query","mib":1}"#,
            br#"{"execute":"stop","now":true}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(
                class(parse(bad)),
                ErrorClass::GenericError,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn error_text_quotes_at_most_a_little_of_the_client() {
        let long = format!(r#"{{"execute":"{}"}}"#, "x".repeat(3000));
        let Err(Answer::Error { desc, .. }) = parse(long.as_bytes()) else {
            panic!("expected an error");
        };
        assert!(desc.len() < 200, "{desc}");
    }

    #[test]
    fn answers_are_one_json_line() {
        assert_eq!(Answer::ok().to_line(), "{\"return\":{}}\n");
        let e = Answer::error(ErrorClass::DeviceNotActive, "no balloon").to_line();
        assert_eq!(
            e,
            "{\"error\":{\"class\":\"DeviceNotActive\",\"desc\":\"no balloon\"}}\n"
        );
        let v: Value = serde_json::from_str(&e).unwrap();
        assert!(v["error"]["desc"].is_string());
    }

    #[test]
    fn lines_are_framed_and_capped() {
        let mut b = LineBuffer::default();
        assert_eq!(b.next_line(), Framed::Partial);
        assert!(!b.has_partial());
        b.push(b"{\"execute\":");
        assert_eq!(b.next_line(), Framed::Partial);
        assert!(b.has_partial());
        b.push(b"\"query\"}\r\n{\"execute\":\"stop\"}\nhalf");
        assert_eq!(
            b.next_line(),
            Framed::Line(br#"{"execute":"query"}"#.to_vec())
        );
        assert_eq!(
            b.next_line(),
            Framed::Line(br#"{"execute":"stop"}"#.to_vec())
        );
        assert_eq!(b.next_line(), Framed::Partial);
        assert!(b.has_partial());

        let mut b = LineBuffer::default();
        b.push(&vec![b'x'; MAX_LINE]);
        assert_eq!(b.next_line(), Framed::TooLong);
        let mut b = LineBuffer::default();
        b.push(&vec![b'x'; MAX_LINE - 1]);
        assert_eq!(b.next_line(), Framed::Partial);
        b.push(b"\n");
        assert!(matches!(b.next_line(), Framed::Line(l) if l.len() == MAX_LINE - 1));
        let mut b = LineBuffer::default();
        b.push(&vec![b'x'; MAX_LINE + 10]);
        b.push(b"\n");
        assert_eq!(b.next_line(), Framed::TooLong);
    }
}
