// SPDX-License-Identifier: Apache-2.0
//! The virtio-net device: frames between the guest's RX/TX virtqueues and a TAP device, plus
//! the control queue for the driver's acknowledgement of an announce.
//!
//! The driver is not trusted. Descriptor chains pointing outside guest memory, looping, empty,
//! too long or with buffers in the wrong direction cost the guest that frame (counted as a
//! drop); an available ring that claims more entries than the queue has makes the device ask for
//! a reset (DEVICE_NEEDS_RESET). Neither stops the VMM or touches any other device.
//!
//! Every write into guest memory (RX frames, used rings) goes through the dirty-tracked
//! `GuestMemoryMmap`, so live migration sees it.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;
use crate::announce::{AddressLearner, announce_frames};
use crate::flows::{DUP_ACKS, FlowTracker};
use crate::metrics::NetMetrics;
use crate::tap::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, Tap, TapError, VNET_HDR_LEN};
use crate::virtio::{ActivateError, INT_CONFIG, INT_VRING, Interrupt, VirtioDevice};

pub const RX_INDEX: usize = 0;
pub const TX_INDEX: usize = 1;
pub const CTRL_INDEX: usize = 2;
pub const NUM_QUEUES: usize = 3;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame: a 64 KiB TSO frame plus Ethernet header and the virtio-net header.
pub const MAX_FRAME: usize = 65_562;
/// Most frames carried over from a migration source's TAP.
const MAX_BACKLOG: usize = 256;
/// While sending a burst of the guest's frames, look at the TAP after this many: see
/// [`Net::process_tx`].
const TX_FRAMES_PER_RX_POLL: usize = 32;

/// A MAC address.
pub type MacAddr = [u8; 6];

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

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The virtio-net device.
pub struct Net {
    pub(crate) tap: Tap,
    pub(crate) mac: MacAddr,
    pub(crate) acked_features: u64,
    pub(crate) queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
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
    tx_frame: Vec<u8>,
    /// Scratch for the RX path: (descriptor address, length, chain head) of the chains taken.
    rx_descs: Vec<(GuestAddress, u32, u16)>,
    /// Scratch for the RX path: (chain head, bytes written) per chain of a frame.
    rx_used: Vec<(u16, u32)>,
    /// The guest's IPv4 addresses, for announcing it after a migration.
    pub(crate) addresses: AddressLearner,
    /// The guest's TCP flows, to restart them quickly after a migration.
    pub(crate) flows: FlowTracker,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// A device on TAP `tap_name` with MAC `mac`, raising its interrupt through `irqfd`.
    pub fn new(tap_name: &str, mac: MacAddr, irqfd: EventFd) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name)?;
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

    fn broken(&mut self, why: &str) {
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

    fn ready(&self) -> Option<GuestMemoryMmap> {
        if self.needs_reset || self.paused { None } else { self.mem.clone() }
    }

    /// Whether queue `index` was set up by the driver (the control queue only exists with
    /// VIRTIO_NET_F_CTRL_VQ); an unused queue is not an error, just nothing to do.
    fn queue_in_use(&self, index: usize) -> bool {
        self.queues[index].ready()
    }

    fn signal_used(&mut self, index: usize, mem: &GuestMemoryMmap) {
        match self.driver_wants_interrupt(index, mem) {
            Ok(true) => {
                if let Err(e) = self.interrupt.trigger(INT_VRING) {
                    log::warn!("virtio-net: failed to raise the interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => self.broken(&format!("queue {index}: {e:?}")),
        }
    }

    /// Whether the driver wants an interrupt for the used entries just added to queue `index`.
    ///
    /// With EVENT_IDX, virtio-queue decides from `used_event`. Without it, the driver's only
    /// say is VRING_AVAIL_F_NO_INTERRUPT in the available ring's flags, which virtio-queue does
    /// not look at (its `needs_notification` always answers yes then). A driver that polls, as
    /// ours does while it is busy, sets that flag; interrupting it anyway costs it a trip
    /// through its interrupt path and two MMIO exits (status, ack) for nothing, on TX after
    /// every burst. QEMU honours the flag too.
    fn driver_wants_interrupt(&mut self, index: usize, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
        let q = &mut self.queues[index];
        // Also the fence that orders our used-ring writes before the read of the flags
        // below: the driver clears the flag, fences, then looks at the used ring, so one
        // of the two sides sees the other's write and no wakeup is lost.
        let notify = q.needs_notification(mem)?;
        if q.event_idx_enabled() || !notify {
            return Ok(notify);
        }
        let flags: u16 =
            mem.load(GuestAddress(q.avail_ring()), Ordering::Acquire).map_err(virtio_queue::Error::GuestMemory)?;
        Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }

    /// Checks the available ring before trusting it: an index that ran more than a queue
    /// ahead means the driver is broken, not that there is work.
    fn avail_ok(&mut self, index: usize, mem: &GuestMemoryMmap) -> bool {
        match self.queues[index].iter(mem) {
            Ok(_) => true,
            Err(e) => {
                self.broken(&format!("queue {index}: {e:?}"));
                false
            }
        }
    }

    // ---------------------------------------------------------------- TX

    /// Sends every frame the driver queued.
    ///
    /// Every `TX_FRAMES_PER_RX_POLL` frames of a burst it also moves what the TAP received
    /// into the guest (see below), so one direction's burst does not hold up the other's.
    pub fn process_tx(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queue_in_use(TX_INDEX) {
            return;
        }
        loop {
            if !self.avail_ok(TX_INDEX, &mem) {
                return;
            }
            if let Err(e) = self.queues[TX_INDEX].disable_notification(&mem) {
                return self.broken(&format!("tx: {e:?}"));
            }
            let mut sent_any = false;
            let mut burst = 0usize;
            while let Some(chain) = self.queues[TX_INDEX].pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let mut len = 0usize;
                let mut ok = true;
                for desc in chain {
                    let n = desc.len() as usize;
                    if desc.is_write_only() || len + n > MAX_FRAME {
                        ok = false;
                        break;
                    }
                    if mem.read_slice(&mut self.tx_frame[len..len + n], desc.addr()).is_err() {
                        ok = false;
                        break;
                    }
                    len += n;
                }
                if ok && len > VNET_HDR_LEN {
                    self.addresses.observe(&self.mac, &self.tx_frame[VNET_HDR_LEN..len]);
                    self.flows.observe(&self.tx_frame[VNET_HDR_LEN..len]);
                    match self.tap.write_frame(&self.tx_frame[..len]) {
                        Ok(_) => {
                            self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                            self.metrics.tx_bytes.fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            log::debug!("virtio-net: TAP write failed: {e}");
                            self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.metrics.tx_bad_descriptors.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = self.queues[TX_INDEX].add_used(&mem, head, 0) {
                    return self.broken(&format!("tx used ring: {e:?}"));
                }
                sent_any = true;
                burst += 1;
                if burst % TX_FRAMES_PER_RX_POLL == 0 {
                    // A long burst is usually a TCP stream, and what the TAP receives meanwhile
                    // is mostly its ACKs (the peer's stack runs inside our TAP writes). Handed
                    // over only after the burst, they reach a guest that has long filled its
                    // send window and stopped; then we wait for it to wake and send again, and
                    // the stream goes in stop-and-go rounds of one window each. Handed over
                    // now, they let the guest queue more while we are still sending. Every 32
                    // frames (a sixth of a 256 KiB window) measured best: more often, the
                    // guest wakes up more than it needs; less often, the queue runs dry.
                    // A driver that wants TX interrupts gets this part of the burst first.
                    self.signal_used(TX_INDEX, &mem);
                    self.process_rx();
                    if self.needs_reset {
                        return;
                    }
                }
            }
            if sent_any {
                self.signal_used(TX_INDEX, &mem);
            }
            match self.queues[TX_INDEX].enable_notification(&mem) {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => return,
                Err(e) => return self.broken(&format!("tx: {e:?}")),
            }
        }
    }

    // ---------------------------------------------------------------- RX

    /// Moves frames from the TAP into the guest until either runs dry.
    pub fn process_rx(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queue_in_use(RX_INDEX) {
            return;
        }
        if !self.avail_ok(RX_INDEX, &mem) {
            return;
        }
        // The driver need not tell us about new RX buffers while we have some: only when a
        // frame waits for buffers (below) is its notification useful, and otherwise each
        // refill would cost it an MMIO exit. QEMU does the same.
        if let Err(e) = self.queues[RX_INDEX].disable_notification(&mem) {
            return self.broken(&format!("rx: {e:?}"));
        }
        let mut delivered = false;
        loop {
            let len = match self.rx_frame_len {
                Some(len) => len,
                None if !self.backlog.is_empty() => {
                    let frame = self.backlog.pop_front().unwrap_or_default();
                    let n = frame.len().min(self.rx_frame.len());
                    self.rx_frame[..n].copy_from_slice(&frame[..n]);
                    n
                }
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: TAP read failed: {e}");
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                self.rx_frame_len = None;
                continue;
            }
            match self.deliver(len, &mem) {
                Deliver::Done => {
                    self.rx_frame_len = None;
                    delivered = true;
                }
                Deliver::Dropped => {
                    self.rx_frame_len = None;
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    delivered = true;
                }
                Deliver::NoBuffers => {
                    // Keep the frame; the driver's next RX notification brings us back.
                    self.rx_frame_len = Some(len);
                    self.metrics.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                    match self.queues[RX_INDEX].enable_notification(&mem) {
                        Ok(true) => continue, // buffers arrived meanwhile
                        Ok(false) => break,
                        Err(e) => {
                            self.broken(&format!("rx: {e:?}"));
                            break;
                        }
                    }
                }
                Deliver::Broken(why) => {
                    self.broken(&why);
                    return;
                }
            }
        }
        if delivered {
            self.signal_used(RX_INDEX, &mem);
        }
    }

    /// Copies the frame in `rx_frame[..len]` into as many of the driver's buffers as it needs
    /// (several only with mergeable RX buffers).
    fn deliver(&mut self, len: usize, mem: &GuestMemoryMmap) -> Deliver {
        let mergeable = has(self.acked_features, VIRTIO_NET_F_MRG_RXBUF);
        self.rx_descs.clear();
        let mut capacity = 0usize;
        let mut chains = 0u16;
        let mut bad = false;
        // Take chains until the frame fits.
        while capacity < len {
            let Some(chain) = self.queues[RX_INDEX].pop_descriptor_chain(mem) else {
                for _ in 0..chains {
                    self.queues[RX_INDEX].go_to_previous_position();
                }
                return Deliver::NoBuffers;
            };
            let head = chain.head_index();
            chains += 1;
            let mut chain_capacity = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                chain_capacity += desc.len() as usize;
                self.rx_descs.push((desc.addr(), desc.len(), head));
            }
            // Remember the head even if it had no usable descriptor, so it is returned.
            if chain_capacity == 0 {
                self.rx_descs.push((GuestAddress(0), 0, head));
            }
            capacity += chain_capacity;
            if bad || !mergeable {
                break;
            }
        }
        if bad || capacity < len {
            // Wrong-direction buffers, or a frame too big for a non-mergeable buffer: the
            // frame is lost, the buffers go back to the driver empty.
            return self.return_empty(mem);
        }
        // num_buffers: how many chains this frame spans.
        self.rx_frame[10..12].copy_from_slice(&chains.to_le_bytes());
        let mut off = 0usize;
        let mut per_chain = std::mem::take(&mut self.rx_used);
        per_chain.clear();
        for &(addr, dlen, head) in &self.rx_descs {
            if per_chain.last().map(|c| c.0) != Some(head) {
                per_chain.push((head, 0));
            }
            let n = (dlen as usize).min(len - off);
            if n == 0 {
                continue;
            }
            if mem.write_slice(&self.rx_frame[off..off + n], addr).is_err() {
                self.rx_used = per_chain;
                return self.return_empty(mem);
            }
            off += n;
            if let Some(c) = per_chain.last_mut() {
                c.1 += n as u32;
            }
        }
        for &(head, written) in &per_chain {
            if let Err(e) = self.queues[RX_INDEX].add_used(mem, head, written) {
                return Deliver::Broken(format!("rx used ring: {e:?}"));
            }
        }
        self.rx_used = per_chain;
        self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.metrics.rx_bytes.fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Deliver::Done
    }

    fn return_empty(&mut self, mem: &GuestMemoryMmap) -> Deliver {
        self.metrics.rx_bad_descriptors.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.rx_descs.len() {
            let head = self.rx_descs[i].2;
            if last != Some(head) {
                last = Some(head);
                if let Err(e) = self.queues[RX_INDEX].add_used(mem, head, 0) {
                    return Deliver::Broken(format!("rx used ring: {e:?}"));
                }
            }
        }
        Deliver::Dropped
    }

    // ---------------------------------------------------------------- control queue

    /// Answers the driver's control commands. Only the announce acknowledgement is ours to
    /// act on; everything else is refused.
    pub fn process_ctrl(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queue_in_use(CTRL_INDEX) {
            return;
        }
        if !self.avail_ok(CTRL_INDEX, &mem) {
            return;
        }
        let mut any = false;
        while let Some(chain) = self.queues[CTRL_INDEX].pop_descriptor_chain(&mem) {
            any = true;
            let head = chain.head_index();
            let mut header = [0u8; 2];
            let mut got = 0usize;
            let mut ack_at = None;
            for desc in chain {
                if desc.is_write_only() {
                    ack_at = Some(desc.addr());
                } else if got < 2 {
                    let n = (desc.len() as usize).min(2 - got);
                    if mem.read_slice(&mut header[got..got + n], desc.addr()).is_err() {
                        break;
                    }
                    got += n;
                }
            }
            let ok = got == 2 && header == [VIRTIO_NET_CTRL_ANNOUNCE as u8, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8];
            if ok {
                self.config_status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
            }
            let status = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
            let written = match ack_at {
                Some(addr) if mem.write_obj(status, addr).is_ok() => 1,
                _ => 0,
            };
            if let Err(e) = self.queues[CTRL_INDEX].add_used(&mem, head, written) {
                return self.broken(&format!("ctrl used ring: {e:?}"));
            }
        }
        if any {
            self.signal_used(CTRL_INDEX, &mem);
        }
    }

    /// Reads what waits in the TAP into the backlog, without touching guest memory: on a
    /// migration source, frames that arrived after the device was paused travel to the
    /// destination with the device state instead of being lost.
    pub fn drain_tap(&mut self) {
        let mut buf = vec![0u8; MAX_FRAME];
        while self.backlog.len() < MAX_BACKLOG {
            match self.tap.read_frame(&mut buf) {
                Ok(n) if n > VNET_HDR_LEN => self.backlog.push_back(buf[..n].to_vec()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Adds an address the guest uses (e.g. from `ip=` on its command line).
    pub fn add_address(&mut self, ip: [u8; 4]) {
        self.addresses.add(ip);
    }

    /// The guest's IPv4 addresses known so far.
    pub fn addresses(&self) -> &[[u8; 4]] {
        &self.addresses.ipv4
    }

    /// Writes one announce round (RARP and gratuitous ARP, see [`crate::announce`]) into the
    /// TAP, as if the guest had sent it. Returns the number of frames written.
    pub fn announce(&mut self) -> usize {
        let mut n = 0;
        for frame in announce_frames(self.mac, &self.addresses.ipv4) {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&frame);
            match self.tap.write_frame(&f) {
                Ok(_) => n += 1,
                Err(e) => log::debug!("virtio-net: announce on {}: {e}", self.tap.name()),
            }
        }
        n
    }

    /// Sends, for each TCP flow of the guest, [`DUP_ACKS`] duplicate ACKs (see [`crate::flows`]): peers
    /// whose segments were lost during the move retransmit them at once instead of waiting for
    /// their retransmission timer. Returns the number of frames written.
    pub fn kick_tcp_flows(&mut self) -> usize {
        let mut n = 0;
        for ack in self.flows.dup_acks() {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&ack);
            for _ in 0..DUP_ACKS {
                if self.tap.write_frame(&f).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Asks the guest to announce itself (VIRTIO_NET_S_ANNOUNCE plus a config interrupt), if
    /// its driver accepted GUEST_ANNOUNCE. Returns whether it did.
    pub fn request_guest_announce(&mut self) -> bool {
        if self.mem.is_none() || !has(self.acked_features, VIRTIO_NET_F_GUEST_ANNOUNCE) {
            return false;
        }
        self.config_status |= VIRTIO_NET_S_ANNOUNCE as u16;
        self.interrupt.trigger(INT_CONFIG).is_ok()
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

enum Deliver {
    Done,
    Dropped,
    NoBuffers,
    Broken(String),
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
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_device::MutDeviceMmio;
    use vm_device::bus::MmioAddress;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::test_utils::*;

    const SIZE: u16 = 16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn features(extra: &[u32]) -> u64 {
        [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_RING_F_EVENT_IDX].iter().chain(extra).fold(0, |a, b| a | 1 << b)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let n = q.used().idx().load();
        (0..n).map(|i| q.used().ring().ref_at(i as usize).unwrap().load()).map(|e| (e.id(), e.len())).collect()
    }

    /// Puts `frame` behind a virtio-net header at `at` in guest memory and returns its length.
    fn put_tx_frame(rig: &Rig, at: u64, frame: &[u8]) -> u32 {
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(frame);
        rig.mem.write_slice(&buf, GuestAddress(at)).unwrap();
        buf.len() as u32
    }

    fn rx_until(rig: &Rig, q: &MockSplitQueue<'_, GuestMemoryMmap>, used_count: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            rig.net.lock().unwrap().process_rx();
            if q.used().idx().load() >= used_count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn status_needs_reset(rig: &mut Rig) -> bool {
        rig.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

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
    fn tx_sends_the_guest_frame_to_the_tap() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"hello from the guest");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        // Header and frame in two descriptors, as Linux sends them.
        txq.add_desc_chains(&[desc(BUFFERS, 12, NEXT, 1), desc(BUFFERS + 12, len - 12, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert!(rig.wire.wait_for(&frame, Duration::from_secs(2)));
        assert_eq!(used(&txq), vec![(0, 0)]);
        let m = rig.net.lock().unwrap().metrics();
        assert_eq!(m.tx_packets.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rx_delivers_the_tap_frame_and_marks_guest_memory_dirty() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        // Reset the dirty bitmap so that only what the device writes from now on is set.
        let region = rig.mem.iter().next().unwrap();
        let bitmap = (**region).bitmap();
        bitmap.reset();
        let frame = test_frame(&[0xab; 100]);
        rig.wire.send(&frame);
        assert!(rx_until(&rig, &rxq, 1), "frame not delivered");
        let (id, len) = used(&rxq)[0];
        assert_eq!((id, len as usize), (0, VNET_HDR_LEN + frame.len()));
        let mut got = vec![0u8; len as usize];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert!(bitmap.is_addr_set(BUFFERS as usize), "RX buffer page dirty");
        assert!(bitmap.is_addr_set(rxq.used_addr().0 as usize), "used ring page dirty");
        assert!(rig.irq.read().is_ok(), "interrupt raised");
    }

    /// Features of a driver that polls and suppresses interrupts with flags (no EVENT_IDX),
    /// as our guest's does.
    fn features_without_event_idx() -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mut rig = Rig::new();
        rig.init(features_without_event_idx(), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"polled");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        rig.irq.read().ok();
        // The driver polls: VRING_AVAIL_F_NO_INTERRUPT.
        rig.mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, txq.avail_addr()).unwrap();
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert_eq!(used(&txq).len(), 1);
        assert!(rig.irq.read().is_err(), "no interrupt for a driver that asked for none");
        // The driver goes to sleep and wants to hear about used buffers again.
        rig.mem.write_obj(0u16, txq.avail_addr()).unwrap();
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 1).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert_eq!(used(&txq).len(), 2);
        assert!(rig.irq.read().is_ok(), "interrupt once the driver asks for it");
    }

    #[test]
    fn rx_buffer_notifications_are_wanted_only_while_a_frame_waits() {
        let mut rig = Rig::new();
        rig.init(features_without_event_idx(), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        let used_flags = |rig: &Rig| rig.mem.read_obj::<u16>(rxq.used_addr()).unwrap();
        let no_notify = VRING_USED_F_NO_NOTIFY as u16;
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        rig.wire.send(&test_frame(b"one"));
        assert!(rx_until(&rig, &rxq, 1));
        assert_eq!(used_flags(&rig) & no_notify, no_notify, "buffers left: the driver need not notify");
        // No buffer left for the next frame: now the driver must say when it adds one.
        rig.wire.send(&test_frame(b"two"));
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx();
        assert_eq!(used_flags(&rig) & no_notify, 0, "a frame waits: notify us of new buffers");
        rxq.add_desc_chains(&[desc(BUFFERS + 0x1000, 2048, WRITE, 0)], 1).unwrap();
        assert!(rx_until(&rig, &rxq, 2));
        assert_eq!(used_flags(&rig) & no_notify, no_notify);
    }

    #[test]
    fn a_long_tx_burst_also_delivers_what_the_tap_received() {
        const BIG: u16 = 64;
        let mut rig = Rig::new();
        rig.init(features(&[]), BIG);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, BIG);
        let txq = queue(&mem, TX_INDEX, BIG);
        rxq.add_desc_chains(&[desc(BUFFERS + 0x10_0000, 2048, WRITE, 0)], 0).unwrap();
        // An ACK, say, waits in the TAP while the guest has a burst queued.
        let incoming = test_frame(b"ack");
        rig.wire.send(&incoming);
        std::thread::sleep(Duration::from_millis(50));
        let len = put_tx_frame(&rig, BUFFERS, &test_frame(b"segment"));
        let chains: Vec<_> = (0..TX_FRAMES_PER_RX_POLL as u16 + 1).map(|_| desc(BUFFERS, len, 0, 0)).collect();
        txq.add_desc_chains(&chains, 0).unwrap();
        // Only TX is processed, as when the event loop is busy with the guest's burst.
        rig.net.lock().unwrap().process_tx();
        assert_eq!(used(&txq).len(), chains.len());
        assert_eq!(used(&rxq).len(), 1, "the waiting frame went in during the burst");
        let mut got = vec![0u8; incoming.len()];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + 0x10_0000 + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, incoming);
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
    fn rx_spreads_a_frame_over_mergeable_buffers() {
        let mut rig = Rig::new();
        rig.init(features(&[VIRTIO_NET_F_MRG_RXBUF]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        let descs: Vec<_> = (0..4).map(|i| desc(BUFFERS + i * 0x1000, 64, WRITE, 0)).collect();
        rxq.add_desc_chains(&descs, 0).unwrap();
        let frame = test_frame(&[7; 150]);
        rig.wire.send(&frame);
        assert!(rx_until(&rig, &rxq, 3));
        let total = VNET_HDR_LEN + frame.len();
        assert_eq!(used(&rxq), vec![(0, 64), (1, 64), (2, (total - 128) as u32)]);
        let mut got = vec![0u8; total];
        for i in 0..3u64 {
            let n = (total - 64 * i as usize).min(64);
            rig.mem.read_slice(&mut got[64 * i as usize..][..n], GuestAddress(BUFFERS + i * 0x1000)).unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
    }

    #[test]
    fn rx_frame_waits_for_buffers_instead_of_being_lost() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        let frame = test_frame(b"early");
        rig.wire.send(&frame);
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx();
        assert!(used(&rxq).is_empty());
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        assert!(rx_until(&rig, &rxq, 1));
        let mut got = vec![0u8; frame.len()];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn hostile_tx_chains_are_dropped_and_the_device_goes_on() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"still alive");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        // Descriptor indices are absolute: each chain starts where the previous one ended.
        let chains = [
            // 0: outside guest memory.
            vec![desc(0x1_0000_0000, 100, 0, 0)],
            // 1, 2: a loop, 1 -> 2 -> 1 -> ... (virtio-queue stops it after a queue's worth).
            vec![desc(BUFFERS, 20, NEXT, 2), desc(BUFFERS, 20, NEXT, 1)],
            // 3: zero length.
            vec![desc(BUFFERS, 0, 0, 0)],
            // 4, 5: longer than any frame.
            vec![desc(BUFFERS, 40_000, NEXT, 5), desc(BUFFERS, 40_000, 0, 0)],
            // 6: a device-writable buffer on the TX queue.
            vec![desc(BUFFERS, len, WRITE, 0)],
            // 7: finally a good one.
            vec![desc(BUFFERS, len, 0, 0)],
        ];
        let mut offset = 0;
        for c in &chains {
            txq.add_desc_chains(c, offset).unwrap();
            offset += c.len() as u16;
        }
        rig.net.lock().unwrap().process_tx();
        assert!(rig.wire.wait_for(&frame, Duration::from_secs(2)), "the good frame got through");
        assert_eq!(used(&txq).len(), chains.len(), "every chain is returned");
        assert!(!status_needs_reset(&mut rig));
        let m = rig.net.lock().unwrap().metrics();
        // The loop is bounded by the queue size and goes out as one meaningless frame of
        // 16 x 20 bytes (the guest asked for it); the four others are dropped.
        assert_eq!(m.tx_dropped.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn rx_buffers_in_the_wrong_direction_or_too_small_lose_the_frame_not_the_device() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        // Read-only RX buffer, then one too small without mergeable buffers, then a good one.
        rxq.add_desc_chains(
            &[desc(BUFFERS, 2048, 0, 0), desc(BUFFERS, 16, WRITE, 0), desc(BUFFERS + 0x1000, 2048, WRITE, 0)],
            0,
        )
        .unwrap();
        for payload in [b"one".as_slice(), b"two", b"three"] {
            rig.wire.send(&test_frame(payload));
        }
        assert!(rx_until(&rig, &rxq, 3));
        let u = used(&rxq);
        assert_eq!((u[0].1, u[1].1), (0, 0), "bad buffers returned empty");
        assert!(u[2].1 > 0);
        let mut got = vec![0u8; 5];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + 0x1000 + VNET_HDR_LEN as u64 + 14)).unwrap();
        assert_eq!(&got, b"three");
        assert!(!status_needs_reset(&mut rig));
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
        assert_ne!(rig.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & crate::virtio::INT_CONFIG, 0);
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

    #[test]
    fn guest_announce_is_requested_and_acknowledged_on_the_control_queue() {
        let mut rig = Rig::new();
        rig.init(features(&[VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE]), SIZE);
        let mem = rig.mem.clone();
        let ctrlq = queue(&mem, CTRL_INDEX, SIZE);
        rig.irq.read().ok();
        assert!(rig.net.lock().unwrap().request_guest_announce());
        let mut status = [0u8; 2];
        rig.transport.mmio_read_config(6, &mut status);
        assert_ne!(u16::from_le_bytes(status) & VIRTIO_NET_S_ANNOUNCE as u16, 0);
        assert_ne!(rig.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & crate::virtio::INT_CONFIG, 0);
        assert!(rig.irq.read().is_ok());
        // The driver acknowledges; then sends a command we do not support.
        rig.mem
            .write_slice(&[VIRTIO_NET_CTRL_ANNOUNCE as u8, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8], GuestAddress(BUFFERS))
            .unwrap();
        rig.mem.write_slice(&[0xee, 0x00], GuestAddress(BUFFERS + 0x100)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(BUFFERS + 0x10)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(BUFFERS + 0x110)).unwrap();
        ctrlq
            .add_desc_chains(
                &[
                    desc(BUFFERS, 2, NEXT, 1),
                    desc(BUFFERS + 0x10, 1, WRITE, 0),
                    desc(BUFFERS + 0x100, 2, NEXT, 3),
                    desc(BUFFERS + 0x110, 1, WRITE, 0),
                ],
                0,
            )
            .unwrap();
        rig.net.lock().unwrap().process_ctrl();
        let ack: u8 = rig.mem.read_obj(GuestAddress(BUFFERS + 0x10)).unwrap();
        let nak: u8 = rig.mem.read_obj(GuestAddress(BUFFERS + 0x110)).unwrap();
        assert_eq!((ack, nak), (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8));
        rig.transport.mmio_read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status) & VIRTIO_NET_S_ANNOUNCE as u16, 0, "cleared by the ack");
    }

    #[test]
    fn addresses_are_learned_from_tx_and_announced_on_the_tap() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        // The guest ARPs for its gateway: that tells us its own address.
        let arp = guest_common::arp::garp_request(GUEST_MAC, [10, 7, 0, 2]);
        let len = put_tx_frame(&rig, BUFFERS, &arp);
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert_eq!(rig.net.lock().unwrap().addresses(), &[[10, 7, 0, 2]]);
        assert_eq!(rig.net.lock().unwrap().announce(), 3, "RARP, ARP request, ARP reply");
        let ethertype = |f: &[u8]| u16::from_be_bytes([f[12], f[13]]);
        let rarp = rig.wire.recv_matching(Duration::from_secs(2), |f| f.len() >= 14 && ethertype(f) == 0x8035);
        assert_eq!(rarp.map(|f| f[6..12].to_vec()), Some(GUEST_MAC.to_vec()));
        let garp = rig.wire.recv_matching(Duration::from_secs(2), |f| {
            f.len() >= 42 && ethertype(f) == 0x0806 && f[21] == 2 && f[28..32] == [10, 7, 0, 2]
        });
        assert!(garp.is_some(), "gratuitous ARP reply for 10.7.0.2 on the wire");
    }

    #[test]
    fn no_announce_without_the_feature() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        assert!(!rig.net.lock().unwrap().request_guest_announce());
    }
}
