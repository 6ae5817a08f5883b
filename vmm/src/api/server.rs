// SPDX-License-Identifier: Apache-2.0
//! The API's HTTP side: a small HTTP/1.1 server on a unix socket that turns each request into
//! an [`ApiRequest`](super::types::ApiRequest) for the VMM thread and its answer into an HTTP
//! response.
//!
//! This module runs the threads and decides when a connection ends; reading a request within
//! its limits and encoding an answer are `http.rs`'s, handing it to the VMM thread
//! `dispatch.rs`'s. Every limit is checked before
//! anything is read or allocated for it, so no client can make the server (and with it the
//! guest) eat memory or stall the API for others:
//!
//! - A thread named "api" accepts connections and gives each one a thread named "api-conn", up to
//!   [`ApiServerOptions::max_connections`] at once; beyond that a connection is answered 503 and
//!   closed at once, without the accept loop ever blocking on it.
//! - Each request, head and body, must arrive within [`ApiServerOptions::request_timeout`] of the
//!   connection being ready for it, and the answer must be taken within as long again; a client
//!   that sends nothing or half a request is dropped then, and only ever held up itself.
//! - Heads are at most [`ApiServerOptions::max_header`] bytes (431 above), bodies at most
//!   [`ApiServerOptions::max_body`] (413 above, decided from `Content-Length` before reading, or
//!   while reading a chunked body).
//! - Connections are persistent as HTTP/1.1 says (`Connection: close` or HTTP/1.0 ends them after
//!   one answer); any request whose body was not read to its end closes its connection, as the
//!   next request's start would be unknown.
//!
//! [`ApiServer::stop`] wakes the accept thread through an eventfd and waits only for it; connection
//! threads end on their own timeouts and no longer reach the VMM thread once the server stopped.

use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::dispatch::{Dispatcher, InFlight};
use super::http::{Connection, Failure, Framing, Head, Reply, too_large};
use super::routes::{self, RouteError};
use super::types::ApiMessage;

/// How long a request waits for the VMM thread before the client gets a 503.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `PUT /vm/restore` waits for the VMM thread: a snapshot's copied disks are copied
/// before the answer.
pub const RESTORE_REPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest request body accepted (HTTP 413 above). A `MigrateRequest` is well under 1 KiB.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;
/// How long a client has to send a request, and then to take its answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers) accepted (HTTP 431 above). Ours are ~100 bytes;
/// 16 KiB is more than curl or any proxy sends.
pub const DEFAULT_MAX_HEADER: usize = 16 * 1024;
/// Most connections served at once. Each costs a thread; the API has one or two real clients.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// How long the accept loop rests after `accept` failed (out of file descriptors, typically): the
/// connection stays queued, so retrying at once would only spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Most connections accepted per wake-up, so that a flood cannot delay [`ApiServer::stop`].
const ACCEPT_BATCH: usize = 64;

/// Tunables of the API server; [`Default`] is what `start_api_server` uses.
#[derive(Clone, Debug)]
pub struct ApiServerOptions {
    /// How long a request waits for the VMM thread (503 after).
    pub reply_timeout: Duration,
    /// Largest request body (413 above).
    pub max_body: usize,
    /// How long a client has for each request, head and body (408 after, or a silent close if
    /// it sent nothing), and then for taking its answer.
    pub request_timeout: Duration,
    /// Largest request head (431 above).
    pub max_header: usize,
    /// Most connections served at once (503 above).
    pub max_connections: usize,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_header: DEFAULT_MAX_HEADER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("cannot use {0} as the API socket: something other than a socket is there")]
    NotASocket(PathBuf),
    #[error("failed to check the API socket path {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to remove the stale API socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to listen on the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to make the API socket {path} private (mode 0600): {source}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up the API server's wake-ups: {0}")]
    Poll(#[source] std::io::Error),
    #[error("failed to start the API thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running API server. Stopping it (or dropping it) closes the socket and removes its file.
pub struct ApiServer {
    path: PathBuf,
    /// Written by [`ApiServer::stop`] to wake the accept thread.
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    dispatcher: Arc<Dispatcher>,
}

/// Starts the API server on `path` with the default options. Requests go to the VMM thread on
/// `to_vmm`, each followed by a write to `wake`, the eventfd that thread's event loop watches.
pub fn start_api_server(
    path: &Path,
    to_vmm: Sender<ApiMessage>,
    wake: Arc<EventFd>,
) -> Result<ApiServer, ApiServerError> {
    start_api_server_with(path, to_vmm, wake, ApiServerOptions::default())
}

/// [`start_api_server`] with explicit options.
pub fn start_api_server_with(
    path: &Path,
    to_vmm: Sender<ApiMessage>,
    wake: Arc<EventFd>,
    options: ApiServerOptions,
) -> Result<ApiServer, ApiServerError> {
    bind_api_socket(path)?.start(to_vmm, wake, options)
}

/// An API socket that listens but whose server has not started (a sandboxed VMM creates its
/// socket before it drops its privileges, and starts the server's threads after).
pub struct BoundApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Drop for BoundApiSocket {
    fn drop(&mut self) {
        // Never started: the socket file goes with it.
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the API socket at `path` (mode 0600), replacing a stale one.
pub fn bind_api_socket(path: &Path) -> Result<BoundApiSocket, ApiServerError> {
    clear_socket_path(path)?;
    let listener =
        UnixListener::bind(path).map_err(|e| ApiServerError::Bind { path: path.to_path_buf(), source: e.into() })?;
    // From here on the socket file is ours: remove it again if we fail.
    let remove_socket = |e: ApiServerError| {
        let _ = std::fs::remove_file(path);
        e
    };
    // Done after bind rather than with a tighter umask, which is process-wide and would race with
    // other threads creating files; the socket is open to the umask only for this instant.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| remove_socket(ApiServerError::Permissions { path: path.to_path_buf(), source }))?;
    // Nonblocking so that the accept loop, woken by epoll, never blocks in `accept` where `stop`
    // could not reach it.
    listener
        .set_nonblocking(true)
        .map_err(|e| remove_socket(ApiServerError::Bind { path: path.to_path_buf(), source: e.into() }))?;
    Ok(BoundApiSocket { path: path.to_path_buf(), listener: Some(listener) })
}

impl BoundApiSocket {
    /// Starts the server: requests go to the VMM thread on `to_vmm`, each followed by a write to
    /// `wake`, the eventfd that thread's event loop watches.
    pub fn start(
        mut self,
        to_vmm: Sender<ApiMessage>,
        wake: Arc<EventFd>,
        options: ApiServerOptions,
    ) -> Result<ApiServer, ApiServerError> {
        let path = self.path.clone();
        let listener = self.listener.take().ok_or(ApiServerError::Poll(ErrorKind::NotFound.into()))?;
        start_on(&path, listener, to_vmm, wake, options)
    }
}

fn start_on(
    path: &Path,
    listener: UnixListener,
    to_vmm: Sender<ApiMessage>,
    wake: Arc<EventFd>,
    options: ApiServerOptions,
) -> Result<ApiServer, ApiServerError> {
    let remove_socket = |e: ApiServerError| {
        let _ = std::fs::remove_file(path);
        e
    };
    let stop = EventFd::new(EFD_NONBLOCK).map(Arc::new).map_err(|e| remove_socket(ApiServerError::Poll(e)))?;
    let epoll = Epoll::new()
        .and_then(|epoll| {
            epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER))?;
            epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP))?;
            Ok(epoll)
        })
        .map_err(|e| remove_socket(ApiServerError::Poll(e)))?;

    let dispatcher = Arc::new(Dispatcher {
        to_vmm: Mutex::new(Some(to_vmm)),
        wake,
        options,
        connections: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let thread = {
        let dispatcher = Arc::clone(&dispatcher);
        // The thread keeps the eventfd open for as long as its epoll watches it.
        let stop = Arc::clone(&stop);
        crate::seccomp::spawn("api", crate::seccomp::ThreadKind::Api, move || {
            accept_loop(&listener, &epoll, &stop, &dispatcher)
        })
        .map_err(|e| remove_socket(ApiServerError::Thread(e)))?
    };
    log::info!("API listening on {}", path.display());
    Ok(ApiServer { path: path.to_path_buf(), stop, thread: Some(thread), dispatcher })
}

impl ApiServer {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops taking requests and removes the socket file. Requests already handed to the VMM
    /// thread still get their answers; connections still open get 503s for anything else, and
    /// end by their own timeouts. Returns without waiting for them. Idempotent.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Our last clone of the VMM's channel goes now rather than with the last connection.
        self.dispatcher.disconnect();
        match self.stop.write(1) {
            Ok(()) => {
                if thread.join().is_err() {
                    log::error!("the API thread panicked");
                }
            }
            // Cannot happen with a counter that only ever gets a few 1s; if it did, joining would
            // wait forever, so the thread is left to the end of the process.
            Err(e) => log::error!("failed to wake the API thread to stop it: {e}"),
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => log::warn!("failed to remove the API socket {}: {e}", self.path.display()),
        }
    }
}

impl ApiServer {
    /// Waits up to `timeout` until the answers to the requests already handed to the VMM thread
    /// are written: for a VMM about to exit right after answering (one waiting for a snapshot
    /// that is asked to stop, or fails to restore one), so that its last answer is not lost
    /// with the process. Returns whether they were.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.dispatcher.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("path", &self.path).field("running", &self.thread.is_some()).finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes `path` free for a new socket: nothing there, or a socket nobody listens on any more (a
/// VMM that died without cleaning up). A live socket or any other file is left alone.
fn clear_socket_path(path: &Path) -> Result<(), ApiServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::Inspect { path: path.to_path_buf(), source });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => return Err(ApiServerError::InUse(path.to_path_buf())),
        // Refused: a socket file without a listener, i.e. stale.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::Inspect { path: path.to_path_buf(), source });
        }
    }
    log::info!("removing stale API socket {}", path.display());
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiServerError::RemoveStale { path: path.to_path_buf(), source }),
    }
}

// ---------------------------------------------------------------------------------------------
// Accepting connections

/// epoll tokens of the accept loop.
const LISTENER: u64 = 0;
const STOP: u64 = 1;

/// The "api" thread: gives each connection a thread of its own until `stop` is written.
fn accept_loop(listener: &UnixListener, epoll: &Epoll, stop: &EventFd, dispatcher: &Arc<Dispatcher>) {
    let mut events = [EpollEvent::default(); 2];
    // Whether the last accept failed, so that a lasting failure is logged once, not ten times a second.
    let mut failing = false;
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => &events[..n],
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("the API server stopped taking connections: {e}");
                return;
            }
        };
        if ready.iter().any(|event| event.data() == STOP) {
            // Not needed for exiting, but leaves the eventfd as we found it.
            let _ = stop.read();
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((stream, _)) => {
                    failing = false;
                    admit(stream, dispatcher);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    if !failing {
                        log::warn!("failed to accept an API connection (retrying): {e}");
                        failing = true;
                    }
                    thread::sleep(ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }
}

/// Starts a thread for `stream`, or turns it away if there are too many already.
fn admit(stream: UnixStream, dispatcher: &Arc<Dispatcher>) {
    let Some(slot) = Slot::take(dispatcher) else {
        turn_away(stream, dispatcher.options.max_connections);
        return;
    };
    let spawned = thread::Builder::new().name("api-conn".to_string()).spawn(move || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::ApiConnection);
        // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; make sure anyway, as
        // the timeouts below only work on blocking sockets.
        if stream.set_nonblocking(false).is_ok() {
            serve_connection(stream, &slot.dispatcher);
        }
        drop(slot);
    });
    // On failure the closure, and with it the stream and the slot, is dropped: the client sees the
    // connection close.
    if let Err(e) = spawned {
        log::error!("failed to start a thread for an API connection: {e}");
    }
}

/// Serves the connection `stream` on this thread until it ends, passing requests on as a
/// running server does (the fuzzing entry point for the HTTP side).
pub fn serve_stream(stream: UnixStream, to_vmm: Sender<ApiMessage>, wake: Arc<EventFd>, options: ApiServerOptions) {
    let dispatcher = Dispatcher {
        to_vmm: Mutex::new(Some(to_vmm)),
        wake,
        options,
        connections: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
    };
    serve_connection(stream, &dispatcher);
}

/// Answers 503 to a connection over the limit, without ever blocking the accept loop.
fn turn_away(stream: UnixStream, max: usize) {
    log::warn!("too many API connections (at most {max}); turning one away");
    let reply = Reply::error(503, format!("too many API connections (at most {max}); try again later"));
    // A fresh socket's send buffer is empty, so one nonblocking write takes the whole answer; if
    // not, the client just sees the connection close.
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(&reply.encode(true, false));
    }
}

/// One of the [`ApiServerOptions::max_connections`] connections; gives its place back when dropped.
struct Slot {
    dispatcher: Arc<Dispatcher>,
}

impl Slot {
    fn take(dispatcher: &Arc<Dispatcher>) -> Option<Slot> {
        let max = dispatcher.options.max_connections;
        dispatcher
            .connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot { dispatcher: Arc::clone(dispatcher) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.dispatcher.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Serving a connection

/// Serves the requests of one connection until it closes, fails, idles out or must close.
fn serve_connection(stream: UnixStream, dispatcher: &Dispatcher) {
    let options = &dispatcher.options;
    let mut conn = Connection { stream, buf: Vec::new() };
    loop {
        let deadline = Instant::now() + options.request_timeout;
        let served = conn.read_head(options.max_header, deadline).and_then(|head| match head {
            Some(head) => answer(&mut conn, &head, deadline, dispatcher).map(|(reply, body_read, in_flight)| {
                log::debug!("API {} {:?} -> {}", head.method, head.target, reply.status);
                Some((head, reply, body_read, in_flight))
            }),
            None => Ok(None),
        });
        let answer_deadline = Instant::now() + options.request_timeout;
        match served {
            // Closed or idle between requests.
            Ok(None) | Err(Failure::Gone) => return,
            Ok(Some((head, reply, body_read, in_flight))) => {
                // After a body left unread, the next request's start is unknown.
                let keep_alive = head.keep_alive && body_read;
                let bytes = reply.encode(!keep_alive, head.method == "HEAD");
                let written = conn.write_all(&bytes, answer_deadline);
                drop(in_flight);
                if let Err(e) = written {
                    log::debug!("failed to send an API answer: {e}");
                    return;
                }
                if !body_read {
                    conn.linger();
                }
                if !keep_alive {
                    return;
                }
            }
            Err(Failure::TimedOut) => {
                log::debug!("an API client was too slow to send its request");
                let reply = Reply::error(408, "the request did not arrive in time".to_string());
                let _ = conn.write_all(&reply.encode(true, false), answer_deadline);
                return;
            }
            Err(Failure::Refused(reply)) => {
                log::debug!("refused an API request: {}", reply.status);
                if conn.write_all(&reply.encode(true, false), answer_deadline).is_ok() {
                    conn.linger();
                }
                return;
            }
        }
    }
}

/// Everything from routing to the VMM's answer for a request whose head has been read; also says
/// whether its body was read to the end, so that the connection can carry another request, and
/// holds the request in flight if it went to the VMM thread, until its answer is written.
fn answer<'d>(
    conn: &mut Connection,
    head: &Head,
    deadline: Instant,
    dispatcher: &'d Dispatcher,
) -> Result<(Reply, bool, Option<InFlight<'d>>), Failure> {
    let path = head.target.split_once('?').map_or(head.target.as_str(), |(path, _query)| path);
    let method = head.method.as_str();
    let no_body = head.framing == Framing::Empty;
    let endpoint = match routes::route(method, path) {
        Ok(endpoint) => endpoint,
        Err(RouteError::NotFound) => return Ok((Reply::error(404, format!("no such route: {path}")), no_body, None)),
        Err(RouteError::MethodNotAllowed(allowed)) => {
            let allow = allowed.join(", ");
            let reply = Reply::error(405, format!("method {method} is not allowed on {path} (allowed: {allow})"))
                .with_allow(allow);
            return Ok((reply, no_body, None));
        }
    };
    let max_body = dispatcher.options.max_body;
    if let Framing::Length(len) = head.framing {
        if len > u64::try_from(max_body).unwrap_or(u64::MAX) {
            return Err(Failure::Refused(too_large(max_body)));
        }
    }
    // Only now that the request can be served: a client told 413 (or 404) need not send its body.
    if head.expect_continue && !no_body && conn.buf.is_empty() {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n", deadline).map_err(|_| Failure::Gone)?;
    }
    // Every endpoint's body is read, even by those that ignore it, to find the next request.
    let body = conn.read_body(head.framing, max_body, dispatcher.options.max_header, deadline)?;
    let (reply, in_flight) = match endpoint.request(&body) {
        Ok(api_request) => {
            let in_flight = InFlight::new(dispatcher);
            let reply = match dispatcher.call(api_request) {
                Ok(Ok(response)) => Reply::from_response(endpoint, response),
                Ok(Err(e)) => Reply::api_error(&e),
                Err(e) => Reply::error(503, e.message().to_string()),
            };
            (reply, Some(in_flight))
        }
        Err(e) => (Reply::api_error(&e), None),
    };
    Ok((reply, true, in_flight))
}
