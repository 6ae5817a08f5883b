// SPDX-License-Identifier: Apache-2.0
//! Legacy devices on the port I/O bus: the COM1 UART, the i8042 (for reset) and pvpanic.

pub mod i8042;
pub mod pvpanic;
pub mod serial;

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An [`EventFd`] as a vm-superio interrupt or reset line.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A new non-blocking trigger.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}
