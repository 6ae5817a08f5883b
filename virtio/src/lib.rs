// SPDX-License-Identifier: Apache-2.0
//! What every virtio device of the VMM shares: the virtio-mmio transport (register map,
//! status state machine, its migration state), the [`VirtioDevice`] trait through which the
//! transport knows a device, the interrupt they share, and the queue helpers and serialisable
//! queue state every device needs. The devices themselves (`net`, `block`) build on this crate
//! and never on each other.
//!
//! The transport is ours (the rust-vmm `virtio-device` crate was never published); the queues
//! are virtio-queue's.

pub mod device;
pub mod mmio;
pub mod queue;

pub use device::{ActivateError, INT_CONFIG, INT_VRING, Interrupt, VirtioDevice};
pub use mmio::{MmioTransport, MmioTransportState};
pub use queue::QueueSnapshot;

/// Guest memory with a dirty bitmap, the same type the VMM uses (vm-memory unifies them).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Offset of QueueNotify in a virtio-mmio window: the VMM registers one ioeventfd per queue
/// there, matched on the queue index the driver writes.
pub const NOTIFY_OFFSET: u64 = 0x50;
