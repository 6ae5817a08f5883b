// SPDX-License-Identifier: Apache-2.0
//! virtio-blk state for migration (and, later, snapshots): features, the request queue, the
//! disk's description. No request is ever in flight in a saved device: the I/O thread carries
//! out each one to completion under the device lock, and [`Block::pause`] takes that lock.

use serde::{Deserialize, Serialize};
use virtio::GuestMemoryMmap;
use virtio::queue::{QueueSnapshot, restore_queues, save_queues};

use crate::device::{Block, BlockError, offered_features};
use crate::disk::DiskState;

/// The device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub acked_features: u64,
    pub activated: bool,
    pub needs_reset: bool,
    pub queues: Vec<QueueSnapshot>,
    /// The disk as the source used it (path, size, read-only, shared).
    pub disk: DiskState,
}

impl Block {
    /// Stops carrying out requests. Returns once the request being carried out (if any) is
    /// done: nothing is in flight afterwards, and the device touches neither guest memory nor
    /// the disk until [`Block::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Carries out requests again, starting with those that queued up meanwhile.
    pub fn resume(&mut self) {
        self.paused = false;
        self.kick();
    }

    pub fn save_state(&self) -> BlockState {
        BlockState {
            acked_features: self.acked_features,
            activated: self.mem.is_some(),
            needs_reset: self.needs_reset,
            queues: save_queues(&self.queues),
            disk: self.disk.state().clone(),
        }
    }

    /// Restores a saved device into this (freshly created, not activated) one, whose disk
    /// must be the same size. `mem` is the guest memory the queues live in.
    pub fn restore_state(&mut self, state: &BlockState, mem: &GuestMemoryMmap) -> Result<(), BlockError> {
        if state.disk.size != self.disk.size() {
            return Err(BlockError::State(format!(
                "the disk was {} bytes, {} here is {} bytes",
                state.disk.size,
                self.disk.state().path.display(),
                self.disk.size()
            )));
        }
        restore_queues(&mut self.queues, &state.queues).map_err(BlockError::State)?;
        self.acked_features = state.acked_features & offered_features(self.disk.read_only());
        self.needs_reset = state.needs_reset;
        if state.activated {
            self.mem = Some(mem.clone());
        }
        Ok(())
    }
}
