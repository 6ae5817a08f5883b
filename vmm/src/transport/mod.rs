// SPDX-License-Identifier: Apache-2.0
//! The migration transport: a connection between two VMMs (or a VMM and whatever hands it a
//! socket), mutual TLS 1.3 by default, plaintext only when both ends are told so.
//!
//! - [`connect`] (the source) dials, retries while the destination is still starting, sets up
//!   the link ([`link`]: stall bound, timeouts) and completes the TLS handshake, checking that
//!   the destination's certificate names the host or address dialled.
//! - [`MigrationListener::accept`] (the destination) takes connections until one completes the
//!   handshake with a certificate of the cluster's CA. Each connection is handshaken on a
//!   thread of its own, so a peer that connects first and stalls or fails delays no one; a
//!   refused peer is closed and logged, and the listener keeps waiting for the real one.
//! - [`MigrationStream`] hides plain TCP and TLS behind `Read` and `Write`, and turns I/O
//!   errors into sentences (a silent link, a refused certificate).
//!
//! A peer that speaks the other mode (plaintext to TLS or back) is told so in a plain
//! `Response` frame of the migration protocol, which both kinds of peer recognise, so both
//! ends print one clear line. The destination-side handshake also works on a socket accepted
//! by someone else ([`socket_from_fd`], [`accept_connection`]), e.g. a host agent that owns the port.

pub mod link;
mod listen;
pub mod pki;
pub mod tls;

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::protocol::{self, Command, Response};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

pub use link::LinkConfig;
pub use listen::{IncomingSocket, MigrationListener, accept_connection, channel_from_fd, socket_from_fd};
use tls::Side;
pub use tls::TlsIdentity;

/// How long a refused connection is retried (the destination may still be starting).
const CONNECT_RETRY: Duration = Duration::from_secs(5);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connecting peer has to complete the TLS handshake at the destination.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being handshaken at once at a destination; more are closed at once.
const MAX_HANDSHAKES: usize = 16;
/// The first bytes of every migration frame ("VMMG"), to recognise a plaintext peer.
const FRAME_MAGIC: [u8; 4] = protocol::MAGIC.to_le_bytes();
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether a migration connection is encrypted and authenticated.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS 1.3 with this host's identity.
    Tls(Arc<TlsIdentity>),
    /// No encryption, no authentication (`--insecure-plaintext`).
    InsecurePlaintext,
}

impl Security {
    /// Loads the TLS directory `dir`.
    pub fn tls(dir: &Path) -> Result<Security, tls::TlsError> {
        Ok(Security::Tls(Arc::new(TlsIdentity::load(dir)?)))
    }

    /// For log lines: "mutual TLS (DIR)" or "plaintext".
    pub fn describe(&self) -> String {
        match self {
            Security::Tls(id) => format!("mutual TLS, certificates in {}", id.dir().display()),
            Security::InsecurePlaintext => "PLAINTEXT, unauthenticated".into(),
        }
    }
}

/// The warning both ends print when told to run without TLS.
pub const PLAINTEXT_WARNING: &str = "--insecure-plaintext: the migration stream is neither encrypted nor \
    authenticated; anyone who can reach the port can read the guest's memory or send a guest to run";

/// Errors setting up a migration connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, io::Error),
    /// The peer or this end refused the connection; the sentence says why.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A wait for a connection was called off ([`MigrationListener::accept_while`]).
    #[error("stopped waiting for a connection")]
    Stopped,
}

enum Inner {
    Plain(TcpStream),
    Client(Box<ClientConnection>, TlsSocket),
    Server(Box<ServerConnection>, TlsSocket),
}

/// How much of the socket a TLS connection reads at once.
const TLS_READ_BUFFER: usize = 256 << 10;

/// The socket under an established TLS connection, read through a buffer: rustls reads at most
/// 4 KiB at a time (a full 16 KiB record takes four reads), so that one system call here serves
/// many of its reads. Writes go straight to the socket (rustls already gathers its records into
/// one vectored write).
struct TlsSocket(BufReader<TcpStream>);

impl TlsSocket {
    /// Wraps the socket of a connection whose handshake is over (rustls keeps whatever it read
    /// beyond the handshake; nothing is left in the socket that belongs to it).
    fn new(tcp: TcpStream) -> Self {
        TlsSocket(BufReader::with_capacity(TLS_READ_BUFFER, tcp))
    }
}

impl Read for TlsSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// Writes `buf` through a TLS connection and sends the records at once, passing on the
/// socket's own error (rustls's `Stream` keeps a failed send for the next call, which then
/// sees only the closed socket, not why it closed).
macro_rules! tls_write {
    ($conn:expr, $sock:expr, $buf:expr) => {{
        let (conn, sock) = ($conn, $sock);
        let mut result = Ok(0);
        while conn.wants_write() {
            if let Err(e) = conn.write_tls(sock) {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            result = conn.writer().write($buf);
            while result.is_ok() && conn.wants_write() {
                if let Err(e) = conn.write_tls(sock) {
                    result = Err(e);
                }
            }
        }
        result
    }};
}

/// One migration connection, plain or TLS, as a byte stream.
pub struct MigrationStream {
    inner: Inner,
    peer: String,
    link: LinkConfig,
    /// The TLS directory, for error sentences.
    tls_dir: Option<PathBuf>,
}

impl MigrationStream {
    /// The peer's address, as dialled or accepted.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }

    /// What protects the frames on this connection: their CRC-32 in plaintext, the TLS
    /// records' authentication under TLS (see `migration::protocol::Integrity`).
    pub fn integrity(&self) -> protocol::Integrity {
        if self.is_tls() { protocol::Integrity::Transport } else { protocol::Integrity::Checksum }
    }

    /// The TCP socket underneath (for socket options; reading or writing it directly would
    /// bypass TLS).
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Client(_, s) | Inner::Server(_, s) => s.0.get_ref(),
        }
    }

    fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match &self.inner {
            Inner::Plain(_) => None,
            Inner::Client(c, _) => c.peer_certificates(),
            Inner::Server(c, _) => c.peer_certificates(),
        }
    }

    /// The names (DNS names and addresses) in the peer's certificate; empty without TLS.
    pub fn peer_names(&self) -> Vec<String> {
        self.peer_certificates().and_then(|c| c.first()).map(|c| tls::certificate_names(c)).unwrap_or_default()
    }

    /// Whether the peer's certificate is valid for `name` (a DNS name or an address), e.g. to
    /// check a source against a cluster's record of who should send this guest.
    pub fn peer_is(&self, name: &str) -> bool {
        self.peer_certificates().and_then(|c| c.first()).is_some_and(|c| tls::certificate_is_for(c, name))
    }

    /// Who the peer is, for a log line.
    pub fn describe_peer(&self) -> String {
        if self.is_tls() {
            format!("{} (certificate for {})", self.peer, self.peer_names().join(", "))
        } else {
            format!("{} (plaintext, unauthenticated)", self.peer)
        }
    }

    fn explain(&self, e: io::Error) -> io::Error {
        if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            let side = if matches!(self.inner, Inner::Server(..)) { Side::Server } else { Side::Client };
            let dir = self.tls_dir.as_deref().unwrap_or(Path::new("."));
            return io::Error::new(io::ErrorKind::InvalidData, tls::describe(r, side, dir));
        }
        link::explain(e, &self.peer, &self.link)
    }
}

impl Read for MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match &mut self.inner {
            Inner::Plain(s) => s.read(buf),
            Inner::Client(c, s) => rustls::Stream::new(c.as_mut(), s).read(buf),
            Inner::Server(c, s) => rustls::Stream::new(c.as_mut(), s).read(buf),
        };
        r.map_err(|e| self.explain(e))
    }
}

impl Write for MigrationStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match &mut self.inner {
            Inner::Plain(s) => s.write(buf),
            Inner::Client(c, s) => tls_write!(c.as_mut(), s, buf),
            Inner::Server(c, s) => tls_write!(c.as_mut(), s, buf),
        };
        r.map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write sends its records at once.
        Ok(())
    }
}

/// The host part of `host:port` (without the brackets of an IPv6 address).
fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// How much of what the destination sends first is kept: enough for a refusal frame (a host
/// agent's, on a routed connection) to be read back.
const SNIFF_BYTES: usize = 4096;

/// A stream that remembers the first bytes it read, to tell what kind of peer answered.
struct Sniff<'a> {
    inner: &'a mut TcpStream,
    first: Vec<u8>,
}

impl Read for Sniff<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let room = SNIFF_BYTES.saturating_sub(self.first.len()).min(n);
        self.first.extend_from_slice(&buf[..room]);
        Ok(n)
    }
}

impl Write for Sniff<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Dials `to` (`host:port`) as a migration source. A destination that refuses the connection
/// (it may still be starting) is tried again for a few seconds.
pub fn connect(to: &str, security: &Security, link: &LinkConfig) -> Result<MigrationStream, TransportError> {
    connect_routed(to, None, security, link)
}

/// [`connect`], first sending a `Route` frame in plaintext when `route` is given: a host
/// agent's shared migration port reads it to choose the destination VMM it hands the
/// connection to, which then does the TLS handshake (like SNI, the route is not secret).
pub fn connect_routed(
    to: &str,
    route: Option<&str>,
    security: &Security,
    link: &LinkConfig,
) -> Result<MigrationStream, TransportError> {
    let addr: SocketAddr = to
        .to_socket_addrs()
        .map_err(|e| TransportError::Resolve(to.into(), e.to_string()))?
        .next()
        .ok_or_else(|| TransportError::Resolve(to.into(), "no address".into()))?;
    let deadline = Instant::now() + CONNECT_RETRY;
    let mut tcp = loop {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(TransportError::Connect(to.into(), e)),
        }
    };
    link::configure(&tcp, link)?;
    if let Some(route) = route {
        protocol::write_route(&mut tcp, route).map_err(|e| match e {
            protocol::ProtocolError::Io(io) => TransportError::Io(io),
            other => TransportError::Refused(other.to_string()),
        })?;
    }
    let id = match security {
        Security::InsecurePlaintext => {
            return Ok(MigrationStream { inner: Inner::Plain(tcp), peer: to.into(), link: *link, tls_dir: None });
        }
        Security::Tls(id) => id,
    };
    let host = host_of(to);
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| TransportError::Refused(format!("'{host}' cannot be checked against a certificate: {e}")))?;
    let mut conn =
        ClientConnection::new(id.client_config(), name).map_err(|e| TransportError::Refused(format!("TLS: {e}")))?;
    let mut sniff = Sniff { inner: &mut tcp, first: Vec::new() };
    while conn.is_handshaking() {
        match conn.complete_io(&mut sniff) {
            Ok((0, 0)) => return Err(TransportError::Refused("the TLS handshake with the destination stalled".into())),
            Ok(_) => {}
            Err(e) => {
                // rustls has queued an alert for the destination (e.g. that it does not trust
                // its certificate): send it, so the destination learns why.
                let _ = conn.write_tls(&mut sniff);
                // A host agent that refuses a routed connection says why in a plain frame.
                let agent_refusal = route
                    .filter(|_| sniff.first.starts_with(&FRAME_MAGIC))
                    .and_then(|_| protocol::read_response(&mut &sniff.first[..]).ok())
                    .and_then(|r| r.error);
                let why = if let Some(why) = agent_refusal {
                    why
                } else if sniff.first.starts_with(&FRAME_MAGIC) {
                    "the destination speaks plaintext migration (it runs with --insecure-plaintext): \
                     not sending the guest unencrypted"
                        .to_string()
                } else if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    tls::describe(r, Side::Client, id.dir())
                } else if e.kind() == io::ErrorKind::UnexpectedEof {
                    "the destination closed the connection during the TLS handshake".to_string()
                } else {
                    link::explain(e, to, link).to_string()
                };
                return Err(TransportError::Refused(why));
            }
        }
    }
    // The handshake ends on reading the server's Finished; ours is still queued. Send it now,
    // so the destination's handshake ends too, before we have anything to write.
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(|e| TransportError::Refused(link::explain(e, to, link).to_string()))?;
    }
    Ok(MigrationStream {
        inner: Inner::Client(Box::new(conn), TlsSocket::new(tcp)),
        peer: to.into(),
        link: *link,
        tls_dir: Some(id.dir().to_path_buf()),
    })
}

/// Tells a peer of the other mode why it is refused, in a frame it understands either way.
fn refuse_in_plain(tcp: &mut TcpStream, why: &str) {
    let _ = protocol::write_json(tcp, Command::Response, &Response::error(why));
    close_gently(tcp);
}

/// Closes our side and reads what the peer still sends for a moment, so that what we said
/// last (a refusal, a TLS alert) reaches it instead of being cut off by a reset.
fn close_gently(tcp: &mut TcpStream) {
    let _ = tcp.flush();
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    // Let the peer read it before the close (an unread close would reset the connection).
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(1);
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
    while Instant::now() < deadline && matches!(tcp.read(&mut sink), Ok(n) if n > 0) {}
}

/// The destination's side of a new connection: checks what kind of peer it is and completes
/// the TLS handshake. Refusals are sentences, for the log.
fn handshake(
    mut tcp: TcpStream,
    peer: String,
    security: &Security,
    link: &LinkConfig,
) -> Result<MigrationStream, String> {
    link::configure(&tcp, link).map_err(|e| format!("socket options: {e}"))?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut first = [0u8; 1];
    let waiting = LinkConfig { io_timeout: HANDSHAKE_TIMEOUT, ..*link };
    let seen = tcp.peek(&mut first).map_err(|e| format!("nothing received: {}", link::explain(e, &peer, &waiting)))?;
    let done = |tcp: &TcpStream| -> Result<(), String> {
        tcp.set_read_timeout(Some(link.io_timeout)).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(link.io_timeout)).map_err(|e| e.to_string())
    };
    let id = match security {
        Security::InsecurePlaintext => {
            if seen == 1 && first[0] == TLS_HANDSHAKE {
                refuse_in_plain(&mut tcp, "this destination runs with --insecure-plaintext and does not speak TLS");
                return Err("it speaks TLS, and this destination runs with --insecure-plaintext".into());
            }
            done(&tcp)?;
            return Ok(MigrationStream { inner: Inner::Plain(tcp), peer, link: *link, tls_dir: None });
        }
        Security::Tls(id) => id,
    };
    if seen == 0 {
        return Err("it closed the connection without a word".into());
    }
    if first[0] == FRAME_MAGIC[0] {
        refuse_in_plain(
            &mut tcp,
            "this destination requires mutual TLS (give both ends --tls-dir, or both --insecure-plaintext)",
        );
        return Err("it speaks plaintext migration (a source with --insecure-plaintext?), and this destination \
                    requires mutual TLS"
            .into());
    }
    let mut conn = ServerConnection::new(id.server_config()).map_err(|e| format!("TLS: {e}"))?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) => return Err("the TLS handshake stalled".into()),
            Ok(_) => {}
            Err(e) => {
                // rustls has queued an alert for the peer: send it, so the peer learns why.
                let _ = conn.write_tls(&mut tcp);
                close_gently(&mut tcp);
                return Err(match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(r) => tls::describe(r, Side::Server, id.dir()),
                    None if e.kind() == io::ErrorKind::UnexpectedEof => {
                        "it hung up during the TLS handshake: it refused our certificate (another CA, or not the name \
                         it dialled), or it was not a migration source"
                            .into()
                    }
                    None => link::explain(e, &peer, &waiting).to_string(),
                });
            }
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(|e| link::explain(e, &peer, link).to_string())?;
    }
    done(&tcp)?;
    Ok(MigrationStream {
        inner: Inner::Server(Box::new(conn), TlsSocket::new(tcp)),
        peer,
        link: *link,
        tls_dir: Some(id.dir().to_path_buf()),
    })
}
