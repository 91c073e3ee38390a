//! `memvisor host --control PATH`: the host's control socket, for `memvisor top` and scripts. It
//! answers `query` with the latest period: the object `host --json` prints, each VM's line with
//! its latest row added as `row` (the object `run --json` prints, `null` before its first). The
//! host decides its VMs' targets itself, so every other command is refused.
//!
//! It reuses the run's socket server (`control::server`: its own thread, bounded clients, capped
//! lines, timeouts): the host loop only swaps in the new period's answer once per period, and a
//! client never waits on the host loop nor the host loop on a client.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use crate::control::{Answer, ControlError, ControlServer, ErrorClass, Handler, Request};

use super::supervisor::HostRow;

/// The host's control socket; dropping it stops serving and removes the socket.
pub struct HostControl {
    latest: Arc<Mutex<Value>>,
    _server: ControlServer,
}

impl HostControl {
    /// Serves `path` (mode 0600; a stale socket is replaced, any other existing path refused).
    /// `query` answers `null` until the first period.
    pub fn start(path: &Path) -> Result<Self, ControlError> {
        let latest = Arc::new(Mutex::new(Value::Null));
        let server = ControlServer::start(path, handler(latest.clone()))?;
        Ok(HostControl {
            latest,
            _server: server,
        })
    }

    /// Makes `row` the answer to `query`.
    pub fn publish(&self, row: &HostRow) {
        // Built before the lock: a client's query waits only for the swap.
        let value = answer(row);
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }
}

/// What `query` returns for `row`: its `host --json` object, each VM with its latest `row`.
pub fn answer(row: &HostRow) -> Value {
    let mut value = serde_json::to_value(row).unwrap_or(Value::Null);
    if let Some(vms) = value.get_mut("vms").and_then(Value::as_array_mut) {
        for (v, line) in vms.iter_mut().zip(&row.vms) {
            if let Some(obj) = v.as_object_mut() {
                let r = line.row.as_ref().and_then(|r| serde_json::to_value(r).ok());
                obj.insert("row".into(), r.unwrap_or(Value::Null));
            }
        }
    }
    value
}

/// Answers `query` with the latest answer; refuses the rest.
fn handler(latest: Arc<Mutex<Value>>) -> Handler {
    Box::new(move |request| match request {
        Request::Query => Answer::Return(
            latest
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        ),
        _ => Answer::error(
            ErrorClass::GenericError,
            "memvisor host's control socket answers only query: the host sets its VMs' targets \
             itself",
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::{Client, ClientError};
    use crate::host::testing;
    use crate::row::Row;

    #[test]
    fn query_answers_the_latest_period_with_each_vms_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.sock");
        let control = HostControl::start(&path).unwrap();
        let mut c = Client::connect(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(c.command("query", None).unwrap(), Value::Null);

        let mut rows = testing::rows(3);
        let mut web_row = Row {
            interval: 41,
            phase: "touch".into(),
            ..Row::default()
        };
        web_row.guest.free_mib = 12.5;
        rows[1].vms[0].row = Some(web_row.clone());
        control.publish(&rows[0]);
        control.publish(&rows[1]);
        let v = c.command("query", None).unwrap();
        // The `host --json` object...
        let printed = serde_json::to_value(&rows[1]).unwrap();
        for key in ["time_s", "period", "host"] {
            assert_eq!(v[key], printed[key], "{key}");
        }
        assert_eq!(v["period"], 1);
        assert_eq!(v["vms"].as_array().unwrap().len(), 2);
        for (got, want) in v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .zip(printed["vms"].as_array().unwrap())
        {
            for (k, x) in want.as_object().unwrap() {
                assert_eq!(&got[k], x, "{k}");
            }
        }
        // ...with each VM's latest row.
        let row: Row = serde_json::from_value(v["vms"][0]["row"].clone()).unwrap();
        assert_eq!(row, web_row);
        assert_eq!(v["vms"][1]["row"], Value::Null);

        // The host sets its VMs' targets itself: every other command is refused, the connection
        // stays open.
        for (cmd, mib) in [
            ("set-balloon-target", Some(5)),
            ("set-swap-target", Some(5)),
            ("pause", None),
            ("resume", None),
            ("stop", None),
        ] {
            match c.command(cmd, mib) {
                Err(ClientError::Refused { class, desc }) => {
                    assert_eq!(class, "GenericError", "{cmd}");
                    assert!(desc.contains("only query"), "{cmd}: {desc}");
                }
                other => panic!("{cmd}: {other:?}"),
            }
        }
        assert_eq!(c.command("query", None).unwrap()["period"], 1);
        drop(control);
        assert!(!path.exists(), "the socket is removed with the host");
    }
}
