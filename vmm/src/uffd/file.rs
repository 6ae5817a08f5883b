// SPDX-License-Identifier: Apache-2.0
//! Guest memory loaded on demand from a snapshot's memory file, checked chunk by chunk.
//!
//! The file holds the guest's regions one after the other; its chunk table says which chunks
//! hold data and their CRC-64. A fault loads its whole chunk: read, checked against the table,
//! then placed with one `UFFDIO_COPY`. A chunk without data is mapped as zero pages without
//! reading anything. Between faults the source loads the data chunks in order, so the whole
//! snapshot is in memory (and checked) soon after the guest started, whatever it touches. A
//! chunk whose checksum does not match is never placed: the guest stops before it could see it.
//!
//! Loading ahead can be held back until the guest runs ([`FileSource::hold_back`]): while the
//! VM is built, a loader filling memory on the other CPU makes KVM's registration of that memory
//! wait (about 1 ms in every other restore here), and the vCPUs' start competes with it. Only
//! the chunks asked for first ([`FileSource::load_first`]) and faults are served until then.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use migration::snapshot::{ChunkTable, crc64};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Ctx, GuestUffd, PageSource, Served, UffdError, UffdStats};

/// One guest memory region and where it starts in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRegion {
    pub gpa: u64,
    pub len: u64,
    pub offset: u64,
}

/// Lays `regions` (guest address, length) out one after the other, as the snapshot file does.
pub fn file_layout(regions: &[(u64, u64)]) -> Vec<FileRegion> {
    let mut offset = 0;
    regions
        .iter()
        .map(|&(gpa, len)| {
            let r = FileRegion { gpa, len, offset };
            offset += len;
            r
        })
        .collect()
}

/// Pages from a snapshot's memory file.
pub struct FileSource {
    file: File,
    path: PathBuf,
    table: ChunkTable,
    crc_index: Vec<u32>,
    regions: Vec<FileRegion>,
    /// One bit per chunk: placed.
    loaded: Vec<u64>,
    /// Data chunks not placed yet.
    remaining: u64,
    /// Chunks to load ahead before any other, last first.
    first: Vec<u64>,
    /// Where loading ahead goes on.
    next: u64,
    /// Set by [`FileSource::hold_back`]: loading ahead waits until it is written.
    hold: Option<EventFd>,
    buf: Vec<u8>,
    stats: Arc<UffdStats>,
}

impl FileSource {
    /// `table` must have been validated against the file's length; every region's length must
    /// be a whole number of chunks, so that no chunk spans two regions.
    pub fn new(
        file: File,
        path: PathBuf,
        table: ChunkTable,
        regions: Vec<FileRegion>,
        stats: Arc<UffdStats>,
    ) -> Result<Self, UffdError> {
        if let Some(r) = regions.iter().find(|r| r.len % table.chunk_size != 0 || r.offset % table.chunk_size != 0) {
            return Err(UffdError::Source(format!(
                "memory region at {:#x} ({} bytes) is not a whole number of {}-byte chunks",
                r.gpa, r.len, table.chunk_size
            )));
        }
        let total: u64 = regions.iter().map(|r| r.len).sum();
        if total != table.len {
            return Err(UffdError::Source(format!(
                "the chunk table covers {} bytes, guest memory is {total}",
                table.len
            )));
        }
        let chunks = table.chunks();
        Ok(FileSource {
            file,
            path,
            crc_index: table.crc_index(),
            remaining: table.data_chunks(),
            buf: vec![0; table.chunk_size as usize],
            table,
            regions,
            loaded: vec![0; chunks.div_ceil(64) as usize],
            first: Vec::new(),
            next: 0,
            hold: None,
            stats,
        })
    }

    /// Loads the chunks holding `gpas` ahead of the others, in that order (addresses outside
    /// memory are ignored): pages something is about to touch, such as those KVM writes when
    /// a vCPU's paravirtual MSRs are restored.
    pub fn load_first(&mut self, gpas: &[u64]) {
        self.first = gpas.iter().rev().filter_map(|&g| self.chunk_of(g)).collect();
    }

    /// Holds loading ahead back, but for the chunks asked for first, until the returned
    /// [`LoadAhead`] is released or dropped.
    pub fn hold_back(&mut self) -> Result<LoadAhead, UffdError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| UffdError::Source(format!("eventfd: {e}")))?;
        let release = evt.try_clone().map_err(|e| UffdError::Source(format!("eventfd: {e}")))?;
        self.hold = Some(evt);
        Ok(LoadAhead { evt: Some(release) })
    }

    /// Whether loading ahead is still held back (and the hold is not released yet).
    fn held(&mut self) -> bool {
        match &self.hold {
            // Nothing to read yet: still held.
            Some(evt) if evt.read().is_err() => true,
            Some(_) => {
                self.hold = None;
                false
            }
            None => false,
        }
    }

    fn is_loaded(&self, chunk: u64) -> bool {
        self.loaded.get((chunk / 64) as usize).is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// The chunk holding guest address `gpa`.
    fn chunk_of(&self, gpa: u64) -> Option<u64> {
        let r = self.regions.iter().find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)?;
        Some((r.offset + (gpa - r.gpa)) / self.table.chunk_size)
    }

    /// The guest address of chunk `chunk`'s first byte.
    fn gpa_of(&self, chunk: u64) -> Option<u64> {
        let off = chunk * self.table.chunk_size;
        let r = self.regions.iter().find(|r| off >= r.offset && off < r.offset + r.len)?;
        Some(r.gpa + (off - r.offset))
    }

    fn load(&mut self, uffd: &GuestUffd, chunk: u64) -> Result<(), UffdError> {
        let gpa = self.gpa_of(chunk).ok_or_else(|| UffdError::Source(format!("chunk {chunk} is outside memory")))?;
        let len = self.table.chunk_len(chunk);
        if self.table.has_data(chunk) {
            let off = chunk * self.table.chunk_size;
            let buf = &mut self.buf[..len as usize];
            self.file.read_exact_at(buf, off).map_err(|e| {
                UffdError::Source(format!("reading the snapshot memory {} at {off:#x}: {e}", self.path.display()))
            })?;
            let want = self.crc_index.get(chunk as usize).and_then(|&i| self.table.crcs.get(i as usize)).copied();
            let got = crc64(buf);
            if want != Some(got) {
                return Err(UffdError::Source(format!(
                    "the snapshot's memory is damaged: chunk {chunk} (guest addresses {gpa:#x}..{:#x}, bytes \
                     {off:#x}.. of {}) has CRC-64 {got:#018x}, the snapshot recorded {:#018x}; the guest was \
                     stopped before it could use it",
                    gpa + len,
                    self.path.display(),
                    want.unwrap_or(0)
                )));
            }
            let placed = uffd.copy(gpa, buf)?;
            self.stats.pages_loaded.fetch_add(placed, Ordering::Relaxed);
            self.remaining -= 1;
        } else {
            uffd.zero(gpa, len)?;
        }
        if let Some(w) = self.loaded.get_mut((chunk / 64) as usize) {
            *w |= 1 << (chunk % 64);
        }
        Ok(())
    }
}

impl PageSource for FileSource {
    fn fault(&mut self, ctx: &Ctx, gpa: u64) -> Result<Served, UffdError> {
        let uffd = ctx.uffd;
        let chunk = self.chunk_of(gpa).ok_or(UffdError::Outside(gpa))?;
        if self.is_loaded(chunk) {
            // A second fault in a chunk placed meanwhile: its waiter may need waking.
            uffd.wake(gpa, super::PAGE);
        } else {
            self.load(uffd, chunk)?;
        }
        Ok(Served::Now)
    }

    fn idle(&mut self, ctx: &Ctx) -> Result<bool, UffdError> {
        let uffd = ctx.uffd;
        while let Some(chunk) = self.first.pop() {
            if self.table.has_data(chunk) && !self.is_loaded(chunk) {
                self.load(uffd, chunk)?;
                return Ok(self.remaining > 0);
            }
        }
        if self.held() {
            // The hold's descriptor (`wake_fd`) wakes the handler when it is released.
            return Ok(false);
        }
        let chunks = self.table.chunks();
        while self.next < chunks && (!self.table.has_data(self.next) || self.is_loaded(self.next)) {
            self.next += 1;
        }
        if self.next < chunks {
            self.load(uffd, self.next)?;
        }
        Ok(self.remaining > 0)
    }

    fn done(&self) -> bool {
        self.remaining == 0
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.hold.as_ref().map(|e| e.as_raw_fd())
    }
}

/// Lets a [`FileSource`] held back load ahead: when released, or dropped.
pub struct LoadAhead {
    evt: Option<EventFd>,
}

impl LoadAhead {
    pub fn release(mut self) {
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(evt) = self.evt.take()
            && let Err(e) = evt.write(1)
        {
            log::warn!("cannot release the memory loader's loading ahead: {e}");
        }
    }
}

impl Drop for LoadAhead {
    fn drop(&mut self) {
        self.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_chunks() {
        let layout = file_layout(&[(0, 0xd000_0000), (0x1_0000_0000, 0x1000_0000)]);
        assert_eq!(layout[1], FileRegion { gpa: 0x1_0000_0000, len: 0x1000_0000, offset: 0xd000_0000 });
        let table = ChunkTable::new(256 << 10, 0xe000_0000);
        let file = File::open("/dev/null").unwrap();
        let src = FileSource::new(file, "/dev/null".into(), table.clone(), layout.clone(), Arc::default()).unwrap();
        assert_eq!(src.chunk_of(0x1_0000_0000), Some(0xd000_0000 / (256 << 10)));
        assert_eq!(src.gpa_of(0xd000_0000 / (256 << 10)), Some(0x1_0000_0000));
        assert_eq!(src.chunk_of(0xd000_0000), None, "the hole below 4 GiB is not memory");
        assert!(src.done(), "nothing to load in an all-zero snapshot");

        let odd = file_layout(&[(0, 3 << 20), (4 << 20, 100 << 10)]);
        let t = ChunkTable::new(256 << 10, (3 << 20) + (100 << 10));
        let file = File::open("/dev/null").unwrap();
        assert!(FileSource::new(file, "/dev/null".into(), t, odd, Arc::default()).is_err());
    }
}
