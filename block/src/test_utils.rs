// SPDX-License-Identifier: Apache-2.0
//! Test helpers: a device on a temporary sparse image, its transport and guest memory, a driver
//! that sets it up through its MMIO registers, and requests written the way a driver writes them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use virtio::{GuestMemoryMmap, MmioTransport};
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_device::MutDeviceMmio;
use vm_device::bus::MmioAddress;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::Block;
use crate::disk::Disk;

pub const MEM_SIZE: usize = 16 << 20;
pub const RING: GuestAddress = GuestAddress(0x1_0000);
/// Request headers, data and status bytes start here.
pub const BUFFERS: u64 = 0x10_0000;
pub const SIZE: u16 = 64;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A temporary image path, removed when dropped.
pub struct TempImage(pub PathBuf);

impl TempImage {
    pub fn new(name: &str, size: u64) -> Self {
        Self::in_dir(&std::env::temp_dir(), name, size)
    }

    pub fn in_dir(dir: &std::path::Path, name: &str, size: u64) -> Self {
        let p = dir.join(format!("vmm-blk-{}-{name}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        TempImage(p)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct Rig {
    pub mem: GuestMemoryMmap,
    pub block: Arc<Mutex<Block>>,
    pub transport: MmioTransport,
    pub irq: EventFd,
    /// Removed with the rig.
    pub _image: TempImage,
}

impl Rig {
    pub fn new(name: &str, size: u64, read_only: bool) -> Self {
        Self::on(TempImage::new(name, size), read_only)
    }

    pub fn on(image: TempImage, read_only: bool) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let disk = Disk::open(&image.0, read_only, false).unwrap();
        let block = Arc::new(Mutex::new(Block::new(disk, "test-disk", irq.try_clone().unwrap()).unwrap()));
        let transport = MmioTransport::new(mem.clone(), block.clone());
        Rig { mem, block, transport, irq, _image: image }
    }

    pub fn write_reg(&mut self, reg: u32, v: u32) {
        self.transport.mmio_write(MmioAddress(0), u64::from(reg), &v.to_le_bytes());
    }

    pub fn read_reg(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.mmio_read(MmioAddress(0), u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    /// Runs the driver's init sequence, accepting `features`; returns the status. Take the
    /// driver's view of the queue with [`queue`] afterwards.
    pub fn init(&mut self, features: u64) -> u32 {
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for sel in 0..2u32 {
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, s);
        let mem = self.mem.clone();
        let q = MockSplitQueue::create(&mem, RING, SIZE);
        let addrs = [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table_addr()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, q.used_addr()),
        ];
        self.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(SIZE));
        for (lo, addr) in addrs {
            self.write_reg(lo, addr.0 as u32);
            self.write_reg(lo + 4, (addr.0 >> 32) as u32);
        }
        self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        self.write_reg(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read_reg(VIRTIO_MMIO_STATUS)
    }

    pub fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    pub fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

pub fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = q.used().idx().load();
    (0..n).map(|i| q.used().ring().ref_at(i as usize).unwrap().load()).map(|e| (e.id(), e.len())).collect()
}

/// Features a Linux driver accepts.
pub fn features(block: &Block) -> u64 {
    use virtio::VirtioDevice;
    block.avail_features()
}

/// The driver's view of the request queue (creating it clears the rings: take it once, right
/// after [`Rig::init`]).
pub fn queue(mem: &GuestMemoryMmap) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(mem, RING, SIZE)
}
