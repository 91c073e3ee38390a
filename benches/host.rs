//! The host scheduler's experiments (README, "Several VMs on one budget"): each runs the real
//! `memvisor host --json` (every VM its own `memvisor run`), reads its rows and prints a table.
//!
//! `cargo bench --bench host [-- tax|shares|reservation|ladder|faults]`
//!
//! 1. `tax`: the idle memory tax (Waldspurger, OSDI'02, Fig. 7): an idle and a busy VM of equal
//!    shares, at τ = 0 and τ = 0.75; each VM's allocation against the equilibrium the paper's
//!    formula predicts from the measured active fractions, and the busy VM's work rate.
//! 2. `shares`: three busy VMs with shares 1:2:4.
//! 3. `reservation`: comment 9's case: an idle VM pressured by a busy one re-reads its working
//!    set; its restart time without a reservation, with one, and on an unpressured host.
//! 4. `ladder`: a budget overcommitted by 60%: states, balloon and swap over time.
//! 5. `faults`: a VM without a balloon is swapped instead; a VM killed mid-run frees its share.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// No experiment runs this long; a host that does is killed and the experiment fails.
const BOUND: Duration = Duration::from_secs(300);

/// One `memvisor host` run: its rows, its stderr (with each VM's, `RUST_LOG=memvisor=info`), and
/// its exit code.
struct HostRun {
    rows: Vec<Value>,
    stderr: String,
    code: Option<i32>,
}

fn host(args: &[String]) -> HostRun {
    host_with(args, |_, _| {})
}

/// Runs `memvisor host --json ARGS`; `each(row, pid_of)` sees every row as it comes.
fn host_with(
    args: &[String],
    mut each: impl FnMut(&Value, &dyn Fn(&str) -> Option<u32>),
) -> HostRun {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .arg("host")
        .arg("--json")
        .args(args)
        .env("RUST_LOG", "memvisor=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memvisor host");
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let host_pid = child.id();
    let started = Instant::now();
    let mut rows = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let row: Value = serde_json::from_str(&line).expect("a JSON row");
        each(&row, &|name| vm_pid(host_pid, name));
        rows.push(row);
        if started.elapsed() > BOUND {
            let _ = child.kill();
            panic!("memvisor host ran over {BOUND:?}");
        }
    }
    let code = child.wait().unwrap().code();
    HostRun {
        rows,
        stderr: stderr.join().unwrap(),
        code,
    }
}

/// The pid of the host's VM process `name` (its control socket is named after it).
fn vm_pid(host_pid: u32, name: &str) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{host_pid}/task/{host_pid}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let sock = format!("/{name}.sock");
        args.iter()
            .any(|a| a.ends_with(sock.as_bytes()))
            .then(|| pid.parse().ok())?
    })
}

fn vm<'a>(row: &'a Value, name: &str) -> &'a Value {
    row["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no VM {name} in {row}"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn running(row: &Value, name: &str) -> bool {
    vm(row, name)["status"] == "running"
}

/// The mean of `field` of VM `name` over `rows`.
fn mean(rows: &[&Value], name: &str, field: &str) -> f64 {
    rows.iter().map(|r| f(vm(r, name), field)).sum::<f64>() / rows.len().max(1) as f64
}

/// How long phase `index` of VM `name` ran, from its log line `phase N (...) ran X s`.
fn phase_seconds(stderr: &str, name: &str, index: usize) -> Option<f64> {
    let prefix = format!("[{name}] ");
    let key = format!("phase {index} (");
    stderr
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .find_map(|l| {
            let at = l.find(&key)?;
            let rest = &l[at..];
            let ran = rest.rfind(" ran ")?;
            rest[ran + 5..].trim_end_matches(" s").parse().ok()
        })
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// One VM: what the paper's formula needs.
struct Measured {
    shares: f64,
    active: f64,
    lo: f64,
    hi: f64,
}

/// The min-funding equilibrium of `pool` MiB among `vms` at tax `tax`, from the paper's formula
/// (ρ = S / (P·(f + k(1−f))), f = min(1, active/P)): each VM's allocation at a common ρ, found by
/// bisection on ρ. Written from the formula, apart from the scheduler's own search.
fn equilibrium(vms: &[Measured], pool: f64, tax: f64) -> Vec<f64> {
    let k = 1.0 / (1.0 - tax);
    // The allocation P at which S / cost(P) = rho: cost(P) = P below the active pages, and
    // active + k·(P − active) above them.
    let at = |m: &Measured, rho: f64| -> f64 {
        let c = m.shares / rho;
        let p = if c <= m.active {
            c
        } else {
            m.active + (c - m.active) / k
        };
        p.clamp(m.lo, m.hi)
    };
    let (mut lo, mut hi) = (1e-12f64, 1e12f64);
    for _ in 0..200 {
        let mid = (lo * hi).sqrt();
        let total: f64 = vms.iter().map(|m| at(m, mid)).sum();
        if total > pool {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    vms.iter().map(|m| at(m, hi)).collect()
}

fn tax() {
    println!("## 1. The idle memory tax");
    println!();
    let budget = 320.0;
    let a = "name=A,mem=256M,workload=alloc 200M; touch 200M write; idle 40s";
    let b = "name=B,mem=256M,workload=alloc 224M; touch 224M write; touch 224M mixed random 40s";
    println!(
        "`memvisor host --budget {budget}M --tax T --vm '{a}' --vm '{b}'`; averages over the \
         periods from 20 s until A ends\n"
    );
    println!(
        "| τ | VM | active (MiB) | f | target | predicted | measured (GRANT) | |pred − meas| / budget | B's rate (accesses/s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for tau in [0.0, 0.75] {
        let run = host(&args(&[
            "--budget",
            &format!("{budget}M"),
            "--tax",
            &tau.to_string(),
            "--vm",
            a,
            "--vm",
            b,
        ]));
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let window: Vec<&Value> = (run.rows.iter())
            .filter(|r| f(r, "time_s") >= 20.0 && running(r, "A") && running(r, "B"))
            .collect();
        assert!(window.len() >= 5, "{} periods", window.len());
        let pool = window
            .iter()
            .map(|r| f(&r["host"], "targets_mib"))
            .sum::<f64>()
            / window.len() as f64;
        let names = ["A", "B"];
        let measured: Vec<Measured> = names
            .iter()
            .map(|n| {
                let v = vm(window[0], n);
                Measured {
                    shares: f(v, "shares"),
                    active: mean(&window, n, "active_mib"),
                    lo: f(v, "reservation_mib"),
                    hi: f(v, "mem_mib"),
                }
            })
            .collect();
        let predicted = equilibrium(&measured, pool, tau);
        let rate = mean(&window, "B", "rate");
        for (i, n) in names.iter().enumerate() {
            let granted = mean(&window, n, "granted_mib");
            let fr = (measured[i].active / predicted[i]).min(1.0);
            println!(
                "| {tau} | {n} | {:.1} | {fr:.2} | {:.1} | {:.1} | {granted:.1} | {:.1}% | {} |",
                measured[i].active,
                mean(&window, n, "target_mib"),
                predicted[i],
                100.0 * (predicted[i] - granted).abs() / budget,
                if *n == "B" {
                    format!("{rate:.3e}")
                } else {
                    String::new()
                }
            );
        }
    }
    println!();
}

fn shares() {
    println!("## 2. Shares 1:2:4");
    println!();
    let budget = "300M";
    let specs: Vec<String> = [("s1", 1000), ("s2", 2000), ("s4", 4000)]
        .iter()
        .map(|(n, sh)| {
            format!(
                "name={n},mem=192M,shares={sh},workload=alloc 160M; touch 160M write; \
                 touch 160M mixed random 40s"
            )
        })
        .collect();
    println!(
        "`memvisor host --budget {budget} --tax T --vm '{}' ...` (and s2, s4 with shares 2000 \
         and 4000); averages over the periods from 20 s while all three run\n",
        specs[0]
    );
    println!(
        "| τ | VM | shares | active (MiB) | target | GRANT | GRANT / s1's | swapped | rate (accesses/s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for tau in ["0", "0.75"] {
        let mut a = args(&["--budget", budget, "--tax", tau]);
        for s in &specs {
            a.push("--vm".into());
            a.push(s.clone());
        }
        let run = host(&a);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let window: Vec<&Value> = (run.rows.iter())
            .filter(|r| f(r, "time_s") >= 20.0 && ["s1", "s2", "s4"].iter().all(|n| running(r, n)))
            .collect();
        assert!(window.len() >= 5, "{} periods", window.len());
        let base = mean(&window, "s1", "granted_mib");
        for n in ["s1", "s2", "s4"] {
            let g = mean(&window, n, "granted_mib");
            println!(
                "| {tau} | {n} | {:.0} | {:.1} | {:.1} | {g:.1} | {:.2} | {:.1} | {:.3e} |",
                f(vm(window[0], n), "shares"),
                mean(&window, n, "active_mib"),
                mean(&window, n, "target_mib"),
                g / base,
                mean(&window, n, "swapped_mib"),
                mean(&window, n, "rate"),
            );
        }
    }
    println!();
}

fn reservation() {
    println!("## 3. A reservation (comment 9)");
    println!();
    let app =
        "name=app,mem=256M{resv},workload=alloc 128M; touch 128M write; idle 25s; touch 128M read";
    let busy =
        "name=busy,mem=256M,workload=alloc 224M; touch 224M write; touch 224M mixed random 45s";
    println!(
        "`memvisor host --budget B --vm '{app}' --vm '{busy}'`: `app` fills 128 MiB, idles 25 s \
         while `busy` works, then re-reads its 128 MiB (the restart, phase 3)\n"
    );
    println!(
        "| case | budget | app's reservation | app swapped before its restart (MiB) | restart (s) | busy's rate (accesses/s) |"
    );
    println!("|---|---|---|---|---|---|");
    for (case, budget, resv) in [
        ("pressured", "320M", ""),
        ("pressured, reserved", "320M", ",reservation=160M"),
        ("unpressured", "1G", ""),
    ] {
        let run = host(&args(&[
            "--budget",
            budget,
            "--vm",
            &app.replace("{resv}", resv),
            "--vm",
            busy,
        ]));
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let restart = phase_seconds(&run.stderr, "app", 3).expect("the restart phase's length");
        let before: Vec<&Value> = (run.rows.iter())
            .filter(|r| f(r, "time_s") >= 10.0 && f(r, "time_s") < 25.0 && running(r, "app"))
            .collect();
        let swapped = (before.iter())
            .map(|r| f(vm(r, "app"), "swapped_mib"))
            .fold(0.0, f64::max);
        println!(
            "| {case} | {budget} | {} | {swapped:.1} | {restart:.3} | {:.3e} |",
            if resv.is_empty() { "none" } else { "160M" },
            mean(&before, "busy", "rate")
        );
    }
    println!();
}

fn ladder() {
    println!("## 4. The reclamation ladder");
    println!();
    let budget = "320M";
    // v3's memory grows by 16 MiB every 2 s to 224 MiB, beside a busy VM and an idle one.
    let mut ramp = "alloc 224M; idle 4s".to_string();
    for step in 1..=14 {
        ramp.push_str(&format!("; touch {}M write; idle 1s", 16 * step));
    }
    ramp.push_str("; idle 20s");
    let specs = [
        "name=v1,mem=256M,workload=alloc 128M; touch 128M write; touch 128M mixed random 50s"
            .to_string(),
        "name=v2,mem=256M,workload=alloc 128M; idle 2s; touch 128M write; idle 45s".to_string(),
        format!("name=v3,mem=256M,workload={ramp}"),
    ];
    let mut a = args(&["--budget", budget, "--period", "500ms"]);
    for s in &specs {
        a.push("--vm".into());
        a.push(s.clone());
    }
    println!(
        "`memvisor host --budget {budget} --period 500ms --vm '{}' --vm '{}' --vm 'name=v3,mem=256M,\
         workload=alloc 224M; idle 4s; touch 16M write; idle 1s; touch 32M write; idle 1s; ...; \
         touch 224M write; idle 1s; idle 20s'`: 480 MiB touched plus about 36 MiB of overheads on \
         a 320 MiB budget (61% over), v3's part arriving at 8 MiB a second\n",
        specs[0], specs[1]
    );
    let run = host(&a);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let names = ["v1", "v2", "v3"];
    let sum = |r: &Value, k: &str| names.iter().map(|n| f(vm(r, n), k)).sum::<f64>();
    println!(
        "| time (s) | state | free (MiB) | Σ GRANT | Σ MCTLSZ | Σ MCTLTGT | Σ SWCUR | Σ SWTGT | paused |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut first_balloon = None;
    let mut first_swap = None;
    let mut peak: f64 = 0.0;
    for r in &run.rows {
        let t = f(r, "time_s");
        if first_balloon.is_none() && sum(r, "balloon_target_mib") > 0.0 {
            first_balloon = Some(t);
        }
        if first_swap.is_none() && sum(r, "swap_target_mib") > 0.0 {
            first_swap = Some(t);
        }
        peak = peak.max(sum(r, "swapped_mib"));
        let paused: Vec<&str> = names
            .iter()
            .filter(|n| vm(r, n)["paused"] == true)
            .copied()
            .collect();
        println!(
            "| {t:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r["host"]["state"].as_str().unwrap_or("?"),
            f(&r["host"], "free_mib"),
            sum(r, "granted_mib"),
            sum(r, "balloon_mib"),
            sum(r, "balloon_target_mib"),
            sum(r, "swapped_mib"),
            sum(r, "swap_target_mib"),
            paused.join(" ")
        );
    }
    let last = run
        .rows
        .iter()
        .rev()
        .find(|r| names.iter().all(|n| running(r, n)))
        .expect("a period with every VM running");
    let transitions = run
        .rows
        .last()
        .map_or(0.0, |r| f(&r["host"], "transitions"));
    let mut changes = Vec::new();
    for w in run.rows.windows(2) {
        if w[0]["host"]["state"] != w[1]["host"]["state"] {
            changes.push(format!(
                "{} → {} at {:.1} s",
                w[0]["host"]["state"].as_str().unwrap_or("?"),
                w[1]["host"]["state"].as_str().unwrap_or("?"),
                f(&w[1], "time_s")
            ));
        }
    }
    println!();
    println!(
        "State changes: {transitions:.0} ({}). First balloon target at {} s, first swap target at {} s. \
         Swapped at the peak: {peak:.1} MiB; still swapped in the last period with all three \
         running: {:.1} MiB.",
        changes.join(", "),
        first_balloon.map_or("-".into(), |t| format!("{t:.1}")),
        first_swap.map_or("-".into(), |t| format!("{t:.1}")),
        sum(last, "swapped_mib"),
    );
    println!();
}

fn faults() {
    println!("## 5. A VM without a balloon, and a VM killed");
    println!();
    let budget = "360M";
    let specs = [
        "name=nob,mem=256M,no-balloon,workload=alloc 160M; touch 160M write; idle 40s",
        "name=bal,mem=256M,workload=alloc 160M; touch 160M write; idle 40s",
        "name=victim,mem=256M,workload=alloc 200M; touch 200M write; touch 200M mixed random 60s",
    ];
    let mut a = args(&["--budget", budget]);
    for s in specs {
        a.push("--vm".into());
        a.push(s.into());
    }
    println!(
        "`memvisor host --budget {budget} --vm '{}' --vm '{}' --vm '{}'`; `victim` is sent SIGKILL \
         at 20 s\n",
        specs[0], specs[1], specs[2]
    );
    let mut killed_at = None;
    let run = host_with(&a, |row, pid_of| {
        if killed_at.is_none()
            && f(row, "time_s") >= 20.0
            && let Some(pid) = pid_of("victim")
        {
            // SAFETY: kill(2) on the host's own child, found by its control socket's name.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            killed_at = Some(f(row, "time_s"));
        }
    });
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let killed_at = killed_at.expect("victim was killed");
    let before: Vec<&Value> = (run.rows.iter())
        .filter(|r| f(r, "time_s") >= 10.0 && f(r, "time_s") < killed_at)
        .collect();
    println!("Before the kill (10 s to {killed_at:.0} s, averages):\n");
    println!("| VM | target | GRANT | MCTLSZ | SWCUR | state |");
    println!("|---|---|---|---|---|---|");
    for n in ["nob", "bal", "victim"] {
        let last = vm(before.last().expect("periods before the kill"), n);
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            mean(&before, n, "target_mib"),
            mean(&before, n, "granted_mib"),
            mean(&before, n, "balloon_mib"),
            mean(&before, n, "swapped_mib"),
            if last["balloon_stuck"] == true {
                "swap"
            } else {
                "run"
            }
        );
    }
    let period = |t: f64| (run.rows.iter()).position(|r| f(r, "time_s") >= t);
    let kill = period(killed_at).unwrap_or(0);
    let reported =
        (run.rows.iter().skip(kill)).position(|r| vm(r, "victim")["status"] != "running");
    let freed = (run.rows.iter().skip(kill)).position(|r| {
        vm(r, "victim")["status"] != "running"
            && f(vm(r, "nob"), "target_mib") + f(vm(r, "bal"), "target_mib")
                >= f(&r["host"], "targets_mib") - 1.0
    });
    let show = |p: Option<usize>| p.map_or("never".into(), |p| format!("{p} period(s)"));
    println!(
        "\nAfter the kill: reported {} later (its status `{}`), its share given to the others {} \
         later (their targets {:.1} MiB before, {:.1} MiB after).\n",
        show(reported),
        run.rows
            .last()
            .map_or("?".into(), |r| vm(r, "victim")["status"].to_string()),
        show(freed),
        before.last().map_or(0.0, |r| f(vm(r, "nob"), "target_mib")
            + f(vm(r, "bal"), "target_mib")),
        freed
            .and_then(|p| run.rows.get(kill + p))
            .map_or(0.0, |r| f(vm(r, "nob"), "target_mib")
                + f(vm(r, "bal"), "target_mib")),
    );
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("the host experiments need /dev/kvm; skipped");
        return;
    }
    if want("tax") {
        tax();
    }
    if want("shares") {
        shares();
    }
    if want("reservation") {
        reservation();
    }
    if want("ladder") {
        ladder();
    }
    if want("faults") {
        faults();
    }
}
