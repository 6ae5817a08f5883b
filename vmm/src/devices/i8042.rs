// SPDX-License-Identifier: Apache-2.0
//! The i8042 keyboard controller, only for its CPU reset line: writing 0xfe to port 0x64 is how
//! a guest without ACPI reboots or, with `reboot=k`, powers off. Either way the VMM stops.

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_superio::I8042Device;

use super::EventFdTrigger;

/// First port of the controller (data at 0x60, command/status at 0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports it occupies.
pub const I8042_PORT_SIZE: u16 = 5;

/// The controller; its reset line is an eventfd the VMM's event loop watches.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        Self { device: I8042Device::new(reset) }
    }

    /// Fires when the guest asks for a reset.
    pub fn reset_evt(&self) -> &EventFdTrigger {
        self.device.reset_evt()
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Some(b), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.device.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(b), Ok(offset)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.device.write(offset, *b)
        {
            log::error!("i8042: failed to signal the reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_fires_the_event() {
        let mut dev = I8042::new(EventFdTrigger::new().unwrap());
        let base = PioAddress(I8042_PORT_BASE);
        dev.pio_write(base, 0, &[0xfe]);
        assert!(dev.reset_evt().0.read().is_err(), "a data-port write is not a reset");
        dev.pio_write(base, 4, &[0xfe]);
        assert_eq!(dev.reset_evt().0.read().unwrap(), 1);
    }
}
