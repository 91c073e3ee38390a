//! The virtio-mmio transport (version 2 registers, virtio 1.2 §4.2.2): the register file, feature
//! negotiation, the device status, queue set-up and notifications, in front of one
//! [`VirtioDevice`]. There is no interrupt line: `InterruptStatus` is kept for drivers that look
//! (bit 0: a used ring was written; bit 1: the configuration changed, or the device needs reset).
//!
//! A malformed queue set-up (a bad size, rings outside RAM) or a malformed ring puts the device in
//! its error state (`DEVICE_NEEDS_RESET`): nothing is processed until the driver resets it. Other
//! bad register accesses are counted and ignored.

use virtio_queue::QueueT;

use super::{ErrorCount, QueueError, VirtioDevice};
use crate::contract::abi::balloon::{self as b, reg, status};
use crate::memory::GuestRam;

/// `VIRTIO_F_INDIRECT_DESC` (virtio 1.2 §6.2): never offered, so a driver may not use indirect
/// tables, and the device never follows one.
pub const F_INDIRECT_DESC: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// `InterruptStatus` bits.
const INT_USED: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The virtio-mmio transport in front of device `D`.
pub struct MmioTransport<D> {
    device: D,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    /// Queues in use, fixed when the driver sets DRIVER_OK.
    active: usize,
    interrupt_status: u32,
    /// The device's configuration generation the driver last acknowledged.
    acked_generation: u32,
    errors: ErrorCount,
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D) -> Self {
        debug_assert_eq!(device.features() & bit(F_INDIRECT_DESC), 0);
        let acked_generation = device.config_generation();
        let mut t = MmioTransport {
            device,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            active: 0,
            interrupt_status: 0,
            acked_generation,
            errors: ErrorCount::new(D::NAME),
        };
        t.reset();
        t
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn reset(&mut self) {
        for q in self.device.queues_mut() {
            q.reset();
        }
        self.device.reset();
        self.active = 0;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.acked_generation = self.device.config_generation();
    }

    /// Whether the device is in its error state (`DEVICE_NEEDS_RESET`).
    pub fn broken(&self) -> bool {
        self.status & status::NEEDS_RESET != 0
    }

    /// Whether the driver set DRIVER_OK and the device is not in its error state.
    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && !self.broken()
    }

    /// Whether the driver negotiated feature bit `f`.
    pub fn negotiated(&self, f: u32) -> bool {
        self.driver_features & bit(f) != 0
    }

    /// Malformed accesses and requests, the transport's and the device's.
    pub fn errors(&self) -> u64 {
        self.errors.count() + self.device.errors()
    }

    /// Whether the device has work left from a notification (see [`MmioTransport::resume`]).
    pub fn has_work(&self) -> bool {
        self.running() && self.device.has_work()
    }

    /// Does the next bounded part of the work left, if any.
    pub fn resume(&mut self, ram: &GuestRam) {
        if self.has_work() {
            let r = self.device.process(ram);
            self.after(r);
        }
    }

    /// Runs `f` on the device while it is running (not before DRIVER_OK, not in its error state),
    /// with `f`'s result handled as a notification's: a used ring written raises bit 0 of
    /// `InterruptStatus`, a queue fault the error state.
    pub fn with_device(&mut self, f: impl FnOnce(&mut D) -> Result<bool, QueueError>) {
        if self.running() {
            let r = f(&mut self.device);
            self.after(r);
        }
    }

    fn after(&mut self, r: Result<bool, QueueError>) {
        match r {
            Ok(true) => self.interrupt_status |= INT_USED,
            Ok(false) => {}
            Err(e) => self.fail(format_args!("{e}")),
        }
    }

    /// Enters the error state: nothing is processed until the driver resets the device.
    fn fail(&mut self, what: std::fmt::Arguments<'_>) {
        self.errors.note(format_args!("{what}; device needs reset"));
        self.status |= status::NEEDS_RESET;
        self.interrupt_status |= INT_CONFIG;
    }

    fn interrupt_status(&self) -> u32 {
        let config = self.device.config_generation() != self.acked_generation;
        self.interrupt_status | if config { INT_CONFIG } else { 0 }
    }

    /// A read of `data.len()` bytes at register offset `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC_VALUE => b::MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => 0x4d56_5352, // "MVSR"
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.device.config_generation(),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn selected(&self) -> Option<&virtio_queue::Queue> {
        self.device.queues().get(self.queue_sel as usize)
    }

    /// A write of `data` at register offset `offset`; a notification does a bounded part of its
    /// work at once (the rest: [`MmioTransport::resume`]).
    pub fn write(&mut self, offset: u64, data: &[u8], ram: &GuestRam) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            self.errors.note(format_args!(
                "{}-byte write to register {offset:#x}",
                data.len()
            ));
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
            reg::INTERRUPT_ACK => {
                if v & INT_CONFIG != 0 {
                    self.acked_generation = self.device.config_generation();
                }
                self.interrupt_status &= !v;
            }
            reg::STATUS => self.set_status(v, ram),
            _ => self
                .errors
                .note(format_args!("write of {v:#x} to register {offset:#x}")),
        }
    }

    fn queue_setting(&mut self, offset: u64, v: u32) {
        let sel = self.queue_sel;
        let Some(q) = self.device.queues_mut().get_mut(sel as usize) else {
            self.fail(format_args!("set-up of queue {sel}, which does not exist"));
            return;
        };
        match offset {
            reg::QUEUE_NUM => {
                if let Err(e) = q.try_set_size(u16::try_from(v).unwrap_or(0)) {
                    self.fail(format_args!("queue {sel}: size {v}: {e}"));
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
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0 && self.negotiated(b::F_VERSION_1);
            if !ok {
                self.errors.note(format_args!(
                    "driver features {:#x} are not a subset of {offered:#x} with VERSION_1",
                    self.driver_features
                ));
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                self.fail(format_args!("DRIVER_OK without FEATURES_OK"));
                return;
            }
            self.active = self.device.activate(self.driver_features);
            let bad = self.device.queues()[..self.active]
                .iter()
                .position(|q| q.ready() && !q.is_valid(ram.mem()));
            if let Some(i) = bad {
                self.fail(format_args!(
                    "queue {i}: rings outside guest RAM or misaligned"
                ));
            }
        }
    }

    fn notify(&mut self, qi: u32, ram: &GuestRam) {
        if !self.running() {
            self.errors
                .note(format_args!("notification of queue {qi} while not running"));
            return;
        }
        let i = qi as usize;
        if i >= self.active {
            self.fail(format_args!(
                "notification of queue {qi}, which does not exist"
            ));
            return;
        }
        if !self.device.queues()[i].ready() {
            self.errors.note(format_args!(
                "notification of queue {qi}, which is not ready"
            ));
            return;
        }
        self.device.notified(i);
        let r = self.device.process(ram);
        self.after(r);
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::Queue;

    use super::*;

    /// A device with two queues and a 4-byte configuration, which records what the transport
    /// asks of it.
    struct Fake {
        queues: Vec<Queue>,
        config: [u8; 4],
        generation: u32,
        activated: Option<u64>,
        resets: u32,
        notified: Vec<usize>,
        /// What `process` returns, and how many calls of it are left with work.
        result: Result<bool, QueueError>,
        work: u32,
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                queues: (0..2).map(|_| Queue::new(16).unwrap()).collect(),
                config: [1, 2, 3, 4],
                generation: 0,
                activated: None,
                resets: 0,
                notified: Vec::new(),
                result: Ok(true),
                work: 0,
            }
        }
    }

    /// Offered: VERSION_1 and feature 3.
    const OFFERED: u64 = (1 << 32) | (1 << 3);

    impl VirtioDevice for Fake {
        const NAME: &'static str = "fake";
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            OFFERED
        }
        fn queues(&self) -> &[Queue] {
            &self.queues
        }
        fn queues_mut(&mut self) -> &mut [Queue] {
            &mut self.queues
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, d) in data.iter_mut().enumerate() {
                *d = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if offset == 0 && data.len() == 1 {
                self.config[0] = data[0];
            }
        }
        fn config_generation(&self) -> u32 {
            self.generation
        }
        fn activate(&mut self, features: u64) -> usize {
            self.activated = Some(features);
            2
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.work = 0;
        }
        fn notified(&mut self, queue: usize) {
            self.notified.push(queue);
        }
        fn process(&mut self, _: &GuestRam) -> Result<bool, QueueError> {
            self.work = self.work.saturating_sub(1);
            self.result.clone()
        }
        fn has_work(&self) -> bool {
            self.work > 0
        }
        fn errors(&self) -> u64 {
            0
        }
    }

    struct Drv {
        ram: GuestRam,
        t: MmioTransport<Fake>,
    }

    impl Drv {
        fn new() -> Self {
            let ram = GuestRam::new(4 << 20, false).unwrap();
            Drv {
                ram,
                t: MmioTransport::new(Fake::new()),
            }
        }
        fn w(&mut self, off: u64, v: u32) {
            self.t.write(off, &v.to_le_bytes(), &self.ram);
        }
        fn r(&mut self, off: u64) -> u32 {
            let mut d = [0u8; 4];
            self.t.read(off, &mut d);
            u32::from_le_bytes(d)
        }
        fn features(&mut self, lo: u32, hi: u32) {
            self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, lo);
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, hi);
            self.w(
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
        }
        /// Features 3 and VERSION_1, both queues of 8 at 0x10000.., DRIVER_OK.
        fn start(&mut self) {
            self.features(1 << 3, 1);
            for q in 0..2u32 {
                self.w(reg::QUEUE_SEL, q);
                self.w(reg::QUEUE_NUM, 8);
                self.w(reg::QUEUE_DESC_LOW, 0x10000 + q * 0x1000);
                self.w(reg::QUEUE_AVAIL_LOW, 0x10800 + q * 0x1000);
                self.w(reg::QUEUE_USED_LOW, 0x10c00 + q * 0x1000);
                self.w(reg::QUEUE_READY, 1);
            }
            self.w(reg::STATUS, 0xf);
        }
    }

    #[test]
    fn identity_and_features_are_read_in_halves() {
        let mut d = Drv::new();
        assert_eq!(d.r(reg::MAGIC_VALUE), b::MAGIC);
        assert_eq!(d.r(reg::VERSION), 2);
        assert_eq!(d.r(reg::DEVICE_ID), 42);
        d.w(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(d.r(reg::DEVICE_FEATURES), 1 << 3);
        assert_eq!(d.r(reg::DEVICE_FEATURES) & (1 << F_INDIRECT_DESC), 0);
        d.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.r(reg::DEVICE_FEATURES), 1);
        d.w(reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.r(reg::DEVICE_FEATURES), 0);
        // A short read gets the low bytes; a long one is zero-filled.
        let mut two = [0u8; 2];
        d.t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, b::MAGIC.to_le_bytes()[..2]);
        let mut eight = [0xffu8; 8];
        d.t.read(reg::VERSION, &mut eight);
        assert_eq!(eight, [2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn features_ok_sticks_only_for_a_subset_with_version_1() {
        let mut d = Drv::new();
        for (lo, hi, ok) in [
            (1 << 3, 1, true),
            (0, 1, true),
            (1 << 3, 0, false),               // no VERSION_1
            (1 << 4, 1, false),               // not offered
            (1 << F_INDIRECT_DESC, 1, false), // never offered
        ] {
            d.w(reg::STATUS, 0);
            d.features(lo, hi);
            assert_eq!(
                d.r(reg::STATUS) & status::FEATURES_OK != 0,
                ok,
                "{lo:#x} {hi:#x}"
            );
        }
        // Once FEATURES_OK is set, the driver's features are frozen.
        d.w(reg::STATUS, 0);
        d.features(1 << 3, 1);
        d.w(reg::DRIVER_FEATURES_SEL, 0);
        d.w(reg::DRIVER_FEATURES, 0);
        assert!(d.t.negotiated(3));
        assert!(!d.t.negotiated(F_INDIRECT_DESC));
    }

    #[test]
    fn driver_ok_activates_the_device_with_the_negotiated_features() {
        let mut d = Drv::new();
        d.start();
        assert!(!d.t.broken());
        assert_eq!(d.t.device().activated, Some(OFFERED));
        // Queue set-up is frozen after DRIVER_OK.
        d.w(reg::QUEUE_SEL, 0);
        d.w(reg::QUEUE_NUM, 4);
        assert_eq!(d.t.device().queues[0].size(), 8);
        // DRIVER_OK without FEATURES_OK is the error state.
        let mut d = Drv::new();
        d.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(d.t.broken());
        assert_eq!(d.t.device().activated, None);
    }

    #[test]
    fn bad_queue_set_ups_are_the_error_state_until_reset() {
        // A size that is not a power of two.
        let mut d = Drv::new();
        d.w(reg::QUEUE_SEL, 0);
        d.w(reg::QUEUE_NUM, 3);
        assert!(d.t.broken());
        assert_ne!(d.r(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        // NEEDS_RESET survives status writes other than 0.
        d.w(reg::STATUS, status::ACKNOWLEDGE);
        assert!(d.t.broken());
        let resets = d.t.device().resets;
        d.w(reg::STATUS, 0);
        assert!(!d.t.broken());
        assert_eq!(d.t.device().resets, resets + 1);
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
        // A queue that does not exist.
        d.w(reg::QUEUE_SEL, 5);
        assert_eq!(d.r(reg::QUEUE_NUM_MAX), 0);
        d.w(reg::QUEUE_NUM, 8);
        assert!(d.t.broken());
        // Rings outside RAM: refused at DRIVER_OK.
        let mut d = Drv::new();
        d.features(0, 1);
        d.w(reg::QUEUE_SEL, 1);
        d.w(reg::QUEUE_NUM, 8);
        d.w(reg::QUEUE_USED_HIGH, 1);
        d.w(reg::QUEUE_READY, 1);
        d.w(reg::STATUS, 0xf);
        assert!(d.t.broken());
    }

    #[test]
    fn notifications_reach_the_device_only_while_running() {
        let mut d = Drv::new();
        d.w(reg::QUEUE_NOTIFY, 0);
        assert!(d.t.device().notified.is_empty());
        assert_eq!(d.t.errors(), 1);
        d.start();
        d.w(reg::QUEUE_NOTIFY, 1);
        assert_eq!(d.t.device().notified, vec![1]);
        assert_eq!(d.r(reg::INTERRUPT_STATUS), INT_USED);
        d.w(reg::INTERRUPT_ACK, INT_USED);
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
        // Work left is resumed, one part per call, while running.
        d.t.device_mut().work = 2;
        assert!(d.t.has_work());
        d.t.resume(&d.ram);
        assert!(d.t.has_work());
        d.t.resume(&d.ram);
        assert!(!d.t.has_work());
        // A queue fault from the device is the error state, and stops the work.
        d.t.device_mut().result = Err(QueueError::UsedRing { queue: 0 });
        d.t.device_mut().work = 5;
        d.w(reg::QUEUE_NOTIFY, 0);
        assert!(d.t.broken());
        assert!(!d.t.has_work());
        d.t.with_device(|_| panic!("not called in the error state"));
        // A queue past those in use.
        let mut d = Drv::new();
        d.start();
        d.w(reg::QUEUE_NOTIFY, 2);
        assert!(d.t.broken());
    }

    #[test]
    fn a_configuration_change_raises_bit_1_until_acknowledged() {
        let mut d = Drv::new();
        d.start();
        assert_eq!(d.r(reg::CONFIG_GENERATION), 0);
        let mut c = [0u8; 4];
        d.t.read(reg::CONFIG, &mut c);
        assert_eq!(c, [1, 2, 3, 4]);
        d.t.device_mut().generation = 1;
        assert_eq!(d.r(reg::CONFIG_GENERATION), 1);
        assert_eq!(d.r(reg::INTERRUPT_STATUS), INT_CONFIG);
        d.w(reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
        // Config writes go to the device; odd-width register writes are counted and ignored.
        d.t.write(reg::CONFIG, &[9], &d.ram);
        assert_eq!(d.t.device().config[0], 9);
        let before = d.t.errors();
        d.t.write(reg::STATUS, &[0], &d.ram);
        assert_eq!(d.t.errors(), before + 1);
        assert!(!d.t.broken());
    }
}
