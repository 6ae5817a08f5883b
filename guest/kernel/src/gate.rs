// SPDX-License-Identifier: Apache-2.0
//! User-mode wrappers of the `int3` gate (see [`crate::boot`]).

use core::arch::asm;

use crate::boot::{GATE_HALT, GATE_INB, GATE_OUTB, GATE_OUTS};

/// Sleeps until an interrupt arrives or the TSC passes `deadline` (0: no deadline). Whatever
/// became pending since user mode last looked ends the sleep at once.
pub fn halt(deadline: u64) {
    // SAFETY: the gate preserves everything but the registers named here; it touches no user
    // memory.
    unsafe {
        asm!("int3", in("rdi") GATE_HALT, in("rsi") deadline, out("rax") _, out("rcx") _, out("rdx") _, options(nostack));
    }
}

/// Writes `bytes` to I/O port `port` in one string operation.
pub fn outs(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: the gate reads `bytes.len()` bytes from `bytes` and clobbers the named registers.
    unsafe {
        asm!(
            "int3",
            in("rdi") GATE_OUTS,
            inout("rsi") u64::from(port) => _,
            inout("rdx") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, readonly)
        );
    }
}

/// Reads a byte from I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let v: u64;
    // SAFETY: the gate only reads the port and clobbers the named registers.
    unsafe {
        asm!("int3", in("rdi") GATE_INB, in("rsi") u64::from(port), out("rax") v, out("rdx") _, options(nostack));
    }
    v as u8
}

/// Writes a byte to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the gate only writes the port and clobbers the named registers.
    unsafe {
        asm!(
            "int3",
            in("rdi") GATE_OUTB,
            in("rsi") u64::from(port),
            inout("rdx") u64::from(value) => _,
            out("rax") _,
            options(nostack)
        );
    }
}
