//! The guest's GDT, as one table: the descriptors `boot` writes into guest memory and the segment
//! registers `vcpu` loads are both derived from [`table`], so they cannot disagree (after
//! Firecracker's `arch/x86_64/gdt.rs`).

use kvm_bindings::kvm_segment;

use crate::contract::abi;

/// A GDT descriptor from its parts (`flags`: access byte | flags nibble << 12).
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
        | ((limit as u64 & 0xf_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The guest's GDT (selectors in `docs/abi.md`), including the two-slot 64-bit TSS descriptor.
pub fn table() -> [u64; abi::GDT_ENTRIES] {
    let tss_limit = (abi::TSS_SIZE - 1) as u32;
    [
        0,
        entry(0xa09b, 0, 0xfffff),                      // kernel code 64
        entry(0xc093, 0, 0xfffff),                      // kernel data
        entry(0xc0fb, 0, 0xfffff),                      // user code 32 (SYSRET's layout; unused)
        entry(0xc0f3, 0, 0xfffff),                      // user data
        entry(0xa0fb, 0, 0xfffff),                      // user code 64
        entry(0x0089, abi::TSS_ADDR as u32, tss_limit), // TSS, low half
        abi::TSS_ADDR >> 32,                            // TSS, high half: base bits 32..63
    ]
}

/// The GDT's limit as the GDTR holds it.
pub fn limit() -> u16 {
    (abi::GDT_ENTRIES * 8 - 1) as u16
}

/// The segment register that loading `selector` from `table` gives.
pub fn segment(table: &[u64], selector: u16) -> kvm_segment {
    let index = usize::from(selector >> 3);
    let e = table[index];
    let base_low = (e >> 16) & 0x00ff_ffff;
    let base_high = (e >> 32) & 0xff00_0000;
    let mut base = base_low | base_high;
    let s = ((e >> 44) & 1) as u8;
    if s == 0 && index + 1 < table.len() {
        // A system descriptor (TSS) is 16 bytes in long mode: the next slot holds base 32..63.
        base |= table[index + 1] << 32;
    }
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segments_are_long_mode_with_the_right_privilege() {
        let t = table();
        let kcode = segment(&t, abi::SEL_KERNEL_CODE);
        assert_eq!((kcode.l, kcode.db, kcode.dpl, kcode.present), (1, 0, 0, 1));
        assert_eq!(kcode.type_, 0xb);
        let ucode = segment(&t, abi::SEL_USER_CODE);
        assert_eq!((ucode.l, ucode.dpl), (1, 3));
        let kdata = segment(&t, abi::SEL_KERNEL_DATA);
        assert_eq!((kdata.l, kdata.db, kdata.type_), (0, 1, 0x3));
        assert_eq!(kdata.limit, 0xffff_ffff);
    }

    #[test]
    fn the_tss_register_matches_its_descriptor() {
        let t = table();
        let tr = segment(&t, abi::SEL_TSS);
        assert_eq!(tr.base, abi::TSS_ADDR);
        assert_eq!(u64::from(tr.limit), abi::TSS_SIZE - 1);
        assert_eq!((tr.type_, tr.s, tr.present, tr.g), (0x9, 0, 1, 0));
        assert_eq!(limit(), 63);
    }

    #[test]
    fn a_high_tss_base_takes_the_second_slot() {
        let t = [
            0,
            entry(0x0089, 0x1234_5678, 0x67),
            0xdead_beef,
            0,
            0,
            0,
            0,
            0,
        ];
        assert_eq!(segment(&t, 0x08).base, 0xdead_beef_1234_5678);
    }
}
