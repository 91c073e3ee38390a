//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use memvisor::row::Row;
use memvisor::vmm::config::{Console, RunConfig, RunOptions};
use memvisor::vmm::{self, RunError, RunSummary};

/// True when /dev/kvm can be used; otherwise says the test is skipped, or fails it where CI set
/// MEMVISOR_REQUIRE_KVM (the crate's one rule, `ioctls::kvm_usable`).
pub fn kvm(test: &str) -> bool {
    memvisor::kvm::ioctls::kvm_usable(test)
}

/// True when this process runs as root (tests that need root skip otherwise, and say so).
pub fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root");
    }
    root
}

/// Run options for `spec` on `mem` bytes with the built-in guest, a short interval and a timeout.
pub fn config(spec: &str, mem: u64) -> RunOptions {
    RunOptions {
        workload: spec.into(),
        mem,
        interval: Duration::from_millis(200),
        timeout: Some(Duration::from_secs(60)),
        seed: Some(7),
        ..RunOptions::default()
    }
}

/// Validates options (the console goes nowhere), panicking on a bad one.
pub fn validated(opts: RunOptions) -> RunConfig {
    let mut cfg = RunConfig::new(opts).unwrap_or_else(|e| panic!("options: {e}"));
    cfg.console = Console::Discard;
    cfg
}

/// Runs a validated config to the end, collecting rows.
pub fn run_validated(cfg: RunConfig) -> Result<(RunSummary, Vec<Row>), RunError> {
    let mut rows = Vec::new();
    let s = vmm::run(cfg, &mut |r: &Row| {
        rows.push(r.clone());
        Ok(())
    })?;
    Ok((s, rows))
}

/// Runs options to the end, collecting rows.
pub fn run_cfg(opts: RunOptions) -> Result<(RunSummary, Vec<Row>), RunError> {
    run_validated(validated(opts))
}

/// Runs `spec` and panics with the error if the run fails.
pub fn run_ok(spec: &str, mem: u64) -> (RunSummary, Vec<Row>) {
    run_cfg(config(spec, mem)).unwrap_or_else(|e| panic!("run of {spec:?} failed: {e}"))
}

/// The memvisor binary.
pub fn memvisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
}

/// Runs the binary with arguments.
pub fn memvisor_output(args: &[&str]) -> Output {
    memvisor().args(args).output().expect("spawn memvisor")
}

/// Asserts a run that a timeout stopped: exit code 124, the message, no panic, and a last row
/// marked `(end: timeout)` on stdout.
pub fn assert_timed_out(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "memvisor panicked: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or("")
            .ends_with("(end: timeout)"),
        "no final row: {stdout}"
    );
}

/// Asserts a failed run: non-zero exit, a message on stderr containing `needle`, no panic.
pub fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    // 1 for memvisor's own errors, 2 for clap's usage errors; 101 would be a panic.
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "exit status {:?}; stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "memvisor panicked: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr does not mention {needle:?}: {stderr}"
    );
}

/// A minimal ELF64 image: one PT_LOAD at 1 MiB holding `code`, entry at its start.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 0x1000];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut b[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b.extend_from_slice(code);
    b
}

/// Writes bytes to a fresh temporary file and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("memvisor-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// True if `p` exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Rows wholly inside the phase whose name starts with `prefix`: its first and last rows are
/// dropped (the phase starts and ends mid-interval), and so is everything when fewer than three.
pub fn inside<'a>(rows: &'a [Row], prefix: &str) -> Vec<&'a Row> {
    let v: Vec<&Row> = rows
        .iter()
        .filter(|r| r.phase.starts_with(prefix) && r.end.is_none())
        .collect();
    if v.len() < 3 {
        return Vec::new();
    }
    v[1..v.len() - 1].to_vec()
}

/// Waits for `child` at most `limit`; past that, kills and reaps it and fails the test.
pub fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for memvisor") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("memvisor still running after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes a character device node (`major`, `minor`) at `path`, which must be in a temp dir of
/// ours (never a real device directory).
pub fn mknod_char(path: &Path, major: u32, minor: u32) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mknod only creates a directory entry.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
}
