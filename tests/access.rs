//! Active memory that sees reads: the access sampler (userfaultfd) and the stratified estimates,
//! checked against the guest's exact truth.

mod common;

use std::process::Command;
use std::time::Duration;

use memvisor::row::Row;

#[test]
fn reads_are_seen_while_the_write_estimate_stays_near_zero() {
    if !common::kvm("reads_are_seen_while_the_write_estimate_stays_near_zero") {
        return;
    }
    // 40 MiB of 48 MiB backed heap read at random, over and over: every interval touches all of
    // it and writes none of it.
    let mut opts = common::config(
        "alloc 48M; touch 48M write; touch 40M read random 4s",
        256 << 20,
    );
    opts.access_samples = 200;
    let (_, rows) = common::run_cfg(opts).unwrap();
    let rows = common::inside(&rows, "touch 40M read random");
    assert!(
        rows.len() >= 15,
        "intervals inside the phase: {}",
        rows.len()
    );
    let mut covered = 0;
    let mut writes = 0.0;
    // Intervals in which the guest read all 40 MiB (on a host busy with other tests, the guest
    // can run slower for an interval and read less; the coverage below uses each interval's own
    // truth).
    let mut whole = 0;
    for r in &rows {
        assert!(r.reads_seen);
        let a = r.active.as_ref().expect("an access estimate");
        let w = r.active_writes.as_ref().expect("a write estimate");
        let t = r.truth.as_ref().expect("the guest's truth");
        assert_eq!(t.written_pages, 0);
        assert!(t.touched_pages > 0, "{t:?}");
        if t.touched_mib > 39.0 {
            whole += 1;
        }
        assert_eq!(a.n, 200, "{a:?}");
        // Writes: the guest's own bookkeeping (a few pages), plus, on this nested host, the odd
        // read that KVM logs as a write after the host remapped a page: a tenth of the reads at
        // the very most in any interval, and under 1 MiB on average (below).
        assert!(
            w.estimate_mib < 4.0,
            "write estimate in a read-only phase: {w:?}"
        );
        writes += w.estimate_mib;
        if a.ci_low_mib <= t.touched_mib && t.touched_mib <= a.ci_high_mib {
            covered += 1;
        }
    }
    // Each 95% interval covers the truth with probability about 0.95 (fresh samples each
    // interval, so independently); with k >= 15 intervals, covered ~ Binomial(k, 0.95), and asking
    // for 80% fails with probability below 1%, while an estimator blind to reads (0 MiB) or off
    // by more than its interval's width fails every time.
    let k = rows.len();
    assert!(
        whole * 100 >= k * 80,
        "the guest read all 40 MiB in only {whole} of {k} intervals"
    );
    assert!(
        covered * 100 >= k * 80,
        "95% intervals covered the touched truth in {covered} of {k} intervals"
    );
    assert!(
        writes / (k as f64) < 1.0,
        "mean write estimate {:.2} MiB",
        writes / k as f64
    );
}

#[test]
fn a_census_of_every_touched_page_keeps_data_and_the_guest_intact() {
    if !common::kvm("a_census_of_every_touched_page_keeps_data_and_the_guest_intact") {
        return;
    }
    // More samples than the guest has touched pages: every touched page, including the kernel's
    // code, stack and page tables, the app's message page and the boot info the VMM writes at
    // each tick, is moved out every interval and must come back intact. The app checks every
    // access (`verify`): a page not holding what it wrote fails the run.
    let mut opts = common::config(
        "alloc 4M; touch 4M write; touch 4M write random 4s verify; touch 4M read random 2s verify",
        16 << 20,
    );
    opts.interval = Duration::from_millis(250);
    opts.access_samples = 4096;
    let (s, rows) = common::run_cfg(opts).expect("data intact, guest running");
    assert_eq!(s.report_errors, 0);
    let census: Vec<&Row> = rows
        .iter()
        .filter(|r| r.active.as_ref().is_some_and(|a| a.n > 0))
        .collect();
    assert!(census.len() >= 20, "sampled intervals: {}", census.len());
    for r in &census {
        let a = r.active.as_ref().unwrap();
        // Every page of the stratum was armed (nothing skipped): a census, exact.
        let armed_mib = a.n as f64 * 4096.0 / (1u64 << 20) as f64;
        assert!((armed_mib - a.sampled_from_mib).abs() < 1e-9, "{a:?}");
        assert_eq!(a.skipped, 0);
        assert_eq!(a.ci_low_mib, a.ci_high_mib);
    }
    // The VMM's own writes to armed pages arrived. The boot info's interval number: the guest
    // followed the intervals and reported their truth (one it notices late, after two ticks, is
    // skipped by design: the guest is slowed a lot by a census). The TIME replies: every phase
    // start carries the VMM's clock, increasing.
    let with_truth = rows.iter().filter(|r| r.truth.is_some()).count();
    assert!(
        with_truth * 10 >= rows.len() * 8,
        "{with_truth} of {} rows found their truth",
        rows.len()
    );
    let starts: Vec<u64> = s.phases.iter().map(|p| p.vmm_start_ns).collect();
    assert!(
        starts[1] > 0 && starts.windows(2).all(|w| w[0] < w[1]),
        "{starts:?}"
    );
    let verify = s.phases.iter().filter(|p| p.name.ends_with("verify"));
    for p in verify {
        assert!(p.ended && p.status == 0, "{p:?}");
        assert!(p.iterations > 1000, "{p:?}");
    }
}

#[test]
fn first_touches_in_registered_regions_do_not_go_through_the_handler() {
    if !common::kvm("first_touches_in_registered_regions_do_not_go_through_the_handler") {
        return;
    }
    // Random first writes over 48 MiB for 2 s: after the first interval, touched pages are spread
    // over every 2 MiB region of the heap, so the access sample registers them all while most of
    // their pages are still to be touched. Those never-touched pages are mapped to the zero page
    // at registration: their first writes are ordinary copy-on-write faults, never the handler's.
    let mut opts = common::config(
        "alloc 48M; touch 48M write random 2s; touch 48M write; touch 48M read random 1s verify",
        128 << 20,
    );
    opts.interval = Duration::from_millis(100);
    opts.access_samples = 200;
    let (s, rows) = common::run_cfg(opts).expect("data intact, guest running");
    let fills: u64 = rows
        .iter()
        .filter_map(|r| r.active.as_ref())
        .map(|a| a.handler_fills)
        .sum();
    assert_eq!(fills, 0, "first touches resolved by the handler");
    let phase = common::inside(&rows, "touch 48M write random");
    let mut first_touching = 0;
    for r in &phase {
        let (a, w) = (
            r.active.as_ref().unwrap(),
            r.active_writes.as_ref().unwrap(),
        );
        assert_eq!(a.n, 200, "{a:?}");
        // The first touches are all writes, counted exactly in both estimates: pages mapped to the
        // zero page are not taken for reads (the map keeps them untouched)...
        assert!(
            (a.exact_mib - w.exact_mib).abs() < 0.5,
            "first touches {} MiB, first writes {} MiB",
            a.exact_mib,
            w.exact_mib
        );
        // ... nor counted as zero pages.
        let host = r.host.as_ref().unwrap();
        assert!(host.zero_mib < 1.0, "{host:?}");
        if w.exact_mib > 1.0 {
            first_touching += 1;
        }
    }
    assert!(
        first_touching >= 3,
        "intervals with first writes under the sampler: {first_touching} of {}",
        phase.len()
    );
    let verify = s.phases.iter().filter(|p| p.name.ends_with("verify"));
    for p in verify {
        assert!(p.ended && p.status == 0, "{p:?}");
    }
}

#[test]
fn reads_of_never_written_pages_in_registered_regions_are_estimated() {
    if !common::kvm("reads_of_never_written_pages_in_registered_regions_are_estimated") {
        return;
    }
    // One random pass of writes over 48 MiB leaves about a third of its pages never written,
    // spread over every 2 MiB region; the access sample registers the regions, and their
    // never-written pages are mapped to the zero page then (the idle second). After that every
    // page is read, over and over: a read of a zero-mapped page shows in no dirty log and no residency pass, so only
    // the access sample, which draws those pages too, can see it.
    let mut opts = common::config(
        "alloc 48M; touch 48M write random; idle 1s; touch 48M read random 3s",
        128 << 20,
    );
    opts.access_samples = 200;
    let (s, rows) = common::run_cfg(opts).unwrap();
    assert!(
        s.vmm_zero_mapped > 1024,
        "pages mapped to the zero page and never touched since: {}",
        s.vmm_zero_mapped
    );
    let rows = common::inside(&rows, "touch 48M read random");
    assert!(
        rows.len() >= 8,
        "intervals inside the phase: {}",
        rows.len()
    );
    let (mut covered, mut whole, mut error) = (0, 0, 0.0);
    for r in &rows {
        let a = r.active.as_ref().expect("an access estimate");
        let t = r.truth.as_ref().expect("the guest's truth");
        if t.touched_mib > 47.0 {
            whole += 1;
        }
        error += a.estimate_mib - t.touched_mib;
        if a.ci_low_mib <= t.touched_mib && t.touched_mib <= a.ci_high_mib {
            covered += 1;
        }
    }
    let k = rows.len();
    assert!(
        whole * 100 >= k * 80,
        "the guest read all 48 MiB in only {whole} of {k} intervals"
    );
    // Blind to those reads, the estimate stays at the written pages, about 30 MiB, in every
    // interval: its intervals never cover the truth, and its mean error is about -18 MiB.
    assert!(
        covered * 100 >= k * 80,
        "95% intervals covered the touched truth in {covered} of {k} intervals"
    );
    assert!(
        (error / k as f64).abs() < 3.0,
        "mean error {:.2} MiB",
        error / k as f64
    );
}

#[test]
fn verify_fails_a_run_whose_pages_do_not_hold_what_was_written() {
    if !common::kvm("verify_fails_a_run_whose_pages_do_not_hold_what_was_written") {
        return;
    }
    // The census above is only as strong as `verify`: the second 4 MiB was never written, so
    // every access to it must be counted as a changed page and end the run.
    let opts = common::config("alloc 8M; touch 4M write; touch 8M read verify", 32 << 20);
    let e = common::run_cfg(opts).expect_err("a verify phase over unwritten pages fails");
    let msg = format!("{e:#}");
    assert!(msg.contains("touch 8M read verify"), "{msg}");
    assert!(
        msg.contains("1024"),
        "every unwritten page counted once: {msg}"
    );
}

#[test]
fn stratification_is_far_better_on_a_sparse_guest() {
    if !common::kvm("stratification_is_far_better_on_a_sparse_guest") {
        return;
    }
    // A 4 GiB guest that touches 64 MiB: plain sampling draws from a million pages of which 1.6%
    // are active (sd about 15 MiB for n = 1000); the stratified estimate samples the touched pages
    // only. Fixed seeds; the threshold is a factor of 4 on the mean absolute error.
    let spec = "alloc 64M; touch 64M write; touch 64M write 3s";
    let mean_abs_err = |plain: bool| {
        let mut opts = common::config(spec, 4 << 30);
        opts.plain_sampling = plain;
        opts.seed = Some(21);
        let (_, rows) = common::run_cfg(opts).unwrap();
        let rows = common::inside(&rows, "touch 64M write 3s");
        assert!(rows.len() >= 8, "{} intervals", rows.len());
        let errs: Vec<f64> = rows
            .iter()
            .map(|r| r.active_writes.as_ref().unwrap().error_mib.unwrap().abs())
            .collect();
        errs.iter().sum::<f64>() / errs.len() as f64
    };
    let stratified = mean_abs_err(false);
    let plain = mean_abs_err(true);
    assert!(
        stratified * 4.0 < plain,
        "mean |error|: stratified {stratified:.2} MiB, plain {plain:.2} MiB"
    );
}

#[test]
fn without_userfaultfd_reads_are_announced_unseen_and_writes_still_estimated() {
    if !common::kvm("without_userfaultfd_reads_are_announced_unseen_and_writes_still_estimated")
        || !common::root(
            "without_userfaultfd_reads_are_announced_unseen_and_writes_still_estimated",
        )
    {
        return;
    }
    // In a mount namespace of its own, /dev/userfaultfd is hidden behind an empty file, and
    // CAP_SYS_PTRACE (which the userfaultfd system call needs) is dropped.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let script = format!(
        "mount --bind {} /dev/userfaultfd && exec setpriv --bounding-set -sys_ptrace \
         --inh-caps -sys_ptrace {} run --mem 64M --workload 'alloc 8M; touch 8M write; idle 300ms' \
         --interval 100ms --json",
        empty.display(),
        env!("CARGO_BIN_EXE_memvisor")
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("reads are not seen, only writes are estimated"),
        "{stderr}"
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() >= 3);
    for r in &rows {
        assert_eq!(r["reads_seen"], false, "{r}");
        assert!(r["active"].is_null(), "{r}");
        assert!(r["active_writes"]["estimate_mib"].is_number(), "{r}");
    }
}

/// Guest pages pinned the way a device pins DMA buffers: registered as io_uring fixed buffers
/// (a long-term pin), which `UFFDIO_MOVE` refuses to move. Unpinned when dropped.
struct Pinned(libc::c_int);

impl Pinned {
    fn new(addr: usize, len: usize) -> Self {
        // struct io_uring_params is 120 bytes; zero asks for defaults, the kernel fills it in.
        let mut params = [0u8; 120];
        // SAFETY: io_uring_setup reads and writes only the 120-byte params buffer we own.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        assert!(
            fd >= 0,
            "io_uring_setup (to pin pages): {}",
            std::io::Error::last_os_error()
        );
        let fd = fd as libc::c_int;
        let iov = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: IORING_REGISTER_BUFFERS (0) reads one iovec that lives across the call; it
        // pins the pages of a range we own and keep mapped until this ring is closed.
        let rc = unsafe { libc::syscall(libc::SYS_io_uring_register, fd, 0u32, &iov, 1u32) };
        assert_eq!(
            rc,
            0,
            "io_uring_register buffers: {}",
            std::io::Error::last_os_error()
        );
        Pinned(fd)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: IORING_UNREGISTER_BUFFERS (1) takes no argument and unpins the buffers at once
        // (closing the ring alone unpins them later, from a kernel worker); then the fd we opened
        // is closed.
        unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.0,
                1u32,
                std::ptr::null::<libc::c_void>(),
                0u32,
            );
            libc::close(self.0);
        }
    }
}

#[test]
fn pages_that_refuse_to_move_are_skipped_counted_and_replaced() {
    if !common::root("pages_that_refuse_to_move_are_skipped_counted_and_replaced") {
        return;
    }
    use memvisor::memory::bitmap::{Bitmap, Ranks};
    use memvisor::memory::{GuestMemory, GuestRam};
    use memvisor::observe::access::{AccessSampler, Population};
    use memvisor::units::PAGE_SIZE;

    // 4 MiB of RAM, every page written; the first half pinned.
    let mem = GuestMemory::new(GuestRam::new(4 << 20, false).unwrap());
    let ram = mem.ram();
    let pages = ram.pages();
    let mut population = Bitmap::new(pages);
    for gfn in 0..pages {
        ram.write_obj(gfn * PAGE_SIZE, gfn + 1).unwrap();
        population.set(gfn);
    }
    let ranks = Ranks::new(&population);
    let half = pages / 2;
    let pin = Pinned::new(ram.host_addr(), (half * PAGE_SIZE) as usize);
    let mut a = AccessSampler::new(64, &mem, Some(11)).unwrap();

    let mut skipped_total = 0;
    for round in 0..8 {
        let arming = a
            .arm(&mem, &Population::of(&population, &ranks), 64)
            .unwrap();
        // n is kept: every pinned pick was replaced by a page that moved.
        assert_eq!(arming.pages.len(), 64, "round {round}");
        assert!(
            arming.pages.iter().all(|&g| g >= half && g < pages),
            "a pinned page was armed in round {round}: {:?}",
            arming.pages
        );
        let mut distinct = arming.pages.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 64, "round {round}: a page armed twice");
        // The host reads a few armed pages: the trap resolves them with their contents intact.
        for &g in arming.pages.iter().take(8) {
            let v: u64 = ram.read_obj(g * PAGE_SIZE).unwrap();
            assert_eq!(v, g + 1, "armed page {g} lost its contents");
        }
        let r = a.disarm(&mem).unwrap().expect("a round was armed");
        assert_eq!((r.n, r.t, r.population), (64, 8, pages), "round {round}");
        skipped_total += r.skipped;
    }
    // Half the population is pinned: about as many pinned picks as armed pages were skipped.
    assert!(
        (8 * 64 / 2..=8 * 64 * 2).contains(&skipped_total),
        "skipped {skipped_total} in 8 rounds of 64"
    );

    // All of it pinned: nothing can be armed; the tries are bounded (four per page asked for),
    // every one is counted, and the round closes empty.
    let all = Pinned::new(
        ram.host_addr() + (half * PAGE_SIZE) as usize,
        ((pages - half) * PAGE_SIZE) as usize,
    );
    let arming = a
        .arm(&mem, &Population::of(&population, &ranks), 64)
        .unwrap();
    assert!(arming.pages.is_empty(), "{:?}", arming.pages);
    let r = a.disarm(&mem).unwrap().expect("a round was asked for");
    assert_eq!((r.n, r.t, r.skipped), (0, 0, 4 * 64));
    drop((all, pin));

    // Unpinned, every page moves again.
    let arming = a
        .arm(&mem, &Population::of(&population, &ranks), 64)
        .unwrap();
    assert_eq!(arming.pages.len(), 64);
    assert_eq!(a.disarm(&mem).unwrap().expect("armed").skipped, 0);
    for gfn in 0..pages {
        let v: u64 = ram.read_obj(gfn * PAGE_SIZE).unwrap();
        assert_eq!(v, gfn + 1, "page {gfn} lost its contents");
    }
}
