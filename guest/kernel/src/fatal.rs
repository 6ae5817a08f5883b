// SPDX-License-Identifier: Apache-2.0
//! Where exceptions and panics end: one line on the console, then the pvpanic port.

use core::panic::PanicInfo;

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 error",
    "alignment check",
    "machine check",
    "SIMD error",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// Entered at CPL 3 from the exception stubs on this CPU's fatal stack.
#[unsafe(no_mangle)]
extern "C" fn guest_fatal(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    let name = NAMES.get(vector as usize).copied().unwrap_or("unknown");
    let cpu = crate::percpu::current().index();
    crate::println!("GUEST-PANIC cpu={cpu} exception {vector} ({name}) error={error:#x} rip={rip:#x} cr2={cr2:#x}");
    crate::power::panicked()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::println!("GUEST-PANIC cpu={} {info}", crate::percpu::current().index());
    crate::power::panicked()
}
