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
mod tests;
