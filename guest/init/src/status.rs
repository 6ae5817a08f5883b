// SPDX-License-Identifier: Apache-2.0
//! The status line (in the format both guests share, `guest_common::Status`) and the readings
//! behind its rates, taken four times a second by a thread of their own.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_common::{Params, RateWindow, Status, Workload};

use crate::{burn, compute, dirty, records, system};

struct Windows {
    start: Instant,
    units_done: RateWindow,
    busy_ns: RateWindow,
}

static WINDOWS: Mutex<Option<Windows>> = Mutex::new(None);

/// Starts taking readings.
pub fn start() -> Result<(), String> {
    *WINDOWS.lock().unwrap_or_else(|e| e.into_inner()) = Some(Windows {
        start: Instant::now(),
        units_done: RateWindow::default(),
        busy_ns: RateWindow::with_interval(RateWindow::BUSY_SAMPLE_NS),
    });
    crate::spawn("status", || {
        loop {
            if let Some(w) = WINDOWS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                let now = w.start.elapsed().as_nanos() as u64;
                w.units_done.sample(now, compute::done());
                w.busy_ns.sample(now, burn::busy_ns());
            }
            std::thread::sleep(Duration::from_nanos(RateWindow::SAMPLE_NS));
        }
    })
}

/// The status line's values now.
pub fn now(params: &Params) -> Status {
    let (units_rate, busy_per_s) = match WINDOWS.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(w) => {
            let now = w.start.elapsed().as_nanos() as u64;
            (w.units_done.rate_per_s(now, compute::done()), w.busy_ns.rate_per_s(now, burn::busy_ns()))
        }
        None => (0, 0),
    };
    let cpus = crate::cpus::all().len();
    let per_pct = cpus as u64 * 10_000_000;
    Status {
        workload: params.workload,
        cpus: cpus as u32,
        uptime_ms: system::uptime_ms(),
        dirty_passes: dirty::passes(),
        dirty_mismatches: dirty::MISMATCHES.load(std::sync::atomic::Ordering::Relaxed),
        // Linux's disk workload: records acknowledged, and bad ones found at start.
        disk_passes: records::ACKED.load(std::sync::atomic::Ordering::Relaxed),
        disk_mismatches: records::BAD.load(std::sync::atomic::Ordering::Relaxed),
        job: compute::progress(units_rate),
        duty_pct: if params.workload == Workload::Burn { params.duty_pct } else { 0 },
        busy_pct: ((busy_per_s + per_pct / 2) / per_pct).min(100) as u8,
    }
}
