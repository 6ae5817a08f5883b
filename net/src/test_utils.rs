// SPDX-License-Identifier: Apache-2.0
//! Test helpers: a private network namespace per test thread with a real TAP, a raw packet
//! socket on it (the "wire"), and a driver that sets the device up through its MMIO registers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio::{GuestMemoryMmap, MmioTransport};
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_device::MutDeviceMmio;
use vm_device::bus::MmioAddress;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{CTRL_INDEX, Net, RX_INDEX, TX_INDEX};
use crate::tap::VNET_HDR_LEN;

pub const TAP_NAME: &str = "vmmtest0";
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// An EtherType for local experiments, so test frames are easy to pick out.
pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// Moves this thread into a new, empty network namespace: nothing leaks out of the test and
/// tests cannot see each other's TAPs. The namespace disappears with the thread.
pub fn private_netns() {
    // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET) failed (tests need root): {}", std::io::Error::last_os_error());
    // No IPv6 autoconfiguration chatter on the TAP.
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").ok();
}

fn ifindex(name: &str) -> i32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx as i32
}

pub fn link_up(name: &str) {
    let st = std::process::Command::new("ip").args(["link", "set", name, "up"]).status().unwrap();
    assert!(st.success());
}

/// A raw packet socket on the TAP interface: what it sends, the device reads from the TAP;
/// what the device writes to the TAP, it receives.
pub struct Wire {
    fd: OwnedFd,
}

impl Wire {
    pub fn open(name: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = ifindex(name);
        // SAFETY: binding with a correctly sized sockaddr_ll.
        let rc = unsafe {
            libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: setting a timeval option with its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Wire { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sending from a valid buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    /// The next test frame the device wrote to the TAP, if one comes within `timeout`.
    pub fn recv_test_frame(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.recv_matching(timeout, |f| f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == TEST_ETHERTYPE)
    }

    /// The next frame the device wrote to the TAP that satisfies `pred`.
    pub fn recv_matching(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        while std::time::Instant::now() < deadline {
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receiving into a valid buffer and address of the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            // Frames we sent ourselves show up as outgoing; skip them.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if pred(frame) {
                return Some(frame.to_vec());
            }
        }
        None
    }
}

impl Wire {
    /// Whether `frame` is among the test frames the device writes within `timeout`.
    pub fn wait_for(&self, frame: &[u8], timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(got) = self.recv_test_frame(deadline.saturating_duration_since(std::time::Instant::now())) {
            if got == frame {
                return true;
            }
        }
        false
    }
}

/// An Ethernet frame from `src` to the guest with `payload`.
pub fn test_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A device on a fresh TAP (up), with its transport and guest memory.
pub struct Rig {
    pub mem: GuestMemoryMmap,
    pub net: Arc<Mutex<Net>>,
    pub transport: MmioTransport,
    pub wire: Wire,
    pub irq: EventFd,
}

pub const MEM_SIZE: usize = 16 << 20;
pub const RX_RING: GuestAddress = GuestAddress(0x1_0000);
pub const TX_RING: GuestAddress = GuestAddress(0x4_0000);
pub const CTRL_RING: GuestAddress = GuestAddress(0x7_0000);
/// Buffers start here.
pub const BUFFERS: u64 = 0x10_0000;

impl Rig {
    pub fn new() -> Self {
        private_netns();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let net = Net::new(TAP_NAME, GUEST_MAC, irq.try_clone().unwrap()).unwrap();
        link_up(TAP_NAME);
        let wire = Wire::open(TAP_NAME);
        let net = Arc::new(Mutex::new(net));
        let transport = MmioTransport::new(mem.clone(), net.clone());
        Rig { mem, net, transport, wire, irq }
    }

    pub fn write_reg(&mut self, reg: u32, v: u32) {
        self.transport.mmio_write(MmioAddress(0), u64::from(reg), &v.to_le_bytes());
    }

    pub fn read_reg(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.mmio_read(MmioAddress(0), u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn set_queue(&mut self, index: usize, ring: GuestAddress, size: u16) {
        let mem = self.mem.clone();
        let q = MockSplitQueue::create(&mem, ring, size);
        let addrs = [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table_addr()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, q.used_addr()),
        ];
        self.write_reg(VIRTIO_MMIO_QUEUE_SEL, index as u32);
        self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        for (lo, addr) in addrs {
            self.write_reg(lo, addr.0 as u32);
            self.write_reg(lo + 4, (addr.0 >> 32) as u32);
        }
        self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Runs the driver's init sequence, accepting `features`, with queues of `size`.
    pub fn init(&mut self, features: u64, size: u16) -> u32 {
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for sel in 0..2u32 {
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, s);
        self.set_queue(RX_INDEX, RX_RING, size);
        self.set_queue(TX_INDEX, TX_RING, size);
        self.set_queue(CTRL_INDEX, CTRL_RING, size);
        self.write_reg(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read_reg(VIRTIO_MMIO_STATUS)
    }
}

/// The driver's view of queue `index` in `mem` (the memory the device uses). Creating it
/// clears the rings, so take it once, right after [`Rig::init`].
pub fn queue(mem: &GuestMemoryMmap, index: usize, size: u16) -> MockSplitQueue<'_, GuestMemoryMmap> {
    let ring = [RX_RING, TX_RING, CTRL_RING][index];
    MockSplitQueue::create(mem, ring, size)
}

pub const SIZE: u16 = 16;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

pub fn features(extra: &[u32]) -> u64 {
    [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_RING_F_EVENT_IDX].iter().chain(extra).fold(0, |a, b| a | 1 << b)
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

pub fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = q.used().idx().load();
    (0..n).map(|i| q.used().ring().ref_at(i as usize).unwrap().load()).map(|e| (e.id(), e.len())).collect()
}

/// Puts `frame` behind a virtio-net header at `at` in guest memory and returns its length.
pub fn put_tx_frame(rig: &Rig, at: u64, frame: &[u8]) -> u32 {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(frame);
    rig.mem.write_slice(&buf, GuestAddress(at)).unwrap();
    buf.len() as u32
}

pub fn rx_until(rig: &Rig, q: &MockSplitQueue<'_, GuestMemoryMmap>, used_count: u16) -> bool {
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

pub fn status_needs_reset(rig: &mut Rig) -> bool {
    rig.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
}

/// Features of a driver that polls and suppresses interrupts with flags (no EVENT_IDX),
/// as our guest's does.
pub fn features_without_event_idx() -> u64 {
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
}
