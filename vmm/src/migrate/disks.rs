// SPDX-License-Identifier: Apache-2.0
//! The disks' part of a migration, on both ends.
//!
//! A copied disk (the default): on the source, [`DiskCopier`] turns on the disk's dirty-block
//! tracking, sends its allocated extents (SEEK_DATA/SEEK_HOLE: holes are never sent; blocks
//! that read as zero go as zero records) in the first round, then in each later round the
//! blocks the guest wrote meanwhile, and the last ones after the devices paused. The
//! destination's [`DiskSink`] creates a new sparse file for each copied disk (it never
//! overwrites one), writes what arrives, and removes the files again unless the migration is
//! committed, so a failure leaves the source's disk the only one in use.
//!
//! A shared disk (`,shared`): nothing is copied. The source drains it (pausing the device
//! waits for the request in progress; nothing else is in flight) and flushes it
//! ([`flush_shared`]) before the state goes; the destination opens the same path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::Disk;
use block::dirty::BLOCK_SIZE;
use migration::disk::{DiskBatchReader, DiskBatchWriter};
use migration::memory::is_zero;
use migration::protocol::DiskLayout;

use super::MigrateError;
use crate::builder::Machine;
use crate::config::VmConfig;
use crate::disk_config::DiskConfig;
use crate::host::{HostResources, LocalDisk};

/// A `Disk` frame is sent once its batch holds this much.
const DISK_BATCH_BYTES: usize = 8 << 20;
/// Bytes read from a disk at a time.
const CHUNK: usize = 1 << 20;

/// The guest's disks as the destination must know them at `Start`.
pub fn layouts(m: &Machine) -> Vec<DiskLayout> {
    m.disks
        .iter()
        .map(|d| {
            let b = d.block.lock().expect("Poisoned lock");
            let s = b.disk().state();
            DiskLayout { size: s.size, shared: s.shared, read_only: s.read_only }
        })
        .collect()
}

/// Makes everything the guest wrote to its shared disks durable; call with the devices paused.
pub fn flush_shared(m: &Machine) -> Result<(), MigrateError> {
    for d in &m.disks {
        let disk = d.block.lock().expect("Poisoned lock").disk().clone();
        if disk.state().shared {
            disk.flush().map_err(|e| MigrateError::Device(format!("flushing {}: {e}", d.config.path.display())))?;
        }
    }
    Ok(())
}

/// Sends the copied disks of a source.
#[derive(Default)]
pub struct DiskCopier {
    /// (index in the guest's disks, disk) of every copied disk.
    disks: Vec<(u32, Arc<Disk>)>,
    batch: DiskBatchWriter,
    chunk: Vec<u8>,
    /// Data bytes sent so far (zero records not counted).
    pub bytes: u64,
}

impl DiskCopier {
    pub fn new(m: &Machine) -> Self {
        let disks = m
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u32, d.block.lock().expect("Poisoned lock").disk().clone()))
            .filter(|(_, d)| !d.state().shared)
            .collect();
        DiskCopier { disks, ..Default::default() }
    }

    /// Records the guest's writes from now on.
    pub fn start_tracking(&self) {
        for (_, d) in &self.disks {
            d.dirty().start();
        }
    }

    pub fn stop_tracking(&self) {
        for (_, d) in &self.disks {
            d.dirty().stop();
        }
    }

    /// Blocks written since they were last sent, in pages' worth (one block is one page).
    pub fn dirty_blocks(&self) -> u64 {
        debug_assert_eq!(BLOCK_SIZE, migration::memory::PAGE_SIZE as u64);
        self.disks.iter().map(|(_, d)| d.dirty().count()).sum()
    }

    /// Round 1: every allocated extent of every copied disk. Tracking must be on already, so
    /// that a block written while this runs is sent again.
    pub fn send_extents(
        &mut self,
        send: &mut dyn FnMut(&[u8]) -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        for i in 0..self.disks.len() {
            let (index, disk) = self.disks[i].clone();
            let extents =
                disk.allocated_extents().map_err(|e| self.disk_err(&disk, "finding the allocated extents", e))?;
            for (offset, len) in extents {
                self.send_range(index, &disk, offset, len, send)?;
            }
        }
        self.flush(send)
    }

    /// A later round: the blocks written since the last one.
    pub fn send_dirty(&mut self, send: &mut dyn FnMut(&[u8]) -> Result<(), MigrateError>) -> Result<(), MigrateError> {
        for i in 0..self.disks.len() {
            let (index, disk) = self.disks[i].clone();
            for (offset, len) in disk.dirty().take() {
                let len = len.min(disk.size().saturating_sub(offset));
                self.send_range(index, &disk, offset, len, send)?;
            }
        }
        self.flush(send)
    }

    fn disk_err(&self, disk: &Disk, what: &str, e: std::io::Error) -> MigrateError {
        MigrateError::Device(format!("{what} of {}: {e}", disk.state().path.display()))
    }

    /// Reads `offset..offset + len` of `disk` and adds it block by block: runs of blocks that
    /// read as zero become zero records.
    fn send_range(
        &mut self,
        index: u32,
        disk: &Disk,
        offset: u64,
        len: u64,
        send: &mut dyn FnMut(&[u8]) -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        self.chunk.resize(CHUNK, 0);
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            let mut buf = std::mem::take(&mut self.chunk);
            let read = disk.read_at(&mut buf[..n], at);
            if let Err(e) = read {
                self.chunk = buf;
                return Err(self.disk_err(disk, "reading", e));
            }
            // Split into runs of data blocks and zero blocks.
            let mut run_start = 0;
            let mut run_zero = None;
            for (i, block) in buf[..n].chunks(BLOCK_SIZE as usize).enumerate() {
                let zero = is_zero(block);
                let start = i * BLOCK_SIZE as usize;
                if run_zero != Some(zero) {
                    if let Some(z) = run_zero {
                        self.push(index, at + run_start as u64, &buf[run_start..start], z);
                    }
                    run_start = start;
                    run_zero = Some(zero);
                }
            }
            if let Some(z) = run_zero {
                self.push(index, at + run_start as u64, &buf[run_start..n], z);
            }
            self.chunk = buf;
            at += n as u64;
            if self.batch.len() >= DISK_BATCH_BYTES {
                self.flush(send)?;
            }
        }
        Ok(())
    }

    fn push(&mut self, index: u32, offset: u64, data: &[u8], zero: bool) {
        if zero {
            self.batch.push_zero(index, offset, data.len() as u64);
        } else {
            self.batch.push_data(index, offset, data);
            self.bytes += data.len() as u64;
        }
    }

    fn flush(&mut self, send: &mut dyn FnMut(&[u8]) -> Result<(), MigrateError>) -> Result<(), MigrateError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let r = send(self.batch.as_bytes());
        self.batch.clear();
        r
    }
}

/// One disk on a destination.
struct Incoming {
    /// Where the destination's writes go (for a copied disk), opened apart from the device.
    writer: Option<Disk>,
    path: PathBuf,
    /// Created by this migration: removed unless it commits.
    created: bool,
    size: u64,
}

/// The disks of a destination.
pub struct DiskSink {
    disks: Vec<Incoming>,
    committed: bool,
}

impl DiskSink {
    /// Checks the guest's disks against this destination's `--disk` options and creates a new
    /// file for each copied disk; sets `config.disks` to this host's paths.
    pub fn prepare(
        layouts: &[DiskLayout],
        local: &[DiskConfig],
        config: &mut VmConfig,
        res: &mut HostResources,
    ) -> Result<Self, MigrateError> {
        if layouts.len() != config.disks.len() {
            return Err(MigrateError::Incompatible(format!(
                "the source describes {} disk(s) but its configuration has {}",
                layouts.len(),
                config.disks.len()
            )));
        }
        let copied = layouts.iter().filter(|l| !l.shared).count();
        if !local.is_empty() && local.len() != layouts.len() {
            return Err(MigrateError::Incompatible(format!(
                "the guest has {} disk(s), this destination was given {}",
                layouts.len(),
                local.len()
            )));
        }
        if local.is_empty() && copied > 0 {
            return Err(MigrateError::Incompatible(format!(
                "the guest has {copied} disk(s) that are copied: give this destination --disk path=FILE for each \
                 of its {} disk(s)",
                layouts.len()
            )));
        }
        let mut sink = DiskSink { disks: Vec::with_capacity(layouts.len()), committed: false };
        for (i, layout) in layouts.iter().enumerate() {
            let disk = &mut config.disks[i];
            if let Some(l) = local.get(i) {
                disk.path = l.path.clone();
            }
            disk.shared = layout.shared;
            disk.read_only = layout.read_only;
            let incompatible = |why: String| MigrateError::Incompatible(format!("disk {i}: {why}"));
            match res.take_incoming_disk(i) {
                // Opened before the VMM was sandboxed.
                Some(LocalDisk::Shared(d)) => {
                    if !layout.shared {
                        return Err(incompatible(
                            "the source copies it, but this destination's --disk says shared".into(),
                        ));
                    }
                    if d.size() != layout.size || d.read_only() != layout.read_only {
                        return Err(incompatible(format!(
                            "the source's is {} bytes{}, this destination's {} bytes{}",
                            layout.size,
                            if layout.read_only { " (read-only)" } else { "" },
                            d.size(),
                            if d.read_only() { " (read-only)" } else { "" }
                        )));
                    }
                    sink.disks.push(Incoming {
                        writer: None,
                        path: disk.path.clone(),
                        created: false,
                        size: layout.size,
                    });
                    res.put_disk(i, d);
                }
                Some(LocalDisk::New { file, config: local }) => {
                    if layout.shared {
                        return Err(incompatible(
                            "the source shares it (,shared): give this destination --disk path=FILE,shared".into(),
                        ));
                    }
                    sink.disks.push(Incoming {
                        writer: None,
                        path: local.path.clone(),
                        created: true,
                        size: layout.size,
                    });
                    let created = Disk::create_in(file, &local.path, layout.size, layout.read_only)
                        .map_err(|e| incompatible(e.to_string()))?;
                    let writer = created.try_clone(false, true).map_err(|e| incompatible(e.to_string()))?;
                    if let Some(last) = sink.disks.last_mut() {
                        last.writer = Some(writer);
                    }
                    res.put_disk(i, created);
                }
                None if res.sealed() => return Err(MigrateError::Incompatible(res.missing_disk(i).to_string())),
                None if layout.shared => {
                    sink.disks.push(Incoming {
                        writer: None,
                        path: disk.path.clone(),
                        created: false,
                        size: layout.size,
                    });
                }
                None => {
                    let path = disk.path.clone();
                    // Never overwrite: a file there may be someone's data (or the source's own disk).
                    let created = Disk::create(&path, layout.size, layout.read_only)
                        .map_err(|e| incompatible(format!("{e} (a copied disk needs a new file here)")))?;
                    drop(created);
                    sink.disks.push(Incoming { writer: None, path: path.clone(), created: true, size: layout.size });
                    let writer = Disk::open(&path, false, true).map_err(|e| {
                        MigrateError::Device(format!("disk {i}: opening {} to write: {e}", path.display()))
                    })?;
                    if let Some(last) = sink.disks.last_mut() {
                        last.writer = Some(writer);
                    }
                }
            }
        }
        Ok(sink)
    }

    /// Writes one `Disk` batch.
    pub fn apply(&mut self, batch: &[u8]) -> Result<(), MigrateError> {
        for record in DiskBatchReader::new(batch) {
            let r = record.map_err(MigrateError::Device)?;
            let Some(d) = self.disks.get(r.disk as usize) else {
                return Err(MigrateError::Device(format!("blocks for disk {}, which the guest does not have", r.disk)));
            };
            let Some(writer) = &d.writer else {
                return Err(MigrateError::Device(format!("blocks for disk {}, which is shared", r.disk)));
            };
            if r.offset.checked_add(r.len).is_none_or(|end| end > d.size) {
                return Err(MigrateError::Device(format!(
                    "blocks {}+{} are beyond disk {} ({} bytes)",
                    r.offset, r.len, r.disk, d.size
                )));
            }
            let res = match r.data {
                Some(data) => writer.write_at(data, r.offset),
                None => writer.punch_hole(r.offset, r.len),
            };
            res.map_err(|e| MigrateError::Device(format!("writing disk {} ({}): {e}", r.disk, d.path.display())))?;
        }
        Ok(())
    }

    /// The guest runs here now: the files stay.
    pub fn commit(mut self) {
        self.committed = true;
    }

    /// Paths created by this migration (for tests and logs).
    pub fn created(&self) -> Vec<&Path> {
        self.disks.iter().filter(|d| d.created).map(|d| d.path.as_path()).collect()
    }
}

impl Drop for DiskSink {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for d in &mut self.disks {
            d.writer = None;
            if d.created {
                match std::fs::remove_file(&d.path) {
                    Ok(()) => log::info!("removed the partial disk {}", d.path.display()),
                    Err(e) => log::warn!("cannot remove the partial disk {}: {e}", d.path.display()),
                }
            }
        }
    }
}
