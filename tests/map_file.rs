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

#[test]
fn map_command_refuses_a_fifo_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("guest.map");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path in our temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut child = common::memvisor()
        .args(["map", fifo.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Before the fix the open blocked forever, waiting for a writer.
    let status = common::wait_bounded(&mut child, std::time::Duration::from_secs(20));
    let out = child.wait_with_output().unwrap();
    let out = std::process::Output { status, ..out };
    common::assert_clean_failure(&out, "a FIFO, not a regular file");
}

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (the caller skips) when this process cannot mount.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let target = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        let data = std::ffi::CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: valid NUL-terminated strings; a tmpfs over a directory of ours.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            eprintln!("cannot mount a tmpfs: {}", std::io::Error::last_os_error());
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path we mounted on.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Fills the file system holding `path` with a file there, until it is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 4096];
    loop {
        match f.write_all(&block).and_then(|_| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn a_failed_periodic_map_write_warns_and_the_run_goes_on() {
    use std::io::BufRead;
    if !common::kvm("a_failed_periodic_map_write_warns_and_the_run_goes_on") {
        return;
    }
    let Some(fs) = Tmpfs::mount("1m") else {
        eprintln!("SKIPPED a_failed_periodic_map_write_warns_and_the_run_goes_on: no mount");
        return;
    };
    let filler = fs.path().join("filler");
    fill(&filler);
    let map = fs.path().join("guest.map");
    let mut child = common::memvisor()
        .args([
            "run",
            "--mem",
            "16M",
            "--workload",
            "alloc 4M; touch 4M write; idle 4s",
            "--interval",
            "100ms",
            "--map-out",
            map.to_str().unwrap(),
            "--map-every",
            "1",
            "--console",
            "/dev/null",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    // The disk is full: each periodic write fails and says so; once one has, make room.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut warnings = Vec::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        if line.contains("the run goes on") {
            warnings.push(line.clone());
            if warnings.len() == 1 {
                std::fs::remove_file(&filler).unwrap();
            }
        }
        line.clear();
    }
    let status = common::wait_bounded(&mut child, std::time::Duration::from_secs(60));
    let stdout = reader.join().unwrap();
    assert!(status.success(), "{status:?}; warnings {warnings:?}");
    assert!(!warnings.is_empty(), "no warning about the failed write");
    assert!(
        warnings[0].contains("No space left on device") && warnings[0].contains("guest.map"),
        "{warnings:?}"
    );
    // Every row is there, up to the final one, and the final map was written.
    assert!(
        stdout.lines().last().unwrap_or("").ends_with("(end)"),
        "{stdout}"
    );
    assert!(stdout.lines().count() > 10, "{stdout}");
    let out = common::memvisor_output(&["map", map.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("backed"));
    // No temporary file was left by the failed writes.
    let names: Vec<_> = std::fs::read_dir(fs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["guest.map"]);
}
