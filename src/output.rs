//! Rendering rows for people (a fixed-width table) and for scripts (one JSON object per line).

use crate::usage::Row;

/// The table's two header lines.
pub fn table_header() -> String {
    let l1 = format!(
        "{:>6} {:<24} {:>6} | {:>13} | {:>13} | {:<54} | {:<48} | {:<20}",
        "",
        "",
        "",
        "guest's view",
        "guest truth",
        "host usage (MiB)",
        "active (writes only), MiB",
        "balloon, guest stats"
    );
    let l2 = format!(
        "{:>6} {:<24} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} {:>5} {:>6} {:>5} {:>5} {:>5} {:>5} | {:>6} {:>15} {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6}",
        "time",
        "phase",
        "cfg",
        "alloc",
        "free",
        "touch",
        "write",
        "host",
        "backed",
        "ovhd",
        "untch",
        "zero",
        "swap",
        "shard",
        "rel",
        "est",
        "95% CI",
        "fast",
        "slow",
        "max",
        "err",
        "balln",
        "gfree",
        "gavail"
    );
    format!("{l1}\n{l2}")
}

fn num(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

/// One table line.
pub fn table_row(r: &Row) -> String {
    let mut phase = r.phase.clone();
    if phase.len() > 24 {
        phase.truncate(23);
        phase.push('~');
    }
    let t = r.truth.as_ref();
    let h = r.host.as_ref();
    let a = r.active.as_ref();
    let bal = r.balloon.as_ref();
    let gs = bal.and_then(|b| b.guest_stats.as_ref());
    let ci = a
        .map(|a| format!("{:.1}-{:.1}", a.ci_low_mib, a.ci_high_mib))
        .unwrap_or_else(|| "-".into());
    format!(
        "{:>6.1} {:<24} {:>6.0} | {:>6.1} {:>6.1} | {:>6} {:>6} | {:>6} {:>6} {:>5} {:>6} {:>5} {:>5} {:>5} {:>5} | {:>6} {:>15} {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6}{}",
        r.time_s,
        phase,
        r.configured_mib,
        r.guest.allocated_mib,
        r.guest.free_mib,
        num(t.map(|t| t.touched_mib)),
        num(t.map(|t| t.written_mib)),
        num(h.map(|h| h.host_mib)),
        num(h.map(|h| h.backed_mib)),
        num(h.map(|h| h.overhead_mib)),
        num(h.map(|h| h.untouched_mib)),
        num(h.map(|h| h.zero_mib)),
        num(h.map(|h| h.swapped_mib)),
        num(h.map(|h| h.shared_mib)),
        num(h.map(|h| h.released_mib)),
        num(a.map(|a| a.estimate_mib)),
        ci,
        num(a.map(|a| a.fast_mib)),
        num(a.map(|a| a.slow_mib)),
        num(a.map(|a| a.max_mib)),
        num(a.and_then(|a| a.error_mib)),
        num(bal.map(|b| b.balloon_mib)),
        num(gs.and_then(|g| g.free_mib)),
        num(gs.and_then(|g| g.available_mib)),
        match r.end {
            Some(crate::usage::EndReason::Done) => "  (end)".to_string(),
            Some(why) if r.guest.out_of_memory => {
                format!("  (end: {}: the guest is out of memory)", why.as_str())
            }
            Some(why) => format!("  (end: {})", why.as_str()),
            None => String::new(),
        }
    )
}

/// One JSON line.
pub fn json_row(r: &Row) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
