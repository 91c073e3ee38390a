//! Hostile guests: tiny ring-0 programs, assembled at test time with the toolchain that builds the
//! real guest, that do what a well-behaved guest never does. Each must end with a clear error or a
//! bounded correct run: never a panic (exit code 101) and never a hang (every run has a wall-clock
//! bound here and is killed and failed past it).
//!
//! The guests start as `docs/abi.md` says: 64-bit long mode, ring 0, the low 1 GiB identity
//! mapped, interrupts off, no IDT. Their code is loaded at 1 MiB (`common::tiny_elf`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::tiny_elf;

/// Wall-clock bound for one memvisor run: generous, since two cores are shared by parallel builds;
/// a hang is infinitely longer.
const RUN_BOUND: Duration = Duration::from_secs(90);

/// Guest RAM for the assembled guests; addresses from 16 MiB to 1 GiB are identity mapped but not
/// RAM, so accesses there are MMIO exits.
const MEM: &str = "16M";

/// A scratch address in guest RAM, away from the image at 1 MiB.
const SCRATCH: u64 = 0x20_0000;

/// A tool from the guest toolchain (`GUEST_CC` etc., as `build.rs` reads them).
fn tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

fn run_tool(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles 64-bit AT&T `body` (entry at its first instruction), links it at 1 MiB, flattens it
/// and wraps it in an ELF image written to `dir`. Returns the image's path.
fn assemble(dir: &Path, name: &str, body: &str) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let bin = dir.join(format!("{name}.bin"));
    let text = format!(
        "        .code64\n        .text\n        .globl _start\n_start:\n{body}\n\
         \n        .section .note.GNU-stack, \"\", @progbits\n"
    );
    std::fs::write(&src, text).unwrap();
    run_tool(
        Command::new(tool("GUEST_CC", "gcc"))
            .args(["-c", "-nostdlib", "-fno-pic"])
            .arg(&src)
            .arg("-o")
            .arg(&obj),
    );
    run_tool(
        Command::new(tool("GUEST_LD", "ld"))
            .args([
                "-nostdlib",
                "-static",
                "--no-dynamic-linker",
                "--build-id=none",
                "-Ttext=0x100000",
                "-o",
            ])
            .arg(&elf)
            .arg(&obj),
    );
    run_tool(
        Command::new(tool("GUEST_OBJCOPY", "objcopy"))
            .args(["-O", "binary", "-j", ".text"])
            .arg(&elf)
            .arg(&bin),
    );
    let code = std::fs::read(&bin).unwrap();
    assert!(!code.is_empty(), "{name}: no code assembled");
    let image = dir.join(format!("{name}.img"));
    std::fs::write(&image, tiny_elf(&code)).unwrap();
    image
}

/// A report-channel message (`docs/abi.md`, 128 bytes) as assembler data at label `msg`,
/// 8-byte aligned, with `kind` and arg0..arg2, CR2 and CS.
fn message_data(kind: u32, args: [u64; 3], cr2: u64, cs: u64) -> String {
    format!(
        "        .balign 8\nmsg:\n        .long {magic:#x}, {kind}\n        .fill 8, 8, 0\n\
         \x20       .quad {a0:#x}, {a1:#x}, {a2:#x}\n        .quad 0, 0\n        .quad {cr2:#x}, {cs:#x}\n",
        magic = memvisor::contract::abi::MSG_MAGIC,
        a0 = args[0],
        a1 = args[1],
        a2 = args[2],
    )
}

/// How a bounded run of memvisor ended.
struct Ended {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    stderr_len: u64,
}

/// Runs memvisor with `args`, stdout and stderr kept, and fails the test (after killing it) if it
/// runs past [`RUN_BOUND`].
fn run_bounded(dir: &Path, args: &[&str]) -> Ended {
    let err_path = dir.join("stderr");
    let out_path = dir.join("stdout");
    let err = std::fs::File::create(&err_path).unwrap();
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = common::memvisor()
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn memvisor");
    let status = common::wait_bounded(&mut child, RUN_BOUND);
    let bytes = std::fs::read(&err_path).unwrap();
    Ended {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr_len: bytes.len() as u64,
        stderr: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Runs the assembled guest `body` with `--mem 16M`, a trivial workload and `extra` arguments.
fn run_guest(name: &str, body: &str, extra: &[&str]) -> (Ended, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let image = assemble(dir.path(), name, body);
    let mut args = vec![
        "run",
        "--guest",
        image.to_str().unwrap(),
        "--mem",
        MEM,
        "--workload",
        "idle 10ms",
        "--interval",
        "250ms",
    ];
    args.extend_from_slice(extra);
    (run_bounded(dir.path(), &args), dir)
}

/// A failure that is memvisor's own: non-zero exit code (no signal), no panic.
fn assert_clean_error(e: &Ended) {
    let code = e.status.code();
    assert!(
        code.is_some_and(|c| c != 0 && c != 101),
        "expected a clean error exit, got {:?}; stderr: {}",
        e.status,
        e.stderr
    );
    assert!(
        !e.stderr.contains("panicked"),
        "memvisor panicked: {}",
        e.stderr
    );
}

/// A clean error whose message contains `needle`.
fn assert_error_mentions(e: &Ended, needle: &str) {
    assert_clean_error(e);
    assert!(
        e.stderr.contains(needle),
        "stderr does not mention {needle:?}: {}",
        e.stderr
    );
}

/// A run stopped by `--timeout`: a clean error that says so (exit code 1 today, 124 once timeouts
/// get their own code).
fn assert_timed_out(e: &Ended) {
    assert_clean_error(e);
    let s = e.stderr.to_lowercase();
    assert!(
        s.contains("did not finish") || s.contains("timeout") || s.contains("timed out"),
        "not a timeout error: {}",
        e.stderr
    );
}

/// Stderr stays small however much garbage the guest sends: the VMM logs the first few.
fn assert_small_stderr(e: &Ended) {
    assert!(
        e.stderr_len < 64 * 1024,
        "{} bytes on stderr; first 2000: {}",
        e.stderr_len,
        &e.stderr[..e.stderr.len().min(2000)]
    );
}

#[test]
fn hostile_triple_fault() {
    if !common::kvm("hostile_triple_fault") {
        return;
    }
    // A read at 2 GiB, which no page table maps: #PF with no IDT to deliver it, then #DF, then
    // shutdown.
    let (e, _dir) = run_guest(
        "triple",
        "        movl $0x80000000, %eax\n        movq (%rax), %rax\n        hlt",
        &["--timeout", "20s"],
    );
    assert_error_mentions(&e, "triple-faulted");
}

#[test]
fn hostile_ring0_loop_is_stopped_by_timeout() {
    if !common::kvm("hostile_ring0_loop_is_stopped_by_timeout") {
        return;
    }
    let body = format!("1:      incq {SCRATCH:#x}\n        pause\n        jmp 1b");
    let (e, _dir) = run_guest("loop0", &body, &["--timeout", "1s"]);
    assert_timed_out(&e);
}

#[test]
fn hostile_ring3_loop_is_stopped_by_timeout() {
    if !common::kvm("hostile_ring3_loop_is_stopped_by_timeout") {
        return;
    }
    // The real guest's app touching its heap for an hour: an endless loop in ring 3.
    let dir = tempfile::tempdir().unwrap();
    let e = run_bounded(
        dir.path(),
        &[
            "run",
            "--mem",
            "32M",
            "--workload",
            "alloc 4M; touch 4M write 1h",
            "--interval",
            "250ms",
            "--timeout",
            "2s",
            "--console",
            dir.path().join("console").to_str().unwrap(),
        ],
    );
    assert_timed_out(&e);
    assert!(e.stderr.contains("touch 4M write"), "{}", e.stderr);
}

#[test]
fn hostile_hlt_with_interrupts_off() {
    if !common::kvm("hostile_hlt_with_interrupts_off") {
        return;
    }
    // Nothing can wake it: the run must end at once, as a guest that stopped early.
    let (e, _dir) = run_guest(
        "hlt",
        "        cli\n        hlt\n        jmp _start",
        &["--timeout", "60s"],
    );
    assert_error_mentions(&e, "halted before finishing");
}

#[test]
fn hostile_serial_flood_without_newline_loses_no_byte() {
    if !common::kvm("hostile_serial_flood_without_newline_loses_no_byte") {
        return;
    }
    const BYTES: u32 = 20_000;
    // 'a'..'z' over and over, one OUT per byte, never a newline, then HLT.
    let body = format!(
        "        movw $0x3f8, %dx\n        movb $'a', %bl\n        xorl %ecx, %ecx\n\
         1:      movb %bl, %al\n        outb %al, %dx\n        incb %bl\n\
         \x20       cmpb $'z' + 1, %bl\n        jne 2f\n        movb $'a', %bl\n\
         2:      incl %ecx\n        cmpl ${BYTES}, %ecx\n        jne 1b\n        hlt"
    );
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.txt");
    let image = assemble(dir.path(), "flood", &body);
    let e = run_bounded(
        dir.path(),
        &[
            "run",
            "--guest",
            image.to_str().unwrap(),
            "--mem",
            MEM,
            "--workload",
            "idle 10ms",
            "--timeout",
            "60s",
            "--console",
            console.to_str().unwrap(),
        ],
    );
    // The guest halts without reporting: an error, but the console must hold every byte.
    assert_error_mentions(&e, "halted before finishing");
    let text = std::fs::read_to_string(&console).unwrap();
    let mut got = Vec::new();
    for line in text.lines() {
        let body = line
            .strip_prefix("guest| ")
            .unwrap_or_else(|| panic!("console line without prefix: {line:?}"));
        got.extend_from_slice(body.as_bytes());
    }
    let want: Vec<u8> = (0..BYTES).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(got.len(), want.len(), "bytes on the console");
    assert!(got == want, "console bytes differ from what the guest sent");
}

#[test]
fn hostile_bad_and_flooded_report_messages() {
    if !common::kvm("hostile_bad_and_flooded_report_messages") {
        return;
    }
    // Out of RAM, misaligned, the wrong width, zeros in RAM (bad magic), then 100,000 messages at
    // pseudo-random aligned addresses (mostly outside RAM, some on bad data), then HLT.
    let body = format!(
        "        movw $0x510, %dx\n\
         \x20       movl $0xfffffff8, %eax\n        outl %eax, %dx\n\
         \x20       movl ${SCRATCH:#x} + 3, %eax\n        outl %eax, %dx\n\
         \x20       outb %al, %dx\n\
         \x20       movl ${SCRATCH:#x}, %eax\n        outl %eax, %dx\n\
         \x20       xorl %ecx, %ecx\n\
         1:      movl %ecx, %eax\n        imull $0x9e3779b1, %eax, %eax\n        andl $~7, %eax\n\
         \x20       outl %eax, %dx\n        incl %ecx\n        cmpl $100000, %ecx\n        jne 1b\n\
         \x20       hlt"
    );
    let (e, _dir) = run_guest("reports", &body, &["--timeout", "60s"]);
    assert_error_mentions(&e, "malformed report");
    assert_small_stderr(&e);
}

#[test]
fn hostile_done_without_boot_is_an_error() {
    if !common::kvm("hostile_done_without_boot_is_an_error") {
        return;
    }
    // A well-formed DONE as the guest's first and only message.
    let body = format!(
        "        movw $0x510, %dx\n        movl $msg, %eax\n        outl %eax, %dx\n        hlt\n{}",
        message_data(7, [0; 3], 0, 0)
    );
    let (e, _dir) = run_guest("done", &body, &["--timeout", "20s"]);
    assert_clean_error(&e);
    let s = e.stderr.to_lowercase();
    assert!(
        s.contains("without") && s.contains("workload"),
        "the error does not say the guest finished without running its workload: {}",
        e.stderr
    );
}

#[test]
fn hostile_fault_then_spin_times_out_naming_the_fault() {
    if !common::kvm("hostile_fault_then_spin_times_out_naming_the_fault") {
        return;
    }
    // A FAULT message (page fault at CR2 0xdead000 in the kernel), then spinning instead of HLT.
    let body = format!(
        "        movw $0x510, %dx\n        movl $msg, %eax\n        outl %eax, %dx\n\
         1:      pause\n        jmp 1b\n{}",
        message_data(8, [14, 2, 0x10_0000], 0xdead000, 0x08)
    );
    let (e, _dir) = run_guest("faultspin", &body, &["--timeout", "2s"]);
    assert_error_mentions(&e, "page fault");
}

#[test]
fn hostile_mmio_loop_is_stopped_by_timeout() {
    if !common::kvm("hostile_mmio_loop_is_stopped_by_timeout") {
        return;
    }
    // Writes and reads at 512 and 768 MiB: identity mapped, but no RAM behind them (16 MiB).
    let body =
        "1:      movl $0x12345678, 0x20000000\n        movl 0x30000000, %eax\n        jmp 1b";
    let (e, _dir) = run_guest("mmio", body, &["--timeout", "2s"]);
    assert_timed_out(&e);
    assert_small_stderr(&e);
}

#[test]
fn hostile_phase_duration_beyond_the_tsc_range_keeps_the_guest_busy() {
    if !common::kvm("hostile_phase_duration_beyond_the_tsc_range_keeps_the_guest_busy") {
        return;
    }
    use memvisor::contract::workload::{Phase, Workload};
    // The spec parser caps durations at a year, but a phase table written by other means can hold
    // any u64. Pick the duration whose naive conversion, (ms) * tsc_khz, just passes 2^64 and wraps
    // to less than a millisecond of ticks: the guest must saturate instead and still be idling
    // when the timeout stops it.
    let (probe, _) = common::run_ok("idle 10ms", 16 << 20);
    let khz = probe.tsc_khz.max(1);
    let ms = (1u128 << 64).div_ceil(u128::from(khz)) as u64;
    let mut opts = common::config("idle 1s", 16 << 20);
    opts.timeout = Some(Duration::from_secs(2));
    let mut cfg = common::validated(opts);
    cfg.workload = Workload {
        phases: vec![Phase::Idle {
            duration: Duration::from_millis(ms),
        }],
        text: format!("idle {ms}ms"),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            common::run_validated(cfg)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    });
    let r = rx
        .recv_timeout(RUN_BOUND)
        .unwrap_or_else(|_| panic!("the run still going after {RUN_BOUND:?}"));
    let Err(err) = r else {
        panic!("the guest ended an idle phase of {ms} ms at once, with success");
    };
    assert!(
        err.contains("did not finish") || err.to_lowercase().contains("timeout"),
        "{err}"
    );
}

#[test]
fn hostile_balloon_driver_breaks_only_the_device() {
    if !common::kvm("hostile_balloon_driver_breaks_only_the_device") {
        return;
    }
    // Maps the virtio-balloon's page (448 GiB) with PDPT entry 448 -> a PD at 3 MiB, then drives
    // the device with garbage: every status bit at once, a queue of size 0, rings at 4 GiB, odd
    // widths, notifications of queues that do not exist, a notification flood; then halts.
    let base = memvisor::contract::abi::balloon::MMIO_BASE;
    let body = format!(
        "        movq $0x300000, %rdi\n        movabsq ${pde:#x}, %rax\n        movq %rax, (%rdi)\n\
         \x20       movq $0x300003, %rax\n        movq %rax, {pdpte:#x}\n\
         \x20       movq %cr3, %rax\n        movq %rax, %cr3\n\
         \x20       movabsq ${base:#x}, %rbx\n\
         \x20       movl $0xff, 0x70(%rbx)\n        movl $0, 0x70(%rbx)\n\
         \x20       movl $0, 0x38(%rbx)\n        movl $1, 0x84(%rbx)\n        movl $1, 0x44(%rbx)\n\
         \x20       movl $0xf, 0x70(%rbx)\n        movb $1, 0x70(%rbx)\n        movq (%rbx), %rax\n\
         \x20       movb 0x101(%rbx), %al\n        movl $3, 0x50(%rbx)\n\
         \x20       movl $20000, %ecx\n1:      movl %ecx, 0x50(%rbx)\n        decl %ecx\n        jnz 1b\n\
         \x20       hlt",
        pde = base | 0x83,
        pdpte = memvisor::contract::abi::PDPT_ADDR + 8 * (base >> 30),
    );
    let (e, _dir) = run_guest("balloon", &body, &["--timeout", "60s"]);
    assert_error_mentions(&e, "halted before finishing");
    assert!(e.stderr.contains("virtio-balloon"), "{}", e.stderr);
    assert_small_stderr(&e);
}

/// Assembler that maps the virtio-balloon's page (PDPT entry 448 -> a PD at 3 MiB), starts the
/// device (VERSION_1 only, inflate queue of 256 at `DESC`, `AVAIL`, `USED`), fills a PFN array of
/// MAX_PFNS PFNs outside RAM at `ARRAY`, runs `descriptors` (which writes the chain at `DESC`),
/// then makes all 256 ring entries (head 0) available and notifies, over and over.
fn balloon_flood(descriptors: &str) -> String {
    use memvisor::contract::abi::balloon::reg;
    let base = memvisor::contract::abi::balloon::MMIO_BASE;
    format!(
        "        movq $0x300000, %rdi\n        movabsq ${pde:#x}, %rax\n        movq %rax, (%rdi)\n\
         \x20       movq $0x300003, %rax\n        movq %rax, {pdpte:#x}\n\
         \x20       movq %cr3, %rax\n        movq %rax, %cr3\n\
         \x20       movabsq ${base:#x}, %rbx\n\
         \x20       movl $0, {st}(%rbx)\n        movl $3, {st}(%rbx)\n\
         \x20       movl $1, {dfsel}(%rbx)\n        movl $1, {df}(%rbx)\n        movl $0xb, {st}(%rbx)\n\
         \x20       movl $0, {qsel}(%rbx)\n        movl $256, {qnum}(%rbx)\n\
         \x20       movl ${DESC:#x}, {qdesc}(%rbx)\n        movl ${AVAIL:#x}, {qavail}(%rbx)\n\
         \x20       movl ${USED:#x}, {qused}(%rbx)\n        movl $1, {qready}(%rbx)\n\
         \x20       movl $0xf, {st}(%rbx)\n\
         \x20       movq ${ARRAY:#x}, %rdi\n        movl $0xffffffff, %eax\n\
         \x20       movl ${pfns}, %ecx\n        rep stosl\n\
         {descriptors}\n\
         \x20       xorl %edx, %edx\n\
         1:      addw $256, %dx\n        movw %dx, {AVAIL:#x} + 2\n\
         \x20       movl $0, {notify}(%rbx)\n        jmp 1b",
        pde = base | 0x83,
        pdpte = memvisor::contract::abi::PDPT_ADDR + 8 * (base >> 30),
        st = reg::STATUS,
        dfsel = reg::DRIVER_FEATURES_SEL,
        df = reg::DRIVER_FEATURES,
        qsel = reg::QUEUE_SEL,
        qnum = reg::QUEUE_NUM,
        qdesc = reg::QUEUE_DESC_LOW,
        qavail = reg::QUEUE_AVAIL_LOW,
        qused = reg::QUEUE_USED_LOW,
        qready = reg::QUEUE_READY,
        notify = reg::QUEUE_NOTIFY,
        pfns = memvisor::contract::abi::balloon::MAX_PFNS,
    )
}

const DESC: u64 = 0x40_0000;
const AVAIL: u64 = 0x40_1000;
const USED: u64 = 0x40_2000;
const ARRAY: u64 = 0x41_0000;
/// An indirect descriptor table of 65,535 entries (1 MiB).
const INDIRECT: u64 = 0x50_0000;

/// Writes `n` descriptors at `table`, each the PFN array at `ARRAY` with NEXT set, descriptor i
/// chained to (i + 1) & `mask`.
fn chained_arrays(table: u64, n: u32, mask: u32) -> String {
    format!(
        "        movq ${table:#x}, %rdi\n        xorl %ecx, %ecx\n\
         2:      movq ${ARRAY:#x}, (%rdi)\n        movl ${len}, 8(%rdi)\n        movw $1, 12(%rdi)\n\
         \x20       leal 1(%rcx), %eax\n        andl ${mask}, %eax\n        movw %ax, 14(%rdi)\n\
         \x20       addq $16, %rdi\n        incl %ecx\n        cmpl ${n}, %ecx\n        jne 2b",
        len = 4 * memvisor::contract::abi::balloon::MAX_PFNS,
    )
}

/// The run ended by its timeout, as a timeout ends a run: exit code 124, and a final row.
fn assert_timeout_with_final_row(e: &Ended) {
    let out = std::process::Output {
        status: e.status,
        stdout: e.stdout.clone().into_bytes(),
        stderr: e.stderr.clone().into_bytes(),
    };
    common::assert_timed_out(&out, "did not finish");
    assert_small_stderr(e);
}

#[test]
fn hostile_balloon_chain_flood_keeps_the_clock() {
    if !common::kvm("hostile_balloon_chain_flood_keeps_the_clock") {
        return;
    }
    // 256 chains per notification, all the same head: 256 descriptors in a loop, each an array
    // of 4096 PFNs (268M PFNs per notification), over and over. The work is done in bounded
    // parts between which the run looks at its clock: the timeout ends it, with its final row.
    let body = balloon_flood(&chained_arrays(DESC, 256, 255));
    let (e, _dir) = run_guest("balloonflood", &body, &["--timeout", "3s"]);
    assert_timeout_with_final_row(&e);
    assert!(e.stderr.contains("outside guest RAM"), "{}", e.stderr);
    // The clock kept going during the flood: rows came at the interval ticks (12 of them in 3 s
    // of 250 ms), not one row after the whole notification was done. Three is a wide margin; a
    // VMM frozen in one notification prints one row and the end row.
    let rows = e
        .stdout
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.parse::<f64>().is_ok())
        })
        .count();
    assert!(rows >= 4, "{rows} rows (end row included): {}", e.stdout);
}

#[test]
fn hostile_balloon_indirect_table_is_refused() {
    if !common::kvm("hostile_balloon_indirect_table_is_refused") {
        return;
    }
    // Each chain is one indirect descriptor (a feature never offered) naming a table of 65,535
    // arrays of 4096 PFNs: 268M PFNs per chain if it were followed. It is refused: the chain is
    // answered at once, and the timeout ends the run with its final row.
    let head = format!(
        "        movq ${DESC:#x}, %rdi\n        movq ${INDIRECT:#x}, (%rdi)\n\
         \x20       movl ${len}, 8(%rdi)\n        movw $4, 12(%rdi)\n        movw $0, 14(%rdi)\n{}",
        chained_arrays(INDIRECT, 65535, 0xffff),
        len = 65535 * 16,
    );
    // Writing the table takes the guest about a second (ring 0 is slow under nested KVM).
    let (e, _dir) = run_guest(
        "balloonindirect",
        &balloon_flood(&head),
        &["--timeout", "6s"],
    );
    assert_timeout_with_final_row(&e);
    assert!(e.stderr.contains("indirect"), "{}", e.stderr);
}
