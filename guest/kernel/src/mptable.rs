// SPDX-License-Identifier: Apache-2.0
//! Finding the CPUs in the Intel MultiProcessor Specification 1.4 table, which our VMM (and
//! QEMU's firmware) writes for guests without ACPI: the floating pointer structure is searched
//! where the specification says (the first KiB of the EBDA, the last KiB of base memory, the
//! BIOS ROM at 0xf0000), checksums are checked, and the processor entries are read.

use core::ptr::read_volatile;

/// Most CPUs we read from the table.
pub const MAX_ENTRIES: usize = crate::percpu::MAX_CPUS;

/// A processor entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processor {
    pub apic_id: u8,
    pub boot: bool,
}

/// The enabled processors the table lists, in table order.
pub struct Processors {
    pub list: [Processor; MAX_ENTRIES],
    pub count: usize,
}

impl Processors {
    pub fn iter(&self) -> impl Iterator<Item = &Processor> {
        self.list[..self.count].iter()
    }
}

const ENTRY_PROCESSOR: u8 = 0;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;

fn byte(addr: usize) -> u8 {
    // SAFETY: only called on addresses below 1 MiB plus a table length (< 64 KiB) that the
    // identity map covers; reading memory or ROM there has no side effect.
    unsafe { read_volatile(addr as *const u8) }
}

fn u16_at(addr: usize) -> u16 {
    u16::from_le_bytes([byte(addr), byte(addr + 1)])
}

fn u32_at(addr: usize) -> u32 {
    u32::from_le_bytes([byte(addr), byte(addr + 1), byte(addr + 2), byte(addr + 3)])
}

fn checksum_ok(addr: usize, len: usize) -> bool {
    (addr..addr + len).fold(0u8, |sum, a| sum.wrapping_add(byte(a))) == 0
}

/// The floating pointer structure in `[start, end)`, on a 16-byte boundary.
fn find_floating(start: usize, end: usize) -> Option<usize> {
    (start..end.saturating_sub(15))
        .step_by(16)
        .find(|&a| [byte(a), byte(a + 1), byte(a + 2), byte(a + 3)] == *b"_MP_" && checksum_ok(a, 16))
}

/// Reads the table; `None` if there is none or it is malformed.
pub fn processors() -> Option<Processors> {
    // The EBDA's segment is at 0x40e in the BIOS data area; base memory size (KiB) at 0x413.
    let ebda = usize::from(u16_at(0x40e)) << 4;
    let base_top = (usize::from(u16_at(0x413)) << 10).clamp(0x8_0000, 0xa_0000);
    let floating = (0x8_0000..0xa_0000)
        .contains(&ebda)
        .then(|| find_floating(ebda, ebda + 1024))
        .flatten()
        .or_else(|| find_floating(base_top - 1024, base_top))
        .or_else(|| find_floating(0x9_fc00, 0xa_0000))
        .or_else(|| find_floating(0xf_0000, 0x10_0000))?;
    let table = u32_at(floating + 4) as usize;
    // A configuration table below 1 MiB, as every firmware puts it (and the identity map covers).
    if table == 0 || table >= 0x10_0000 || [byte(table), byte(table + 1), byte(table + 2), byte(table + 3)] != *b"PCMP"
    {
        return None;
    }
    let len = usize::from(u16_at(table + 4));
    if !(44..=0xffff).contains(&len) || !checksum_ok(table, len) {
        return None;
    }
    let mut out = Processors { list: [Processor { apic_id: 0, boot: false }; MAX_ENTRIES], count: 0 };
    // Entries are walked by the table's length, as Linux does, not by its entry count: QEMU's
    // qboot firmware leaves the count at 0.
    let mut at = table + 44;
    while at < table + len {
        match byte(at) {
            ENTRY_PROCESSOR => {
                let flags = byte(at + 3);
                if flags & CPU_ENABLED != 0 && out.count < MAX_ENTRIES {
                    out.list[out.count] = Processor { apic_id: byte(at + 1), boot: flags & CPU_BOOTPROCESSOR != 0 };
                    out.count += 1;
                }
                at += 20;
            }
            // Bus, I/O APIC, interrupt assignments: 8 bytes each.
            1..=4 => at += 8,
            // An entry we do not know the size of: stop here, keeping what we have.
            _ => break,
        }
    }
    Some(out)
}
