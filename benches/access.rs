//! Access-sampler benchmarks (`make bench`): accuracy of the access and write estimates against the
//! guest's truth by access pattern, stratified against plain sampling on a sparse guest, the
//! guest's slowdown and first-touch cost, and the cost of one round by guest size.
//!
//! `cargo bench --bench access [-- accuracy|sparse|bias|overhead|trap|firsttouch|cost]`

mod common;

use std::time::{Duration, Instant};

use memvisor::memory::bitmap::{Bitmap, Ranks};
use memvisor::memory::{GuestMemory, GuestRam};
use memvisor::observe::access::{AccessSampler, Population};
use memvisor::row::{Active, Row};
use memvisor::units::PAGE_SIZE;
use memvisor::vmm;
use memvisor::vmm::config::{RunConfig, RunOptions};

use common::{mean_se, median, run_rows};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn options(spec: &str, mem: u64, interval: Duration, seed: u64) -> RunOptions {
    RunOptions {
        workload: spec.into(),
        mem,
        interval,
        seed: Some(seed),
        timeout: Some(Duration::from_secs(900)),
        ..RunOptions::default()
    }
}

fn run(opts: RunOptions) -> (vmm::RunSummary, Vec<Row>) {
    run_rows(RunConfig::new(opts).expect("bench options are valid"))
}

/// The name rows give phase `i` of `spec` (its canonical form).
fn phase_name(spec: &str, mem: u64, i: usize) -> String {
    memvisor::contract::workload::Workload::parse(spec, mem)
        .expect("bench spec parses")
        .phases[i]
        .to_string()
}

/// Rows wholly inside the phase named `phase` (its first two and last dropped).
fn inside<'a>(rows: &'a [Row], phase: &str) -> Vec<&'a Row> {
    let v: Vec<&Row> = rows
        .iter()
        .filter(|r| r.phase == phase && r.end.is_none())
        .collect();
    v[2.min(v.len())..v.len().saturating_sub(1)].to_vec()
}

/// Error statistics of an estimate against a truth, over intervals.
struct Errors {
    k: usize,
    truth: f64,
    mean: f64,
    rms: f64,
    mae: f64,
    /// The binomial expectation of the mean absolute error for the stratified form.
    expected_mae: f64,
    coverage: f64,
    /// The mean width of the 95% interval (MiB).
    ci_width: f64,
    /// The same, for pooling with other rows.
    pool: Pool,
}

/// Errors pooled over rows: coverage, and mean |error| over its expectation with that ratio's
/// standard error (|error| of a normal error has sd √(π/2 − 1) times its mean).
#[derive(Default)]
struct Pool {
    k: usize,
    /// Intervals covered, and the sums of |error|, of its expectation and of its square.
    covered: usize,
    sum_abs: f64,
    sum_expected: f64,
    sum_expected2: f64,
}

impl Pool {
    fn add(&mut self, p: &Pool) {
        self.k += p.k;
        self.covered += p.covered;
        self.sum_abs += p.sum_abs;
        self.sum_expected += p.sum_expected;
        self.sum_expected2 += p.sum_expected2;
    }

    fn cells(&self) -> String {
        if self.k == 0 {
            return " | ".into();
        }
        let ratio = self.sum_abs / self.sum_expected;
        let se = (std::f64::consts::PI / 2.0 - 1.0).sqrt() * self.sum_expected2.sqrt()
            / self.sum_expected;
        format!(
            "{:.1}% | {ratio:.2} ± {se:.2}",
            100.0 * self.covered as f64 / self.k as f64
        )
    }
}

fn errors(
    rows: &[&Row],
    est: impl Fn(&Row) -> Option<&Active>,
    truth: impl Fn(&Row) -> f64,
) -> Errors {
    let mut e = Vec::new();
    let mut covered = 0;
    let mut expected = 0.0;
    let mut expected2 = 0.0;
    let mut t_sum = 0.0;
    let mut width = 0.0;
    for r in rows {
        let (Some(a), Some(_)) = (est(r), &r.truth) else {
            continue;
        };
        let t = truth(r);
        t_sum += t;
        e.push(a.estimate_mib - t);
        width += a.ci_high_mib - a.ci_low_mib;
        if a.ci_low_mib <= t && t <= a.ci_high_mib {
            covered += 1;
        }
        // sd of the sampled part: N sqrt(p(1-p)/n) with the finite population correction, p
        // the stratum's true active fraction (from the guest's truth, less the exact part).
        let (n, big_n) = (a.n as f64, a.sampled_from_mib);
        if n > 0.0 && big_n > 0.0 {
            let pages = big_n * MIB as f64 / PAGE_SIZE as f64;
            let p = ((t - a.exact_mib) / big_n).clamp(0.0, 1.0);
            let fpc = if pages > 1.0 {
                ((pages - n) / (pages - 1.0)).max(0.0)
            } else {
                0.0
            };
            let m = big_n * (p * (1.0 - p) / n * fpc).sqrt() * (2.0 / std::f64::consts::PI).sqrt();
            expected += m;
            expected2 += m * m;
        }
    }
    let k = e.len().max(1) as f64;
    Errors {
        k: e.len(),
        truth: t_sum / k,
        mean: e.iter().sum::<f64>() / k,
        rms: (e.iter().map(|x| x * x).sum::<f64>() / k).sqrt(),
        mae: e.iter().map(|x| x.abs()).sum::<f64>() / k,
        expected_mae: expected / k,
        coverage: 100.0 * covered as f64 / k,
        ci_width: width / k,
        pool: Pool {
            k: e.len(),
            covered,
            sum_abs: e.iter().map(|x| x.abs()).sum(),
            sum_expected: expected,
            sum_expected2: expected2,
        },
    }
}

/// The access estimate's errors against the pages touched, and the write estimate's against
/// the pages written.
fn both_errors(rows: &[&Row]) -> (Errors, Errors) {
    (
        errors(
            rows,
            |r| r.active.as_ref(),
            |r| r.truth.as_ref().unwrap().touched_mib,
        ),
        errors(
            rows,
            |r| r.active_writes.as_ref(),
            |r| r.truth.as_ref().unwrap().written_mib,
        ),
    )
}

/// `patterns`: names of the patterns to run (all when empty).
fn accuracy(only: &[String]) {
    let mem = GIB;
    let interval = Duration::from_millis(250);
    let intervals = 100u32;
    let dur = interval * intervals;
    let d = RunOptions::default();
    println!(
        "## Accuracy: 1 GiB guest with 90% of it touched before, active on W; access n = {}, write n = {}, interval {interval:?}, {intervals} intervals per row",
        d.access_samples, d.samples
    );
    println!();
    println!(
        "| pattern | W | estimate | truth (MiB) | intervals | mean error | RMS error | mean abs error | expected mean abs | 95% CI coverage | mean 95% CI width |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut pools: Vec<(&str, Pool, Pool)> = Vec::new();
    for (i, (name, opts)) in [
        ("read", "read"),
        ("read random", "read random"),
        ("write", "write"),
        ("write random", "write random"),
        ("hot/cold read", "read random hot 20%:80%"),
        ("mixed", "mixed"),
        ("mixed random", "mixed random"),
    ]
    .into_iter()
    .enumerate()
    {
        let first = name.split(' ').next().unwrap_or(name);
        if !only.is_empty() && !only.iter().any(|c| c == first) {
            continue;
        }
        let (mut pa, mut pw) = (Pool::default(), Pool::default());
        for pct in [5u64, 25, 50, 90] {
            let ws = (mem * pct / 100) / (2 * MIB) * (2 * MIB) / 1024;
            // 90% of RAM touched before: the stratum the samples come from is that large, and
            // the guest is active on W of it.
            let all = (mem * 90 / 100) / (2 * MIB) * (2 * MIB) / 1024;
            let spec = format!(
                "alloc {all}K; touch {all}K write; touch {ws}K {opts} {}ms",
                dur.as_millis()
            );
            let timed = phase_name(&spec, mem, 2);
            // A seed of its own per row: the rows' sampling errors are independent.
            let seed = 42 + pct + 1000 * i as u64;
            let (_, rows) = run(options(&spec, mem, interval, seed));
            let rows = inside(&rows, &timed);
            let (a, w) = both_errors(&rows);
            pa.add(&a.pool);
            // The write estimate's rows with writes only: where the truth is 0 it has no
            // sampling noise to compare with.
            if w.truth > 0.0 {
                pw.add(&w.pool);
            }
            for (which, e) in [("access", a), ("writes", w)] {
                println!(
                    "| {name} | {pct}% | {which} | {:.1} | {} | {:+.2} | {:.2} | {:.2} | {:.2} | {:.1}% | {:.1} |",
                    e.truth, e.k, e.mean, e.rms, e.mae, e.expected_mae, e.coverage, e.ci_width
                );
            }
        }
        pools.push((name, pa, pw));
    }
    println!();
    println!("Per pattern, over its W (mean abs error / expected: ± its standard error):");
    println!();
    println!(
        "| pattern | access: coverage | access: mean abs error / expected | writes: coverage | writes: mean abs error / expected |"
    );
    println!("|---|---|---|---|---|");
    let (mut all_a, mut all_w) = (Pool::default(), Pool::default());
    for (name, pa, pw) in &pools {
        println!("| {name} | {} | {} |", pa.cells(), pw.cells());
        all_a.add(pa);
        all_w.add(pw);
    }
    println!(
        "| pooled ({} and {} intervals) | {} | {} |",
        all_a.k,
        all_w.k,
        all_a.cells(),
        all_w.cells()
    );
    println!();
}

fn sparse() {
    let mem = 16 * GIB;
    let interval = Duration::from_millis(250);
    println!(
        "## Sparse guest: 16 GiB that has written 512 MiB, then writes W of it at random, interval {interval:?}"
    );
    println!();
    println!(
        "| W | sampling | estimate | intervals | RMS error (MiB) | mean abs error (MiB) | 95% CI coverage |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    // All of the touched pages active (the sampled stratum has p = 1), and half of them.
    for ws in [512u64, 256] {
        let spec = format!("alloc 512M; touch 512M write; touch {ws}M write random 10s");
        let timed = phase_name(&spec, mem, 2);
        let mut rms = Vec::new();
        for plain in [false, true] {
            let mut o = options(&spec, mem, interval, 5);
            o.plain_sampling = plain;
            let (_, rows) = run(o);
            let rows = inside(&rows, &timed);
            let (a, w) = both_errors(&rows);
            let label = if plain { "plain" } else { "stratified" };
            for (which, e) in [("access", &a), ("writes", &w)] {
                println!(
                    "| {ws} MiB | {label} | {which} | {} | {:.2} | {:.2} | {:.1}% |",
                    e.k, e.rms, e.mae, e.coverage
                );
            }
            rms.push((a.rms, w.rms));
        }
        ratios.push((
            ws,
            rms[1].0 / rms[0].0.max(1e-9),
            rms[1].1 / rms[0].1.max(1e-9),
        ));
    }
    println!();
    for (ws, a, w) in ratios {
        println!(
            "Error ratio plain / stratified (RMS), W = {ws} MiB: access {a:.1}x, writes {w:.1}x."
        );
    }
    println!();
}

/// Does the access sampler bias the write estimate? The sampler is on (default n) and off in
/// turn, interval by interval, in one run; the write estimate's mean error is compared.
fn bias() {
    let mem = GIB;
    let interval = Duration::from_millis(250);
    let n_default = RunOptions::default().access_samples;
    // The access sampler stays off for the first 60 intervals (15 s: the set-up and the start of
    // the measured phase), so its 2 MiB regions are registered during the measured phase, then
    // runs every other interval.
    let mut cycle = vec![0u64; 60];
    for _ in 0..1000 {
        cycle.extend([0, n_default]);
    }
    println!(
        "## The write estimate with the access sampler on ({n_default}) and off in turn: 1 GiB guest with 90% written before, interval {interval:?}; the sampler starts in the measured phase"
    );
    println!();
    println!(
        "| pattern | W | access sampler | intervals | written truth (MiB) | write estimate: mean error ± se (MiB) | 95% CI coverage |"
    );
    println!("|---|---|---|---|---|---|---|");
    let all = (mem * 90 / 100) / (2 * MIB) * (2 * MIB) / 1024;
    // Reads of pages written before (where a falsely logged write would show against a truth of
    // 0), writes, and both on the same pages.
    for (pattern, ws) in [
        ("read random", 512u64),
        ("write random", 256),
        ("mixed", 512),
    ] {
        let spec = format!(
            "alloc {all}K; touch {all}K write; touch {ws}M {pattern} {}ms",
            (interval * 240).as_millis()
        );
        let timed = phase_name(&spec, mem, 2);
        let o = options(&spec, mem, interval, 7);
        let cfg = RunConfig::new(o)
            .expect("options")
            .with_access_cycle(&cycle)
            .expect("cycle");
        let (_, rows) = run_rows(cfg);
        let rows = inside(&rows, &timed);
        let on = |r: &&&Row| r.active.as_ref().is_some_and(|a| a.n > 0);
        let first: Vec<&Row> = rows.iter().filter(on).take(10).copied().collect();
        let groups: [(&str, Vec<&Row>); 3] = [
            ("off", rows.iter().filter(|r| !on(r)).copied().collect()),
            ("on", rows.iter().filter(on).copied().collect()),
            (
                "on, its first 10 intervals (most regions registered)",
                first,
            ),
        ];
        for (label, group) in groups {
            println!(
                "| {pattern} | {ws} MiB | {label} | {} |",
                write_bias(&group)
            );
        }
    }
    println!();
    bias_large();
}

/// The write estimate's error over `rows`: "intervals | written truth | mean error ± se | 95% CI
/// coverage" cells.
fn write_bias(rows: &[&Row]) -> String {
    let mut covered = 0;
    let (errs, truth): (Vec<f64>, Vec<f64>) = rows
        .iter()
        .filter_map(|r| {
            let (w, t) = (r.active_writes.as_ref()?, r.truth.as_ref()?);
            if w.ci_low_mib <= t.written_mib && t.written_mib <= w.ci_high_mib {
                covered += 1;
            }
            Some((w.estimate_mib - t.written_mib, t.written_mib))
        })
        .unzip();
    let (m, se) = mean_se(&errs);
    format!(
        "{} | {:.1} | {m:+.2} ± {se:.2} | {:.0}%",
        errs.len(),
        truth.iter().sum::<f64>() / truth.len().max(1) as f64,
        100.0 * covered as f64 / errs.len().max(1) as f64
    )
}

/// Large access samples and short intervals, where a sampled page moved back untouched is most
/// often read before anything clears its dirty bit again: a 256 MiB guest with 90% written, then
/// only read, with the sampler on and off in turn.
fn bias_large() {
    let mem = 256 * MIB;
    let all = (mem * 90 / 100) / (2 * MIB) * (2 * MIB) / 1024;
    println!(
        "## The write estimate in a read-only phase with large access samples: 256 MiB guest with 90% written before, then 128 MiB read at random; the sampler on and off in turn (off for the first 20 intervals)"
    );
    println!();
    println!(
        "| access samples | interval | access sampler | intervals | written truth (MiB) | write estimate: mean error ± se (MiB) | 95% CI coverage |"
    );
    println!("|---|---|---|---|---|---|---|");
    for interval in [Duration::from_millis(250), Duration::from_millis(50)] {
        for n in [RunOptions::default().access_samples, 400, 5000] {
            let mut cycle = vec![0u64; 20];
            for _ in 0..1000 {
                cycle.extend([0, n]);
            }
            let spec = format!(
                "alloc {all}K; touch {all}K write; touch 128M read random {}ms",
                (interval * 120).as_millis()
            );
            let timed = phase_name(&spec, mem, 2);
            let mut o = options(&spec, mem, interval, 11);
            o.access_samples = n;
            let cfg = RunConfig::new(o)
                .expect("options")
                .with_access_cycle(&cycle)
                .expect("cycle");
            let (_, rows) = run_rows(cfg);
            let rows = inside(&rows, &timed);
            let on = |r: &&&Row| r.active.as_ref().is_some_and(|a| a.n > 0);
            let groups: [(&str, Vec<&Row>); 2] = [
                ("off", rows.iter().filter(|r| !on(r)).copied().collect()),
                ("on", rows.iter().filter(on).copied().collect()),
            ];
            for (label, group) in groups {
                println!(
                    "| {n} | {} ms | {label} | {} |",
                    interval.as_millis(),
                    write_bias(&group)
                );
            }
        }
    }
    println!();
}

/// Least squares over intervals `(traps, guest rate, length in s)`: rate = a + b x traps. One
/// trap costs the guest c = -b / a x the interval's length. Returns (c in µs, its standard error,
/// the mean length).
fn trap_fit(points: &[(f64, f64, f64)]) -> (f64, f64, f64) {
    let k = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / k,
        points.iter().map(|p| p.1).sum::<f64>() / k,
    );
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let resid: f64 = points.iter().map(|p| (p.1 - a - b * p.0).powi(2)).sum();
    let se_b = (resid / (k - 2.0) / sxx).sqrt();
    let len = points.iter().map(|p| p.2).sum::<f64>() / k;
    (-b / a * len * 1e6, se_b / a * len * 1e6, len)
}

/// The cost of one trap, with many traps per interval so that the slope stands out of the host's
/// noise: a 256 MiB guest reads 64 MiB at random, the access sample cycling 0, 1024, 0, 4096 per
/// 1 s interval (nearly every armed page is read each interval). The sampler stays off for the
/// first 3 intervals (boot and the first writes: a census of the guest kernel's few pages would
/// slow its emulated ring 0 to a crawl).
/// Runs `spec` (a guest of `mem`, 1 s intervals, write sampling off) with the access sample size
/// cycling through `cycle` interval by interval, and returns the rows of its phase 2 less the
/// first and the last (a partial interval each).
fn steady_cycled_rows(spec: &str, mem: u64, cycle: &[u64], seed: u64) -> Vec<Row> {
    let timed = phase_name(spec, mem, 2);
    let mut o = options(spec, mem, Duration::from_secs(1), seed);
    o.no_sampling = true;
    let cfg = RunConfig::new(o)
        .expect("options")
        .with_access_cycle(cycle)
        .expect("cycle");
    let (_, rows) = run_rows(cfg);
    let mut timed_rows: Vec<Row> = (rows.into_iter())
        .filter(|r| r.phase == timed && r.end.is_none())
        .collect();
    timed_rows.pop();
    if !timed_rows.is_empty() {
        timed_rows.remove(0);
    }
    timed_rows
}

fn trap_cost() {
    let mut cycle = vec![0u64; 3];
    for _ in 0..4 {
        cycle.extend([0u64, 1024, 0, 4096]);
    }
    let secs = cycle.len() as u32 + 2;
    let spec = format!("alloc 64M; touch 64M write; touch 64M read random {secs}s");
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("trap-trace");
    // SAFETY: no other thread of the bench runs now (the last run's threads are joined), so
    // nothing reads the environment while it changes.
    unsafe { std::env::set_var("MEMVISOR_TRAP_TRACE", &trace) };
    let timed_rows = steady_cycled_rows(&spec, 256 * MIB, &cycle, 5);
    // SAFETY: as above.
    unsafe { std::env::remove_var("MEMVISOR_TRAP_TRACE") };
    let points: Vec<(f64, f64, f64)> = timed_rows
        .iter()
        .filter_map(|r| {
            let t = r.truth.as_ref()?;
            let traps = r.active.as_ref().map_or(0.0, |a| a.t as f64);
            Some((traps, t.rate / 1e6, r.length_s))
        })
        .collect();
    let (c, se_c, _) = trap_fit(&points);
    let most = points.iter().map(|p| p.0).fold(0.0, f64::max);
    println!(
        "Trap cost: {c:.0} ± {se_c:.0} µs of guest time per trapped access (fit over {} intervals, up to {most:.0} traps per interval)",
        points.len()
    );
    trap_steps(&trace);
}

/// The handler's side of a trap, from its own timestamps (`MEMVISOR_TRAP_TRACE`): medians and
/// 90th percentiles over the traps of the run.
fn trap_steps(trace: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(trace) else {
        println!("(no trap trace: the fault handler did not run)");
        return;
    };
    let b: Vec<[f64; 4]> = text
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l.split(' ').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 4).then(|| [v[0] / 1e3, v[1] / 1e3, v[2] / 1e3, v[3]])
        })
        .collect();
    if b.len() < 2 {
        return;
    }
    let most = b.iter().map(|x| x[3]).fold(0.0, f64::max);
    let steps: [(&str, Vec<f64>); 4] = [
        (
            "poll returns → faults read",
            b.iter().map(|x| x[1] - x[0]).collect(),
        ),
        (
            "faults read → resolved (copy back, wake)",
            b.iter().map(|x| x[2] - x[1]).collect(),
        ),
        (
            "resolved → poll returns again (the vCPU runs on, traps, the handler wakes)",
            b.windows(2).map(|w| w[1][0] - w[0][2]).collect(),
        ),
        (
            "poll return to poll return (one trap, end to end)",
            b.windows(2).map(|w| w[1][0] - w[0][0]).collect(),
        ),
    ];
    println!();
    println!(
        "Handler's own timestamps over {} batches of faults (at most {most:.0} in a batch):",
        b.len()
    );
    println!();
    println!("| step | median µs | p90 µs |");
    println!("|---|---|---|");
    for (name, mut v) in steps {
        let m = median(&mut v);
        let p90 = v[v.len() * 9 / 10];
        println!("| {name} | {m:.1} | {p90:.1} |");
    }
}

fn overhead() {
    let mem = GIB;
    // 1. The whole heap active: the access sample size cycles interval by interval in one run,
    //    off every other interval, so slow drifts of the host hit every size alike.
    let n_default = RunOptions::default().access_samples;
    // Up to 1000 traps per interval, so that the slope stands out of a busy host's noise.
    let cycle = [0u64, 40, 0, n_default, 0, 400, 0, 1000];
    let rounds = 10u32;
    let secs = rounds * cycle.len() as u32 + 2;
    let spec = format!("alloc 512M; touch 512M write; touch 512M read random {secs}s");
    println!(
        "## Overhead: random reads over 512 MiB of a 1 GiB guest (every sampled page is accessed), interval 1 s"
    );
    println!();
    println!(
        "| access samples | intervals | guest rate (M accesses/s) | vs off | traps per interval |"
    );
    println!("|---|---|---|---|---|");
    let timed_rows = steady_cycled_rows(&spec, mem, &cycle, 3);
    // (traps, rate, interval length in s) of every interval, for the fit below.
    let points: Vec<(f64, f64, f64)> = timed_rows
        .iter()
        .filter_map(|r| {
            let t = r.truth.as_ref()?;
            let traps = r.active.as_ref().map_or(0.0, |a| a.t as f64);
            Some((traps, t.rate / 1e6, 1.0))
        })
        .collect();
    let mut off = 0.0;
    let mut sizes = cycle.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    for &n in &sizes {
        let sel: Vec<&Row> = timed_rows
            .iter()
            .filter(|r| r.active.as_ref().map_or(0, |a| a.n) == n)
            .collect();
        let rates: Vec<f64> = sel
            .iter()
            .filter_map(|r| r.truth.as_ref().map(|t| t.rate / 1e6))
            .collect();
        let traps: f64 = sel
            .iter()
            .filter_map(|r| r.active.as_ref().map(|a| a.t as f64))
            .sum::<f64>()
            / sel.len().max(1) as f64
            + 0.0; // an empty sum is -0.0
        let (m, se) = mean_se(&rates);
        if n == 0 {
            off = m;
        }
        println!(
            "| {} | {} | {m:.2} ± {se:.2} | {:+.1}% ± {:.1}% | {traps:.0} |",
            if n == 0 {
                "off".to_string()
            } else if n == n_default {
                format!("{n} (default)")
            } else {
                n.to_string()
            },
            rates.len(),
            100.0 * (m - off) / off,
            100.0 * se / off
        );
    }
    println!();
    let (c, se_c, len) = trap_fit(&points);
    let at_default = c * n_default as f64 / (len * 1e6) * 100.0;
    let se_default = se_c * n_default as f64 / (len * 1e6) * 100.0;
    println!(
        "Fit over {} intervals: one trapped access costs the guest {c:.0} ± {se_c:.0} µs, so {n_default} \
         (the default) cost {at_default:.2}% ± {se_default:.2}% at {len:.1} s intervals.",
        points.len()
    );
    println!();

    // 2. First touches of pages nobody samples: a one-pass write of 512 MiB of fresh memory, the
    //    access sampler on (default n) and off, alternating runs.
    println!("## First touches: a one-pass write of 512 MiB of fresh memory, guest seconds");
    println!();
    println!("| access sampler | runs | phase time (s) | vs off |");
    println!("|---|---|---|---|");
    let spec = "alloc 512M; touch 512M write; idle 10ms";
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..4 {
        for samples in [0u64, n_default] {
            let mut o = options(spec, mem, Duration::from_millis(250), 11 + i);
            o.access_samples = samples;
            let (s, _) = run(o);
            let t = s.phases[1].guest_seconds;
            if samples == 0 {
                off.push(t)
            } else {
                on.push(t)
            }
        }
    }
    let (m_off, se_off) = mean_se(&off);
    let (m_on, se_on) = mean_se(&on);
    println!("| off | {} | {m_off:.3} ± {se_off:.3} | — |", off.len());
    println!(
        "| on ({n_default}) | {} | {m_on:.3} ± {se_on:.3} | {:+.1}% |",
        on.len(),
        100.0 * (m_on - m_off) / m_off
    );
    println!();
}

/// First touches by pattern: a 1 GiB guest writes 512 MiB of fresh memory in one pass, with the
/// access sampler off, at 40 (the former default), at the default and at 200, in turn (every pattern and size once per
/// repetition, the same seed within a repetition), three repetitions.
fn first_touch() {
    let mem = GIB;
    let n_default = RunOptions::default().access_samples;
    // The former default (40) beside today's.
    let mut sizes = vec![0u64, 40, n_default, 200];
    sizes.dedup();
    let patterns = [
        ("seq", "alloc 512M; touch 512M write; idle 10ms"),
        ("random", "alloc 512M; touch 512M write random; idle 10ms"),
        (
            "hot",
            "alloc 512M; touch 512M write random hot 10%:90%; idle 10ms",
        ),
    ];
    println!(
        "## First touches by pattern: one pass of 131072 writes over 512 MiB of fresh memory in a 1 GiB guest, interval 250 ms, 3 repetitions alternating"
    );
    println!();
    println!(
        "| pattern | access samples | phase time (guest s) | first touches | µs per first touch | vs off | handler fills |"
    );
    println!("|---|---|---|---|---|---|---|");
    // (pattern, size) -> (phase seconds, first touches, handler fills) per repetition.
    let mut got: Vec<Vec<(f64, f64, u64)>> = vec![Vec::new(); patterns.len() * sizes.len()];
    for rep in 0..3u64 {
        for (p, (_, spec)) in patterns.iter().enumerate() {
            for (k, &samples) in sizes.iter().enumerate() {
                let mut o = options(spec, mem, Duration::from_millis(250), 21 + rep);
                o.access_samples = samples;
                let (s, rows) = run(o);
                let secs = s.phases[1].guest_seconds;
                // First writes, counted exactly by the harvest (the guest's own pages included).
                let first: f64 = rows
                    .iter()
                    .filter_map(|r| r.active_writes.as_ref())
                    .map(|a| a.exact_mib)
                    .sum::<f64>()
                    * (MIB / PAGE_SIZE) as f64;
                let fills = rows
                    .iter()
                    .filter_map(|r| r.active.as_ref())
                    .map(|a| a.handler_fills)
                    .sum();
                got[p * sizes.len() + k].push((secs, first, fills));
            }
        }
    }
    for (p, (name, _)) in patterns.iter().enumerate() {
        let per = |k: usize| -> Vec<f64> {
            got[p * sizes.len() + k]
                .iter()
                .map(|&(s, f, _)| s / f * 1e6)
                .collect()
        };
        let (off, _) = mean_se(&per(0));
        for (k, &n) in sizes.iter().enumerate() {
            let runs = &got[p * sizes.len() + k];
            let secs: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let (ms, ss) = mean_se(&secs);
            let first = runs.iter().map(|r| r.1).sum::<f64>() / runs.len() as f64;
            let (m, se) = mean_se(&per(k));
            let fills: u64 = runs.iter().map(|r| r.2).sum::<u64>() / runs.len() as u64;
            let label = match n {
                0 => "off".to_string(),
                n if n == n_default => format!("{n} (default)"),
                n => n.to_string(),
            };
            let vs = if n == 0 {
                "—".to_string()
            } else {
                format!("{:+.1}%", 100.0 * (m - off) / off)
            };
            println!(
                "| {name} | {label} | {ms:.3} ± {ss:.3} | {first:.0} | {m:.1} ± {se:.1} | {vs} | {fills} |"
            );
        }
    }
    println!();
}

fn cost() {
    println!(
        "## Cost of one access round (200 pages armed, then disarmed untouched), 256 MiB touched, median of 30, microseconds"
    );
    println!();
    println!("| guest | index the population (the harvest's count) | arm | disarm |");
    println!("|---|---|---|---|");
    for gib in [1u64, 4, 16, 64] {
        let mem = GuestMemory::new(GuestRam::new(gib * GIB, false).expect("guest RAM"));
        let ram = mem.ram();
        let pages = ram.pages();
        let touched = (256 * MIB / PAGE_SIZE).min(pages);
        let mut pop = Bitmap::new(pages);
        for gfn in 0..touched {
            ram.write_obj(gfn * PAGE_SIZE, gfn + 1).expect("touch");
            pop.set(gfn);
        }
        let mut a = AccessSampler::new(200, &mem, Some(1)).expect("uffd");
        let mut t = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..30 {
            let t0 = Instant::now();
            let ranks = std::hint::black_box(Ranks::new(&pop));
            let t1 = Instant::now();
            a.arm(&mem, &Population::of(&pop, &ranks), 200)
                .expect("arm");
            let t2 = Instant::now();
            a.disarm(&mem).expect("disarm");
            let t3 = Instant::now();
            for (i, (x, y)) in [(t0, t1), (t1, t2), (t2, t3)].iter().enumerate() {
                t[i].push((*y - *x).as_secs_f64() * 1e6);
            }
        }
        println!(
            "| {gib} GiB | {:.0} | {:.0} | {:.0} |",
            median(&mut t[0]),
            median(&mut t[1]),
            median(&mut t[2])
        );
        // Every page still holds what was written: no data lost by moving pages about.
        for gfn in (0..touched).step_by(97) {
            let v: u64 = ram.read_obj(gfn * PAGE_SIZE).expect("read");
            assert_eq!(v, gfn + 1, "page {gfn} lost its contents");
        }
        drop(a);
    }
    println!();
}

/// The cost of registering a region, which maps its never-touched pages to the zero page first:
/// arming one page in each of 64 regions that hold only that page, against 64 fully touched.
fn populate_cost() {
    use memvisor::memory::faults::REGION_PAGES;
    println!("## Registering a 2 MiB region: the first page armed in it, median of 64 regions, µs");
    println!();
    println!("| region | pages mapped to the zero page | arm the first page |");
    println!("|---|---|---|");
    let mem = GuestMemory::new(GuestRam::new(GIB, false).expect("guest RAM"));
    let ram = mem.ram();
    let faults = mem.start_faults(1).expect("uffd");
    for (what, touched) in [
        ("one page touched", 1u64),
        ("all 512 touched", REGION_PAGES),
    ] {
        let first_region = if touched == 1 { 0 } else { 64 };
        let mut t = Vec::new();
        let mut mapped = 0;
        for r in first_region..first_region + 64 {
            let base = r * REGION_PAGES;
            for gfn in base..base + touched {
                ram.write_obj(gfn * PAGE_SIZE, gfn + 1).expect("touch");
            }
            let t0 = Instant::now();
            faults.sample(base, 0).expect("arm");
            t.push(t0.elapsed().as_secs_f64() * 1e6);
            faults.end_samples().expect("disarm");
            mapped += faults
                .take_zero_mapped()
                .iter()
                .map(|p| p.end - p.start)
                .sum::<u64>();
        }
        println!("| {what} | {} | {:.1} |", mapped / 64, median(&mut t));
    }
    println!();
}

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("access bench skipped: /dev/kvm is absent");
        return;
    }
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let sections = [
        "cost",
        "overhead",
        "trap",
        "firsttouch",
        "sparse",
        "bias",
        "accuracy",
    ];
    let (named, patterns): (Vec<String>, Vec<String>) = which
        .into_iter()
        .partition(|w| sections.contains(&w.as_str()));
    let want = |name: &str| named.is_empty() || named.iter().any(|w| w == name);
    if want("cost") {
        cost();
        populate_cost();
    }
    if want("overhead") {
        overhead();
    }
    if want("trap") {
        trap_cost();
    }
    if want("firsttouch") {
        first_touch();
    }
    if want("sparse") {
        sparse();
    }
    if want("bias") {
        bias();
    }
    if want("accuracy") {
        // Further words choose patterns by their first word: `-- accuracy mixed`.
        accuracy(&patterns);
    }
}
