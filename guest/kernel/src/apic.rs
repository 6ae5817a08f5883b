// SPDX-License-Identifier: Apache-2.0
//! The local APIC (TSC-deadline timer, startup IPIs) and the IOAPIC (device interrupt routing),
//! programmed through their MMIO windows from user mode. Each CPU sees its own local APIC at the
//! same address.

use core::ptr::{read_volatile, write_volatile};

use crate::boot::IRQ_VECTOR_BASE;

const LAPIC: usize = 0xfee0_0000;
const LAPIC_ID: usize = 0x20;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_ICR_LOW: usize = 0x300;
const LAPIC_ICR_HIGH: usize = 0x310;
/// ICR: level assert, delivery mode INIT / StartUp.
const ICR_INIT: u32 = 0x4500;
const ICR_STARTUP: u32 = 0x4600;
/// ICR: level assert, fixed delivery.
const ICR_FIXED: u32 = 0x4000;
/// ICR destination shorthand: all CPUs but the sender.
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_LVT_LINT0: usize = 0x350;
const IOAPIC: usize = 0xfec0_0000;

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = IRQ_VECTOR_BASE;
/// Vector of the IPI that wakes a CPU halted while it waits for another one.
pub const WAKEUP_VECTOR: u8 = IRQ_VECTOR_BASE + 1;
/// IOAPIC pin `n` is delivered as vector `PIN_VECTOR_BASE + n`.
pub const PIN_VECTOR_BASE: u8 = IRQ_VECTOR_BASE + 8;

fn lapic_write(reg: usize, v: u32) {
    // SAFETY: the LAPIC window is identity-mapped and user-accessible; 32-bit aligned access.
    unsafe { write_volatile((LAPIC + reg) as *mut u32, v) }
}

fn lapic_read(reg: usize) -> u32 {
    // SAFETY: as in lapic_write.
    unsafe { read_volatile((LAPIC + reg) as *const u32) }
}

/// This CPU's local APIC id.
pub fn lapic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

/// Sends an INIT IPI to the CPU with local APIC id `apic_id`: it waits for a startup IPI.
pub fn send_init(apic_id: u8) {
    send_ipi(apic_id, ICR_INIT);
}

/// Sends a startup IPI: the CPU starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u8, page: u8) {
    send_ipi(apic_id, ICR_STARTUP | u32::from(page));
}

/// Wakes the CPU with local APIC id `apic_id` if it halts (or makes its next halt return).
pub fn wake(apic_id: u8) {
    send_ipi(apic_id, ICR_FIXED | u32::from(WAKEUP_VECTOR));
}

/// Wakes every other CPU the same way.
pub fn wake_others() {
    send_ipi(0, ICR_ALL_BUT_SELF | ICR_FIXED | u32::from(WAKEUP_VECTOR));
}

fn send_ipi(apic_id: u8, command: u32) {
    lapic_write(LAPIC_ICR_HIGH, u32::from(apic_id) << 24);
    // Writing the low half sends it; KVM's local APIC delivers at once, so there is no
    // delivery status to wait for.
    lapic_write(LAPIC_ICR_LOW, command);
}

/// Enables the LAPIC with the TSC-deadline timer on [`TIMER_VECTOR`], and masks LINT0 (the
/// 8259s are masked too; nothing comes that way).
pub fn init_lapic() {
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_LVT_TIMER, (0b10 << 17) | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_LVT_LINT0, 1 << 16);
}

/// Routes IOAPIC pin `pin` (edge-triggered, active high) to its vector on the calling CPU.
/// Devices are served by the boot CPU only, so only it routes pins.
pub fn route_pin(pin: u32) {
    let vector = u32::from(PIN_VECTOR_BASE) + pin;
    let reg = 0x10 + 2 * pin;
    let destination = u32::from(crate::percpu::current().apic_id()) << 24;
    // SAFETY: IOAPIC index/data registers, identity-mapped and user-accessible.
    unsafe {
        write_volatile(IOAPIC as *mut u32, reg + 1);
        write_volatile((IOAPIC + 0x10) as *mut u32, destination);
        write_volatile(IOAPIC as *mut u32, reg);
        write_volatile((IOAPIC + 0x10) as *mut u32, vector);
        let _ = read_volatile((IOAPIC + 0x10) as *const u32);
    }
}
