// SPDX-License-Identifier: Apache-2.0
//! The TCP side of a migration connection: how a dead link is noticed.
//!
//! A link that goes silent (a cut cable, a dead switch, a veth set down: no RST, no FIN) must
//! fail a migration within a bound derived from progress, not after a fixed wait. The kernel
//! knows when bytes were last acknowledged, so it decides: `TCP_USER_TIMEOUT` closes the
//! connection when sent data stays unacknowledged for the stall bound, and keepalive probes
//! every second (whose failure the same bound governs) cover an end that is only waiting to
//! read. A peer that is slow but alive keeps acknowledging, so it is never cut off by this.
//! Blocked reads and writes then fail with `ETIMEDOUT`, which [`explain`] turns into a
//! sentence. A longer read and write timeout stays as a backstop for a peer whose kernel
//! acknowledges but whose VMM no longer reads or answers.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Default stall bound: nothing acknowledged by the peer for this long ends the connection.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest stall bound (keepalive counts in whole seconds).
pub const MIN_STALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Default wait for a peer whose link is alive but which sends nothing.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How a migration connection detects a dead link or a stuck peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Nothing acknowledged for this long: the link is dead (`TCP_USER_TIMEOUT` + keepalive).
    pub stall_timeout: Duration,
    /// A read or write that makes no progress for this long fails (`SO_RCVTIMEO`/`SO_SNDTIMEO`).
    pub io_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig { stall_timeout: DEFAULT_STALL_TIMEOUT, io_timeout: DEFAULT_IO_TIMEOUT }
    }
}

impl LinkConfig {
    /// With the stall bound `ms` (checked: at least [`MIN_STALL_TIMEOUT`]).
    pub fn with_stall_ms(ms: u64) -> Result<LinkConfig, String> {
        let stall = Duration::from_millis(ms);
        if stall < MIN_STALL_TIMEOUT {
            return Err(format!("stall timeout: at least {} ms", MIN_STALL_TIMEOUT.as_millis()));
        }
        Ok(LinkConfig { stall_timeout: stall, ..LinkConfig::default() })
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t)
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets up a connected migration socket: no Nagle delay, the stall bound, the I/O timeouts.
pub fn configure(stream: &TcpStream, link: &LinkConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(link.io_timeout))?;
    stream.set_write_timeout(Some(link.io_timeout))?;
    let fd = stream.as_raw_fd();
    let stall_ms = i32::try_from(link.stall_timeout.as_millis()).unwrap_or(i32::MAX);
    let probe_s = 1;
    let probes = i32::try_from(link.stall_timeout.as_secs()).unwrap_or(i32::MAX).max(1);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, probe_s)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, probe_s)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, probes)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, stall_ms)
}

/// An I/O error of a migration connection to `peer`, with what it means for a migration: the
/// stall bound, the I/O timeout, or the error as it came.
pub fn explain(e: io::Error, peer: &str, link: &LinkConfig) -> io::Error {
    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        return io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the link to {peer} went silent: nothing acknowledged for {} ms (the stall bound)",
                link.stall_timeout.as_millis()
            ),
        );
    }
    if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
        return io::Error::new(e.kind(), format!("{peer} closed the connection ({e})"));
    }
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) && e.raw_os_error().is_some() {
        return io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{peer} sent or took nothing for {} s while its link was up", link.io_timeout.as_secs_f64()),
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn stall_bound_is_at_least_a_second() {
        assert!(LinkConfig::with_stall_ms(999).is_err());
        assert_eq!(LinkConfig::with_stall_ms(2500).unwrap().stall_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn configure_sets_the_kernel_options() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let link = LinkConfig::with_stall_ms(3000).unwrap();
        configure(&c, &link).unwrap();
        let get = |level, name| {
            let mut v = 0i32;
            let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
            // SAFETY: v and len are valid for writes of their sizes.
            let r = unsafe { libc::getsockopt(c.as_raw_fd(), level, name, (&mut v as *mut i32).cast(), &mut len) };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 3000);
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(c.read_timeout().unwrap(), Some(DEFAULT_IO_TIMEOUT));
    }

    #[test]
    fn errors_are_explained() {
        let link = LinkConfig::default();
        let e = explain(io::Error::from_raw_os_error(libc::ETIMEDOUT), "10.0.0.2:7100", &link);
        assert!(e.to_string().contains("went silent"), "{e}");
        let e = explain(io::Error::from_raw_os_error(libc::EAGAIN), "10.0.0.2:7100", &link);
        assert!(e.to_string().contains("nothing for 30 s"), "{e}");
        let e = explain(io::Error::from_raw_os_error(libc::ECONNRESET), "p", &link);
        assert!(e.to_string().starts_with("p closed the connection"), "{e}");
        let e = explain(io::Error::from_raw_os_error(libc::ENETUNREACH), "p", &link);
        assert_eq!(e.raw_os_error(), Some(libc::ENETUNREACH));
        // A read timeout on a real socket.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        c.write_all(b"x").unwrap();
        let e = c.read(&mut [0; 1]).unwrap_err();
        assert!(explain(e, "p", &link).to_string().contains("nothing for"));
    }
}
