// SPDX-License-Identifier: Apache-2.0
//! Which blocks of a disk the guest changed: a bitmap of [`BLOCK_SIZE`] granules, set after
//! each write, discard or write-zeroes completes, read and cleared by a migration (or, later, an
//! incremental snapshot). Atomic words, so the I/O thread sets bits while the migration thread
//! collects them without a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Granule of dirty tracking: the guest's usual write size, so a 4 KiB write resends 4 KiB.
pub const BLOCK_SIZE: u64 = 4096;

/// A dirty-block bitmap for a disk of a given size. Tracking is off until [`Self::start`].
#[derive(Debug)]
pub struct DirtyBlocks {
    words: Vec<AtomicU64>,
    blocks: u64,
    on: AtomicBool,
}

impl DirtyBlocks {
    pub fn new(disk_bytes: u64) -> Self {
        let blocks = disk_bytes.div_ceil(BLOCK_SIZE);
        DirtyBlocks {
            words: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            blocks,
            on: AtomicBool::new(false),
        }
    }

    /// Clears the bitmap and records writes from now on.
    pub fn start(&self) {
        for w in &self.words {
            w.store(0, Ordering::SeqCst);
        }
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops recording.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    pub fn is_tracking(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Records that bytes `offset..offset + len` changed (call once the change is done).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.on.load(Ordering::SeqCst) {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let last = ((offset + len - 1) / BLOCK_SIZE).min(self.blocks.saturating_sub(1));
        for b in first..=last {
            if let Some(w) = self.words.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
    }

    /// Takes the dirty set: the byte ranges (merged runs of blocks) changed since the last call,
    /// clearing them.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = b * BLOCK_SIZE;
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += BLOCK_SIZE,
                    _ => runs.push((start, BLOCK_SIZE)),
                }
            }
        }
        runs
    }

    /// Dirty blocks now, without clearing them.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::SeqCst).count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_while_tracking_and_merges_runs() {
        let d = DirtyBlocks::new(1 << 20);
        d.mark(0, 4096);
        assert_eq!(d.count(), 0, "not tracking yet");
        d.start();
        d.mark(4096, 1);
        d.mark(8191, 2); // straddles blocks 1 and 2
        d.mark(64 * 4096, 512);
        assert_eq!(d.count(), 3);
        assert_eq!(d.take(), vec![(4096, 8192), (64 * 4096, 4096)]);
        assert_eq!(d.count(), 0, "taken");
        d.mark(u64::MAX / 2, 4096); // beyond the disk: clamped, never a panic
        d.stop();
        d.mark(0, 4096);
        assert!(d.take().is_empty());
    }
}
