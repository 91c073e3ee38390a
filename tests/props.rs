//! Property tests for what a guest or a user feeds the VMM from outside the crate's own modules:
//! report-channel messages (`abi::Message::parse`) and guest images (`boot::check_image`).
//! `make fuzz` runs them with many more cases (PROPTEST_CASES).

use memvisor::contract::abi::{MSG_SIZE, Message};
use memvisor::kvm::boot::{DEFAULT_GUEST, check_image};
use proptest::prelude::*;
use vm_memory::ByteValued;

/// A 128-byte message with a valid magic and a kind near the valid range, or anything at all.
fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (prop::collection::vec(any::<u8>(), MSG_SIZE), 0u32..12).prop_map(|(mut b, kind)| {
            b[0..4].copy_from_slice(&memvisor::contract::abi::MSG_MAGIC.to_le_bytes());
            b[4..8].copy_from_slice(&kind.to_le_bytes());
            b
        }),
    ]
}

/// The built-in guest with a few bytes overwritten (biased towards the headers), maybe truncated.
fn mutated_guest() -> impl Strategy<Value = Vec<u8>> {
    let len = DEFAULT_GUEST.len();
    let header: usize = 64 + 56 * 8;
    (
        prop::collection::vec(
            (
                prop_oneof![0usize..header, 0usize..len],
                prop_oneof![any::<u8>(), Just(0xff), Just(0)],
            ),
            0..12,
        ),
        prop_oneof![3 => Just(len), 1 => 0..len],
    )
        .prop_map(|(edits, keep)| {
            let mut img = DEFAULT_GUEST.to_vec();
            for (at, v) in edits {
                img[at] = v;
            }
            img.truncate(keep);
            img
        })
}

/// Overwrites the u64 at `at` (a program header field) with `v`.
fn put_u64(img: &mut [u8], at: usize, v: u64) {
    img[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

proptest! {
    #[test]
    fn message_parse_never_panics_and_round_trips(b in message_bytes()) {
        if let Ok(m) = Message::parse(&b) {
            prop_assert_eq!(b.len(), MSG_SIZE);
            prop_assert_eq!(m.as_slice(), &b[..]);
            prop_assert_eq!(Message::parse(m.as_slice()), Ok(m));
        } else {
            prop_assert!(b.len() != MSG_SIZE || b[0..4] != memvisor::contract::abi::MSG_MAGIC.to_le_bytes()
                || !(1..=8).contains(&u32::from_le_bytes(b[4..8].try_into().unwrap())));
        }
    }

    #[test]
    fn check_image_never_panics_on_arbitrary_bytes(
        b in prop::collection::vec(any::<u8>(), 0..512),
        ram in any::<u64>(),
    ) {
        let _ = check_image(&b, ram);
    }

    #[test]
    fn check_image_never_panics_on_a_mutated_guest(
        img in mutated_guest(),
        ram in prop_oneof![Just(256u64 << 20), any::<u64>(), 0u64..(4 << 20)],
    ) {
        if let Ok(l) = check_image(&img, ram) {
            prop_assert!(l.end <= ram);
            prop_assert!(l.entry < l.end);
        }
    }

    #[test]
    fn check_image_never_panics_on_extreme_program_headers(
        field in 0usize..6,
        v in prop_oneof![any::<u64>(), Just(u64::MAX), Just(u64::MAX - 0xfff), Just(1u64 << 63)],
        phnum in prop_oneof![Just(None), any::<u16>().prop_map(Some)],
        phoff in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    ) {
        let mut img = DEFAULT_GUEST.to_vec();
        let ph = u64::from_le_bytes(img[32..40].try_into().unwrap()) as usize;
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align of the first program header.
        put_u64(&mut img, ph + 8 + 8 * field, v);
        if let Some(n) = phnum {
            img[56..58].copy_from_slice(&n.to_le_bytes());
        }
        if let Some(o) = phoff {
            put_u64(&mut img, 32, o);
        }
        let _ = check_image(&img, 256 << 20);
        let _ = check_image(&img, u64::MAX);
    }
}

#[test]
fn the_unmutated_guest_passes_check_image() {
    // The mutation tests start from a valid image.
    let l = check_image(DEFAULT_GUEST, 256 << 20).expect("built-in guest");
    assert!(l.entry < l.end);
}
