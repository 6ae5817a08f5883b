// SPDX-License-Identifier: Apache-2.0
//! The guest physical address map: where the VMM puts boot structures, RAM and device windows.
//!
//! Below 1 MiB it follows Firecracker's layout, which the Linux 64-bit boot protocol and our own
//! guest both expect: a GDT and an empty IDT, the zero page, a boot stack, identity page tables,
//! the command line and the MP table at the top of conventional memory (EBDA).

/// GDT for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT: null, code, data, TSS.
pub const BOOT_GDT_MAX: usize = 4;
/// An empty IDT: the kernel installs its own before it enables interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page"), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first GiB: PML4, PDPT, PD (2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux x86 COMMAND_LINE_SIZE (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP table, in the extended BIOS data area where the kernel's MP scan looks.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of usable conventional memory; the EBDA and the legacy hole follow.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows are allocated from the start of the hole.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC MMIO window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO window.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS and identity-map pages sit just below the IOAPIC, as in Firecracker.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// First legacy interrupt line handed to devices (0-4 belong to PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last interrupt line of the IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// COM1's interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// Guest RAM regions for `mem_size` bytes: one region below the MMIO hole and, if the RAM does
/// not fit there, the rest from 4 GiB up.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

// The boot stack grows down from BOOT_STACK_POINTER into the page after the zero page; it must
// stay clear of both that and the page tables.
const _: () = assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
        assert_eq!(r.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, BOOT_GDT_START + 8 * BOOT_GDT_MAX as u64),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, PDE_START + 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, EBDA_START + 0x400),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
