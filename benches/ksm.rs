//! Page sharing (KSM) experiments (README, "Page sharing"). Each needs root, /dev/kvm and
//! /sys/kernel/mm/ksm; every KSM knob changed is put back at the end (also on a panic).
//!
//! `cargo bench --bench ksm [-- identical [N...]|cow|bias|sharing|gap [BUDGET]]`
//!
//! 1. `identical`: after Waldspurger, OSDI'02 (Fig. 4): n identical guests (`memvisor host
//!    --ksm-run`, the same workload writing 32 MiB whose contents depend only on the page index),
//!    at ksmd's default scan rate. Sharing approaches (n − 1)/n of their memory: each VM's saving,
//!    the host total, the kernel's `pages_sharing`, the time to converge and ksmd's CPU time per
//!    GiB merged.
//! 2. `cow`: the guest's write slowdown on shared pages: a pass writing 32 MiB of merged pages
//!    (every write a copy-on-write break) against the same pass over private pages.
//! 3. `bias`: the access sampler over half-merged memory: KSM pages refuse `UFFDIO_MOVE`, so the
//!    sampler replaces them by unshared pages; reads of only the merged half are then missed.
//! 4. `sharing`: the host scheduler with and without sharing on the same overcommitted budget:
//!    three identical VMs under `memvisor host`, once without `ksm` and once with `ksm` and
//!    `--ksm-run` (and a control with `ksm` and no pressure); each VM's target, guest target,
//!    grant, saving, balloon, swap and work rate, and the host's state and free memory.
//! 5. `gap [BUDGET]`: the `sharing` run with `ksm` on a tight budget (60M by default), the
//!    kernel's `pages_sharing` and `ksm_merging_pages` against the PFN count period by period.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memvisor::memory::ksm::{self, KsmRun};
use memvisor::vmm::config::{RunConfig, RunOptions};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// ksmd's CPU time so far, seconds (utime + stime of the kernel thread), if found.
fn ksmd_cpu_s() -> Option<f64> {
    let hz = 100.0; // USER_HZ
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ksmd" {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            // After the name: state is field 3, utime 14 and stime 15 (1-based, whole line).
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            return Some(ticks / hz);
        }
    }
    None
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn identical(ns: &[usize]) {
    println!(
        "identical guests: 48 MiB each, 32 MiB written alike; ksmd at its default rate \
         (pages_to_scan {}, sleep_millisecs {})",
        ksm::knob("pages_to_scan").unwrap(),
        ksm::knob("sleep_millisecs").unwrap()
    );
    println!(
        "{:>2} {:>10} {:>10} {:>10} {:>12} {:>10} {:>9} {:>12} {:>10}",
        "n",
        "ideal MiB",
        "saved MiB",
        "per VM",
        "kernel MiB",
        "saved/ideal",
        "conv s",
        "ksmd cpu s",
        "s per GiB"
    );
    for &n in ns {
        let ideal = (n as f64 - 1.0) * 32.0;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_memvisor"));
        cmd.args([
            "host",
            "--json",
            "--ksm-run",
            "--budget",
            "4G",
            "--period",
            "1s",
        ]);
        for i in 0..n {
            cmd.arg("--vm").arg(format!(
                "name=g{i},mem=48M,ksm,seed=1,access-samples=0,workload=alloc 32M; touch 32M write; idle 300s"
            ));
        }
        let cpu0 = ksmd_cpu_s();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn memvisor host");
        let started = Instant::now();
        let mut last: Option<(Value, f64)> = None;
        let mut converged = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let Ok(line) = line else { break };
            let row: Value = serde_json::from_str(&line).expect("a JSON row");
            let saved = f(&row["host"], "saved_mib");
            let t = started.elapsed().as_secs_f64();
            let done = if n == 1 {
                t >= 10.0
            } else {
                saved >= 0.99 * ideal
            };
            last = Some((row, t));
            if done {
                converged = Some(t);
                break;
            }
            if t > 280.0 {
                break;
            }
        }
        let cpu = ksmd_cpu_s().zip(cpu0).map(|(a, b)| a - b);
        // SAFETY: kill sends SIGTERM to our own child, which has not been waited for yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        let (row, _) = last.expect("rows");
        let vms = row["vms"].as_array().unwrap();
        let per_vm: Vec<f64> = vms.iter().map(|v| f(v, "saved_mib")).collect();
        let saved = f(&row["host"], "saved_mib");
        let kernel = f(&row["host"], "ksm_pages_sharing_mib");
        let per_gib = cpu.filter(|_| saved >= 1.0).map(|c| c / (saved / 1024.0));
        println!(
            "{n:>2} {ideal:>10.1} {saved:>10.1} {:>10.2} {kernel:>12.1} {:>10.3} {:>9} {:>12} {:>10}",
            per_vm.iter().sum::<f64>() / n as f64,
            if ideal > 0.0 { saved / ideal } else { f64::NAN },
            converged.map_or("-".into(), |t| format!("{t:.1}")),
            cpu.map_or("-".into(), |c| format!("{c:.2}")),
            per_gib.map_or("-".into(), |c| format!("{c:.1}")),
        );
    }
}

fn config(spec: &str, ksm: bool) -> RunConfig {
    let mut cfg = RunConfig::new(RunOptions {
        workload: spec.into(),
        mem: 64 * MIB,
        interval: Duration::from_millis(250),
        seed: Some(3),
        ksm,
        ..RunOptions::default()
    })
    .expect("options");
    cfg.console = memvisor::vmm::config::Console::Discard;
    cfg
}

fn cow() {
    // ksmd fast, so that the pages are merged before the first write pass.
    let mut k = KsmRun::start().unwrap();
    k.set("pages_to_scan", 4000).unwrap();
    let spec = "alloc 32M; touch 32M fill same; idle 3s; touch 32M write; touch 32M write";
    println!("write pass over 32 MiB (8192 pages), seq; median of 5 runs");
    println!(
        "{:<6} {:>14} {:>14} {:>12} {:>8}",
        "ksm", "1st pass ms", "2nd pass ms", "shared MiB", "ratio"
    );
    for on in [false, true] {
        let mut first = Vec::new();
        let mut second = Vec::new();
        let mut shared = 0.0;
        for _ in 0..5 {
            let (s, rows) = common::run_rows(config(spec, on));
            let ms = |i: usize| (s.phases[i].end_s - s.phases[i].start_s) * 1e3;
            first.push(ms(3));
            second.push(ms(4));
            shared = rows
                .iter()
                .filter(|r| r.phase.contains("idle"))
                .filter_map(|r| r.host.as_ref())
                .map(|h| h.shared_mib)
                .fold(0.0, f64::max);
        }
        let (a, b) = (common::median(&mut first), common::median(&mut second));
        println!(
            "{:<6} {a:>14.2} {b:>14.2} {shared:>12.1} {:>8.1}",
            if on { "on" } else { "off" },
            a / b
        );
    }
}

fn bias() {
    let mut k = KsmRun::start().unwrap();
    k.set("pages_to_scan", 4000).unwrap();
    // 16 MiB merged (fill same) and 16 MiB private; then only the merged half is read.
    let spec = "alloc 32M; touch 16M fill same; touch 32M write; touch 16M fill same; idle 3s; \
                touch 16M read random 6s";
    println!("access estimate while only the merged 16 MiB are read (truth: touched per interval)");
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>12}",
        "ksm", "truth MiB", "est MiB", "skipped", "shared MiB"
    );
    for on in [false, true] {
        let (_, rows) = common::run_rows(config(spec, on));
        let reading: Vec<_> = rows
            .iter()
            .filter(|r| r.phase.contains("read random") && !r.partial)
            .skip(2)
            .collect();
        let mean = |g: &dyn Fn(&memvisor::row::Row) -> f64| {
            reading.iter().map(|r| g(r)).sum::<f64>() / reading.len().max(1) as f64
        };
        println!(
            "{:<6} {:>10.1} {:>10.1} {:>10.1} {:>12.1}",
            if on { "on" } else { "off" },
            mean(&|r| r.truth.as_ref().map_or(0.0, |t| t.touched_mib)),
            mean(&|r| r.active.as_ref().map_or(0.0, |a| a.estimate_mib)),
            mean(&|r| r.active.as_ref().map_or(0.0, |a| a.skipped as f64)),
            mean(&|r| r.host.as_ref().map_or(0.0, |h| h.shared_mib)),
        );
    }
}

/// The kernel's KSM figures at one moment, pages: host-wide, and `ksm_merging_pages` summed over
/// the host's VMs (the children of `host_pid`) and over every other process.
#[derive(Clone, Copy, Default)]
struct KernelSample {
    pages_sharing: u64,
    pages_shared: u64,
    zero_pages: u64,
    ours_merging: u64,
    others_merging: u64,
}

fn kernel_sample(host_pid: u32) -> KernelSample {
    let h = ksm::host().unwrap_or_default();
    let children: Vec<u32> =
        std::fs::read_to_string(format!("/proc/{host_pid}/task/{host_pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    let (mut ours, mut others) = (0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(p) = ksm::process(Some(pid)) else {
            continue;
        };
        if children.contains(&pid) {
            ours += p.merging_pages;
        } else {
            others += p.merging_pages;
        }
    }
    KernelSample {
        pages_sharing: h.pages_sharing,
        pages_shared: h.pages_shared,
        zero_pages: h.zero_pages,
        ours_merging: ours,
        others_merging: others,
    }
}

/// One `memvisor host --json` run of `args` for `secs` seconds: its rows, each with the kernel's
/// figures read as it arrived.
fn host_rows(args: &[String], secs: f64) -> Vec<(Value, KernelSample)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .arg("host")
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn memvisor host");
    let started = Instant::now();
    let mut rows = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let row = serde_json::from_str::<Value>(&line).expect("a JSON row");
        rows.push((row, kernel_sample(child.id())));
        if started.elapsed().as_secs_f64() > secs {
            break;
        }
    }
    // SAFETY: kill sends SIGTERM to our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    rows
}

/// `runs`: (ksm on, budget) per run; `series`: print the kernel's figures against the PFN count
/// at every period of the runs with ksm.
fn sharing(runs: &[(bool, &str)], series: bool) {
    // ksmd 10 times its default rate (restored at the end), so that merging is done within the
    // run; `run` itself is left to `memvisor host --ksm-run`.
    let before = ksm::knob("run").unwrap();
    let mut k = KsmRun::start().unwrap();
    k.set("pages_to_scan", 1000).unwrap();
    ksm::set_knob("run", before).unwrap();
    let (secs, tail) = (45.0, 10);
    println!(
        "3 VMs of 48 MiB, each writing the same 32 MiB (fill unique, seed 1) then reading it at \
         random; {secs} s, 1 s periods; ksmd pages_to_scan 1000 (use_zero_pages {}); per VM: the \
         last period, rate: mean of the last {tail} periods",
        ksm::knob("use_zero_pages").unwrap_or(0)
    );
    println!(
        "{:<4} {:<6} {:<4} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9}",
        "ksm",
        "budget",
        "VM",
        "SZTGT",
        "guest",
        "GRANT",
        "SHRDSVD",
        "MCTLSZ",
        "SWCUR",
        "SWTGT",
        "rate"
    );
    let mut hosts = Vec::new();
    for &(on, budget) in runs {
        let ksm_opt = if on { "ksm," } else { "" };
        let mut args: Vec<String> = ["--budget", budget, "--period", "1s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if on {
            args.push("--ksm-run".into());
        }
        for name in ["a", "b", "c"] {
            args.push("--vm".into());
            args.push(format!(
                "name={name},mem=48M,{ksm_opt}seed=1,access-samples=0,workload=alloc 32M; \
                 touch 32M fill unique; touch 32M read 60s random"
            ));
        }
        let rows = host_rows(&args, secs);
        let (last, _) = rows.last().expect("rows");
        let recent = &rows[rows.len().saturating_sub(tail)..];
        let label = if on { "on" } else { "off" };
        for (i, v) in last["vms"].as_array().unwrap().iter().enumerate() {
            let rate = recent
                .iter()
                .map(|(r, _)| f(&r["vms"][i], "rate"))
                .sum::<f64>()
                / recent.len() as f64;
            println!(
                "{:<4} {:<6} {:<4} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>9.3e}",
                label,
                budget,
                v["name"].as_str().unwrap_or("?"),
                f(v, "target_mib"),
                f(v, "guest_target_mib"),
                f(v, "granted_mib"),
                f(v, "saved_mib"),
                f(v, "balloon_mib"),
                f(v, "swapped_mib"),
                f(v, "swap_target_mib"),
                rate
            );
        }
        // The host: its state over the run (periods in each), free memory at the end.
        let mut states: Vec<(String, usize)> = Vec::new();
        for (r, _) in &rows {
            let s = r["host"]["state"].as_str().unwrap_or("?").to_string();
            match states.iter_mut().find(|(n, _)| *n == s) {
                Some((_, c)) => *c += 1,
                None => states.push((s, 1)),
            }
        }
        let h = &last["host"];
        hosts.push(format!(
            "{label:<4} {budget:<6} state at the end {}, periods per state {:?}, changes {}, \
             free {:.1} MiB, saved {:.1} MiB (kernel pages_sharing {:.1} MiB)",
            h["state"].as_str().unwrap_or("?"),
            states,
            h["transitions"],
            f(h, "free_mib"),
            f(h, "saved_mib"),
            f(h, "ksm_pages_sharing_mib"),
        ));
        if on {
            hosts.push(kernel_gap(&rows, tail));
        }
        if on && series {
            println!(
                "period  pages_sharing−saved  ours_merging−SHRD  SWCUR moves  SWCUR   BAL  SHRDSVD  (MiB, all VMs)"
            );
            let per_mib = (MIB / 4096) as f64;
            for (r, k) in &rows {
                let sum = |key: &str| -> f64 {
                    r["vms"]
                        .as_array()
                        .map_or(0.0, |vs| vs.iter().map(|v| f(v, key)).sum())
                };
                println!(
                    "{:>6} {:>20.1} {:>18.1} {:>12.1} {:>6.1} {:>5.1} {:>8.1}",
                    r["period"],
                    k.pages_sharing as f64 / per_mib - sum("saved_mib"),
                    k.ours_merging as f64 / per_mib - sum("shared_mib"),
                    swap_moves(&rows, r),
                    sum("swapped_mib"),
                    sum("balloon_mib"),
                    sum("saved_mib"),
                );
            }
        }
    }
    for h in hosts {
        println!("{h}");
    }
}

/// The kernel's `pages_sharing` against the PFN count, over the last `tail` periods (MiB, mean
/// and range), split into what the kernel counts for our VMs' processes beyond the pages the
/// PFN count finds shared (mappings gone but still in ksmd's stable tree until its next pass),
/// and what other processes of the host merge.
fn kernel_gap(rows: &[(Value, KernelSample)], tail: usize) -> String {
    let per_mib = (MIB / 4096) as f64;
    let sum = |r: &Value, k: &str| -> f64 {
        r["vms"]
            .as_array()
            .map_or(0.0, |vs| vs.iter().map(|v| f(v, k)).sum())
    };
    let recent = &rows[rows.len().saturating_sub(tail)..];
    let series = |g: &dyn Fn(&Value, &KernelSample) -> f64| -> String {
        let xs: Vec<f64> = recent.iter().map(|(r, k)| g(r, k)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let (lo, hi) = xs
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        format!("{mean:.1} ({lo:.1} to {hi:.1})")
    };
    let mib = |p: u64| p as f64 / per_mib;
    let (r_last, k_last) = &rows[rows.len() - 1];
    format!(
        "     kernel over the last {tail} periods, MiB mean (range): pages_sharing − PFN saved {}; \
         our VMs' ksm_merging_pages − PFN SHRD {}; other processes' ksm_merging_pages {}; \
         pages_sharing + pages_shared − all ksm_merging_pages {}; ksm_zero_pages {}; \
         swap out+in MiB per period {}; at the end: pages_sharing {:.1}, pages_shared {:.1}, \
         ours merging {:.1}, PFN saved {:.1}, PFN SHRD {:.1}",
        series(&|r, k| mib(k.pages_sharing) - sum(r, "saved_mib")),
        series(&|r, k| mib(k.ours_merging) - sum(r, "shared_mib")),
        series(&|_, k| mib(k.others_merging)),
        series(
            &|_, k| mib(k.pages_sharing + k.pages_shared) - mib(k.ours_merging + k.others_merging)
        ),
        series(&|_, k| mib(k.zero_pages)),
        series(&|r, _| swap_moves(rows, r)),
        mib(k_last.pages_sharing),
        mib(k_last.pages_shared),
        mib(k_last.ours_merging),
        sum(r_last, "saved_mib"),
        sum(r_last, "shared_mib"),
    )
}

/// MiB swapped out or in by all VMs since the row before `r` (from SWCUR's changes: a lower bound).
fn swap_moves(rows: &[(Value, KernelSample)], r: &Value) -> f64 {
    let Some(i) = rows.iter().position(|(x, _)| std::ptr::eq(x, r)) else {
        return 0.0;
    };
    let Some((prev, _)) = i.checked_sub(1).map(|j| &rows[j]) else {
        return 0.0;
    };
    let vms = |x: &Value| x["vms"].as_array().cloned().unwrap_or_default();
    vms(r)
        .iter()
        .zip(vms(prev))
        .map(|(a, b)| (f(a, "swapped_mib") - f(&b, "swapped_mib")).abs())
        .sum()
}

fn main() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !ksm::available() {
        eprintln!("SKIPPED: the KSM experiments need root and /sys/kernel/mm/ksm");
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let which = args.first().map(String::as_str);
    if matches!(which, None | Some("identical")) {
        let ns: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
        identical(if ns.is_empty() { &[1, 2, 4, 6] } else { &ns });
    }
    if matches!(which, None | Some("cow")) {
        cow();
    }
    if matches!(which, None | Some("bias")) {
        bias();
    }
    if matches!(which, None | Some("sharing")) {
        // The third run is the control for the kernel's figures: no pressure, so nothing is ever
        // ballooned or swapped.
        sharing(&[(false, "100M"), (true, "100M"), (true, "400M")], false);
    }
    if which == Some("gap") {
        // `gap BUDGET`: the kernel's figures against the PFN count period by period, with ksm, on
        // a budget tight enough that sharing does not spare the VMs reclamation.
        sharing(&[(true, args.get(1).map_or("60M", String::as_str))], true);
    }
}
