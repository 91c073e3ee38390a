//! The virtio-balloon device (virtio 1.x over virtio-mmio, version 2 registers) as a plain state
//! machine: a register file, its queues (rust-vmm's `virtio-queue` walks every descriptor chain,
//! with its loop and bounds checks), and what the guest asks of it:
//!
//! - **inflate / deflate**: arrays of 4 KiB PFNs; inflated pages are given back to the host with
//!   `MADV_DONTNEED` (the guest reads them as zero afterwards);
//! - **statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the device holds the driver's buffer and hands
//!   it back at each interval tick ([`Balloon::request_stats`]); the driver refills and re-queues
//!   it, and the device keeps the values ([`Balloon::stats`]);
//! - **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`, offered only when asked for): each
//!   descriptor is a free range of guest RAM, released with `MADV_DONTNEED`, then acknowledged;
//! - `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: offered unless the target is a hard limit.
//!
//! There is no interrupt: a notification (a write to `QueueNotify`) is handled here, on the vCPU
//! thread, before the guest runs again, so the used ring is up to date when the write returns and
//! a polling driver needs no wait loop. `InterruptStatus` is kept for drivers that look.
//!
//! The driver is not trusted. A malformed queue set-up (a bad size, rings outside RAM, an avail
//! index running ahead of the ring) puts the device in its error state (`DEVICE_NEEDS_RESET`): it
//! processes nothing until the driver resets it. A malformed buffer (PFNs outside RAM, a range
//! not page aligned or past the end of RAM, an over-long array) is skipped and counted. Nothing
//! outside a range the driver handed in is ever released.

use std::num::Wrapping;
use std::ops::Range;
use std::sync::atomic::Ordering;

use serde::Serialize;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use crate::contract::abi::balloon::{self as b, reg, status};
use crate::memory::GuestRam;
use crate::row::GuestStats;
use crate::units::PAGE_SIZE;

/// What each queue is for; queues are numbered in this order among those the features bring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// Counters of what the device did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BalloonCounters {
    /// Descriptors of free page reporting acted on, and the pages they released.
    pub reported_extents: u64,
    pub reported_pages: u64,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The device.
pub struct Balloon {
    ram_pages: u64,
    offered: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// Queue roles by index, fixed when the driver sets DRIVER_OK.
    roles: Vec<Role>,
    target_pages: u32,
    actual_pages: u32,
    interrupt_status: u32,
    /// The statistics buffer the device holds, to hand back at the next request.
    stats_head: Option<u16>,
    stats: Option<GuestStats>,
    /// Guest page ranges released since the last [`Balloon::take_released`].
    released: Vec<Range<u64>>,
    pub counters: BalloonCounters,
    /// Malformed requests and set-ups (skipped, or the error state).
    pub errors: u64,
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

impl Balloon {
    /// A device for `ram_pages` pages of guest RAM. `reporting` offers free page reporting;
    /// `target_pages` is the initial balloon size the device asks for; `hard_limit` withholds
    /// `DEFLATE_ON_OOM` (the guest must not take pages back to avoid running out).
    pub fn new(ram_pages: u64, reporting: bool, target_pages: u32, hard_limit: bool) -> Self {
        let mut offered = bit(b::F_VERSION_1) | bit(b::F_STATS_VQ);
        if reporting {
            offered |= bit(b::F_REPORTING);
        }
        if !hard_limit {
            offered |= bit(b::F_DEFLATE_ON_OOM);
        }
        let mut dev = Balloon {
            ram_pages,
            offered,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            queues: Vec::new(),
            roles: Vec::new(),
            target_pages,
            actual_pages: 0,
            interrupt_status: 0,
            stats_head: None,
            stats: None,
            released: Vec::new(),
            counters: BalloonCounters::default(),
            errors: 0,
        };
        dev.reset();
        dev
    }

    fn reset(&mut self) {
        let n = 3 + usize::from(self.offered & bit(b::F_REPORTING) != 0);
        self.queues = (0..n)
            .map(|_| Queue::new(b::QUEUE_MAX).expect("QUEUE_MAX is a valid queue size"))
            .collect();
        self.roles.clear();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.stats_head = None;
    }

    /// Whether the device is in its error state (`DEVICE_NEEDS_RESET`).
    pub fn broken(&self) -> bool {
        self.status & status::NEEDS_RESET != 0
    }

    /// Whether the driver negotiated feature bit `f`.
    pub fn negotiated(&self, f: u32) -> bool {
        self.driver_features & bit(f) != 0
    }

    /// Pages in the balloon (inflated minus deflated, as the device counted them; a driver that
    /// inflates a page twice cannot make it more than RAM).
    pub fn balloon_pages(&self) -> u64 {
        self.counters
            .inflated_pages
            .saturating_sub(self.counters.deflated_pages)
            .min(self.ram_pages)
    }

    /// The target the device asks for, in pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// The guest's statistics, once it sent some.
    pub fn stats(&self) -> Option<&GuestStats> {
        self.stats.as_ref()
    }

    /// Guest page ranges released since the last call (for the map and the dirty log).
    pub fn take_released(&mut self) -> Vec<Range<u64>> {
        std::mem::take(&mut self.released)
    }

    fn note_error(&mut self, what: String) {
        self.errors += 1;
        if self.errors <= 5 {
            log::warn!("virtio-balloon: {what}");
        }
    }

    /// Enters the error state: nothing is processed until the driver resets the device.
    fn fail(&mut self, what: String) {
        self.note_error(format!("{what}; device needs reset"));
        self.status |= status::NEEDS_RESET;
        self.interrupt_status |= 2;
    }

    /// A read of `data.len()` bytes at register offset `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let cfg = self.config_bytes();
            let at = (offset - reg::CONFIG) as usize;
            for (i, d) in data.iter_mut().enumerate() {
                *d = at
                    .checked_add(i)
                    .and_then(|j| cfg.get(j))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC_VALUE => b::MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => b::DEVICE_ID,
            reg::VENDOR_ID => 0x4d56_5352, // "MVSR"
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // The configuration (the target) never changes while the guest runs.
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[b::CFG_NUM_PAGES as usize..][..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[b::CFG_ACTUAL as usize..][..4].copy_from_slice(&self.actual_pages.to_le_bytes());
        c
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// A write of `data` at register offset `offset`; a notification processes its queue.
    pub fn write(&mut self, offset: u64, data: &[u8], ram: &GuestRam) {
        if offset >= reg::CONFIG {
            // Only `actual` is writable; byte-wise writes are allowed.
            let at = offset - reg::CONFIG;
            if at >= b::CFG_ACTUAL && at + data.len() as u64 <= b::CFG_ACTUAL + 4 {
                let mut a = self.actual_pages.to_le_bytes();
                let s = (at - b::CFG_ACTUAL) as usize;
                a[s..s + data.len()].copy_from_slice(data);
                self.actual_pages = u32::from_le_bytes(a);
            }
            return;
        }
        let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            self.note_error(format!("{}-byte write to register {offset:#x}", data.len()));
            return;
        };
        let setting_up = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if setting_up =>
            {
                self.queue_setting(offset, v)
            }
            reg::QUEUE_NOTIFY => self.notify(v, ram),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v, ram),
            _ => self.note_error(format!("write of {v:#x} to register {offset:#x}")),
        }
    }

    fn queue_setting(&mut self, offset: u64, v: u32) {
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            self.fail(format!("set-up of queue {sel}, which does not exist"));
            return;
        };
        match offset {
            reg::QUEUE_NUM => {
                if let Err(e) = q.try_set_size(u16::try_from(v).unwrap_or(0)) {
                    self.fail(format!("queue {sel}: size {v}: {e}"));
                }
            }
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32, ram: &GuestRam) {
        if v == 0 {
            self.reset();
            return;
        }
        let new = v & !self.status;
        let mut v = v | (self.status & status::NEEDS_RESET);
        if new & status::FEATURES_OK != 0 {
            let ok = self.driver_features & !self.offered == 0 && self.negotiated(b::F_VERSION_1);
            if !ok {
                self.note_error(format!(
                    "driver features {:#x} are not a subset of {:#x} with VERSION_1",
                    self.driver_features, self.offered
                ));
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                self.fail("DRIVER_OK without FEATURES_OK".into());
                return;
            }
            self.roles = vec![Role::Inflate, Role::Deflate];
            if self.negotiated(b::F_STATS_VQ) {
                self.roles.push(Role::Stats);
            }
            if self.negotiated(b::F_REPORTING) {
                self.roles.push(Role::Reporting);
            }
            for i in 0..self.roles.len() {
                let q = &self.queues[i];
                if q.ready() && !q.is_valid(ram.mem()) {
                    self.fail(format!("queue {i}: rings outside guest RAM or misaligned"));
                    return;
                }
            }
        }
    }

    fn notify(&mut self, qi: u32, ram: &GuestRam) {
        if self.status & status::DRIVER_OK == 0 || self.broken() {
            self.note_error(format!("notification of queue {qi} while not running"));
            return;
        }
        let Some(&role) = self.roles.get(qi as usize) else {
            self.fail(format!("notification of queue {qi}, which does not exist"));
            return;
        };
        let mem = ram.mem();
        let q = &mut self.queues[qi as usize];
        if !q.ready() {
            self.note_error(format!("notification of queue {qi}, which is not ready"));
            return;
        }
        let pending = match q.avail_idx(mem, Ordering::Acquire) {
            Ok(avail) => (avail - Wrapping(q.next_avail())).0,
            Err(e) => {
                self.fail(format!("queue {qi}: avail ring: {e}"));
                return;
            }
        };
        let size = q.size();
        if pending > size {
            self.fail(format!(
                "queue {qi}: {pending} buffers pending in a ring of {size}"
            ));
            return;
        }
        for _ in 0..pending {
            if self.broken() {
                return;
            }
            let Some(chain) = self.queues[qi as usize].pop_descriptor_chain(mem) else {
                self.fail(format!("queue {qi}: unreadable avail ring entry"));
                return;
            };
            let head = chain.head_index();
            // Bounded: the chain walk stops after `size` descriptors (loops) and on any address
            // outside guest RAM.
            let descs: Vec<Descriptor> = chain.collect();
            if descs.is_empty() {
                self.note_error(format!(
                    "queue {qi}: chain {head} has no readable descriptor"
                ));
            }
            match role {
                Role::Inflate | Role::Deflate => self.pfns(role, &descs, ram),
                Role::Reporting => self.report(&descs, ram),
                Role::Stats => {
                    self.read_stats(&descs, ram);
                    // Held until the next request; an older one goes back at once.
                    match self.stats_head.replace(head) {
                        Some(old) => self.used(qi, old, ram),
                        None => continue,
                    }
                    continue;
                }
            }
            self.used(qi, head, ram);
        }
    }

    fn used(&mut self, qi: u32, head: u16, ram: &GuestRam) {
        if let Err(e) = self.queues[qi as usize].add_used(ram.mem(), head, 0) {
            self.fail(format!("queue {qi}: used ring: {e}"));
        } else {
            self.interrupt_status |= 1;
        }
    }

    /// Hands guest pages `r` (already checked to lie in RAM) out for release: the VM discards
    /// them ([`crate::kvm::vm::Vm::release`]); the device never does.
    fn release(&mut self, r: Range<u64>, _ram: &GuestRam) -> bool {
        self.released.push(r);
        true
    }

    fn pfns(&mut self, role: Role, descs: &[Descriptor], ram: &GuestRam) {
        for d in descs {
            let len = u64::from(d.len());
            if d.is_write_only() || len % 4 != 0 || len / 4 > b::MAX_PFNS {
                self.note_error(format!(
                    "{role:?}: skipped a descriptor of {len} bytes at {:#x}",
                    d.addr().0
                ));
                continue;
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = ram.mem().read_slice(&mut buf, d.addr()) {
                self.note_error(format!("{role:?}: PFN array at {:#x}: {e}", d.addr().0));
                continue;
            }
            let mut run: Option<Range<u64>> = None;
            for w in buf.chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                if pfn >= self.ram_pages {
                    self.note_error(format!("{role:?}: PFN {pfn:#x} outside guest RAM"));
                    continue;
                }
                if role == Role::Deflate {
                    self.counters.deflated_pages += 1;
                    continue;
                }
                run = match run {
                    Some(r) if r.end == pfn => Some(r.start..pfn + 1),
                    Some(r) => {
                        self.inflate(r, ram);
                        Some(pfn..pfn + 1)
                    }
                    None => Some(pfn..pfn + 1),
                };
            }
            if let Some(r) = run {
                self.inflate(r, ram);
            }
        }
    }

    fn inflate(&mut self, r: Range<u64>, ram: &GuestRam) {
        let n = r.end - r.start;
        if self.release(r, ram) {
            self.counters.inflated_pages += n;
        }
    }

    fn report(&mut self, descs: &[Descriptor], ram: &GuestRam) {
        for d in descs {
            let (addr, len) = (d.addr().0, u64::from(d.len()));
            let end = addr.checked_add(len);
            let ok = addr.is_multiple_of(PAGE_SIZE)
                && len.is_multiple_of(PAGE_SIZE)
                && len > 0
                && end.is_some_and(|e| e <= self.ram_pages * PAGE_SIZE);
            if !ok {
                self.note_error(format!(
                    "reporting: skipped range {addr:#x}+{len:#x} (unaligned or outside RAM)"
                ));
                continue;
            }
            let r = addr / PAGE_SIZE..(addr + len) / PAGE_SIZE;
            let n = r.end - r.start;
            if self.release(r, ram) {
                self.counters.reported_extents += 1;
                self.counters.reported_pages += n;
            }
        }
    }

    fn read_stats(&mut self, descs: &[Descriptor], ram: &GuestRam) {
        let Some(d) = descs.first() else { return };
        let n = (u64::from(d.len()) / b::STAT_SIZE).min(16);
        let mut stats = GuestStats {
            source: "virtio-balloon stats queue".into(),
            ..Default::default()
        };
        let mut buf = vec![0u8; (n * b::STAT_SIZE) as usize];
        if ram.mem().read_slice(&mut buf, d.addr()).is_err() {
            self.note_error(format!("stats buffer at {:#x} outside RAM", d.addr().0));
            return;
        }
        for e in buf.chunks_exact(b::STAT_SIZE as usize) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            let mib = crate::units::mib(u64::from_le_bytes(v));
            match tag {
                b::S_MEMFREE => stats.free_mib = Some(mib),
                b::S_MEMTOT => stats.total_mib = Some(mib),
                b::S_AVAIL => stats.available_mib = Some(mib),
                _ => {}
            }
        }
        self.counters.stats_updates += 1;
        self.stats = Some(stats);
    }

    /// Asks the guest for fresh statistics: hands back the buffer the device holds.
    pub fn request_stats(&mut self, ram: &GuestRam) {
        if self.broken() {
            return;
        }
        if let (Some(head), Some(qi)) = (
            self.stats_head.take(),
            self.roles.iter().position(|r| *r == Role::Stats),
        ) {
            self.used(qi as u32, head, ram);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM_BYTES: u64 = 8 << 20;
    const RAM_PAGES: u64 = RAM_BYTES / PAGE_SIZE;
    /// Where the test driver keeps queue `q`: descriptors, avail ring, used ring.
    fn desc_at(q: u64) -> u64 {
        0x10000 + q * 0x1000
    }
    fn avail_at(q: u64) -> u64 {
        desc_at(q) + 0x800
    }
    fn used_at(q: u64) -> u64 {
        desc_at(q) + 0xc00
    }
    const SIZE: u32 = 8;
    /// Pages the test driver itself uses (queues, buffers): below this.
    const DRIVER_PAGES: u64 = 0x40;

    struct Drv {
        ram: GuestRam,
        dev: Balloon,
    }

    impl Drv {
        fn w(&mut self, off: u64, v: u32) {
            self.dev.write(off, &v.to_le_bytes(), &self.ram);
        }
        fn r(&mut self, off: u64) -> u32 {
            let mut d = [0u8; 4];
            self.dev.read(off, &mut d);
            u32::from_le_bytes(d)
        }
        /// Writes the driver's features (low and high halves) and sets FEATURES_OK.
        fn negotiate(&mut self, lo: u32, hi: u32) {
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, lo);
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, hi);
            self.w(
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
        }
        /// A driver that negotiates everything offered and sets up every queue.
        fn new(reporting: bool, target: u32, hard: bool) -> Drv {
            let ram = GuestRam::new(RAM_BYTES, false).unwrap();
            let dev = Balloon::new(RAM_PAGES, reporting, target, hard);
            let mut d = Drv { ram, dev };
            // Every page but the driver's own holds a pattern: its page number + 1.
            for p in DRIVER_PAGES..RAM_PAGES {
                d.ram.write_obj(p * PAGE_SIZE, p + 1).unwrap();
            }
            assert_eq!(d.r(reg::MAGIC_VALUE), b::MAGIC);
            assert_eq!(d.r(reg::VERSION), 2);
            assert_eq!(d.r(reg::DEVICE_ID), b::DEVICE_ID);
            d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            d.w(reg::DEVICE_FEATURES_SEL, 0);
            let lo = d.r(reg::DEVICE_FEATURES);
            d.w(reg::DEVICE_FEATURES_SEL, 1);
            let hi = d.r(reg::DEVICE_FEATURES);
            d.negotiate(lo, hi);
            assert_ne!(d.r(reg::STATUS) & status::FEATURES_OK, 0);
            let nq = 3 + u64::from(reporting);
            for q in 0..nq {
                d.w(reg::QUEUE_SEL, q as u32);
                assert_eq!(d.r(reg::QUEUE_NUM_MAX), u32::from(b::QUEUE_MAX));
                d.w(reg::QUEUE_NUM, SIZE);
                d.w(reg::QUEUE_DESC_LOW, desc_at(q) as u32);
                d.w(reg::QUEUE_AVAIL_LOW, avail_at(q) as u32);
                d.w(reg::QUEUE_USED_LOW, used_at(q) as u32);
                d.w(reg::QUEUE_READY, 1);
            }
            d.w(
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            );
            assert!(!d.dev.broken());
            d
        }
        fn desc(&self, q: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
            let at = desc_at(q) + 16 * i;
            self.ram.write_obj(at, addr).unwrap();
            self.ram.write_obj(at + 8, len).unwrap();
            self.ram.write_obj(at + 12, flags).unwrap();
            self.ram.write_obj(at + 14, next).unwrap();
        }
        /// Makes chain `head` available on queue `q` and notifies.
        fn kick(&mut self, q: u64, head: u16) {
            let idx: u16 = self.ram.read_obj(avail_at(q) + 2).unwrap();
            let slot = u64::from(idx % SIZE as u16);
            self.ram
                .write_obj(avail_at(q) + 4 + 2 * slot, head)
                .unwrap();
            self.ram
                .write_obj(avail_at(q) + 2, idx.wrapping_add(1))
                .unwrap();
            self.w(reg::QUEUE_NOTIFY, q as u32);
        }
        fn used_idx(&self, q: u64) -> u16 {
            self.ram.read_obj(used_at(q) + 2).unwrap()
        }
        /// One buffer of one descriptor on queue `q`.
        fn send(&mut self, q: u64, addr: u64, len: u32) {
            self.desc(q, 0, addr, len, 0, 0);
            self.kick(q, 0);
        }
        /// Pages handed out for release and not taken yet (the VM discards them, not the
        /// device: every page still holds its pattern).
        fn zeroed(&self) -> Vec<u64> {
            assert!(
                (DRIVER_PAGES..RAM_PAGES)
                    .all(|p| self.ram.read_obj::<u64>(p * PAGE_SIZE).unwrap() == p + 1),
                "the device discarded memory itself"
            );
            self.dev.released.iter().flat_map(|r| r.clone()).collect()
        }
    }

    const REPORT_Q: u64 = 3;

    #[test]
    fn reported_ranges_and_only_they_are_released() {
        let mut d = Drv::new(true, 0, false);
        d.send(REPORT_Q, 0x200000, 0x100000);
        assert_eq!(
            d.used_idx(REPORT_Q),
            1,
            "acknowledged before the guest runs again"
        );
        assert_eq!(d.zeroed(), (512..768).collect::<Vec<_>>());
        assert_eq!(d.dev.take_released(), vec![512..768]);
        assert!(d.dev.take_released().is_empty());
        assert_eq!(d.dev.counters.reported_extents, 1);
        assert_eq!(d.dev.counters.reported_pages, 256);
        // A chain of two ranges.
        d.desc(REPORT_Q, 0, 0x300000, 0x1000, 1, 1);
        d.desc(REPORT_Q, 1, 0x302000, 0x2000, 0, 0);
        d.kick(REPORT_Q, 0);
        assert_eq!(d.dev.take_released(), vec![768..769, 770..772]);
        assert_eq!(d.used_idx(REPORT_Q), 2);
        assert_eq!(d.dev.errors, 0);
    }

    #[test]
    fn hostile_buffers_are_skipped_and_release_nothing() {
        let mut d = Drv::new(true, 0, false);
        let bad: [(u64, u32); 6] = [
            (RAM_BYTES, 0x1000),          // outside RAM
            (RAM_BYTES - 0x1000, 0x2000), // runs past the end
            (0x100000, 0xffff_f000),      // huge
            (0x200800, 0x1000),           // misaligned address
            (0x200000, 0x800),            // misaligned length
            (u64::MAX - 0xfff, 0x1000),   // wraps
        ];
        for (i, &(addr, len)) in bad.iter().enumerate() {
            d.send(REPORT_Q, addr, len);
            assert_eq!(
                d.used_idx(REPORT_Q),
                i as u16 + 1,
                "skipped, still answered"
            );
        }
        assert_eq!(d.dev.errors, bad.len() as u64);
        assert!(!d.dev.broken());
        // Inflate arrays: a PFN outside RAM, a length that is not whole PFNs, an over-long array.
        let pfns: [u32; 3] = [0x100, RAM_PAGES as u32 + 5, 0x101];
        for (i, p) in pfns.iter().enumerate() {
            d.ram.write_obj(0x8000 + 4 * i as u64, *p).unwrap();
        }
        d.send(0, 0x8000, 12);
        assert_eq!(
            d.dev.take_released(),
            vec![0x100..0x102],
            "the good PFNs only"
        );
        d.send(0, 0x8000, 6);
        d.send(0, 0x8000, (b::MAX_PFNS as u32 + 1) * 4);
        d.send(0, RAM_BYTES - 4, 8);
        assert!(d.dev.take_released().is_empty());
        assert!(
            d.zeroed().is_empty(),
            "taken above: nothing more to release"
        );
        assert_eq!(d.dev.balloon_pages(), 2);
        assert!(!d.dev.broken(), "bad buffers are skipped, not fatal");
    }

    #[test]
    fn a_descriptor_loop_ends_after_the_ring_size() {
        let mut d = Drv::new(true, 0, false);
        // 0 -> 1 -> 0 -> ...: each names a range; the walk stops after SIZE descriptors.
        d.desc(REPORT_Q, 0, 0x300000, 0x1000, 1, 1);
        d.desc(REPORT_Q, 1, 0x301000, 0x1000, 1, 0);
        d.kick(REPORT_Q, 0);
        assert_eq!(d.used_idx(REPORT_Q), 1);
        let released = d.dev.take_released();
        assert!(released.len() <= SIZE as usize, "{released:?}");
        assert!(
            released
                .iter()
                .all(|r| *r == (768..769) || *r == (769..770))
        );
        assert!(
            d.zeroed().is_empty(),
            "taken above: nothing more to release"
        );
        // A chain whose next index is outside the table ends there.
        d.desc(REPORT_Q, 0, 0x310000, 0x1000, 1, 200);
        d.kick(REPORT_Q, 0);
        assert_eq!(d.dev.take_released(), vec![784..785]);
        assert!(!d.dev.broken());
    }

    #[test]
    fn bad_queue_set_ups_put_the_device_in_its_error_state() {
        // Queue size 0.
        let mut d = Drv::new(true, 0, false);
        d.w(reg::STATUS, 0);
        d.w(reg::STATUS, status::ACKNOWLEDGE);
        d.w(reg::QUEUE_SEL, 0);
        d.w(reg::QUEUE_NUM, 0);
        assert!(d.dev.broken());
        d.w(reg::QUEUE_NOTIFY, 0);
        assert!(d.dev.take_released().is_empty());
        // A reset clears the error state.
        d.w(reg::STATUS, 0);
        assert!(!d.dev.broken());

        // A descriptor table outside RAM: refused at DRIVER_OK.
        let mut d = Drv::new(true, 0, false);
        d.w(reg::STATUS, 0);
        d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        d.negotiate(0, 1);
        d.w(reg::QUEUE_SEL, 0);
        d.w(reg::QUEUE_NUM, SIZE);
        d.w(reg::QUEUE_DESC_LOW, 0);
        d.w(reg::QUEUE_DESC_HIGH, 1); // 4 GiB: outside the 8 MiB
        d.w(reg::QUEUE_AVAIL_LOW, avail_at(0) as u32);
        d.w(reg::QUEUE_USED_LOW, used_at(0) as u32);
        d.w(reg::QUEUE_READY, 1);
        d.w(reg::STATUS, 0xf);
        assert!(d.dev.broken());

        // An avail index far ahead of the ring.
        let mut d = Drv::new(true, 0, false);
        d.ram.write_obj(avail_at(REPORT_Q) + 2, 100u16).unwrap();
        d.w(reg::QUEUE_NOTIFY, REPORT_Q as u32);
        assert!(d.dev.broken());
        assert_eq!(d.used_idx(REPORT_Q), 0);

        // A notification of a queue that does not exist.
        let mut d = Drv::new(false, 0, false);
        d.w(reg::QUEUE_NOTIFY, 3);
        assert!(d.dev.broken());

        // Nothing was released by any of them.
        assert!(d.zeroed().is_empty());
    }

    #[test]
    fn features_are_checked_and_reporting_is_offered_only_when_asked() {
        let mut d = Drv::new(false, 0, true);
        d.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = d.r(reg::DEVICE_FEATURES);
        assert_eq!(lo & (1 << b::F_REPORTING), 0);
        assert_eq!(lo & (1 << b::F_DEFLATE_ON_OOM), 0, "a hard limit");
        assert_ne!(lo & (1 << b::F_STATS_VQ), 0);
        let d2 = Drv::new(true, 0, false);
        assert!(d2.dev.negotiated(b::F_REPORTING) && d2.dev.negotiated(b::F_DEFLATE_ON_OOM));
        // Without VERSION_1, or with a feature not offered, FEATURES_OK does not stick.
        for (lo, hi) in [(1 << b::F_STATS_VQ, 0), (1 << b::F_REPORTING, 1)] {
            d.w(reg::STATUS, 0);
            d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            d.negotiate(lo, hi);
            assert_eq!(d.r(reg::STATUS) & status::FEATURES_OK, 0);
        }
        // Notifications before DRIVER_OK do nothing.
        d.w(reg::QUEUE_NOTIFY, 0);
        assert!(!d.dev.broken());
        assert!(d.dev.errors > 0);
    }

    #[test]
    fn target_config_and_inflate_deflate() {
        let mut d = Drv::new(false, 300, true);
        let mut cfg = [0u8; 8];
        d.dev.read(reg::CONFIG, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 300);
        // Byte-wise config reads work too.
        let mut one = [0u8; 1];
        d.dev.read(reg::CONFIG + 1, &mut one);
        assert_eq!(one[0], 1); // 300 = 0x12c
        for i in 0..4u32 {
            d.ram
                .write_obj(0x8000 + 4 * u64::from(i), 0x200 + i)
                .unwrap();
        }
        d.send(0, 0x8000, 16);
        assert_eq!(d.dev.take_released(), vec![0x200..0x204]);
        d.send(1, 0x8000, 8);
        assert_eq!(d.dev.balloon_pages(), 2);
        assert!(
            d.dev.take_released().is_empty(),
            "deflating releases nothing"
        );
        d.w(reg::CONFIG + b::CFG_ACTUAL, 2);
        d.dev.read(reg::CONFIG, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[4..].try_into().unwrap()), 2);
    }

    #[test]
    fn the_stats_buffer_is_held_and_handed_back_on_request() {
        let mut d = Drv::new(false, 0, false);
        let stats: [(u16, u64); 3] = [
            (b::S_MEMFREE, 5 << 20),
            (b::S_MEMTOT, 8 << 20),
            (b::S_AVAIL, 4 << 20),
        ];
        for (i, (tag, v)) in stats.iter().enumerate() {
            let at = 0x9000 + i as u64 * b::STAT_SIZE;
            d.ram.write_obj(at, *tag).unwrap();
            d.ram.write_obj(at + 2, *v).unwrap();
        }
        d.send(2, 0x9000, 30);
        assert_eq!(d.used_idx(2), 0, "held by the device");
        let s = d.dev.stats().unwrap();
        assert_eq!(
            (s.free_mib, s.total_mib, s.available_mib),
            (Some(5.0), Some(8.0), Some(4.0))
        );
        d.dev.request_stats(&d.ram);
        assert_eq!(d.used_idx(2), 1, "handed back: the driver refills it");
        d.dev.request_stats(&d.ram);
        assert_eq!(d.used_idx(2), 1, "nothing held, nothing handed back");
        // A stats buffer outside RAM is refused, not fatal.
        d.send(2, RAM_BYTES - 4, 30);
        assert!(d.dev.errors > 0 && !d.dev.broken());
    }
}
