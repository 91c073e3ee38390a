//! The write estimate under a large access sample, in a test binary of its own: 5000 traps per
//! 100 ms interval take most of a core, and running beside the other access tests (cargo runs a
//! binary's tests in parallel threads) would starve their guests.

mod common;

use std::time::Duration;

/// A large access sample moves most of a small heap out and back every interval. A page moved
/// back untouched has no KVM mapping, and KVM maps it writable on the guest's next read, logging
/// the read as a write, unless the page came back write-protected: before it did, this run's
/// write estimate was 5-9 MiB per interval against a truth of 0 (80-140 of the 1000 write-sampled
/// pages dirty, all moved back untouched 2-9 intervals before).
#[test]
fn a_large_access_sample_does_not_pass_reads_for_writes() {
    if !common::kvm("a_large_access_sample_does_not_pass_reads_for_writes") {
        return;
    }
    // 64 MiB written, then only read at random: 5000 of its 16384 pages are moved out each
    // 100 ms interval, so within a few intervals nearly every page has been moved back untouched.
    let mut opts = common::config(
        "alloc 64M; touch 64M write; touch 64M read random 3s",
        256 << 20,
    );
    opts.access_samples = 5000;
    opts.interval = Duration::from_millis(100);
    let (_, rows) = common::run_cfg(opts).unwrap();
    let rows = common::inside(&rows, "touch 64M read random");
    assert!(
        rows.len() >= 15,
        "intervals inside the phase: {}",
        rows.len()
    );
    let mut errors = Vec::new();
    for r in &rows {
        let a = r.active.as_ref().expect("an access estimate");
        let w = r.active_writes.as_ref().expect("a write estimate");
        // On a loaded host a row can leave before its truth (after its grace): not compared.
        let Some(t) = r.truth.as_ref() else {
            continue;
        };
        assert_eq!(t.written_pages, 0);
        assert_eq!(a.n, 5000, "{a:?}");
        assert!(a.t > 0, "the guest reads while sampled: {a:?}");
        errors.push(w.estimate_mib - t.written_mib);
    }
    // The guest's own bookkeeping (stack, messages: a handful of pages) is written every
    // interval and is not in the heap's truth; a false write per 1000 sampled pages is 0.06 MiB
    // here. The defect gave 5-9 MiB in every interval.
    assert!(
        errors.len() >= 10,
        "rows with the guest's truth: {}",
        errors.len()
    );
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    assert!(
        mean < 0.5,
        "mean write error {mean:.2} MiB over a read-only phase: {errors:.2?}"
    );
}
