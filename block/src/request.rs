// SPDX-License-Identifier: Apache-2.0
//! Carrying out the driver's requests: each descriptor chain is a 16-byte header
//! (`type`, `ioprio`, `sector`) in device-readable buffers, then the data, then one
//! device-writable status byte at the very end. The framing is not assumed beyond that (the
//! header and the data may share or split descriptors, as the spec allows).
//!
//! Nothing the driver writes can panic or hang the device: a chain without a writable status
//! byte is returned with length 0 and counted; any other problem (buffers in the wrong
//! direction or outside guest memory, a range beyond the disk, a length that is not whole
//! sectors, a write to a read-only disk) and any host I/O error (ENOSPC, EIO) is answered with
//! VIRTIO_BLK_S_IOERR; an unknown type with VIRTIO_BLK_S_UNSUPP. Data moves in one
//! `preadv`/`pwritev` between the file and guest memory; guest memory the disk wrote (reads)
//! is marked dirty for migration.

use std::sync::atomic::Ordering;

use virtio::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::{Block, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, REQUEST_QUEUE};
use crate::disk::SECTOR_SIZE;

const HEADER_LEN: usize = 16;
/// One discard or write-zeroes segment: sector (u64), num_sectors (u32), flags (u32).
const DISCARD_SEG_LEN: usize = 16;

/// Why a request failed, for the log (the driver only sees a status byte).
#[derive(Debug)]
enum Fail {
    /// VIRTIO_BLK_S_IOERR.
    Io(String),
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl Block {
    /// Carries out every request the driver queued, until the queue is empty.
    pub fn process_queue(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queues[REQUEST_QUEUE].ready() {
            return;
        }
        loop {
            if let Err(e) = virtio::queue::check_avail(&mut self.queues[REQUEST_QUEUE], &mem) {
                return self.broken(&format!("request queue: {e:?}"));
            }
            if let Err(e) = self.queues[REQUEST_QUEUE].disable_notification(&mem) {
                return self.broken(&format!("request queue: {e:?}"));
            }
            let mut any = false;
            while let Some(chain) = self.queues[REQUEST_QUEUE].pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                self.segs.clear();
                for d in chain {
                    self.segs.push((d.addr().0, d.len(), d.is_write_only()));
                }
                let used = self.execute(&mem);
                if let Err(e) = self.queues[REQUEST_QUEUE].add_used(&mem, head, used) {
                    return self.broken(&format!("used ring: {e:?}"));
                }
                any = true;
            }
            if any {
                self.signal_used(&mem);
            }
            match self.queues[REQUEST_QUEUE].enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => return self.broken(&format!("request queue: {e:?}")),
            }
        }
    }

    /// Carries out the request in `self.segs`; returns the bytes written into the driver's
    /// buffers (the used length).
    fn execute(&mut self, mem: &GuestMemoryMmap) -> u32 {
        // The status byte: the last byte of the last descriptor, which must be device-writable.
        let status_addr = match self.segs.last_mut() {
            Some((addr, len, true)) if *len >= 1 => {
                *len -= 1;
                addr.checked_add(u64::from(*len))
            }
            _ => None,
        };
        let Some(status_addr) = status_addr else {
            self.metrics.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            log::debug!("virtio-blk: a chain without a writable status byte, returned unanswered");
            return 0;
        };
        if self.segs.last().is_some_and(|s| s.1 == 0) {
            self.segs.pop();
        }
        let (status, written) = match self.run(mem) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(Fail::Io(why)) => {
                self.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
                log::debug!("virtio-blk: request failed: {why}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(Fail::Unsupported(t)) => {
                self.metrics.unsupported.fetch_add(1, Ordering::Relaxed);
                log::debug!("virtio-blk: unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        };
        if mem.write_obj(status as u8, GuestAddress(status_addr)).is_err() {
            self.metrics.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        written.saturating_add(1)
    }

    /// Parses and carries out one request; returns the data bytes written to the driver.
    fn run(&mut self, mem: &GuestMemoryMmap) -> Result<u32, Fail> {
        let header = self.take_header(mem)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let data_len: u64 = self.segs.iter().map(|s| u64::from(s.1)).sum();
        let read_only = self.disk.read_only();
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = kind == VIRTIO_BLK_T_OUT;
                if write && read_only {
                    return Err(Fail::Io("write to a read-only disk".into()));
                }
                // Reads fill device-writable buffers, writes take device-readable ones.
                if self.segs.iter().any(|s| s.2 == write) {
                    return Err(Fail::Io("data buffers in the wrong direction".into()));
                }
                let offset = self.check_range(sector, data_len)?;
                self.transfer(mem, offset, write)?;
                let m = &self.metrics;
                if write {
                    m.writes.fetch_add(1, Ordering::Relaxed);
                    m.write_bytes.fetch_add(data_len, Ordering::Relaxed);
                    Ok(0)
                } else {
                    m.reads.fetch_add(1, Ordering::Relaxed);
                    m.read_bytes.fetch_add(data_len, Ordering::Relaxed);
                    // Bounded by guest memory, which `transfer` checked.
                    Ok(u32::try_from(data_len).unwrap_or(u32::MAX))
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
                if read_only {
                    return Ok(0);
                }
                self.disk.flush().map_err(|e| Fail::Io(format!("fdatasync: {e}")))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = self.id.len().min(id.len());
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let mut done = 0usize;
                for &(addr, len, writable) in &self.segs {
                    if !writable {
                        return Err(Fail::Io("GET_ID buffer is not writable".into()));
                    }
                    let n = (len as usize).min(id.len() - done);
                    mem.write_slice(&id[done..done + n], GuestAddress(addr))
                        .map_err(|e| Fail::Io(format!("GET_ID buffer: {e}")))?;
                    done += n;
                }
                Ok(done as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if read_only {
                    return Err(Fail::Io("discard or write-zeroes on a read-only disk".into()));
                }
                self.discard(mem, kind == VIRTIO_BLK_T_WRITE_ZEROES)?;
                self.metrics.discards.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            other => Err(Fail::Unsupported(other)),
        }
    }

    /// Takes the 16-byte header off the front of `self.segs` (device-readable bytes only).
    fn take_header(&mut self, mem: &GuestMemoryMmap) -> Result<[u8; HEADER_LEN], Fail> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        let mut used = 0;
        for seg in self.segs.iter_mut() {
            if got == HEADER_LEN {
                break;
            }
            if seg.2 {
                return Err(Fail::Io("the request header is not device-readable".into()));
            }
            let n = (seg.1 as usize).min(HEADER_LEN - got);
            mem.read_slice(&mut header[got..got + n], GuestAddress(seg.0))
                .map_err(|e| Fail::Io(format!("request header: {e}")))?;
            got += n;
            seg.0 = seg.0.wrapping_add(n as u64);
            seg.1 -= n as u32;
            if seg.1 == 0 {
                used += 1;
            }
        }
        if got < HEADER_LEN {
            return Err(Fail::Io(format!("a request header of {got} bytes")));
        }
        self.segs.drain(..used);
        Ok(header)
    }

    /// Checks that `len` bytes from `sector` are whole sectors within the disk; returns the
    /// byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Fail> {
        if len % SECTOR_SIZE != 0 {
            return Err(Fail::Io(format!("{len} bytes is not a whole number of sectors")));
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(|| Fail::Io(format!("sector {sector}")))?;
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.size() => Ok(offset),
            _ => Err(Fail::Io(format!("sectors {sector}+{} beyond the disk", len / SECTOR_SIZE))),
        }
    }

    /// Moves the data of `self.segs` between guest memory and the disk at `offset`.
    fn transfer(&self, mem: &GuestMemoryMmap, offset: u64, write: bool) -> Result<(), Fail> {
        let mut slices = Vec::with_capacity(self.segs.len());
        for &(addr, len, _) in &self.segs {
            for s in mem.get_slices(GuestAddress(addr), len as usize) {
                slices.push(s.map_err(|e| Fail::Io(format!("buffer at {addr:#x}+{len}: {e}")))?);
            }
        }
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(&slices)
            .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: s.len() })
            .collect();
        // SAFETY: every iovec is a slice of mapped guest memory, kept mapped by `guards` for
        // the whole call.
        let r = unsafe {
            if write {
                self.disk.write_vectored_at(&mut iov, offset)
            } else {
                self.disk.read_vectored_at(&mut iov, offset)
            }
        };
        if !write {
            // The disk wrote into guest memory behind vm-memory's back: a migration must see it.
            for s in &slices {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
        r.map_err(|e| Fail::Io(format!("{} at {offset}: {e}", if write { "pwritev" } else { "preadv" })))
    }

    /// DISCARD and WRITE_ZEROES: both punch holes, which read back as zeros.
    fn discard(&mut self, mem: &GuestMemoryMmap, write_zeroes: bool) -> Result<(), Fail> {
        let mut payload = Vec::new();
        for &(addr, len, writable) in &self.segs {
            if writable {
                return Err(Fail::Io("discard segments are not device-readable".into()));
            }
            if payload.len() + len as usize > MAX_DISCARD_SEG as usize * DISCARD_SEG_LEN {
                return Err(Fail::Io(format!("more than {MAX_DISCARD_SEG} discard segments")));
            }
            let at = payload.len();
            payload.resize(at + len as usize, 0);
            mem.read_slice(&mut payload[at..], GuestAddress(addr))
                .map_err(|e| Fail::Io(format!("discard segments: {e}")))?;
        }
        if payload.is_empty() || payload.len() % DISCARD_SEG_LEN != 0 {
            return Err(Fail::Io(format!("{} bytes of discard segments", payload.len())));
        }
        for seg in payload.chunks_exact(DISCARD_SEG_LEN) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let allowed = if write_zeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return Err(Fail::Unsupported(flags));
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(Fail::Io(format!("a discard of {sectors} sectors")));
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.check_range(sector, len)?;
            self.disk.punch_hole(offset, len).map_err(|e| Fail::Io(format!("punching a hole at {offset}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
            Some((addr, len, flags)) => vec![
                desc(HDR, 16, NEXT, first + 1),
                desc(addr, len, flags | NEXT, first + 2),
                desc(STATUS, 1, WRITE, 0),
            ],
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
            (
                vec![desc(HDR, 16, NEXT, 5), desc(DATA, 512, NEXT, 6), desc(STATUS, 1, WRITE, 0)],
                Some(VIRTIO_BLK_S_IOERR),
            ),
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
}
