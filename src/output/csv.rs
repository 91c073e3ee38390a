//! `--csv`: one header row, then one row per interval with every field of the JSON row, nested
//! objects flattened with `_` (esxtop's batch-mode convention). Units are in the header: a field
//! named `..._mib` in JSON is `..._MiB` here, `_s` is seconds, `_ms` milliseconds, `_pages`
//! pages.

use serde_json::{Map, Value};

use crate::row::GuestStats;
use crate::row::{Active, BalloonView, Check, HostUsage, KsmKernel, Row, Swap, Truth};

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
        ..Row::default()
    }
}

/// Flattens nested JSON objects into `parent_child` keys, in field order.
fn flatten(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}_{k}")
                };
                flatten(&key, v, out);
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
fn column_name(key: &str) -> String {
    key.split('_')
        .map(|part| if part == "mib" { "MiB" } else { part })
        .collect::<Vec<_>>()
        .join("_")
}

/// One CSV field: quoted when it holds a comma, quote or line break.
fn field(v: Option<&Value>) -> String {
    let s = match v {
        None | Some(Value::Null) => return String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The flattened JSON keys of every column, in order: computed once, from the template.
fn keys() -> &'static [String] {
    static KEYS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| flat_fields(&template()).keys().cloned().collect());
    &KEYS
}

/// The header row.
pub fn header() -> String {
    keys()
        .iter()
        .map(|k| column_name(k))
        .collect::<Vec<_>>()
        .join(",")
}

/// One data row, in the header's column order (a missing section leaves its cells empty).
pub fn row(r: &Row) -> String {
    let values = flat_fields(r);
    keys()
        .iter()
        .map(|k| field(values.get(k)))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::GuestView;

    fn full_row() -> Row {
        let mut r = Row {
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
                dirty_rate_mib_s: 64.0,
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

    #[test]
    fn columns_are_the_flattened_json_fields_with_units() {
        let r = full_row();
        let (headers, values) = parse(&row(&r));
        let flat = flat_fields(&r);
        let keys: Vec<String> = flat.keys().map(|k| k.to_lowercase()).collect();
        let lower: Vec<String> = headers.iter().map(|h| h.to_lowercase()).collect();
        assert_eq!(lower, keys);
        assert!(headers.contains(&"host_host_MiB".to_string()));
        assert!(headers.contains(&"active_writes_dirty_rate_MiB_s".to_string()));
        assert!(headers.contains(&"time_s".to_string()));
        assert!(headers.contains(&"check_intact_pages".to_string()));
        assert!(headers.contains(&"check_zero_MiB".to_string()));
        assert!(headers.contains(&"swap_swapped_MiB".to_string()));
        assert!(headers.contains(&"swap_page_in_us_p99".to_string()));
        let at = |name: &str| &values[headers.iter().position(|h| h == name).unwrap()];
        assert_eq!(at("swap_out_ms"), "41.5");
        assert_eq!(at("swap_in_ms"), "0.25");
        for ((h, v), (k, json)) in headers.iter().zip(&values).zip(&flat) {
            let expect = match json {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            assert_eq!(v, &expect, "column {h} (JSON {k})");
        }
    }

    #[test]
    fn missing_sections_leave_empty_cells_in_place() {
        let r = Row {
            time_s: 1.0,
            phase: "idle 1s".into(),
            ..Row::default()
        };
        let (headers, values) = parse(&row(&r));
        assert_eq!(headers.len(), values.len());
        let at = |name: &str| &values[headers.iter().position(|h| h == name).unwrap()];
        assert_eq!(at("time_s"), "1.0");
        assert_eq!(at("phase"), "idle 1s");
        assert_eq!(at("host_backed_MiB"), "");
        assert_eq!(at("active_writes_estimate_MiB"), "");
        assert_eq!(at("truth_written_pages"), "");
        assert_eq!(at("check_intact_pages"), "");
    }
}
