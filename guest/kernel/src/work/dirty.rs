// SPDX-License-Identifier: Apache-2.0
//! The `dirty` workload on one CPU: rewrites this CPU's region page by page at its share of the
//! rate, verifying that every page still holds the previous pass before overwriting it (see
//! `guest_common::dirty`). Runs in steps, so the boot CPU serves the network in between.
//!
//! The regions of all CPUs are numbered as one: word indices run on from one CPU's region into
//! the next one's, so a page carried into another CPU's region would not verify either.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_common::dirty::{PAGES_PER_MIB, WORDS_PER_PAGE, share, verify_and_write};

use crate::clock;
use crate::percpu::MAX_CPUS;

/// Pages per step: 1 MiB, a few hundred microseconds of work.
const STEP_PAGES: usize = 256;
const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

/// Passes completed, per CPU.
static PASSES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Pages found not holding the previous pass, all CPUs together.
static MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// The passes every one of the first `cpus` CPUs has completed.
pub fn passes(cpus: usize) -> u64 {
    PASSES[..cpus.clamp(1, MAX_CPUS)].iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap_or(0)
}

/// Mismatches found so far by all CPUs.
pub fn mismatches() -> u64 {
    MISMATCHES.load(Ordering::Relaxed)
}

pub struct Dirty {
    cpu: usize,
    region: Vec<u64>,
    /// Index of this region's first word among all CPUs' regions.
    first_word: u64,
    rate_bytes_per_s: u64,
    pass: u64,
    next_page: usize,
    pass_start_ns: u64,
    last_report_ns: u64,
    mismatches: u64,
}

impl Dirty {
    /// CPU `cpu`'s part of a `total_mib` MiB workload at `total_rate_mib_s` MiB/s (0: as fast as
    /// it goes) shared by `cpus` CPUs. The region is zeroed, so pass 1 verifies against "never
    /// written".
    pub fn new(total_mib: u64, total_rate_mib_s: u64, cpus: usize, cpu: usize) -> Result<Self, alloc::string::String> {
        let (first_page, pages) = share(total_mib, cpus, cpu);
        let words = usize::try_from(pages * WORDS_PER_PAGE as u64).map_err(|_| "region too large")?;
        let mut region = Vec::new();
        region
            .try_reserve_exact(words)
            .map_err(|_| alloc::format!("cannot allocate {} MiB for the dirty workload", pages / PAGES_PER_MIB))?;
        region.resize(words, 0);
        // Each CPU its share of the rate, in proportion to its share of the memory.
        let total_pages = total_mib.saturating_mul(PAGES_PER_MIB).max(1);
        let rate = (u128::from(total_rate_mib_s << 20) * u128::from(pages) / u128::from(total_pages)) as u64;
        Ok(Self {
            cpu,
            region,
            first_word: first_page * WORDS_PER_PAGE as u64,
            rate_bytes_per_s: if total_rate_mib_s == 0 { 0 } else { rate.max(1) },
            pass: 1,
            next_page: 0,
            pass_start_ns: clock::now_ns(),
            last_report_ns: 0,
            mismatches: 0,
        })
    }

    fn pages(&self) -> usize {
        self.region.len() / WORDS_PER_PAGE
    }

    /// When the next step may run, given the rate (0: now); `None` with no region at all.
    pub fn next_due_ns(&self) -> Option<u64> {
        if self.pages() == 0 {
            return None;
        }
        if self.rate_bytes_per_s == 0 {
            return Some(0);
        }
        let done = (self.next_page * WORDS_PER_PAGE * 8) as u64;
        Some(self.pass_start_ns + done * 1_000_000_000 / self.rate_bytes_per_s)
    }

    /// Does one step if it is due; returns whether it did any work.
    pub fn step(&mut self, now_ns: u64) -> bool {
        if self.next_due_ns().is_none_or(|due| now_ns < due) {
            return false;
        }
        let end = (self.next_page + STEP_PAGES).min(self.pages());
        for p in self.next_page..end {
            let first = p * WORDS_PER_PAGE;
            let page = &mut self.region[first..first + WORDS_PER_PAGE];
            if let Some(m) = verify_and_write(page, self.first_word + first as u64, self.pass) {
                self.mismatches += 1;
                MISMATCHES.fetch_add(1, Ordering::Relaxed);
                crate::println!(
                    "DIRTY-MISMATCH pass={} index={} expected={:#x} found={:#x} cpu={}",
                    self.pass,
                    m.index,
                    m.expected,
                    m.found,
                    self.cpu
                );
            }
        }
        self.next_page = end;
        if self.next_page == self.pages() {
            self.end_pass();
        }
        true
    }

    fn end_pass(&mut self) {
        let now = clock::now_ns();
        // At most one progress line a second: an unthrottled pass can take milliseconds.
        if now - self.last_report_ns >= REPORT_INTERVAL_NS {
            let ms = (now - self.pass_start_ns) / 1_000_000;
            let mib = (self.region.len() * 8) >> 20;
            crate::println!(
                "DIRTY pass={} mib={mib} ms={ms} cpu={} mismatches={}",
                self.pass,
                self.cpu,
                self.mismatches
            );
            self.last_report_ns = now;
        }
        PASSES[self.cpu].store(self.pass, Ordering::Relaxed);
        self.pass += 1;
        self.next_page = 0;
        // At a set rate the next pass begins when this one was due to end, which may be
        // later than now (a pass of one step would otherwise never wait).
        // Rate 0 is "as fast as it goes": no wait.
        let pass_ns = ((self.region.len() * 8) as u64 * 1_000_000_000).checked_div(self.rate_bytes_per_s).unwrap_or(0);
        self.pass_start_ns = now.max(self.pass_start_ns + pass_ns);
    }
}
