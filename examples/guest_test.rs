//! What another project's integration test looks like: run a guest on this KVM host, drive it,
//! and assert on its rows. Exits non-zero when an assertion fails (CI runs it:
//! `cargo run --release --example guest_test`).
//!
//! The guest allocates and writes 32 MiB, then idles. The test checks that the host backs what
//! the guest wrote, that the balloon takes back the 16 MiB it is asked for while the guest runs,
//! and that the rows come in order and the run ends as the workload does.

use std::process::ExitCode;
use std::time::Duration;

use memvisor::{Console, Row, Run};

fn main() -> ExitCode {
    if !std::path::Path::new("/dev/kvm").exists()
        && std::env::var_os("MEMVISOR_REQUIRE_KVM").is_none()
    {
        println!("guest_test: SKIPPED: no /dev/kvm on this host");
        return ExitCode::SUCCESS;
    }
    match test() {
        Ok(()) => {
            println!("guest_test: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("guest_test: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn test() -> Result<(), String> {
    let vm = Run::new()
        .mem(128 << 20)
        .workload("alloc 32M; touch 32M write; idle 4s")
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_secs(120))
        .seed(1)
        .console(Console::Discard)
        .start()
        .map_err(|e| format!("starting the VM: {e}"))?;

    // Ask for 16 MiB back once the guest has written its memory; read rows as they come.
    let mut rows: Vec<Row> = Vec::new();
    let mut asked = false;
    for row in vm.rows() {
        let written = row.host.as_ref().is_some_and(|h| h.backed_mib >= 32.0);
        if !asked && written {
            vm.controller()
                .set_balloon_target(16)
                .map_err(|e| format!("setting the balloon target: {e}"))?;
            asked = true;
        }
        rows.push(row);
    }
    let summary = vm.wait().map_err(|e| format!("the run: {e}"))?;

    check(asked, || {
        "the host never backed the 32 MiB the guest wrote".into()
    })?;
    for w in rows.windows(2) {
        check(w[1].interval == w[0].interval + 1, || {
            format!(
                "rows out of order: {} then {}",
                w[0].interval, w[1].interval
            )
        })?;
    }
    let last = rows.last().ok_or("no rows")?;
    check(last.end == Some(memvisor::row::EndReason::Done), || {
        format!("the last row ended with {:?}", last.end)
    })?;
    let most = rows
        .iter()
        .filter_map(|r| r.balloon.as_ref())
        .map(|b| b.balloon_mib)
        .fold(0.0, f64::max);
    check(most >= 16.0, || {
        format!("the balloon held at most {most} MiB, not the 16 MiB asked for")
    })?;
    check(!summary.guest.out_of_memory, || {
        "the guest ran out of memory".into()
    })?;
    println!(
        "guest_test: {} rows, the balloon reached {most} MiB, the guest allocated {} MiB",
        rows.len(),
        summary.guest.allocated_mib
    );
    Ok(())
}
