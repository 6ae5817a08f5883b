// SPDX-License-Identifier: Apache-2.0
//! A virtio-blk driver over virtio-mmio (modern, version 2): one request queue, polled.
//!
//! Each request takes three descriptors (header, data, status) in a fixed slot, so up to a
//! third of the queue can be in flight; the caller submits a batch, notifies once, and polls
//! the used ring (a memory read, cheap at CPL 3, where an interrupt would cost MMIO exits).
//! The device never gets to interrupt us: VRING_AVAIL_F_NO_INTERRUPT stays set.

use alloc::vec::Vec;

use crate::virtio_net::{
    F_VERSION_1, InitError, MAGIC, REG_CONFIG, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID,
    REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_MAGIC, REG_QUEUE_NOTIFY, REG_STATUS, REG_VERSION, Regs,
    STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, setup_queue,
};
use crate::virtqueue::{DESC_F_NEXT, DESC_F_WRITE, VirtQueue};

const DEVICE_ID_BLOCK: u32 = 2;
const F_FLUSH: u64 = 1 << 9;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const S_OK: u8 = 0;
/// Entries in the request queue (the device may offer fewer).
const QUEUE_SIZE: u16 = 128;
pub const SECTOR: u64 = 512;

/// A request's header (`type`, `ioprio`, `sector`) and its status byte, one per slot.
#[repr(C)]
struct Slot {
    kind: u32,
    ioprio: u32,
    sector: u64,
    status: u8,
    _pad: [u8; 15],
}

pub struct VirtioBlk {
    regs: Regs,
    queue: VirtQueue,
    slots: Vec<Slot>,
    /// Sectors.
    pub capacity: u64,
    pub flush: bool,
}

impl VirtioBlk {
    /// Resets and sets up the device at `base`.
    pub fn init(base: u64) -> Result<Self, InitError> {
        let regs = Regs(base as usize);
        if regs.read(REG_MAGIC) != MAGIC || regs.read(REG_VERSION) != 2 {
            return Err(InitError::NotVirtio);
        }
        if regs.read(REG_DEVICE_ID) != DEVICE_ID_BLOCK {
            return Err(InitError::NotBlock);
        }
        regs.write(REG_STATUS, 0);
        regs.write(REG_STATUS, STATUS_ACK);
        regs.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
        regs.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = u64::from(regs.read(REG_DEVICE_FEATURES));
        regs.write(REG_DEVICE_FEATURES_SEL, 0);
        let offered = (high << 32) | u64::from(regs.read(REG_DEVICE_FEATURES));
        let wanted = offered & (F_VERSION_1 | F_FLUSH);
        if wanted & F_VERSION_1 == 0 {
            return Err(InitError::FeaturesRefused);
        }
        regs.write(REG_DRIVER_FEATURES_SEL, 0);
        regs.write(REG_DRIVER_FEATURES, wanted as u32);
        regs.write(REG_DRIVER_FEATURES_SEL, 1);
        regs.write(REG_DRIVER_FEATURES, (wanted >> 32) as u32);
        regs.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if regs.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(InitError::FeaturesRefused);
        }
        let mut queue = setup_queue(&regs, 0, QUEUE_SIZE)?;
        queue.set_interrupts(false);
        let capacity = u64::from(regs.read(REG_CONFIG)) | (u64::from(regs.read(REG_CONFIG + 4)) << 32);
        regs.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let n = usize::from(queue.size / 3);
        let slots = (0..n).map(|_| Slot { kind: 0, ioprio: 0, sector: 0, status: 0xff, _pad: [0; 15] }).collect();
        Ok(VirtioBlk { regs, queue, slots, capacity, flush: wanted & F_FLUSH != 0 })
    }

    /// Requests that can be in flight at once (one slot each).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Queues request `kind` in `slot` for `len` bytes at `addr` from `sector` (no data for a
    /// flush); visible to the device at the next [`Self::kick`].
    pub fn submit(&mut self, slot: usize, kind: u32, sector: u64, addr: u64, len: u32) {
        let s = &mut self.slots[slot];
        s.kind = kind;
        s.ioprio = 0;
        s.sector = sector;
        s.status = 0xff;
        let hdr = (s as *const Slot) as u64;
        let status = hdr + 16;
        let first = (slot * 3) as u16;
        if kind == T_FLUSH {
            self.queue.set_desc_next(first, hdr, 16, DESC_F_NEXT, first + 2);
        } else {
            let flags = if kind == T_IN { DESC_F_WRITE } else { 0 };
            self.queue.set_desc_next(first, hdr, 16, DESC_F_NEXT, first + 1);
            self.queue.set_desc_next(first + 1, addr, len, flags | DESC_F_NEXT, first + 2);
        }
        self.queue.set_desc(first + 2, status, 1, DESC_F_WRITE);
        self.queue.push(first);
    }

    /// Publishes what was submitted and notifies the device if it wants to be.
    pub fn kick(&mut self) {
        if self.queue.publish() {
            self.regs.write(REG_QUEUE_NOTIFY, 0);
        }
    }

    /// A completed request: (slot, status), if one is done.
    pub fn poll(&mut self) -> Option<(usize, u8)> {
        let (id, _) = self.queue.pop_used()?;
        let slot = usize::from(id) / 3;
        let status = self.slots.get(slot).map_or(0xff, |s| {
            // SAFETY: the device wrote the status byte of this slot; read it as memory the
            // device changed.
            unsafe { core::ptr::read_volatile(&s.status) }
        });
        Some((slot, status))
    }

    /// Carries out one request and waits for it; returns its status.
    pub fn run(&mut self, kind: u32, sector: u64, buf: &mut [u8]) -> u8 {
        self.submit(0, kind, sector, buf.as_mut_ptr() as u64, buf.len() as u32);
        self.kick();
        loop {
            if let Some((_, status)) = self.poll() {
                return status;
            }
            core::hint::spin_loop();
        }
    }
}

/// The first virtio-blk device on the command line.
pub fn find(params: &guest_common::Params) -> Option<VirtioBlk> {
    params.devices().find_map(|d| VirtioBlk::init(d.base).ok())
}
