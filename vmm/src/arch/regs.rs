// SPDX-License-Identifier: Apache-2.0
//! The vCPU register state for the Linux 64-bit boot protocol: long mode with paging on, an
//! identity map of the first GiB, flat segments, RIP at the kernel entry and RSI at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress};

use super::gdt::{boot_gdt, kvm_segment_from_gdt};
use super::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Errors while writing the boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("failed to write the boot GDT into guest memory")]
    WriteGdt,
    #[error("failed to write the boot IDT into guest memory")]
    WriteIdt,
    #[error("failed to write the boot page tables into guest memory")]
    WritePageTables,
}

/// General registers at the kernel entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        // Bit 1 of RFLAGS is reserved and must be set; interrupts stay off until the kernel
        // has an IDT.
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Writes the boot GDT, IDT and page tables into guest memory and returns `sregs` updated for
/// 64-bit mode. `sregs` should come from the vCPU, so fields we do not set keep KVM's values.
pub fn boot_sregs(mem: &GuestMemoryMmap, mut sregs: kvm_sregs) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64)).map_err(|_| RegsError::WriteGdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(|_| RegsError::WriteIdt)?;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    write_identity_map(mem)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for any kernel's early boot code, which
/// installs its own tables right away.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let pml4 = GuestAddress(PML4_START);
    let pdpte = GuestAddress(PDPTE_START);
    let pde = GuestAddress(PDE_START);
    // Present | writable.
    mem.write_obj(pdpte.raw_value() | 0x03, pml4).map_err(|_| RegsError::WritePageTables)?;
    mem.write_obj(pde.raw_value() | 0x03, pdpte).map_err(|_| RegsError::WritePageTables)?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        mem.write_obj((i << 21) | 0x83, pde.unchecked_add(i * 8)).map_err(|_| RegsError::WritePageTables)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn sregs_enter_long_mode_with_identity_map() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let sregs = boot_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cr3, PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pd_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pd_last, (511 << 21) | 0x83);
        let gdt_code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt_code, boot_gdt()[1]);
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags & 0x200, 0, "interrupts must start disabled");
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = create_guest_memory(0x1000).unwrap();
        assert!(boot_sregs(&mem, kvm_sregs::default()).is_err());
    }
}
