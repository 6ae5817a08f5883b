// SPDX-License-Identifier: Apache-2.0
//! The local APIC (TSC-deadline timer) and the IOAPIC (device interrupt routing), programmed
//! through their MMIO windows from user mode.

use core::ptr::{read_volatile, write_volatile};

use crate::boot::IRQ_VECTOR_BASE;

const LAPIC: usize = 0xfee0_0000;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_LVT_LINT0: usize = 0x350;
const IOAPIC: usize = 0xfec0_0000;

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = IRQ_VECTOR_BASE;
/// IOAPIC pin `n` is delivered as vector `PIN_VECTOR_BASE + n`.
pub const PIN_VECTOR_BASE: u8 = IRQ_VECTOR_BASE + 8;

fn lapic_write(reg: usize, v: u32) {
    // SAFETY: the LAPIC window is identity-mapped and user-accessible; 32-bit aligned access.
    unsafe { write_volatile((LAPIC + reg) as *mut u32, v) }
}

/// Enables the LAPIC with the TSC-deadline timer on [`TIMER_VECTOR`], and masks LINT0 (the
/// 8259s are masked too; nothing comes that way).
pub fn init_lapic() {
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_LVT_TIMER, (0b10 << 17) | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_LVT_LINT0, 1 << 16);
}

/// Routes IOAPIC pin `pin` (edge-triggered, active high, to the boot CPU) to its vector.
pub fn route_pin(pin: u32) {
    let vector = u32::from(PIN_VECTOR_BASE) + pin;
    let reg = 0x10 + 2 * pin;
    // SAFETY: IOAPIC index/data registers, identity-mapped and user-accessible.
    unsafe {
        write_volatile(IOAPIC as *mut u32, reg + 1);
        write_volatile((IOAPIC + 0x10) as *mut u32, 0);
        write_volatile(IOAPIC as *mut u32, reg);
        write_volatile((IOAPIC + 0x10) as *mut u32, vector);
        let _ = read_volatile((IOAPIC + 0x10) as *const u32);
    }
}
