//! Issue: the PMP-MMP map and host memory usage. First touch assigns machine pages; the guest's
//! frees never reach the hypervisor, so host usage is a high-water mark.

mod common;

use memvisor::observe::pmp_mmp::MapFile;

const MIB_PAGES: u64 = 256;

#[test]
fn written_pages_are_backed_and_match_mincore() {
    if !common::kvm("written_pages_are_backed_and_match_mincore") {
        return;
    }
    let (s, rows) = common::run_ok("alloc 32M; touch 32M write", 128 << 20);
    let boot = s.boot.unwrap();
    let written = s.phases[1].written_pages;
    assert_eq!(written, 32 * MIB_PAGES, "the guest wrote every page once");
    // The pool holds exactly what the guest's workload wrote: N pages.
    assert_eq!(s.pool_backed, written);
    // Everything else that is backed is the guest kernel's own (image, tables, app bookkeeping).
    let backed = s.map.backed + s.map.shared;
    let kernel = backed - s.pool_backed;
    assert!(
        kernel > 0 && kernel <= boot.reserved_pages,
        "kernel pages {kernel}, reserved {}",
        boot.reserved_pages
    );
    // The map agrees with the kernel's own residency count (which also counts zero-page mappings).
    assert_eq!(backed + s.map.zero + s.vmm_zero_mapped, s.mincore_resident);
    // And the host column says the same.
    let host = rows.last().unwrap().host.as_ref().unwrap();
    assert_eq!(host.backed_pages, backed);
    assert!(host.overhead_mib > 0.0);
    assert!(host.pfn_visible, "tests run as root and see PFNs");
    assert!(
        s.map.vmm_written > 0,
        "the VMM's own writes are tracked apart"
    );
}

#[test]
fn guest_frees_leave_host_usage_unchanged() {
    if !common::kvm("guest_frees_leave_host_usage_unchanged") {
        return;
    }
    let mut cfg = common::config(
        "alloc 48M; touch 48M write; free 40M; idle 600ms",
        128 << 20,
    );
    cfg.interval = std::time::Duration::from_millis(100);
    let (s, rows) = common::run_cfg(cfg).unwrap();
    // The guest's own view: 8 MiB left on its allocated list.
    assert_eq!(s.guest.allocated_pages, 8 * MIB_PAGES);
    // The host still backs all 48 MiB it ever wrote: a high-water mark.
    assert_eq!(s.pool_backed, 48 * MIB_PAGES);
    let backed: Vec<u64> = rows
        .iter()
        .filter(|r| r.phase.starts_with("idle") || r.end.is_some())
        .map(|r| r.host.as_ref().unwrap().backed_pages)
        .collect();
    assert!(backed.len() >= 3, "rows during idle: {backed:?}");
    assert!(
        backed.windows(2).all(|w| w[1] == w[0]),
        "host usage does not move while the guest idles after freeing: {backed:?}"
    );
    assert!(backed[0] >= 48 * MIB_PAGES);
}

#[test]
fn read_only_touch_gives_zero_pages_without_backing() {
    if !common::kvm("read_only_touch_gives_zero_pages_without_backing") {
        return;
    }
    let (s, _) = common::run_ok("alloc 16M; touch 16M read", 64 << 20);
    assert_eq!(s.phases[1].touched_pages, 16 * MIB_PAGES);
    assert_eq!(s.phases[1].written_pages, 0);
    assert_eq!(
        s.pool_backed, 0,
        "reads of fresh pages cost no machine page"
    );
    assert!(s.map.zero >= 16 * MIB_PAGES, "zero pages: {}", s.map.zero);
    assert!(s.map.pfn_visible, "tests run as root and see PFNs");
    assert_eq!(
        s.map.backed + s.map.shared + s.map.zero + s.vmm_zero_mapped,
        s.mincore_resident
    );
}

#[test]
fn map_file_round_trips_and_bad_files_are_rejected() {
    if !common::kvm("map_file_round_trips_and_bad_files_are_rejected") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("memvisor-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("guest.map");
    let mut cfg = common::config("alloc 8M; touch 8M write; touch 8M read", 32 << 20);
    cfg.map_out = Some(path.clone());
    cfg.map_every = Some(1);
    let (s, _) = common::run_cfg(cfg).unwrap();
    let fs = MapFile::open(&path).unwrap().summary().unwrap();
    assert_eq!(fs.pages, s.map.pages);
    assert_eq!(fs.backed, s.map.backed);
    assert_eq!(fs.zero, s.map.zero);
    assert_eq!(fs.untouched, s.map.untouched);
    assert_eq!(fs.vmm_written, s.map.vmm_written);

    // The CLI summary of the same file.
    let out = common::memvisor_output(&["map", path.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backed"].as_u64(), Some(s.map.backed));

    // Truncated and garbage files get clear errors.
    let bytes = std::fs::read(&path).unwrap();
    let cut = common::temp_file("cut.map", &bytes[..bytes.len() - 5]);
    let out = common::memvisor_output(&["map", cut.to_str().unwrap()]);
    common::assert_clean_failure(&out, "truncated");
    let junk = common::temp_file("junk.map", b"definitely not a map file at all, no sir");
    let out = common::memvisor_output(&["map", junk.to_str().unwrap()]);
    common::assert_clean_failure(&out, "magic");
}

#[test]
fn sparse_64g_guest_is_harvested() {
    if !common::kvm("sparse_64g_guest_is_harvested") {
        return;
    }
    let (s, rows) = common::run_ok("alloc 64M; touch 64M write", 64 << 30);
    assert_eq!(s.map.pages, 16 << 20);
    assert_eq!(s.pool_backed, 64 * MIB_PAGES);
    assert!(s.map.untouched > (16 << 20) - 64 * MIB_PAGES - 8192);
    let host = rows.last().unwrap().host.as_ref().unwrap();
    assert!(
        host.host_mib < 1024.0,
        "a 64 GiB guest that touched 64 MiB costs little: {host:?}"
    );
}
