// SPDX-License-Identifier: Apache-2.0
//! What a virtio device looks like to its transport, and the interrupt line they share. The
//! transport knows a device only through [`VirtioDevice`], so the register map and the device
//! logic stay separate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Interrupt reasons, as in the virtio-mmio InterruptStatus register.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's interrupt: the InterruptStatus bits and the irqfd that raises the guest's line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    /// Sets `reason` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, reason: u32) -> std::io::Result<()> {
        self.status.fetch_or(reason, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores InterruptStatus (after migration) without raising the line.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Errors a device reports to its transport.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not set up correctly by the driver")]
    InvalidQueue(usize),
    #[error("failed to configure the backend: {0}")]
    Backend(String),
}

/// The device side of a virtio device.
pub trait VirtioDevice: Send {
    /// virtio device id (1 for net, 2 for block).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted.
    fn acked_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    /// One event per queue, signalled on a driver notification (ioeventfd or transport).
    fn queue_events(&self) -> &[EventFd];
    /// The device's interrupt. Shared: the transport keeps a handle, so that the driver's
    /// InterruptStatus reads and InterruptAck writes do not wait for the device lock, which the
    /// event loop holds while it moves a burst of frames.
    fn interrupt(&self) -> &Arc<Interrupt>;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start processing queues in `mem`.
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// The device gave up on the driver's setup or rings (DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool;
    /// Gives up: stop processing, tell the driver (config interrupt) that it must reset.
    fn mark_needs_reset(&mut self, why: &str);
    /// The driver wrote 0 to Status: forget queues, features and anything in flight.
    fn reset(&mut self);
}
