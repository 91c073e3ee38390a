//! What the benchmarks share (each bench is a crate of its own): running a guest to its end while
//! collecting its rows, and small statistics.
#![allow(dead_code)] // each bench uses a part

use memvisor::row::Row;
use memvisor::vmm::config::{Console, RunConfig};
use memvisor::vmm::{self, RunSummary};

/// Runs `cfg` to its end with the guest's console silenced; returns the summary and every row.
pub fn run_rows(mut cfg: RunConfig) -> (RunSummary, Vec<Row>) {
    cfg.console = Console::Discard;
    let mut rows = Vec::new();
    let s = vmm::run(cfg, &mut |r: &Row| {
        rows.push(r.clone());
        Ok(())
    })
    .expect("bench run");
    (s, rows)
}

/// Mean and standard error of the mean.
pub fn mean_se(v: &[f64]) -> (f64, f64) {
    let k = v.len() as f64;
    let m = v.iter().sum::<f64>() / k;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (k - 1.0).max(1.0);
    (m, (var / k).sqrt())
}

/// The median of `v` (sorted in place; the upper one of an even count), NaN when `v` is empty
/// (a table then shows that nothing was measured, not a zero).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
