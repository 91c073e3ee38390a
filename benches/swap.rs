//! Hypervisor swap benchmarks (`make bench`): what a page-in costs next to the other faults the
//! one userfaultfd handler resolves, how fast pages are swapped out, which policy brings fewer
//! pages back on a hot/cold workload, and what holding a guest back costs its work by the balloon
//! against by swap (ESX's experiment).
//!
//! `cargo bench --bench swap [-- latency|out|policy|balloon]`

mod common;

use std::time::{Duration, Instant};

use memvisor::memory::faults::{Faults, Stored};
use memvisor::memory::swap::{Policy, SwapFile};
use memvisor::memory::{GuestMemory, GuestRam};
use memvisor::row::Row;
use memvisor::units::PAGE_SIZE;
use memvisor::vmm::config::{RunConfig, RunOptions, SwapOptions};
use vm_memory::{Bytes, GuestAddress};

use common::{median, run_rows};

const MIB: u64 = 1 << 20;
/// Pages per region (2 MiB), as the fault handler registers them.
const REGION: u64 = 512;

/// Guest memory of 1 GiB with the handler running and swap to a file in `dir`.
fn memory(dir: &std::path::Path, stash: u64) -> GuestMemory {
    let mem = GuestMemory::new(GuestRam::new(1 << 30, false).unwrap());
    mem.start_faults(stash).expect("userfaultfd");
    let file = SwapFile::create(dir).expect("swap file");
    mem.faults().unwrap().enable_swap(file, Box::new(|| {}));
    mem
}

/// Writes pages `gfns` with a pattern (never zero).
fn fill(mem: &GuestMemory, gfns: impl Iterator<Item = u64>) {
    for gfn in gfns {
        let page = vec![(gfn % 251) as u8 + 1; PAGE_SIZE as usize];
        mem.ram().write(gfn * PAGE_SIZE, &page).unwrap();
    }
}

/// Swaps out `gfns` (ascending) as the VMM does: read, store, discard, commit.
fn swap_out(mem: &GuestMemory, f: &Faults, gfns: &[u64]) {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut stored = Vec::with_capacity(gfns.len());
    for &gfn in gfns {
        mem.ram()
            .mem()
            .read_slice(&mut page, GuestAddress(gfn * PAGE_SIZE))
            .unwrap();
        match f.swap_store(gfn, &page).unwrap() {
            Stored::Slot(s) => stored.push((gfn, Some(s))),
            other => panic!("{other:?}"),
        }
    }
    mem.discard(gfns[0]..gfns[gfns.len() - 1] + 1).unwrap();
    f.swap_commit(&stored);
}

/// Reads one byte of each page, timing each read (µs).
fn timed_reads(mem: &GuestMemory, gfns: impl Iterator<Item = u64>) -> Vec<f64> {
    gfns.map(|gfn| {
        let t = Instant::now();
        let _: u8 = mem.ram().read_obj(gfn * PAGE_SIZE + 8).unwrap();
        t.elapsed().as_secs_f64() * 1e6
    })
    .collect()
}

fn p(v: &mut [f64], q: f64) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// A page-in against the other faults of the same handler, in one process: each access is a VMM
/// read of one page, timed by the reader (a vCPU adds the same exit to each).
fn latency() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let n = 2048u64;
    let mem = memory(dir.path(), n);
    let f = mem.faults().unwrap();
    // Regions 0-7: swapped pages; 8-15: sampled pages; 16-23: never touched, registered (one
    // page of each region sampled and put back first); 24-31: never touched, not registered.
    let swapped: Vec<u64> = (0..n).collect();
    fill(&mem, swapped.iter().copied());
    swap_out(&mem, f, &swapped);
    for r in 16..24 {
        fill(&mem, std::iter::once(r * REGION));
        f.sample(r * REGION, 0).unwrap();
        f.end_samples().unwrap();
    }
    let sampled: Vec<u64> = (8 * REGION..8 * REGION + n).collect();
    fill(&mem, sampled.iter().copied());
    for (slot, &gfn) in sampled.iter().enumerate() {
        f.sample(gfn, slot as u64).unwrap();
    }
    let mut kinds = [
        (
            "swap page-in (read slot, UFFDIO_COPY)",
            timed_reads(&mem, 0..n),
        ),
        (
            "access-sampler trap (UFFDIO_MOVE back)",
            timed_reads(&mem, 8 * REGION..8 * REGION + n),
        ),
        (
            "first touch, registered region (UFFDIO_ZEROPAGE)",
            timed_reads(&mem, (16 * REGION..24 * REGION).filter(|g| g % REGION != 0)),
        ),
        (
            "first touch, no userfaultfd (kernel)",
            timed_reads(&mem, 24 * REGION..24 * REGION + n),
        ),
    ];
    let mut handler = f.take_swap_ins().wait_us;
    f.end_samples().unwrap();
    println!("## latency: one VMM read per page, {n} pages of each kind, µs");
    println!("| fault | p50 | p99 |");
    println!("|---|---|---|");
    for (name, v) in &mut kinds {
        println!("| {name} | {:.1} | {:.1} |", p(v, 0.5), p(v, 0.99));
    }
    println!(
        "| swap page-in, the handler's own measure (`page_in_us_*`) | {:.1} | {:.1} |",
        p(&mut handler, 0.5),
        p(&mut handler, 0.99)
    );
}

/// Swap-out throughput: read, write to the file, drop, in batches of 64 MiB (the most one
/// boundary swaps out).
fn out() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let mem = memory(dir.path(), 0);
    let f = mem.faults().unwrap();
    let batch = 16384u64;
    let mut rates = Vec::new();
    let mut times = Vec::new();
    for b in 0..4 {
        let gfns: Vec<u64> = (b * batch..(b + 1) * batch).collect();
        fill(&mem, gfns.iter().copied());
        let t = Instant::now();
        swap_out(&mem, f, &gfns);
        let s = t.elapsed().as_secs_f64();
        times.push(s * 1e3);
        rates.push((batch * PAGE_SIZE) as f64 / MIB as f64 / s);
    }
    println!(
        "## swap-out: 64 MiB batches to a file in {}: median {:.0} MiB/s, {:.0} ms per 64 MiB",
        std::env::temp_dir().display(),
        median(&mut rates),
        median(&mut times)
    );
}

/// `random` against `cold` on a hot/cold workload: 64 MiB written, then 90% of the accesses to
/// the first 10% (6.4 MiB) for 6 s, with 48 MiB swapped out: page-ins per guest access.
fn policy() {
    println!("## policy: alloc 64M; touch 64M write; touch 64M mixed random hot 10%:90% 6s");
    println!("## --mem 128M --swap-target 48M --interval 500ms, rows of the hot/cold phase");
    println!("| policy | page-ins | guest accesses (work done) | page-ins per 1000 accesses |");
    println!("|---|---|---|---|");
    for policy in [Policy::Random, Policy::Cold] {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let opts = RunOptions {
            mem: 128 * MIB,
            workload: "alloc 64M; touch 64M write; touch 64M mixed random hot 10%:90% 6s".into(),
            interval: Duration::from_millis(500),
            timeout: Some(Duration::from_secs(600)),
            seed: Some(1),
            swap: SwapOptions {
                swap: Some(dir.path().to_path_buf()),
                swap_target: Some(48 * MIB),
                swap_policy: Some(policy),
            },
            ..RunOptions::default()
        };
        let (_, rows) = run_rows(RunConfig::new(opts).expect("bench options are valid"));
        let hot: Vec<&Row> = rows
            .iter()
            .filter(|r| r.phase.contains("hot") && r.end.is_none())
            .skip(1)
            .collect();
        let ins: u64 = hot.iter().map(|r| r.swap.as_ref().unwrap().page_ins).sum();
        let accesses: u64 = hot
            .iter()
            .filter_map(|r| r.truth.as_ref().map(|t| t.iterations))
            .sum();
        println!(
            "| {policy:?} | {ins} | {accesses} | {:.1} |",
            ins as f64 * 1000.0 / accesses.max(1) as f64
        );
    }
}

/// The working set of the balloon-versus-swap experiment, the guest's RAM (the working set, the
/// most taken, and 16 MiB for its kernel and slack), and the working phase.
const W_MIB: u64 = 64;
const X_MIB: [u64; 3] = [16, 32, 48];
const GUEST_MIB: u64 = W_MIB + 48 + 16;
const WORK: &str = "touch 64M mixed random 4s";

/// One run of the experiment: the guest's work rate in the working phase (page accesses per
/// second of the rows' real lengths, the phase's first row left out: it began in the phase
/// before), host memory backing the guest at the phase's end, and the VMM's swap-out time and
/// page-ins per second in the phase.
struct Held {
    rate: f64,
    backed_mib: f64,
    /// `None` without swap.
    out_ms_per_s: Option<f64>,
    page_ins_per_s: Option<f64>,
}

fn held(mem_mib: u64, limit: Option<u64>, swap: Option<(u64, Policy)>) -> Held {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let opts = RunOptions {
        mem: mem_mib * MIB,
        workload: format!("alloc {W_MIB}M; touch {W_MIB}M write; {WORK}"),
        interval: Duration::from_millis(500),
        timeout: Some(Duration::from_secs(600)),
        seed: Some(1),
        limit: limit.map(|l| l * MIB),
        swap: SwapOptions {
            swap: swap.map(|_| dir.path().to_path_buf()),
            swap_target: swap.map(|(x, _)| x * MIB),
            swap_policy: swap.map(|(_, p)| p),
        },
        ..RunOptions::default()
    };
    let (_, rows) = run_rows(RunConfig::new(opts).expect("bench options are valid"));
    let work: Vec<&Row> = rows
        .iter()
        .filter(|r| r.phase == WORK && r.end.is_none() && !r.partial)
        .skip(1)
        .collect();
    assert!(
        work.len() >= 3,
        "too few rows in the working phase: {rows:?}"
    );
    let secs: f64 = work.iter().map(|r| r.length_s).sum();
    let accesses: u64 = work
        .iter()
        .filter_map(|r| r.truth.as_ref().map(|t| t.iterations))
        .sum();
    let swap_per_s = |f: fn(&memvisor::row::Swap) -> f64| -> Option<f64> {
        swap.map(|_| {
            work.iter()
                .filter_map(|r| r.swap.as_ref().map(f))
                .fold(0.0, |a, v| a + v)
                / secs
        })
    };
    Held {
        rate: accesses as f64 / secs,
        backed_mib: work
            .last()
            .and_then(|r| r.host.as_ref())
            .map_or(0.0, |h| h.backed_mib),
        out_ms_per_s: swap_per_s(|s| s.out_ms),
        page_ins_per_s: swap_per_s(|s| s.page_ins as f64),
    }
}

/// Balloon against swap, after ESX's experiment (Waldspurger, OSDI '02, section 3.2): a guest of
/// `GUEST_MIB` working over `W_MIB` (uniform random reads and writes) is held back by X, once by
/// the balloon (`--limit GUEST - X`: the guest kernel gives X of its free pages at boot) and once
/// by hypervisor swap (`--swap-target X`, each policy); its work rate against an unconstrained
/// run next to it. As in ESX's Figure 2, a guest configured with GUEST - X is measured too: what
/// the balloon should cost is the difference between it and the ballooned guest.
fn balloon() {
    println!(
        "## balloon: --mem {GUEST_MIB}M --interval 500ms, alloc {W_MIB}M; touch {W_MIB}M write; \
         {WORK}; rows of the last phase"
    );
    println!(
        "| held back by | X (MiB) | work rate vs unconstrained | backed (MiB) | swap-out ms per s | page-ins per s |"
    );
    println!("|---|---|---|---|---|---|");
    for x in X_MIB {
        // The unconstrained run next to the held ones, so that the ratios compare runs made
        // under the same load of the (shared) host.
        let base = held(GUEST_MIB, None, None);
        println!(
            "| nothing | 0 | 1 ({:.1} M accesses/s) | {:.1} | - | - |",
            base.rate / 1e6,
            base.backed_mib
        );
        let cases = [
            (
                "configured smaller (`--mem`)",
                held(GUEST_MIB - x, None, None),
            ),
            (
                "balloon (`--limit`)",
                held(GUEST_MIB, Some(GUEST_MIB - x), None),
            ),
            (
                "swap, `cold`",
                held(GUEST_MIB, None, Some((x, Policy::Cold))),
            ),
            (
                "swap, `random`",
                held(GUEST_MIB, None, Some((x, Policy::Random))),
            ),
        ];
        for (name, h) in cases {
            let per_s = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            println!(
                "| {name} | {x} | {:.3} | {:.1} | {} | {} |",
                h.rate / base.rate,
                h.backed_mib,
                per_s(h.out_ms_per_s),
                per_s(h.page_ins_per_s)
            );
        }
    }
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if want("latency") {
        latency();
    }
    if want("out") {
        out();
    }
    if want("policy") {
        if std::path::Path::new("/dev/kvm").exists() {
            policy();
        } else {
            eprintln!("the policy benchmark needs /dev/kvm; skipped");
        }
    }
    if want("balloon") {
        if std::path::Path::new("/dev/kvm").exists() {
            balloon();
        } else {
            eprintln!("the balloon benchmark needs /dev/kvm; skipped");
        }
    }
}
