// SPDX-License-Identifier: Apache-2.0
//! A virtio-net driver over virtio-mmio (modern, version 2), for smoltcp.
//!
//! Every register access is an MMIO exit (about 23 µs from user mode here), so registers are
//! touched at setup, to notify the device when it asks to be notified, and to acknowledge an
//! interrupt that woke us; frames themselves move through the rings in memory. Buffers are
//! fixed 2 KiB slots, one per descriptor: no offloads are negotiated, so no frame exceeds the
//! 1514-byte Ethernet MTU.

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtqueue::{DESC_F_NEXT, DESC_F_WRITE, VirtQueue};

pub(crate) const MAGIC: u32 = 0x7472_6976;
pub(crate) const REG_MAGIC: usize = 0x000;
pub(crate) const REG_VERSION: usize = 0x004;
pub(crate) const REG_DEVICE_ID: usize = 0x008;
pub(crate) const REG_DEVICE_FEATURES: usize = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: usize = 0x014;
pub(crate) const REG_DRIVER_FEATURES: usize = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: usize = 0x024;
pub(crate) const REG_QUEUE_SEL: usize = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: usize = 0x034;
pub(crate) const REG_QUEUE_NUM: usize = 0x038;
pub(crate) const REG_QUEUE_READY: usize = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: usize = 0x050;
pub(crate) const REG_INTERRUPT_STATUS: usize = 0x060;
pub(crate) const REG_INTERRUPT_ACK: usize = 0x064;
pub(crate) const REG_STATUS: usize = 0x070;
pub(crate) const REG_QUEUE_DESC: usize = 0x080;
pub(crate) const REG_QUEUE_AVAIL: usize = 0x090;
pub(crate) const REG_QUEUE_USED: usize = 0x0a0;
pub(crate) const REG_CONFIG: usize = 0x100;

pub(crate) const STATUS_ACK: u32 = 1;
pub(crate) const STATUS_DRIVER: u32 = 2;
pub(crate) const STATUS_DRIVER_OK: u32 = 4;
pub(crate) const STATUS_FEATURES_OK: u32 = 8;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;
pub(crate) const F_VERSION_1: u64 = 1 << 32;
/// Config space: `status` after the 6-byte MAC.
const CONFIG_STATUS: usize = 6;
pub(crate) const STATUS_ANNOUNCE: u8 = 2;
/// virtio_net_ctrl_hdr of the announce acknowledgement: class 3, command 0.
const CTRL_ANNOUNCE_ACK: [u8; 2] = [3, 0];
const DEVICE_ID_NET: u32 = 1;

const RX: u32 = 0;
const TX: u32 = 1;
const CTRL: u32 = 2;
/// The control queue carries one command at a time.
const CTRL_QUEUE_SIZE: u16 = 4;
/// Entries per queue (the device may offer fewer).
const QUEUE_SIZE: u16 = 256;
/// virtio_net_hdr_v1.
const HDR_LEN: usize = 12;
const BUF_SIZE: usize = 2048;
/// Ethernet MTU as smoltcp counts it (with the 14-byte header).
const MTU: usize = 1514;

/// Why a device could not be used.
#[derive(Debug)]
pub enum InitError {
    NotVirtio,
    NotNet,
    NotBlock,
    FeaturesRefused,
    NoQueue(u32),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NotVirtio => write!(f, "not a virtio-mmio version 2 device"),
            InitError::NotNet => write!(f, "not a network device"),
            InitError::NotBlock => write!(f, "not a block device"),
            InitError::FeaturesRefused => write!(f, "the device refused virtio 1.x"),
            InitError::NoQueue(q) => write!(f, "the device has no queue {q}"),
        }
    }
}

/// Interrupt reason in InterruptStatus: the device's configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The MMIO window of one virtio-mmio device.
pub(crate) struct Regs(pub(crate) usize);

impl Regs {
    pub(crate) fn read(&self, reg: usize) -> u32 {
        // SAFETY: the window is identity-mapped and user-accessible; registers are 32-bit.
        unsafe { read_volatile((self.0 + reg) as *const u32) }
    }
    pub(crate) fn write(&self, reg: usize, v: u32) {
        // SAFETY: as above.
        unsafe { write_volatile((self.0 + reg) as *mut u32, v) }
    }
    fn read_config_u8(&self, offset: usize) -> u8 {
        // SAFETY: as above; config space allows byte access.
        unsafe { read_volatile((self.0 + REG_CONFIG + offset) as *const u8) }
    }
}

/// Receive side: one buffer per descriptor, all offered to the device.
pub struct Rx {
    queue: VirtQueue,
    buffers: Vec<u8>,
    /// Buffers consumed since the last publish.
    pending: bool,
}

/// Transmit side: descriptors are free or in flight.
pub struct Tx {
    queue: VirtQueue,
    buffers: Vec<u8>,
    free: Vec<u16>,
    pending: bool,
    /// Used when the ring is full, so a token smoltcp holds can still be consumed.
    scratch: Vec<u8>,
    pub dropped: u64,
}

/// The control queue, used only to acknowledge an announce.
struct Ctrl {
    queue: VirtQueue,
    /// Command header at 0, status byte (written by the device) at 8.
    buf: Vec<u8>,
}

pub struct VirtioNet {
    regs: Regs,
    pub mac: [u8; 6],
    pub rx: Rx,
    pub tx: Tx,
    ctrl: Option<Ctrl>,
}

impl VirtioNet {
    /// Resets and sets up the device at `base`: features, both queues, RX buffers.
    pub fn init(base: u64) -> Result<Self, InitError> {
        let regs = Regs(base as usize);
        if regs.read(REG_MAGIC) != MAGIC || regs.read(REG_VERSION) != 2 {
            return Err(InitError::NotVirtio);
        }
        if regs.read(REG_DEVICE_ID) != DEVICE_ID_NET {
            return Err(InitError::NotNet);
        }
        regs.write(REG_STATUS, 0);
        regs.write(REG_STATUS, STATUS_ACK);
        regs.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
        regs.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = u64::from(regs.read(REG_DEVICE_FEATURES));
        regs.write(REG_DEVICE_FEATURES_SEL, 0);
        let offered = (high << 32) | u64::from(regs.read(REG_DEVICE_FEATURES));
        let mut wanted = offered & (F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE);
        // Acknowledging an announce needs the control queue.
        if wanted & F_CTRL_VQ == 0 {
            wanted &= !F_GUEST_ANNOUNCE;
        }
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
        let rxq = setup_queue(&regs, RX, QUEUE_SIZE)?;
        let txq = setup_queue(&regs, TX, QUEUE_SIZE)?;
        let ctrl = if wanted & F_CTRL_VQ != 0 {
            Some(Ctrl { queue: setup_queue(&regs, CTRL, CTRL_QUEUE_SIZE)?, buf: vec![0; 16] })
        } else {
            None
        };
        let mut mac = [0u8; 6];
        if wanted & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = regs.read_config_u8(i);
            }
        } else {
            mac = [0x02, 0, 0, 0, 0, 1];
        }
        regs.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);

        let rx_n = usize::from(rxq.size);
        let mut rx = Rx { queue: rxq, buffers: vec![0; rx_n * BUF_SIZE], pending: false };
        for id in 0..rx.queue.size {
            let addr = rx.buffers.as_ptr() as u64 + u64::from(id) * BUF_SIZE as u64;
            rx.queue.set_desc(id, addr, BUF_SIZE as u32, DESC_F_WRITE);
            rx.queue.push(id);
        }
        rx.pending = true;
        let tx_n = usize::from(txq.size);
        let mut tx = Tx {
            free: (0..txq.size).rev().collect(),
            queue: txq,
            buffers: vec![0; tx_n * BUF_SIZE],
            pending: false,
            scratch: vec![0; BUF_SIZE],
            dropped: 0,
        };
        for id in 0..tx.queue.size {
            let addr = tx.buffers.as_ptr() as u64 + u64::from(id) * BUF_SIZE as u64;
            tx.queue.set_desc(id, addr, 0, 0);
        }
        // Polling by default: interrupts only while we sleep (see `arm_interrupts`).
        rx.queue.set_interrupts(false);
        tx.queue.set_interrupts(false);
        let mut dev = VirtioNet { regs, mac, rx, tx, ctrl };
        dev.flush();
        Ok(dev)
    }

    /// Publishes what was queued on both rings and notifies the device where it asks for it.
    pub fn flush(&mut self) {
        if self.rx.pending {
            self.rx.pending = false;
            if self.rx.queue.publish() {
                self.regs.write(REG_QUEUE_NOTIFY, RX);
            }
        }
        if self.tx.pending {
            self.tx.pending = false;
            if self.tx.queue.publish() {
                self.regs.write(REG_QUEUE_NOTIFY, TX);
            }
        }
    }

    /// Whether the device asks us to announce ourselves (VIRTIO_NET_S_ANNOUNCE, set after a
    /// migration). One config-space read: call it when the device raised a config interrupt, or
    /// now and then.
    pub fn announce_requested(&self) -> bool {
        self.ctrl.is_some() && self.regs.read_config_u8(CONFIG_STATUS) & STATUS_ANNOUNCE != 0
    }

    /// Tells the device the announce is done (VIRTIO_NET_CTRL_ANNOUNCE_ACK), which clears the
    /// request.
    pub fn ack_announce(&mut self) {
        let Some(ctrl) = self.ctrl.as_mut() else { return };
        // Take back the previous command's descriptors; the device answers quickly.
        while ctrl.queue.pop_used().is_some() {}
        ctrl.buf[..2].copy_from_slice(&CTRL_ANNOUNCE_ACK);
        ctrl.buf[8] = 0xff;
        let base = ctrl.buf.as_ptr() as u64;
        ctrl.queue.set_desc_next(0, base, 2, DESC_F_NEXT, 1);
        ctrl.queue.set_desc(1, base + 8, 1, DESC_F_WRITE);
        ctrl.queue.push(0);
        if ctrl.queue.publish() {
            self.regs.write(REG_QUEUE_NOTIFY, CTRL);
        }
    }

    /// Sends a frame we built ourselves (not from smoltcp), e.g. a gratuitous ARP. Returns
    /// false if the TX ring is full.
    pub fn send_raw(&mut self, frame: &[u8]) -> bool {
        let tx = &mut self.tx;
        tx.reclaim();
        let len = frame.len().min(BUF_SIZE - HDR_LEN);
        let Some(id) = tx.free.pop() else { return false };
        let start = usize::from(id) * BUF_SIZE;
        tx.buffers[start..start + HDR_LEN].fill(0);
        tx.buffers[start + HDR_LEN..start + HDR_LEN + len].copy_from_slice(&frame[..len]);
        tx.queue.set_len(id, (HDR_LEN + len) as u32);
        tx.queue.push(id);
        tx.pending = true;
        true
    }

    /// Whether a received frame is waiting.
    pub fn rx_ready(&self) -> bool {
        self.rx.queue.has_used()
    }

    /// Before sleeping: ask for an interrupt on the next received frame. Returns false if one
    /// already arrived (then do not sleep).
    pub fn arm_interrupts(&mut self) -> bool {
        self.rx.queue.set_interrupts(true);
        !self.rx.queue.has_used()
    }

    /// After waking: back to polling. Acknowledges the device's interrupt if `woken` says it
    /// raised one, and returns its reasons.
    pub fn disarm_interrupts(&mut self, woken: bool) -> u32 {
        self.rx.queue.set_interrupts(false);
        if !woken {
            return 0;
        }
        let status = self.regs.read(REG_INTERRUPT_STATUS);
        if status != 0 {
            self.regs.write(REG_INTERRUPT_ACK, status);
        }
        status
    }
}

pub(crate) fn setup_queue(regs: &Regs, index: u32, wanted: u16) -> Result<VirtQueue, InitError> {
    regs.write(REG_QUEUE_SEL, index);
    let max = regs.read(REG_QUEUE_NUM_MAX);
    if max == 0 {
        return Err(InitError::NoQueue(index));
    }
    // Queue sizes are powers of two; take the largest one both sides allow.
    let size = (max.min(u32::from(wanted)) as u16).next_power_of_two();
    let size = if u32::from(size) > max { size / 2 } else { size };
    let q = VirtQueue::new(size);
    regs.write(REG_QUEUE_NUM, u32::from(size));
    for (reg, addr) in
        [(REG_QUEUE_DESC, q.desc_addr()), (REG_QUEUE_AVAIL, q.avail_addr()), (REG_QUEUE_USED, q.used_addr())]
    {
        regs.write(reg, addr as u32);
        regs.write(reg + 4, (addr >> 32) as u32);
    }
    regs.write(REG_QUEUE_READY, 1);
    Ok(q)
}

pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let start = usize::from(self.id) * BUF_SIZE;
        let len = self.len.clamp(HDR_LEN, BUF_SIZE);
        let r = f(&self.rx.buffers[start + HDR_LEN..start + len]);
        // Give the buffer back; it becomes visible to the device at the next flush.
        self.rx.queue.push(self.id);
        self.rx.pending = true;
        r
    }
}

impl Tx {
    /// Takes back descriptors the device is done with.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.queue.pop_used() {
            self.free.push(id);
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        tx.reclaim();
        let len = len.min(BUF_SIZE - HDR_LEN);
        let Some(id) = tx.free.pop() else {
            // Ring full: smoltcp already holds this token, so let it build the frame, and
            // lose it; TCP will send it again.
            tx.dropped += 1;
            return f(&mut tx.scratch[..len]);
        };
        let start = usize::from(id) * BUF_SIZE;
        let buf = &mut tx.buffers[start..start + HDR_LEN + len];
        buf[..HDR_LEN].fill(0);
        let r = f(&mut buf[HDR_LEN..]);
        tx.queue.set_len(id, (HDR_LEN + len) as u32);
        tx.queue.push(id);
        tx.pending = true;
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (id, len) = self.rx.queue.pop_used()?;
        Some((RxToken { rx: &mut self.rx, id, len: len as usize }, TxToken { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}
