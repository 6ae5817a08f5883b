// SPDX-License-Identifier: Apache-2.0
//! CPU capacity for the hosts of a test bed: a cgroup v1 `cpu` group per host with a CFS quota
//! (e.g. 0.6 CPU), named `vmm-<tag>-<pid>`. Processes join it as they start (a `pre_exec`
//! step), so everything a host runs — its agent and every VMM the agent starts, in whatever
//! session — is in it. Dropping the group (also during a panic) kills every process still in
//! it and removes it; groups of test processes that died are swept when a new one is made.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the cgroup v1 `cpu` controller is mounted.
pub const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";
const PERIOD_US: u64 = 100_000;

/// A cgroup with a CPU quota.
#[derive(Debug)]
pub struct CpuCgroup {
    path: PathBuf,
}

impl CpuCgroup {
    /// Creates `vmm-<tag>-<this pid>` with `millis` thousandths of a CPU (`None`: no quota).
    pub fn create(tag: &str, millis: Option<u64>) -> io::Result<CpuCgroup> {
        sweep_stale();
        let path = Path::new(CPU_ROOT).join(format!("vmm-{tag}-{}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))),
        }
        let group = CpuCgroup { path };
        if let Some(m) = millis {
            std::fs::write(group.path.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
            std::fs::write(group.path.join("cpu.cfs_quota_us"), (m * PERIOD_US / 1000).max(1000).to_string())?;
        }
        Ok(group)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s process join this group before it execs (its children stay in it).
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).expect("no NUL in a cgroup path");
        // SAFETY: between fork and exec the closure only calls async-signal-safe functions
        // (getpid, open, write, close) on memory it owns.
        unsafe {
            cmd.pre_exec(move || {
                let mut buf = [0u8; 16];
                let mut n = libc::getpid() as u64;
                let mut i = buf.len();
                loop {
                    i -= 1;
                    buf[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
                libc::close(fd);
                if written < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.path)
    }

    /// (periods, throttled periods) so far.
    pub fn throttling(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(self.path.join("cpu.stat")).ok()?;
        let get = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
        Some((get("nr_periods ")?, get("nr_throttled ")?))
    }
}

fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills everything in the group and removes it.
fn destroy(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids(path);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: plain syscall; a pid listed in our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A group is removable once its last task has exited (zombies included).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.path) {
            eprintln!("test bed: cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

/// Removes `vmm-*-<pid>` groups whose process is gone.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(CPU_ROOT) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix("vmm-").and_then(|rest| rest.rsplit('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = destroy(&e.path());
        }
    }
}
