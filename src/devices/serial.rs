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

/// Prefixes each console line so guest output is easy to tell from the VMM's.
pub struct LineSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl LineSink {
    /// Wraps `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        LineSink {
            out,
            line: Vec::new(),
        }
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' || self.line.len() >= 512 {
                let text = String::from_utf8_lossy(&self.line).into_owned();
                writeln!(self.out, "guest| {text}")?;
                self.line.clear();
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl LineSink {
    /// Writes out a partial last line.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.write_all(b"\n")?;
        }
        self.out.flush()
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
        if let Some(&v) = data.first()
            && let Err(e) = self.uart.write(offset, v)
        {
            log::warn!("console write failed: {e:?}");
        }
    }

    /// Writes out a partial last line.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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
    fn transmitted_bytes_become_prefixed_lines() {
        let out = Shared::default();
        let mut c = Console::new(Box::new(out.clone()));
        for b in b"hi\nthere" {
            c.write(0, &[*b]);
        }
        c.flush();
        assert_eq!(
            String::from_utf8(out.0.lock().unwrap().clone()).unwrap(),
            "guest| hi\nguest| there\n"
        );
        // Line status register says the transmitter is empty.
        let mut d = [0u8; 1];
        c.read(5, &mut d);
        assert_ne!(d[0] & 0x20, 0);
    }
}
