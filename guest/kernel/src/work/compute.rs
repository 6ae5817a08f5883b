// SPDX-License-Identifier: Apache-2.0
//! The `compute` workload: the job of `guest_common::compute`, shared by every CPU. Each CPU
//! takes the next unit no one has taken, computes it and adds its result to the common sum, so
//! all CPUs stay busy until the job runs out of units. The CPU that finishes the last unit
//! prints the `JOB-DONE` line. All of it lives in guest memory, so a migration carries the job
//! along, half-done units included.

use core::sync::atomic::{AtomicU64, Ordering};

use guest_common::{JobDone, JobProgress, RateWindow, compute};

use crate::clock;

/// Units in the job.
static UNITS: AtomicU64 = AtomicU64::new(0);
/// The next unit to hand out.
static NEXT: AtomicU64 = AtomicU64::new(0);
/// Units finished.
static DONE: AtomicU64 = AtomicU64::new(0);
/// Wrapping sum of the finished units' results.
static SUM: AtomicU64 = AtomicU64::new(0);
static START_NS: AtomicU64 = AtomicU64::new(0);
/// When the last unit finished (0: not yet).
static END_NS: AtomicU64 = AtomicU64::new(0);

/// Sets up a job of `units` units starting now; a job of none is done at once.
pub fn begin(units: u64) {
    let now = clock::now_ns();
    UNITS.store(units, Ordering::SeqCst);
    START_NS.store(now, Ordering::SeqCst);
    if units == 0 {
        finished(now);
    }
}

/// One CPU's part: it keeps no state of its own.
pub struct Compute;

impl Compute {
    /// Computes one unit, if any is left; returns whether it did.
    pub fn step(&mut self) -> bool {
        let units = UNITS.load(Ordering::Relaxed);
        if NEXT.load(Ordering::Relaxed) >= units {
            return false;
        }
        let unit = NEXT.fetch_add(1, Ordering::SeqCst);
        if unit >= units {
            return false;
        }
        SUM.fetch_add(compute::unit(unit), Ordering::SeqCst);
        // Whoever finishes the last unit has seen every other unit's result in SUM: each CPU
        // adds to SUM before it counts its unit done.
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 == units {
            finished(clock::now_ns());
        }
        true
    }

    /// `Some(0)` (now) while units are left, `None` after.
    pub fn next_due_ns(&self) -> Option<u64> {
        (NEXT.load(Ordering::Relaxed) < UNITS.load(Ordering::Relaxed)).then_some(0)
    }
}

fn finished(now: u64) {
    END_NS.store(now.max(1), Ordering::SeqCst);
    let units = UNITS.load(Ordering::SeqCst);
    let result = compute::finish(SUM.load(Ordering::SeqCst), units);
    let elapsed_ms = now.saturating_sub(START_NS.load(Ordering::SeqCst)) / 1_000_000;
    crate::println!("{}", JobDone { units, result, elapsed_ms });
}

/// Units finished so far.
pub fn done() -> u64 {
    DONE.load(Ordering::Relaxed)
}

/// The job's progress at `now`, with its rate from `rate` (fed with [`done`]).
pub fn progress(now: u64, rate: &RateWindow) -> JobProgress {
    let done = done();
    let start = START_NS.load(Ordering::Relaxed);
    let end = match END_NS.load(Ordering::Relaxed) {
        0 => now,
        t => t,
    };
    JobProgress {
        units: UNITS.load(Ordering::Relaxed),
        done,
        rate: rate.rate_per_s(now, done),
        // No job, no time (begin() sets START_NS to a kvmclock time, never 0).
        elapsed_ms: if start == 0 { 0 } else { end.saturating_sub(start) / 1_000_000 },
    }
}
