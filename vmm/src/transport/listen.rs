// SPDX-License-Identifier: Apache-2.0
//! The destination's side of connecting: a listener whose every connection is handshaken on a
//! thread of its own until one passes, and the handshake on a socket someone else accepted or
//! bound (`--incoming-fd`). A listener's connections come from a listening socket of its own,
//! or are handed over one by one on a unix socket by a host agent that owns the port
//! (`--incoming-conns-fd`: post-copy's later connections through a shared migration port).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{LinkConfig, MAX_HANDSHAKES, MigrationStream, Security, TransportError, handshake};

/// Where a listener's connections come from.
enum Source {
    /// A listening TCP socket.
    Tcp(TcpListener),
    /// A unix socket on which a host agent hands over the connections it accepted for this
    /// migration, one descriptor per message.
    Handed(UnixStream),
}

impl Source {
    fn fd(&self) -> RawFd {
        match self {
            Source::Tcp(l) => l.as_raw_fd(),
            Source::Handed(u) => u.as_raw_fd(),
        }
    }

    /// The next connection (`Ok(None)`: the host agent closed its end, nothing more comes).
    fn next(&self) -> io::Result<Option<(TcpStream, String)>> {
        match self {
            Source::Tcp(l) => l.accept().map(|(c, peer)| Some((c, peer.to_string()))),
            Source::Handed(u) => {
                let mut byte = [0u8; 1];
                let (n, file) = u.recv_with_fd(&mut byte).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
                let Some(file) = file else {
                    return if n == 0 {
                        Ok(None)
                    } else {
                        Err(io::Error::new(io::ErrorKind::InvalidData, "a message without a connection"))
                    };
                };
                let fd = OwnedFd::from(file);
                // Whatever it is, it must not leak into processes this VMM starts.
                // SAFETY: fcntl on a descriptor we own.
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
                match tcp_kind(fd.as_raw_fd()) {
                    Ok(false) => {}
                    Ok(true) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "a listening socket")),
                    Err(why) => return Err(io::Error::new(io::ErrorKind::InvalidInput, why)),
                }
                let tcp = TcpStream::from(fd);
                let peer = tcp.peer_addr().map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
                Ok(Some((tcp, peer)))
            }
        }
    }
}

/// A destination's listening socket, or the channel its connections are handed over on.
pub struct MigrationListener {
    source: Source,
    security: Security,
    link: LinkConfig,
}

impl MigrationListener {
    /// Listens on `addr` (`ADDR:PORT`).
    pub fn bind(addr: &str, security: Security, link: LinkConfig) -> Result<MigrationListener, TransportError> {
        let sa: SocketAddr = addr.parse().map_err(|e| {
            TransportError::Listen(
                addr.into(),
                io::Error::new(io::ErrorKind::InvalidInput, format!("not an ADDR:PORT ({e})")),
            )
        })?;
        let listener = TcpListener::bind(sa).map_err(|e| TransportError::Listen(addr.into(), e))?;
        Ok(MigrationListener::from_listener(listener, security, link))
    }

    /// Listens on a socket someone else bound (and is listening on).
    pub fn from_listener(listener: TcpListener, security: Security, link: LinkConfig) -> MigrationListener {
        MigrationListener { source: Source::Tcp(listener), security, link }
    }

    /// Takes the connections a host agent hands over on `channel` (see [`channel_from_fd`]).
    pub fn from_handed(channel: UnixStream, security: Security, link: LinkConfig) -> MigrationListener {
        MigrationListener { source: Source::Handed(channel), security, link }
    }

    /// The listening socket's address (none for handed connections).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.source {
            Source::Tcp(l) => l.local_addr(),
            Source::Handed(_) => Err(io::Error::new(io::ErrorKind::Unsupported, "connections are handed over")),
        }
    }

    /// Waits for a peer that completes the handshake, and stops listening. Every other
    /// connection (refused, or arriving while one is being handshaken) is closed and logged.
    pub fn accept(self) -> Result<MigrationStream, TransportError> {
        self.accept_while(&|| true)
    }

    /// Like [`MigrationListener::accept`], but the listener stays open for later connections
    /// (post-copy's fault connection and reconnections), and the wait ends with
    /// [`TransportError::Stopped`] as soon as `go_on` (asked a few times a second) says so.
    pub fn accept_while(&self, go_on: &dyn Fn() -> bool) -> Result<MigrationStream, TransportError> {
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<Result<MigrationStream, TransportError>>();
        std::thread::scope(|scope| {
            let acceptor = std::thread::Builder::new().name("migration-accept".into()).spawn_scoped(scope, {
                let stop = &stop;
                move || accept_loop(&self.source, stop, &tx, &self.security, &self.link)
            })?;
            let got = loop {
                match rx.recv_timeout(ACCEPT_TICK) {
                    Ok(r) => break r,
                    Err(mpsc::RecvTimeoutError::Timeout) if go_on() => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => break Err(TransportError::Stopped),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(TransportError::Refused("the accept loop ended".into()));
                    }
                }
            };
            stop.store(true, Ordering::SeqCst);
            let _ = acceptor.join();
            got
        })
    }
}

/// How often a waiting accept looks whether it should stop.
const ACCEPT_TICK: Duration = Duration::from_millis(100);
/// The same while a handshake is under way: when it succeeds, the caller stops the accept loop
/// and waits for it to end, and that wait is part of the migration's total time (a 100 ms tick
/// made an idle guest's migration take 110 ms instead of 10). A tick, not a wake-up file
/// descriptor, because post-copy's page handler accepts under a seccomp filter that has no
/// way to make or write one.
const HANDSHAKE_TICK: Duration = Duration::from_millis(1);

/// Waits until `source` has a connection to take (true) or `tick` passed (false).
fn readable(source: &Source, tick: Duration) -> bool {
    let mut fd = libc::pollfd { fd: source.fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, tick.as_millis() as i32) };
    n > 0
}

fn accept_loop(
    source: &Source,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Result<MigrationStream, TransportError>>,
    security: &Security,
    link: &LinkConfig,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        // Polled, so that a stop ends the wait without closing the listener.
        let tick = if in_flight.load(Ordering::SeqCst) > 0 { HANDSHAKE_TICK } else { ACCEPT_TICK };
        if !readable(source, tick) {
            continue;
        }
        let (tcp, peer) = match source.next() {
            Ok(Some(c)) => c,
            Ok(None) => {
                let why = "the host agent closed the channel its connections come on".to_string();
                let _ = tx.send(Err(TransportError::Refused(why)));
                return;
            }
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                log::warn!("migration listener: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EAGAIN | libc::EINTR)) => continue,
            // Something other than a connection handed over: not this peer's to decide.
            Err(e)
                if matches!(source, Source::Handed(_))
                    && matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData) =>
            {
                log::warn!("refused what the host agent handed over: {e}");
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(TransportError::Io(e)));
                return;
            }
        };
        if in_flight.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            log::warn!("refused a migration connection from {peer}: {MAX_HANDSHAKES} handshakes already under way");
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let (tx, security, link, flight, who) = (tx.clone(), security.clone(), *link, in_flight.clone(), peer.clone());
        let spawned = std::thread::Builder::new().name("migration-handshake".into()).spawn(move || {
            match handshake(tcp, who.clone(), &security, &link) {
                // Only the first to get here is used; the others are dropped (closed). It stays
                // counted as in flight, so that the loop, about to be stopped, keeps its short tick.
                Ok(stream) => {
                    let _ = tx.send(Ok(stream));
                }
                Err(why) => {
                    log::warn!("refused a migration connection from {who}: {why}");
                    flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
        });
        if let Err(e) = spawned {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            log::warn!("refused a migration connection from {peer}: cannot start a thread for it: {e}");
        }
    }
}

/// What `--incoming-fd` gives a destination: a listening socket, or one connection accepted by
/// someone else (a host agent that owns the port).
pub enum IncomingSocket {
    Listener(TcpListener),
    Connection(TcpStream),
}

/// Whether `fd` is a TCP socket that listens (true) or not (false); an error if it is no TCP
/// socket.
fn tcp_kind(fd: RawFd) -> Result<bool, String> {
    let kind = socket_option(fd, libc::SO_TYPE).map_err(|e| format!("not a socket ({e})"))?;
    let domain = socket_option(fd, libc::SO_DOMAIN).map_err(|e| e.to_string())?;
    if kind != libc::SOCK_STREAM || !(domain == libc::AF_INET || domain == libc::AF_INET6) {
        return Err("not a TCP socket".into());
    }
    Ok(socket_option(fd, libc::SO_ACCEPTCONN).map_err(|e| e.to_string())? != 0)
}

/// The integer socket option `name` (at `SOL_SOCKET`) of `fd`.
fn socket_option(fd: RawFd, name: i32) -> io::Result<i32> {
    let mut v = 0i32;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of their sizes; a bad fd only gives an error.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut v as *mut i32).cast(), &mut len) };
    if r == 0 { Ok(v) } else { Err(io::Error::last_os_error()) }
}

/// Takes ownership of the inherited file descriptor `fd`, which must be a TCP socket.
pub fn socket_from_fd(fd: RawFd) -> Result<IncomingSocket, TransportError> {
    let bad =
        |why: String| TransportError::Listen(format!("fd {fd}"), io::Error::new(io::ErrorKind::InvalidInput, why));
    let listening = tcp_kind(fd).map_err(bad)?;
    // Whatever the descriptor was, it must not leak into processes this VMM starts.
    // SAFETY: fcntl on an fd we checked is an open socket.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(if listening {
        // SAFETY: `fd` is an open TCP socket (checked above) that the caller hands over to us;
        // no one else in this process owns it.
        IncomingSocket::Listener(unsafe { TcpListener::from_raw_fd(fd) })
    } else {
        // SAFETY: as above.
        IncomingSocket::Connection(unsafe { TcpStream::from_raw_fd(fd) })
    })
}

/// Takes ownership of the inherited file descriptor `fd` (`--incoming-conns-fd`), which must be
/// a unix stream socket: the host agent hands the migration's later connections over on it.
pub fn channel_from_fd(fd: RawFd) -> Result<UnixStream, TransportError> {
    let bad =
        |why: String| TransportError::Listen(format!("fd {fd}"), io::Error::new(io::ErrorKind::InvalidInput, why));
    let domain = socket_option(fd, libc::SO_DOMAIN).map_err(|e| bad(format!("not a socket ({e})")))?;
    if domain != libc::AF_UNIX {
        return Err(bad("not a unix socket".into()));
    }
    // SAFETY: fcntl on an fd we checked is an open socket.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: `fd` is an open unix socket (checked above) that the caller hands over to us.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// The destination's handshake on a connection someone else accepted. A refused peer ends
/// this (nobody else can come on this connection).
pub fn accept_connection(
    tcp: TcpStream,
    security: &Security,
    link: &LinkConfig,
) -> Result<MigrationStream, TransportError> {
    let peer = tcp.peer_addr().map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    handshake(tcp, peer.clone(), security, link)
        .map_err(|why| TransportError::Refused(format!("refused {peer}: {why}")))
}
