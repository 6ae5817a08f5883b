// SPDX-License-Identifier: Apache-2.0
//! Talking to a guest of a test bed the way a host tool does: a line on its control port, its
//! status line read into fields, and the CPU time the VMM's vCPU threads got from the host.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::TestBed;

/// The guest's control service port.
pub const CONTROL_PORT: u16 = guest_common::CONTROL_PORT;

/// One `status` answer: its `key=value` fields, and when it was asked and answered.
#[derive(Clone, Debug)]
pub struct GuestStatus {
    pub fields: BTreeMap<String, String>,
    pub asked: Instant,
    pub answered: Instant,
}

impl GuestStatus {
    /// Reads a `STATUS k=v ...` line.
    pub fn parse(line: &str, asked: Instant, answered: Instant) -> Option<GuestStatus> {
        let mut words = line.split_ascii_whitespace();
        if words.next()? != "STATUS" {
            return None;
        }
        let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Some(GuestStatus { fields, asked, answered })
    }

    /// A numeric field; panics with the whole line if it is missing.
    pub fn num(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {key} in the status {:?}", self.fields))
    }

    pub fn workload(&self) -> &str {
        self.fields.get("workload").map_or("", String::as_str)
    }
}

/// One line exchange with guest 0 of `bed` on `port`, from the client namespace.
pub fn exchange(bed: &TestBed, port: u16, line: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((bed.guest_ip(0), port));
    let line = line.to_string();
    bed.client()
        .run_in(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(line.as_bytes())?;
            let mut answer = String::new();
            BufReader::new(s).read_line(&mut answer)?;
            Ok(answer)
        })
        .map_err(std::io::Error::other)?
}

/// Asks guest 0 for `status`, retrying until it answers (right after a move the network may
/// need a moment) or `timeout` passed.
pub fn status(bed: &TestBed, timeout: Duration) -> Result<GuestStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let asked = Instant::now();
        let answer = exchange(bed, CONTROL_PORT, "status\n");
        let answered = Instant::now();
        match answer.as_deref().map(|a| GuestStatus::parse(a, asked, answered)) {
            Ok(Some(status)) => return Ok(status),
            other if Instant::now() >= deadline => {
                return Err(format!("no status from {}:{CONTROL_PORT} within {timeout:?}: {other:?}", bed.guest_ip(0)));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// What the host's scheduler says about one thread (`/proc/PID/task/TID/schedstat`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadTime {
    pub tid: u32,
    pub name: String,
    /// Time on a CPU.
    pub run_ns: u64,
    /// Time runnable but waiting for a CPU.
    pub wait_ns: u64,
}

/// The vCPU threads (`vcpu0`, `vcpu1`, ...) of VMM process `pid`, in index order.
pub fn vcpu_threads(pid: u32) -> std::io::Result<Vec<ThreadTime>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else { continue };
        let name = name.trim().to_string();
        if !name.starts_with("vcpu") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else { continue };
        let mut f = stat.split_ascii_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        let tid = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()).unwrap_or(0);
        out.push(ThreadTime { tid, name, run_ns: f.next().unwrap_or(0), wait_ns: f.next().unwrap_or(0) });
    }
    out.sort_by_key(|t| t.name.trim_start_matches("vcpu").parse::<u32>().unwrap_or(u32::MAX));
    Ok(out)
}

/// Per vCPU thread, what it got between two readings of [`vcpu_threads`] `wall` apart:
/// (name, share of the time on a CPU, share of the time waiting for one), in percent.
pub fn shares(before: &[ThreadTime], after: &[ThreadTime], wall: Duration) -> Vec<(String, f64, f64)> {
    let wall_ns = wall.as_nanos().max(1) as f64;
    after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.tid == a.tid)?;
            let run = a.run_ns.saturating_sub(b.run_ns) as f64 * 100.0 / wall_ns;
            let wait = a.wait_ns.saturating_sub(b.wait_ns) as f64 * 100.0 / wall_ns;
            Some((a.name.clone(), run, wait))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let now = Instant::now();
        let s = GuestStatus::parse("STATUS workload=compute cpus=4 job_done=12\n", now, now).unwrap();
        assert_eq!((s.workload(), s.num("cpus"), s.num("job_done")), ("compute", 4, 12));
        assert!(GuestStatus::parse("ERROR nope", now, now).is_none());
    }

    #[test]
    fn this_process_has_no_vcpu_threads_but_schedstat_reads() {
        assert!(vcpu_threads(std::process::id()).unwrap().is_empty());
        let stat = std::fs::read_to_string("/proc/self/schedstat").unwrap();
        assert_eq!(stat.split_ascii_whitespace().count(), 3, "{stat}");
    }
}
