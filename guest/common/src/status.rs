// SPDX-License-Identifier: Apache-2.0
//! The lines both guests print and answer the same way: the control service's status line and
//! the compute job's completion line. Formatting lives here so that a host tool parses one
//! format whichever kernel runs.

use core::fmt;

use crate::Workload;

/// How far the compute job got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Units in the job (0 without the compute workload).
    pub units: u64,
    /// Units finished so far.
    pub done: u64,
    /// Units finished per second, over about the last second.
    pub rate: u64,
    /// Since the job started, until now or until it finished.
    pub elapsed_ms: u64,
}

/// Everything `status` reports. Displayed as one line:
///
/// `STATUS workload=W cpus=N uptime_ms=N dirty_passes=N dirty_mismatches=N disk_passes=N
/// disk_mismatches=N job_units=N job_done=N job_rate=N job_elapsed_ms=N duty=P busy_pct=B`
///
/// `dirty_passes` counts the passes every vCPU has completed over its own region (the least of
/// them); `disk_passes` and `disk_mismatches` are the disk workload's (our guest only; 0 under
/// other workloads and in Linux's init); `duty` and `busy_pct` are the burn workload's asked and
/// measured share of time busy (0 under other workloads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub workload: Workload,
    /// CPUs online.
    pub cpus: u32,
    pub uptime_ms: u64,
    pub dirty_passes: u64,
    pub dirty_mismatches: u64,
    pub disk_passes: u64,
    pub disk_mismatches: u64,
    pub job: JobProgress,
    pub duty_pct: u8,
    /// Share of the last second the vCPUs spent in the burn loop, averaged over the vCPUs.
    pub busy_pct: u8,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "STATUS workload={} cpus={} uptime_ms={} dirty_passes={} dirty_mismatches={} disk_passes={} \
             disk_mismatches={} job_units={} job_done={} job_rate={} job_elapsed_ms={} duty={} busy_pct={}",
            self.workload.name(),
            self.cpus,
            self.uptime_ms,
            self.dirty_passes,
            self.dirty_mismatches,
            self.disk_passes,
            self.disk_mismatches,
            self.job.units,
            self.job.done,
            self.job.rate,
            self.job.elapsed_ms,
            self.duty_pct,
            self.busy_pct
        )
    }
}

/// `JOB-DONE units=N result=HASH elapsed_ms=T`, printed once when the compute job finished;
/// HASH is [`crate::compute::finish`]'s value in 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobDone {
    pub units: u64,
    pub result: u64,
    pub elapsed_ms: u64,
}

/// First word of [`JobDone`]'s line.
pub const JOB_DONE_PREFIX: &str = "JOB-DONE";

impl fmt::Display for JobDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{JOB_DONE_PREFIX} units={} result={:016x} elapsed_ms={}", self.units, self.result, self.elapsed_ms)
    }
}

/// Keeps a few recent readings of a growing counter to give its rate over a recent window
/// (four sampling intervals or a little more), whenever asked, whoever asks.
#[derive(Clone, Copy, Debug)]
pub struct RateWindow {
    /// Readings this far apart at least.
    interval_ns: u64,
    /// (time ns, value), oldest first; unused slots have time 0.
    samples: [(u64, u64); 5],
}

impl Default for RateWindow {
    /// Readings every [`RateWindow::SAMPLE_NS`]: a rate over about the last second.
    fn default() -> Self {
        Self::with_interval(Self::SAMPLE_NS)
    }
}

impl RateWindow {
    /// The default interval between readings.
    pub const SAMPLE_NS: u64 = 250_000_000;
    /// The interval for the burn load's busy time: a rate over about 4 s, so that the busy
    /// bursts of the 100 ms periods cut at the window's edges weigh under 1 %.
    pub const BUSY_SAMPLE_NS: u64 = 1_000_000_000;

    pub const fn with_interval(interval_ns: u64) -> Self {
        RateWindow { interval_ns, samples: [(0, 0); 5] }
    }

    /// Records `value` at `now_ns` if the last reading is old enough.
    pub fn sample(&mut self, now_ns: u64, value: u64) {
        let last = self.samples[self.samples.len() - 1];
        if last.0 != 0 && now_ns.saturating_sub(last.0) < self.interval_ns {
            return;
        }
        self.samples.rotate_left(1);
        let n = self.samples.len();
        self.samples[n - 1] = (now_ns.max(1), value);
    }

    /// Growth per second between the oldest reading kept and (`now_ns`, `value`).
    pub fn rate_per_s(&self, now_ns: u64, value: u64) -> u64 {
        let Some(&(t, v)) = self.samples.iter().find(|(t, _)| *t != 0) else { return 0 };
        let dt = now_ns.saturating_sub(t);
        if dt == 0 {
            return 0;
        }
        (u128::from(value.saturating_sub(v)) * 1_000_000_000 / u128::from(dt)) as u64
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::string::ToString;

    use super::*;

    #[test]
    fn status_line() {
        let s = Status {
            workload: Workload::Compute,
            cpus: 4,
            uptime_ms: 1500,
            dirty_passes: 0,
            dirty_mismatches: 0,
            disk_passes: 0,
            disk_mismatches: 0,
            job: JobProgress { units: 1000, done: 250, rate: 2000, elapsed_ms: 125 },
            duty_pct: 0,
            busy_pct: 0,
        };
        assert_eq!(
            s.to_string(),
            "STATUS workload=compute cpus=4 uptime_ms=1500 dirty_passes=0 dirty_mismatches=0 disk_passes=0 \
             disk_mismatches=0 job_units=1000 job_done=250 job_rate=2000 job_elapsed_ms=125 duty=0 busy_pct=0"
        );
    }

    #[test]
    fn job_done_line() {
        let d = JobDone { units: 3, result: 0xab, elapsed_ms: 7 };
        assert_eq!(d.to_string(), "JOB-DONE units=3 result=00000000000000ab elapsed_ms=7");
    }

    #[test]
    fn rate_over_the_window() {
        let mut w = RateWindow::default();
        assert_eq!(w.rate_per_s(1_000, 10), 0, "no reading yet");
        let s = 1_000_000_000;
        for i in 0..=8u64 {
            w.sample(i * s / 4, i * 100);
        }
        // 400 a second all along; the window holds the last five readings.
        assert_eq!(w.rate_per_s(2 * s + s / 4, 900), 400);
        // Readings closer than SAMPLE_NS are ignored.
        w.sample(2 * s + 1, 5000);
        assert_eq!(w.rate_per_s(2 * s + s / 4, 900), 400);
        // A longer interval keeps a longer window: readings every second, 4 s back.
        let mut w = RateWindow::with_interval(s);
        for i in 4..=40u64 {
            w.sample(i * s / 4, i * 25);
        }
        assert_eq!(w.samples.iter().map(|(t, _)| t / s).collect::<std::vec::Vec<_>>(), [6, 7, 8, 9, 10]);
        assert_eq!(w.rate_per_s(10 * s, 1000), 100);
    }
}
