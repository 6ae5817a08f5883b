// SPDX-License-Identifier: Apache-2.0
//! The virtio-blk device: one request queue over a [`Disk`], its features and config space.
//!
//! The driver is not trusted: a chain the device cannot make sense of gets VIRTIO_BLK_S_IOERR
//! (or, if it has not even a writable status byte, is returned with length 0), an available
//! ring that claims more entries than the queue has makes the device ask for a reset; neither
//! stops the VMM. Requests are carried out by the disk's own I/O thread ([`crate::worker`]),
//! never on a vCPU thread: the driver's notification is an ioeventfd.

use std::sync::Arc;

use virtio::queue::driver_wants_interrupt;
use virtio::{ActivateError, GuestMemoryMmap, INT_CONFIG, INT_VRING, Interrupt, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{Disk, SECTOR_SIZE};
use crate::metrics::BlockMetrics;

pub const REQUEST_QUEUE: usize = 0;
pub const NUM_QUEUES: usize = 1;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (VIRTIO_BLK_F_SEG_MAX): a queue's worth, less header and
/// status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most sectors one discard or write-zeroes segment covers (1 GiB), and most segments.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
pub const MAX_DISCARD_SEG: u32 = 32;

/// Errors while creating or restoring the device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{0}")]
    Disk(#[from] crate::disk::DiskError),
    #[error("failed to create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("failed to create virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
    #[error("invalid saved state: {0}")]
    State(String),
}

/// What the device offers: virtio 1.x, event-index notification suppression, segment limits,
/// 512-byte blocks, flush, and for a writable disk discard and write-zeroes; a read-only disk
/// says so (VIRTIO_BLK_F_RO).
pub fn offered_features(read_only: bool) -> u64 {
    let mut bits = vec![VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE];
    bits.push(VIRTIO_BLK_F_FLUSH);
    if read_only {
        bits.push(VIRTIO_BLK_F_RO);
    } else {
        bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
    }
    bits.iter().fold(0, |acc, bit| acc | (1u64 << bit))
}

pub(crate) fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The virtio-blk device.
pub struct Block {
    pub(crate) disk: Arc<Disk>,
    /// The serial number the driver reads with GET_ID (at most 20 bytes).
    pub(crate) id: String,
    pub(crate) acked_features: u64,
    pub(crate) queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) mem: Option<GuestMemoryMmap>,
    pub(crate) needs_reset: bool,
    /// Set while a migration freezes the device (see `persist.rs`).
    pub(crate) paused: bool,
    pub(crate) metrics: Arc<BlockMetrics>,
    /// Scratch for one request: its descriptors (address, length, device-writable).
    pub(crate) segs: Vec<(u64, u32, bool)>,
}

impl Block {
    /// A device on `disk`, raising its interrupt through `irqfd`.
    pub fn new(disk: Disk, id: &str, irqfd: EventFd) -> Result<Self, BlockError> {
        let mut queues = Vec::with_capacity(NUM_QUEUES);
        let mut queue_evts = Vec::with_capacity(NUM_QUEUES);
        for _ in 0..NUM_QUEUES {
            queues.push(Queue::new(QUEUE_SIZE).map_err(BlockError::Queue)?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?);
        }
        Ok(Block {
            disk: Arc::new(disk),
            id: id.chars().take(20).collect(),
            acked_features: 0,
            queues,
            queue_evts,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            mem: None,
            needs_reset: false,
            paused: false,
            metrics: Arc::new(BlockMetrics::default()),
            segs: Vec::with_capacity(QUEUE_SIZE as usize),
        })
    }

    /// The image, shared with whoever copies it (a migration).
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    pub(crate) fn broken(&mut self, why: &str) {
        if !self.needs_reset {
            log::warn!("virtio-blk: {why}; the device needs a reset by its driver");
            self.needs_reset = true;
            if self.mem.is_some() {
                let _ = self.interrupt.trigger(INT_CONFIG);
            }
        }
    }

    pub(crate) fn ready(&self) -> Option<GuestMemoryMmap> {
        if self.needs_reset || self.paused { None } else { self.mem.clone() }
    }

    pub(crate) fn signal_used(&mut self, mem: &GuestMemoryMmap) {
        match driver_wants_interrupt(&mut self.queues[REQUEST_QUEUE], mem) {
            Ok(true) => {
                if let Err(e) = self.interrupt.trigger(INT_VRING) {
                    log::warn!("virtio-blk: failed to raise the interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => self.broken(&format!("request queue: {e:?}")),
        }
    }

    /// Wakes the I/O thread (as a driver notification would).
    pub fn kick(&self) {
        if let Err(e) = self.queue_evts[REQUEST_QUEUE].write(1) {
            log::warn!("virtio-blk: cannot wake the I/O thread: {e}");
        }
    }

    /// `virtio_blk_config`, as far as we fill it.
    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let capacity = self.disk.size() / SECTOR_SIZE;
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // Topology (24..32) and writeback (32) stay zero: not offered.
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        // Write-zeroes may deallocate: it punches a hole either way.
        c[56] = 1;
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        offered_features(self.disk.read_only())
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| config.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, with VIRTIO_BLK_F_CONFIG_WCE, which we do not offer.
        log::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let event_idx = has(self.acked_features, VIRTIO_RING_F_EVENT_IDX);
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                return Err(ActivateError::InvalidQueue(i));
            }
            q.set_event_idx(event_idx);
        }
        self.mem = Some(mem);
        // The driver may have queued requests already.
        self.kick();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn mark_needs_reset(&mut self, why: &str) {
        self.broken(why);
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.acked_features = 0;
        self.mem = None;
        self.needs_reset = false;
    }
}
