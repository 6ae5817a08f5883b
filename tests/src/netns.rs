// SPDX-License-Identifier: Apache-2.0
//! Named network namespaces made with iproute2, commands and threads that run inside them, and
//! the sweep that removes namespaces left behind by test processes that died.
//!
//! Everything the test bed creates lives in namespaces named `vmmtb-<pid>-<n>[-<node>]`; the pid
//! in the name is what lets [`sweep_stale`] tell leftovers from the beds of live processes.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::TestBedError;
use crate::l2;
use crate::process::{self, Process};

/// Prefix of every namespace a test bed creates.
pub const NETNS_PREFIX: &str = "vmmtb-";

/// Where iproute2 keeps the bind mounts that name namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Number of the next test bed of this process (the `<n>` in the names).
static BED_COUNTER: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` bind-mounts `/run/netns` the first time it runs; concurrent first runs race on
/// that mount, so this process creates its namespaces one at a time.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// Reserves a bed number and returns it with the bed's namespace name prefix.
pub(crate) fn next_bed() -> (u32, String) {
    let n = BED_COUNTER.fetch_add(1, Ordering::SeqCst);
    (n, format!("{NETNS_PREFIX}{}-{n}", std::process::id()))
}

/// Runs `ip ARGS`, returning its stdout, or an error with the command line and its stderr.
pub(crate) fn ip<S: AsRef<str>>(args: &[S]) -> Result<String, TestBedError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let cmdline = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestBedError::Spawn { cmdline: cmdline.clone(), source })?;
    if !out.status.success() {
        return Err(TestBedError::Command {
            cmdline,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all named network namespaces on the machine (what `ip netns list` shows).
pub fn list_netns() -> Result<Vec<String>, TestBedError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        // iproute2 creates the directory with the first namespace.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TestBedError::ListNetns(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(TestBedError::ListNetns)?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Splits `vmmtb-<pid>-<n>[-<node>]` into the pid and bed number.
fn parse_bed_name(name: &str) -> Option<(u32, u32)> {
    let mut fields = name.strip_prefix(NETNS_PREFIX)?.split('-');
    let pid = fields.next()?.parse().ok()?;
    let n = fields.next()?.parse().ok()?;
    Some((pid, n))
}

/// Deletes test bed namespaces whose creating process is gone (killed test binaries, aborts), and
/// returns their names. Called by every [`crate::TestBed`] build.
///
/// Namespaces of live processes are left alone, so concurrently running test binaries do not
/// disturb each other. Processes still running inside a swept namespace are not killed; they keep
/// the (now nameless) namespace alive until they exit.
pub fn sweep_stale() -> Result<Vec<String>, TestBedError> {
    let names = list_netns()?;
    // Loaded after listing: a namespace of one of our own beds got its number before it was
    // created, so a number at or above this belongs to an earlier process that had our pid.
    let next = BED_COUNTER.load(Ordering::SeqCst);
    let me = std::process::id();
    let mut removed = Vec::new();
    for name in names {
        let Some((pid, n)) = parse_bed_name(&name) else {
            continue;
        };
        let stale = if pid == me { n >= next } else { !Path::new(&format!("/proc/{pid}")).exists() };
        if !stale {
            continue;
        }
        match ip(&["netns", "del", &name]) {
            Ok(_) => removed.push(name),
            // Another process may be sweeping the same leftovers right now.
            Err(_) if !Path::new(NETNS_DIR).join(&name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Moves the calling thread into the named network namespace. Only this thread changes
/// namespace (and the threads it starts afterwards); the rest of the process stays where it is.
fn enter_netns(netns: &str) -> Result<(), TestBedError> {
    let err = |source| TestBedError::EnterNetns { netns: netns.to_string(), source };
    let file = File::open(Path::new(NETNS_DIR).join(netns)).map_err(err)?;
    // SAFETY: `file` is an open namespace file that outlives the call; CLONE_NEWNET only switches
    // the network namespace of the calling thread and touches no memory of ours.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// A named network namespace owned by the test bed.
///
/// Dropping it kills the processes started with [`Netns::spawn`] and deletes the namespace, which
/// deletes every interface inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    processes: Mutex<Vec<Arc<Mutex<Child>>>>,
    /// False once [`Netns::destroy`] has run, so that Drop does not delete it twice.
    live: bool,
}

impl Netns {
    /// Creates the namespace with `lo` up and IPv6 off.
    pub(crate) fn create(name: String) -> Result<Self, TestBedError> {
        {
            let _guard = NETNS_ADD_LOCK.lock().expect("Poisoned lock");
            ip(&["netns", "add", &name])?;
        }
        // From here on, Drop deletes the namespace if the rest of the setup fails.
        let netns = Netns { name, processes: Mutex::new(Vec::new()), live: true };
        netns.run_ip(&["link", "set", "lo", "up"])?;
        // Without IPv6 the segment carries no router solicitations or MLD reports, only the
        // traffic a test makes, which keeps frame-level assertions simple.
        netns.run_in(|| {
            ["all", "default"].into_iter().try_for_each(|conf| {
                let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                match fs::write(&path, "1") {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(TestBedError::Sysctl { path, source: e }),
                    // No IPv6 in this kernel: nothing to turn off.
                    _ => Ok(()),
                }
            })
        })??;
        Ok(netns)
    }

    /// The namespace name, as `ip netns` and `ip -n` take it.
    pub fn netns(&self) -> &str {
        &self.name
    }

    /// The file that names the namespace (`/run/netns/NAME`), for `setns()` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n NETNS ARGS` and returns its stdout.
    pub fn run_ip<S: AsRef<str>>(&self, args: &[S]) -> Result<String, TestBedError> {
        let mut full = vec!["-n", &self.name];
        full.extend(args.iter().map(AsRef::as_ref));
        ip(&full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NETNS program`).
    /// `ip netns exec` execs the program, so the child's pid is the program's pid.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A command that runs `program` directly in the namespace, joined (`setns`) between fork
    /// and exec. Unlike [`Netns::command`] (`ip netns exec`, which remounts `/sys` for the
    /// namespace) it keeps this process's mounts, so the program sees the cgroup hierarchy under
    /// `/sys/fs/cgroup`: what a host agent needs to read its CPU quota.
    pub fn command_keeping_mounts(&self, program: impl AsRef<OsStr>) -> Command {
        let path = std::ffi::CString::new(self.path().into_os_string().into_encoded_bytes())
            .expect("namespace paths have no NUL");
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
        // (open, setns, close) on memory it owns.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let rc = libc::setns(fd, libc::CLONE_NEWNET);
                libc::close(fd);
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts `cmd` (made with [`Netns::command`]) and registers it with this namespace, which
    /// kills and reaps it when the namespace goes away, including during a panic: a process left
    /// inside a namespace would keep it alive.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process, TestBedError> {
        let (process, child) = process::spawn(cmd)?;
        self.processes.lock().expect("Poisoned lock").push(child);
        Ok(process)
    }

    /// Like [`Netns::spawn`] for a command made with `Command::new` (no `ip netns exec`, no
    /// `pre_exec`): it is started from a thread inside this namespace, so the child is born in
    /// it, and the standard library starts it with `posix_spawn` (a vfork) rather than a fork,
    /// whose cost grows with this process's memory and threads. What a program's start time is
    /// measured with (the benchmark's restore rows).
    pub fn spawn_from_inside(&self, cmd: &mut Command) -> Result<Process, TestBedError> {
        let (process, child) = self.run_in(|| process::spawn(cmd))??;
        self.processes.lock().expect("Poisoned lock").push(child);
        Ok(process)
    }

    /// Runs `f` on a new thread that entered this namespace, and returns its result. Sockets
    /// created there stay in this namespace, so `f` can also just create a listener or a raw
    /// socket and hand it back. A panic in `f` is passed on to the caller.
    pub fn run_in<T, F>(&self, f: F) -> Result<T, TestBedError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(scope, || {
                    enter_netns(&self.name)?;
                    Ok(f())
                })
                .map_err(TestBedError::Thread)?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run_in`] but does not wait: `f` runs on a background thread inside this
    /// namespace (e.g. a server), and the returned handle joins it.
    pub fn spawn_in<T, F>(&self, f: F) -> Result<NsThread<T>, TestBedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let netns = self.name.clone();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let handle = thread::Builder::new()
            .name(format!("in-{netns}"))
            .spawn(move || {
                let entered = enter_netns(&netns);
                let ok = entered.is_ok();
                // The receiver waits for this message, so the send cannot fail.
                let _ = entered_tx.send(entered);
                ok.then(f)
            })
            .map_err(TestBedError::Thread)?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(NsThread { handle }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            // The thread died before reporting; joining it passes its panic on.
            Err(_) => match handle.join() {
                Ok(_) => unreachable!("the thread reports before it returns"),
                Err(panic) => std::panic::resume_unwind(panic),
            },
        }
    }

    /// Waits until a TCP connection to `addr` from inside this namespace succeeds.
    pub fn wait_for_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<(), TestBedError> {
        let deadline = Instant::now() + timeout;
        self.run_in(|| {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(TestBedError::Timeout {
                        what: format!("TCP {addr} to accept connections in {}", self.name),
                        timeout,
                    });
                }
                if TcpStream::connect_timeout(&addr, left.min(Duration::from_millis(500))).is_ok() {
                    return Ok(());
                }
                // A refused connection returns at once; do not spin.
                thread::sleep(left.min(Duration::from_millis(20)));
            }
        })?
    }

    /// Opens a raw `AF_PACKET` socket bound to interface `ifname` of this namespace; it sees every
    /// frame in and out of that interface and can send raw frames (see [`crate::l2`]).
    pub fn open_packet_socket(&self, ifname: &str) -> Result<File, TestBedError> {
        self.run_in(|| l2::open_packet_socket(ifname))?
    }

    /// Kills and reaps the processes started with [`Netns::spawn`].
    fn kill_processes(&self) {
        let children = std::mem::take(&mut *self.processes.lock().expect("Poisoned lock"));
        for child in children {
            process::kill_and_reap(&child);
        }
    }

    /// Kills the registered processes and deletes the namespace now, reporting a failure that
    /// Drop could only print.
    pub(crate) fn destroy(mut self) -> Result<(), TestBedError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), TestBedError> {
        if !self.live {
            return Ok(());
        }
        self.live = false;
        self.kill_processes();
        ip(&["netns", "del", &self.name]).map(drop)
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            // Drop cannot fail, and sweep_stale() only catches it after this process exits,
            // so at least make it visible.
            eprintln!("test bed: failed to delete network namespace {}: {e}", self.name);
        }
    }
}

/// A thread running inside a namespace, from [`Netns::spawn_in`].
#[derive(Debug)]
pub struct NsThread<T> {
    /// `None` only if entering the namespace failed, which `spawn_in` reports instead of
    /// returning an `NsThread`.
    handle: JoinHandle<Option<T>>,
}

impl<T> NsThread<T> {
    /// Waits for the thread and returns what it returned; a panic in it is passed on.
    pub fn join(self) -> T {
        match self.handle.join() {
            Ok(Some(value)) => value,
            Ok(None) => unreachable!("spawn_in only returns threads that entered the namespace"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bed_names() {
        assert_eq!(parse_bed_name("vmmtb-123-4"), Some((123, 4)));
        assert_eq!(parse_bed_name("vmmtb-123-4-host-a"), Some((123, 4)));
        assert_eq!(parse_bed_name("vmmtb-x-4-a"), None);
        assert_eq!(parse_bed_name("vmmtb-123"), None);
        assert_eq!(parse_bed_name("other-123-4"), None);
    }
}
