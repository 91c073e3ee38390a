//! Hypervisor swap (`--swap`): pages written out and dropped at interval boundaries come back
//! intact on the guest's next access, kernel pages included; the map and the process's Rss agree
//! with the swapped amount; a full swap file stops swapping and loses nothing; a stopped run
//! leaves no file behind.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use memvisor::row::{Row, Swap};
use memvisor::vmm;
use memvisor::vmm::config::{RunOptions, SwapOptions};

const MIB: u64 = 1 << 20;

/// One guest at a time in this test binary: the Rss check reads every guest RAM mapping of the
/// process.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// `spec` on `mem` bytes with swap to a file in `dir`, towards `target` bytes.
fn swap_config(spec: &str, mem: u64, dir: &Path, target: u64) -> RunOptions {
    RunOptions {
        swap: SwapOptions {
            swap: Some(dir.join("guest.vswp")),
            swap_target: Some(target),
            swap_policy: None,
        },
        ..common::config(spec, mem)
    }
}

fn swap(r: &Row) -> &Swap {
    r.swap.as_ref().expect("a swap object on every row")
}

/// Rss of guest RAM of `bytes` bytes in KiB: the run of adjacent mappings with
/// `MADV_NOHUGEPAGE` (guest RAM has it; userfaultfd registration splits it into several) whose
/// sizes add up to `bytes` (thread stacks may have the flag too, apart).
fn guest_rss_kib(bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let kib = |v: &str| {
        v.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    // (start, end, rss KiB, nh) per mapping.
    let mut maps: Vec<(u64, u64, u64, bool)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            maps.push((a, b, 0, false));
        } else if let Some(v) = line.strip_prefix("Rss:") {
            maps.last_mut()?.2 = kib(v);
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            maps.last_mut()?.3 = v.split_whitespace().any(|f| f == "nh");
        }
    }
    let mut run: Option<(u64, u64, u64)> = None; // (start, end, rss)
    for &(a, b, rss, nh) in maps.iter().chain([(0, 0, 0, false)].iter()) {
        match run {
            Some((s, e, r)) if nh && a == e => run = Some((s, b, r + rss)),
            _ => {
                if let Some((s, e, r)) = run
                    && e - s == bytes
                {
                    return Some(r);
                }
                run = nh.then_some((a, b, rss));
            }
        }
    }
    None
}

#[test]
fn swapped_pages_come_back_intact_with_the_sampler_and_the_balloon() {
    if !common::kvm("swapped_pages_come_back_intact_with_the_sampler_and_the_balloon") {
        return;
    }
    let _one = one_guest();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = swap_config(
        "alloc 64M; touch 64M write; idle 1200ms; free 16M; idle 800ms; check 48M; \
         touch 48M mixed random 1s verify; check 48M",
        128 * MIB,
        dir.path(),
        40 * MIB,
    );
    opts.free_page_reporting = true;
    assert!(opts.access_samples > 0, "the access sampler runs");
    let (_, rows) = common::run_cfg(opts).unwrap_or_else(|e| panic!("{e}"));
    let checks: Vec<_> = rows.iter().filter_map(|r| r.check.as_ref()).collect();
    assert_eq!(checks.len(), 2, "both check phases reported");
    for c in checks {
        assert_eq!(c.checked_pages, 48 * 256);
        assert_eq!(c.intact_pages, c.checked_pages, "{c:?}");
        assert_eq!(c.zero_pages, 0);
    }
    let most = rows.iter().map(|r| swap(r).swapped_mib).fold(0.0, f64::max);
    assert!(most >= 39.0, "swapped at most {most} MiB");
    let ins: u64 = rows.iter().map(|r| swap(r).page_ins).sum();
    let outs: u64 = rows.iter().map(|r| swap(r).page_outs).sum();
    assert!(ins > 1000, "{ins} page-ins");
    assert!(outs >= 40 * 256, "{outs} page-outs");
    assert!(rows.iter().all(|r| !swap(r).stopped));
    let reported = rows
        .iter()
        .filter_map(|r| r.balloon.as_ref())
        .map(|b| b.reported_mib)
        .fold(0.0, f64::max);
    assert!(reported > 0.0, "the balloon released the freed pages");
    // Waits are measured where there were page-ins.
    for r in rows.iter().filter(|r| swap(r).page_ins > 0) {
        let (p50, p99) = (
            swap(r).page_in_us_p50.unwrap(),
            swap(r).page_in_us_p99.unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99, "{:?}", swap(r));
        // The waits added up, in ms: at least the p99 wait, and at least half of them at p50.
        let in_us = swap(r).in_ms * 1e3;
        let half = (swap(r).page_ins / 2) as f64;
        assert!(
            in_us >= p99 * 0.999 && in_us >= half * p50 * 0.999,
            "{:?}",
            swap(r)
        );
    }
    for r in rows.iter().filter(|r| swap(r).page_ins == 0) {
        // +0.0 exactly (JSON would show a -0.0).
        assert_eq!(swap(r).in_ms.to_bits(), 0.0f64.to_bits(), "{:?}", swap(r));
    }
    assert!(rows.iter().any(|r| swap(r).out_ms > 0.0), "{rows:?}");
}

#[test]
fn the_guests_kernel_pages_are_swapped_and_come_back() {
    if !common::kvm("the_guests_kernel_pages_are_swapped_and_come_back") {
        return;
    }
    let _one = one_guest();
    let dir = tempfile::tempdir().unwrap();
    // A target above everything backed: every page the guest has, its kernel's page tables,
    // code and stack included, is swapped out at each boundary.
    let mut opts = swap_config(
        "alloc 4M; touch 4M write; idle 1500ms; touch 4M read 600ms; check 4M",
        64 * MIB,
        dir.path(),
        60 * MIB,
    );
    opts.swap.swap_policy = Some(memvisor::memory::swap::Policy::Random);
    let (s, rows) = common::run_cfg(opts).unwrap_or_else(|e| panic!("{e}"));
    let idle: Vec<&Row> = rows
        .iter()
        .filter(|r| r.phase == "idle 1.5s" && swap(r).swapped_mib > 3.5)
        .collect();
    assert!(!idle.is_empty(), "{rows:?}");
    let emptied = idle
        .iter()
        .filter(|r| r.host.as_ref().unwrap().backed_mib < 1.0)
        .count();
    assert!(emptied > 0, "guest RAM emptied at some boundary: {idle:?}");
    // The idle guest's kernel keeps running: its own pages come back.
    let ins: u64 = idle.iter().skip(1).map(|r| swap(r).page_ins).sum();
    assert!(ins > 0, "{idle:?}");
    let c = rows
        .iter()
        .find_map(|r| r.check.as_ref())
        .expect("check ran");
    assert_eq!(c.intact_pages, 4 * 256);
    assert!(s.phases.iter().all(|p| p.ended), "{:?}", s.phases);
}

#[test]
fn the_map_shows_swapped_pages_and_rss_agrees() {
    if !common::kvm("the_map_shows_swapped_pages_and_rss_agrees") {
        return;
    }
    let _one = one_guest();
    let dir = tempfile::tempdir().unwrap();
    let opts = swap_config(
        "alloc 48M; touch 48M write; idle 2s",
        96 * MIB,
        dir.path(),
        32 * MIB,
    );
    let mut rows = Vec::new();
    let s = vmm::run(common::validated(opts), &mut |r: &Row| {
        rows.push((r.clone(), guest_rss_kib(96 * MIB)));
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let idle: Vec<&(Row, Option<u64>)> = rows
        .iter()
        .filter(|(r, _)| r.phase == "idle 2s" && r.end.is_none())
        .collect();
    assert!(idle.len() >= 3, "{rows:?}");
    for (r, rss_kib) in &idle[1..] {
        let rss_kib = rss_kib.expect("guest RAM found in smaps");
        let h = r.host.as_ref().unwrap();
        let sw = swap(r);
        assert!((sw.swapped_mib - 32.0).abs() < 0.1, "{sw:?}");
        assert_eq!(sw.target_mib, 32.0);
        assert_eq!(h.swapped_mib, 0.0, "the host kernel swapped nothing");
        // 48 MiB written by the app and the kernel's own pages: what is not swapped is backed.
        let total = h.backed_mib + sw.swapped_mib;
        assert!(total > 48.0 && total < 56.0, "{h:?} {sw:?}");
        let rss_mib = rss_kib as f64 / 1024.0;
        assert!(
            (rss_mib - h.backed_mib).abs() <= 2.0,
            "Rss {rss_mib} MiB, backed {} MiB",
            h.backed_mib
        );
    }
    // The boundary's time swapping out: on the rows that swapped out, and none on a row whose
    // boundary found the target reached (it swapped nothing).
    let rows: Vec<&Row> = rows.iter().map(|(r, _)| r).collect();
    let outs: Vec<&Swap> = rows
        .iter()
        .map(|r| swap(r))
        .filter(|s| s.page_outs > 0)
        .collect();
    assert!(!outs.is_empty(), "{rows:?}");
    for sw in outs {
        assert!(sw.out_ms > 0.0, "{sw:?}");
    }
    let reached: Vec<&Swap> = rows
        .iter()
        .map(|r| swap(r))
        .filter(|s| s.page_outs == 0 && s.swapped_mib >= s.target_mib)
        .collect();
    assert!(!reached.is_empty(), "{rows:?}");
    for sw in reached {
        assert_eq!(sw.out_ms, 0.0, "{sw:?}");
    }
    // The map at the end: the swapped pages are VmmSwapped, not Swapped.
    assert!(s.map.vmm_swapped >= 31 * 256, "{:?}", s.map);
    assert_eq!(s.map.swapped, 0);
}

/// Spawns the binary with `args` and JSON rows on stdout, returning the child and a reader.
fn spawn(args: &[&str]) -> (Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = common::memvisor()
        .arg("run")
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Reads rows until one has at least `mib` swapped out (a minute at most).
fn until_swapped(lines: &mut impl Iterator<Item = std::io::Result<String>>, mib: f64) -> Row {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "nothing swapped within a minute");
        let line = lines.next().expect("a row").expect("utf-8");
        let row: Row = serde_json::from_str(&line).unwrap();
        if row.swap.as_ref().is_some_and(|s| s.swapped_mib >= mib) {
            return row;
        }
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut s).unwrap();
    s
}

/// A tmpfs of a given size mounted on a directory of ours, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Self {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes}"))
            .arg("memvisor-test")
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "root mounts a tmpfs");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_swap_file_stops_swapping_and_loses_nothing() {
    if !common::kvm("a_full_swap_file_stops_swapping_and_loses_nothing")
        || !common::root("a_full_swap_file_stops_swapping_and_loses_nothing")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _fs = Tmpfs::mount(&mnt, MIB);
    let file = mnt.join("s");
    let out = common::memvisor_output(&[
        "run",
        "--json",
        "--mem",
        "64M",
        "--interval",
        "200ms",
        "--timeout",
        "60s",
        "--workload",
        "alloc 16M; touch 16M write; idle 1s; check 16M",
        "--swap",
        file.to_str().unwrap(),
        "--swap-target",
        "12M",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("hypervisor swap stops").count(),
        1,
        "said once: {stderr}"
    );
    assert!(stderr.contains("no space left"), "{stderr}");
    let rows: Vec<Row> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.iter().any(|r| swap(r).stopped), "{rows:?}");
    let most = rows.iter().map(|r| swap(r).swapped_mib).fold(0.0, f64::max);
    assert!(most > 0.0 && most < 2.0, "a 1 MiB file held {most} MiB");
    let c = rows
        .iter()
        .find_map(|r| r.check.as_ref())
        .expect("check ran");
    assert_eq!(c.intact_pages, 16 * 256, "{c:?}");
    assert!(!file.exists(), "removed at the end");
}

#[test]
fn sigterm_while_swapped_prints_the_final_row_and_removes_the_file() {
    if !common::kvm("sigterm_while_swapped_prints_the_final_row_and_removes_the_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("guest.vswp");
    let (mut child, mut lines) = spawn(&[
        "--mem",
        "64M",
        "--interval",
        "200ms",
        "--workload",
        "alloc 16M; touch 16M write; idle 60s",
        "--swap",
        file.to_str().unwrap(),
        "--swap-target",
        "8M",
    ]);
    until_swapped(&mut lines, 7.9);
    assert!(file.exists(), "the named file is there while pages are out");
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill only sends a signal to the child we spawned (its pid is live: not reaped yet).
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = common::wait_bounded(&mut child, Duration::from_secs(20));
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(143), "{stderr}");
    let last: Row = serde_json::from_str(rest.last().expect("a final row")).unwrap();
    assert_eq!(last.end, Some(memvisor::row::EndReason::Sigterm));
    assert!(swap(&last).swapped_mib > 7.0, "{last:?}");
    assert!(!file.exists(), "the swap file is removed");
}

#[test]
fn sigkill_leaves_nothing_of_an_unnamed_swap_file() {
    if !common::kvm("sigkill_leaves_nothing_of_an_unnamed_swap_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = spawn(&[
        "--mem",
        "64M",
        "--interval",
        "200ms",
        "--workload",
        "alloc 16M; touch 16M write; idle 60s",
        "--swap",
        dir.path().to_str().unwrap(),
        "--swap-target",
        "8M",
    ]);
    until_swapped(&mut lines, 7.9);
    // The process holds an unnamed file in the directory, which has no entry.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap();
    let held = fds
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .any(|t| t.starts_with(dir.path()));
    assert!(held, "the swap file is open in the directory");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing left"
    );
}

#[test]
fn a_swap_file_that_cannot_be_read_ends_the_run_with_a_final_row() {
    if !common::kvm("a_swap_file_that_cannot_be_read_ends_the_run_with_a_final_row") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("guest.vswp");
    let (mut child, mut lines) = spawn(&[
        "--mem",
        "64M",
        "--interval",
        "200ms",
        "--workload",
        "alloc 16M; touch 16M write; idle 1s; touch 16M read 20s",
        "--swap",
        file.to_str().unwrap(),
        "--swap-target",
        "8M",
    ]);
    until_swapped(&mut lines, 7.9);
    // The file loses its contents behind the VMM's back: the next page-in cannot read its slot.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = common::wait_bounded(&mut child, Duration::from_secs(30));
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("could not be read back"), "{stderr}");
    assert!(stderr.contains("slot"), "{stderr}");
    let last: Row = serde_json::from_str(rest.last().expect("a final row")).unwrap();
    assert_eq!(last.end, Some(memvisor::row::EndReason::SwapError));
    assert!(!file.exists(), "the swap file is removed");
}
