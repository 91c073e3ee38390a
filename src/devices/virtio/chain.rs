//! A resumable walk of one descriptor chain of a split virtqueue. Each call reads one descriptor,
//! so a device can stop between any two and go on later; the walk ends after as many descriptors
//! as the table holds (a loop cannot keep it going), at a `next` index outside the table, at an
//! unreadable descriptor, and at a descriptor that refers to an indirect table, which it never
//! follows: the transport never offers `VIRTIO_F_INDIRECT_DESC`, so a driver may not use one.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::ram::GuestMemoryMmap;

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// Why a chain ended early (the chain is still returned to the driver; the rest is skipped).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {index} refers to an indirect table, a feature not negotiated")]
    Indirect { index: u16 },
    #[error("descriptor {index} is outside guest RAM")]
    Unreadable { index: u16 },
    #[error("next descriptor {index} is outside the table of {size}")]
    NextOutside { index: u16, size: u16 },
    #[error("the chain is longer than the table of {size} (a loop)")]
    TooLong { size: u16 },
}

/// Where a walk through one chain is.
#[derive(Clone, Debug)]
pub struct ChainWalk {
    table: u64,
    size: u16,
    next: Option<u16>,
    /// Descriptors the walk may still read.
    left: u16,
}

impl ChainWalk {
    /// A walk of the chain at `head` (already checked to be inside the table) of `q`.
    pub fn new(q: &Queue, head: u16) -> Self {
        ChainWalk {
            table: q.desc_table(),
            size: q.size(),
            next: Some(head),
            left: q.size(),
        }
    }

    /// The next descriptor of the chain, `Ok(None)` at its end; after an error the walk is over.
    pub fn next(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Descriptor>, ChainError> {
        let Some(index) = self.next.take() else {
            return Ok(None);
        };
        if index >= self.size {
            return Err(ChainError::NextOutside {
                index,
                size: self.size,
            });
        }
        if self.left == 0 {
            return Err(ChainError::TooLong { size: self.size });
        }
        self.left -= 1;
        let at = self
            .table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable { index })?;
        let d: Descriptor = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| ChainError::Unreadable { index })?;
        if d.refers_to_indirect_table() {
            return Err(ChainError::Indirect { index });
        }
        if d.has_next() {
            self.next = Some(d.next());
        }
        Ok(Some(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    const TABLE: u64 = 0x1000;
    const SIZE: u16 = 8;

    fn desc(ram: &GuestRam, i: u64, addr: u64, flags: u16, next: u16) {
        let at = TABLE + i * DESC_SIZE;
        ram.write_obj(at, addr).unwrap();
        ram.write_obj(at + 8, 4u32).unwrap();
        ram.write_obj(at + 12, flags).unwrap();
        ram.write_obj(at + 14, next).unwrap();
    }

    fn setup() -> (GuestRam, Queue) {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let mut q = Queue::new(256).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(TABLE as u32), Some(0));
        (ram, q)
    }

    fn walk_all(w: &mut ChainWalk, ram: &GuestRam) -> (Vec<u64>, Option<ChainError>) {
        let mut addrs = Vec::new();
        loop {
            match w.next(ram.mem()) {
                Ok(Some(d)) => addrs.push(d.addr().0),
                Ok(None) => return (addrs, None),
                Err(e) => return (addrs, Some(e)),
            }
        }
    }

    #[test]
    fn a_chain_is_walked_in_order_to_its_end() {
        let (ram, q) = setup();
        desc(&ram, 2, 0xa, 1, 5);
        desc(&ram, 5, 0xb, 1, 0);
        desc(&ram, 0, 0xc, 0, 7);
        let mut w = ChainWalk::new(&q, 2);
        assert_eq!(walk_all(&mut w, &ram), (vec![0xa, 0xb, 0xc], None));
        assert!(matches!(w.next(ram.mem()), Ok(None)), "stays ended");
    }

    #[test]
    fn loops_next_outside_and_indirect_end_the_walk() {
        let (ram, q) = setup();
        // 0 -> 1 -> 0 -> ...: SIZE descriptors, then the loop is reported.
        desc(&ram, 0, 0xa, 1, 1);
        desc(&ram, 1, 0xb, 1, 0);
        let (addrs, e) = walk_all(&mut ChainWalk::new(&q, 0), &ram);
        assert_eq!(addrs.len(), usize::from(SIZE));
        assert_eq!(e, Some(ChainError::TooLong { size: SIZE }));
        // A next index past the table.
        desc(&ram, 3, 0xd, 1, 200);
        let (addrs, e) = walk_all(&mut ChainWalk::new(&q, 3), &ram);
        assert_eq!(addrs, vec![0xd]);
        assert_eq!(
            e,
            Some(ChainError::NextOutside {
                index: 200,
                size: SIZE
            })
        );
        // An indirect descriptor is not followed (flag 4: VIRTQ_DESC_F_INDIRECT).
        desc(&ram, 4, 0xe, 1, 6);
        desc(&ram, 6, TABLE, 4, 0);
        let (addrs, e) = walk_all(&mut ChainWalk::new(&q, 4), &ram);
        assert_eq!(addrs, vec![0xe]);
        assert_eq!(e, Some(ChainError::Indirect { index: 6 }));
    }

    #[test]
    fn a_table_outside_ram_is_unreadable() {
        let (ram, mut q) = setup();
        q.set_desc_table_address(Some(0), Some(1)); // 4 GiB
        let (addrs, e) = walk_all(&mut ChainWalk::new(&q, 0), &ram);
        assert!(addrs.is_empty());
        assert_eq!(e, Some(ChainError::Unreadable { index: 0 }));
    }
}
