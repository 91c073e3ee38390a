//! Page contents for page sharing: `touch ... fill zero|same|unique` writes what it says, and
//! `verify` and `check` expect each page's last fill.

mod common;

use memvisor::contract::protocol::GuestError;
use memvisor::row::Row;
use memvisor::vmm::RunError;

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
