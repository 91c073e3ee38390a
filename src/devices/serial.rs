//! COM1: vm-superio's 16550A, whose transmitted bytes go to a line-buffered sink (stderr or a log
//! file chosen by the binary). No interrupts: the guest polls.

use std::io::Write;

use vm_superio::{Serial, Trigger};

/// The serial console never raises an interrupt (the guest has no interrupt controller).
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Longest console line: a longer one is cut into lines of this many bytes.
const MAX_LINE: usize = 512;

/// Prefixes each console line so guest output is easy to tell from the VMM's.
///
/// A failing destination never stops the guest and never floods the log: the first failed line is
/// logged, the rest are only counted (see [`Console::write_errors`]).
pub struct LineSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    /// Lines that could not be written.
    errors: u64,
}

impl LineSink {
    /// Wraps `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        LineSink {
            out,
            line: Vec::with_capacity(MAX_LINE),
            errors: 0,
        }
    }

    /// Writes the buffered line with its prefix (even when empty) and starts a new one.
    fn emit(&mut self) {
        let r = (|| {
            self.out.write_all(b"guest| ")?;
            self.out.write_all(&self.line)?;
            self.out.write_all(b"\n")?;
            self.out.flush()
        })();
        self.line.clear();
        if let Err(e) = r {
            self.errors += 1;
            if self.errors == 1 {
                log::warn!(
                    "guest console: cannot write its output ({e}); further failures are only counted"
                );
            }
        }
    }

    /// Writes out a partial last line.
    pub fn finish(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

impl Write for LineSink {
    /// Never fails: bytes go to the line, and a failed line is counted in [`LineSink::emit`].
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            match b {
                b'\n' => self.emit(),
                b'\r' => {}
                _ => {
                    if self.line.len() >= MAX_LINE {
                        self.emit();
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(buf.len())
    }

    /// Lines are flushed as they are written; the UART's flush after every byte costs nothing.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The console device on COM1.
pub struct Console {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, LineSink>,
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            uart: Serial::new(NoInterrupt, LineSink::new(out)),
        }
    }

    /// A port read at `offset` (0..8) from the base.
    pub fn read(&mut self, offset: u8, data: &mut [u8]) {
        let v = self.uart.read(offset);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    /// A port write at `offset`; only the first byte of a wider access counts.
    pub fn write(&mut self, offset: u8, data: &[u8]) {
        if let Some(&v) = data.first() {
            // The sink never fails (it counts its own errors), so neither does the UART.
            let _ = self.uart.write(offset, v);
        }
    }

    /// Writes out a partial last line.
    pub fn flush(&mut self) {
        self.uart.writer_mut().finish();
    }

    /// Console lines that could not be written to the destination (only the first is logged).
    pub fn write_errors(&self) -> u64 {
        self.uart.writer().errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A destination the test can read back; it fails while `failing` is set.
    #[derive(Clone, Default)]
    struct Shared {
        bytes: Arc<Mutex<Vec<u8>>>,
        failing: Arc<Mutex<bool>>,
        attempts: Arc<Mutex<u64>>,
    }
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            *self.attempts.lock().unwrap() += 1;
            if *self.failing.lock().unwrap() {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    /// Transmits `bytes` one by one through the UART's data register, as the guest does.
    fn transmit(c: &mut Console, bytes: &[u8]) {
        for b in bytes {
            c.write(0, &[*b]);
        }
    }

    #[test]
    fn transmitted_bytes_become_prefixed_lines() {
        let out = Shared::default();
        let mut c = Console::new(Box::new(out.clone()));
        transmit(&mut c, b"hi\r\nthere");
        assert_eq!(out.text(), "guest| hi\n");
        c.flush();
        assert_eq!(out.text(), "guest| hi\nguest| there\n");
        // Flushing again adds nothing; an empty line stays a line.
        c.flush();
        transmit(&mut c, b"\n");
        assert_eq!(out.text(), "guest| hi\nguest| there\nguest| \n");
        assert_eq!(c.write_errors(), 0);
        // Line status register says the transmitter is empty.
        let mut d = [0u8; 1];
        c.read(5, &mut d);
        assert_ne!(d[0] & 0x20, 0);
    }

    #[test]
    fn a_long_unterminated_line_loses_no_byte() {
        let out = Shared::default();
        let mut c = Console::new(Box::new(out.clone()));
        let sent: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
        transmit(&mut c, &sent);
        c.flush();
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        // 5 full lines of 512 bytes and one of 440.
        assert_eq!(lines.len(), 6, "{text}");
        let mut got = Vec::new();
        for l in &lines {
            let body = l.strip_prefix("guest| ").expect("prefixed");
            assert!(body.len() <= MAX_LINE);
            got.extend_from_slice(body.as_bytes());
        }
        assert_eq!(got.len(), 3000);
        assert_eq!(got, sent);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_one_line() {
        let out = Shared::default();
        let mut c = Console::new(Box::new(out.clone()));
        transmit(&mut c, &[b'x'; MAX_LINE]);
        transmit(&mut c, b"\n");
        assert_eq!(out.text(), format!("guest| {}\n", "x".repeat(MAX_LINE)));
    }

    #[test]
    fn a_failing_destination_is_counted_not_logged_per_byte() {
        let out = Shared::default();
        *out.failing.lock().unwrap() = true;
        let mut c = Console::new(Box::new(out.clone()));
        // 1000 lines of 10 bytes: each failed line is one error, not one per byte.
        for _ in 0..1000 {
            transmit(&mut c, b"123456789\n");
        }
        assert_eq!(c.write_errors(), 1000);
        // One write attempt per line (the first part of it fails), not one per byte.
        assert_eq!(*out.attempts.lock().unwrap(), 1000);
        assert_eq!(out.text(), "");
        // The guest's UART never sees the failure.
        let mut d = [0u8; 1];
        c.read(5, &mut d);
        assert_ne!(d[0] & 0x20, 0);
        // The destination recovers: later lines arrive whole.
        *out.failing.lock().unwrap() = false;
        transmit(&mut c, b"back\n");
        assert_eq!(out.text(), "guest| back\n");
        assert_eq!(c.write_errors(), 1000);
    }
}
