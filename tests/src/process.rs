// SPDX-License-Identifier: Apache-2.0
//! Processes started inside a test bed namespace.
//!
//! The [`std::process::Child`] is shared between the caller's [`Process`] handle and the
//! namespace that registered it, so that the namespace can kill it on teardown while the test
//! still reads its output or waits for it. Every kill happens under the child's lock after
//! checking that it was not reaped yet, so a recycled pid is never signalled.

use std::io;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::TestBedError;

/// How often [`Process::wait_timeout`] polls: waiting must not hold the lock that teardown needs.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Starts `cmd` and returns the caller's handle and the namespace's share of the child.
pub(crate) fn spawn(cmd: &mut Command) -> Result<(Process, Arc<Mutex<Child>>), TestBedError> {
    let cmdline = format!("{cmd:?}");
    let child = cmd.spawn().map_err(|source| TestBedError::Spawn { cmdline: cmdline.clone(), source })?;
    let pid = child.id();
    let child = Arc::new(Mutex::new(child));
    let process = Process { child: Arc::clone(&child), pid, cmdline };
    Ok((process, child))
}

/// Kills the child unless it already exited, and reaps it.
pub(crate) fn kill_and_reap(child: &Mutex<Child>) {
    // Teardown also runs while a test panics, possibly with this lock poisoned; the child is
    // still there to kill.
    let mut child = child.lock().unwrap_or_else(PoisonError::into_inner);
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A process started with [`crate::Netns::spawn`]. Dropping the handle does not stop the
/// process; the namespace does when it goes away (or call [`Process::kill`]).
#[derive(Debug)]
pub struct Process {
    child: Arc<Mutex<Child>>,
    pid: u32,
    cmdline: String,
}

impl Process {
    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().expect("Poisoned lock")
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The command line it was started with, for messages.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The exit status if it has exited, without blocking.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.lock().try_wait()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`); does nothing if the process was already reaped.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let mut child = self.lock();
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: plain syscall without pointers; the child is not reaped (checked under the
        // lock that every reaper takes), so `pid` still names it.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills the process (SIGKILL) unless it already exited, and returns its exit status.
    pub fn kill(&self) -> io::Result<ExitStatus> {
        let mut child = self.lock();
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        child.kill()?;
        child.wait()
    }

    /// Takes the child's stdin pipe, if it was started with `Stdio::piped()`.
    pub fn take_stdin(&self) -> Option<ChildStdin> {
        self.lock().stdin.take()
    }

    /// Takes the child's stdout pipe, if it was started with `Stdio::piped()`.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.lock().stdout.take()
    }

    /// Takes the child's stderr pipe, if it was started with `Stdio::piped()`.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.lock().stderr.take()
    }
}
