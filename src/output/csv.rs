//! `--csv`: one header row, then one row per interval: the wall-clock `timestamp` (RFC 3339,
//! UTC, when the row was printed), the VM's name `vm` (`run --name`, default `vm`), then every
//! field of the JSON row, nested objects flattened with `_` (esxtop's batch-mode convention). A
//! nested field that repeats its section's name is not prefixed twice (`host_MiB`, not
//! `host_host_MiB`; `balloon_MiB`, not `balloon_balloon_MiB`). Units are in the header: a field
//! named `..._mib` in JSON is `..._MiB` here, `_s` is seconds, `_ms` milliseconds, `_pages` pages.
//! Written with the `csv` crate (its quoting of commas, quotes and line breaks).

use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::row::GuestStats;
use crate::row::{Active, BalloonView, Check, HostUsage, KsmKernel, Row, Swap, Truth, VmmWork};
use crate::units::rfc3339_utc;

/// A row with every optional section present, so that the header lists every column even when
/// the first interval lacks some (no truth yet, sampling off).
fn template() -> Row {
    Row {
        truth: Some(Truth::default()),
        host: Some(HostUsage {
            ksm: Some(KsmKernel::default()),
            ..HostUsage::default()
        }),
        active: Some(Active {
            error_mib: Some(0.0),
            ..Active::default()
        }),
        active_writes: Some(Active {
            error_mib: Some(0.0),
            dirty_rate_mib_s: Some(0.0),
            ..Active::default()
        }),
        balloon: Some(BalloonView {
            guest_stats: Some(GuestStats::default()),
            ..BalloonView::default()
        }),
        swap: Some(Swap {
            page_in_us_p50: Some(0.0),
            page_in_us_p99: Some(0.0),
            ..Swap::default()
        }),
        check: Some(Check::default()),
        vmm: Some(VmmWork::default()),
        ..Row::default()
    }
}

/// A nested field's flattened key: `section_field`, or `field` alone when it already begins with
/// the section's name (`host` + `host_mib` is `host_mib`).
fn nested_key(section: &str, field: &str) -> String {
    let repeats = field
        .strip_prefix(section)
        .is_some_and(|r| r.starts_with('_'));
    if section.is_empty() || repeats {
        field.to_string()
    } else {
        format!("{section}_{field}")
    }
}

/// Flattens nested JSON objects into `parent_child` keys, in field order.
fn flatten(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&nested_key(prefix, k), v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// The JSON keys of a row, flattened (the CSV columns before units are capitalised).
fn flat_fields(r: &Row) -> Map<String, Value> {
    let mut out = Map::new();
    // A Row always serialises (plain data, string keys).
    if let Ok(v) = serde_json::to_value(r) {
        flatten("", &v, &mut out);
    }
    out
}

/// A flattened JSON key as a column name: the `mib` unit is spelt `MiB`.
pub fn column_name(key: &str) -> String {
    key.split('_')
        .map(|part| if part == "mib" { "MiB" } else { part })
        .collect::<Vec<_>>()
        .join("_")
}

/// One CSV cell: `null` is empty, a string is itself, anything else its JSON text.
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// The flattened JSON keys of every column, in order: computed once, from the template.
fn keys() -> &'static [String] {
    static KEYS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| flat_fields(&template()).keys().cloned().collect());
    &KEYS
}

/// The columns before the row's fields.
const LEADING: [&str; 2] = ["timestamp", "vm"];

/// One CSV record as a line (without its line break), quoted by the csv crate.
fn record<I: IntoIterator<Item = S>, S: AsRef<[u8]>>(fields: I) -> String {
    let mut w = ::csv::WriterBuilder::new()
        .terminator(::csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    // Writing to memory fails only on a record of no field, which a row never is.
    let _ = w.write_record(fields);
    let bytes = w.into_inner().unwrap_or_default();
    let mut line = String::from_utf8_lossy(&bytes).into_owned();
    if line.ends_with('\n') {
        line.pop();
    }
    line
}

/// The header row.
pub fn header() -> String {
    record(
        LEADING
            .iter()
            .map(|c| c.to_string())
            .chain(keys().iter().map(|k| column_name(k))),
    )
}

/// One data row of VM `vm`, printed at `at`, in the header's column order (a missing section
/// leaves its cells empty).
pub fn row(r: &Row, vm: &str, at: SystemTime) -> String {
    let values = flat_fields(r);
    record(
        [rfc3339_utc(at), vm.to_string()]
            .into_iter()
            .chain(keys().iter().map(|k| cell(values.get(k)))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::GuestView;

    fn full_row() -> Row {
        let mut r = Row {
            schema_version: crate::row::SchemaVersion,
            time_s: 2.5,
            interval: 3,
            phase: "touch 4M, \"odd\" name".into(),
            end: Some(crate::row::EndReason::Done),
            length_s: 0.5,
            partial: true,
            paused_s: 0.25,
            configured_mib: 256.0,
            guest: GuestView {
                allocated_pages: 10,
                free_pages: 20,
                heap_pages: 10,
                allocated_mib: 0.0390625,
                free_mib: 0.078125,
                ..GuestView::default()
            },
            truth: None,
            host: Some(HostUsage {
                host_mib: 70.5,
                backed_mib: 64.25,
                shared_saved_mib: 1.5,
                ksm: Some(KsmKernel {
                    host_pages_sharing: 384,
                    ..KsmKernel::default()
                }),
                ..HostUsage::default()
            }),
            active: Some(Active {
                n: 200,
                t: 80,
                estimate_mib: 100.0,
                ..Active::default()
            }),
            reads_seen: true,
            balloon: Some(BalloonView {
                balloon_mib: 16.0,
                guest_stats: Some(GuestStats {
                    free_mib: Some(100.0),
                    source: "virtio-balloon stats queue".into(),
                    ..GuestStats::default()
                }),
                ..BalloonView::default()
            }),
            swap: Some(crate::row::Swap {
                swapped_mib: 24.0,
                page_ins: 3,
                page_in_us_p50: Some(12.5),
                out_ms: 41.5,
                in_ms: 0.25,
                ..crate::row::Swap::default()
            }),
            active_writes: Some(Active {
                n: 1000,
                t: 250,
                estimate_mib: 64.0,
                dirty_rate_mib_s: Some(64.0),
                ..Active::default()
            }),
            check: Some(Check {
                phase: "check 4M".into(),
                checked_pages: 1024,
                intact_pages: 1000,
                zero_pages: 24,
                intact_mib: 1000.0 / 256.0,
                zero_mib: 24.0 / 256.0,
            }),
            vmm: Some(VmmWork {
                work_ms: 1.25,
                ..VmmWork::default()
            }),
        };
        r.attach_truth(Truth {
            touched_pages: 3,
            written_mib: 60.0,
            ..Truth::default()
        });
        r
    }

    /// Parses `header\nrow` with the csv crate into (headers, record).
    fn parse(row_line: &str) -> (Vec<String>, Vec<String>) {
        let text = format!("{}\n{}\n", header(), row_line);
        let mut rd = ::csv::Reader::from_reader(text.as_bytes());
        let h = rd.headers().unwrap().iter().map(String::from).collect();
        let recs: Vec<_> = rd.records().collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 1);
        (h, recs[0].iter().map(String::from).collect())
    }

    /// When the test's rows were printed: 2025-06-01T12:00:00.250Z.
    fn at() -> SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_748_779_200_250)
    }

    #[test]
    fn columns_are_the_timestamp_the_name_and_the_flattened_json_fields_with_units() {
        let r = full_row();
        let (headers, values) = parse(&row(&r, "web, \"1\"", at()));
        assert_eq!(headers[..2], ["timestamp", "vm"]);
        assert_eq!(values[0], "2025-06-01T12:00:00.250Z");
        assert_eq!(values[1], "web, \"1\"");
        let flat = flat_fields(&r);
        let keys: Vec<String> = flat.keys().map(|k| k.to_lowercase()).collect();
        let lower: Vec<String> = headers[2..].iter().map(|h| h.to_lowercase()).collect();
        assert_eq!(lower, keys);
        for name in [
            "schema_version",
            "time_s",
            "host_MiB",
            "host_backed_MiB",
            "balloon_MiB",
            "balloon_target_MiB",
            "balloon_guest_stats_free_MiB",
            "active_writes_dirty_rate_MiB_s",
            "check_intact_pages",
            "check_zero_MiB",
            "vmm_work_ms",
            "swap_swapped_MiB",
            "swap_page_in_us_p99",
        ] {
            assert!(
                headers.iter().any(|h| h == name),
                "no {name} in {headers:?}"
            );
        }
        // No name repeats its section, and no two columns share a name.
        for h in &headers {
            let parts: Vec<&str> = h.split('_').collect();
            assert!(parts.windows(2).all(|w| w[0] != w[1]), "{h}");
        }
        let unique: std::collections::BTreeSet<&String> = headers.iter().collect();
        assert_eq!(unique.len(), headers.len());
        let at = |name: &str| &values[headers.iter().position(|h| h == name).unwrap()];
        assert_eq!(at("swap_out_ms"), "41.5");
        assert_eq!(at("swap_in_ms"), "0.25");
        assert_eq!(at("host_MiB"), "70.5");
        assert_eq!(at("balloon_MiB"), "16.0");
        assert_eq!(at("phase"), "touch 4M, \"odd\" name");
        for ((h, v), (k, json)) in headers[2..].iter().zip(&values[2..]).zip(&flat) {
            assert_eq!(v, &cell(Some(json)), "column {h} (JSON {k})");
        }
    }

    #[test]
    fn missing_sections_leave_empty_cells_in_place() {
        let r = Row {
            time_s: 1.0,
            phase: "idle 1s".into(),
            ..Row::default()
        };
        let (headers, values) = parse(&row(&r, "vm", at()));
        assert_eq!(headers.len(), values.len());
        let at = |name: &str| &values[headers.iter().position(|h| h == name).unwrap()];
        assert_eq!(at("time_s"), "1.0");
        assert_eq!(at("phase"), "idle 1s");
        assert_eq!(at("vm"), "vm");
        assert_eq!(at("host_backed_MiB"), "");
        assert_eq!(at("active_writes_estimate_MiB"), "");
        assert_eq!(at("truth_written_pages"), "");
        assert_eq!(at("check_intact_pages"), "");
    }
}
