// SPDX-License-Identifier: Apache-2.0
//! The `compute` workload: the job of `guest_common::compute` on one thread per CPU. Each thread
//! takes the next unit no one has taken and adds its result to the common sum; the one that
//! finishes the last unit prints the `JOB-DONE` line, with the same result our own guest kernel
//! prints for the same size.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use guest_common::{JobDone, JobProgress, compute};

static UNITS: AtomicU64 = AtomicU64::new(0);
static NEXT: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);
static SUM: AtomicU64 = AtomicU64::new(0);
static START: OnceLock<Instant> = OnceLock::new();
/// Milliseconds the job took, plus one (0: not finished).
static ELAPSED_MS_PLUS_1: AtomicU64 = AtomicU64::new(0);

/// Starts a job of `units` units on every CPU.
pub fn start(units: u64) -> Result<(), String> {
    UNITS.store(units, Ordering::SeqCst);
    START.get_or_init(Instant::now);
    if units == 0 {
        finished();
        return Ok(());
    }
    crate::cpus::spawn_per_cpu("compute", |_| work())
}

fn work() {
    let units = UNITS.load(Ordering::SeqCst);
    loop {
        let unit = NEXT.fetch_add(1, Ordering::SeqCst);
        if unit >= units {
            return;
        }
        SUM.fetch_add(compute::unit(unit), Ordering::SeqCst);
        // Each thread adds to SUM before counting its unit, so the last one sees every result.
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 == units {
            finished();
        }
    }
}

fn finished() {
    let elapsed_ms = START.get().map_or(0, |s| s.elapsed().as_millis() as u64);
    ELAPSED_MS_PLUS_1.store(elapsed_ms + 1, Ordering::SeqCst);
    let units = UNITS.load(Ordering::SeqCst);
    let result = compute::finish(SUM.load(Ordering::SeqCst), units);
    say!("{}", JobDone { units, result, elapsed_ms });
}

/// Units finished so far.
pub fn done() -> u64 {
    DONE.load(Ordering::Relaxed)
}

/// The job's progress, with `rate` units per second.
pub fn progress(rate: u64) -> JobProgress {
    let elapsed_ms = match ELAPSED_MS_PLUS_1.load(Ordering::Relaxed) {
        0 => START.get().map_or(0, |s| s.elapsed().as_millis() as u64),
        ms => ms - 1,
    };
    JobProgress { units: UNITS.load(Ordering::Relaxed), done: done(), rate, elapsed_ms }
}
