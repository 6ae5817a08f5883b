// SPDX-License-Identifier: Apache-2.0
//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA interrupts are wired (identity, IRQ n -> IOAPIC pin n).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX, MPTABLE_START};
use crate::vstate::memory::GuestMemoryMmap;

/// Most vCPUs the table (and the guest kernel config, NR_CPUS) supports.
pub const MAX_VCPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6: what the entry advertises; the kernel uses CPUID for the real signature.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU | APIC in the CPUID.1:EDX sense.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs requested, the MP table supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    #[error("the MP table does not fit below the end of the EBDA")]
    TooLarge,
    #[error("failed to write the MP table into guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer structure followed by the configuration table, as bytes to be
/// placed at `base`.
fn build(base: u64, num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irq type, flags (u16: bus default polarity/trigger), source bus, source irq,
        // destination IOAPIC, destination pin.
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT (the PIC), LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_len = header_len + entries.len();
    let table_addr = base + 16;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMM     "); // OEM id
    table.extend_from_slice(b"MICROVM     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // features: a configuration table is present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let bytes = build(MPTABLE_START, num_cpus);
    // The kernel scans the last KiB of conventional memory for the floating pointer.
    if MPTABLE_START + bytes.len() as u64 > EBDA_START + 0x400 {
        return Err(MptableError::TooLarge);
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn table_is_well_formed() {
        let mem = create_guest_memory(16 << 20).unwrap();
        for cpus in [1u8, 2, MAX_VCPUS] {
            setup_mptable(&mem, cpus).unwrap();
            let fp = read(&mem, MPTABLE_START, 16);
            assert_eq!(&fp[0..4], b"_MP_");
            assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "fp checksum");
            let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
            let head = read(&mem, table_addr, 44);
            assert_eq!(&head[0..4], b"PCMP");
            let len = u16::from_le_bytes([head[4], head[5]]) as usize;
            let table = read(&mem, table_addr, len);
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            // Walk the entries: processors are 20 bytes, everything else 8.
            let (mut off, mut procs, mut ioapics, mut intsrcs) = (44, 0, 0, 0);
            for _ in 0..count {
                match table[off] {
                    ENTRY_PROCESSOR => {
                        assert_eq!(table[off + 1], procs, "APIC ids are the vCPU indices");
                        assert_eq!(table[off + 3] & CPU_BOOTPROCESSOR != 0, procs == 0);
                        procs += 1;
                        off += 20;
                    }
                    t => {
                        if t == ENTRY_IOAPIC {
                            ioapics += 1;
                        }
                        if t == ENTRY_INTSRC {
                            intsrcs += 1;
                        }
                        off += 8;
                    }
                }
            }
            assert_eq!(off, len);
            assert_eq!(procs, cpus);
            assert_eq!(ioapics, 1);
            assert_eq!(intsrcs, IRQ_MAX + 1);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::TooManyCpus(0))));
        assert!(setup_mptable(&mem, MAX_VCPUS + 1).is_err());
    }
}
