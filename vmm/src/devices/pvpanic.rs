// SPDX-License-Identifier: Apache-2.0
//! pvpanic (QEMU's ISA device at port 0x505): a guest writes "panicked" there before it goes
//! down, so the VMM can report a crash instead of a clean poweroff.

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

use super::EventFdTrigger;

pub const PVPANIC_PORT: u16 = 0x505;
const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    evt: EventFdTrigger,
}

impl PvPanic {
    pub fn new(evt: EventFdTrigger) -> Self {
        Self { evt }
    }
}

impl MutDevicePio for PvPanic {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // The events this device understands.
        if let Some(b) = data.first_mut() {
            *b = PANICKED | CRASH_LOADED;
        }
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.first().is_some_and(|b| b & PANICKED != 0) {
            log::error!("the guest reported a panic (pvpanic)");
            if let Err(e) = self.evt.0.write(1) {
                log::error!("pvpanic: failed to signal: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_fires_crash_loaded_does_not() {
        let mut dev = PvPanic::new(EventFdTrigger::new().unwrap());
        let base = PioAddress(PVPANIC_PORT);
        dev.pio_write(base, 0, &[CRASH_LOADED]);
        assert!(dev.evt.0.read().is_err());
        dev.pio_write(base, 0, &[PANICKED]);
        assert_eq!(dev.evt.0.read().unwrap(), 1);
        let mut b = [0];
        dev.pio_read(base, 0, &mut b);
        assert_eq!(b[0], 3);
    }
}
