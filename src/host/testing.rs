//! Synthetic host rows for the outputs' tests (no VM runs).

use super::scheduler::ActiveSource;
use super::state::MemState;
use super::supervisor::{HostLine, HostRow, VmLine};

/// One VM's line with the given sizes (MiB); the rest plausible.
pub fn vm(name: &str, granted: f64, target: f64, active: f64) -> VmLine {
    VmLine {
        name: name.into(),
        status: "running",
        exit_code: None,
        mem_mib: 128.0,
        target_mib: target,
        guest_target_mib: target,
        granted_mib: granted,
        active_mib: active,
        active_source: ActiveSource::Accesses,
        active_pct: if granted > 0.0 {
            (100.0 * active / granted).min(100.0)
        } else {
            0.0
        },
        balloon_mib: 4.0,
        balloon_target_mib: 8.0,
        swapped_mib: 2.0,
        swap_target_mib: 3.0,
        overhead_mib: 9.5,
        shared_mib: 0.0,
        saved_mib: 0.0,
        shares: 1280,
        reservation_mib: 16.0,
        limit_mib: None,
        rate: Some(1.5e6),
        balloon_stuck: false,
        paused: false,
        order_errors: 0,
        row: None,
    }
}

/// `n` periods of two VMs, `web` and `db` (`db` with a limit), under a 200 MiB budget: `web`
/// grows while `db` is squeezed, and `db` ends at the last period.
pub fn rows(n: usize) -> Vec<HostRow> {
    (0..n)
        .map(|i| {
            let x = i as f64;
            let web = vm("web", 40.0 + 8.0 * x, 60.0 + 6.0 * x, 30.0 + 7.0 * x);
            let mut db = vm("db", 90.0 - 4.0 * x, 70.0 - 3.0 * x, 10.0);
            db.limit_mib = Some(100.0);
            db.active_source = ActiveSource::Writes;
            if i + 1 == n {
                db.status = "ended";
                db.exit_code = Some(0);
                db.rate = None;
            }
            let granted = web.granted_mib + db.granted_mib;
            let overheads = web.overhead_mib + db.overhead_mib;
            HostRow {
                schema_version: crate::row::SchemaVersion,
                time_s: 0.5 * (x + 1.0),
                period: i as u64,
                host: HostLine {
                    budget_mib: 200.0,
                    free_mib: (200.0 - granted - overheads).max(0.0),
                    state: if i < 3 {
                        MemState::High
                    } else {
                        MemState::Soft
                    },
                    transitions: u64::from(i >= 3),
                    targets_mib: web.target_mib + db.target_mib,
                    running: if i + 1 == n { 1 } else { 2 },
                    saved_mib: 0.0,
                    ksm_pages_sharing_mib: None,
                },
                vms: vec![web, db],
            }
        })
        .collect()
}
