// SPDX-License-Identifier: Apache-2.0
//! The `disk` workload: rewrites the first `vmm.disk_mib` MiB of the first virtio-blk disk chunk
//! by chunk at a chosen rate, verifying that every chunk still holds the previous pass before
//! overwriting it (the same pattern as `dirty`, word by word from the disk's start, see
//! `guest_common::dirty`), and flushing after each pass. A block that a migration lost or
//! carried stale shows as a mismatch. Runs in steps from the main loop, so the network stays
//! served while it works. Pass 1 expects a fresh (all-zero) disk.

use guest_common::dirty::{WORDS_PER_PAGE, verify_and_write};

use crate::clock;
use crate::virtio_blk::{S_OK, SECTOR, T_FLUSH, T_IN, T_OUT, VirtioBlk};

/// Bytes per request: 64 KiB.
const CHUNK: usize = 64 << 10;
/// Chunks per step: 1 MiB, about a millisecond of work.
const STEP_CHUNKS: usize = 16;
const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

pub struct DiskWorkload {
    dev: VirtioBlk,
    /// One chunk, as words (so it is aligned for the pattern).
    buf: alloc::vec::Vec<u64>,
    chunks: usize,
    rate_bytes_per_s: u64,
    /// Passes to do; 0: forever.
    max_passes: u64,
    pass: u64,
    next_chunk: usize,
    pass_start_ns: u64,
    last_report_ns: u64,
    pub passes_done: u64,
    pub mismatches: u64,
    pub io_errors: u64,
}

impl DiskWorkload {
    /// Covers `mib` MiB of `dev` (at most the whole disk).
    pub fn new(dev: VirtioBlk, mib: u64, rate_mib_s: u64, max_passes: u64) -> Self {
        let bytes = (mib << 20).min(dev.capacity * SECTOR);
        Self {
            dev,
            buf: alloc::vec![0u64; CHUNK / 8],
            chunks: (bytes / CHUNK as u64) as usize,
            rate_bytes_per_s: rate_mib_s << 20,
            max_passes,
            pass: 1,
            next_chunk: 0,
            pass_start_ns: clock::now_ns(),
            last_report_ns: 0,
            passes_done: 0,
            mismatches: 0,
            io_errors: 0,
        }
    }

    pub fn mib(&self) -> usize {
        (self.chunks * CHUNK) >> 20
    }

    fn finished(&self) -> bool {
        self.chunks == 0 || (self.max_passes != 0 && self.passes_done >= self.max_passes)
    }

    /// When the next step may run, given the rate (0: now; never once finished).
    pub fn next_due_ns(&self) -> u64 {
        if self.finished() {
            return u64::MAX;
        }
        if self.rate_bytes_per_s == 0 {
            return 0;
        }
        let done = (self.next_chunk * CHUNK) as u64;
        self.pass_start_ns + done * 1_000_000_000 / self.rate_bytes_per_s
    }

    fn io(&mut self, kind: u32, sector: u64) -> bool {
        // SAFETY: the chunk's words seen as its CHUNK bytes, for the device to fill or read.
        let bytes = unsafe { core::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), CHUNK) };
        let status = self.dev.run(kind, sector, bytes);
        if status != S_OK {
            self.io_errors += 1;
            crate::println!("DISK-IOERROR pass={} sector={sector} kind={kind} status={status}", self.pass);
        }
        status == S_OK
    }

    /// Does one step if it is due; returns whether it did any work.
    pub fn step(&mut self, now_ns: u64) -> bool {
        if self.finished() || now_ns < self.next_due_ns() {
            return false;
        }
        let end = (self.next_chunk + STEP_CHUNKS).min(self.chunks);
        for c in self.next_chunk..end {
            let sector = (c * CHUNK) as u64 / SECTOR;
            if !self.io(T_IN, sector) {
                continue;
            }
            let first_word = (c * CHUNK / 8) as u64;
            let mut bad = None;
            for (p, page) in self.buf.chunks_mut(WORDS_PER_PAGE).enumerate() {
                if let Some(m) = verify_and_write(page, first_word + (p * WORDS_PER_PAGE) as u64, self.pass) {
                    bad.get_or_insert(m);
                }
            }
            if let Some(m) = bad {
                self.mismatches += 1;
                crate::println!(
                    "DISK-MISMATCH pass={} index={} expected={:#x} found={:#x}",
                    self.pass,
                    m.index,
                    m.expected,
                    m.found
                );
            }
            self.io(T_OUT, sector);
        }
        self.next_chunk = end;
        if self.next_chunk == self.chunks {
            if self.dev.flush {
                let mut none = [0u8; 0];
                let status = self.dev.run(T_FLUSH, 0, &mut none);
                if status != S_OK {
                    self.io_errors += 1;
                }
            }
            let now = clock::now_ns();
            self.passes_done += 1;
            if now - self.last_report_ns >= REPORT_INTERVAL_NS || self.finished() {
                let ms = (now - self.pass_start_ns) / 1_000_000;
                crate::println!(
                    "DISK pass={} mib={} ms={ms} mismatches={} io_errors={}",
                    self.pass,
                    self.mib(),
                    self.mismatches,
                    self.io_errors
                );
                self.last_report_ns = now;
            }
            self.pass += 1;
            self.next_chunk = 0;
            let pass_ns =
                ((self.chunks * CHUNK) as u64 * 1_000_000_000).checked_div(self.rate_bytes_per_s).unwrap_or(0);
            self.pass_start_ns = now.max(self.pass_start_ns + pass_ns);
        }
        true
    }
}
