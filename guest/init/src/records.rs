// SPDX-License-Identifier: Apache-2.0
//! The Linux guest's `disk` workload: appends fixed-size, checksummed records to
//! `/data/records` (the data disk's ext4), each made durable with `fdatasync` before it counts
//! as acknowledged. At start it reads back what the file holds and checks every record, so a
//! guest started on a disk that moved (or on its image after a stop) says whether every
//! acknowledged record is there: `DISK-RECORDS found=N bad=M` on the console, then the status
//! line's `disk_passes` counts records acknowledged (found ones included) and `disk_mismatches`
//! the bad ones found. While it runs, the control command `records` reads the file back from the
//! disk itself ([`verify`]): after a migration, that is what the destination's copy holds.
//!
//! A record is 64 bytes: `VMMR`, 4 bytes of zero, its sequence number (u64, from 0), 40 bytes
//! derived from it, and an FNV-1a hash of the 56 bytes before it, all little-endian.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const RECORD_LEN: usize = 64;
const MAGIC: &[u8; 4] = b"VMMR";

/// Records acknowledged (durable), found ones included.
pub static ACKED: AtomicU64 = AtomicU64::new(0);
/// Records found bad at start.
pub static BAD: AtomicU64 = AtomicU64::new(0);
/// The open file (and its path) while the workload runs; `None` once [`stop`] closed it. Held
/// while a record is appended and while [`verify`] reads the file back.
static FILE: Mutex<Option<(File, PathBuf)>> = Mutex::new(None);

/// Record `seq`.
pub fn record(seq: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..4].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in r[16..56].iter_mut().enumerate() {
        *b = (seq.wrapping_mul(31).wrapping_add(i as u64) & 0xff) as u8;
    }
    let h = fnv1a(&r[..56]);
    r[56..64].copy_from_slice(&h.to_le_bytes());
    r
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Checks the records in `data` in order: returns (good records before the first bad one, bad
/// records). A record is good if it is exactly [`record`] of its index; a partial record at
/// the end counts as bad.
pub fn check(data: &[u8]) -> (u64, u64) {
    let mut good = 0;
    let mut bad = 0;
    for (i, chunk) in data.chunks(RECORD_LEN).enumerate() {
        if chunk == record(i as u64) && bad == 0 {
            good += 1;
        } else {
            bad += 1;
        }
    }
    (good, bad)
}

/// Where the records go: `/data` in the guest; in test mode the directory in
/// `VMM_INIT_DATA_DIR`.
fn dir(mode: crate::Mode) -> Result<PathBuf, String> {
    match mode {
        crate::Mode::Init => Ok(PathBuf::from("/data")),
        crate::Mode::Test => std::env::var_os("VMM_INIT_DATA_DIR")
            .map(PathBuf::from)
            .ok_or_else(|| "disk: test mode needs VMM_INIT_DATA_DIR".to_string()),
    }
}

/// Checks what the file holds and starts appending: `per_s` records a second (0: as fast as
/// fsync allows), at most `max` records in all (0: no end).
pub fn start(mode: crate::Mode, per_s: u64, max: u64) -> Result<(), String> {
    let path = dir(mode)?.join("records");
    let (file, good, bad) = open(&path)?;
    say!("DISK-RECORDS found={good} bad={bad}");
    ACKED.store(good, Ordering::SeqCst);
    BAD.store(bad, Ordering::SeqCst);
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some((file, path.clone()));
    // With bad records, appending would only add to the damage: report and stop.
    if bad > 0 {
        return Ok(());
    }
    let pause = (per_s > 0).then(|| Duration::from_secs_f64(1.0 / per_s as f64));
    crate::spawn("records", move || {
        let mut seq = good;
        while max == 0 || seq < max {
            match append(seq) {
                Ok(true) => seq += 1,
                // Stopped (the guest powers off): nothing to say.
                Ok(false) => return,
                Err(e) => {
                    say!("disk: appending record {seq} to {}: {e}", path.display());
                    return;
                }
            }
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
    })
}

fn open(path: &Path) -> Result<(File, u64, u64), String> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("disk: cannot open {}: {e}", path.display()))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(|e| format!("disk: cannot read {}: {e}", path.display()))?;
    let (good, bad) = check(&data);
    Ok((file, good, bad))
}

/// Appends record `seq`, makes it durable and counts it acknowledged, all under the lock, so
/// that [`verify`] never sees a record written but not yet counted. `Ok(false)` if the
/// workload was stopped.
fn append(seq: u64) -> std::io::Result<bool> {
    let mut guard = FILE.lock().unwrap_or_else(|e| e.into_inner());
    let Some((file, _)) = guard.as_mut() else {
        return Ok(false);
    };
    file.write_all(&record(seq))?;
    file.sync_data()?;
    ACKED.store(seq + 1, Ordering::SeqCst);
    Ok(true)
}

/// What [`verify`] found: `RECORDS acked=N found=G bad=B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Records acknowledged when the file was read.
    pub acked: u64,
    /// Good records read back, in order from the first.
    pub found: u64,
    /// Bad records read back (a torn or wrong one, and every one after it).
    pub bad: u64,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RECORDS acked={} found={} bad={}", self.acked, self.found, self.bad)
    }
}

/// Reads the records back from the disk, not from the page cache (`O_DIRECT`), while no record
/// is being appended, and checks them. Every acknowledged record is there and correct when
/// `found == acked` and `bad == 0`.
pub fn verify() -> Result<Verified, String> {
    let guard = FILE.lock().unwrap_or_else(|e| e.into_inner());
    let (_, path) = guard.as_ref().ok_or_else(|| "the disk workload is not running".to_string())?;
    let acked = ACKED.load(Ordering::SeqCst);
    let data = read_direct(path).map_err(|e| format!("cannot read {} back: {e}", path.display()))?;
    let (found, bad) = check(&data);
    Ok(Verified { acked, found, bad })
}

/// The whole file at `path`, read with `O_DIRECT`: from the device, whatever the page cache
/// holds. Direct I/O wants the buffer, offsets and lengths aligned to the device's block size,
/// so the reads go in aligned chunks; the last one comes back short at the end of the file.
fn read_direct(path: &Path) -> std::io::Result<Vec<u8>> {
    const ALIGN: usize = 4096;
    const CHUNK: usize = 256 << 10;
    let file = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    let chunk = buf.get_mut(start..start + CHUNK).ok_or_else(|| std::io::Error::other("cannot align a buffer"))?;
    let mut data = Vec::with_capacity(len as usize);
    loop {
        let n = file.read_at(chunk, data.len() as u64)?;
        data.extend_from_slice(&chunk[..n]);
        if n < CHUNK {
            break;
        }
    }
    if data.len() as u64 != len {
        return Err(std::io::Error::other(format!("read {} bytes of {len}", data.len())));
    }
    Ok(data)
}

/// Stops appending (waiting for the record being written) and closes the file, so that the
/// file system can be made read-only before the guest powers off.
pub fn stop() {
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_check_in_order() {
        let mut data: Vec<u8> = (0..10).flat_map(record).collect();
        assert_eq!(check(&data), (10, 0));
        data.extend_from_slice(&record(10)[..20]);
        assert_eq!(check(&data), (10, 1), "a torn last record is bad");
        data.truncate(10 * RECORD_LEN);
        data[3 * RECORD_LEN + 20] ^= 1;
        assert_eq!(check(&data), (3, 7), "everything after a bad record is bad");
        let swapped: Vec<u8> = [record(1), record(0)].concat();
        assert_eq!(check(&swapped), (0, 2), "records out of order are bad");
        assert_eq!(check(&[]), (0, 0));
    }
}
