//! Set-up cost of guest RAM's memslots by guest size and memslot layout (issue 22, "set-up").
//!
//! For each guest size, a VM is created and its RAM (private anonymous `MAP_NORESERVE`, nothing
//! touched) registered with dirty logging as memslots of 1 GiB (today's layout), of 4 or 64 GiB, or as
//! one slot, and dropped again; the time of `Vm::with_slot_pages` and the kernel memory the slots
//! hold (`/proc/meminfo`: `VmallocUsed` + `Slab`, measured while the VM is alive) are the median
//! of the repetitions. Memslots created on demand would pay the cost of one 1 GiB slot at the
//! first touch of each GiB instead: "one 1 GiB slot added" times adding a 1 GiB slot to a VM
//! that has the others already.
//!
//! Run: `cargo bench --bench memslots`.

use std::time::Instant;

mod common;
use common::median;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use memvisor::kvm::vm::{SLOT_PAGES, Vm};
use memvisor::memory::GuestRam;
use memvisor::units::PAGE_SIZE;

const GIB: u64 = 1 << 30;
const REPS: usize = 3;

/// `VmallocUsed + Slab` of `/proc/meminfo`, KiB.
fn kernel_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("VmallocUsed:") || l.starts_with("Slab:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Milliseconds to create the VM with `slot_pages`-page memslots, and the kernel memory (MiB) the
/// VM holds, the median of [`REPS`] runs.
fn layout(gib: u64, slot_pages: u64) -> Result<(f64, f64, u64), String> {
    let (mut times, mut kernel) = (Vec::new(), Vec::new());
    let mut slots = 0;
    for _ in 0..REPS {
        let ram = GuestRam::new(gib * GIB, false).map_err(|e| e.to_string())?;
        let before = kernel_kib();
        let t = Instant::now();
        let vm = Vm::with_slot_pages(ram, Some(slot_pages)).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        kernel.push(kernel_kib().saturating_sub(before) as f64 / 1024.0);
        slots = (gib * GIB / PAGE_SIZE).div_ceil(vm.slot_pages());
        drop(vm);
    }
    Ok((median(&mut times), median(&mut kernel), slots))
}

/// Milliseconds to add one 1 GiB memslot to a VM whose RAM has `gib` GiB and all its other
/// 1 GiB slots registered already (what a slot created on demand costs at first touch).
fn one_slot_added(gib: u64) -> Result<f64, String> {
    let ram = GuestRam::new(gib * GIB, false).map_err(|e| e.to_string())?;
    let vm = Vm::with_slot_pages(ram, Some(SLOT_PAGES)).map_err(|e| e.to_string())?;
    let last = (gib - 1) as u32;
    let mut region = kvm_userspace_memory_region {
        slot: last,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: u64::from(last) * GIB,
        memory_size: 0,
        userspace_addr: vm.ram().host_addr() as u64 + u64::from(last) * GIB,
    };
    let mut times = Vec::new();
    for _ in 0..REPS {
        // SAFETY: size 0 deletes the slot: no memory is registered by this call.
        unsafe { vm.fd().set_user_memory_region(region) }.map_err(|e| e.to_string())?;
        region.memory_size = GIB;
        let t = Instant::now();
        // SAFETY: the region is the last GiB of guest RAM's own mapping, which `vm` owns and
        // drops only after its file descriptor (and with it this memslot).
        unsafe { vm.fd().set_user_memory_region(region) }.map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        region.memory_size = 0;
    }
    Ok(median(&mut times))
}

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("memslots bench skipped: /dev/kvm is absent");
        return;
    }
    println!("## Set-up of guest RAM's memslots (median of {REPS}; nothing touched)");
    println!();
    println!(
        "| guest | layout | slots | create VM + slots (ms) | per GiB (ms) | kernel memory (MiB) | one 1 GiB slot added (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for gib in [1u64, 16, 64, 256, 448] {
        let added = one_slot_added(gib).map_or_else(|e| e, |ms| format!("{ms:.2}"));
        let mut layouts = vec![("1 GiB slots", SLOT_PAGES)];
        if gib > 4 {
            layouts.push(("4 GiB slots", 4 * SLOT_PAGES));
        }
        if gib > 64 {
            layouts.push(("64 GiB slots", 64 * SLOT_PAGES));
        }
        if gib > 1 {
            layouts.push(("one slot", gib * SLOT_PAGES));
        }
        for (name, slot_pages) in layouts {
            match layout(gib, slot_pages) {
                Ok((ms, mib, slots)) => println!(
                    "| {gib} GiB | {name} | {slots} | {ms:.1} | {:.2} | {mib:.1} | {added} |",
                    ms / gib as f64
                ),
                Err(e) => println!("| {gib} GiB | {name} | - | {e} | | | |"),
            }
        }
    }
    println!();
}
