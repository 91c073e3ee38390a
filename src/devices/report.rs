//! The paravirtual report channel: the guest kernel writes the guest-physical address of a
//! 128-byte message (see `docs/abi.md`) to one port. This state machine validates the access and
//! the address; the VMM then reads and decodes the message.

use thiserror::Error;

use crate::contract::abi::MSG_SIZE;

/// A malformed access to the report channel.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("report channel written with {0} bytes, expected 4")]
    Width(usize),
    #[error("report channel has no register at offset {0}")]
    Offset(u16),
    #[error("message address {0:#x} is not 8-byte aligned")]
    Unaligned(u64),
    #[error("message at {addr:#x}..{end:#x} lies outside guest RAM ({ram:#x} bytes)")]
    OutOfRam { addr: u64, end: u64, ram: u64 },
}

/// Report channel state: what it accepted and rejected.
#[derive(Debug)]
pub struct ReportChannel {
    ram_bytes: u64,
    /// Messages accepted.
    pub accepted: u64,
    /// Malformed accesses and messages.
    pub errors: u64,
    /// The first error, for the final message.
    pub first_error: Option<String>,
}

impl ReportChannel {
    /// A channel for a guest with `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64) -> Self {
        ReportChannel {
            ram_bytes,
            accepted: 0,
            errors: 0,
            first_error: None,
        }
    }

    /// A port write. Returns the message address to read.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Result<u64, ReportError> {
        let r = self.decode(offset, data);
        match &r {
            Ok(_) => self.accepted += 1,
            Err(e) => self.note_error(e.to_string()),
        }
        r
    }

    fn decode(&self, offset: u16, data: &[u8]) -> Result<u64, ReportError> {
        if offset != 0 {
            return Err(ReportError::Offset(offset));
        }
        let bytes: [u8; 4] = data
            .try_into()
            .map_err(|_| ReportError::Width(data.len()))?;
        let addr = u32::from_le_bytes(bytes) as u64;
        if !addr.is_multiple_of(8) {
            return Err(ReportError::Unaligned(addr));
        }
        let end = addr + MSG_SIZE as u64;
        if end > self.ram_bytes {
            return Err(ReportError::OutOfRam {
                addr,
                end,
                ram: self.ram_bytes,
            });
        }
        Ok(addr)
    }

    /// Records a malformed access or message (logged for the first few).
    pub fn note_error(&mut self, e: String) {
        self.errors += 1;
        if self.errors <= 5 {
            log::warn!("guest report channel: {e}");
        }
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    /// A port read: the channel has nothing to read; all ones.
    pub fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_aligned_addresses_in_ram() {
        let mut c = ReportChannel::new(1 << 20);
        assert_eq!(c.write(0, &0x8000u32.to_le_bytes()), Ok(0x8000));
        assert_eq!(c.accepted, 1);
    }

    #[test]
    fn rejects_garbage() {
        let mut c = ReportChannel::new(1 << 20);
        assert_eq!(c.write(0, &[1]), Err(ReportError::Width(1)));
        assert_eq!(c.write(1, &[0; 4]), Err(ReportError::Offset(1)));
        assert_eq!(
            c.write(0, &3u32.to_le_bytes()),
            Err(ReportError::Unaligned(3))
        );
        assert!(matches!(
            c.write(0, &(1u32 << 20).to_le_bytes()),
            Err(ReportError::OutOfRam { .. })
        ));
        assert_eq!(c.errors, 4);
        assert!(c.first_error.as_deref().unwrap().contains("expected 4"));
        let mut d = [0u8; 2];
        c.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_access_is_decoded_or_rejected_never_a_panic(
                ram in prop_oneof![any::<u64>(), 0u64..(1 << 33)],
                writes in prop::collection::vec(
                    (prop_oneof![Just(0u16), any::<u16>()], prop::collection::vec(any::<u8>(), 0..9)),
                    1..50,
                ),
            ) {
                let mut c = ReportChannel::new(ram);
                for (i, (offset, data)) in writes.iter().enumerate() {
                    let r = c.write(*offset, data);
                    let valid = *offset == 0 && data.len() == 4 && {
                        let addr = u64::from(u32::from_le_bytes(data[..4].try_into().unwrap()));
                        addr % 8 == 0 && addr + MSG_SIZE as u64 <= ram
                    };
                    match r {
                        Ok(addr) => {
                            prop_assert!(valid);
                            prop_assert_eq!(addr.to_le_bytes()[..4].to_vec(), data.clone());
                        }
                        Err(_) => prop_assert!(!valid),
                    }
                    prop_assert_eq!(c.accepted + c.errors, i as u64 + 1);
                    prop_assert_eq!(c.first_error.is_some(), c.errors > 0);
                }
            }
        }
    }
}
