//! The virtio-balloon device (virtio 1.2 §5.5) behind the virtio-mmio transport
//! ([`MmioTransport`]), as a plain state machine: its queues, its configuration (the target, and
//! the driver's `actual`), and what the guest asks of it:
//!
//! - **inflate / deflate**: arrays of 4 KiB PFNs. The device keeps a bitmap of the pages in the
//!   balloon: a page inflated twice is counted once (the second time is an error), and deflating
//!   a page that is not in the balloon is an error, not a subtraction. Inflated pages are handed
//!   out ([`Balloon::take_released`]) for their owner to give back to the host; the device
//!   discards nothing itself;
//! - **statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the device holds the driver's buffer and hands
//!   it back at each interval tick ([`Balloon::request_stats`]); the driver refills and re-queues
//!   it, and the device keeps the values ([`Balloon::stats`]);
//! - **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`, offered only when asked for): each
//!   descriptor is a free range of guest RAM, handed out to be released, then acknowledged;
//! - `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: offered unless the target is a hard limit;
//! - the target can change while the guest runs ([`Balloon::set_target`]): the configuration
//!   generation changes, and the driver, which polls, moves the balloon at its next look.
//!
//! There is no interrupt: a notification is handled on the vCPU thread before the guest runs
//! again, so the used ring is up to date when the write returns and a polling driver needs no
//! wait loop. The work is bounded: one call of [`VirtioDevice::process`] does at most
//! [`STEP_BUDGET`] units (a chain, a descriptor or a PFN each) and holds at most
//! [`MAX_PENDING_RELEASES`] ranges not yet taken; the rest waits for the next call, which the VMM
//! makes at its next exit without running the guest in between (see `devices::virtio`). Released
//! pages are merged into ranges of adjacent pages.
//!
//! The driver is not trusted. A malformed buffer (PFNs outside RAM, a range not page aligned or
//! past the end of RAM, an over-long array, an indirect descriptor) is skipped and counted,
//! without allocating. Nothing outside a range the driver handed in is ever released.

use std::ops::Range;

use serde::Serialize;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::contract::abi::balloon as b;
use crate::devices::virtio::chain::ChainWalk;
use crate::devices::virtio::{
    ErrorCount, MmioTransport, QueueError, VirtioDevice, add_used, pop_head,
};
use crate::memory::GuestRam;
use crate::memory::bitmap::Bitmap;
use crate::memory::ram::GuestMemoryMmap;
use crate::row::{BalloonView, GuestStats};
use crate::units::{self, PAGE_SIZE};

/// Work units one call of [`VirtioDevice::process`] may do: a chain taken from a ring, a
/// descriptor read and a PFN looked at cost one each. Twice the largest PFN array, so that a
/// driver that sends one array per notification (as the built-in guest does) is answered at once.
pub const STEP_BUDGET: u64 = 2 * b::MAX_PFNS;

/// Released ranges the device holds before it waits for them to be taken.
pub const MAX_PENDING_RELEASES: usize = STEP_BUDGET as usize;

/// PFNs read from guest memory at a time (on the stack).
const PFN_CHUNK: u64 = 512;

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
    /// Pages put into the balloon (each page once until it is deflated), and taken out.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// A chain being worked through.
struct Walking {
    qi: usize,
    role: Role,
    head: u16,
    chain: ChainWalk,
    /// The PFN array of the current descriptor, when part of it is left.
    array: Option<PfnArray>,
}

#[derive(Clone, Copy)]
struct PfnArray {
    addr: u64,
    count: u64,
    done: u64,
}

/// The device.
pub struct Balloon {
    ram_pages: u64,
    offered: u64,
    queues: Vec<Queue>,
    /// Queue roles by index, fixed at activation.
    roles: Vec<Role>,
    target_pages: u32,
    actual_pages: u32,
    generation: u32,
    /// The statistics buffer the device holds, to hand back at the next request.
    stats_head: Option<u16>,
    stats: Option<GuestStats>,
    /// Pages in the balloon, and how many.
    in_balloon: Bitmap,
    pages: u64,
    /// Queues notified that may still have chains (bit i: queue i).
    notified: u32,
    walking: Option<Walking>,
    /// Guest page ranges to release, since the last [`Balloon::take_released`].
    released: Vec<Range<u64>>,
    pub counters: BalloonCounters,
    errors: ErrorCount,
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
        let n = 3 + usize::from(reporting);
        Balloon {
            ram_pages,
            offered,
            queues: (0..n)
                .map(|_| Queue::new(b::QUEUE_MAX).expect("QUEUE_MAX is a valid queue size"))
                .collect(),
            roles: Vec::new(),
            target_pages: target_pages.min(u32::try_from(ram_pages).unwrap_or(u32::MAX)),
            actual_pages: 0,
            generation: 0,
            stats_head: None,
            stats: None,
            in_balloon: Bitmap::new(ram_pages),
            pages: 0,
            notified: 0,
            walking: None,
            released: Vec::new(),
            counters: BalloonCounters::default(),
            errors: ErrorCount::new(Self::NAME),
        }
    }

    /// Pages in the balloon (each counted once, however often it was inflated).
    pub fn balloon_pages(&self) -> u64 {
        self.pages
    }

    /// The target the device asks for, in pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// Sets the target (clipped to guest RAM) while the guest runs: the configuration generation
    /// changes, and the driver moves the balloon when it next looks. Returns the target set.
    pub fn set_target(&mut self, pages: u64) -> u32 {
        let t = pages.min(self.ram_pages).min(u64::from(u32::MAX)) as u32;
        if t != self.target_pages {
            self.target_pages = t;
            self.generation = self.generation.wrapping_add(1);
        }
        t
    }

    /// The guest's statistics, once it sent some.
    pub fn stats(&self) -> Option<&GuestStats> {
        self.stats.as_ref()
    }

    /// Guest page ranges to release since the last call: sorted, adjacent and overlapping ones
    /// merged. Their owner must release them before the guest runs again.
    pub fn take_released(&mut self) -> Vec<Range<u64>> {
        let mut r = std::mem::take(&mut self.released);
        r.sort_unstable_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(r.len());
        for x in r {
            match out.last_mut() {
                Some(last) if x.start <= last.end => last.end = last.end.max(x.end),
                _ => out.push(x),
            }
        }
        out
    }

    fn release(&mut self, r: Range<u64>) {
        match self.released.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => self.released.push(r),
        }
    }

    /// Asks the guest for fresh statistics: hands back the buffer the device holds.
    pub fn request_stats(&mut self, ram: &GuestRam) -> Result<bool, QueueError> {
        let qi = self.roles.iter().position(|r| *r == Role::Stats);
        match (self.stats_head, qi) {
            (Some(head), Some(qi)) => {
                self.stats_head = None;
                add_used(&mut self.queues[qi], qi, head, ram.mem())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[b::CFG_NUM_PAGES as usize..][..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[b::CFG_ACTUAL as usize..][..4].copy_from_slice(&self.actual_pages.to_le_bytes());
        c
    }

    /// Starts on a descriptor of an inflate, deflate or reporting chain.
    fn descriptor(&mut self, w: &mut Walking, d: Descriptor) {
        let (addr, len) = (d.addr().0, u64::from(d.len()));
        let ram_bytes = self.ram_pages * PAGE_SIZE;
        let in_ram = addr.checked_add(len).is_some_and(|e| e <= ram_bytes);
        if w.role == Role::Reporting {
            let ok = addr.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE) && len > 0;
            if !ok || !in_ram {
                self.errors.note(format_args!(
                    "reporting: skipped range {addr:#x}+{len:#x} (unaligned or outside RAM)"
                ));
                return;
            }
            let n = len / PAGE_SIZE;
            self.release(addr / PAGE_SIZE..addr / PAGE_SIZE + n);
            self.counters.reported_extents += 1;
            self.counters.reported_pages += n;
            return;
        }
        if d.is_write_only() || len % 4 != 0 || len / 4 > b::MAX_PFNS || !in_ram {
            self.errors.note(format_args!(
                "{:?}: skipped a PFN array of {len} bytes at {addr:#x}",
                w.role
            ));
            return;
        }
        if len > 0 {
            w.array = Some(PfnArray {
                addr,
                count: len / 4,
                done: 0,
            });
        }
    }

    /// Acts on `n` (at most [`PFN_CHUNK`]) PFNs at `addr` (checked to lie in RAM).
    fn pfns(&mut self, role: Role, addr: u64, n: u64, mem: &GuestMemoryMmap) {
        let mut buf = [0u8; (PFN_CHUNK * 4) as usize];
        let buf = &mut buf[..(n * 4) as usize];
        if mem.read_slice(buf, GuestAddress(addr)).is_err() {
            self.errors
                .note(format_args!("{role:?}: PFN array at {addr:#x} unreadable"));
            return;
        }
        for w in buf.chunks_exact(4) {
            let pfn = u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            if pfn >= self.ram_pages {
                self.errors
                    .note(format_args!("{role:?}: PFN {pfn:#x} outside guest RAM"));
                continue;
            }
            let inside = self.in_balloon.get(pfn);
            match (role, inside) {
                (Role::Inflate, false) => {
                    self.in_balloon.set(pfn);
                    self.pages += 1;
                    self.counters.inflated_pages += 1;
                    self.release(pfn..pfn + 1);
                }
                (Role::Deflate, true) => {
                    self.in_balloon.clear(pfn);
                    self.pages -= 1;
                    self.counters.deflated_pages += 1;
                }
                (Role::Inflate, true) => self.errors.note(format_args!(
                    "inflate: page {pfn:#x} is already in the balloon"
                )),
                _ => self
                    .errors
                    .note(format_args!("deflate: page {pfn:#x} is not in the balloon")),
            }
        }
    }

    /// A statistics chain: its first descriptor is read; the chain is held until the next
    /// request, and an older one goes back at once.
    fn stats_chain(
        &mut self,
        qi: usize,
        head: u16,
        mut chain: ChainWalk,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        match chain.next(mem) {
            Ok(Some(d)) => self.read_stats(&d, mem),
            Ok(None) => {}
            Err(e) => self
                .errors
                .note(format_args!("queue {qi}: chain {head}: {e}")),
        }
        match self.stats_head.replace(head) {
            Some(old) => add_used(&mut self.queues[qi], qi, old, mem).map(|()| true),
            None => Ok(false),
        }
    }

    fn read_stats(&mut self, d: &Descriptor, mem: &GuestMemoryMmap) {
        const MAX: usize = 16;
        let n = (u64::from(d.len()) / b::STAT_SIZE).min(MAX as u64) as usize;
        let mut buf = [0u8; MAX * b::STAT_SIZE as usize];
        let buf = &mut buf[..n * b::STAT_SIZE as usize];
        if mem.read_slice(buf, d.addr()).is_err() {
            self.errors.note(format_args!(
                "stats buffer at {:#x} outside RAM",
                d.addr().0
            ));
            return;
        }
        let mut stats = GuestStats {
            source: "virtio-balloon stats queue".into(),
            ..Default::default()
        };
        for e in buf.chunks_exact(b::STAT_SIZE as usize) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            let mib = units::mib(u64::from_le_bytes(v));
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
}

impl VirtioDevice for Balloon {
    const NAME: &'static str = "virtio-balloon";

    fn device_id(&self) -> u32 {
        b::DEVICE_ID
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|at| at.checked_add(i))
                .and_then(|j| cfg.get(j))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is writable; byte-wise writes are allowed.
        let end = offset.checked_add(data.len() as u64);
        if offset >= b::CFG_ACTUAL && end.is_some_and(|e| e <= b::CFG_ACTUAL + 4) {
            let mut a = self.actual_pages.to_le_bytes();
            let s = (offset - b::CFG_ACTUAL) as usize;
            a[s..s + data.len()].copy_from_slice(data);
            self.actual_pages = u32::from_le_bytes(a);
        }
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn activate(&mut self, features: u64) -> usize {
        self.roles = vec![Role::Inflate, Role::Deflate];
        if features & bit(b::F_STATS_VQ) != 0 {
            self.roles.push(Role::Stats);
        }
        if features & bit(b::F_REPORTING) != 0 {
            self.roles.push(Role::Reporting);
        }
        self.roles.len()
    }

    /// Forgets the buffers in flight and empties the balloon (a driver that resets the device
    /// starts again with all its pages); ranges not yet taken stay to be released.
    fn reset(&mut self) {
        self.roles.clear();
        self.stats_head = None;
        self.notified = 0;
        self.walking = None;
        if self.pages > 0 {
            self.in_balloon.clear_all();
            self.pages = 0;
        }
    }

    fn notified(&mut self, queue: usize) {
        self.notified |= 1 << queue;
    }

    fn has_work(&self) -> bool {
        self.notified != 0 || self.walking.is_some()
    }

    fn errors(&self) -> u64 {
        self.errors.count()
    }

    fn process(&mut self, ram: &GuestRam) -> Result<bool, QueueError> {
        let mem = ram.mem();
        let mut budget = STEP_BUDGET;
        let mut used = false;
        while budget > 0 && self.released.len() < MAX_PENDING_RELEASES {
            let Some(mut w) = self.walking.take() else {
                if self.notified == 0 {
                    break;
                }
                let qi = self.notified.trailing_zeros() as usize;
                budget -= 1;
                let Some(head) = pop_head(&mut self.queues[qi], qi, mem)? else {
                    self.notified &= !(1 << qi);
                    continue;
                };
                let chain = ChainWalk::new(&self.queues[qi], head);
                let role = self.roles[qi];
                if role == Role::Stats {
                    used |= self.stats_chain(qi, head, chain, mem)?;
                } else {
                    self.walking = Some(Walking {
                        qi,
                        role,
                        head,
                        chain,
                        array: None,
                    });
                }
                continue;
            };
            if let Some(a) = &mut w.array {
                let n = (a.count - a.done).min(budget).min(PFN_CHUNK);
                let at = a.addr + 4 * a.done;
                a.done += n;
                if a.done == a.count {
                    w.array = None;
                }
                budget -= n;
                self.pfns(w.role, at, n, mem);
                self.walking = Some(w);
                continue;
            }
            budget -= 1;
            match w.chain.next(mem) {
                Ok(Some(d)) => {
                    self.descriptor(&mut w, d);
                    self.walking = Some(w);
                }
                Ok(None) => {
                    add_used(&mut self.queues[w.qi], w.qi, w.head, mem)?;
                    used = true;
                }
                Err(e) => {
                    self.errors
                        .note(format_args!("queue {}: chain {}: {e}", w.qi, w.head));
                    add_used(&mut self.queues[w.qi], w.qi, w.head, mem)?;
                    used = true;
                }
            }
        }
        Ok(used)
    }
}

impl MmioTransport<Balloon> {
    /// What a row shows of the balloon.
    pub fn view(&self) -> BalloonView {
        let b = self.device();
        BalloonView {
            balloon_mib: units::pages_mib(b.balloon_pages()),
            target_mib: units::pages_mib(u64::from(b.target_pages())),
            reported_extents: b.counters.reported_extents,
            reported_mib: units::pages_mib(b.counters.reported_pages),
            guest_stats: b.stats().cloned(),
            errors: self.errors(),
        }
    }

    /// Asks the guest for fresh statistics (at an interval tick), while the device runs.
    pub fn request_stats(&mut self, ram: &GuestRam) {
        self.with_device(|d| d.request_stats(ram));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::abi::balloon::{reg, status};
    use crate::memory::owner::GuestMemory;

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
        /// The RAM's owner, which discards what the device hands out (as the VM does).
        mem: GuestMemory,
        dev: MmioTransport<Balloon>,
    }

    impl Drv {
        fn w(&mut self, off: u64, v: u32) {
            self.dev.write(off, &v.to_le_bytes(), self.mem.ram());
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
            let d = Drv::sized(RAM_BYTES, reporting, target, hard);
            // Every page but the driver's own holds a pattern: its page number + 1.
            for p in DRIVER_PAGES..RAM_PAGES {
                d.mem.ram().write_obj(p * PAGE_SIZE, p + 1).unwrap();
            }
            d
        }
        /// The same on `bytes` of RAM, without the pattern.
        fn sized(bytes: u64, reporting: bool, target: u32, hard: bool) -> Drv {
            let mem = GuestMemory::new(GuestRam::new(bytes, false).unwrap());
            let dev = MmioTransport::new(Balloon::new(mem.ram().pages(), reporting, target, hard));
            let mut d = Drv { mem, dev };
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
            self.mem.ram().write_obj(at, addr).unwrap();
            self.mem.ram().write_obj(at + 8, len).unwrap();
            self.mem.ram().write_obj(at + 12, flags).unwrap();
            self.mem.ram().write_obj(at + 14, next).unwrap();
        }
        /// Makes chain `head` available on queue `q` and notifies.
        fn kick(&mut self, q: u64, head: u16) {
            let idx: u16 = self.mem.ram().read_obj(avail_at(q) + 2).unwrap();
            let slot = u64::from(idx % SIZE as u16);
            self.mem
                .ram()
                .write_obj(avail_at(q) + 4 + 2 * slot, head)
                .unwrap();
            self.mem
                .ram()
                .write_obj(avail_at(q) + 2, idx.wrapping_add(1))
                .unwrap();
            self.w(reg::QUEUE_NOTIFY, q as u32);
        }
        /// Releases the pages the device handed out, as their owner does, and returns them.
        fn released(&mut self) -> Vec<Range<u64>> {
            let r = self.dev.device_mut().take_released();
            for p in &r {
                self.mem.discard(p.clone()).unwrap();
            }
            r
        }
        fn used_idx(&self, q: u64) -> u16 {
            self.mem.ram().read_obj(used_at(q) + 2).unwrap()
        }
        /// One buffer of one descriptor on queue `q`.
        fn send(&mut self, q: u64, addr: u64, len: u32) {
            self.desc(q, 0, addr, len, 0, 0);
            self.kick(q, 0);
        }
        /// Pages that no longer hold their pattern.
        fn zeroed(&self) -> Vec<u64> {
            (DRIVER_PAGES..RAM_PAGES)
                .filter(|&p| self.mem.ram().read_obj::<u64>(p * PAGE_SIZE).unwrap() != p + 1)
                .collect()
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
        assert_eq!(d.released(), vec![512..768]);
        assert_eq!(d.zeroed(), (512..768).collect::<Vec<_>>());
        assert!(d.released().is_empty());
        assert_eq!(d.dev.device().counters.reported_extents, 1);
        assert_eq!(d.dev.device().counters.reported_pages, 256);
        // A chain of two ranges.
        d.desc(REPORT_Q, 0, 0x300000, 0x1000, 1, 1);
        d.desc(REPORT_Q, 1, 0x302000, 0x2000, 0, 0);
        d.kick(REPORT_Q, 0);
        assert_eq!(d.released(), vec![768..769, 770..772]);
        assert_eq!(d.used_idx(REPORT_Q), 2);
        assert_eq!(d.dev.errors(), 0);
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
        assert_eq!(d.dev.errors(), bad.len() as u64);
        assert!(!d.dev.broken());
        // Inflate arrays: a PFN outside RAM, a length that is not whole PFNs, an over-long array.
        let pfns: [u32; 3] = [0x100, RAM_PAGES as u32 + 5, 0x101];
        for (i, p) in pfns.iter().enumerate() {
            d.mem.ram().write_obj(0x8000 + 4 * i as u64, *p).unwrap();
        }
        d.send(0, 0x8000, 12);
        assert_eq!(d.released(), vec![0x100..0x102], "the good PFNs only");
        d.send(0, 0x8000, 6);
        d.send(0, 0x8000, (b::MAX_PFNS as u32 + 1) * 4);
        d.send(0, RAM_BYTES - 4, 8);
        assert!(d.released().is_empty());
        assert_eq!(d.zeroed(), vec![0x100, 0x101]);
        assert_eq!(d.dev.device().balloon_pages(), 2);
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
        assert_eq!(d.released(), vec![768..770], "merged");
        assert_eq!(d.zeroed(), vec![768, 769]);
        assert_eq!(d.dev.errors(), 1, "the loop is counted");
        // A chain whose next index is outside the table ends there.
        d.desc(REPORT_Q, 0, 0x310000, 0x1000, 1, 200);
        d.kick(REPORT_Q, 0);
        assert_eq!(d.released(), vec![784..785]);
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
        assert!(d.released().is_empty());
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
        d.mem
            .ram()
            .write_obj(avail_at(REPORT_Q) + 2, 100u16)
            .unwrap();
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
        assert!(d.dev.errors() > 0);
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
            d.mem
                .ram()
                .write_obj(0x8000 + 4 * u64::from(i), 0x200 + i)
                .unwrap();
        }
        d.send(0, 0x8000, 16);
        assert_eq!(d.released(), vec![0x200..0x204]);
        d.send(1, 0x8000, 8);
        assert_eq!(d.dev.device().balloon_pages(), 2);
        assert!(d.released().is_empty(), "deflating releases nothing");
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
            d.mem.ram().write_obj(at, *tag).unwrap();
            d.mem.ram().write_obj(at + 2, *v).unwrap();
        }
        d.send(2, 0x9000, 30);
        assert_eq!(d.used_idx(2), 0, "held by the device");
        let s = d.dev.device().stats().unwrap();
        assert_eq!(
            (s.free_mib, s.total_mib, s.available_mib),
            (Some(5.0), Some(8.0), Some(4.0))
        );
        d.dev.request_stats(d.mem.ram());
        assert_eq!(d.used_idx(2), 1, "handed back: the driver refills it");
        d.dev.request_stats(d.mem.ram());
        assert_eq!(d.used_idx(2), 1, "nothing held, nothing handed back");
        // A stats buffer outside RAM is refused, not fatal.
        d.send(2, RAM_BYTES - 4, 30);
        assert!(d.dev.errors() > 0 && !d.dev.broken());
    }

    /// Where the tests keep PFN arrays: 8 arrays of up to MAX_PFNS, below DRIVER_PAGES.
    fn array_at(k: u64) -> u64 {
        0x20000 + k * 0x4000
    }

    impl Drv {
        /// Writes `pfns` as PFN array `k` and makes it descriptor `k` of queue `q`, chained to
        /// descriptor `next` when given.
        fn array(&self, q: u64, k: u64, pfns: &[u32], next: Option<u16>) {
            for (i, p) in pfns.iter().enumerate() {
                self.mem
                    .ram()
                    .write_obj(array_at(k) + 4 * i as u64, *p)
                    .unwrap();
            }
            let (flags, next) = next.map_or((0, 0), |n| (1, n));
            self.desc(q, k, array_at(k), 4 * pfns.len() as u32, flags, next);
        }
        /// Resumes the device until it has no work left (taking what it releases), at most
        /// `max` times; returns how many resumes it took.
        fn drain(&mut self, max: u32) -> u32 {
            let mut n = 0;
            while self.dev.has_work() {
                assert!(n < max, "still working after {max} resumes");
                self.released();
                self.dev.resume(self.mem.ram());
                n += 1;
            }
            self.released();
            n
        }
    }

    #[test]
    fn set_target_changes_the_config_while_the_guest_runs() {
        let mut d = Drv::new(false, 10, true);
        assert_eq!(d.r(reg::CONFIG_GENERATION), 0);
        assert_eq!(d.r(reg::INTERRUPT_STATUS) & 2, 0);
        assert_eq!(d.dev.device_mut().set_target(300), 300);
        assert_eq!(d.r(reg::CONFIG + b::CFG_NUM_PAGES), 300);
        assert_eq!(d.r(reg::CONFIG_GENERATION), 1);
        assert_eq!(d.r(reg::INTERRUPT_STATUS) & 2, 2, "configuration changed");
        d.w(reg::INTERRUPT_ACK, 2);
        assert_eq!(d.r(reg::INTERRUPT_STATUS) & 2, 0);
        // The same target again changes nothing; a target beyond RAM is clipped to it.
        d.dev.device_mut().set_target(300);
        assert_eq!(d.r(reg::CONFIG_GENERATION), 1);
        assert_eq!(d.dev.device_mut().set_target(u64::MAX), RAM_PAGES as u32);
        assert_eq!(d.r(reg::CONFIG_GENERATION), 2);
        assert_eq!(d.dev.view().target_mib, units::pages_mib(RAM_PAGES));
        // The driver follows: it inflates by the difference and says so in `actual`.
        d.dev.device_mut().set_target(0x42);
        let pfns: Vec<u32> = (0x100..0x142).collect();
        d.array(0, 0, &pfns, None);
        d.kick(0, 0);
        d.w(reg::CONFIG + b::CFG_ACTUAL, 0x42);
        assert_eq!(d.dev.device().balloon_pages(), 0x42);
        assert_eq!(d.r(reg::CONFIG + b::CFG_ACTUAL), 0x42);
    }

    #[test]
    fn a_page_inflated_many_times_is_in_the_balloon_once() {
        let mut d = Drv::new(false, 0, false);
        d.array(0, 0, &[0x100; b::MAX_PFNS as usize], None);
        for _ in 0..3 {
            d.kick(0, 0);
        }
        assert_eq!(
            d.drain(100),
            0,
            "one array per notification: answered at once"
        );
        assert_eq!(d.used_idx(0), 3);
        assert_eq!(d.dev.device().balloon_pages(), 1, "one page, not 12,288");
        assert_eq!(d.dev.view().balloon_mib, units::pages_mib(1));
        assert_eq!(d.dev.device().counters.inflated_pages, 1);
        assert_eq!(d.dev.errors(), 3 * b::MAX_PFNS - 1);
        assert_eq!(d.zeroed(), vec![0x100]);
        // Deflating it twice takes it out once; deflating a page never inflated is an error.
        d.array(1, 0, &[0x100, 0x100, 0x200], None);
        d.kick(1, 0);
        assert_eq!(d.dev.device().balloon_pages(), 0);
        assert_eq!(d.dev.device().counters.deflated_pages, 1);
        assert_eq!(d.dev.errors(), 3 * b::MAX_PFNS + 1);
        // And it can be inflated again.
        d.array(0, 0, &[0x100], None);
        d.kick(0, 0);
        assert_eq!(d.dev.device().balloon_pages(), 1);
        // A reset empties the balloon (the driver starts again with all its pages).
        d.w(reg::STATUS, 0);
        assert_eq!(d.dev.device().balloon_pages(), 0);
    }

    #[test]
    fn one_notification_does_bounded_work_and_the_rest_follows_at_the_next_exits() {
        let mut d = Drv::new(false, 0, false);
        // A chain of SIZE descriptors (the last loops back to the first), each of MAX_PFNS
        // PFNs: the even pages above the driver's, over and over, and some outside RAM.
        let pfns: Vec<u32> = (0..b::MAX_PFNS as u32)
            .map(|i| {
                if i % 7 == 0 {
                    u32::MAX - i
                } else {
                    DRIVER_PAGES as u32 + (2 * i) % (RAM_PAGES - DRIVER_PAGES) as u32
                }
            })
            .collect();
        for k in 0..u64::from(SIZE) {
            d.array(0, k, &pfns, Some(((k + 1) % u64::from(SIZE)) as u16));
        }
        // One notification does at most STEP_BUDGET units of work, and answers nothing before
        // its chain is done.
        d.kick(0, 0);
        let looked = d.dev.device().counters.inflated_pages + d.dev.errors();
        assert!(looked <= STEP_BUDGET, "{looked} PFNs looked at");
        assert!(d.dev.has_work());
        assert_eq!(d.used_idx(0), 0, "nothing answered yet");
        for n in 2..=u64::from(SIZE) {
            d.kick(0, 0);
            let looked = d.dev.device().counters.inflated_pages + d.dev.errors();
            assert!(
                looked <= n * STEP_BUDGET,
                "{looked} PFNs in {n} notifications"
            );
            assert!(d.dev.device().released.len() <= MAX_PENDING_RELEASES);
            assert!(d.dev.has_work());
        }
        assert!(d.used_idx(0) < SIZE as u16);
        let per_chain = u64::from(SIZE) * b::MAX_PFNS;
        let total = u64::from(SIZE) * per_chain;
        let resumes = d.drain(1000);
        assert!(
            u64::from(resumes) + u64::from(SIZE) >= total / STEP_BUDGET,
            "{resumes} resumes for {total} PFNs"
        );
        assert_eq!(
            d.used_idx(0),
            SIZE as u16,
            "every chain answered in the end"
        );
        // Every PFN was looked at once: the distinct even pages went in, the rest are errors,
        // plus one error per chain for its loop.
        let distinct = (RAM_PAGES - DRIVER_PAGES) / 2;
        let c = &d.dev.device().counters;
        assert_eq!(c.inflated_pages, distinct);
        assert_eq!(c.inflated_pages + d.dev.errors(), total + u64::from(SIZE));
        assert_eq!(d.zeroed().len() as u64, distinct);
        assert!(!d.dev.broken());
    }

    #[test]
    fn releases_not_taken_are_bounded_and_hold_the_work_back() {
        // 100 MiB: enough pages for more non-adjacent releases than the device may hold.
        let mut d = Drv::sized(100 << 20, false, 0, false);
        let pfns = |k: u32| -> Vec<u32> {
            (0..b::MAX_PFNS as u32)
                .map(|i| 0x40 + 2 * (k * b::MAX_PFNS as u32 + i))
                .collect()
        };
        d.array(0, 0, &pfns(0), Some(1));
        d.array(0, 1, &pfns(1), Some(2));
        d.array(0, 2, &pfns(2), None);
        d.kick(0, 0);
        for _ in 0..5 {
            d.dev.resume(d.mem.ram());
            assert!(d.dev.device().released.len() <= MAX_PENDING_RELEASES);
        }
        assert!(d.dev.has_work(), "held back until the releases are taken");
        assert_eq!(d.used_idx(0), 0);
        d.drain(10);
        assert_eq!(d.used_idx(0), 1);
        assert_eq!(d.dev.device().balloon_pages(), 3 * b::MAX_PFNS);
        // Adjacent pages are handed out as one range.
        let run: Vec<u32> = (0x40..0x40 + b::MAX_PFNS as u32).rev().collect();
        let mut d = Drv::sized(100 << 20, false, 0, false);
        d.array(0, 0, &run, None);
        d.kick(0, 0);
        assert_eq!(d.released(), vec![0x40..0x40 + b::MAX_PFNS]);
    }

    #[test]
    fn indirect_descriptors_are_refused() {
        let mut d = Drv::new(false, 0, false);
        // An indirect table of two PFN-array descriptors, at 0x30000.
        let table = 0x30000u64;
        for (i, pfn) in [0x100u32, 0x101].iter().enumerate() {
            let arr = array_at(i as u64);
            d.mem.ram().write_obj(arr, *pfn).unwrap();
            let at = table + 16 * i as u64;
            d.mem.ram().write_obj(at, arr).unwrap();
            d.mem.ram().write_obj(at + 8, 4u32).unwrap();
            d.mem
                .ram()
                .write_obj(at + 12, if i == 0 { 1u16 } else { 0 })
                .unwrap();
            d.mem.ram().write_obj(at + 14, 1u16).unwrap();
        }
        d.desc(0, 0, table, 32, 4, 0); // VIRTQ_DESC_F_INDIRECT
        d.kick(0, 0);
        assert_eq!(d.used_idx(0), 1, "answered");
        assert!(d.released().is_empty());
        assert_eq!(d.dev.device().balloon_pages(), 0, "not followed");
        assert_eq!(d.dev.errors(), 1);
        assert!(!d.dev.broken());
    }

    #[test]
    fn pfns_outside_ram_are_counted_without_stalling() {
        let mut d = Drv::new(false, 0, false);
        let pfns: Vec<u32> = (0..b::MAX_PFNS as u32).map(|i| u32::MAX - i).collect();
        d.array(1, 0, &pfns, None);
        for _ in 0..4 {
            d.kick(1, 0);
        }
        d.drain(100);
        assert_eq!(d.used_idx(1), 4);
        assert_eq!(d.dev.errors(), 4 * b::MAX_PFNS);
        assert_eq!(d.dev.device().counters.deflated_pages, 0);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A descriptor: an address (an array in the driver's area, or anywhere), a length,
        /// flags (NEXT, WRITE, INDIRECT in any mix) and a next index (inside the table or not).
        fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
            (
                prop_oneof![(0..8u64).prop_map(array_at), any::<u64>()],
                prop_oneof![
                    4 => (0..64u32).prop_map(|n| 4 * n),
                    1 => (0..=b::MAX_PFNS as u32 + 2).prop_map(|n| 4 * n),
                    1 => any::<u32>(),
                ],
                0..8u16,
                prop_oneof![0..SIZE as u16, any::<u16>()],
            )
        }

        proptest! {
            // Each case runs a device on 8 MiB of RAM: a thousandth of the cases asked for
            // (`make fuzz`: 100, about 20 s), at least 64.
            #![proptest_config(ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES")
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .map_or(64, |n| (n / 1000).max(64))
            ))]
            #[test]
            fn any_ring_is_walked_in_bounded_steps_with_consistent_accounting(
                reporting in any::<bool>(),
                table in prop::collection::vec(descriptor(), SIZE as usize),
                pfns in prop::collection::vec(
                    prop_oneof![0..RAM_PAGES as u32, any::<u32>()], 1..2048),
                heads in prop::collection::vec(prop_oneof![0..SIZE as u16, any::<u16>()], 1..12),
                queue in 0..4u64,
                avail in prop_oneof![Just(None), any::<u16>().prop_map(Some)],
            ) {
                let mut d = Drv::sized(RAM_BYTES, reporting, 0, false);
                let mut released = Bitmap::new(RAM_PAGES);
                for k in 0..8 {
                    for (i, p) in pfns.iter().enumerate().take(b::MAX_PFNS as usize) {
                        d.mem.ram().write_obj(array_at(k) + 4 * i as u64, *p).unwrap();
                    }
                }
                for (i, (addr, len, flags, next)) in table.iter().enumerate() {
                    d.desc(queue, i as u64, *addr, *len, *flags, *next);
                }
                for h in &heads {
                    d.kick(queue, *h);
                    if let Some(a) = avail {
                        d.mem.ram().write_obj(avail_at(queue) + 2, a).unwrap();
                    }
                    let mut steps = 0;
                    loop {
                        let dev = d.dev.device();
                        let before = dev.counters.inflated_pages
                            + dev.counters.deflated_pages
                            + d.dev.errors();
                        prop_assert!(dev.released.len() <= MAX_PENDING_RELEASES);
                        for r in d.released() {
                            prop_assert!(r.start < r.end && r.end <= RAM_PAGES);
                            released.set_range(r);
                        }
                        if !d.dev.has_work() {
                            break;
                        }
                        d.dev.resume(d.mem.ram());
                        let dev = d.dev.device();
                        let after = dev.counters.inflated_pages
                            + dev.counters.deflated_pages
                            + d.dev.errors();
                        prop_assert!(after - before <= STEP_BUDGET + 1);
                        steps += 1;
                        prop_assert!(steps <= 4 * SIZE * SIZE, "no end");
                    }
                    let dev = d.dev.device();
                    prop_assert_eq!(dev.balloon_pages(), dev.in_balloon.count_ones());
                    prop_assert_eq!(
                        dev.balloon_pages(),
                        dev.counters.inflated_pages - dev.counters.deflated_pages
                    );
                    prop_assert!(dev.balloon_pages() <= RAM_PAGES);
                }
                // Every page in the balloon was handed out to be released.
                let dev = d.dev.device();
                for p in dev.in_balloon.iter_ones() {
                    prop_assert!(released.get(p), "page {p:#x} in the balloon, never released");
                }
            }
        }
    }
}
