// SPDX-License-Identifier: Apache-2.0
//! The VM's disks seen from the VMM: what the API reports of them, and the last flush of their
//! images when the VMM is done with them.
//!
//! The guest's own FLUSH requests are what make its writes durable while it runs; between two of
//! them, writes sit in the host's page cache. When the VMM stops (the guest powered off, reset,
//! or moved away), each writable image gets one more `fdatasync`, so the file left behind holds
//! everything the guest wrote, on disk, even if the guest never flushed again: the disk of a
//! stopped VM, and the source's copy after a migration, are then whole if the host crashes next.
//! A migration destination makes its copied images durable the same way once the guest runs
//! there, on a thread of its own (the copy arrived through the page cache too).

use std::sync::Arc;
use std::time::Instant;

use block::Disk;

use crate::api::DiskInfo;
use crate::builder::Machine;

/// `GET /vm`'s view of every disk. Reads only counters and the image's metadata: never the
/// device lock, which the I/O thread holds while it carries out requests.
pub fn disk_infos(m: &Machine) -> Vec<DiskInfo> {
    m.disks
        .iter()
        .map(|d| {
            let s = d.disk.state();
            let dirty = d.disk.dirty();
            DiskInfo {
                path: d.config.path.clone(),
                size_bytes: s.size,
                allocated_bytes: d.disk.allocated_bytes().unwrap_or(0),
                read_only: s.read_only,
                shared: s.shared,
                dirty_blocks: if dirty.is_tracking() { dirty.count() } else { 0 },
                io: d.metrics.snapshot(),
            }
        })
        .collect()
}

/// Stops the disks and makes everything the guest wrote to them durable; call once the vCPUs
/// stopped. Returns one message per image that could not be flushed.
pub fn final_flush(m: &Machine) -> Vec<String> {
    let mut failed = Vec::new();
    for (i, d) in m.disks.iter().enumerate() {
        // Paused: the request being carried out (if any) is done, and no other one starts.
        d.block.lock().expect("Poisoned lock").pause();
        if d.disk.read_only() {
            continue;
        }
        match timed_flush(&d.disk) {
            Ok(ms) => log::info!("disk {i} ({}): flushed at exit in {ms} ms", d.config.path.display()),
            Err(e) => {
                let msg = format!(
                    "disk {i} ({}): the final flush failed, the image may lack the guest's last writes: {e}",
                    d.config.path.display()
                );
                log::error!("{msg}");
                failed.push(msg);
            }
        }
    }
    failed
}

/// On a migration destination, once the guest runs here: makes the copied disks' new images
/// durable (what arrived was written through the page cache), on a thread of its own so that
/// neither the guest's downtime nor the event loop waits for it.
pub fn sync_received(m: &Machine) {
    let disks: Vec<(usize, Arc<Disk>)> =
        m.disks.iter().enumerate().filter(|(_, d)| !d.disk.state().shared).map(|(i, d)| (i, d.disk.clone())).collect();
    if disks.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new().name("disk-sync".into()).spawn(move || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::BlockIo);
        for (i, disk) in disks {
            match timed_flush(&disk) {
                Ok(ms) => {
                    log::info!("disk {i} ({}): received copy made durable in {ms} ms", disk.state().path.display())
                }
                Err(e) => log::error!(
                    "disk {i} ({}): making the received copy durable failed: {e}",
                    disk.state().path.display()
                ),
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start the thread that makes the received disks durable: {e}");
    }
}

fn timed_flush(disk: &Disk) -> std::io::Result<u128> {
    let t = Instant::now();
    disk.flush()?;
    Ok(t.elapsed().as_millis())
}
