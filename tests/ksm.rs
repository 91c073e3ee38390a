//! Page contents for page sharing: `touch ... fill zero|same|unique` writes what it says, and
//! `verify` and `check` expect each page's last fill.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::memvisor;
use memvisor::contract::protocol::GuestError;
use memvisor::row::Row;
use memvisor::vmm::RunError;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// One guest at a time in this test binary: KSM tests read this process's mappings and the
/// host's KSM counters.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// The check phases' (checked, intact, zero) page counts, added up (checks ending in one
/// interval share a row).
fn checks(rows: &[Row]) -> (u64, u64, u64) {
    rows.iter()
        .filter_map(|r| r.check.as_ref())
        .fold((0, 0, 0), |(c, i, z), k| {
            (c + k.checked_pages, i + k.intact_pages, z + k.zero_pages)
        })
}

#[test]
fn every_fill_holds_under_verify_and_check() {
    if !common::kvm("every_fill_holds_under_verify_and_check") {
        return;
    }
    // Each fill over the others, read back by verify (read and mixed) and by check; the last
    // check holds three fills side by side.
    let spec = "alloc 8M; touch 8M write; touch 8M write fill same; touch 8M read verify; \
                check 8M; touch 8M fill zero; touch 8M read verify random; check 8M; \
                touch 8M mixed verify fill same; touch 4M fill unique; touch 2M fill zero; \
                touch 8M read verify; idle 300ms; check 8M";
    let (_, rows) = common::run_ok(spec, 32 * MIB);
    let pages = 8 * 256;
    assert_eq!(
        checks(&rows),
        (3 * pages, 3 * pages, 0),
        "every page holds its last fill (a zero fill is intact, not lost)"
    );
}

#[test]
fn a_page_holding_another_fill_fails_verify_and_check() {
    if !common::kvm("a_page_holding_another_fill_fails_verify_and_check") {
        return;
    }
    // Freed pages forget their fill: allocated again, the app expects its unique word, but they
    // still hold the seed's word, so check finds no intact page and verify fails.
    let (_, rows) = common::run_ok(
        "alloc 8M; touch 8M fill same; free 8M; alloc 8M; check 8M",
        32 * MIB,
    );
    assert_eq!(
        checks(&rows),
        (8 * 256, 0, 0),
        "no page holds its index + 1"
    );
    let err = common::run_cfg(common::config(
        "alloc 8M; touch 8M fill same; free 8M; alloc 8M; touch 8M read verify",
        32 * MIB,
    ))
    .expect_err("verify must fail");
    assert!(
        matches!(
            err,
            RunError::Guest(GuestError::NeverWritten { accesses, .. }) if accesses == 8 * 256
        ),
        "{err}"
    );
}

#[test]
fn ksm_makes_guest_ram_mergeable() {
    if !common::kvm("ksm_makes_guest_ram_mergeable") {
        return;
    }
    if !std::path::Path::new("/sys/kernel/mm/ksm").exists() {
        eprintln!(
            "SKIPPED ksm_makes_guest_ram_mergeable: no /sys/kernel/mm/ksm (kernel without KSM)"
        );
        return;
    }
    let _one = one_guest();
    // Mappings of this process with the `mg` (mergeable) flag.
    let mergeable = || {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        smaps
            .split("VmFlags:")
            .skip(1)
            .filter(|f| {
                f.lines()
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .any(|f| f == "mg")
            })
            .count()
    };
    let plain = memvisor::vmm::setup(common::validated(common::config("alloc 4M", 16 * MIB)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mergeable(), 0, "without --ksm nothing is mergeable");
    drop(plain);
    let mut opts = common::config("alloc 4M", 16 * MIB);
    opts.ksm = true;
    let ready = memvisor::vmm::setup(common::validated(opts)).unwrap_or_else(|e| panic!("{e}"));
    assert!(mergeable() >= 1, "guest RAM is mergeable");
    drop(ready);
}

/// Starts ksmd fast for a test (restored when dropped, also when the test panics), or `None`
/// where the kernel has no KSM (the test is skipped, and says so).
fn ksmd_fast(test: &str) -> Option<memvisor::memory::ksm::KsmRun> {
    use memvisor::memory::ksm;
    if !ksm::available() {
        eprintln!("SKIPPED {test}: no {} (kernel without KSM)", ksm::KSM_DIR);
        return None;
    }
    let mut run = ksm::KsmRun::start().expect("start ksmd");
    run.set("pages_to_scan", 2000).expect("pages_to_scan");
    run.set("sleep_millisecs", 10).expect("sleep_millisecs");
    Some(run)
}

fn host(r: &Row) -> &memvisor::row::HostUsage {
    r.host.as_ref().expect("host usage on every row")
}

/// A VM whose sharers are all its own: SHRDSVD = SHRD − frames (m pages on a frame save m − 1),
/// and host usage = `backed` − `saved` + `ovhd`.
fn assert_sharing_within_the_vm(r: &memvisor::row::HostUsage) {
    let saved = r.shared_saved_mib * 256.0;
    assert!(
        (saved - (pages(r.shared_mib) - r.shared_frames) as f64).abs() < 1e-6,
        "SHRDSVD = SHRD − frames: {r:?}"
    );
    assert!(
        (r.host_mib - (r.backed_mib - r.shared_saved_mib + r.overhead_mib)).abs() < 0.01,
        "host = backed − saved + ovhd: {r:?}"
    );
}

/// What a test with a guest under a fast ksmd needs: KVM, root (PFNs), the guest to itself and
/// ksmd started fast (restored when dropped); `None` (skipped, saying why) without one of them.
fn ksm_guest(
    test: &str,
) -> Option<(
    std::sync::MutexGuard<'static, ()>,
    memvisor::memory::ksm::KsmRun,
)> {
    if !common::kvm(test) || !common::root(test) {
        return None;
    }
    let one = one_guest();
    ksmd_fast(test).map(|k| (one, k))
}

#[test]
fn identical_pages_merge_and_a_write_unshares_them_within_an_interval() {
    let test = "identical_pages_merge_and_a_write_unshares_them_within_an_interval";
    let Some((_one, _ksmd)) = ksm_guest(test) else {
        return;
    };
    // 16 MiB of identical pages, merged while the guest idles; then a quarter is written unique
    // (copy-on-write breaks) and the rest verified.
    let mut opts = common::config(
        "alloc 16M; touch 16M fill same; idle 3s; touch 4M write; idle 600ms; \
         touch 16M read verify; idle 300ms",
        32 * MIB,
    );
    opts.ksm = true;
    opts.access_samples = 0;
    let (_, rows) = common::run_cfg(opts).unwrap_or_else(|e| panic!("{e}"));
    let phase = |r: &Row, p: &str| r.phase.contains(p);
    // The last interval of the first idle: 4096 identical heap pages, merged.
    let merged = rows
        .iter()
        .rfind(|r| phase(r, "idle 3s"))
        .expect("rows of the idle");
    let h = host(merged);
    let pages = 16 * 256;
    let shared = (h.shared_mib * 256.0).round() as u64;
    assert!(
        (pages..pages + 64).contains(&shared),
        "SHRD {shared} pages of {pages} identical ones: {h:?}"
    );
    // m pages on a frame save m - 1: with max_page_sharing (256 by default) frames of 256.
    let saved = h.shared_saved_mib * 256.0;
    let expect = (shared - h.shared_frames) as f64;
    assert!(
        (saved - expect).abs() < 1e-6,
        "saved {saved} vs {expect}: {h:?}"
    );
    assert!(h.shared_frames >= pages / 256, "{h:?}");
    // The kernel's own figures agree, within what ksmd merged since (nothing else merges here).
    let k = h.ksm.as_ref().expect("kernel figures with --ksm");
    assert!(
        k.merging_pages.abs_diff(shared) <= 64,
        "ksm_merging_pages {} vs SHRD {shared}",
        k.merging_pages
    );
    assert!(
        k.host_pages_sharing.abs_diff(saved.round() as u64) <= 64,
        "pages_sharing {} vs SHRDSVD {saved}",
        k.host_pages_sharing
    );
    // Usage: backed - saved + overhead.
    assert!(
        (h.host_mib - (h.backed_mib - h.shared_saved_mib + h.overhead_mib)).abs() < 0.01,
        "{h:?}"
    );
    // The first interval after the write: its 1024 pages are private again.
    let after = rows
        .iter()
        .find(|r| phase(r, "idle 600ms"))
        .expect("rows after the write");
    let now = (host(after).shared_mib * 256.0).round() as u64;
    assert!(
        now + 1024 <= shared && now + 1024 + 64 >= shared,
        "SHRD {now} after writing 1024 of {shared} shared pages"
    );
}

/// ksmd's `run` now.
fn ksm_run_now() -> u64 {
    memvisor::memory::ksm::knob("run").expect("read run")
}

/// `memvisor host --ksm-run --json` with two VMs of the same seed and content: it starts ksmd,
/// both VMs' pages merge across the VMs, each VM's saving is its (m − 1)/m part and the parts add
/// up to the host's total and to the kernel's `pages_sharing`; SIGTERM ends it and ksmd's `run`
/// is back to what it was.
#[test]
fn two_identical_vms_share_across_and_ksm_run_is_restored_after_sigterm() {
    let test = "two_identical_vms_share_across_and_ksm_run_is_restored_after_sigterm";
    if !common::kvm(test) || !common::root(test) {
        return;
    }
    let _one = one_guest();
    if !memvisor::memory::ksm::available() {
        eprintln!("SKIPPED {test}: no /sys/kernel/mm/ksm (kernel without KSM)");
        return;
    }
    let before = ksm_run_now();
    // Faster scanning for the test only (restored when dropped); `run` is the host's to set.
    let mut scan = memvisor::memory::ksm::KsmRun::start().unwrap();
    scan.set("pages_to_scan", 2000).unwrap();
    memvisor::memory::ksm::set_knob("run", before).unwrap();
    let vm = |name: &str| {
        format!(
            "name={name},mem=32M,ksm,seed=5,access-samples=0,workload=alloc 16M; touch 16M fill same; idle 60s"
        )
    };
    let mut child = memvisor()
        .args([
            "host",
            "--json",
            "--ksm-run",
            "--budget",
            "1G",
            "--period",
            "300ms",
        ])
        .args(["--vm", &vm("a"), "--vm", &vm("b")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor host");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut merged = None;
    let mut running_seen = false;
    for line in lines.by_ref().take(100) {
        let row: Value = serde_json::from_str(&line.unwrap()).expect("a JSON row");
        running_seen |= ksm_run_now() == 1;
        let shared: Vec<f64> = row["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["shared_mib"].as_f64().unwrap())
            .collect();
        if shared.iter().all(|&s| s >= 16.0) {
            merged = Some(row);
            break;
        }
    }
    // SAFETY: kill sends SIGTERM to our own child, which is still running (its stdout is open).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_bounded(&mut child, Duration::from_secs(30));
    drop(lines);
    let restored = ksm_run_now();
    drop(scan);
    assert!(running_seen, "--ksm-run started ksmd");
    assert_eq!(restored, before, "run restored after SIGTERM ({status:?})");
    let row = merged.expect("both VMs' pages merged within 100 periods");
    let vms = row["vms"].as_array().unwrap();
    let saved: Vec<f64> = vms
        .iter()
        .map(|v| v["saved_mib"].as_f64().unwrap())
        .collect();
    let total = row["host"]["saved_mib"].as_f64().unwrap();
    // The parts add up to the host's total (each rounded to whole pages by the host).
    assert!(
        (saved.iter().sum::<f64>() - total).abs() < 2.0 / 256.0,
        "{saved:?} vs {total}"
    );
    // 8192 identical pages in 256-way frames save 8192 − 32 pages; allow the guests' other
    // identical pages and the scan in progress a margin of 1 MiB.
    let ideal = (8192.0 - 32.0) / 256.0;
    assert!(
        (total - ideal).abs() <= 1.0,
        "saved {total} MiB, ideal {ideal}"
    );
    // Each VM's part is about half: sharing goes across the VMs.
    for s in &saved {
        assert!((s - ideal / 2.0).abs() <= 1.0, "{saved:?}");
    }
    let kernel = row["host"]["ksm_pages_sharing_mib"]
        .as_f64()
        .expect("kernel figure");
    assert!(
        (kernel - total).abs() <= 1.0,
        "kernel pages_sharing {kernel} MiB vs {total} MiB"
    );
}

#[test]
fn ksm_run_is_restored_after_a_normal_end() {
    let test = "ksm_run_is_restored_after_a_normal_end";
    if !common::kvm(test) || !common::root(test) {
        return;
    }
    let _one = one_guest();
    if !memvisor::memory::ksm::available() {
        eprintln!("SKIPPED {test}: no /sys/kernel/mm/ksm (kernel without KSM)");
        return;
    }
    let before = ksm_run_now();
    let out = memvisor()
        .args([
            "host",
            "--json",
            "--ksm-run",
            "--budget",
            "1G",
            "--period",
            "200ms",
        ])
        .args([
            "--vm",
            "name=a,mem=16M,ksm,workload=alloc 4M; touch 4M fill same; idle 400ms",
        ])
        .output()
        .expect("run memvisor host");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty(), "rows were printed");
    assert_eq!(ksm_run_now(), before, "run restored after the end");
}

/// Pages of a size in MiB (rows give whole pages in MiB).
fn pages(mib: f64) -> u64 {
    (mib * 256.0).round() as u64
}

/// Hypervisor swap on a VM whose pages are merged: swap takes every unshared backed page before
/// any shared one, shared ones go by whole frames (here all of the VM's own, so each frame taken
/// is freed), SHRD and SHRDSVD drop by what went, and `verify` then reads every page back intact.
#[test]
fn swap_takes_unshared_pages_first_and_verify_holds_after_it() {
    let test = "swap_takes_unshared_pages_first_and_verify_holds_after_it";
    let Some((_one, _ksmd)) = ksm_guest(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 24 MiB written unique, then its first 16 MiB the same page (merged into 256-way frames of
    // this VM only); after the swap every page is read back and checked.
    let mut opts = common::config(
        "alloc 24M; touch 24M fill unique; touch 16M fill same; idle 8s; \
         touch 24M read verify; idle 600ms",
        64 * MIB,
    );
    opts.ksm = true;
    opts.access_samples = 0;
    opts.interval = Duration::from_millis(200);
    opts.swap.swap = Some(dir.path().join("guest.vswp"));
    let vm = memvisor::Run::from_options(opts)
        .console(memvisor::Console::Discard)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut rows: Vec<Row> = Vec::new();
    let mut target = None;
    for row in vm.rows().iter() {
        let h = host(&row);
        // Once merged (and before the verify), swap out every unshared backed page and 4 MiB
        // of shared ones.
        if target.is_none() && row.phase.contains("idle 8s") && pages(h.shared_mib) >= 16 * 256 {
            let unshared = pages(h.backed_mib) - pages(h.shared_mib);
            let mib = unshared.div_ceil(256) + 4;
            vm.controller().set_swap_target(mib).expect("swap target");
            target = Some(mib * 256);
        }
        rows.push(row);
    }
    vm.wait()
        .unwrap_or_else(|e| panic!("verify holds after the swap: {e}"));
    let target = target.expect("16 MiB merged during the idle");
    // The boundary that swapped, and the row before it (the map it chose from).
    let k = rows
        .iter()
        .position(|r| r.swap.as_ref().is_some_and(|s| s.page_outs > 0))
        .expect("a swap-out");
    let (before, at) = (host(&rows[k - 1]), &rows[k]);
    let s = at.swap.as_ref().unwrap();
    let unshared_before = pages(before.backed_mib) - pages(before.shared_mib);
    eprintln!(
        "{test}: before the swap {} backed pages, {} shared on {} frames; swapped out {} pages, \
         {} of them shared",
        pages(before.backed_mib),
        pages(before.shared_mib),
        before.shared_frames,
        s.page_outs,
        s.shared_page_outs
    );
    assert_eq!(
        s.page_outs, target,
        "the target reached at one boundary: {s:?}"
    );
    assert_eq!(
        s.page_outs - s.shared_page_outs,
        unshared_before,
        "every unshared backed page first: {s:?}, before {before:?}"
    );
    assert!(
        s.shared_page_outs >= 4 * 256 - 256,
        "then shared ones: {s:?}"
    );
    // Every later boundary too (the verify's page-ins take the swapped total under the target,
    // and swap tops it up): shared pages only after all the unshared ones the map knew of.
    for w in rows[k..].windows(2) {
        let (prev, s) = (host(&w[0]), w[1].swap.as_ref().unwrap());
        if s.shared_page_outs > 0 {
            assert!(
                s.page_outs - s.shared_page_outs >= pages(prev.backed_mib) - pages(prev.shared_mib),
                "shared pages before unshared ones: {s:?}, before {prev:?}"
            );
        }
    }
    // The accounting follows at once: the swapped-out sharers left SHRD (ksmd may merge a few
    // other pages meanwhile), and with every sharer in this VM, SHRDSVD = SHRD − frames.
    let after = host(at);
    let shared_after = pages(after.shared_mib);
    assert!(
        (shared_after + s.shared_page_outs).abs_diff(pages(before.shared_mib)) <= 64,
        "SHRD {} before, {} swapped, {shared_after} after",
        pages(before.shared_mib),
        s.shared_page_outs
    );
    for r in [before, after] {
        assert_sharing_within_the_vm(r);
    }
    // Whole frames went: the frames left are fewer by at least the full frames swapped out.
    assert!(
        after.shared_frames + s.shared_page_outs / 256 <= before.shared_frames,
        "frames {} before, {} after, {} shared pages out",
        before.shared_frames,
        after.shared_frames,
        s.shared_page_outs
    );
    // The verify read brought the swapped pages back.
    let ins: u64 = rows[k + 1..]
        .iter()
        .filter_map(|r| r.swap.as_ref())
        .map(|s| s.page_ins)
        .sum();
    // (the heap's unique 8 MiB, unshared, all went out).
    assert!(ins >= 8 * 256, "page-ins {ins}");
}

/// A guest that writes 24 MiB of identical pages (merged within the VM into 256-way frames),
/// frees the top half and idles `idle`; once they are merged the balloon is inflated into all of
/// its free memory but 2 MiB: it takes from the top, the never-touched pages first, then the
/// freed shared ones; the run ends with `verify` and `check` over the 12 MiB left. `at_merge` and
/// `after_balloon` run when the balloon is asked to inflate and at each row once it is full (with
/// the number of rows since). Returns the rows, the index of the row that asked and the target
/// in MiB.
fn balloon_over_merged(
    idle: &str,
    mut at_merge: impl FnMut(),
    mut after_balloon: impl FnMut(usize),
) -> (Vec<Row>, usize, u64) {
    let mut opts = common::config(
        &format!(
            "alloc 24M; touch 24M fill same; free 12M; idle {idle}; touch 12M read verify; \
             check 12M; idle 600ms"
        ),
        32 * MIB,
    );
    opts.ksm = true;
    opts.access_samples = 0;
    opts.interval = Duration::from_millis(200);
    let vm = memvisor::Run::from_options(opts)
        .console(memvisor::Console::Discard)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut rows: Vec<Row> = Vec::new();
    let mut asked: Option<(usize, u64)> = None;
    let mut full: Option<usize> = None;
    for row in vm.rows().iter() {
        let idling = row.phase.contains(&format!("idle {idle}"));
        if asked.is_none() && idling && pages(host(&row).shared_mib) >= 24 * 256 {
            at_merge();
            let mib = (row.guest.free_mib as u64).saturating_sub(2);
            vm.controller()
                .set_balloon_target(mib)
                .expect("balloon target");
            asked = Some((rows.len(), mib));
        }
        if let Some((_, mib)) = asked
            && row
                .balloon
                .as_ref()
                .is_some_and(|b| b.balloon_mib >= mib as f64)
        {
            let first = *full.get_or_insert(rows.len());
            after_balloon(rows.len() - first);
        }
        rows.push(row);
    }
    let summary = vm
        .wait()
        .unwrap_or_else(|e| panic!("verify holds on the pages left: {e}"));
    let (k, target) = asked.expect("24 MiB merged during the idle");
    assert!(target >= 12, "the guest had {target} + 2 MiB free");
    assert!(summary.balloon.unwrap().inflated_pages >= target * 256);
    // verify (in wait) and check hold on the 12 MiB left.
    assert_eq!(checks(&rows), (12 * 256, 12 * 256, 0));
    (rows, k, target)
}

/// The first row with the balloon at `target` MiB, after row `k`.
fn balloon_full(rows: &[Row], k: usize, target: u64) -> usize {
    k + rows[k..]
        .iter()
        .position(|r| {
            r.balloon
                .as_ref()
                .is_some_and(|b| b.balloon_mib >= target as f64)
        })
        .expect("the balloon reached its target")
}

/// The balloon over merged pages: each shared page ballooned drops one mapping of its frame:
/// SHRD and `backed` fall by as many pages, SHRDSVD stays SHRD − frames, host usage stays
/// `backed` − `saved` + `ovhd`, the kernel's own count for this process follows within two
/// intervals, and `verify` holds on the pages left.
#[test]
fn ballooning_shared_pages_is_accounted_and_verify_holds_on_the_rest() {
    let test = "ballooning_shared_pages_is_accounted_and_verify_holds_on_the_rest";
    let Some((_one, _ksmd)) = ksm_guest(test) else {
        return;
    };
    let (rows, k, target) = balloon_over_merged("6s", || {}, |_| {});
    let before = host(&rows[k]).clone();
    // The row after the first with the balloon full (a boundary's release shows at the next
    // harvest).
    let full = balloon_full(&rows, k, target);
    let after_row = rows.get(full + 1).unwrap_or(&rows[full]);
    assert!(
        after_row.phase.contains("idle 6s"),
        "still idle two intervals after: {}",
        after_row.phase
    );
    let after = host(after_row);
    let (shrd_drop, backed_drop) = (
        pages(before.shared_mib) - pages(after.shared_mib),
        before.backed_pages - after.backed_pages,
    );
    eprintln!(
        "{test}: balloon {target} MiB; SHRD {} -> {} pages, backed {} -> {}, frames {} -> {}, \
         saved {:.2} -> {:.2} MiB, host {:.2} -> {:.2} MiB",
        pages(before.shared_mib),
        pages(after.shared_mib),
        before.backed_pages,
        after.backed_pages,
        before.shared_frames,
        after.shared_frames,
        before.shared_saved_mib,
        after.shared_saved_mib,
        before.host_mib,
        after.host_mib
    );
    // The balloon reached into the freed shared pages (it takes at most 12 MiB of them), and every
    // backed page it took was a shared one.
    assert!(
        (4 * 256..=12 * 256 + 64).contains(&shrd_drop),
        "SHRD fell by {shrd_drop} pages"
    );
    assert!(
        backed_drop.abs_diff(shrd_drop) <= 64,
        "backed fell by {backed_drop}, SHRD by {shrd_drop}"
    );
    // Each sharer gone lowers the saving by one page while its frame keeps another sharer; a
    // frame left with one mapping is a page of its own again (not shared, nothing saved).
    for r in [&before, after] {
        assert_sharing_within_the_vm(r);
    }
    let saved_drop = (before.shared_saved_mib - after.shared_saved_mib) * 256.0;
    assert!(
        saved_drop <= shrd_drop as f64 + 1e-6 && saved_drop >= (shrd_drop as f64) * 0.9,
        "saved fell by {saved_drop} pages for {shrd_drop} sharers gone"
    );
    // The machine memory the guest's pages use (`backed` − `saved`) falls only by the frames left
    // with no sharer: far less than what was ballooned. (`host` adds the VMM's overhead, which in
    // a test process moves with the other tests.)
    let machine = |r: &memvisor::row::HostUsage| r.backed_pages as f64 - r.shared_saved_mib * 256.0;
    let freed = machine(&before) - machine(after);
    assert!(
        freed <= (before.shared_frames - after.shared_frames) as f64 + 64.0,
        "backed − saved fell by {freed} pages, frames {} -> {}",
        before.shared_frames,
        after.shared_frames
    );
    // The kernel's count for this process (immune to other processes merging) follows within two
    // intervals: ksmd drops a zapped mapping from its tree at its next pass.
    let kernel = after.ksm.as_ref().expect("kernel figures");
    assert!(
        kernel.merging_pages.abs_diff(pages(after.shared_mib)) <= 64,
        "ksm_merging_pages {} vs SHRD {}",
        kernel.merging_pages,
        pages(after.shared_mib)
    );
}

/// Why the kernel's `pages_sharing` can run above the PFN count: ksmd keeps a mapping it merged
/// in its stable tree until its next pass over that address, whatever happened to the mapping
/// since. With ksmd stopped (`run` = 0 keeps merged pages merged) and shared pages ballooned, the
/// PFN count drops them at once and the kernel's `ksm_merging_pages` keeps every one; once ksmd
/// runs again, they agree within a few intervals.
#[test]
fn the_kernels_count_keeps_ballooned_sharers_until_ksmds_next_pass() {
    use memvisor::memory::ksm;
    let test = "the_kernels_count_keeps_ballooned_sharers_until_ksmds_next_pass";
    let Some((_one, ksmd)) = ksm_guest(test) else {
        return;
    };
    let ksmd = std::cell::RefCell::new(ksmd);
    // Stop ksmd as the balloon inflates; start it again two rows after the balloon is full.
    let (rows, k, target) = balloon_over_merged(
        "8s",
        || ksmd.borrow_mut().set("run", 0).expect("stop ksmd"),
        |since| {
            if since == 2 {
                ksm::set_knob("run", 1).expect("start ksmd");
            }
        },
    );
    drop(ksmd);
    let full = balloon_full(&rows, k, target);
    let kernel = |r: &Row| host(r).ksm.as_ref().expect("kernel figures").merging_pages;
    let shrd = |r: &Row| pages(host(r).shared_mib);
    let before = &rows[k];
    // Stopped: the sharers ballooned left SHRD, not the kernel's count.
    let stopped = &rows[full + 1];
    let gone = shrd(before) - shrd(stopped);
    eprintln!(
        "{test}: before SHRD {} kernel {}; ksmd stopped, balloon full: SHRD {} kernel {}",
        shrd(before),
        kernel(before),
        shrd(stopped),
        kernel(stopped)
    );
    assert!(gone >= 4 * 256, "SHRD fell by {gone}");
    assert!(
        kernel(stopped) + 64 >= kernel(before) && kernel(stopped) >= shrd(stopped) + gone - 64,
        "the kernel still counts the {gone} sharers gone: {} (SHRD {})",
        kernel(stopped),
        shrd(stopped)
    );
    // Running again (from the third row after the balloon was full): agreement within the idle.
    let agreed = rows[full + 3..]
        .iter()
        .take_while(|r| r.phase.contains("idle 8s"))
        .find(|r| kernel(r).abs_diff(shrd(r)) <= 64);
    assert!(
        agreed.is_some(),
        "the kernel's count never came back to SHRD: {:?}",
        rows[full + 3..]
            .iter()
            .map(|r| (kernel(r), shrd(r)))
            .collect::<Vec<_>>()
    );
}
