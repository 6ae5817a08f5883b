// SPDX-License-Identifier: Apache-2.0
//! Unit tests of `block/src/request.rs`.

use std::sync::atomic::Ordering;

use virtio::VirtioDevice;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;
use vm_memory::GuestMemoryBackend;

use super::*;
use crate::test_utils::*;

const HDR: u64 = BUFFERS;
const STATUS: u64 = BUFFERS + 0x800;
const DATA: u64 = BUFFERS + 0x1_0000;

/// header, data (len, flags), status: the usual three-descriptor request starting at
/// descriptor `first`.
fn request(first: u16, data: Option<(u64, u32, u16)>) -> Vec<RawDescriptor> {
    match data {
        Some((addr, len, flags)) => {
            vec![desc(HDR, 16, NEXT, first + 1), desc(addr, len, flags | NEXT, first + 2), desc(STATUS, 1, WRITE, 0)]
        }
        None => vec![desc(HDR, 16, NEXT, first + 1), desc(STATUS, 1, WRITE, 0)],
    }
}

use virtio_queue::desc::RawDescriptor;

#[test]
fn writes_and_reads_go_through_the_image_and_are_tracked() {
    let mut rig = Rig::new("rw", 8 << 20, false);
    let f = features(&rig.block.lock().unwrap());
    let status = rig.init(f);
    assert_eq!(status & 0xf, 0xf);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    let block = rig.block.clone();
    block.lock().unwrap().disk().dirty().start();
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    rig.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_OUT, 8);
    q.add_desc_chains(&request(0, Some((DATA, 8192, 0))), 0).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used(&q), vec![(0, 1)]);
    let mut on_disk = vec![0u8; 8192];
    block.lock().unwrap().disk().read_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, pattern, "the image holds what the guest wrote");
    assert_eq!(block.lock().unwrap().disk().dirty().take(), vec![(4096, 8192)], "blocks 1 and 2 dirty");

    // Read it back elsewhere; the guest pages the disk wrote are dirty for migration.
    let region = rig.mem.iter().next().unwrap();
    (**region).bitmap().reset();
    rig.header(HDR, VIRTIO_BLK_T_IN, 8);
    q.add_desc_chains(&request(3, Some((DATA + 0x10_0000, 8192, WRITE))), 3).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used(&q)[1], (3, 8193), "data and status written");
    let mut back = vec![0u8; 8192];
    rig.mem.read_slice(&mut back, GuestAddress(DATA + 0x10_0000)).unwrap();
    assert_eq!(back, pattern);
    assert!((**region).bitmap().is_addr_set((DATA + 0x10_0000) as usize));
    assert!((**region).bitmap().is_addr_set((DATA + 0x10_0000 + 4096) as usize));
    assert!(rig.irq.read().is_ok(), "interrupt raised");
    let m = block.lock().unwrap().metrics();
    assert_eq!((m.reads.load(Ordering::Relaxed), m.writes.load(Ordering::Relaxed)), (1, 1));
}

#[test]
fn hostile_chains_get_an_error_status_and_the_device_goes_on() {
    let mut rig = Rig::new("hostile", 1 << 20, false);
    let f = features(&rig.block.lock().unwrap());
    rig.init(f);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    // Second header at HDR + 0x100 for requests of other types.
    let hdr2 = HDR + 0x100;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&99u32.to_le_bytes());
    rig.mem.write_slice(&h, GuestAddress(hdr2)).unwrap();
    let far = HDR + 0x200;
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&(1u64 << 20).to_le_bytes());
    rig.mem.write_slice(&h, GuestAddress(far)).unwrap();
    let wrap = HDR + 0x300;
    h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    rig.mem.write_slice(&h, GuestAddress(wrap)).unwrap();
    // (chain, expected status or None for "returned with length 0")
    let chains: Vec<(Vec<RawDescriptor>, Option<u32>)> = vec![
        // 0: no writable status byte at all.
        (vec![desc(HDR, 16, NEXT, 1), desc(DATA, 512, 0, 0)], None),
        // 2: a header of 8 bytes.
        (vec![desc(HDR, 8, NEXT, 3), desc(STATUS, 1, WRITE, 0)], Some(VIRTIO_BLK_S_IOERR)),
        // 4: a read into a device-readable buffer.
        (vec![desc(HDR, 16, NEXT, 5), desc(DATA, 512, NEXT, 6), desc(STATUS, 1, WRITE, 0)], Some(VIRTIO_BLK_S_IOERR)),
        // 7: a read into memory the guest does not have.
        (
            vec![desc(HDR, 16, NEXT, 8), desc(0x1_0000_0000, 512, WRITE | NEXT, 9), desc(STATUS, 1, WRITE, 0)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // 10: a read of 100 bytes (not whole sectors).
        (
            vec![desc(HDR, 16, NEXT, 11), desc(DATA, 100, WRITE | NEXT, 12), desc(STATUS, 1, WRITE, 0)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // 13: an unknown request type.
        (vec![desc(hdr2, 16, NEXT, 14), desc(STATUS, 1, WRITE, 0)], Some(VIRTIO_BLK_S_UNSUPP)),
        // 15: a read just past the end of the disk.
        (
            vec![desc(far, 16, NEXT, 16), desc(DATA, 512, WRITE | NEXT, 17), desc(STATUS, 1, WRITE, 0)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // 18: a sector number whose byte offset overflows.
        (
            vec![desc(wrap, 16, NEXT, 19), desc(DATA, 512, WRITE | NEXT, 20), desc(STATUS, 1, WRITE, 0)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // 21: a status byte outside guest memory.
        (vec![desc(HDR, 16, NEXT, 22), desc(0x2_0000_0000, 1, WRITE, 0)], None),
        // 23, 24: a loop (virtio-queue ends it after a queue's worth of descriptors).
        (vec![desc(HDR, 16, NEXT, 24), desc(STATUS, 1, WRITE | NEXT, 23)], Some(VIRTIO_BLK_S_IOERR)),
        // 25: finally a good read.
        (
            vec![desc(HDR, 16, NEXT, 26), desc(DATA, 512, WRITE | NEXT, 27), desc(STATUS, 1, WRITE, 0)],
            Some(VIRTIO_BLK_S_OK),
        ),
    ];
    let mut offset = 0u16;
    let block = rig.block.clone();
    let mut got = Vec::new();
    for (chain, _) in &chains {
        rig.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        q.add_desc_chains(chain, offset).unwrap();
        offset += chain.len() as u16;
        block.lock().unwrap().process_queue();
        got.push(rig.status(STATUS));
    }
    let u = used(&q);
    assert_eq!(u.len(), chains.len(), "every chain is returned");
    for (i, ((_, want), status)) in chains.iter().zip(&got).enumerate() {
        match want {
            Some(s) => assert_eq!(u32::from(*status), *s, "chain {i}"),
            None => assert_eq!(u[i].1, 0, "chain {i} returned with length 0"),
        }
    }
    assert_eq!(rig.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    let m = block.lock().unwrap().metrics();
    assert_eq!(m.bad_descriptors.load(Ordering::Relaxed), 2);
    assert_eq!(m.unsupported.load(Ordering::Relaxed), 1);
}

#[test]
fn an_avail_index_beyond_the_queue_needs_reset() {
    let mut rig = Rig::new("avail", 1 << 20, false);
    let f = features(&rig.block.lock().unwrap());
    rig.init(f);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    q.avail().idx().store(100);
    rig.block.lock().unwrap().process_queue();
    assert!(used(&q).is_empty());
    assert_ne!(rig.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn a_read_only_disk_refuses_writes_with_an_error_status() {
    let mut rig = Rig::new("ro", 1 << 20, true);
    let f = features(&rig.block.lock().unwrap());
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0, "the driver is told");
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    rig.init(f);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    rig.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_OUT, 0);
    q.add_desc_chains(&request(0, Some((DATA, 512, 0))), 0).unwrap();
    rig.block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_IOERR as u8);
    let mut on_disk = [1u8; 512];
    rig.block.lock().unwrap().disk().read_at(&mut on_disk, 0).unwrap();
    assert_eq!(on_disk, [0u8; 512], "nothing written");
    // Reads and flushes still work.
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    q.add_desc_chains(&request(3, Some((DATA, 512, WRITE))), 3).unwrap();
    rig.block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    q.add_desc_chains(&request(6, None), 6).unwrap();
    rig.block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn discard_and_write_zeroes_punch_holes_and_flush_and_get_id_answer() {
    let mut rig = Rig::new("discard", 4 << 20, false);
    let f = features(&rig.block.lock().unwrap());
    rig.init(f);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    let block = rig.block.clone();
    block.lock().unwrap().disk().write_at(&vec![7u8; 1 << 20], 0).unwrap();
    let allocated = |b: &Block| b.disk().allocated_extents().unwrap().iter().map(|e| e.1).sum::<u64>();
    assert!(allocated(&block.lock().unwrap()) >= 1 << 20);
    // Discard the first 512 KiB, write-zeroes (unmap) the next 512 KiB.
    let seg = |sector: u64, sectors: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    rig.mem.write_slice(&seg(0, 1024, 0), GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    q.add_desc_chains(&request(0, Some((DATA, 16, 0))), 0).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    rig.mem.write_slice(&seg(1024, 1024, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    q.add_desc_chains(&request(3, Some((DATA, 16, 0))), 3).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert!(allocated(&block.lock().unwrap()) < 64 << 10, "holes: {}", allocated(&block.lock().unwrap()));
    let mut back = vec![1u8; 1 << 20];
    block.lock().unwrap().disk().read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|b| *b == 0));
    // A discard beyond the disk is an error, not a hole somewhere else.
    rig.mem.write_slice(&seg(8191, 2, 0), GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    q.add_desc_chains(&request(6, Some((DATA, 16, 0))), 6).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_IOERR as u8);
    // Flush and GET_ID.
    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    q.add_desc_chains(&request(9, None), 9).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    rig.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    q.add_desc_chains(&request(11, Some((DATA, 20, WRITE))), 11).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 9];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"test-disk");
}

/// A small tmpfs of its own, unmounted (and its directory removed) when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(bytes: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-blk-smallfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "vmm-blk-test"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs (tests need root)");
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_host_file_system_is_an_io_error_for_the_guest_not_a_panic() {
    let fs = SmallFs::mount(1 << 20);
    let mut rig = Rig::on(TempImage::in_dir(&fs.0, "full", 8 << 20), false);
    let f = features(&rig.block.lock().unwrap());
    rig.init(f);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    let block = rig.block.clone();
    rig.mem.write_slice(&vec![0x5a; 1 << 20], GuestAddress(DATA)).unwrap();
    let mut statuses = Vec::new();
    for i in 0..3u16 {
        rig.header(HDR, VIRTIO_BLK_T_OUT, u64::from(i) * 2048);
        q.add_desc_chains(&request(i * 3, Some((DATA, 1 << 20, 0))), i * 3).unwrap();
        block.lock().unwrap().process_queue();
        statuses.push(u32::from(rig.status(STATUS)));
    }
    assert!(statuses.contains(&VIRTIO_BLK_S_IOERR), "ENOSPC reaches the guest as IOERR: {statuses:?}");
    assert!(block.lock().unwrap().metrics().io_errors.load(Ordering::Relaxed) >= 1);
    // The device still works: a read succeeds.
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    q.add_desc_chains(&request(9, Some((DATA, 4096, WRITE))), 9).unwrap();
    block.lock().unwrap().process_queue();
    assert_eq!(rig.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert!(!block.lock().unwrap().needs_reset());
    drop(rig);
}

#[test]
fn the_io_thread_answers_a_notification() {
    let mut rig = Rig::new("worker", 1 << 20, false);
    let f = features(&rig.block.lock().unwrap());
    rig.init(f);
    let mem = rig.mem.clone();
    let q = queue(&mem);
    let worker = crate::Worker::spawn(rig.block.clone(), "test-blk".into(), || {}).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    q.add_desc_chains(&request(0, Some((DATA, 512, WRITE))), 0).unwrap();
    // What KVM's ioeventfd does when the driver writes QueueNotify.
    rig.block.lock().unwrap().queue_events()[0].write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used(&q).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(used(&q), vec![(0, 513)]);
    drop(worker);
}
