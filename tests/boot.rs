//! Issue: boot the tiny test guest. Every phase runs and reports; the guest's own accounting
//! (its kernel's free and allocated lists) matches the workload spec.

mod common;

use memvisor::contract::workload::{DEFAULT_SPEC, Workload};
use memvisor::vmm::RunSummary;

/// Checks every phase against the spec: started, ended, ok, and the lists after it.
fn assert_accounting(spec: &str, mem: u64, s: &RunSummary) {
    let w = Workload::parse(spec, mem).unwrap();
    let boot = s.boot.expect("the guest kernel reported BOOT");
    assert!(boot.pool_pages > 0);
    assert_eq!(boot.pool_start % (2 << 20), 0, "pool is 2 MiB aligned");
    assert_eq!(s.phases.len(), w.phases.len());
    for (i, p) in s.phases.iter().enumerate() {
        assert!(p.started && p.ended, "phase {i} ({}) ran: {p:?}", p.name);
        assert_eq!(p.status, 0, "phase {i} ({}) ok", p.name);
        let heap = w.heap_after(i).unwrap();
        assert_eq!(p.heap_pages, heap, "heap after phase {i} ({})", p.name);
        assert_eq!(
            p.allocated_pages, heap,
            "allocated list after phase {i} ({}) holds exactly the heap",
            p.name
        );
        assert_eq!(
            p.allocated_pages + p.free_pages,
            boot.pool_pages,
            "free + allocated = pool after phase {i}"
        );
    }
    assert_eq!(
        Some(s.guest.allocated_pages),
        w.heap_after(w.phases.len() - 1)
    );
    assert_eq!(s.report_errors, 0);
    assert_eq!(s.unhandled_exits, 0);
}

#[test]
fn default_workload_tells_the_whole_story() {
    if !common::kvm("default_workload_tells_the_whole_story") {
        return;
    }
    let mem = 256 << 20;
    let mut cfg = common::config(DEFAULT_SPEC, mem);
    cfg.interval = std::time::Duration::from_secs(1);
    let (s, rows) = common::run_cfg(cfg).expect("default workload runs");
    assert_accounting(DEFAULT_SPEC, mem, &s);
    // alloc 192M; touch 64M write 3s; free 160M; idle 3s; touch 32M write 3s
    let touch = &s.phases[1];
    assert_eq!(touch.touched_pages, 64 * 256);
    assert_eq!(touch.written_pages, 64 * 256);
    assert_eq!(s.phases[3].touched_pages, 0, "idle touches nothing");
    assert_eq!(s.phases[4].written_pages, 32 * 256);
    assert!(rows.len() >= 8, "about one row per second: {}", rows.len());
    assert_eq!(
        rows.last().unwrap().end,
        Some(memvisor::row::EndReason::Done)
    );
}

#[test]
fn one_pass_touches_are_exact() {
    if !common::kvm("one_pass_touches_are_exact") {
        return;
    }
    let spec = "alloc 16M; touch 16M write; touch 12M read; free 8M; touch 8M write; alloc 4M; touch 12M read";
    let mem = 64 << 20;
    let (s, _) = common::run_ok(spec, mem);
    assert_accounting(spec, mem, &s);
    let p = &s.phases;
    assert_eq!((p[1].touched_pages, p[1].written_pages), (4096, 4096));
    assert_eq!((p[2].touched_pages, p[2].written_pages), (3072, 0));
    assert_eq!((p[4].touched_pages, p[4].written_pages), (2048, 2048));
    assert_eq!((p[6].touched_pages, p[6].written_pages), (3072, 0));
    assert_eq!(p[1].iterations, 4096);
}

#[test]
fn random_hot_cold_workload_runs() {
    if !common::kvm("random_hot_cold_workload_runs") {
        return;
    }
    // The first pass backs the pages (first touches cost 13-22 us each here), so the timed phase
    // spends its 400 ms on accesses.
    let spec = "alloc 32M; touch 32M write; touch 32M write random 400ms hot 10%:90%; touch 8M read random";
    let mem = 128 << 20;
    let (s, rows) = common::run_ok(spec, mem);
    assert_accounting(spec, mem, &s);
    let hot = &s.phases[2];
    // 400 ms of random writes over 8192 backed pages visits every page many times over.
    assert_eq!(hot.touched_pages, 8192);
    assert_eq!(hot.written_pages, 8192);
    assert!(hot.iterations > 8192 * 10, "iterations {}", hot.iterations);
    // A random one-pass read of 2048 pages makes 2048 accesses; distinct pages are fewer.
    let read = &s.phases[3];
    assert_eq!(read.iterations, 2048);
    assert_eq!(read.written_pages, 0);
    assert!(read.touched_pages > 1000 && read.touched_pages < 2048);
    // Interval truths add up: each interval reports at most the touched range.
    for r in &rows {
        if let Some(t) = &r.truth {
            assert!(t.touched_pages <= 8192, "{r:?}");
        }
    }
}

#[test]
fn idle_and_repeated_alloc_free_cycles() {
    if !common::kvm("idle_and_repeated_alloc_free_cycles") {
        return;
    }
    // One-pass touches: what they write is exact whatever the host's speed.
    let spec = "idle 300ms; alloc 8M; alloc 8M; touch 16M write; free 12M; alloc 20M; touch 24M write; free 24M; idle 300ms";
    let mem = 64 << 20;
    let (s, rows) = common::run_ok(spec, mem);
    assert_accounting(spec, mem, &s);
    assert_eq!(s.guest.allocated_pages, 0);
    assert_eq!(s.phases[6].written_pages, 24 * 256);
    assert!(
        s.phases[0].guest_seconds >= 0.29,
        "idle lasted {}",
        s.phases[0].guest_seconds
    );
    assert!(!rows.is_empty());
    // The guest read the VMM's clock (TIME hypercall) at each phase start: it never runs backwards,
    // the first idle shows in it, and it stays within the run.
    let starts: Vec<u64> = s.phases.iter().map(|p| p.vmm_start_ns).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    assert!(starts[1] - starts[0] >= 300_000_000, "{starts:?}");
    assert!(
        *starts.last().unwrap() <= (s.elapsed_s * 1e9) as u64,
        "{starts:?}"
    );
}

/// The guest's access generator (guest/app/app.c): xorshift64* seeded from the boot info's seed,
/// and a multiply-high mapping onto [0, n).
struct GuestRng(u64);

impl GuestRng {
    fn new(seed: u64) -> Self {
        let s = seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(0x632b_e59b_d9b4_e019);
        GuestRng(if s == 0 { 1 } else { s })
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

#[test]
fn random_truth_is_exact() {
    if !common::kvm("random_truth_is_exact") {
        return;
    }
    // One random pass: 4096 accesses over 4096 pages, then 1000 over the first 1000. Replaying the
    // guest's generator gives the exact distinct counts the guest must report.
    let spec = "alloc 16M; touch 16M read random; touch 4000K write random";
    let mem = 64 << 20;
    let cfg = common::config(spec, mem); // seed 7
    let (s, _) = common::run_cfg(cfg).unwrap();
    let mut rng = GuestRng::new(7);
    let first: std::collections::HashSet<u64> = (0..4096).map(|_| rng.below(4096)).collect();
    let second: std::collections::HashSet<u64> = (0..1000).map(|_| rng.below(1000)).collect();
    assert_eq!(s.phases[1].touched_pages, first.len() as u64);
    assert_eq!(s.phases[1].written_pages, 0);
    assert_eq!(s.phases[2].touched_pages, second.len() as u64);
    assert_eq!(s.phases[2].written_pages, second.len() as u64);
    assert!(
        first.len() < 4096 && second.len() < 1000,
        "repeats happen, so this is not trivial"
    );
}
