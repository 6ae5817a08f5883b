// SPDX-License-Identifier: Apache-2.0
//! Counters of one virtio-net device, read by the API's `/metrics`.

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct NetMetrics {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames lost on the way in: bad buffers, or too big for the buffers given.
    pub rx_dropped: AtomicU64,
    /// Times a frame waited because the driver had no buffers.
    pub rx_no_buffers: AtomicU64,
    pub rx_bad_descriptors: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub tx_bad_descriptors: AtomicU64,
}
