// SPDX-License-Identifier: Apache-2.0
//! Leaving: poweroff through the i8042 reset line (what Linux's `reboot=k` does; the VMM ends
//! with exit code 0), and panics reported on the pvpanic port first so the VMM can tell a crash
//! from a clean poweroff.

use crate::gate;

const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const PVPANIC_PORT: u16 = 0x505;
const PVPANIC_PANICKED: u8 = 1;

pub fn poweroff() -> ! {
    crate::println!("GUEST-POWEROFF");
    gate::outb(I8042_COMMAND, I8042_RESET);
    loop {
        gate::halt(0);
    }
}

pub fn panicked() -> ! {
    gate::outb(PVPANIC_PORT, PVPANIC_PANICKED);
    poweroff()
}
