// SPDX-License-Identifier: Apache-2.0
//! What the agent reads from `/proc` and the cgroup v1 `cpu` hierarchy: whether a VMM process
//! still is the one it started (pid and start time), the CPU time of a process and of its vCPU
//! threads, its resident memory, and the host's CPU capacity and throttling from its cgroup.

use std::path::{Path, PathBuf};

/// Where the cgroup v1 `cpu` controller is mounted.
const CPU_CGROUP_ROOT: &str = "/sys/fs/cgroup/cpu";

/// The fields of `/proc/PID/stat` after the command name, which may contain anything.
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// (state, utime + stime in ticks, start time in ticks since boot) of a process or thread.
/// Field numbers are those of proc(5) minus 3 (pid and comm are gone, and it counts from 0).
fn stat(path: &Path) -> Option<(char, u64, u64)> {
    let f = stat_fields(path)?;
    let state = f.first()?.chars().next()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start: u64 = f.get(19)?.parse().ok()?;
    Some((state, utime + stime, start))
}

/// The start time of process `pid` (ticks since boot), if it exists and is not a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let (state, _, start) = stat(&PathBuf::from(format!("/proc/{pid}/stat")))?;
    (state != 'Z' && state != 'X').then_some(start)
}

/// Whether `pid` is still the live process that started at `start` (not a recycled pid).
pub fn is_alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Clock ticks per second.
pub fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory side effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU time of process `pid` (all threads), in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stat(&PathBuf::from(format!("/proc/{pid}/stat"))).map(|s| s.1)
}

/// CPU time of process `pid`'s vCPU threads (named `vcpuN`), in ticks.
pub fn vcpu_ticks(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            total += stat(&task.path().join("stat")).map_or(0, |s| s.1);
        }
    }
    Some(total)
}

/// Scheduler figures of process `pid`'s vCPU threads (named `vcpuN`), summed: (ns running,
/// ns runnable but waiting for a CPU) from each thread's `schedstat`. Waiting includes the
/// time the thread's cgroup was throttled by its CFS quota, so running + waiting over a period
/// is what the vCPUs asked for, whether or not they got it.
pub fn vcpu_sched_ns(pid: u32) -> Option<(u64, u64)> {
    let (mut run, mut wait) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        if let Some((r, w)) = schedstat(&task.path().join("schedstat")) {
            run += r;
            wait += w;
        }
    }
    Some((run, wait))
}

/// (ns on a CPU, ns waiting on a run queue) from a `schedstat` file.
fn schedstat(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The directory of this process's cgroup in the v1 `cpu` hierarchy.
pub fn own_cpu_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "cpu").then(|| path.to_string())
    })?;
    Some(Path::new(CPU_CGROUP_ROOT).join(path.trim_start_matches('/')))
}

/// The CPU a cgroup may use (its CFS quota), in thousandths of a CPU; `None` without a quota.
pub fn quota_millis(cgroup: &Path) -> Option<u64> {
    let read = |f: &str| -> Option<i64> { std::fs::read_to_string(cgroup.join(f)).ok()?.trim().parse().ok() };
    let (quota, period) = (read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?);
    (quota > 0 && period > 0).then(|| (quota as u64 * 1000) / period as u64)
}

/// (periods, throttled periods) of a cgroup's CFS bandwidth control so far.
pub fn throttling(cgroup: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat")).ok()?;
    let get = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
    Some((get("nr_periods ")?, get("nr_throttled ")?))
}

/// The CPUs this machine has, in thousandths of a CPU.
pub fn machine_cpu_millis() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000
}

/// The machine's memory, MiB.
pub fn machine_mem_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_visible() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1));
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert_eq!(vcpu_ticks(me), Some(0));
        assert_eq!(vcpu_sched_ns(me), Some((0, 0)));
        assert!(schedstat(Path::new("/proc/self/schedstat")).is_some_and(|(run, _)| run > 0));
        assert!(machine_cpu_millis() >= 1000);
        assert!(machine_mem_mib() > 0);
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn stat_survives_odd_command_names() {
        let dir = std::env::temp_dir().join(format!("vmm-procfs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("stat");
        // A command name with spaces and a parenthesis.
        std::fs::write(&p, "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 12345 1000 100").unwrap();
        assert_eq!(stat(&p), Some(('S', 12, 12345)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
