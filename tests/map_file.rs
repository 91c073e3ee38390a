//! Issue: map file hardening. `--map-out` refuses targets that are not regular files, and
//! missing directories, before the guest runs; `memvisor map` refuses absurd headers cleanly.

mod common;

use std::os::unix::fs::FileTypeExt;

#[test]
fn map_out_on_a_char_device_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("out.map");
    common::mknod_char(&node, 1, 3);
    let node_s = node.to_str().unwrap();
    let out = common::memvisor_output(&[
        "run",
        "--mem",
        "16M",
        "--workload",
        "alloc 1M; touch 1M write",
        "--map-out",
        node_s,
    ]);
    common::assert_clean_failure(&out, node_s);
    common::assert_clean_failure(&out, "character device");
    assert!(out.stdout.is_empty(), "no table: the guest never ran");
    let ft = std::fs::symlink_metadata(&node).unwrap().file_type();
    assert!(ft.is_char_device(), "the node is still a char device");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn map_out_in_a_missing_directory_fails_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("missing/out.map");
    let target_s = target.to_str().unwrap();
    let out = common::memvisor_output(&[
        "run",
        "--mem",
        "16M",
        "--workload",
        "alloc 1M; touch 1M write",
        "--map-out",
        target_s,
    ]);
    common::assert_clean_failure(&out, target_s);
    common::assert_clean_failure(&out, "does not exist");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.is_empty(), "no table rows: {stdout}");
    assert!(!dir.path().join("missing").exists());
}

/// A 40-byte header with the given page size, guest pages and record count, and no records.
fn header(page_size: u32, pages: u64, records: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"MVPMPMMP");
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&page_size.to_le_bytes());
    h.extend_from_slice(&pages.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&records.to_le_bytes());
    h
}

#[test]
fn map_command_refuses_absurd_headers() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        common::memvisor_output(&["map", p.to_str().unwrap()])
    };
    common::assert_clean_failure(&run("pages.map", &header(4096, u64::MAX, 0)), "guest pages");
    common::assert_clean_failure(&run("psize.map", &header(1 << 31, 16, 0)), "page size");
    common::assert_clean_failure(
        &run("count.map", &header(4096, 1 << 20, 1 << 20)),
        "size mismatch",
    );
    // A sane empty map: 16 pages of 2 MiB, nothing touched, printed in MiB of its page size.
    let out = run("ok.map", &header(2 << 20, 16, 0));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(32.0 MiB)"), "{text}");
}
