//! `memvisor host --csv FILE`: the host's periods in esxtop's batch style, one row per period and
//! one column per VM and field, written as the host runs (a reader can follow the file).
//!
//! The columns are the wall-clock `timestamp` (RFC 3339, UTC, when the row was written), then the
//! `--json` row's fields, flattened: `schema_version`, `time_s` and `period`, then the host
//! line's as `\\host\FIELD`, then each VM's as `\\vm(NAME)\FIELD`, VMs in the order they were
//! given (esxtop names its columns `\\HOST\Group Memory(ID:NAME)\Field`). A field's unit is in its
//! name: `_MiB` (the JSON's `_mib`), `_s` seconds, `_pct` percent. A VM's name is letters, digits,
//! `-` and `_`, so the parentheses cannot be ambiguous, and a VM named `host` has its own
//! columns. The set of VMs is fixed when the host starts, so every row has the header's columns;
//! a cell the JSON has as `null` (no limit, no rate yet, no exit code) is empty.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use serde_json::Value;

use super::supervisor::HostRow;
use crate::files::{self, FileError};

/// The CSV file being written.
pub struct CsvLog {
    out: ::csv::Writer<File>,
    /// The header's columns, set by the first row.
    columns: Option<Vec<String>>,
}

impl CsvLog {
    /// Creates (or truncates) the file at `path`, refusing anything but a regular file (see
    /// [`files::create_stream`]); called before any VM starts.
    pub fn create(path: &Path) -> Result<Self, FileError> {
        Ok(CsvLog {
            out: ::csv::Writer::from_writer(files::create_stream(path)?),
            columns: None,
        })
    }

    /// Writes one period's row (the header first, with the first row), and flushes it. Each cell
    /// goes under its column; a column the row lacks (none while the VMs are fixed) is empty.
    pub fn row(&mut self, row: &HostRow) -> std::io::Result<()> {
        self.row_at(row, std::time::SystemTime::now())
    }

    /// [`CsvLog::row`], stamped with the wall-clock time `at`.
    fn row_at(&mut self, row: &HostRow, at: std::time::SystemTime) -> std::io::Result<()> {
        let mut cells = cells(row);
        cells.insert(0, ("timestamp".into(), crate::units::rfc3339_utc(at)));
        let columns = match &self.columns {
            Some(c) => c,
            None => {
                let c: Vec<String> = cells.iter().map(|(c, _)| c.clone()).collect();
                self.out.write_record(&c)?;
                self.columns.insert(c)
            }
        };
        let values: HashMap<&str, &str> = cells
            .iter()
            .map(|(c, v)| (c.as_str(), v.as_str()))
            .collect();
        self.out.write_record(
            columns
                .iter()
                .map(|c| values.get(c.as_str()).copied().unwrap_or("")),
        )?;
        self.out.flush()
    }
}

/// A JSON field name as a column's field: the `mib` unit spelt `MiB` (as `run --csv` spells it).
fn field_name(key: &str) -> String {
    crate::output::csv::column_name(key)
}

/// One cell: `null` is empty, a string is itself, anything else its JSON text.
fn cell(v: &Value) -> String {
    crate::output::csv::cell(Some(v))
}

/// Appends the fields of `v` under `prefix`, nested objects flattened with `_`.
fn flatten(prefix: &str, key: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}_{k}")
                };
                flatten(prefix, &key, v, out);
            }
        }
        _ => out.push((format!("{prefix}{}", field_name(key)), cell(v))),
    }
}

/// A period's (column, cell) pairs, in the header's order.
pub fn cells(row: &HostRow) -> Vec<(String, String)> {
    let mut out = Vec::new();
    // A HostRow always serialises (plain data, string keys).
    let Ok(Value::Object(top)) = serde_json::to_value(row) else {
        return out;
    };
    for (k, v) in &top {
        match k.as_str() {
            "host" => flatten("\\\\host\\", "", v, &mut out),
            "vms" => {
                for vm in v.as_array().into_iter().flatten() {
                    let Value::Object(fields) = vm else { continue };
                    let name = fields.get("name").map(cell).unwrap_or_default();
                    let prefix = format!("\\\\vm({name})\\");
                    for (k, v) in fields {
                        if k != "name" {
                            flatten(&prefix, k, v, &mut out);
                        }
                    }
                }
            }
            _ => flatten("", k, v, &mut out),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing;

    fn read(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
        let mut rd = ::csv::Reader::from_path(path).unwrap();
        let header = rd.headers().unwrap().iter().map(String::from).collect();
        let records = rd
            .records()
            .map(|r| r.unwrap().iter().map(String::from).collect())
            .collect();
        (header, records)
    }

    #[test]
    fn one_row_per_period_with_a_column_per_vm_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.csv");
        let rows = testing::rows(4);
        let mut log = CsvLog::create(&path).unwrap();
        let start = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_748_779_200);
        for (i, r) in rows.iter().enumerate() {
            let at = start + std::time::Duration::from_millis(500 * i as u64);
            log.row_at(r, at).unwrap();
        }
        drop(log);
        let (header, records) = read(&path);
        assert_eq!(records.len(), rows.len());
        assert_eq!(
            &header[..4],
            ["timestamp", "schema_version", "time_s", "period"]
        );
        assert_eq!(records[1][0], "2025-06-01T12:00:00.500Z");
        assert_eq!(records[1][1], crate::row::SCHEMA_VERSION.to_string());
        for col in [
            "\\\\host\\budget_MiB",
            "\\\\host\\free_MiB",
            "\\\\host\\state",
            "\\\\host\\transitions",
            "\\\\vm(web)\\target_MiB",
            "\\\\vm(web)\\granted_MiB",
            "\\\\vm(db)\\active_MiB",
            "\\\\vm(db)\\active_source",
            "\\\\vm(db)\\active_pct",
            "\\\\vm(db)\\limit_MiB",
            "\\\\vm(db)\\swap_target_MiB",
        ] {
            assert!(header.iter().any(|h| h == col), "no {col} in {header:?}");
        }
        assert!(!header.iter().any(|h| h.ends_with("\\name")), "{header:?}");
        let at =
            |rec: &[String], col: &str| rec[header.iter().position(|h| h == col).unwrap()].clone();
        // Every cell is its JSON value; nulls are empty.
        for (r, rec) in rows.iter().zip(&records) {
            assert_eq!(rec.len(), header.len());
            assert_eq!(at(rec, "period"), r.period.to_string());
            assert_eq!(
                at(rec, "\\\\host\\budget_MiB").parse::<f64>().unwrap(),
                r.host.budget_mib
            );
            assert_eq!(at(rec, "\\\\host\\state"), r.host.state.as_str());
            for v in &r.vms {
                let col = |f: &str| at(rec, &format!("\\\\vm({})\\{f}", v.name));
                assert_eq!(col("target_MiB").parse::<f64>().unwrap(), v.target_mib);
                assert_eq!(col("granted_MiB").parse::<f64>().unwrap(), v.granted_mib);
                assert_eq!(col("status"), v.status);
                assert_eq!(
                    col("limit_MiB"),
                    v.limit_mib
                        .map_or(String::new(), |l| Value::from(l).to_string())
                );
            }
        }
        let last = records.last().unwrap();
        assert_eq!(at(last, "\\\\vm(db)\\exit_code"), "0");
        assert_eq!(at(last, "\\\\vm(db)\\rate"), "");
        assert_eq!(at(&records[0], "\\\\vm(web)\\limit_MiB"), "");
    }

    #[test]
    fn a_vm_named_host_keeps_its_own_columns() {
        let mut r = testing::rows(1).remove(0);
        r.vms[0].name = "host".into();
        let cells = cells(&r);
        let names: Vec<&str> = cells.iter().map(|(c, _)| c.as_str()).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(names.contains(&"\\\\vm(host)\\target_MiB"));
        assert!(names.contains(&"\\\\host\\budget_MiB"));
    }

    #[test]
    fn a_bad_path_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.path().join("link.csv");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = CsvLog::create(&link).err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let e = CsvLog::create(dir.path()).err().unwrap().to_string();
        assert!(e.contains("directory"), "{e}");
    }
}
