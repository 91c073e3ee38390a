//! `memvisor top` driven as a person would, in a real terminal: tmux runs it on a file of host
//! periods (`--stdin`), keys are sent with `send-keys`, the screen is read with `capture-pane`,
//! and its end is checked: `q` and SIGTERM end the process with 0 and 143 and leave the terminal off
//! the alternate screen, the cursor shown. Skipped (and said) where tmux is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

/// An isolated tmux server for one test, killed at the end.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(name: &str) -> Option<Self> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("SKIPPED {name}: tmux is not installed (.ci/run installs it)");
            return None;
        }
        Some(Tmux {
            socket: format!("memvisor-{name}-{}", std::process::id()),
        })
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `command` in a 120x30 pane, then says how it ended and waits: the pane's terminal
    /// can be read after it ended.
    fn start(&self, command: &str) {
        let shell = format!("{command}; echo EXIT=$?; sleep 600");
        self.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "120",
            "-y",
            "30",
            &shell,
        ]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "t", format])
            .trim()
            .to_string()
    }

    /// Waits (bounded) until `ok` holds for the screen.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what} never showed:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until the command ended; returns its exit status.
    fn wait_exit(&self) -> i32 {
        let s = self.wait_for("the exit status", |s| s.contains("EXIT="));
        let at = s.find("EXIT=").unwrap() + 5;
        s[at..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no status in:\n{s}"))
    }

    /// The process id of the command the pane's shell runs.
    fn command_pid(&self) -> i32 {
        let shell: i32 = self.pane("#{pane_pid}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                // pid (comm) state ppid ...: the fields after the last ')'.
                let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                    continue;
                };
                let ppid: Option<i32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
                if ppid == Some(shell) && stat.contains("(memvisor)") {
                    return e.file_name().to_string_lossy().parse().unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no memvisor under the pane's shell"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn vm(name: &str, granted: f64, target: f64, active: f64) -> serde_json::Value {
    json!({
        "name": name, "status": "running", "exit_code": null, "mem_mib": 128.0,
        "target_mib": target, "granted_mib": granted, "active_mib": active,
        "active_source": "accesses", "active_pct": 100.0 * active / granted,
        "balloon_mib": 4.0, "balloon_target_mib": 8.0, "swapped_mib": 0.0,
        "swap_target_mib": 0.0, "overhead_mib": 7.5, "shares": 1280, "reservation_mib": 0.0,
        "limit_mib": null, "rate": 1.5e6, "balloon_stuck": false, "paused": false,
        "order_errors": 0
    })
}

/// Two periods of a host of three VMs, as `memvisor host --json` prints them.
fn host_stream(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for p in 0..2 {
        let x = p as f64;
        let period = json!({
            "time_s": x + 1.0, "period": p,
            "host": {"budget_mib": 400.0, "free_mib": 60.0, "state": "soft", "transitions": 1,
                     "targets_mib": 300.0, "running": 3},
            "vms": [vm("web", 48.0 + x, 66.0, 37.0), vm("db", 86.0, 67.0, 10.0),
                    vm("app", 60.0, 80.0, 45.0)]
        });
        text.push_str(&period.to_string());
        text.push('\n');
    }
    let path = dir.join("host.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

fn top_command(file: &Path) -> String {
    format!(
        "{} top --stdin < {}",
        env!("CARGO_BIN_EXE_memvisor"),
        file.display()
    )
}

#[test]
fn top_in_tmux_shows_the_vms_sorts_and_quits_cleanly() {
    let Some(tmux) = Tmux::new("top-q") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tmux.start(&top_command(&host_stream(dir.path())));
    // The whole frame, to its key line (a capture may catch tmux half-way through drawing it).
    let s = tmux.wait_for("the VM lines", |s| {
        s.contains("period 1") && s.lines().any(|l| l.starts_with("app ")) && s.contains("q quit")
    });
    assert!(s.contains("memvisor top  host"), "{s}");
    assert!(s.contains("state soft"), "{s}");
    let web = s.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(web.contains("49.0") && web.contains("66.0"), "{web}");
    assert!(s.contains("q quit"), "the keys are shown: {s}");
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "1",
        "drawn on the alternate screen"
    );

    // Five presses of `s`: NAME, STATE, MEMSZ, SZTGT, GRANT (largest first): db, app, web.
    tmux.run(&["send-keys", "-t", "t", "s", "s", "s", "s", "s"]);
    let s = tmux.wait_for("the sort by GRANT", |s| s.contains("sort: GRANT"));
    let order: Vec<&str> = s
        .lines()
        .filter_map(|l| {
            ["web ", "db ", "app "]
                .into_iter()
                .find(|n| l.starts_with(n))
        })
        .collect();
    assert_eq!(order, ["db ", "app ", "web "], "{s}");

    tmux.run(&["send-keys", "-t", "t", "q"]);
    assert_eq!(tmux.wait_exit(), 0);
    assert_eq!(tmux.pane("#{alternate_on}"), "0", "the main screen is back");
    assert_eq!(tmux.pane("#{cursor_flag}"), "1", "the cursor is shown");
}

#[test]
fn top_in_tmux_gives_the_terminal_back_on_sigterm() {
    let Some(tmux) = Tmux::new("top-term") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tmux.start(&top_command(&host_stream(dir.path())));
    tmux.wait_for("the VM lines", |s| s.lines().any(|l| l.starts_with("db ")));
    let pid = tmux.command_pid();
    // SAFETY: kill(2) on the memvisor process this test started in the pane.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(tmux.wait_exit(), 143);
    assert_eq!(tmux.pane("#{alternate_on}"), "0", "the main screen is back");
    assert_eq!(tmux.pane("#{cursor_flag}"), "1", "the cursor is shown");
}

#[test]
fn top_refuses_what_it_cannot_show_with_a_clear_error() {
    let top = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
            .arg("top")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No source, or a wrong operand: usage errors.
    let (code, err) = top(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--control"), "{err}");
    let (code, err) = top(&["host.sock"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the only operand is `-`"), "{err}");
    let (code, _) = top(&["-", "--control", "/tmp/x.sock"]);
    assert_eq!(code, Some(2));
    // Standard output is a pipe here, not a terminal to draw on.
    let (code, err) = top(&["--stdin"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("standard output is not one"), "{err}");
    let (code, err) = top(&["--control", "/tmp/x.sock", "--interval", "10ms"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--interval must be at least 100 ms"), "{err}");
}
