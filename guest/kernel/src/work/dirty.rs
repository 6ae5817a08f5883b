// SPDX-License-Identifier: Apache-2.0
//! The `dirty` workload: rewrites a region page by page at a chosen rate, verifying that every
//! page still holds the previous pass before overwriting it (see `guest_common::dirty`). Runs in
//! steps from the main loop, so the network stays served while it works.

use alloc::vec::Vec;

use guest_common::dirty::{WORDS_PER_PAGE, verify_and_write};

use crate::clock;

/// Pages per step: 1 MiB, a few hundred microseconds of work.
const STEP_PAGES: usize = 256;
const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

pub struct Dirty {
    region: Vec<u64>,
    rate_bytes_per_s: u64,
    pass: u64,
    next_page: usize,
    pass_start_ns: u64,
    last_report_ns: u64,
    pub passes_done: u64,
    pub mismatches: u64,
}

impl Dirty {
    /// Allocates `mib` MiB (zeroed, so pass 1 verifies against "never written").
    pub fn new(mib: u64, rate_mib_s: u64) -> Option<Self> {
        let words = usize::try_from(mib << 20).ok()? / 8;
        let mut region = Vec::new();
        region.try_reserve_exact(words).ok()?;
        region.resize(words, 0);
        Some(Self {
            region,
            rate_bytes_per_s: rate_mib_s << 20,
            pass: 1,
            next_page: 0,
            pass_start_ns: clock::now_ns(),
            last_report_ns: 0,
            passes_done: 0,
            mismatches: 0,
        })
    }

    fn pages(&self) -> usize {
        self.region.len() / WORDS_PER_PAGE
    }

    /// When the next step may run, given the rate (0: now).
    pub fn next_due_ns(&self) -> u64 {
        if self.rate_bytes_per_s == 0 {
            return 0;
        }
        let done = (self.next_page * WORDS_PER_PAGE * 8) as u64;
        self.pass_start_ns + done * 1_000_000_000 / self.rate_bytes_per_s
    }

    /// Does one step if it is due; returns whether it did any work.
    pub fn step(&mut self, now_ns: u64) -> bool {
        if self.pages() == 0 || now_ns < self.next_due_ns() {
            return false;
        }
        let end = (self.next_page + STEP_PAGES).min(self.pages());
        for p in self.next_page..end {
            let first = p * WORDS_PER_PAGE;
            let page = &mut self.region[first..first + WORDS_PER_PAGE];
            if let Some(m) = verify_and_write(page, first as u64, self.pass) {
                self.mismatches += 1;
                crate::println!(
                    "DIRTY-MISMATCH pass={} index={} expected={:#x} found={:#x}",
                    self.pass,
                    m.index,
                    m.expected,
                    m.found
                );
            }
        }
        self.next_page = end;
        if self.next_page == self.pages() {
            let now = clock::now_ns();
            // At most one progress line a second: an unthrottled pass can take milliseconds.
            if now - self.last_report_ns >= REPORT_INTERVAL_NS {
                let ms = (now - self.pass_start_ns) / 1_000_000;
                let mib = (self.region.len() * 8) >> 20;
                crate::println!("DIRTY pass={} mib={mib} ms={ms} mismatches={}", self.pass, self.mismatches);
                self.last_report_ns = now;
            }
            self.passes_done += 1;
            self.pass += 1;
            self.next_page = 0;
            // At a set rate the next pass begins when this one was due to end, which may be
            // later than now (a pass of one step would otherwise never wait).
            // Rate 0 is "as fast as it goes": no wait.
            let pass_ns =
                ((self.region.len() * 8) as u64 * 1_000_000_000).checked_div(self.rate_bytes_per_s).unwrap_or(0);
            self.pass_start_ns = now.max(self.pass_start_ns + pass_ns);
        }
        true
    }
}
