//! Issue: active memory by random write-protect sampling, with confidence intervals, checked
//! against the guest's exact truth.

mod common;

use std::time::Duration;

#[test]
fn write_working_set_estimate_covers_the_truth() {
    if !common::kvm("write_working_set_estimate_covers_the_truth") {
        return;
    }
    // 25% of a 256 MiB guest written sequentially, over and over, for 4 s in 100 ms intervals. The
    // first pass (first touches, ~13-22 us a page on this host) is a phase of its own, so every
    // interval of the timed phase rewrites already-backed pages.
    let mut cfg = common::config("alloc 64M; touch 64M write; touch 64M write 4s", 256 << 20);
    cfg.interval = Duration::from_millis(100);
    cfg.samples = 1000;
    // The write estimator alone (the access sampler's traps would slow the guest's passes).
    cfg.access_samples = 0;
    let (_, rows) = common::run_cfg(cfg).unwrap();
    let rows = common::inside(&rows, "touch 64M write 4s");
    assert!(
        rows.len() >= 30,
        "intervals inside the phase: {}",
        rows.len()
    );
    let mut covered = 0;
    for r in &rows {
        let a = r.active_writes.as_ref().unwrap();
        let t = r.truth.as_ref().unwrap();
        assert_eq!(a.n, 1000);
        // Usually every page in each interval; a loaded host may manage less of a pass. The
        // estimate is checked against whatever the guest wrote.
        assert!(
            t.written_pages > 16 * 256 && t.written_pages <= 64 * 256,
            "{t:?}"
        );
        if a.ci_low_mib <= t.written_mib && t.written_mib <= a.ci_high_mib {
            covered += 1;
        }
    }
    // Each 95% Wilson interval covers the true fraction with probability about 0.95, independently
    // across intervals (fresh samples). With k >= 30 intervals, covered ~ Binomial(k, 0.95): mean
    // 0.95k, sd <= 0.04k; asking for 80% is more than 3.7 sd below the mean (p < 1e-3), while an
    // estimator that is wrong (biased by even 3% of RAM) would fail it.
    let k = rows.len();
    assert!(
        covered * 100 >= k * 80,
        "95% CIs covered the truth in {covered} of {k} intervals"
    );
}

#[test]
fn idle_guest_estimate_is_near_zero() {
    if !common::kvm("idle_guest_estimate_is_near_zero") {
        return;
    }
    let mut cfg = common::config("idle 2s", 256 << 20);
    cfg.interval = Duration::from_millis(200);
    let (_, rows) = common::run_cfg(cfg).unwrap();
    let inside = common::inside(&rows, "idle");
    assert!(inside.len() >= 5);
    for r in inside {
        let a = r.active_writes.as_ref().unwrap();
        // The idle guest writes only a few kernel pages (stack, messages): far below 1% of RAM.
        assert!(a.estimate_mib <= 2.56, "{a:?}");
        assert!(a.ci_low_mib <= 0.5, "{a:?}");
        assert_eq!(r.truth.as_ref().unwrap().written_pages, 0);
    }
}

#[test]
fn sampler_survives_a_guest_that_exits_mid_interval() {
    if !common::kvm("sampler_survives_a_guest_that_exits_mid_interval") {
        return;
    }
    let mut cfg = common::config(
        "alloc 32M; touch 32M write; touch 32M write 300ms",
        64 << 20,
    );
    cfg.interval = Duration::from_secs(10);
    let (s, rows) = common::run_cfg(cfg).unwrap();
    assert!(s.elapsed_s < 10.0);
    let last = rows.last().unwrap();
    assert_eq!(last.end, Some(memvisor::row::EndReason::Done));
    let a = last
        .active_writes
        .as_ref()
        .expect("the partial interval still gets an estimate");
    // One interval only: every write was a first write, counted exactly, so nothing was sampled
    // (the stratum of pages written before was empty).
    assert_eq!(a.n, 0);
    let t = last.truth.as_ref().unwrap();
    assert_eq!(t.written_pages, 32 * 256);
    assert!(a.exact_mib >= 32.0 && a.exact_mib < 33.0, "{a:?}");
    assert!(a.ci_low_mib <= a.estimate_mib && a.estimate_mib <= a.ci_high_mib);
    assert!(
        a.ci_low_mib <= t.written_mib + 1.0 && t.written_mib <= a.ci_high_mib,
        "{a:?}"
    );
}

#[test]
fn sampling_can_be_turned_off() {
    if !common::kvm("sampling_can_be_turned_off") {
        return;
    }
    let mut cfg = common::config("alloc 8M; touch 8M write", 32 << 20);
    cfg.no_sampling = true;
    let (_, rows) = common::run_cfg(cfg).unwrap();
    assert!(!rows.is_empty(), "a run has at least its last row");
    assert!(rows.iter().all(|r| r.active_writes.is_none()));
    // The host side is still measured without sampling.
    let last = rows.last().unwrap();
    assert!(last.host.as_ref().unwrap().backed_pages >= 8 * 256);
}
