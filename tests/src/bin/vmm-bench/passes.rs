// SPDX-License-Identifier: Apache-2.0
//! The dirty workload's own pace, as the guest counts it: its completed passes, asked on its
//! control port (`status`) every [`POLL`] from the client namespace while a case runs, and the
//! passes per second over any span read from those samples. The same guest kernel answers under
//! both monitors, so the figure means the same for both.
//!
//! The count is whole passes (a pass at 512 MiB/s over 256 MiB takes half a second), so a
//! span's rate is read from the moments the count changed, with the count interpolated in
//! between: the error is that of the polling interval at each end, not a whole pass.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_tests::guest::{CONTROL_PORT, GuestStatus};
use vmm_tests::{Netns, NsThread};

/// How often the guest is asked.
const POLL: Duration = Duration::from_millis(50);

/// (when the answer came, passes completed).
type Sample = (Instant, u64);

/// The samples of one guest, taken by a thread in the client namespace until dropped.
pub struct PassLog {
    samples: Arc<Mutex<Vec<Sample>>>,
    /// A status line with mismatches, if any came (the workload found a bad page).
    mismatch: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl PassLog {
    /// Starts asking guest `guest` from `client`.
    pub fn start(client: &Netns, guest: Ipv4Addr) -> Result<PassLog, String> {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mismatch = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, m, st) = (samples.clone(), mismatch.clone(), stop.clone());
        let addr = SocketAddr::from((guest, CONTROL_PORT));
        let thread = client
            .spawn_in(move || {
                while !st.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    if let Ok(line) = ask(addr) {
                        let now = Instant::now();
                        if let Some(status) = GuestStatus::parse(&line, asked, now) {
                            let passes = status.fields.get("dirty_passes").and_then(|v| v.parse().ok());
                            let bad = status.fields.get("dirty_mismatches").is_some_and(|v| v != "0");
                            if bad {
                                m.lock().expect("Poisoned lock").get_or_insert(line.trim().to_string());
                            }
                            if let Some(p) = passes {
                                s.lock().expect("Poisoned lock").push((now, p));
                            }
                        }
                    }
                    std::thread::sleep(POLL.saturating_sub(asked.elapsed()));
                }
            })
            .map_err(|e| format!("the status poller: {e}"))?;
        Ok(PassLog { samples, mismatch, stop, thread: Some(thread) })
    }

    /// A status line in which the workload reported bad pages, if one came.
    pub fn mismatch(&self) -> Option<String> {
        self.mismatch.lock().expect("Poisoned lock").clone()
    }

    /// Passes per second over `from..to`, once samples show the count changing on both sides
    /// of the span.
    pub fn rate(&self, from: Instant, to: Instant) -> Option<f64> {
        let samples = self.samples.lock().expect("Poisoned lock");
        let base = samples.first()?.0;
        let secs = |t: Instant| t.checked_duration_since(base).map_or(0.0, |d| d.as_secs_f64());
        let points = change_points(&samples.iter().map(|&(t, p)| (secs(t), p)).collect::<Vec<_>>());
        rate(&points, secs(from), secs(to))
    }

    /// Waits until [`PassLog::rate`] can answer for a span ending at `to`: the count changed
    /// after it, twice (or `timeout` passed). False if it did not.
    pub fn wait_past(&self, to: Instant, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let changes = {
                let samples = self.samples.lock().expect("Poisoned lock");
                let last_before = samples.iter().rev().find(|(t, _)| *t <= to).map_or(0, |s| s.1);
                let mut after: Vec<u64> = samples.iter().filter(|(t, _)| *t > to).map(|s| s.1).collect();
                after.dedup();
                after.iter().filter(|&&p| p != last_before).count()
            };
            if changes >= 2 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for PassLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join();
        }
    }
}

/// One `status` exchange on a new connection, with short timeouts (a guest in its pause
/// answers later, or the next poll does).
fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// The samples at which the count took a new value (the first sample of each value).
fn change_points(samples: &[(f64, u64)]) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::new();
    for &(t, p) in samples {
        if out.last().is_none_or(|&(_, last)| p != last) {
            out.push((t, p));
        }
    }
    out
}

/// The count at `t`, interpolated between the change points around it.
fn count_at(points: &[(f64, u64)], t: f64) -> Option<f64> {
    let i = points.iter().position(|&(pt, _)| pt >= t)?;
    if points[i].0 == t {
        return Some(points[i].1 as f64);
    }
    if i == 0 {
        return None;
    }
    let ((t0, p0), (t1, p1)) = (points[i - 1], points[i]);
    let span = t1 - t0;
    let frac = if span > 0.0 { (t - t0) / span } else { 1.0 };
    Some(p0 as f64 + (p1 as f64 - p0 as f64) * frac)
}

/// Passes per second over `[from, to]`.
fn rate(points: &[(f64, u64)], from: f64, to: f64) -> Option<f64> {
    if to <= from {
        return None;
    }
    Some((count_at(points, to)? - count_at(points, from)?) / (to - from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_from_the_moments_the_count_changed() {
        // Two passes a second, polled every 0.1 s: the count changes at 0.5, 1.0, 1.5 ...
        let samples: Vec<(f64, u64)> = (0..40).map(|i| (i as f64 * 0.1, (i / 5) as u64)).collect();
        let points = change_points(&samples);
        assert_eq!(points[..3], [(0.0, 0), (0.5, 1), (1.0, 2)]);
        let r = rate(&points, 0.7, 1.9).unwrap();
        assert!((r - 2.0).abs() < 1e-9, "{r}");
        // No change point after the span's end yet: no answer.
        assert_eq!(rate(&points, 1.0, 3.8), None);
        assert_eq!(rate(&points, 1.0, 1.0), None);
    }

    #[test]
    fn a_stall_shows_in_the_rate() {
        // One pass a second, then nothing from 2 s to 4 s, then one a second again.
        let points = [(0.0, 0), (1.0, 1), (2.0, 2), (5.0, 3), (6.0, 4)];
        let r = rate(&points, 2.0, 5.0).unwrap();
        assert!((r - 1.0 / 3.0).abs() < 1e-9, "{r}");
        assert_eq!(rate(&points, -1.0, 1.0), None);
    }
}
