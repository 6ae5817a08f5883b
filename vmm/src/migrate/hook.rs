// SPDX-License-Identifier: Apache-2.0
//! The destination's commit hook: a connected unix socket to whoever must record a migration
//! in the cluster's store before the guest may run here (the host agent, `vmm host run`).
//!
//! One line per message, in this order:
//!
//! | when | VMM → hook | hook → VMM |
//! |---|---|---|
//! | `Prepare` arrived, memory ready, guest still running on the source | `PREPARE` | `COMMITTED`, or `REFUSED <reason>` |
//! | everything received and restored, just before the vCPUs start | `COMPLETE` | — |
//! | the vCPUs run and the source has its answer | `RUNNING resumed_at_us=N downtime_us=N` | — |
//!
//! `COMMITTED` makes the answer to `Prepare` say `committed: true`: the source then never
//! resumes the guest on its own. `COMPLETE` tells the hook that the guest may run here from now
//! on, so the hook may no longer hand the guest back to the source if this VMM dies. The commit
//! is the hook's only round trip, and it happens before the source pauses the guest, so none of
//! it counts as downtime; the two later lines are local writes, not waited on.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::MigrateError;

/// VMM → hook: the source is about to pause the guest; commit the migration now.
pub const PREPARE: &str = "PREPARE";
/// Hook → VMM: committed; the guest is this host's.
pub const COMMITTED: &str = "COMMITTED";
/// Hook → VMM, followed by a space and the reason: not committed; the source keeps the guest.
pub const REFUSED: &str = "REFUSED";
/// VMM → hook: the guest may run here from now on.
pub const COMPLETE: &str = "COMPLETE";
/// VMM → hook: the guest runs here and the source was told; followed by
/// ` resumed_at_us=N` (when its vCPUs started, µs since the Unix epoch) and, if known,
/// ` downtime_us=N` (the pause measured here, from `Paused` to running).
pub const RUNNING: &str = "RUNNING";
/// Longest wait for the hook's answer to `PREPARE`: well under the source's 30 s wait for the
/// answer to `Prepare`, so the source hears a refusal rather than a timeout.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest line the hook may send.
const MAX_LINE: u64 = 1024;

/// The VMM's end of the hook.
#[derive(Debug)]
pub struct CommitHook {
    stream: UnixStream,
}

impl CommitHook {
    /// Takes over `fd`, which must be a connected unix stream socket.
    pub fn from_fd(fd: RawFd) -> Result<Self, MigrateError> {
        check_socket(fd, libc::AF_UNIX)
            .map_err(|e| MigrateError::Other(format!("--commit-hook-fd {fd}: not a connected unix socket ({e})")))?;
        // SAFETY: `fd` is an open socket (checked above) that nothing else in this process owns:
        // it was inherited for this purpose only.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        Ok(CommitHook { stream })
    }

    /// Wraps an already connected socket (for tests).
    pub fn new(stream: UnixStream) -> Self {
        CommitHook { stream }
    }

    /// Asks the hook to commit; `Ok` once it has, `Err` with its reason if it refused, failed
    /// or did not answer within [`COMMIT_TIMEOUT`].
    pub fn commit(&mut self) -> Result<(), String> {
        self.send(PREPARE).map_err(|e| format!("cannot reach the commit hook: {e}"))?;
        self.stream.set_read_timeout(Some(COMMIT_TIMEOUT)).map_err(|e| e.to_string())?;
        let line = match self.read_line() {
            Ok(Some(line)) => line,
            Ok(None) => return Err("the commit hook hung up".into()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("the commit hook did not answer within {} s", COMMIT_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("reading the commit hook's answer: {e}")),
        };
        let line = line.trim_end_matches('\r');
        if line == COMMITTED {
            Ok(())
        } else if let Some(reason) = line.strip_prefix(REFUSED) {
            Err(reason.trim().to_string())
        } else {
            Err(format!("unexpected answer from the commit hook: {line:?}"))
        }
    }

    /// Tells the hook the guest may run here from now on (best effort: the guest is this host's
    /// since the commit, whatever happens to the hook).
    pub fn complete(&mut self) {
        if let Err(e) = self.send(COMPLETE) {
            log::warn!("could not tell the commit hook the migration completed: {e}");
        }
    }

    /// Tells the hook the guest runs (best effort), with when it started and the pause.
    pub fn running(&mut self, resumed_at_us: u64, downtime_us: Option<u64>) {
        let mut line = format!("{RUNNING} resumed_at_us={resumed_at_us}");
        if let Some(d) = downtime_us {
            line.push_str(&format!(" downtime_us={d}"));
        }
        if let Err(e) = self.send(&line) {
            log::warn!("could not tell the commit hook the guest runs: {e}");
        }
    }

    /// One line, read a byte at a time so that nothing after it is consumed; `None` at EOF.
    fn read_line(&mut self) -> std::io::Result<Option<String>> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if (&self.stream).read(&mut byte)? == 0 {
                return Ok(None);
            }
            if byte[0] == b'\n' {
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if line.len() as u64 >= MAX_LINE {
                return Err(std::io::Error::other("the commit hook sent an overlong line"));
            }
            line.push(byte[0]);
        }
    }

    fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.set_write_timeout(Some(COMMIT_TIMEOUT))?;
        self.stream.write_all(format!("{line}\n").as_bytes())
    }
}

/// Checks that `fd` is an open, connected stream socket of `family`.
pub fn check_socket(fd: RawFd, family: libc::c_int) -> std::io::Result<()> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads an int-sized option into `ty`, whose size is passed in `len`.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut ty).cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if ty != libc::SOCK_STREAM {
        return Err(std::io::Error::other("not a stream socket"));
    }
    // SAFETY: sockaddr_storage is plain data, large enough for any address.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut alen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: writes at most `alen` bytes into `addr`.
    let rc = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut alen) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if libc::c_int::from(addr.ss_family) != family {
        return Err(std::io::Error::other(format!("address family {} is not {family}", addr.ss_family)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    fn pair() -> (CommitHook, BufReader<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (CommitHook::new(a), BufReader::new(b.try_clone().unwrap()), b)
    }

    fn line(r: &mut BufReader<UnixStream>) -> String {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    #[test]
    fn committed_refused_and_garbage() {
        let (mut hook, mut r, mut w) = pair();
        w.write_all(b"COMMITTED\n").unwrap();
        assert_eq!(hook.commit(), Ok(()));
        assert_eq!(line(&mut r), PREPARE);
        w.write_all(b"REFUSED the VM moved meanwhile\n").unwrap();
        assert_eq!(hook.commit(), Err("the VM moved meanwhile".to_string()));
        w.write_all(b"YES\n").unwrap();
        assert!(hook.commit().unwrap_err().contains("unexpected answer"));
        hook.complete();
        hook.running(5, Some(7));
        hook.running(6, None);
        for expected in [PREPARE, PREPARE, COMPLETE, "RUNNING resumed_at_us=5 downtime_us=7", "RUNNING resumed_at_us=6"]
        {
            assert_eq!(line(&mut r), expected);
        }
        drop(w);
        drop(r);
        // Gone: writing or reading fails, either way a refusal.
        assert!(hook.commit().is_err());
    }

    #[test]
    fn only_connected_unix_sockets_are_taken() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert!(CommitHook::from_fd(fd).is_err());
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(a);
        assert!(CommitHook::from_fd(fd).is_ok());
    }
}
