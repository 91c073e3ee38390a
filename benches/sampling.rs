//! Active-memory sampling benchmarks (`make bench`): accuracy against the guest's truth, overhead
//! on the guest's work rate, and the cost of one sampling round by guest size.
//!
//! `cargo bench --bench sampling [-- sizes|cost|accuracy|overhead]`

mod common;

use std::time::{Duration, Instant};

use memvisor::kvm::vm::Vm;
use memvisor::memory::GuestRam;
use memvisor::observe::sampler::Sampler;
use memvisor::row::Row;
use memvisor::units::PAGE_SIZE;
use memvisor::vmm::config::{RunConfig, RunOptions};

use common::{mean_se, median, run_rows};

const GIB: u64 = 1 << 30;

fn config(spec: &str, mem: u64, interval: Duration, samples: Option<u64>, seed: u64) -> RunConfig {
    let opts = RunOptions {
        workload: spec.into(),
        mem,
        interval,
        samples: samples.unwrap_or(1),
        no_sampling: samples.is_none(),
        // The write sampler alone: the access sampler has its own bench (benches/access.rs).
        access_samples: 0,
        seed: Some(seed),
        timeout: Some(Duration::from_secs(600)),
        ..RunOptions::default()
    };
    RunConfig::new(opts).expect("bench options are valid")
}

fn accuracy() {
    let mem = GIB;
    let n = 1000u64;
    let interval = Duration::from_millis(250);
    let intervals = 34u64;
    println!("## Accuracy: 1 GiB guest, n = {n}, interval {interval:?}, sequential writes over W");
    println!();
    println!(
        "| W | truth (MiB) | intervals | mean error (MiB) | RMS error (MiB) | mean abs error (MiB) | binomial sd (MiB) | expected mean abs (MiB) | CI coverage |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for pct in [5u64, 25, 50, 90] {
        let ws = (mem * pct / 100) / (2 << 20) * (2 << 20);
        let dur = interval * intervals as u32;
        let spec = format!(
            "alloc {}K; touch {}K write {}ms",
            ws / 1024,
            ws / 1024,
            dur.as_millis()
        );
        let (_, rows) = run_rows(config(&spec, mem, interval, Some(n), 42 + pct));
        // Only intervals that lie wholly inside the touch phase (skip its first two and last one).
        let inside: Vec<&Row> = rows
            .iter()
            .filter(|r| r.phase.starts_with("touch") && r.end.is_none())
            .collect();
        let inside = &inside[2.min(inside.len())..inside.len().saturating_sub(1)];
        let mut errs = Vec::new();
        let mut covered = 0usize;
        let mut truth_mib = 0.0;
        for r in inside {
            let (Some(a), Some(t)) = (&r.active_writes, &r.truth) else {
                continue;
            };
            truth_mib = t.written_mib;
            errs.push(a.estimate_mib - t.written_mib);
            if a.ci_low_mib <= t.written_mib && t.written_mib <= a.ci_high_mib {
                covered += 1;
            }
        }
        let k = errs.len().max(1) as f64;
        let mean = errs.iter().sum::<f64>() / k;
        let rms = (errs.iter().map(|e| e * e).sum::<f64>() / k).sqrt();
        let mae = errs.iter().map(|e| e.abs()).sum::<f64>() / k;
        let p = truth_mib / 1024.0;
        let sd = (p * (1.0 - p) / n as f64).sqrt() * 1024.0;
        println!(
            "| {pct}% | {truth_mib:.1} | {} | {mean:+.2} | {rms:.2} | {mae:.2} | {sd:.2} | {:.2} | {:.1}% |",
            errs.len(),
            sd * (2.0 / std::f64::consts::PI).sqrt(),
            100.0 * covered as f64 / k
        );
    }
    println!();
}

/// Guest rates (M accesses/s) of the timed phase's whole intervals, grouped by sample size.
fn rates_by_n(rows: &[Row], phase: &str, cycle: &[Option<u64>]) -> Vec<Vec<f64>> {
    let timed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.phase.starts_with(phase) && r.end.is_none())
        .collect();
    // Drop the first and last: they straddle the phase boundaries.
    let timed = &timed[1.min(timed.len())..timed.len().saturating_sub(1)];
    cycle
        .iter()
        .map(|n| {
            timed
                .iter()
                .filter(|r| r.active_writes.as_ref().map(|a| a.n) == *n)
                .filter_map(|r| r.truth.as_ref().map(|t| t.rate / 1e6))
                .collect()
        })
        .collect()
}

fn overhead() {
    let mem = GIB;
    let pages = mem / PAGE_SIZE;

    // 1. Direct: one run, the sample size cycling per interval, so every configuration runs in
    //    the same VM, interleaved, and slow host-level drift cancels out.
    let cycle: [Option<u64>; 4] = [None, Some(100), Some(1000), Some(10000)];
    let rounds = 12u32;
    let secs = rounds * cycle.len() as u32 + 2;
    let spec = format!("alloc 512M; touch 512M write; touch 512M write random {secs}s");
    println!(
        "## Overhead: guest work rate, random writes over 512 MiB of a 1 GiB guest, interval 1 s"
    );
    println!();
    println!(
        "Direct: one run of {secs} s; the sample size cycles per interval (off, 100, 1000, 10000). Rate = the guest's own page accesses per second in an interval; mean ± standard error over {rounds} intervals each."
    );
    println!();
    println!("| sampling | intervals | rate (M accesses/s) | vs off |");
    println!("|---|---|---|---|");
    let cfg = config(&spec, mem, Duration::from_secs(1), None, 7)
        .with_sample_cycle(&cycle)
        .expect("sample sizes fit");
    let (_, rows) = run_rows(cfg);
    let rates = rates_by_n(&rows, "touch 512M write random", &cycle);
    let (off, _) = mean_se(&rates[0]);
    for (n, v) in cycle.iter().zip(&rates) {
        let (m, se) = mean_se(v);
        println!(
            "| {} | {} | {m:.2} ± {se:.2} | {:+.1}% ± {:.1}% |",
            n.map(|n| format!("n = {n}"))
                .unwrap_or_else(|| "off".into()),
            v.len(),
            100.0 * (m - off) / off,
            100.0 * se / off
        );
    }
    println!();

    // 2. Accounting: the cost of one write-protect fault, measured in the same way with every page
    //    re-protected on alternate intervals (sequential writes: each written page faults once).
    let cycle2 = [None, Some(pages)];
    let spec2 = "alloc 512M; touch 512M write; touch 512M write 22s";
    let cfg = config(spec2, mem, Duration::from_secs(1), None, 9)
        .with_sample_cycle(&cycle2)
        .expect("sample sizes fit");
    let (_, rows) = run_rows(cfg);
    let rates2 = rates_by_n(&rows, "touch 512M write 22s", &cycle2);
    let (r_off, _) = mean_se(&rates2[0]);
    let (r_all, _) = mean_se(&rates2[1]);
    let faults: Vec<f64> = rows
        .iter()
        .filter(|r| r.phase.starts_with("touch 512M write 22s") && r.end.is_none())
        .filter_map(|r| r.active_writes.as_ref().map(|a| a.t as f64))
        .collect();
    let (t_all, _) = mean_se(&faults);
    // Time lost per interval = 1 s x (1 - r_all / r_off), spread over t_all faults.
    let fault_us = 1e6 * (1.0 - r_all / r_off) / t_all;
    println!(
        "Accounting: with all {pages} pages re-protected every other interval, {t_all:.0} faults per interval cut the rate from {r_off:.1} to {r_all:.1} M/s: one write-protect fault costs about {fault_us:.1} µs here. A sampled page costs at most one fault per interval, so with a fraction f of RAM written per interval sampling costs about n × f × {fault_us:.1} µs per second plus one sampling round (see the cost table):"
    );
    println!();
    println!("| sampling | faults per interval at f = 0.5 | predicted overhead |");
    println!("|---|---|---|");
    for n in [100u64, 1000, 10000] {
        let f = n as f64 * 0.5;
        println!("| n = {n} | {f:.0} | {:.2}% |", 100.0 * f * fault_us / 1e6);
    }
    println!();
}

fn cost() {
    println!("## Cost of one sampling round (n = 1000), median of 50, microseconds");
    println!();
    println!(
        "| guest | GET_DIRTY_LOG | count t | pick sample + mask | CLEAR_DIRTY_LOG | round total |"
    );
    println!("|---|---|---|---|---|---|");
    for gib in [1u64, 4, 16, 64] {
        let vm = Vm::new(GuestRam::new(gib * GIB, false).expect("guest RAM")).expect("VM");
        let pages = vm.ram().size() / PAGE_SIZE;
        let mut sampler = Sampler::new(1000, pages, Some(1)).expect("sampler");
        let mut mask = vec![0u64; pages.div_ceil(64) as usize];
        let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..50 {
            let a = Instant::now();
            let (dirty, _) = vm.dirty_log().expect("dirty log");
            let b = Instant::now();
            let touched = sampler.count_touched(&dirty);
            std::hint::black_box(touched);
            let c = Instant::now();
            sampler.unmask_from(&mut mask);
            sampler.arm();
            sampler.mask_into(&mut mask);
            let d = Instant::now();
            vm.clear_dirty(&mask).expect("clear");
            let e = Instant::now();
            for (i, (x, y)) in [(a, b), (b, c), (c, d), (d, e), (a, e)].iter().enumerate() {
                t[i].push((*y - *x).as_secs_f64() * 1e6);
            }
        }
        println!(
            "| {gib} GiB | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            median(&mut t[0]),
            median(&mut t[1]),
            median(&mut t[2]),
            median(&mut t[3]),
            median(&mut t[4])
        );
    }
    println!();
}

fn sizes() {
    println!(
        "## Set-up time and VMM overhead by guest size (workload: alloc 256M; touch 256M write)"
    );
    println!();
    println!(
        "| guest | set-up to first instruction (ms) | backed (MiB) | VMM overhead (MiB) | host usage (MiB) | untouched (MiB) |"
    );
    println!("|---|---|---|---|---|---|");
    for gib in [1u64, 4, 16, 64] {
        let (s, rows) = run_rows(config(
            "alloc 256M; touch 256M write",
            gib * GIB,
            Duration::from_secs(1),
            Some(1000),
            3,
        ));
        let h = rows
            .last()
            .and_then(|r| r.host.clone())
            .expect("a final row");
        println!(
            "| {gib} GiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.setup_ms, h.backed_mib, h.overhead_mib, h.host_mib, h.untouched_mib
        );
    }
    println!();
}

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("sampling bench skipped: /dev/kvm is absent");
        return;
    }
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if want("sizes") {
        sizes();
    }
    if want("cost") {
        cost();
    }
    if want("accuracy") {
        accuracy();
    }
    if want("overhead") {
        overhead();
    }
}
