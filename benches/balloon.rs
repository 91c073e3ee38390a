//! virtio-balloon benchmarks (`make bench`): how fast free page reporting gives memory back, what
//! one reported extent costs the guest, what one release costs the VMM by guest size, and host
//! usage over time under `--limit`.
//!
//! `cargo bench --bench balloon [-- reclaim|extent|release|limit]`

mod common;

use std::ops::Range;
use std::time::{Duration, Instant};

use memvisor::kvm::vm::Vm;
use memvisor::memory::GuestRam;
use memvisor::memory::bitmap::{Bitmap, Window};
use memvisor::observe::pmp_mmp::PmpMmpMap;
use memvisor::row::Row;
use memvisor::units::PAGE_SIZE;
use memvisor::vmm::RunSummary;
use memvisor::vmm::config::{RunConfig, RunOptions};

use common::{median, run_rows};

const MIB: u64 = 1 << 20;

fn run(opts: RunOptions) -> (RunSummary, Vec<Row>) {
    let opts = RunOptions {
        timeout: Some(Duration::from_secs(600)),
        seed: Some(1),
        ..opts
    };
    run_rows(RunConfig::new(opts).expect("bench options are valid"))
}

fn backed_mib(r: &Row) -> f64 {
    r.host.as_ref().map_or(0.0, |h| h.backed_mib)
}

/// `free 512M` to host usage down by 500 MiB.
fn reclaim() {
    let interval = Duration::from_millis(100);
    let spec = "alloc 600M; touch 600M write; idle 300ms; free 512M; idle 1s";
    println!("## Reclaim: `{spec}`, 1 GiB guest, --interval 100ms");
    println!();
    println!(
        "| reporting | free phase (guest ms) | intervals to backed -500 MiB | ms to backed -500 MiB | released MiB/s (in the free) | backed before / after (MiB) |"
    );
    println!("|---|---|---|---|---|---|");
    for reporting in [false, true] {
        let (s, rows) = run(RunOptions {
            workload: spec.into(),
            mem: 1 << 30,
            interval,
            free_page_reporting: reporting,
            ..RunOptions::default()
        });
        let free = &s.phases[3];
        let before = rows
            .iter()
            .filter(|r| r.phase == "idle 300ms")
            .map(backed_mib)
            .fold(0.0, f64::max);
        let start = free.start_s;
        let first = rows.iter().position(|r| r.time_s >= start);
        let done = rows
            .iter()
            .position(|r| r.time_s >= start && backed_mib(r) <= before - 500.0);
        let after = rows.last().map_or(0.0, backed_mib);
        let (intervals, ms) = match (first, done) {
            (Some(f), Some(d)) => (
                format!("{}", d - f + 1),
                format!("{:.0}", (rows[d].time_s - start) * 1e3),
            ),
            _ => ("never".into(), "-".into()),
        };
        let rate = if reporting {
            format!("{:.0}", 512.0 / free.guest_seconds)
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.2} | {intervals} | {ms} | {rate} | {before:.0} / {after:.0} |",
            if reporting { "on" } else { "off" },
            free.guest_seconds * 1e3,
        );
    }
    println!();
}

/// The guest's cost of one reported extent: 24 frees of 4 MiB, each reporting one extent.
fn extent() {
    let frees = 24;
    let spec = format!("alloc 200M; touch 200M write{}", "; free 4M".repeat(frees));
    println!("## Cost per reported extent: `alloc 200M; touch 200M write; free 4M` x {frees}");
    println!();
    println!(
        "| reporting | extents reported | mean free (guest us) | per extent (us) | slowdown of a free |"
    );
    println!("|---|---|---|---|---|");
    let mut base = 0.0;
    for reporting in [false, true] {
        let (s, _) = run(RunOptions {
            workload: spec.clone(),
            mem: 512 * MIB,
            interval: Duration::from_millis(200),
            free_page_reporting: reporting,
            ..RunOptions::default()
        });
        let mean = s.phases[2..].iter().map(|p| p.guest_seconds).sum::<f64>() / frees as f64;
        let extents = s.balloon.as_ref().map_or(0, |b| b.reported_extents);
        if !reporting {
            base = mean;
            println!("| off | 0 | {:.1} | - | - |", mean * 1e6);
        } else {
            // The first free also reports the never-used rest of the pool: one extent more.
            let per = (mean - base) * frees as f64 / extents.max(1) as f64;
            println!(
                "| on | {extents} | {:.1} | {:.1} | {:.1}x |",
                mean * 1e6,
                per * 1e6,
                mean / base
            );
        }
    }
    println!();
}

/// Host usage over time of a 1 GiB guest held to 256 MiB while it frees and re-allocates.
fn limit() {
    let spec = "alloc 200M; touch 200M write; free 150M; alloc 150M; touch 200M write; \
                free 100M; alloc 100M; touch 200M write random 1s; idle 300ms";
    println!("## Limit: 1 GiB guest, --limit 256M, --interval 200ms, `{spec}`");
    println!();
    let (s, rows) = run(RunOptions {
        workload: spec.into(),
        mem: 1 << 30,
        limit: Some(256 * MIB),
        interval: Duration::from_millis(200),
        ..RunOptions::default()
    });
    println!(
        "| time (s) | phase | host (MiB) | backed (MiB) | overhead (MiB) | balloon (MiB) | guest free (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let h = r.host.as_ref().unwrap();
        let b = r.balloon.as_ref().unwrap();
        println!(
            "| {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |",
            r.time_s,
            r.phase,
            h.host_mib,
            h.backed_mib,
            h.overhead_mib,
            b.balloon_mib,
            r.guest.free_mib
        );
    }
    let max_backed = rows.iter().map(backed_mib).fold(0.0, f64::max);
    let max_host = rows
        .iter()
        .map(|r| r.host.as_ref().unwrap().host_mib)
        .fold(0.0, f64::max);
    println!();
    let boot = rows.iter().filter(|r| r.phase == "boot").count();
    println!(
        "max backed {max_backed:.1} MiB (limit 256), max host {max_host:.1} MiB; the kernel inflated \
         {} MiB before BOOT ({boot} rows of boot)",
        s.balloon.as_ref().map_or(0, |b| b.inflated_pages) / 256
    );
    println!();
}

/// The VMM's cost of one release of 64 pages (one reported 256 KiB extent), by guest size: the
/// release through the VM (the dirty log of the memslot it touches, the discard, the clear of its
/// words) and the map told, against the sequence before (one whole-RAM memslot: the whole dirty
/// log read, a RAM-sized mask, a whole-slot clear, the map told the whole mask), replayed here
/// with the same calls.
fn release() {
    const RANGE: u64 = 64;
    const ROUNDS: usize = 200;
    println!(
        "## Cost of one release of {RANGE} pages (VMM side, vCPU stopped), median of {ROUNDS}, microseconds"
    );
    println!();
    println!(
        "| guest | 1 GiB memslots (now) | one whole-RAM memslot, whole-RAM ioctls and mask (before) |"
    );
    println!("|---|---|---|");
    for gib in [1u64, 16, 64] {
        let bytes = gib << 30;
        let pages = bytes / PAGE_SIZE;
        let mut times = [Vec::new(), Vec::new()];
        for (before, t) in times.iter_mut().enumerate() {
            let ram = GuestRam::new(bytes, false).expect("guest RAM");
            let vm = if before == 1 {
                Vm::with_slot_pages(ram, Some(pages))
            } else {
                Vm::new(ram)
            }
            .expect("VM");
            let mut map = PmpMmpMap::new(vm.ram().host_addr(), pages).expect("map");
            for i in 0..ROUNDS as u64 {
                // Ranges spread over the RAM, written first so that there is something to drop.
                let start = (i * 7919 * RANGE) % (pages - RANGE);
                let r: Range<u64> = start..start + RANGE;
                for p in r.clone() {
                    vm.ram().write_obj(p * PAGE_SIZE, p + 1).expect("write");
                }
                let t0 = Instant::now();
                if before == 1 {
                    let (dirty, _) = vm.dirty_log().expect("dirty log");
                    vm.memory().discard(r.clone()).expect("discard");
                    let mut mask = Bitmap::new(pages);
                    mask.set_range(r.clone());
                    vm.clear_dirty(mask.words()).expect("clear");
                    map.note_released(r.clone(), &Window::new(0, dirty), 1);
                    map.note_cleared(mask.words());
                } else {
                    let released = vm.release(std::slice::from_ref(&r)).expect("release");
                    for rel in &released {
                        map.note_released(rel.pages.clone(), &rel.dirty, 1);
                        map.note_cleared_in(rel.pages.clone());
                    }
                }
                t.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        println!(
            "| {gib} GiB | {:.0} | {:.0} |",
            median(&mut times[0]),
            median(&mut times[1])
        );
    }
    println!();
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("balloon benchmarks need /dev/kvm; skipped");
        return;
    }
    if want("reclaim") {
        reclaim();
    }
    if want("extent") {
        extent();
    }
    if want("release") {
        release();
    }
    if want("limit") {
        limit();
    }
}
