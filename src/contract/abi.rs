//! The guest ABI (`docs/abi.md`), VMM side: the boot-info page and the report-channel message.
//!
//! Defined once, in `guest/abi.h`: `build.rs` compiles `guest/abi_dump.c`, which prints every
//! constant and every structure layout of the header as Rust, and this module takes its constants
//! from that output. The structures here are `#[repr(C)]` mirrors of the C ones, with the same field
//! names, and a compile-time check (`check_layout!`) holds each field's offset, and each structure's
//! size, to the C compiler's. Guest bytes are read and written through vm-memory's `ByteValued`,
//! never at hand-written offsets.

use std::mem::{offset_of, size_of};

use thiserror::Error;
use vm_memory::ByteValued;

/// The header's constants and layouts, as the C compiler sees them (some are the guest's alone).
#[allow(dead_code)]
mod c {
    include!(concat!(env!("OUT_DIR"), "/abi_c.rs"));
}

use crate::units::PAGE_SIZE;
const _: () = assert!(
    c::ABI_PAGE_SIZE == PAGE_SIZE,
    "guest/abi.h and units disagree on the page size"
);
/// GDT page; the TSS sits at [`TSS_ADDR`] in the same page.
pub const GDT_ADDR: u64 = c::ABI_GDT_ADDR;
/// Descriptors in the GDT (the TSS takes two).
pub const GDT_ENTRIES: usize = c::ABI_GDT_ENTRIES as usize;
/// 64-bit TSS.
pub const TSS_ADDR: u64 = c::ABI_TSS_ADDR;
/// Bytes of the 64-bit TSS (its limit is one less).
pub const TSS_SIZE: u64 = c::ABI_TSS_SIZE;
/// Boot info page.
pub const BOOT_INFO_ADDR: u64 = c::ABI_BOOT_INFO_ADDR;
/// PML4 (CR3).
pub const PML4_ADDR: u64 = c::ABI_PML4_ADDR;
/// PDPT for the low identity map.
pub const PDPT_ADDR: u64 = c::ABI_PDPT_ADDR;
/// PD mapping 0..1 GiB with 2 MiB pages.
pub const PD0_ADDR: u64 = c::ABI_PD0_ADDR;
/// Lowest address the kernel image may be loaded at.
pub const KERNEL_MIN_ADDR: u64 = c::ABI_KERNEL_BASE;
/// Highest address (exclusive) the kernel image may reach: the identity map's end.
pub const KERNEL_MAX_ADDR: u64 = c::ABI_KERNEL_MAX_ADDR;
/// Largest RAM the built-in guest's kernel boots with (its reserved area must fit below 1 GiB).
pub const MAX_MEM_BYTES: u64 = c::ABI_MAX_MEM_BYTES;

/// Selectors of the GDT the VMM writes (index × 8, RPL in the low bits).
pub const SEL_KERNEL_CODE: u16 = c::ABI_SEL_KCODE as u16;
pub const SEL_KERNEL_DATA: u16 = c::ABI_SEL_KDATA as u16;
pub const SEL_USER_CODE: u16 = c::ABI_SEL_UCODE as u16;
pub const SEL_TSS: u16 = c::ABI_SEL_TSS as u16;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = c::ABI_COM1 as u16;
/// Report channel port: a 4-byte OUT of the guest-physical address of a message.
pub const REPORT_PORT: u16 = c::ABI_REPORT_PORT as u16;

/// Boot info magic.
pub const BOOT_MAGIC: u64 = c::ABI_BOOT_MAGIC;
/// Message magic ("MVR1").
pub const MSG_MAGIC: u32 = c::ABI_MSG_MAGIC as u32;
/// Size of one message.
pub const MSG_SIZE: usize = c::ABI_MSG_SIZE as usize;
/// Most phases a workload may have.
pub const MAX_PHASES: usize = c::ABI_MAX_PHASES as usize;
/// Most bytes of spec text passed to the guest.
pub const MAX_SPEC_TEXT: usize = c::ABI_MAX_SPEC_TEXT as usize;
/// Most bytes of the kernel command line in the boot info.
pub const MAX_CMDLINE: usize = c::ABI_MAX_CMDLINE as usize;

/// The virtio-balloon device over virtio-mmio (version 2 registers): where it is, its registers,
/// and the balloon's feature bits, config fields and statistics tags (`guest/abi.h`).
pub mod balloon {
    use super::c;
    /// Guest-physical base of the device's registers (just above the largest built-in guest RAM).
    pub const MMIO_BASE: u64 = c::ABI_BALLOON_MMIO_BASE;
    pub const MMIO_SIZE: u64 = c::ABI_BALLOON_MMIO_SIZE;
    /// QueueNumMax of every queue.
    pub const QUEUE_MAX: u16 = c::ABI_BALLOON_QUEUE_MAX as u16;
    /// PFNs one inflate or deflate descriptor may carry.
    pub const MAX_PFNS: u64 = c::ABI_BALLOON_MAX_PFNS;
    pub const MAGIC: u32 = c::VIRTIO_MMIO_MAGIC as u32;
    pub const DEVICE_ID: u32 = c::VIRTIO_ID_BALLOON as u32;
    /// Register offsets.
    pub mod reg {
        use super::c;
        pub const MAGIC_VALUE: u64 = c::VIRTIO_MMIO_MAGIC_VALUE;
        pub const VERSION: u64 = c::VIRTIO_MMIO_VERSION;
        pub const DEVICE_ID: u64 = c::VIRTIO_MMIO_DEVICE_ID;
        pub const VENDOR_ID: u64 = c::VIRTIO_MMIO_VENDOR_ID;
        pub const DEVICE_FEATURES: u64 = c::VIRTIO_MMIO_DEVICE_FEATURES;
        pub const DEVICE_FEATURES_SEL: u64 = c::VIRTIO_MMIO_DEVICE_FEATURES_SEL;
        pub const DRIVER_FEATURES: u64 = c::VIRTIO_MMIO_DRIVER_FEATURES;
        pub const DRIVER_FEATURES_SEL: u64 = c::VIRTIO_MMIO_DRIVER_FEATURES_SEL;
        pub const QUEUE_SEL: u64 = c::VIRTIO_MMIO_QUEUE_SEL;
        pub const QUEUE_NUM_MAX: u64 = c::VIRTIO_MMIO_QUEUE_NUM_MAX;
        pub const QUEUE_NUM: u64 = c::VIRTIO_MMIO_QUEUE_NUM;
        pub const QUEUE_READY: u64 = c::VIRTIO_MMIO_QUEUE_READY;
        pub const QUEUE_NOTIFY: u64 = c::VIRTIO_MMIO_QUEUE_NOTIFY;
        pub const INTERRUPT_STATUS: u64 = c::VIRTIO_MMIO_INTERRUPT_STATUS;
        pub const INTERRUPT_ACK: u64 = c::VIRTIO_MMIO_INTERRUPT_ACK;
        pub const STATUS: u64 = c::VIRTIO_MMIO_STATUS;
        pub const QUEUE_DESC_LOW: u64 = c::VIRTIO_MMIO_QUEUE_DESC_LOW;
        pub const QUEUE_DESC_HIGH: u64 = c::VIRTIO_MMIO_QUEUE_DESC_HIGH;
        pub const QUEUE_AVAIL_LOW: u64 = c::VIRTIO_MMIO_QUEUE_AVAIL_LOW;
        pub const QUEUE_AVAIL_HIGH: u64 = c::VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
        pub const QUEUE_USED_LOW: u64 = c::VIRTIO_MMIO_QUEUE_USED_LOW;
        pub const QUEUE_USED_HIGH: u64 = c::VIRTIO_MMIO_QUEUE_USED_HIGH;
        pub const CONFIG_GENERATION: u64 = c::VIRTIO_MMIO_CONFIG_GENERATION;
        pub const CONFIG: u64 = c::VIRTIO_MMIO_CONFIG;
    }
    /// Device status bits.
    pub mod status {
        use super::c;
        pub const ACKNOWLEDGE: u32 = c::VIRTIO_STATUS_ACKNOWLEDGE as u32;
        pub const DRIVER: u32 = c::VIRTIO_STATUS_DRIVER as u32;
        pub const DRIVER_OK: u32 = c::VIRTIO_STATUS_DRIVER_OK as u32;
        pub const FEATURES_OK: u32 = c::VIRTIO_STATUS_FEATURES_OK as u32;
        pub const NEEDS_RESET: u32 = c::VIRTIO_STATUS_NEEDS_RESET as u32;
        pub const FAILED: u32 = c::VIRTIO_STATUS_FAILED as u32;
    }
    /// Feature bit numbers.
    pub const F_VERSION_1: u32 = c::VIRTIO_F_VERSION_1 as u32;
    pub const F_STATS_VQ: u32 = c::VIRTIO_BALLOON_F_STATS_VQ as u32;
    pub const F_DEFLATE_ON_OOM: u32 = c::VIRTIO_BALLOON_F_DEFLATE_ON_OOM as u32;
    pub const F_REPORTING: u32 = c::VIRTIO_BALLOON_F_REPORTING as u32;
    /// Config space offsets (from [`reg::CONFIG`]).
    pub const CFG_NUM_PAGES: u64 = c::VIRTIO_BALLOON_CFG_NUM_PAGES;
    pub const CFG_ACTUAL: u64 = c::VIRTIO_BALLOON_CFG_ACTUAL;
    /// Statistics tags.
    pub const S_MEMFREE: u16 = c::VIRTIO_BALLOON_S_MEMFREE as u16;
    pub const S_MEMTOT: u16 = c::VIRTIO_BALLOON_S_MEMTOT as u16;
    pub const S_AVAIL: u16 = c::VIRTIO_BALLOON_S_AVAIL as u16;
    /// Bytes of one statistics entry (le16 tag, le64 value, packed).
    pub const STAT_SIZE: u64 = c::VIRTIO_BALLOON_STAT_SIZE;

    // The header's virtio numbers are the standard's, as virtio-bindings has them.
    const _: () = {
        use virtio_bindings::{virtio_config as vc, virtio_ids, virtio_mmio as vm, virtio_ring};
        let regs = [
            (reg::MAGIC_VALUE, vm::VIRTIO_MMIO_MAGIC_VALUE),
            (reg::VERSION, vm::VIRTIO_MMIO_VERSION),
            (reg::DEVICE_ID, vm::VIRTIO_MMIO_DEVICE_ID),
            (reg::VENDOR_ID, vm::VIRTIO_MMIO_VENDOR_ID),
            (reg::DEVICE_FEATURES, vm::VIRTIO_MMIO_DEVICE_FEATURES),
            (
                reg::DEVICE_FEATURES_SEL,
                vm::VIRTIO_MMIO_DEVICE_FEATURES_SEL,
            ),
            (reg::DRIVER_FEATURES, vm::VIRTIO_MMIO_DRIVER_FEATURES),
            (
                reg::DRIVER_FEATURES_SEL,
                vm::VIRTIO_MMIO_DRIVER_FEATURES_SEL,
            ),
            (reg::QUEUE_SEL, vm::VIRTIO_MMIO_QUEUE_SEL),
            (reg::QUEUE_NUM_MAX, vm::VIRTIO_MMIO_QUEUE_NUM_MAX),
            (reg::QUEUE_NUM, vm::VIRTIO_MMIO_QUEUE_NUM),
            (reg::QUEUE_READY, vm::VIRTIO_MMIO_QUEUE_READY),
            (reg::QUEUE_NOTIFY, vm::VIRTIO_MMIO_QUEUE_NOTIFY),
            (reg::INTERRUPT_STATUS, vm::VIRTIO_MMIO_INTERRUPT_STATUS),
            (reg::INTERRUPT_ACK, vm::VIRTIO_MMIO_INTERRUPT_ACK),
            (reg::STATUS, vm::VIRTIO_MMIO_STATUS),
            (reg::QUEUE_DESC_LOW, vm::VIRTIO_MMIO_QUEUE_DESC_LOW),
            (reg::QUEUE_DESC_HIGH, vm::VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (reg::QUEUE_AVAIL_LOW, vm::VIRTIO_MMIO_QUEUE_AVAIL_LOW),
            (reg::QUEUE_AVAIL_HIGH, vm::VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (reg::QUEUE_USED_LOW, vm::VIRTIO_MMIO_QUEUE_USED_LOW),
            (reg::QUEUE_USED_HIGH, vm::VIRTIO_MMIO_QUEUE_USED_HIGH),
            (reg::CONFIG_GENERATION, vm::VIRTIO_MMIO_CONFIG_GENERATION),
            (reg::CONFIG, vm::VIRTIO_MMIO_CONFIG),
            (status::ACKNOWLEDGE as u64, vc::VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (status::DRIVER as u64, vc::VIRTIO_CONFIG_S_DRIVER),
            (status::DRIVER_OK as u64, vc::VIRTIO_CONFIG_S_DRIVER_OK),
            (status::FEATURES_OK as u64, vc::VIRTIO_CONFIG_S_FEATURES_OK),
            (status::NEEDS_RESET as u64, vc::VIRTIO_CONFIG_S_NEEDS_RESET),
            (status::FAILED as u64, vc::VIRTIO_CONFIG_S_FAILED),
            (F_VERSION_1 as u64, vc::VIRTIO_F_VERSION_1),
            (DEVICE_ID as u64, virtio_ids::VIRTIO_ID_BALLOON),
            (c::VIRTQ_DESC_F_NEXT, virtio_ring::VRING_DESC_F_NEXT),
            (c::VIRTQ_DESC_F_WRITE, virtio_ring::VRING_DESC_F_WRITE),
        ];
        let mut i = 0;
        while i < regs.len() {
            assert!(regs[i].0 == regs[i].1 as u64);
            i += 1;
        }
    };
}

/// Phase kinds in the boot info's phase table.
pub mod phase_kind {
    use super::c;
    pub const ALLOC: u32 = c::PHASE_ALLOC as u32;
    pub const FREE: u32 = c::PHASE_FREE as u32;
    pub const TOUCH: u32 = c::PHASE_TOUCH as u32;
    pub const IDLE: u32 = c::PHASE_IDLE as u32;
    pub const FAULT: u32 = c::PHASE_FAULT as u32;
    pub const CHECK: u32 = c::PHASE_CHECK as u32;
}

/// Phase flags.
pub const PHASE_WRITE: u32 = c::PHASE_F_WRITE as u32;
pub const PHASE_RANDOM: u32 = c::PHASE_F_RANDOM as u32;
/// Phase flag: reads and writes in turn, access by access.
pub const PHASE_MIXED: u32 = c::PHASE_F_MIXED as u32;
/// Phase flag: check every access against what the app wrote (see the workload spec).
pub const PHASE_VERIFY: u32 = c::PHASE_F_VERIFY as u32;
/// Phase flag: writes put the same content in every page (derived from the guest's seed).
pub const PHASE_FILL_SAME: u32 = c::PHASE_F_FILL_SAME as u32;
/// Phase flag: writes make the page all zero.
pub const PHASE_FILL_ZERO: u32 = c::PHASE_F_FILL_ZERO as u32;

/// PHASE_END status (`arg1`): the phase ran.
pub const PHASE_OK: u64 = c::PHASE_OK;
/// PHASE_END status: the guest ran out of memory; the workload ends.
pub const PHASE_OOM: u64 = c::PHASE_OOM;
/// PHASE_END status: a `verify` phase found pages whose contents changed (`arg2` = how many).
pub const PHASE_CORRUPT: u64 = c::PHASE_CORRUPT;

/// FAULT messages: an `arg0` at or above this is a guest kernel boot error, not a CPU exception.
pub const FAULT_BOOT_ERROR: u64 = c::FAULT_BOOT_ERROR;
/// Boot error: the boot-info magic was wrong (`arg1` = the magic found).
pub const BOOT_ERR_MAGIC: u64 = c::BOOT_ERR_MAGIC;
/// Boot error: the header of the app image embedded in the kernel is bad.
pub const BOOT_ERR_APP: u64 = c::BOOT_ERR_APP;
/// Boot error: the kernel's reserved area does not fit in RAM below 1 GiB (`arg1` = its end).
pub const BOOT_ERR_NO_MEMORY: u64 = c::BOOT_ERR_NO_MEMORY;
/// Boot error: RAM is above [`MAX_MEM_BYTES`] (`arg1` = the RAM size).
pub const BOOT_ERR_TOO_LARGE: u64 = c::BOOT_ERR_TOO_LARGE;

/// One phase as the guest reads it (`struct phase`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseEntry {
    pub kind: u32,
    pub flags: u32,
    pub pages: u64,
    pub duration_ns: u64,
    pub hot_pages: u64,
    pub hot_permille: u64,
    pub reserved: [u64; 3],
}

/// The boot-info page (`struct boot_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub magic: u64,
    pub mem_bytes: u64,
    pub tsc_khz: u64,
    /// The current interval number; the VMM bumps it at every interval tick.
    pub interval: u64,
    pub nphases: u64,
    pub flags: u64,
    pub seed: u64,
    pub spec_len: u64,
    pub phases: [PhaseEntry; MAX_PHASES],
    pub spec: [u8; MAX_SPEC_TEXT],
    pub cmdline_len: u64,
    /// Kernel command line (`virtio_mmio.device=...`), not NUL-terminated.
    pub cmdline: [u8; MAX_CMDLINE],
}

/// A report-channel message (`struct msg`), as the guest wrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub magic: u32,
    pub kind: u32,
    pub phase: u64,
    /// The interval the numbers refer to.
    pub interval: u64,
    pub touched: u64,
    pub written: u64,
    pub iterations: u64,
    pub alloc_pages: u64,
    pub free_pages: u64,
    pub heap_pages: u64,
    pub arg0: u64,
    pub arg1: u64,
    pub arg2: u64,
    /// Written by the VMM (SLEEP, TIME).
    pub reply: u64,
    pub tsc: u64,
    /// FAULT: CR2 at the exception.
    pub cr2: u64,
    /// FAULT: CS at the exception (`0x2b` the app, `0x08` the kernel).
    pub cs: u64,
}

// SAFETY: plain `repr(C)` integers and arrays of them, with no padding (the layout checks below
// hold every offset and size to the C compiler's, which has none either): every bit pattern is a
// valid value.
unsafe impl ByteValued for PhaseEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BootInfo {}
// SAFETY: as above.
unsafe impl ByteValued for Message {}

/// Holds a Rust mirror's size and each named field's offset to the C compiler's, at compile time.
macro_rules! check_layout {
    ($ty:ty, $c:ident, [$($field:ident),* $(,)?]) => {
        const _: () = {
            assert!(size_of::<$ty>() == c::$c::SIZE);
            $(assert!(offset_of!($ty, $field) == c::$c::$field);)*
        };
    };
}

check_layout!(
    PhaseEntry,
    phase,
    [
        kind,
        flags,
        pages,
        duration_ns,
        hot_pages,
        hot_permille,
        reserved
    ]
);
check_layout!(
    BootInfo,
    boot_info,
    [
        magic,
        mem_bytes,
        tsc_khz,
        interval,
        nphases,
        flags,
        seed,
        spec_len,
        phases,
        spec,
        cmdline_len,
        cmdline
    ]
);
check_layout!(
    Message,
    msg,
    [
        magic,
        kind,
        phase,
        interval,
        touched,
        written,
        iterations,
        alloc_pages,
        free_pages,
        heap_pages,
        arg0,
        arg1,
        arg2,
        reply,
        tsc,
        cr2,
        cs
    ]
);
const _: () = assert!(size_of::<Message>() == MSG_SIZE);

/// Guest-physical address of the boot info's `interval` field, which the VMM bumps.
pub const BOOT_INFO_INTERVAL_ADDR: u64 = BOOT_INFO_ADDR + offset_of!(BootInfo, interval) as u64;
/// Byte offset of a message's `reply` field, written by the VMM.
pub const MSG_REPLY_OFFSET: u64 = offset_of!(Message, reply) as u64;

impl BootInfo {
    /// The boot info for a guest: at most [`MAX_PHASES`] phases and [`MAX_SPEC_TEXT`] bytes of text.
    pub fn new(
        mem_bytes: u64,
        tsc_khz: u64,
        seed: u64,
        phases: &[PhaseEntry],
        spec_text: &str,
        cmdline: &str,
    ) -> Self {
        let mut info = BootInfo {
            magic: BOOT_MAGIC,
            mem_bytes,
            tsc_khz,
            interval: 0,
            nphases: 0,
            flags: 0,
            seed,
            spec_len: 0,
            phases: [PhaseEntry::default(); MAX_PHASES],
            spec: [0; MAX_SPEC_TEXT],
            cmdline_len: 0,
            cmdline: [0; MAX_CMDLINE],
        };
        let line = cmdline.as_bytes();
        let len = line.len().min(MAX_CMDLINE);
        info.cmdline[..len].copy_from_slice(&line[..len]);
        info.cmdline_len = len as u64;
        let n = phases.len().min(MAX_PHASES);
        info.phases[..n].copy_from_slice(&phases[..n]);
        info.nphases = n as u64;
        let text = spec_text.as_bytes();
        let len = text.len().min(MAX_SPEC_TEXT);
        info.spec[..len].copy_from_slice(&text[..len]);
        info.spec_len = len as u64;
        info
    }
}

/// Message kinds on the report channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgKind {
    Boot,
    PhaseStart,
    PhaseEnd,
    Interval,
    Sleep,
    Time,
    Done,
    Fault,
}

const KINDS: [(MsgKind, u64); 8] = [
    (MsgKind::Boot, c::MSG_BOOT),
    (MsgKind::PhaseStart, c::MSG_PHASE_START),
    (MsgKind::PhaseEnd, c::MSG_PHASE_END),
    (MsgKind::Interval, c::MSG_INTERVAL),
    (MsgKind::Sleep, c::MSG_SLEEP),
    (MsgKind::Time, c::MSG_TIME),
    (MsgKind::Done, c::MSG_DONE),
    (MsgKind::Fault, c::MSG_FAULT),
];

impl MsgKind {
    /// The kind's number on the wire.
    pub fn code(self) -> u32 {
        KINDS
            .iter()
            .find(|(k, _)| *k == self)
            .map_or(0, |(_, v)| *v as u32)
    }

    fn from_code(v: u32) -> Option<Self> {
        KINDS
            .iter()
            .find(|(_, c)| *c == u64::from(v))
            .map(|(k, _)| *k)
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message is {0} bytes, expected {MSG_SIZE}")]
    Size(usize),
    #[error("bad message magic {0:#x}")]
    Magic(u32),
    #[error("unknown message kind {0}")]
    Kind(u32),
}

impl Message {
    /// A zeroed message of the given kind, with the magic set.
    pub fn new(kind: MsgKind) -> Self {
        Message {
            magic: MSG_MAGIC,
            kind: kind.code(),
            ..Default::default()
        }
    }

    /// Checks the magic and decodes the kind.
    pub fn decode_kind(&self) -> Result<MsgKind, MessageError> {
        if self.magic != MSG_MAGIC {
            return Err(MessageError::Magic(self.magic));
        }
        MsgKind::from_code(self.kind).ok_or(MessageError::Kind(self.kind))
    }

    /// A message from exactly [`MSG_SIZE`] bytes, checked.
    pub fn parse(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() != MSG_SIZE {
            return Err(MessageError::Size(b.len()));
        }
        let mut m = Message::default();
        m.as_mut_slice().copy_from_slice(b);
        m.decode_kind()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips() {
        let mut m = Message::new(MsgKind::Interval);
        m.interval = 7;
        m.written = 123;
        m.arg0 = 1;
        m.cs = 0x2b;
        assert_eq!(Message::parse(m.as_slice()).unwrap(), m);
        assert_eq!(m.decode_kind(), Ok(MsgKind::Interval));
    }

    #[test]
    fn every_kind_round_trips_through_its_code() {
        for (k, code) in KINDS {
            assert_eq!(k.code() as u64, code);
            assert_eq!(Message::new(k).decode_kind(), Ok(k));
        }
    }

    #[test]
    fn garbage_messages_are_rejected() {
        assert_eq!(Message::parse(&[0u8; 12]), Err(MessageError::Size(12)));
        assert_eq!(
            Message::parse(&[0u8; MSG_SIZE]),
            Err(MessageError::Magic(0))
        );
        let mut m = Message::new(MsgKind::Done);
        m.kind = 99;
        assert_eq!(Message::parse(m.as_slice()), Err(MessageError::Kind(99)));
    }

    fn at_cmd(info: &BootInfo) -> (u64, Vec<u8>) {
        let page = info.as_slice();
        let len = u64::from_le_bytes(page[c::boot_info::cmdline_len..][..8].try_into().unwrap());
        (len, page[c::boot_info::cmdline..][..len as usize].to_vec())
    }

    #[test]
    fn boot_info_places_fields_and_bounds_its_tables() {
        let p = PhaseEntry {
            kind: phase_kind::TOUCH,
            flags: PHASE_WRITE,
            pages: 10,
            ..Default::default()
        };
        let info = BootInfo::new(1 << 28, 2_000_000, 5, &[p], "touch 40K write", "x=1");
        assert_eq!(at_cmd(&info), (3, b"x=1".to_vec()));
        let page = info.as_slice();
        let at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap());
        assert_eq!(at(c::boot_info::magic), BOOT_MAGIC);
        assert_eq!(at(c::boot_info::mem_bytes), 1 << 28);
        assert_eq!(at(c::boot_info::nphases), 1);
        assert_eq!(at(c::boot_info::phases + c::phase::pages), 10);
        assert_eq!(at(c::boot_info::spec_len), 15);
        assert_eq!(&page[c::boot_info::spec..][..15], b"touch 40K write");
        // Too many phases and too much text are cut to what the page holds.
        let many = vec![p; MAX_PHASES + 3];
        let long = "x".repeat(MAX_SPEC_TEXT + 10);
        let info = BootInfo::new(1 << 28, 1, 1, &many, &long, &long);
        assert_eq!(info.cmdline_len, MAX_CMDLINE as u64);
        assert_eq!(info.nphases, MAX_PHASES as u64);
        assert_eq!(info.spec_len, MAX_SPEC_TEXT as u64);
        assert!(size_of::<BootInfo>() as u64 <= PAGE_SIZE);
    }
}
