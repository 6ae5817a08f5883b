// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio transport, version 2 (virtio 1.x, "modern") register layout.
//!
//! It runs on vCPU threads (every guest access to the device window is an MMIO exit) and only
//! touches the device under its lock, except for InterruptStatus and InterruptAck, which are
//! atomics in the shared [`Interrupt`]. Queue notifications normally never get here: they are
//! ioeventfds in KVM. Anything the driver writes out of order or out of range is ignored or, if
//! it makes the device unusable, answered with DEVICE_NEEDS_RESET, never with a panic.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vm_device::MutDeviceMmio;
use vm_device::bus::{MmioAddress, MmioAddressOffset};

use crate::GuestMemoryMmap;
use crate::device::{Interrupt, VirtioDevice};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "VMM\0": the vendor id is free-form; the guest driver does not look at it.
const VENDOR_ID: u32 = 0x004d_4d56;

/// The transport's own registers, for migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_status: u32,
    pub features_select: u32,
    pub acked_features_select: u32,
    pub queue_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
}

/// A virtio device behind a virtio-mmio window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// The device's interrupt, reachable without the device lock (see
    /// [`VirtioDevice::interrupt`]): a driver woken by an interrupt reads and acknowledges it
    /// at once, even while the event loop is in the middle of a burst.
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    state: MmioTransportState,
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let interrupt = device.lock().expect("Poisoned lock").interrupt().clone();
        Self { device, interrupt, mem, state: MmioTransportState::default() }
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn save_state(&self) -> MmioTransportState {
        let mut s = self.state.clone();
        s.interrupt_status = self.interrupt.status();
        s
    }

    pub fn restore_state(&mut self, state: &MmioTransportState) {
        self.state = state.clone();
        self.interrupt.set_status(state.interrupt_status);
    }

    fn status(&self) -> u32 {
        self.state.device_status
    }

    fn read_reg(&self, offset: u32) -> u32 {
        // The hot one first, without the device lock.
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS {
            return self.interrupt.status();
        }
        let dev = self.device.lock().expect("Poisoned lock");
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => dev.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.state.features_select {
                0 => dev.avail_features() as u32,
                1 => (dev.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected(&*dev).map(|q| u32::from(q.max_size())).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_READY => self.selected(&*dev).map(|q| u32::from(q.ready())).unwrap_or(0),
            VIRTIO_MMIO_STATUS => {
                self.state.device_status | if dev.needs_reset() { VIRTIO_CONFIG_S_NEEDS_RESET } else { 0 }
            }
            VIRTIO_MMIO_CONFIG_GENERATION => self.state.config_generation,
            // SHM regions: none (length all ones means "no such region").
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn selected<'a>(&self, dev: &'a dyn VirtioDevice) -> Option<&'a virtio_queue::Queue> {
        dev.queues().get(self.state.queue_select as usize)
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        // The hot one first, without the device lock.
        if offset == VIRTIO_MMIO_INTERRUPT_ACK {
            self.interrupt.ack(v);
            return;
        }
        let device = self.device.clone();
        let mut dev = device.lock().expect("Poisoned lock");
        let status = self.status();
        // Queue and feature registers may change only while the driver sets the device up.
        let configuring = status & VIRTIO_CONFIG_S_DRIVER != 0 && status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let features_open = configuring && status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.state.features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.state.acked_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_open => {
                let shift = match self.state.acked_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let acked = (dev.acked_features() & !mask) | (u64::from(v) << shift);
                // Only what the device offered can be accepted.
                let acked = acked & dev.avail_features();
                dev.set_acked_features(acked);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.state.queue_select = v,
            VIRTIO_MMIO_QUEUE_NUM if configuring => {
                let sel = self.state.queue_select;
                // A size that is zero, not a power of two or above the maximum would leave the
                // device and the driver with different rings: the device cannot go on.
                let bad = match dev.queues_mut().get_mut(sel as usize) {
                    Some(q) => {
                        u16::try_from(v).map_err(|_| ()).and_then(|n| q.try_set_size(n).map_err(|_| ())).is_err()
                    }
                    None => false,
                };
                if bad {
                    dev.mark_needs_reset(&format!("the driver set queue {sel} to size {v}"));
                }
            }
            VIRTIO_MMIO_QUEUE_READY if configuring => {
                if let Some(q) = dev.queues_mut().get_mut(self.state.queue_select as usize) {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if configuring =>
            {
                if let Some(q) = dev.queues_mut().get_mut(self.state.queue_select as usize) {
                    let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                    match offset & !4 {
                        VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Only without an ioeventfd (unit tests, or a KVM that lacks it).
                if let Some(evt) = dev.queue_events().get(v as usize)
                    && let Err(e) = evt.write(1)
                {
                    log::warn!("virtio-mmio: failed to signal queue {v}: {e}");
                }
            }
            VIRTIO_MMIO_STATUS => self.write_status(&mut *dev, v),
            _ => log::debug!("virtio-mmio: ignored write of {v:#x} at {offset:#x}"),
        }
    }

    fn write_status(&mut self, dev: &mut dyn VirtioDevice, v: u32) {
        log::debug!("virtio-mmio: status {:#x} -> {v:#x}", self.state.device_status);
        if v == 0 {
            dev.reset();
            dev.interrupt().ack(u32::MAX);
            self.state = MmioTransportState { config_generation: self.state.config_generation, ..Default::default() };
            return;
        }
        let old = self.state.device_status;
        if v & VIRTIO_CONFIG_S_FAILED != 0 {
            self.state.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // The driver may only add bits, in order: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK.
        let order = [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ];
        let new_bits = v & !old & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if v & old != old {
            log::debug!("virtio-mmio: driver cleared status bits ({old:#x} -> {v:#x}), ignored");
            return;
        }
        for (i, bit) in order.iter().enumerate() {
            if new_bits & bit != 0 && order[..i].iter().any(|b| (old | new_bits) & b == 0) {
                log::debug!("virtio-mmio: status bit {bit:#x} set out of order, ignored");
                return;
            }
        }
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK != 0 && dev.acked_features() & (1 << VIRTIO_F_VERSION_1) == 0 {
            // We only speak virtio 1.x; a legacy driver must see FEATURES_OK refused.
            self.state.device_status = old | (new_bits & !VIRTIO_CONFIG_S_FEATURES_OK);
            return;
        }
        self.state.device_status = old | new_bits;
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if dev.needs_reset() {
                return;
            }
            if let Some(i) = dev.queues().iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
                dev.mark_needs_reset(&format!("the driver set up queue {i} wrongly"));
                return;
            }
            if let Err(e) = dev.activate(self.mem.clone()) {
                dev.mark_needs_reset(&e.to_string());
            }
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let dev = self.device.lock().expect("Poisoned lock");
            dev.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32-bit; other accesses read as zero.
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let device = self.device.clone();
            let mut dev = device.lock().expect("Poisoned lock");
            dev.write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.state.config_generation = self.state.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

impl MmioTransport {
    /// Reads the device config space as the driver would (for tests of the devices).
    pub fn mmio_read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_read(MmioAddress(0), u64::from(VIRTIO_MMIO_CONFIG) + offset, data);
    }
}
