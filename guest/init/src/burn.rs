// SPDX-License-Identifier: Apache-2.0
//! The `burn` workload: one thread per CPU, busy (spinning on the clock) for `duty` % of every
//! 100 ms period and asleep for the rest; periods are aligned on one clock, so all CPUs burn at
//! the same time. The threads count the time they spun, which `status` reports.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PERIOD_NS: u64 = 100_000_000;

/// Nanoseconds spun by all threads together.
static BUSY_NS: AtomicU64 = AtomicU64::new(0);
static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Starts the load on every CPU.
pub fn start(duty_pct: u8) -> Result<(), String> {
    let busy = PERIOD_NS * u64::from(duty_pct.min(100)) / 100;
    now_ns();
    crate::cpus::spawn_per_cpu("burn", move |_| run(busy))
}

fn run(busy_per_period_ns: u64) {
    loop {
        let start = now_ns();
        let period = start - start % PERIOD_NS;
        let busy_end = period + busy_per_period_ns;
        if start < busy_end {
            let mut now = start;
            while now < busy_end {
                std::hint::spin_loop();
                now = now_ns();
            }
            // Up to `busy_end` only: time the thread lost to others past it was not busy time.
            BUSY_NS.fetch_add(busy_end - start, Ordering::Relaxed);
        } else {
            std::thread::sleep(Duration::from_nanos(period + PERIOD_NS - start));
        }
    }
}

/// Nanoseconds spun so far, all CPUs together.
pub fn busy_ns() -> u64 {
    BUSY_NS.load(Ordering::Relaxed)
}
