//! Host memory usage from the PMP-MMP map and the VMM's resident set, and the dirty rate.

use std::time::Duration;

use crate::memory::ksm;
use crate::observe::pmp_mmp::{MapSummary, Sharing};
use crate::row::{HostUsage, KsmKernel};
use crate::units::{MIB, PAGE_SIZE, mib, pages_mib};

/// Host memory usage: the map's page counts with the VMM's RSS (overhead is RSS minus resident
/// guest RAM: the map, bitmaps, vCPU state, code). Sharing saves machine pages: usage is backed
/// − saved + overhead (ESX: GRANT − SHRDSVD + OVHD); `backed` still counts every shared page.
pub fn host_usage(
    map: &MapSummary,
    sharing: &Sharing,
    rss_bytes: u64,
    ksm: Option<KsmKernel>,
) -> HostUsage {
    let configured = map.pages * PAGE_SIZE;
    // The process's RSS counts a shared page once per guest page mapping it, as `backed` does.
    let resident_guest = (map.backed + map.shared) * PAGE_SIZE;
    let overhead = rss_bytes.saturating_sub(resident_guest);
    let saved = sharing.saved.min((map.backed + map.shared) as f64);
    HostUsage {
        host_mib: mib(resident_guest + overhead) - saved * PAGE_SIZE as f64 / MIB as f64,
        backed_mib: pages_mib(map.backed + map.shared),
        shared_saved_mib: saved * PAGE_SIZE as f64 / MIB as f64,
        shared_frames: sharing.frames,
        ksm,
        overhead_mib: mib(overhead),
        untouched_mib: pages_mib(map.untouched),
        zero_mib: pages_mib(map.zero),
        swapped_mib: pages_mib(map.swapped),
        shared_mib: pages_mib(map.shared),
        released_mib: pages_mib(map.released),
        discarded_mib: pages_mib(map.discarded),
        vmm_swapped_mib: pages_mib(map.vmm_swapped),
        vmm_written_mib: pages_mib(map.vmm_written),
        configured_mib: mib(configured),
        backed_pages: map.backed + map.shared,
        zero_pages: map.zero,
        released_pages: map.released,
        pfn_visible: map.pfn_visible,
    }
}

/// The kernel's KSM figures for this process and the host, or `None` where KSM is missing or
/// its files cannot be read (logged).
pub fn ksm_kernel() -> Option<KsmKernel> {
    let read = || -> Result<KsmKernel, ksm::KsmError> {
        let p = ksm::process(None)?;
        let h = ksm::host()?;
        Ok(KsmKernel {
            merging_pages: p.merging_pages,
            zero_pages: p.zero_pages,
            process_profit_mib: p.profit_bytes as f64 / MIB as f64,
            host_pages_sharing: h.pages_sharing,
            host_pages_shared: h.pages_shared,
            full_scans: h.full_scans,
        })
    };
    read().inspect_err(|e| log::debug!("ksm figures: {e}")).ok()
}

/// The VMM process's resident set in bytes (from `/proc/self/statm`).
pub fn rss_bytes() -> std::io::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/statm")?;
    let resident: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("unexpected /proc/self/statm format"))?;
    Ok(resident * PAGE_SIZE)
}

/// The VMM process's pages in the host kernel's swap, in bytes (`VmSwap` of
/// `/proc/self/status`: its swap entries now; the VMM's own swap file is not in it).
pub fn kernel_swap_bytes() -> std::io::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmSwap:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| std::io::Error::other("no VmSwap in /proc/self/status"))
}

/// Dirty rate, MiB/s: the write estimate of an interval divided by the interval's length (0 for
/// an interval of no length).
pub fn dirty_rate_mib_s(estimate_mib: f64, interval: Duration) -> f64 {
    let s = interval.as_secs_f64();
    if s > 0.0 { estimate_mib / s } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_swap_is_read_from_the_process_status() {
        // Whatever the host has in swap, this process's line is there and parses.
        let bytes = kernel_swap_bytes().expect("VmSwap in /proc/self/status");
        assert_eq!(bytes % 1024, 0, "whole KiB");
    }
}
