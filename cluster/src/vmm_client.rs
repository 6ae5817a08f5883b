// SPDX-License-Identifier: Apache-2.0
//! Running VMMs on this host: each VM is its own `vmm run` process in a session of its own
//! (signals to the agent do not reach it), with its console and log in files of its state
//! directory (never pipes to the agent: a dead agent must not take its VMMs down), its API on a
//! socket there, and its NIC on a TAP bridged onto the host's network. An incoming VMM gets the
//! accepted migration connection and the commit hook as inherited file descriptors.

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use vmm::api::client::ApiClient;

use crate::error::ClusterError;
use crate::local::{LocalVm, Role, StateDir};
use crate::model::VmRecord;

/// The descriptors an incoming VMM finds its connection and its commit hook on.
const INCOMING_FD: RawFd = 3;
const HOOK_FD: RawFd = 4;
/// Where a destination VMM finds the channel its move's later connections come on.
const CONNS_FD: RawFd = 5;
/// API calls to a local VMM: it answers in milliseconds unless something is badly wrong.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts, watches and stops this host's VMMs.
pub struct Runner {
    vmm: PathBuf,
    bridge: Option<String>,
    /// `--tls-dir DIR` or `--insecure-plaintext`, for every VMM.
    security_args: Vec<String>,
    pub dirs: StateDir,
    /// The VMMs this agent started itself, to reap them; adopted ones are not its children.
    children: Mutex<HashMap<u32, Child>>,
    /// How reaped children ended.
    exits: Mutex<HashMap<u32, String>>,
}

impl Runner {
    pub fn new(vmm: PathBuf, bridge: Option<String>, security_args: Vec<String>, dirs: StateDir) -> Runner {
        Runner {
            vmm,
            bridge,
            security_args,
            dirs,
            children: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
        }
    }

    /// The TAP name of VM `vm` at `epoch`: short enough for Linux (15 bytes), unique per VM and
    /// epoch, so a VM coming back to a host before its old TAP is gone does not collide.
    pub fn tap_name(vm: &str, epoch: u64) -> String {
        // FNV-1a: stable across builds, unlike the std hasher.
        let h = vm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        format!("vt{:08x}e{}", h as u32, epoch % 10_000)
    }

    pub fn api_sock(&self, vm: &str, epoch: u64) -> PathBuf {
        self.dirs.vm_dir(vm, epoch).join("api.sock")
    }

    /// A client for VMM `l`'s API.
    pub fn api(&self, l: &LocalVm) -> ApiClient {
        ApiClient::new(self.api_sock(&l.vm, l.epoch)).with_timeout(API_TIMEOUT)
    }

    /// Boots VM `rec` here.
    pub fn boot(&self, rec: &VmRecord) -> Result<LocalVm, ClusterError> {
        let s = &rec.spec;
        let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), s.kernel.display().to_string()];
        if let Some(i) = &s.initrd {
            args.extend(["--initrd".into(), i.display().to_string()]);
        }
        args.extend([
            "--cmdline".into(),
            s.cmdline.clone(),
            "--mem-mib".into(),
            s.mem_mib.to_string(),
            "--vcpus".into(),
            s.vcpus.to_string(),
        ]);
        let tap = match &s.mac {
            Some(mac) => {
                let tap = self.create_tap(&rec.name, rec.epoch)?;
                args.extend(["--net".into(), format!("tap={tap},mac={mac}")]);
                Some(tap)
            }
            None => None,
        };
        let local = self.spawn(&rec.name, rec.epoch, args, tap, Role::Booted, None);
        if local.is_err() {
            self.remove_tap(Self::tap_name(&rec.name, rec.epoch).as_str());
        }
        local
    }

    /// Starts a destination VMM for VM `rec` (at the epoch the commit will give it) on the
    /// accepted migration connection `conn`, with `hook` as its commit hook.
    pub fn receive(
        &self,
        rec: &VmRecord,
        epoch: u64,
        move_id: &str,
        conn: &TcpStream,
        hook: &UnixStream,
        conns: &UnixStream,
    ) -> Result<LocalVm, ClusterError> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--incoming-fd".into(),
            INCOMING_FD.to_string(),
            "--commit-hook-fd".into(),
            HOOK_FD.to_string(),
            "--incoming-conns-fd".into(),
            CONNS_FD.to_string(),
        ];
        let tap = match &rec.spec.mac {
            Some(_) => {
                let tap = self.create_tap(&rec.name, epoch)?;
                args.extend(["--net".into(), format!("tap={tap}")]);
                Some(tap)
            }
            None => None,
        };
        let fds = Some((conn.as_raw_fd(), hook.as_raw_fd(), conns.as_raw_fd()));
        let role = Role::Incoming { move_id: move_id.to_string() };
        let local = self.spawn(&rec.name, epoch, args, tap, role, fds);
        if local.is_err() {
            self.remove_tap(Self::tap_name(&rec.name, epoch).as_str());
        }
        local
    }

    fn spawn(
        &self,
        vm: &str,
        epoch: u64,
        mut args: Vec<String>,
        tap: Option<String>,
        role: Role,
        fds: Option<(RawFd, RawFd, RawFd)>,
    ) -> Result<LocalVm, ClusterError> {
        let dir = self.dirs.vm_dir(vm, epoch);
        // A stale directory of the same VM and epoch (a VMM that never got far) goes.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(ClusterError::io(format!("cannot create {}", dir.display())))?;
        let sock = self.api_sock(vm, epoch);
        if sock.as_os_str().len() >= 108 {
            return Err(ClusterError::Invalid(format!(
                "the API socket path {} is too long for a unix socket: use a shorter --state-dir",
                sock.display()
            )));
        }
        args.extend(["--api-sock".into(), sock.display().to_string()]);
        args.extend(self.security_args.iter().cloned());
        let console = create(&dir.join("console.log"))?;
        let log = create(&dir.join("vmm.log"))?;
        let mut cmd = Command::new(&self.vmm);
        cmd.args(&args).stdin(Stdio::null()).stdout(console).stderr(log);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (setsid, dup2) on descriptors that are open in it.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own: the agent's terminal or process group signals (and its
                // death) do not reach the VMM.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((conn, hook, conns)) = fds {
                    // Copies above the targets first, so no dup2 can clobber another's source;
                    // dup2 then leaves the targets open across exec.
                    let c = libc::fcntl(conn, libc::F_DUPFD_CLOEXEC, 10);
                    let h = libc::fcntl(hook, libc::F_DUPFD_CLOEXEC, 10);
                    let n = libc::fcntl(conns, libc::F_DUPFD_CLOEXEC, 10);
                    if c < 0
                        || h < 0
                        || n < 0
                        || libc::dup2(c, INCOMING_FD) < 0
                        || libc::dup2(h, HOOK_FD) < 0
                        || libc::dup2(n, CONNS_FD) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(ClusterError::io(format!("cannot start {}", self.vmm.display())))?;
        let pid = child.id();
        let start_time = crate::procfs::start_time(pid).unwrap_or(0);
        self.children.lock().expect("Poisoned lock").insert(pid, child);
        let local = LocalVm {
            vm: vm.to_string(),
            epoch,
            pid,
            start_time,
            tap,
            role,
            committed_revision: None,
            may_run: false,
            outgoing: None,
            stopping: false,
        };
        self.dirs.save(&local)?;
        tracing::info!(vm, epoch, pid, "started a VMM");
        Ok(local)
    }

    /// Whether VMM `l` still runs (reaping it if it was this agent's child and ended).
    pub fn alive(&self, l: &LocalVm) -> bool {
        let mut children = self.children.lock().expect("Poisoned lock");
        if let Some(child) = children.get_mut(&l.pid) {
            match child.try_wait() {
                Ok(None) => return true,
                Ok(Some(status)) => {
                    self.exits.lock().expect("Poisoned lock").insert(l.pid, status.to_string());
                    children.remove(&l.pid);
                    return false;
                }
                Err(_) => {}
            }
        }
        crate::procfs::is_alive(l.pid, l.start_time)
    }

    /// How VMM `l` ended, if this agent saw it.
    pub fn exit_status(&self, l: &LocalVm) -> Option<String> {
        self.exits.lock().expect("Poisoned lock").get(&l.pid).cloned()
    }

    /// The last lines of VMM `l`'s log, for messages.
    pub fn log_tail(&self, l: &LocalVm) -> String {
        let text = std::fs::read_to_string(self.dirs.vm_dir(&l.vm, l.epoch).join("vmm.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Kills VMM `l` (SIGKILL) if it is still the process this agent started.
    pub fn kill(&self, l: &LocalVm) {
        if !self.alive(l) {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(l.pid) else { return };
        // SAFETY: plain syscall; `alive` just checked that pid and start time are ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        for _ in 0..100 {
            if !self.alive(l) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes VMM `l`'s TAP and directory (it must have ended).
    pub fn forget(&self, l: &LocalVm) {
        if let Some(tap) = &l.tap {
            self.remove_tap(tap);
        }
        self.dirs.remove(&l.vm, l.epoch);
        self.exits.lock().expect("Poisoned lock").remove(&l.pid);
    }

    /// Creates the VM's TAP and bridges it onto the host's network.
    fn create_tap(&self, vm: &str, epoch: u64) -> Result<String, ClusterError> {
        let tap = Self::tap_name(vm, epoch);
        // A leftover of an earlier VMM of the same VM and epoch.
        let _ = ip(&["link", "del", &tap]);
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        let bridged = match &self.bridge {
            Some(br) => ip(&["link", "set", &tap, "master", br, "up"]),
            None => ip(&["link", "set", &tap, "up"]),
        };
        if let Err(e) = bridged {
            self.remove_tap(&tap);
            return Err(e);
        }
        Ok(tap)
    }

    fn remove_tap(&self, tap: &str) {
        let _ = ip(&["link", "del", tap]);
    }
}

fn create(path: &Path) -> Result<std::fs::File, ClusterError> {
    std::fs::File::create(path).map_err(ClusterError::io(format!("cannot create {}", path.display())))
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(ClusterError::io("cannot run `ip` (install iproute2)"))?;
    if !out.status.success() {
        return Err(ClusterError::Failed(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_differ() {
        let a = Runner::tap_name("a-very-long-vm-name-of-32-chars-", 12345);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(Runner::tap_name("v", 1), Runner::tap_name("v", 2));
        assert_ne!(Runner::tap_name("v1", 1), Runner::tap_name("v2", 1));
        assert_eq!(Runner::tap_name("v", 1), Runner::tap_name("v", 1));
    }
}
