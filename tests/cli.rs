//! Bad input and misbehaving guests get a clear error and a non-zero exit, never a panic.

mod common;

use std::process::Output;

use common::{assert_clean_failure, assert_timed_out, memvisor_output, temp_file, tiny_elf};

/// Runs `memvisor run` with the guest image `bytes` (written to a temporary file) and more args.
fn run_image(name: &str, bytes: &[u8], args: &[&str]) -> Output {
    let p = temp_file(name, bytes);
    memvisor_output(&[&["run", "--guest", p.to_str().unwrap()], args].concat())
}

/// Runs `memvisor run` on `mem` of RAM with a workload and a 20 s timeout.
fn run_spec(mem: &str, spec: &str) -> Output {
    memvisor_output(&["run", "--mem", mem, "--workload", spec, "--timeout", "20s"])
}

#[test]
fn zero_and_garbage_sizes_are_rejected() {
    let out = memvisor_output(&["run", "--mem", "0"]);
    assert_clean_failure(&out, "zero");
    let out = memvisor_output(&["run", "--mem", "12X"]);
    assert_clean_failure(&out, "12X");
    let out = memvisor_output(&["run", "--mem", "1000"]);
    assert_clean_failure(&out, "4 KiB");
}

#[test]
fn bad_workload_names_the_token() {
    let out = memvisor_output(&["run", "--workload", "alloc 4M; touch 4M wrte"]);
    assert_clean_failure(&out, "wrte");
}

#[test]
fn missing_guest_image() {
    let out = memvisor_output(&["run", "--guest", "/nonexistent/guest.elf"]);
    assert_clean_failure(&out, "/nonexistent/guest.elf");
}

#[test]
fn truncated_guest_image() {
    let full = memvisor::kvm::boot::DEFAULT_GUEST;
    let out = run_image("truncated.elf", &full[..full.len() / 2], &[]);
    assert_clean_failure(&out, "truncated");
    let out = run_image("header-only.elf", &full[..40], &[]);
    assert_clean_failure(&out, "truncated");
    let out = run_image("empty.elf", b"", &[]);
    assert_clean_failure(&out, "empty");
}

#[test]
fn guest_image_too_big_for_its_ram() {
    // A segment whose memory size is 8 MiB, in a 4 MiB guest.
    let mut img = tiny_elf(&[0xf4]);
    img[64 + 40..64 + 48].copy_from_slice(&(8u64 << 20).to_le_bytes());
    let out = run_image("big.elf", &img, &["--mem", "4M", "--workload", "idle 10ms"]);
    assert_clean_failure(&out, "too big for its RAM");
    // A file larger than guest RAM.
    let mut img = tiny_elf(&[0xf4]);
    let len = 5usize << 20;
    img[64 + 32..64 + 40].copy_from_slice(&(len as u64).to_le_bytes());
    img[64 + 40..64 + 48].copy_from_slice(&(len as u64).to_le_bytes());
    img.resize(0x1000 + len, 0x90);
    let out = run_image(
        "huge.elf",
        &img,
        &["--mem", "4M", "--workload", "idle 10ms"],
    );
    assert_clean_failure(&out, "too big for its RAM");
}

#[test]
fn triple_faulting_guest() {
    if !common::kvm("triple_faulting_guest") {
        return;
    }
    // ud2 with no IDT: #UD -> #GP -> #DF -> triple fault.
    let out = run_image(
        "triple.elf",
        &tiny_elf(&[0x0f, 0x0b]),
        &["--timeout", "20s"],
    );
    assert_clean_failure(&out, "triple-faulted");
}

#[test]
fn guest_stuck_in_a_loop_times_out() {
    if !common::kvm("guest_stuck_in_a_loop_times_out") {
        return;
    }
    let jmp_self = [0xeb, 0xfe];
    let out = run_image("loop.elf", &tiny_elf(&jmp_self), &["--timeout", "1s"]);
    assert_timed_out(&out, "did not finish within 1s");
}

#[test]
fn guest_writing_garbage_to_devices() {
    if !common::kvm("guest_writing_garbage_to_devices") {
        return;
    }
    let code = [
        0x66, 0xba, 0x10, 0x05, // mov dx, 0x510 (report channel)
        0xb8, 0x67, 0x45, 0x23, 0x01, // mov eax, 0x01234567
        0xef, // out dx, eax  (address outside RAM)
        0xee, // out dx, al   (wrong width)
        0x66, 0xba, 0x99, 0x00, // mov dx, 0x99
        0xee, // out dx, al   (nobody's port)
        0xec, // in al, dx
        0xf4, // hlt
    ];
    let out = run_image("garbage.elf", &tiny_elf(&code), &["--timeout", "20s"]);
    assert_clean_failure(&out, "malformed report");
}

#[test]
fn a_guest_exception_in_the_app_is_reported() {
    if !common::kvm("a_guest_exception_in_the_app_is_reported") {
        return;
    }
    let out = run_spec("32M", "alloc 4M; fault");
    assert_clean_failure(&out, "page fault");
    assert_clean_failure(&out, "in the app (ring 3)");
}

#[test]
fn bad_sampling_options() {
    let out = memvisor_output(&["run", "--samples", "0"]);
    assert_clean_failure(&out, "--samples 0");
    let out = memvisor_output(&[
        "run",
        "--mem",
        "16M",
        "--workload",
        "idle 10ms",
        "--samples",
        "5000",
    ]);
    assert_clean_failure(&out, "4096");
    let out = memvisor_output(&["run", "--interval", "0s"]);
    assert_clean_failure(&out, "interval");
    let out = memvisor_output(&["run", "--interval", "soon"]);
    assert_clean_failure(&out, "soon");
}

#[test]
fn a_guest_that_runs_out_of_memory_is_reported() {
    if !common::kvm("a_guest_that_runs_out_of_memory_is_reported") {
        return;
    }
    // The spec fits in RAM, but not in the guest kernel's pool (RAM minus its reserved area).
    let out = run_spec("64M", "alloc 63M");
    assert_clean_failure(&out, "ran out of memory in phase 1 (alloc 63M)");
}

#[test]
fn a_sleeping_guest_still_times_out() {
    if !common::kvm("a_sleeping_guest_still_times_out") {
        return;
    }
    let out = memvisor_output(&["run", "--workload", "idle 30s", "--timeout", "1s"]);
    assert_timed_out(&out, "did not finish within 1s (last phase: idle 30s)");
}

#[test]
fn json_and_table_output() {
    if !common::kvm("json_and_table_output") {
        return;
    }
    let args = [
        "run",
        "--mem",
        "64M",
        "--workload",
        "alloc 16M; touch 16M write 300ms; free 8M; idle 300ms",
        "--interval",
        "100ms",
        "--seed",
        "3",
        "--console",
        "/dev/null",
    ];
    let out = memvisor_output(&[&args[..], &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert!(rows.len() >= 5, "{} rows", rows.len());
    let last = rows.last().unwrap();
    assert_eq!(last["end"], "done");
    assert_eq!(last["configured_mib"], 64.0);
    assert_eq!(last["guest"]["allocated_pages"], 8 * 256);
    assert!(last["host"]["backed_pages"].as_u64().unwrap() >= 16 * 256);
    assert_eq!(last["active_writes"]["n"], 1000);
    for r in &rows {
        let a = &r["active_writes"];
        let (lo, est, hi) = (
            a["ci_low_mib"].as_f64().unwrap(),
            a["estimate_mib"].as_f64().unwrap(),
            a["ci_high_mib"].as_f64().unwrap(),
        );
        assert!(lo <= est && est <= hi, "{r}");
    }

    for view in [&[][..], &["--wide"], &["--columns", "time,est,backed"]] {
        let out = memvisor_output(&[&args[..], view].concat());
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Not a terminal: one header, at the top.
        assert_eq!(text.matches(" time ").count(), 1, "{text}");
        assert!(lines.last().unwrap().ends_with("(end)"));
        // Two header lines, then one line per interval, every one with the same columns.
        assert!(lines.len() >= 2 + 5, "{text}");
        let bars = lines[1].matches('|').count();
        assert!(
            lines[2..].iter().all(|l| l.matches('|').count() == bars),
            "{text}"
        );
        let names: Vec<&str> = lines[1]
            .split([' ', '|'])
            .filter(|w| !w.is_empty())
            .collect();
        match view {
            [] => {
                assert!(lines[0].contains("active: reads+writes"), "{text}");
                assert_eq!(names.len(), 13, "{text}");
                let (last, rows) = lines.split_last().unwrap();
                assert!(rows.iter().all(|l| l.chars().count() <= 120), "{text}");
                assert!(last.contains("(end)"));
            }
            ["--wide"] => {
                assert!(lines[0].contains("active: writes"), "{text}");
                assert_eq!(names.len(), 29, "{text}");
            }
            _ => assert_eq!(names, ["time", "est", "backed"], "{text}"),
        }
    }
    // An unknown column is a usage error naming the valid ones.
    let out = memvisor_output(&["run", "--columns", "time,hots"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown column \"hots\"") && err.contains("untch"),
        "{err}"
    );
}

/// Makes a FIFO at `path` (in a temporary directory of the test's).
fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs the binary with `args`, failing the test if it takes more than 30 s (a hang).
fn bounded_output(args: &[&str]) -> Output {
    let mut child = common::memvisor()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = common::wait_bounded(&mut child, std::time::Duration::from_secs(30));
    Output {
        status,
        ..child.wait_with_output().unwrap()
    }
}

#[test]
fn plot_refuses_hostile_inputs_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let svg = d.join("out.svg");
    let svg_s = svg.to_str().unwrap();
    // A FIFO as input: refused at once (it used to block forever).
    let fifo = d.join("run.jsonl");
    mkfifo(&fifo);
    let out = bounded_output(&["plot", fifo.to_str().unwrap(), "-o", svg_s]);
    assert_clean_failure(&out, "a FIFO, not a regular file");
    // Lines that are JSON but not rows: refused, naming the line.
    let input = d.join("rows.jsonl");
    let row = r#"{"time_s": 1.0, "interval": 0, "phase": "idle 1s", "configured_mib": 16.0}"#;
    std::fs::write(&input, format!("{row}\n{{}}\n")).unwrap();
    let out = bounded_output(&["plot", input.to_str().unwrap(), "-o", svg_s]);
    assert_clean_failure(&out, "line 2");
    std::fs::write(&input, format!("{row}\n[]\n")).unwrap();
    let out = bounded_output(&["plot", input.to_str().unwrap(), "-o", svg_s]);
    assert_clean_failure(&out, "not a JSON object");
    assert!(!svg.exists());
    // A symbolic link as output: refused, its target untouched.
    std::fs::write(&input, format!("{row}\n")).unwrap();
    let victim = d.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = d.join("link.svg");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let out = bounded_output(&[
        "plot",
        input.to_str().unwrap(),
        "-o",
        link.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "symbolic link");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A FIFO as output: refused without blocking.
    let fifo_out = d.join("fifo.svg");
    mkfifo(&fifo_out);
    let out = bounded_output(&[
        "plot",
        input.to_str().unwrap(),
        "-o",
        fifo_out.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "FIFO");
    // A fine one.
    let out = bounded_output(&["plot", input.to_str().unwrap(), "-o", svg_s]);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("idle 1s"));
}

#[test]
fn run_plot_in_a_missing_directory_fails_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("missing/run.svg");
    let target_s = target.to_str().unwrap();
    let out = memvisor_output(&[
        "run",
        "--mem",
        "16M",
        "--workload",
        "idle 10s",
        "--plot",
        target_s,
    ]);
    assert_clean_failure(&out, "does not exist");
    assert!(out.stdout.is_empty(), "no table: the guest never ran");
    let link = dir.path().join("link.png");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    let out = memvisor_output(&["run", "--plot", link.to_str().unwrap()]);
    assert_clean_failure(&out, "symbolic link");
    assert!(out.stdout.is_empty());
}

/// The binary's standard output for `args`, which must succeed.
fn stdout_of(args: &[&str]) -> String {
    let out = memvisor_output(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_for_bash_zsh_and_fish_know_the_subcommands_and_options() {
    for (shell, marker) in [
        ("bash", "complete -F _memvisor"),
        ("zsh", "#compdef memvisor"),
        ("fish", "complete -c memvisor"),
    ] {
        let text = stdout_of(&["completions", shell]);
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        assert!(text.contains("run") && text.contains("host"), "{shell}");
        for option in ["mem", "columns", "wide"] {
            // fish spells a long option `-l mem`.
            let word = match shell {
                "fish" => format!("-l {option}"),
                _ => format!("--{option}"),
            };
            assert!(text.contains(&word), "{shell}: no {word}");
        }
    }
    let out = memvisor_output(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash"));
}

#[test]
fn man_prints_roff_pages() {
    let top = stdout_of(&["man"]);
    assert!(top.contains(".TH memvisor 1"), "{top}");
    assert!(top.contains(".SH SYNOPSIS") && top.contains("memvisor\\-run(1)"));
    // The run page, which the top page names, exists too, with run's options and exit codes.
    let run = stdout_of(&["man", "run"]);
    assert!(run.contains(".TH memvisor\\-run 1") || run.contains(".TH memvisor-run 1"));
    for word in ["\\-\\-mem", "\\-\\-columns", "Exit codes", "RUST_LOG"] {
        assert!(run.contains(word), "no {word} in the run page");
    }
    let out = memvisor_output(&["man", "bogus"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no subcommand \"bogus\"") && err.contains("run, "),
        "{err}"
    );
}

#[test]
fn help_shows_the_workload_grammar_the_exit_codes_and_rust_log() {
    for args in [&["--help"][..], &["run", "--help"]] {
        let text = stdout_of(args);
        assert!(
            text.contains(memvisor::contract::workload::GRAMMAR_HELP),
            "{args:?}: no grammar"
        );
        assert!(
            text.contains(memvisor::vmm::stop::EXIT_CODES_HELP),
            "{args:?}: no exit codes"
        );
        for word in ["touch SIZE [read|write|mixed]", "124", "143", "RUST_LOG"] {
            assert!(text.contains(word), "{args:?}: no {word}");
        }
    }
    // `run --help` still lists run's options.
    assert!(stdout_of(&["run", "--help"]).contains("--columns <LIST>"));
}

#[test]
fn on_a_terminal_the_table_repeats_its_header_every_screenful() {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    if !common::kvm("on_a_terminal_the_table_repeats_its_header_every_screenful") {
        return;
    }
    // A terminal 8 lines high: 2 header lines and 6 rows a screenful.
    let ws = libc::winsize {
        ws_row: 8,
        ws_col: 200,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given integers; the name and termios
    // pointers may be null, and `ws` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut cmd = common::memvisor();
    cmd.args([
        "run",
        "--mem",
        "64M",
        "--interval",
        "100ms",
        "--console",
        "/dev/null",
        "--workload",
        "alloc 8M; touch 8M write 1500ms",
    ])
    .stdout(std::process::Stdio::from(slave))
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    // The parent's copy of the terminal's end closes with the command: EOF (EIO) when the child ends.
    drop(cmd);
    // Read as it comes (a full terminal would block the writer), to EOF or EIO.
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        bytes
    });
    let status = common::wait_bounded(&mut child, std::time::Duration::from_secs(60));
    assert!(status.success());
    let bytes = reader.join().unwrap();
    let text = String::from_utf8(bytes).unwrap().replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("  time phase"))
        .collect();
    let rows = lines.len() - 2 * headers.len();
    assert!(rows >= 14, "{text}");
    assert_eq!(headers.len(), rows.div_ceil(6), "{text}");
    for (k, &h) in headers.iter().enumerate() {
        assert_eq!(h, 1 + 8 * k, "{text}");
    }
}
