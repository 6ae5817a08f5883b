// SPDX-License-Identifier: Apache-2.0
//! The `burn` workload on one CPU: busy (spinning on the clock) for `duty` % of every 100 ms
//! period, halted for the rest. Periods are aligned on kvmclock, so every CPU burns at the same
//! time. Each CPU counts the time it actually spun: the guest's own account of its load, which
//! `status` reports beside what was asked.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::clock;
use crate::percpu::MAX_CPUS;

/// The load's period.
pub const PERIOD_NS: u64 = 100_000_000;
/// Longest stretch spun at once, so that the boot CPU serves its devices in between.
const SLICE_NS: u64 = 1_000_000;

/// Nanoseconds spun, per CPU.
static BUSY_NS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Nanoseconds the first `cpus` CPUs spun, together.
pub fn busy_ns(cpus: usize) -> u64 {
    BUSY_NS[..cpus.clamp(1, MAX_CPUS)].iter().map(|b| b.load(Ordering::Relaxed)).sum()
}

pub struct Burn {
    cpu: usize,
    /// Busy time at the start of each period.
    busy_per_period_ns: u64,
}

impl Burn {
    pub fn new(duty_pct: u8, cpu: usize) -> Self {
        Burn { cpu, busy_per_period_ns: PERIOD_NS * u64::from(duty_pct.min(100)) / 100 }
    }

    /// Spins for up to [`SLICE_NS`] if this period's busy part is not over; returns whether it
    /// did.
    pub fn step(&mut self) -> bool {
        let start = clock::now_ns();
        let busy_end = start - start % PERIOD_NS + self.busy_per_period_ns;
        if start >= busy_end {
            return false;
        }
        let until = busy_end.min(start + SLICE_NS);
        let mut now = start;
        while now < until {
            core::hint::spin_loop();
            now = clock::now_ns();
        }
        // Up to `until` only: time the host took this vCPU away past it was not spent busy.
        BUSY_NS[self.cpu].fetch_add(until - start, Ordering::Relaxed);
        true
    }

    /// The next period's start (`None` at duty 0: never busy).
    pub fn next_due_ns(&self, now: u64) -> Option<u64> {
        (self.busy_per_period_ns > 0).then(|| now - now % PERIOD_NS + PERIOD_NS)
    }
}
