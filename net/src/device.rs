// SPDX-License-Identifier: Apache-2.0
//! The virtio-net device: its features, config space, queues and what the transport asks of it.
//! Moving frames is in [`crate::tx`] and [`crate::rx`], the control queue in [`crate::ctrl`],
//! the address takeover after a migration in [`crate::takeover`] and the migration state in
//! [`crate::persist`].
//!
//! The driver is not trusted. Descriptor chains pointing outside guest memory, looping, empty,
//! too long or with buffers in the wrong direction cost the guest that frame (counted as a
//! drop); an available ring that claims more entries than the queue has makes the device ask for
//! a reset (DEVICE_NEEDS_RESET). Neither stops the VMM or touches any other device.
//!
//! Every write into guest memory (RX frames, used rings) goes through the dirty-tracked
//! `GuestMemoryMmap`, so live migration sees it.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio::queue::{check_avail, driver_wants_interrupt};
use virtio::{ActivateError, GuestMemoryMmap, INT_CONFIG, INT_VRING, Interrupt, VirtioDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::MacAddr;
use crate::announce::AddressLearner;
use crate::flows::FlowTracker;
use crate::metrics::NetMetrics;
use crate::tap::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, Tap, TapError};

pub const RX_INDEX: usize = 0;
pub const TX_INDEX: usize = 1;
pub const CTRL_INDEX: usize = 2;
pub const NUM_QUEUES: usize = 3;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame: a 64 KiB TSO frame plus Ethernet header and the virtio-net header.
pub const MAX_FRAME: usize = 65_562;

/// Errors while creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Tap(#[from] TapError),
    #[error("failed to create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("failed to create virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
    #[error("invalid saved state: {0}")]
    State(String),
}

/// What the device offers: virtio 1.x, MAC and link status, checksum and TSO offloads both ways,
/// mergeable RX buffers, event-index notification suppression, and the control queue with
/// GUEST_ANNOUNCE, so that after a migration the guest announces its own addresses.
pub fn offered_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
    ]
    .iter()
    .fold(0, |acc, bit| acc | (1u64 << bit))
}

pub(crate) fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The virtio-net device.
pub struct Net {
    pub(crate) tap: Tap,
    pub(crate) mac: MacAddr,
    pub(crate) acked_features: u64,
    pub(crate) queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    pub(crate) interrupt: Arc<Interrupt>,
    /// Config-space `status`: LINK_UP, and ANNOUNCE while an announce is pending.
    pub(crate) config_status: u16,
    pub(crate) mem: Option<GuestMemoryMmap>,
    pub(crate) needs_reset: bool,
    /// Set while a migration freezes the device (see `persist.rs`).
    pub(crate) paused: bool,
    /// One frame read from the TAP that found no guest buffer yet.
    pub(crate) rx_frame: Vec<u8>,
    pub(crate) rx_frame_len: Option<usize>,
    /// Frames to deliver before reading the TAP: those that reached the source host's TAP while
    /// the guest was paused for migration (see [`Net::drain_tap`]).
    pub(crate) backlog: VecDeque<Vec<u8>>,
    pub(crate) tx_frame: Vec<u8>,
    /// Scratch for the RX path: (descriptor address, length, chain head) of the chains taken.
    pub(crate) rx_descs: Vec<(GuestAddress, u32, u16)>,
    /// Scratch for the RX path: (chain head, bytes written) per chain of a frame.
    pub(crate) rx_used: Vec<(u16, u32)>,
    /// The guest's IPv4 addresses, for announcing it after a migration.
    pub(crate) addresses: AddressLearner,
    /// The guest's TCP flows, to restart them quickly after a migration.
    pub(crate) flows: FlowTracker,
    pub(crate) metrics: Arc<NetMetrics>,
}

impl Net {
    /// A device on TAP `tap_name` with MAC `mac`, raising its interrupt through `irqfd`.
    pub fn new(tap_name: &str, mac: MacAddr, irqfd: EventFd) -> Result<Self, NetError> {
        Self::with_tap(Tap::open(tap_name)?, mac, irqfd)
    }

    /// A device on `tap`, opened before (a sandboxed VMM opens its TAPs before it drops its
    /// privileges).
    pub fn with_tap(tap: Tap, mac: MacAddr, irqfd: EventFd) -> Result<Self, NetError> {
        let mut queues = Vec::with_capacity(NUM_QUEUES);
        let mut queue_evts = Vec::with_capacity(NUM_QUEUES);
        for _ in 0..NUM_QUEUES {
            queues.push(Queue::new(QUEUE_SIZE).map_err(NetError::Queue)?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?);
        }
        Ok(Self {
            tap,
            mac,
            acked_features: 0,
            queues,
            queue_evts,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            config_status: VIRTIO_NET_S_LINK_UP as u16,
            mem: None,
            needs_reset: false,
            paused: false,
            rx_frame: vec![0; MAX_FRAME],
            rx_frame_len: None,
            backlog: VecDeque::new(),
            tx_frame: vec![0; MAX_FRAME],
            rx_descs: Vec::with_capacity(QUEUE_SIZE as usize),
            rx_used: Vec::with_capacity(QUEUE_SIZE as usize),
            addresses: AddressLearner::default(),
            flows: FlowTracker::default(),
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    pub(crate) fn broken(&mut self, why: &str) {
        if !self.needs_reset {
            log::warn!("virtio-net: {why}; the device needs a reset by its driver");
            self.needs_reset = true;
            // A running driver learns it from a config interrupt; one still setting up reads it
            // in Status.
            if self.mem.is_some() {
                let _ = self.interrupt.trigger(INT_CONFIG);
            }
        }
    }

    pub(crate) fn ready(&self) -> Option<GuestMemoryMmap> {
        if self.needs_reset || self.paused { None } else { self.mem.clone() }
    }

    /// Whether queue `index` was set up by the driver (the control queue only exists with
    /// VIRTIO_NET_F_CTRL_VQ); an unused queue is not an error, just nothing to do.
    pub(crate) fn queue_in_use(&self, index: usize) -> bool {
        self.queues[index].ready()
    }

    pub(crate) fn signal_used(&mut self, index: usize, mem: &GuestMemoryMmap) {
        match driver_wants_interrupt(&mut self.queues[index], mem) {
            Ok(true) => {
                if let Err(e) = self.interrupt.trigger(INT_VRING) {
                    log::warn!("virtio-net: failed to raise the interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => self.broken(&format!("queue {index}: {e:?}")),
        }
    }

    /// Checks the available ring of queue `index` before trusting it (see
    /// [`virtio::queue::check_avail`]); a broken one makes the device ask for a reset.
    pub(crate) fn avail_ok(&mut self, index: usize, mem: &GuestMemoryMmap) -> bool {
        match check_avail(&mut self.queues[index], mem) {
            Ok(()) => true,
            Err(e) => {
                self.broken(&format!("queue {index}: {e:?}"));
                false
            }
        }
    }

    pub(crate) fn tap_offloads(&self) -> u32 {
        let f = self.acked_features;
        let mut flags = 0;
        if has(f, VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if has(f, VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if has(f, VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
            if has(f, VIRTIO_NET_F_GUEST_ECN) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        flags
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        offered_features()
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & offered_features();
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
        // virtio_net_config: mac[6], status (le16), then fields we do not offer.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&self.config_status.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| config.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Writing the MAC needs VIRTIO_NET_F_CTRL_MAC_ADDR-era semantics we do not offer.
        log::debug!("virtio-net: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let event_idx = has(self.acked_features, VIRTIO_RING_F_EVENT_IDX);
        let ctrl = has(self.acked_features, VIRTIO_NET_F_CTRL_VQ);
        for (i, q) in self.queues.iter_mut().enumerate() {
            if i == CTRL_INDEX && !ctrl {
                continue;
            }
            if !q.ready() {
                return Err(ActivateError::InvalidQueue(i));
            }
            q.set_event_idx(event_idx);
        }
        self.tap.set_offload(self.tap_offloads()).map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.mem = Some(mem);
        // The TAP may have frames waiting, and the driver may have queued some already.
        self.process_rx();
        self.process_tx();
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
        self.rx_frame_len = None;
        self.backlog.clear();
        self.config_status = VIRTIO_NET_S_LINK_UP as u16;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtio_bindings::virtio_mmio::*;
    use vm_device::MutDeviceMmio;
    use vm_device::bus::MmioAddress;
    use vm_memory::{Bytes, GuestAddress};

    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

    use super::*;
    use crate::tap::VNET_HDR_LEN;
    use crate::test_utils::*;

    #[test]
    fn transport_identifies_a_modern_net_device() {
        let mut rig = Rig::new();
        assert_eq!(rig.read_reg(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rig.read_reg(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rig.read_reg(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_NET);
        rig.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rig.read_reg(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        rig.write_reg(VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(rig.read_reg(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 7");
        let mut mac = [0u8; 6];
        rig.transport.mmio_read_config(0, &mut mac);
        assert_eq!(mac, GUEST_MAC);
    }

    #[test]
    fn driver_can_only_accept_offered_features_and_must_speak_virtio_1() {
        let mut rig = Rig::new();
        let status = rig.init(u64::MAX, SIZE);
        assert_eq!(rig.net.lock().unwrap().acked_features(), offered_features());
        assert_eq!(status & 0xf, 0xf, "ACK | DRIVER | FEATURES_OK | DRIVER_OK");
        // A legacy driver (no VERSION_1) does not get FEATURES_OK, so it cannot go on.
        let status = rig.init(1 << VIRTIO_NET_F_MAC, SIZE);
        assert_eq!(status & 0x8, 0, "FEATURES_OK refused");
        assert!(!rig.net.lock().unwrap().is_activated());
    }

    #[test]
    fn interrupt_status_and_ack_do_not_wait_for_the_device_lock() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        rig.net.lock().unwrap().interrupt().trigger(INT_VRING).unwrap();
        let Rig { net, transport, .. } = &mut rig;
        // The event loop holds the device for a whole burst; a woken driver must not wait.
        let busy = net.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let answered = std::thread::scope(|s| {
            s.spawn(move || {
                let mut b = [0u8; 4];
                transport.mmio_read(MmioAddress(0), u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), &mut b);
                transport.mmio_write(MmioAddress(0), u64::from(VIRTIO_MMIO_INTERRUPT_ACK), &b);
                let _ = tx.send(u32::from_le_bytes(b));
            });
            let answered = rx.recv_timeout(Duration::from_secs(2));
            drop(busy);
            answered
        });
        assert_eq!(answered, Ok(INT_VRING));
        assert_eq!(rig.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS), 0, "acknowledged");
    }

    #[test]
    fn bogus_queue_size_needs_reset_and_a_reset_recovers() {
        let mut rig = Rig::new();
        let status = rig.init(features(&[]), 3);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "size 3 is not a power of two");
        assert!(!rig.net.lock().unwrap().is_activated());
        // The driver resets and tries again, properly.
        let status = rig.init(features(&[]), SIZE);
        assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"after reset");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert!(rig.wire.wait_for(&frame, Duration::from_secs(2)));
    }

    #[test]
    fn avail_index_beyond_the_queue_needs_reset() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        rig.irq.read().ok();
        txq.avail().idx().store(100);
        rig.net.lock().unwrap().process_tx();
        assert!(status_needs_reset(&mut rig));
        assert_ne!(rig.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & virtio::INT_CONFIG, 0);
        assert!(used(&txq).is_empty(), "nothing processed from a broken ring");
    }

    #[test]
    fn reset_mid_flight_forgets_everything_in_flight() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let _rxq = queue(&mem, RX_INDEX, SIZE);
        rig.wire.send(&test_frame(b"stale"));
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx(); // no buffers: the frame waits in the device
        rig.write_reg(VIRTIO_MMIO_STATUS, 0);
        assert!(!rig.net.lock().unwrap().is_activated());
        assert_eq!(rig.read_reg(VIRTIO_MMIO_STATUS), 0);
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        let fresh = test_frame(b"fresh");
        rig.wire.send(&fresh);
        assert!(rx_until(&rig, &rxq, 1));
        let mut got = vec![0u8; fresh.len()];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, fresh, "the frame from before the reset is gone");
    }
}
