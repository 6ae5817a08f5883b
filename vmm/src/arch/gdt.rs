// SPDX-License-Identifier: Apache-2.0
//! GDT entries for the 64-bit boot state and their `kvm_segment` equivalents.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor: `flags` holds the access byte (bits 0-7) and the flags nibble
/// (bits 12-15), as in Linux's `GDT_ENTRY` macro.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn get_base(entry: u64) -> u64 {
    (((entry) & 0xff00_0000_0000_0000) >> 32)
        | (((entry) & 0x0000_00ff_0000_0000) >> 16)
        | (((entry) & 0x0000_0000_ffff_0000) >> 16)
}

fn get_limit(entry: u64) -> u32 {
    let limit = ((((entry) & 0x000f_0000_0000_0000) >> 32) | ((entry) & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if get_g(entry) == 1 { (limit << 12) | 0xfff } else { limit }
}

fn get_g(entry: u64) -> u8 {
    ((entry & 0x0080_0000_0000_0000) >> 55) as u8
}
fn get_db(entry: u64) -> u8 {
    ((entry & 0x0040_0000_0000_0000) >> 54) as u8
}
fn get_l(entry: u64) -> u8 {
    ((entry & 0x0020_0000_0000_0000) >> 53) as u8
}
fn get_avl(entry: u64) -> u8 {
    ((entry & 0x0010_0000_0000_0000) >> 52) as u8
}
fn get_p(entry: u64) -> u8 {
    ((entry & 0x0000_8000_0000_0000) >> 47) as u8
}
fn get_dpl(entry: u64) -> u8 {
    ((entry & 0x0000_6000_0000_0000) >> 45) as u8
}
fn get_s(entry: u64) -> u8 {
    ((entry & 0x0000_1000_0000_0000) >> 44) as u8
}
fn get_type(entry: u64) -> u8 {
    ((entry & 0x0000_0f00_0000_0000) >> 40) as u8
}

/// The `kvm_segment` KVM needs for a descriptor that sits at `table_index` in the GDT.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: get_type(entry),
        present: get_p(entry),
        dpl: get_dpl(entry),
        db: get_db(entry),
        s: get_s(entry),
        l: get_l(entry),
        g: get_g(entry),
        avl: get_avl(entry),
        padding: 0,
        // A descriptor that is not present is unusable.
        unusable: if get_p(entry) == 0 { 1 } else { 0 },
    }
}

/// The boot GDT: null, 64-bit code, data, and a TSS descriptor (KVM wants a usable TR).
pub fn boot_gdt() -> [u64; super::layout::BOOT_GDT_MAX] {
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let seg = kvm_segment_from_gdt(boot_gdt()[1], 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn entry_fields_round_trip() {
        let e = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(e, 2);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
        assert_eq!(seg.type_, 3);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.db, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
