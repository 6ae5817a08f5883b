// SPDX-License-Identifier: Apache-2.0
//! Lines typed on the console (COM1): `poweroff` powers the guest off (what the VMM's
//! `PUT /vm/shutdown` sends), `status` prints the status line. The UART's receive interrupt
//! wakes a sleeping guest; a busy one looks every so often.

use alloc::vec::Vec;

use crate::{apic, boot, gate};

const COM1: u16 = 0x3f8;
const IER: u16 = COM1 + 1;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1;
const IRQ: u32 = 4;
/// How often a guest that never sleeps checks for input.
const POLL_NS: u64 = 100_000_000;

/// What a console line asks for.
#[derive(PartialEq, Eq)]
pub enum Command {
    Poweroff,
    Status,
}

pub struct ConsoleInput {
    line: Vec<u8>,
    last_poll_ns: u64,
}

impl ConsoleInput {
    /// Enables the UART's receive interrupt and routes it.
    pub fn new() -> Self {
        gate::outb(IER, 1);
        apic::route_pin(IRQ);
        ConsoleInput { line: Vec::new(), last_poll_ns: 0 }
    }

    /// Reads what arrived; returns the command of a complete line, if any.
    pub fn poll(&mut self, now_ns: u64) -> Option<Command> {
        let woken = boot::take_irq(apic::PIN_VECTOR_BASE + IRQ as u8);
        if !woken && now_ns.saturating_sub(self.last_poll_ns) < POLL_NS {
            return None;
        }
        self.last_poll_ns = now_ns;
        while gate::inb(LSR) & LSR_DATA_READY != 0 {
            let b = gate::inb(COM1);
            if b == b'\n' || b == b'\r' {
                let cmd = match core::str::from_utf8(&self.line).map(str::trim) {
                    Ok("poweroff") => Some(Command::Poweroff),
                    Ok("status") => Some(Command::Status),
                    _ => None,
                };
                self.line.clear();
                if cmd.is_some() {
                    return cmd;
                }
            } else if self.line.len() < 128 {
                self.line.push(b);
            }
        }
        None
    }
}
