// SPDX-License-Identifier: Apache-2.0
//! Counters of one virtio-blk device, read by the API's `/metrics`.

use std::sync::atomic::AtomicU64;

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
