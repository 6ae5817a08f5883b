// SPDX-License-Identifier: Apache-2.0
//! Block storage for the VMM: the virtio-blk device (on the `virtio` crate's transport) over a
//! raw, sparse image file, the thread that does its I/O, its migration state, and what a
//! migration or a snapshot needs from a disk (its allocated extents and the blocks written
//! since a point in time).
//!
//! Modules by job: [`device`] (features, config space, what the transport asks), [`request`]
//! (parsing and carrying out the guest's requests), [`disk`] (the image file), [`dirty`] (the
//! dirty-block bitmap), [`worker`] (the I/O thread), [`persist`] (migration state).

pub mod device;
pub mod dirty;
pub mod disk;
pub mod metrics;
pub mod persist;
pub mod request;
pub mod worker;

pub use device::{Block, BlockError};
pub use disk::{Disk, DiskError, DiskState};
pub use worker::Worker;

#[cfg(test)]
pub(crate) mod test_utils;
