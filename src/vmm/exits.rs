//! Exit dispatch: what each VM exit means, apart from `KVM_RUN` (in `vcpu`) so that unit tests can
//! feed it synthetic exits. Port I/O goes to the devices, which this handler owns; a report-channel
//! write is read from guest memory and decoded into a [`Message`] for the protocol. MMIO in the
//! balloon's register page goes to the virtio-balloon device (handled here, on the vCPU thread).

use std::io::Write;

use thiserror::Error;

use crate::contract::abi::{self, Message, MsgKind};
use crate::devices::{BalloonMmio, Console, ReportChannel};
use crate::kvm::vcpu::Exit;
use crate::memory::GuestRam;

/// What the run loop does next.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Run the guest again.
    Continue,
    /// The run loop was kicked (an interval tick, a deadline or a stop): look at the clock.
    Kicked,
    /// A decoded report-channel message, at a guest-physical address.
    Report {
        msg: Message,
        kind: MsgKind,
        addr: u64,
    },
    /// The guest halted.
    Halted,
}

/// Exits that end the run.
#[derive(Debug, Error, PartialEq)]
pub enum ExitError {
    #[error("the guest triple-faulted (KVM shutdown exit)")]
    TripleFault,
    #[error("VM entry failed (hardware reason {0:#x})")]
    EntryFailed(u64),
    #[error("KVM internal error (emulation failure?)")]
    Internal,
    #[error("unexpected VM exit: {0}")]
    Unexpected(String),
}

/// Port and MMIO dispatch; owns the devices.
pub struct ExitHandler {
    pub console: Console,
    pub report: ReportChannel,
    /// The virtio-balloon at [`abi::balloon::MMIO_BASE`], when the guest has one.
    pub balloon: Option<BalloonMmio>,
    /// Accesses to ports or MMIO nobody handles.
    pub unhandled: u64,
}

impl ExitHandler {
    /// Devices for a guest with `ram_bytes` of RAM.
    pub fn new(
        ram_bytes: u64,
        console: Box<dyn Write + Send>,
        balloon: Option<BalloonMmio>,
    ) -> Self {
        ExitHandler {
            console: Console::new(console),
            report: ReportChannel::new(ram_bytes),
            balloon,
            unhandled: 0,
        }
    }

    /// The balloon and its register offset for an MMIO access at `addr`, when it has one there.
    fn balloon_at(&mut self, addr: u64) -> Option<(&mut BalloonMmio, u64)> {
        let off = addr
            .checked_sub(abi::balloon::MMIO_BASE)
            .filter(|&off| off < abi::balloon::MMIO_SIZE)?;
        self.balloon.as_mut().map(|b| (b, off))
    }

    fn note_unhandled(&mut self, what: impl FnOnce() -> String) {
        self.unhandled += 1;
        if self.unhandled <= 5 {
            log::warn!("unhandled guest access: {}", what());
        }
    }

    /// Handles one exit. Never panics on guest input: garbage is counted and logged.
    pub fn handle(&mut self, exit: Exit<'_>, ram: &GuestRam) -> Result<Action, ExitError> {
        let serial = abi::SERIAL_PORT_BASE..abi::SERIAL_PORT_BASE + 8;
        Ok(match exit {
            Exit::IoOut { port, data } if serial.contains(&port) => {
                self.console
                    .write((port - abi::SERIAL_PORT_BASE) as u8, data);
                Action::Continue
            }
            Exit::IoIn { port, data } if serial.contains(&port) => {
                self.console
                    .read((port - abi::SERIAL_PORT_BASE) as u8, data);
                Action::Continue
            }
            Exit::IoOut { port, data } if port == abi::REPORT_PORT => self.report_write(data, ram),
            Exit::IoIn { port, data } if port == abi::REPORT_PORT => {
                self.report.read(0, data);
                Action::Continue
            }
            Exit::IoOut { port, data } => {
                self.note_unhandled(|| format!("out to port {port:#x} ({} bytes)", data.len()));
                Action::Continue
            }
            Exit::IoIn { port, data } => {
                data.fill(0xff);
                self.note_unhandled(|| format!("in from port {port:#x}"));
                Action::Continue
            }
            Exit::MmioRead { addr, data } => {
                if let Some((b, off)) = self.balloon_at(addr) {
                    b.read(off, data);
                } else {
                    data.fill(0xff);
                    self.note_unhandled(|| format!("MMIO read at {addr:#x}"));
                }
                Action::Continue
            }
            Exit::MmioWrite { addr, data } => {
                if let Some((b, off)) = self.balloon_at(addr) {
                    b.write(off, data, ram);
                } else {
                    self.note_unhandled(|| {
                        format!("MMIO write at {addr:#x} ({} bytes)", data.len())
                    });
                }
                Action::Continue
            }
            Exit::Hlt => Action::Halted,
            Exit::Interrupted => {
                if let Some(b) = &mut self.balloon {
                    b.resume(ram);
                }
                Action::Kicked
            }
            Exit::Shutdown => return Err(ExitError::TripleFault),
            Exit::FailEntry(r) => return Err(ExitError::EntryFailed(r)),
            Exit::InternalError => return Err(ExitError::Internal),
            Exit::Other(s) => return Err(ExitError::Unexpected(s)),
        })
    }

    fn report_write(&mut self, data: &[u8], ram: &GuestRam) -> Action {
        let Ok(addr) = self.report.write(0, data) else {
            return Action::Continue;
        };
        let msg: Message = match ram.read_obj(addr) {
            Ok(m) => m,
            Err(e) => {
                self.report.note_error(e.to_string());
                return Action::Continue;
            }
        };
        match msg.decode_kind() {
            Ok(kind) => Action::Report { msg, kind, addr },
            Err(e) => {
                self.report.note_error(format!("message at {addr:#x}: {e}"));
                Action::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::ByteValued;

    use super::*;
    use crate::devices::Balloon;

    fn ram() -> GuestRam {
        GuestRam::new(8 << 20, false).unwrap()
    }

    fn handler() -> ExitHandler {
        ExitHandler::new(8 << 20, Box::new(std::io::sink()), None)
    }

    fn out(h: &mut ExitHandler, ram: &GuestRam, port: u16, data: &[u8]) -> Action {
        h.handle(Exit::IoOut { port, data }, ram).unwrap()
    }

    #[test]
    fn report_exit_decodes_the_message_in_guest_memory() {
        let ram = ram();
        let mut msg = Message::new(MsgKind::Interval);
        msg.interval = 3;
        msg.written = 42;
        ram.write(0x7000, msg.as_slice()).unwrap();
        let mut h = handler();
        let a = out(&mut h, &ram, abi::REPORT_PORT, &0x7000u32.to_le_bytes());
        assert_eq!(
            a,
            Action::Report {
                msg,
                kind: MsgKind::Interval,
                addr: 0x7000
            }
        );
        assert_eq!(h.report.errors, 0);
    }

    #[test]
    fn garbage_on_the_report_channel_is_counted_not_fatal() {
        let ram = ram();
        let mut h = handler();
        let mut bad_kind = Message::new(MsgKind::Done);
        bad_kind.kind = 77;
        ram.write(0xa000, bad_kind.as_slice()).unwrap();
        // Wrong width, address outside RAM, a message with a bad magic, one of an unknown kind.
        let junk = [
            vec![1u8],
            (64u32 << 20).to_le_bytes().to_vec(),
            0x9000u32.to_le_bytes().to_vec(),
            0xa000u32.to_le_bytes().to_vec(),
        ];
        for data in &junk {
            assert_eq!(out(&mut h, &ram, abi::REPORT_PORT, data), Action::Continue);
        }
        assert_eq!(h.report.errors, 4);
        let first = h.report.first_error.as_deref().unwrap();
        assert!(first.contains("1 bytes, expected 4"), "{first}");
    }

    #[test]
    fn unknown_ports_and_mmio_read_all_ones_and_continue() {
        let ram = ram();
        let mut h = handler();
        let mut data = [0u8; 4];
        let a = h.handle(
            Exit::IoIn {
                port: 0x80,
                data: &mut data,
            },
            &ram,
        );
        assert_eq!(a, Ok(Action::Continue));
        assert_eq!(data, [0xff; 4]);
        let mut m = [0u8; 8];
        let a = h.handle(
            Exit::MmioRead {
                addr: 0xfee0_0000,
                data: &mut m,
            },
            &ram,
        );
        assert_eq!(a, Ok(Action::Continue));
        assert_eq!(m, [0xff; 8]);
        let a = h.handle(
            Exit::MmioWrite {
                addr: 0xfee0_0000,
                data: &[1, 2],
            },
            &ram,
        );
        assert_eq!(a, Ok(Action::Continue));
        assert_eq!(h.unhandled, 3);
    }

    #[test]
    fn mmio_in_the_balloon_page_goes_to_the_balloon() {
        let ram = ram();
        let dev = BalloonMmio::new(Balloon::new(ram.pages(), true, 7, false));
        let mut h = ExitHandler::new(8 << 20, Box::new(std::io::sink()), Some(dev));
        let base = abi::balloon::MMIO_BASE;
        let mut m = [0u8; 4];
        let a = h.handle(
            Exit::MmioRead {
                addr: base,
                data: &mut m,
            },
            &ram,
        );
        assert_eq!(a, Ok(Action::Continue));
        assert_eq!(u32::from_le_bytes(m), abi::balloon::MAGIC);
        let cfg = base + abi::balloon::reg::CONFIG + abi::balloon::CFG_NUM_PAGES;
        h.handle(
            Exit::MmioRead {
                addr: cfg,
                data: &mut m,
            },
            &ram,
        )
        .unwrap();
        assert_eq!(u32::from_le_bytes(m), 7);
        let status = base + abi::balloon::reg::STATUS;
        h.handle(
            Exit::MmioWrite {
                addr: status,
                data: &1u32.to_le_bytes(),
            },
            &ram,
        )
        .unwrap();
        h.handle(
            Exit::MmioRead {
                addr: status,
                data: &mut m,
            },
            &ram,
        )
        .unwrap();
        assert_eq!(u32::from_le_bytes(m), 1);
        assert_eq!(h.unhandled, 0);
        // Past the page: unhandled, all ones.
        let past = base + abi::balloon::MMIO_SIZE;
        h.handle(
            Exit::MmioRead {
                addr: past,
                data: &mut m,
            },
            &ram,
        )
        .unwrap();
        assert_eq!((m, h.unhandled), ([0xff; 4], 1));
    }

    #[test]
    fn stop_exits_end_the_run_or_hand_back_control() {
        let ram = ram();
        let mut h = handler();
        assert_eq!(h.handle(Exit::Hlt, &ram), Ok(Action::Halted));
        assert_eq!(h.handle(Exit::Interrupted, &ram), Ok(Action::Kicked));
        assert_eq!(h.handle(Exit::Shutdown, &ram), Err(ExitError::TripleFault));
        assert_eq!(
            h.handle(Exit::FailEntry(7), &ram),
            Err(ExitError::EntryFailed(7))
        );
        assert_eq!(
            h.handle(Exit::InternalError, &ram),
            Err(ExitError::Internal)
        );
        assert_eq!(
            h.handle(Exit::Other("x".into()), &ram),
            Err(ExitError::Unexpected("x".into()))
        );
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_goes_to_the_console() {
        let ram = ram();
        let sink = Shared::default();
        let mut h = ExitHandler::new(8 << 20, Box::new(sink.clone()), None);
        for b in b"ok\n" {
            let a = out(&mut h, &ram, abi::SERIAL_PORT_BASE, &[*b]);
            assert_eq!(a, Action::Continue);
        }
        assert_eq!(h.unhandled, 0);
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"guest| ok\n");
    }
}
