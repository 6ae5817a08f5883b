// SPDX-License-Identifier: Apache-2.0
//! Counters of one virtio-blk device, read by the API (`GET /vm` and `/metrics`) without the
//! device lock, which the I/O thread holds while it carries out requests.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests.
    pub discards: AtomicU64,
    /// Requests answered with VIRTIO_BLK_S_IOERR: host I/O errors (ENOSPC, EIO), writes to a
    /// read-only disk, ranges beyond the disk, buffers outside guest memory.
    pub io_errors: AtomicU64,
    /// Requests of a type the device does not know (VIRTIO_BLK_S_UNSUPP).
    pub unsupported: AtomicU64,
    /// Chains so malformed that not even a status could be written (returned with length 0).
    pub bad_descriptors: AtomicU64,
}

/// The counters at one moment, as the API reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCounters {
    /// Read requests completed (`VIRTIO_BLK_T_IN`).
    pub reads: u64,
    pub read_bytes: u64,
    /// Write requests completed (`VIRTIO_BLK_T_OUT`).
    pub writes: u64,
    pub write_bytes: u64,
    /// Flush requests (each an `fdatasync` of a writable image).
    pub flushes: u64,
    /// Discard and write-zeroes requests (holes punched).
    pub discards: u64,
    /// Requests answered with an I/O error status.
    pub io_errors: u64,
    /// Requests of an unknown type.
    pub unsupported: u64,
    /// Descriptor chains refused without a status.
    pub bad_descriptors: u64,
}

impl BlockMetrics {
    pub fn snapshot(&self) -> BlockCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockCounters {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            write_bytes: get(&self.write_bytes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            io_errors: get(&self.io_errors),
            unsupported: get(&self.unsupported),
            bad_descriptors: get(&self.bad_descriptors),
        }
    }
}
