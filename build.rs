//! Builds the test guest in `guest/` (a freestanding C kernel with its ring-3 app) with gcc, ld
//! and objcopy, and hands its path to the crate as `MEMVISOR_GUEST_ELF`. `guest/Makefile` does the
//! same for standalone builds; keep the flags in step.
//!
//! It also compiles and runs `guest/abi_dump.c` with the host compiler: it prints every constant
//! and structure layout of `guest/abi.h` as Rust (`$OUT_DIR/abi_c.rs`), which `src/abi.rs`
//! includes, so the guest ABI is defined once, in the header.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const COMMON_FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-nostdlib",
    "-fno-builtin",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-mcmodel=small",
];
/// Ring 0: no SSE (the kernel never saves the app's vector registers), no red zone.
const KERNEL_FLAGS: &[&str] = &["-mno-red-zone", "-mgeneral-regs-only"];
const LD_FLAGS: &[&str] = &[
    "-nostdlib",
    "-static",
    "--no-dynamic-linker",
    "-z",
    "max-page-size=4096",
    "-z",
    "noexecstack",
    "--build-id=none",
];

fn tool(var: &str, default: &str) -> String {
    println!("cargo:rerun-if-env-changed={var}");
    env::var(var).unwrap_or_else(|_| default.to_string())
}

fn check_tool(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        panic!(
            "building the memvisor test guest needs `{name}` (gcc, GNU ld and objcopy from \
             binutils); install them (Debian: apt-get install gcc binutils) or point \
             GUEST_CC / GUEST_LD / GUEST_OBJCOPY at them"
        );
    }
}

/// Links `objs` with linker script `script` into `out`.
fn link(ld: &str, script: &Path, out: &Path, objs: &[&Path]) {
    run(Command::new(ld)
        .args(LD_FLAGS)
        .arg("-T")
        .arg(script)
        .arg("-o")
        .arg(out)
        .args(objs));
}

/// Runs `cmd`, failing the build with its output if it fails; returns its stdout.
fn run(cmd: &mut Command) -> Vec<u8> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    if !out.status.success() {
        panic!(
            "guest build step failed ({}): {shown}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Compiler warnings are worth seeing in cargo's output.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning=guest: {line}");
    }
    out.stdout
}

fn compile(cc: &str, guest: &Path, src: &str, out: &Path, extra: &[&str]) {
    run(Command::new(cc)
        .args(COMMON_FLAGS)
        .args(extra)
        .arg("-I")
        .arg(guest)
        .arg("-c")
        .arg(guest.join(src))
        .arg("-o")
        .arg(out));
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = manifest.join("guest");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-changed=build.rs");

    let cc = tool("GUEST_CC", "gcc");
    let ld = tool("GUEST_LD", "ld");
    let objcopy = tool("GUEST_OBJCOPY", "objcopy");
    for t in [&cc, &ld, &objcopy] {
        check_tool(t);
    }

    // The ring-3 app: linked on its own at 0x4000_0000, flattened to a blob.
    let app_start = out.join("app-start.o");
    let app_o = out.join("app.o");
    let app_elf = out.join("app.elf");
    let app_bin = out.join("app.bin");
    compile(&cc, &guest, "app/start.S", &app_start, &[]);
    compile(&cc, &guest, "app/app.c", &app_o, &[]);
    link(
        &ld,
        &guest.join("app/app.ld"),
        &app_elf,
        &[&app_start, &app_o],
    );
    run(Command::new(&objcopy)
        .args(["-O", "binary"])
        .arg(&app_elf)
        .arg(&app_bin));

    // The kernel: embeds app.bin with .incbin (found through the assembler's include path).
    let out_str = out
        .to_str()
        .expect("OUT_DIR is not valid UTF-8, which the guest build needs");
    assert!(
        !out_str.contains(','),
        "OUT_DIR {out_str} contains a comma, which gcc's -Wa, option cannot pass"
    );
    let include_app = format!("-Wa,-I{out_str}");
    let k_entry = out.join("kernel-entry.o");
    let k_main = out.join("kernel.o");
    let mut kflags: Vec<&str> = KERNEL_FLAGS.to_vec();
    kflags.push(&include_app);
    compile(&cc, &guest, "kernel/entry.S", &k_entry, &kflags);
    compile(&cc, &guest, "kernel/kernel.c", &k_main, KERNEL_FLAGS);
    let elf = out.join("memvisor-guest.elf");
    link(
        &ld,
        &guest.join("kernel/kernel.ld"),
        &elf,
        &[&k_entry, &k_main],
    );

    println!("cargo:rustc-env=MEMVISOR_GUEST_ELF={}", elf.display());

    // The ABI as Rust, from the header (host compiler: the dump runs here).
    let dump = out.join("abi_dump");
    run(Command::new(&cc)
        .args(["-O0", "-Wall", "-Wextra", "-I"])
        .arg(&guest)
        .arg(guest.join("abi_dump.c"))
        .arg("-o")
        .arg(&dump));
    let printed = run(&mut Command::new(&dump));
    std::fs::write(out.join("abi_c.rs"), printed)
        .unwrap_or_else(|e| panic!("writing abi_c.rs: {e}"));
}
