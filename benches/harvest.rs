//! Cost of one PMP-MMP harvest for 1, 4, 16 and 64 GiB of guest RAM with 256 MiB touched.
//!
//! Guest RAM is a private anonymous MAP_NORESERVE mapping in this process; the bench writes
//! 256 MiB of it (128 blocks of 2 MiB spread evenly) and hands the map a synthetic dirty bitmap
//! for exactly those pages. "first" is the harvest that finds all 256 MiB newly touched,
//! "steady" one with nothing new (the bitmap and residency passes only), with the residency pass
//! done by PAGEMAP_SCAN (the default where the kernel has it) and by mincore, and without it.
//! With /dev/kvm, the cost of a real KVM_GET_DIRTY_LOG on a memslot of the same size is shown
//! too.
//!
//! `cargo bench --bench harvest -- pause` instead measures the pause per interval of real runs:
//! `memvisor run --json` at 1, 4, 16, 64, 256 and 448 GiB (MAP_NORESERVE; the built-in guest's
//! page tables map 448 GiB), the guest writing 256 MiB (and 4 GiB at 16, 64 and 448 GiB) every
//! interval,
//! and reports the median of the steady rows' `vmm` block (every interval after the first two,
//! the last one left out: it re-reads the whole map).
//!
//! `cargo bench --bench harvest -- scan` measures the windowed scan (which skips the words wholly
//! present at the last scan) against fragmentation: 256 MiB present in random runs of 4 KiB to
//! 16 MiB at 4 and 64 GiB, its ms and ioctls per steady harvest.
//!
//! Run: `cargo bench --bench harvest`, `cargo bench --bench harvest -- pause`,
//! `cargo bench --bench harvest -- scan`.

use std::time::Instant;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::Kvm;
use memvisor::kvm::ioctls;
use memvisor::memory::bitmap::Bitmap;
use memvisor::memory::pagemap::AnonMapping;
use memvisor::observe::pmp_mmp::{HarvestStats, MapOptions, PmpMmpMap, ResidencyMethod};
use memvisor::units::PAGE_SIZE;

mod common;
use common::median;

const GIB: u64 = 1 << 30;
const TOUCHED: u64 = 256 << 20;
const BLOCK_PAGES: u64 = 512;
const STEADY_RUNS: u32 = 5;

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One harvest of the guest-dirty bitmap `dirty` in `interval`, timed: (milliseconds, stats).
fn timed_harvest(
    map: &mut PmpMmpMap,
    dirty: &Bitmap,
    interval: u32,
) -> Result<(f64, HarvestStats), String> {
    let t = Instant::now();
    let s = map
        .harvest(dirty.words(), &[], interval)
        .map_err(|e| e.to_string())?;
    Ok((ms_since(t), s))
}

/// Mean milliseconds of KVM_GET_DIRTY_LOG on a dirty-logged memslot over `region`.
fn get_dirty_log_ms(kvm: &Kvm, region: &AnonMapping) -> Result<f64, String> {
    let vm = kvm.create_vm().map_err(|e| format!("create_vm: {e}"))?;
    ioctls::enable_manual_dirty_log_protect(&vm).map_err(|e| e.to_string())?;
    // SAFETY: the region outlives the VM, which is dropped at the end of this function.
    unsafe { ioctls::set_user_memory(&vm, 0, KVM_MEM_LOG_DIRTY_PAGES, region) }
        .map_err(|e| format!("memslot: {e}"))?;
    let runs = 10;
    let t = Instant::now();
    for _ in 0..runs {
        let log = vm
            .get_dirty_log(0, region.len())
            .map_err(|e| format!("get_dirty_log: {e}"))?;
        std::hint::black_box(log);
    }
    Ok(ms_since(t) / f64::from(runs))
}

struct Row {
    gib: u64,
    touch_ms: f64,
    first_ms: f64,
    first_lookups: u64,
    steady_ms: f64,
    steady_bitmap_ms: f64,
    steady_scan_ms: f64,
    mincore_first_ms: f64,
    mincore_steady_ms: f64,
    mincore_pass_ms: f64,
    steady_no_residency_ms: f64,
    auto_steady_ms: f64,
    auto_method: &'static str,
    refresh_ms: f64,
    get_dirty_log_ms: Option<f64>,
    overhead_mib: f64,
    backed: u64,
}

fn bench(gib: u64, kvm: Option<&Kvm>) -> Result<Row, String> {
    let pages = gib * GIB / PAGE_SIZE;
    let len = (gib * GIB) as usize;
    let region = AnonMapping::new(len).map_err(|e| format!("mmap {len}: {e}"))?;
    let blocks = TOUCHED / PAGE_SIZE / BLOCK_PAGES;
    let stride = pages / blocks;
    let mut dirty = Bitmap::new(pages);
    let t = Instant::now();
    for b in 0..blocks {
        let first = b * stride;
        for g in first..first + BLOCK_PAGES {
            region.write_volatile((g * PAGE_SIZE) as usize, 1);
            dirty.set(g);
        }
    }
    let touch_ms = ms_since(t);

    let opts = |residency, residency_every| MapOptions {
        residency,
        residency_every,
        windowed: false,
    };
    let new_map =
        |o: MapOptions| PmpMmpMap::with_options(region.addr(), pages, o).map_err(|e| e.to_string());
    let n = f64::from(STEADY_RUNS);

    // PAGEMAP_SCAN residency on every harvest.
    let mut map = new_map(opts(ResidencyMethod::PagemapScan, 1))?;
    let (first_ms, first) = timed_harvest(&mut map, &dirty, 0)?;
    let backed = map.summary().backed;
    let (mut steady_ms, mut bitmap_ms, mut scan_ms) = (0.0, 0.0, 0.0);
    for i in 1..=STEADY_RUNS {
        let (ms, s) = timed_harvest(&mut map, &dirty, i)?;
        steady_ms += ms;
        bitmap_ms += s.bitmap_ms;
        scan_ms += s.residency_ms;
    }

    // mincore residency.
    let mut mc = new_map(opts(ResidencyMethod::Mincore, 1))?;
    let (mincore_first_ms, _) = timed_harvest(&mut mc, &dirty, 0)?;
    let (mut mincore_steady_ms, mut mincore_pass_ms) = (0.0, 0.0);
    for i in 1..=STEADY_RUNS {
        let (ms, s) = timed_harvest(&mut mc, &dirty, i)?;
        mincore_steady_ms += ms;
        mincore_pass_ms += s.residency_ms;
    }
    drop(mc);

    // Default options (Auto picks the method per pass).
    let mut auto = new_map(MapOptions::default())?;
    timed_harvest(&mut auto, &dirty, 0)?;
    let (mut auto_steady_ms, mut auto_method) = (0.0, "-");
    for i in 1..=STEADY_RUNS {
        let (ms, s) = timed_harvest(&mut auto, &dirty, i)?;
        auto_steady_ms += ms;
        auto_method = match s.residency_method {
            Some(ResidencyMethod::PagemapScan) => "scan",
            Some(ResidencyMethod::Mincore) => "mc",
            _ => "-",
        };
    }
    drop(auto);

    // No residency pass after the first harvest (residency_every = 0).
    let mut quiet = new_map(opts(ResidencyMethod::PagemapScan, 0))?;
    timed_harvest(&mut quiet, &dirty, 0)?;
    let mut steady_no_residency_ms = 0.0;
    for i in 1..=STEADY_RUNS {
        steady_no_residency_ms += timed_harvest(&mut quiet, &dirty, i)?.0;
    }
    drop(quiet);

    let refresh_ms = map.refresh().map_err(|e| e.to_string())?.ms;
    let get_dirty_log_ms = match kvm {
        Some(kvm) => Some(get_dirty_log_ms(kvm, &region)?),
        None => None,
    };
    Ok(Row {
        gib,
        touch_ms,
        first_ms,
        first_lookups: first.lookups,
        steady_ms: steady_ms / n,
        steady_bitmap_ms: bitmap_ms / n,
        steady_scan_ms: scan_ms / n,
        mincore_first_ms,
        mincore_steady_ms: mincore_steady_ms / n,
        mincore_pass_ms: mincore_pass_ms / n,
        steady_no_residency_ms: steady_no_residency_ms / n,
        auto_steady_ms: auto_steady_ms / n,
        auto_method,
        refresh_ms,
        get_dirty_log_ms,
        overhead_mib: map.overhead_bytes() as f64 / f64::from(1 << 20),
        backed,
    })
}

/// One real run's steady rows: medians of the `vmm` parts, ms, and the slots read.
fn pause_run(gib: u64, touch: &str) -> Result<Vec<f64>, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args([
            "run",
            "--json",
            "--console",
            "/dev/null",
            "--seed",
            "1",
            "--mem",
        ])
        .arg(format!("{gib}G"))
        .arg("--workload")
        .arg(format!("alloc {touch}; touch {touch} write 6s"))
        .output()
        .map_err(|e| format!("memvisor run: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let steady = rows.get(2..rows.len().saturating_sub(1)).unwrap_or(&[]);
    if steady.is_empty() {
        return Err(format!("{} rows", rows.len()));
    }
    let parts = [
        "work_ms",
        "harvest_ms",
        "scan_ms",
        "access_round_ms",
        "write_round_ms",
        "map_ms",
        "row_ms",
        "dirty_log_slots",
        "scan_ioctls",
    ];
    Ok(parts
        .iter()
        .map(|k| {
            let mut v: Vec<f64> = steady.iter().filter_map(|r| r["vmm"][k].as_f64()).collect();
            median(&mut v)
        })
        .collect())
}

fn pause_table() {
    println!("Pause per interval (vmm block of real rows, median of the steady ones), ms");
    println!(
        "{:>5} {:>6} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>5} {:>6}",
        "GiB",
        "touch",
        "work",
        "harvest",
        "scan",
        "access",
        "write",
        "map",
        "row",
        "slots",
        "ioctls"
    );
    for (gib, touch) in [
        (1, "256M"),
        (4, "256M"),
        (16, "256M"),
        (64, "256M"),
        (256, "256M"),
        (448, "256M"),
        (16, "4G"),
        (64, "4G"),
        (448, "4G"),
    ] {
        match pause_run(gib, touch) {
            Ok(p) => println!(
                "{:>5} {:>6} | {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} | {:>5} {:>6}",
                gib, touch, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
            ),
            Err(e) => eprintln!("{gib} GiB, {touch}: {e}"),
        }
    }
}

/// The windowed scan with 256 MiB present in runs of `run` pages at random places (seeded), in a
/// guest of `gib` GiB, once all of it has been harvested: (scan ms, ioctls, MiB skipped) of the
/// steady windowed harvests (means), and the ms of one `PAGEMAP_SCAN` over all of RAM (the
/// whole-RAM residency pass) for comparison.
fn scan_pattern(gib: u64, run: u64) -> Result<(f64, f64, f64, f64), String> {
    let pages = gib * GIB / PAGE_SIZE;
    let region = AnonMapping::new((gib * GIB) as usize).map_err(|e| format!("mmap: {e}"))?;
    let mut dirty = Bitmap::new(pages);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = TOUCHED / PAGE_SIZE;
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let first = x % (pages - run);
        for g in first..first + run {
            if !dirty.get(g) {
                region.write_volatile((g * PAGE_SIZE) as usize, 1);
                dirty.set(g);
                left = left.saturating_sub(1);
            }
        }
    }
    let mut map = PmpMmpMap::new(region.addr(), pages).map_err(|e| e.to_string())?;
    let mut whole = PmpMmpMap::with_options(
        region.addr(),
        pages,
        MapOptions {
            residency: ResidencyMethod::PagemapScan,
            windowed: false,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    timed_harvest(&mut map, &dirty, 0)?;
    timed_harvest(&mut whole, &dirty, 0)?;
    let none = Bitmap::new(pages);
    let (mut ms, mut ioctls, mut skipped, mut whole_ms) = (0.0, 0.0, 0.0, 0.0);
    for i in 1..=STEADY_RUNS {
        timed_harvest(&mut map, &none, i)?;
        let s = map.last_scan();
        ms += s.ms;
        ioctls += s.ioctls as f64;
        skipped += (s.skipped_pages * PAGE_SIZE) as f64 / f64::from(1 << 20);
        whole_ms += timed_harvest(&mut whole, &none, i)?.1.residency_ms;
    }
    let n = f64::from(STEADY_RUNS);
    Ok((ms / n, ioctls / n, skipped / n, whole_ms / n))
}

fn scan_table() {
    println!(
        "Windowed scan, 256 MiB present in random runs; steady harvests (mean of {STEADY_RUNS}): \
         scan ms, ioctls, MiB skipped; whole: one PAGEMAP_SCAN over all of RAM, ms"
    );
    println!(
        "{:>4} {:>9} | {:>7} {:>7} {:>8} | {:>7}",
        "GiB", "run", "scan", "ioctls", "skipped", "whole"
    );
    for gib in [4u64, 64] {
        for run in [1u64, 16, 64, 512, 4096] {
            match scan_pattern(gib, run) {
                Ok((ms, ioctls, skipped, whole)) => println!(
                    "{:>4} {:>7}KiB | {:>7.3} {:>7.0} {:>8.1} | {:>7.3}",
                    gib,
                    run * PAGE_SIZE / 1024,
                    ms,
                    ioctls,
                    skipped,
                    whole
                ),
                Err(e) => eprintln!("{gib} GiB, runs of {run} pages: {e}"),
            }
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "pause") {
        pause_table();
        return;
    }
    if std::env::args().any(|a| a == "scan") {
        scan_table();
        return;
    }
    // `cargo bench` passes --bench; any other argument is ignored.
    let kvm = if std::path::Path::new("/dev/kvm").exists() {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("/dev/kvm present but unusable ({e}): no KVM_GET_DIRTY_LOG column");
                None
            }
        }
    } else {
        eprintln!("/dev/kvm absent: no KVM_GET_DIRTY_LOG column");
        None
    };
    println!(
        "PMP-MMP harvest cost, 256 MiB touched (128 x 2 MiB blocks); ms; steady = mean of {STEADY_RUNS}"
    );
    println!(
        "  scan: residency pass by PAGEMAP_SCAN; mc: by mincore; auto: default options (Auto picks \
         per pass); none: residency pass off"
    );
    println!(
        "{:>4} {:>7} {:>7} {:>6} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>12} | {:>6} | {:>7} {:>9} {:>8}",
        "GiB",
        "touch",
        "first",
        "lookup",
        "steady",
        "bitmap",
        "scan",
        "mc.1st",
        "mc.stdy",
        "mincore",
        "auto stdy",
        "none",
        "refresh",
        "GET_DIRTY",
        "overhead"
    );
    let mut failed = false;
    let t0 = Instant::now();
    for gib in [1u64, 4, 16, 64] {
        match bench(gib, kvm.as_ref()) {
            Ok(r) => {
                if r.backed != TOUCHED / PAGE_SIZE {
                    eprintln!(
                        "{gib} GiB: {} pages backed, expected {}",
                        r.backed,
                        TOUCHED / PAGE_SIZE
                    );
                    failed = true;
                }
                println!(
                    "{:>4} {:>7.1} {:>7.2} {:>6} | {:>7.3} {:>7.3} {:>7.3} | {:>7.2} {:>7.3} {:>7.3} | {:>7.3} {:>4} | {:>6.3} | {:>7.2} {:>9} {:>6.2}Mi",
                    r.gib,
                    r.touch_ms,
                    r.first_ms,
                    r.first_lookups,
                    r.steady_ms,
                    r.steady_bitmap_ms,
                    r.steady_scan_ms,
                    r.mincore_first_ms,
                    r.mincore_steady_ms,
                    r.mincore_pass_ms,
                    r.auto_steady_ms,
                    r.auto_method,
                    r.steady_no_residency_ms,
                    r.refresh_ms,
                    r.get_dirty_log_ms
                        .map_or("-".to_string(), |v| format!("{v:.3}")),
                    r.overhead_mib
                );
            }
            Err(e) => {
                eprintln!("{gib} GiB: {e}");
                failed = true;
            }
        }
    }
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    if failed {
        std::process::exit(1);
    }
}
