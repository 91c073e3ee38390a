//! The VMM side of the guest ABI (`docs/abi.md`): layout constants, the boot-info page and the
//! report-channel message. Plain data and byte parsing, testable without KVM.

use thiserror::Error;

/// Guest page size (4 KiB).
pub const PAGE_SIZE: u64 = 4096;

/// GDT page; the TSS sits at `TSS_ADDR` in the same page.
pub const GDT_ADDR: u64 = 0x1000;
/// 64-bit TSS.
pub const TSS_ADDR: u64 = 0x1800;
/// Boot info page.
pub const BOOT_INFO_ADDR: u64 = 0x2000;
/// PML4 (CR3).
pub const PML4_ADDR: u64 = 0x3000;
/// PDPT for the low identity map.
pub const PDPT_ADDR: u64 = 0x4000;
/// PD mapping 0..1 GiB with 2 MiB pages.
pub const PD0_ADDR: u64 = 0x5000;
/// Lowest address the kernel image may be loaded at.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
/// Highest address (exclusive) the kernel image may reach: the identity map's end.
pub const KERNEL_MAX_ADDR: u64 = 1 << 30;

/// Selectors of the GDT the VMM writes.
pub const SEL_KERNEL_CODE: u16 = 0x08;
pub const SEL_KERNEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x30;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Report channel port: a 4-byte OUT of the guest-physical address of a message.
pub const REPORT_PORT: u16 = 0x510;

/// Boot info magic.
pub const BOOT_MAGIC: u64 = 0x0031_304f_4f42_564d;
/// Message magic ("MVR1").
pub const MSG_MAGIC: u32 = 0x3152_564d;
/// Size of one message.
pub const MSG_SIZE: usize = 128;
/// Most phases a workload may have.
pub const MAX_PHASES: usize = 32;
/// Most bytes of spec text passed to the guest.
pub const MAX_SPEC_TEXT: usize = 1024;

/// Boot info field offsets.
pub mod boot {
    pub const MAGIC: u64 = 0x000;
    pub const MEM_BYTES: u64 = 0x008;
    pub const TSC_KHZ: u64 = 0x010;
    pub const WINDOW: u64 = 0x018;
    pub const NPHASES: u64 = 0x020;
    pub const FLAGS: u64 = 0x028;
    pub const SEED: u64 = 0x030;
    pub const SPEC_LEN: u64 = 0x038;
    pub const PHASES: u64 = 0x040;
    pub const PHASE_SIZE: u64 = 64;
    pub const SPEC_TEXT: u64 = 0x840;
}

/// Phase kinds in the boot info's phase table.
pub mod phase_kind {
    pub const ALLOC: u32 = 1;
    pub const FREE: u32 = 2;
    pub const TOUCH: u32 = 3;
    pub const IDLE: u32 = 4;
    pub const FAULT: u32 = 5;
}

/// Phase flags.
pub const PHASE_WRITE: u32 = 1;
pub const PHASE_RANDOM: u32 = 2;

/// One phase as the guest reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseEntry {
    pub kind: u32,
    pub flags: u32,
    pub pages: u64,
    pub duration_ns: u64,
    pub hot_pages: u64,
    pub hot_permille: u64,
}

impl PhaseEntry {
    /// The 64-byte encoding of the phase table entry.
    pub fn to_bytes(&self) -> [u8; boot::PHASE_SIZE as usize] {
        let mut b = [0u8; boot::PHASE_SIZE as usize];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.duration_ns.to_le_bytes());
        b[24..32].copy_from_slice(&self.hot_pages.to_le_bytes());
        b[32..40].copy_from_slice(&self.hot_permille.to_le_bytes());
        b
    }
}

/// Builds the boot info page.
pub fn boot_info_page(
    mem_bytes: u64,
    tsc_khz: u64,
    seed: u64,
    phases: &[PhaseEntry],
    spec_text: &str,
) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let put = |page: &mut Vec<u8>, off: u64, v: u64| {
        page[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes())
    };
    put(&mut page, boot::MAGIC, BOOT_MAGIC);
    put(&mut page, boot::MEM_BYTES, mem_bytes);
    put(&mut page, boot::TSC_KHZ, tsc_khz);
    put(&mut page, boot::WINDOW, 0);
    let n = phases.len().min(MAX_PHASES);
    put(&mut page, boot::NPHASES, n as u64);
    put(&mut page, boot::SEED, seed);
    for (i, p) in phases.iter().take(n).enumerate() {
        let off = (boot::PHASES + i as u64 * boot::PHASE_SIZE) as usize;
        page[off..off + boot::PHASE_SIZE as usize].copy_from_slice(&p.to_bytes());
    }
    let text = spec_text.as_bytes();
    let len = text.len().min(MAX_SPEC_TEXT);
    put(&mut page, boot::SPEC_LEN, len as u64);
    let off = boot::SPEC_TEXT as usize;
    page[off..off + len].copy_from_slice(&text[..len]);
    page
}

/// Message kinds on the report channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgKind {
    Boot,
    PhaseStart,
    PhaseEnd,
    Window,
    Sleep,
    Time,
    Done,
    Fault,
}

impl MsgKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Boot,
            2 => Self::PhaseStart,
            3 => Self::PhaseEnd,
            4 => Self::Window,
            5 => Self::Sleep,
            6 => Self::Time,
            7 => Self::Done,
            8 => Self::Fault,
            _ => return None,
        })
    }
}

/// Byte offset of the reply field, written by the VMM.
pub const MSG_REPLY_OFFSET: u64 = 0x60;

/// FAULT messages: an `arg0` at or above this is a guest kernel boot error, not a CPU exception.
pub const FAULT_BOOT_ERROR: u64 = 0x100;
/// Boot error: the boot-info magic was wrong (`arg1` = the magic found).
pub const BOOT_ERR_MAGIC: u64 = 0x101;
/// Boot error: the header of the app image embedded in the kernel is bad.
pub const BOOT_ERR_APP: u64 = 0x102;
/// Boot error: the kernel's reserved area does not fit in RAM below 1 GiB (`arg1` = its end).
pub const BOOT_ERR_NO_MEMORY: u64 = 0x103;
/// The guest's system call gate: the app executes `int3` (vector 3, a DPL-3 gate). SYSCALL does
/// not switch to ring 0 under this host's KVM (PVM), see `docs/abi.md`.
pub const SYSCALL_VECTOR: u8 = 3;

/// A decoded report-channel message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: MsgKind,
    pub phase: u64,
    pub window: u64,
    pub touched: u64,
    pub written: u64,
    pub iterations: u64,
    pub alloc_pages: u64,
    pub free_pages: u64,
    pub heap_pages: u64,
    pub args: [u64; 3],
    pub tsc: u64,
    /// Offset `0x70`: FAULT: CR2 at the exception.
    pub extra: u64,
    /// Offset `0x78`: FAULT: CS at the exception (`0x2b` the app, `0x08` the kernel).
    pub cs: u64,
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
    /// Decodes a 128-byte message.
    pub fn parse(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() != MSG_SIZE {
            return Err(MessageError::Size(b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let magic = u32_at(0);
        if magic != MSG_MAGIC {
            return Err(MessageError::Magic(magic));
        }
        let kind = MsgKind::from_u32(u32_at(4)).ok_or(MessageError::Kind(u32_at(4)))?;
        Ok(Message {
            kind,
            phase: u64_at(0x08),
            window: u64_at(0x10),
            touched: u64_at(0x18),
            written: u64_at(0x20),
            iterations: u64_at(0x28),
            alloc_pages: u64_at(0x30),
            free_pages: u64_at(0x38),
            heap_pages: u64_at(0x40),
            args: [u64_at(0x48), u64_at(0x50), u64_at(0x58)],
            tsc: u64_at(0x68),
            extra: u64_at(0x70),
            cs: u64_at(0x78),
        })
    }

    /// Encodes a message (used by tests and by synthetic exits).
    pub fn to_bytes(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        let kind = match self.kind {
            MsgKind::Boot => 1u32,
            MsgKind::PhaseStart => 2,
            MsgKind::PhaseEnd => 3,
            MsgKind::Window => 4,
            MsgKind::Sleep => 5,
            MsgKind::Time => 6,
            MsgKind::Done => 7,
            MsgKind::Fault => 8,
        };
        b[0..4].copy_from_slice(&MSG_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&kind.to_le_bytes());
        let fields = [
            (0x08, self.phase),
            (0x10, self.window),
            (0x18, self.touched),
            (0x20, self.written),
            (0x28, self.iterations),
            (0x30, self.alloc_pages),
            (0x38, self.free_pages),
            (0x40, self.heap_pages),
            (0x48, self.args[0]),
            (0x50, self.args[1]),
            (0x58, self.args[2]),
            (0x68, self.tsc),
            (0x70, self.extra),
            (0x78, self.cs),
        ];
        for (o, v) in fields {
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// A zeroed message of the given kind.
    pub fn new(kind: MsgKind) -> Self {
        Message {
            kind,
            phase: 0,
            window: 0,
            touched: 0,
            written: 0,
            iterations: 0,
            alloc_pages: 0,
            free_pages: 0,
            heap_pages: 0,
            args: [0; 3],
            tsc: 0,
            extra: 0,
            cs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips() {
        let mut m = Message::new(MsgKind::Window);
        m.window = 7;
        m.written = 123;
        m.args = [1, 2, 3];
        assert_eq!(Message::parse(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn garbage_messages_are_rejected() {
        assert_eq!(Message::parse(&[0u8; 12]), Err(MessageError::Size(12)));
        assert_eq!(
            Message::parse(&[0u8; MSG_SIZE]),
            Err(MessageError::Magic(0))
        );
        let mut b = Message::new(MsgKind::Done).to_bytes();
        b[4] = 99;
        assert_eq!(Message::parse(&b), Err(MessageError::Kind(99)));
    }

    #[test]
    fn boot_info_places_fields() {
        let p = PhaseEntry {
            kind: phase_kind::TOUCH,
            flags: PHASE_WRITE,
            pages: 10,
            ..Default::default()
        };
        let page = boot_info_page(1 << 28, 2_000_000, 5, &[p], "touch 40K write");
        let at = |o: u64| u64::from_le_bytes(page[o as usize..o as usize + 8].try_into().unwrap());
        assert_eq!(at(boot::MAGIC), BOOT_MAGIC);
        assert_eq!(at(boot::MEM_BYTES), 1 << 28);
        assert_eq!(at(boot::NPHASES), 1);
        assert_eq!(at(boot::PHASES + 8), 10);
        assert_eq!(at(boot::SPEC_LEN), 15);
        assert_eq!(&page[boot::SPEC_TEXT as usize..][..15], b"touch 40K write");
    }
}
