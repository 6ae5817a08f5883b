// SPDX-License-Identifier: Apache-2.0
//! Networking for the VMM: a TAP backend, the virtio-mmio transport and the virtio-net device.

pub mod announce;
pub mod device;
pub mod event_handler;
pub mod flows;
pub mod metrics;
pub mod persist;
pub mod tap;
pub mod virtio;

pub use device::{MacAddr, Net, NetError};
pub use virtio::mmio::MmioTransport;

/// Guest memory with a dirty bitmap, the same type the VMM uses (vm-memory unifies them).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

#[cfg(test)]
pub(crate) mod test_utils;
