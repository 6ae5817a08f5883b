// SPDX-License-Identifier: Apache-2.0
//! The API's HTTP side: a tiny_http server on a unix socket, on a thread named "api", that turns
//! each request into an [`ApiRequest`] for the VMM thread and its answer into an HTTP response.
//!
//! tiny_http reads every connection on a thread of its own; each request is then answered on a
//! short-lived thread too, so a client that stalls while sending a body, or never reads its
//! answer, holds up only itself.

use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use super::routes::{self, Endpoint, RouteError};
use super::types::{ApiError, ApiMessage, ApiRequest, ApiResponse};

/// How long a request waits for the VMM thread before the client gets a 503.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted (HTTP 413 above). A `MigrateRequest` is well under 1 KiB.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// Tunables of the API server; [`Default`] is what `start_api_server` uses.
#[derive(Clone, Debug)]
pub struct ApiServerOptions {
    pub reply_timeout: Duration,
    pub max_body: usize,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions { reply_timeout: DEFAULT_REPLY_TIMEOUT, max_body: DEFAULT_MAX_BODY }
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
    #[error("failed to start the API thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running API server. Stopping it (or dropping it) closes the socket and removes its file.
pub struct ApiServer {
    path: PathBuf,
    server: Option<Arc<tiny_http::Server>>,
    thread: Option<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
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
    clear_socket_path(path)?;
    let server = tiny_http::Server::http_unix(path)
        .map_err(|source| ApiServerError::Bind { path: path.to_path_buf(), source })?;
    // Dropping the server on error paths below removes the socket file again.
    let server = Arc::new(server);
    // Done after bind rather than with a tighter umask, which is process-wide and would race with
    // other threads creating files; the socket is open to the umask only for this instant.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ApiServerError::Permissions { path: path.to_path_buf(), source })?;

    let stopping = Arc::new(AtomicBool::new(false));
    let dispatcher = Dispatcher { to_vmm, wake, options };
    let thread = {
        let server = Arc::clone(&server);
        let stopping = Arc::clone(&stopping);
        thread::Builder::new()
            .name("api".to_string())
            .spawn(move || serve(&server, &stopping, Arc::new(dispatcher)))
            .map_err(ApiServerError::Thread)?
    };
    log::info!("API listening on {}", path.display());
    Ok(ApiServer { path: path.to_path_buf(), server: Some(server), thread: Some(thread), stopping })
}

impl ApiServer {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops taking requests and removes the socket file. Requests already handed to the VMM
    /// thread still get their answers. Idempotent.
    pub fn stop(&mut self) {
        let Some(server) = self.server.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        server.unblock();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the API thread panicked");
            }
        }
        // The last reference: tiny_http closes the listener (connecting to it to wake its accept
        // thread, so the file must still be there) and removes the socket file itself.
        drop(server);
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => log::warn!("failed to remove the API socket {}: {e}", self.path.display()),
        }
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("path", &self.path).field("running", &self.server.is_some()).finish()
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

/// The "api" thread: hands each request to a thread of its own until stopped.
fn serve(server: &tiny_http::Server, stopping: &AtomicBool, dispatcher: Arc<Dispatcher>) {
    loop {
        let request = match server.recv() {
            Ok(request) => request,
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    log::error!("the API server stopped taking requests: {e}");
                }
                return;
            }
        };
        let dispatcher = Arc::clone(&dispatcher);
        let spawned =
            thread::Builder::new().name("api-request".to_string()).spawn(move || handle(request, &dispatcher));
        // On failure the request is dropped with the closure, and tiny_http answers it 500.
        if let Err(e) = spawned {
            log::error!("failed to start a thread for an API request: {e}");
        }
    }
}

/// What the server needs to pass a request on.
struct Dispatcher {
    to_vmm: Sender<ApiMessage>,
    wake: Arc<EventFd>,
    options: ApiServerOptions,
}

/// Why the VMM thread gave no answer.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("the VMM is not taking API requests")]
    Gone,
    #[error("the VMM did not answer in time")]
    Timeout,
}

impl Dispatcher {
    /// Sends `request` to the VMM thread, wakes it and waits for its answer.
    fn call(&self, request: ApiRequest) -> Result<Result<ApiResponse, ApiError>, Unavailable> {
        let (reply_tx, reply_rx) = channel();
        self.to_vmm.send((request, reply_tx)).map_err(|_| Unavailable::Gone)?;
        if let Err(e) = self.wake.write(1) {
            // The request is queued; the VMM thread sees it at its next wake-up, or we time out.
            log::warn!("failed to wake the VMM thread for an API request: {e}");
        }
        match reply_rx.recv_timeout(self.options.reply_timeout) {
            Ok(result) => Ok(result),
            Err(RecvTimeoutError::Timeout) => Err(Unavailable::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Unavailable::Gone),
        }
    }
}

/// Announced bodies longer than this are never drained, see [`abandon`].
const MAX_DRAINED_BODY: usize = 16 * 1024 * 1024;

fn handle(mut request: tiny_http::Request, dispatcher: &Dispatcher) {
    let reply = answer(&mut request, dispatcher);
    log::debug!("API {} {} -> {}", request.method(), request.url(), reply.status);
    if request.body_length().is_some_and(|len| len > MAX_DRAINED_BODY) {
        abandon(request, reply);
    } else if let Err(e) = request.respond(reply.into_response()) {
        log::debug!("failed to send an API answer: {e}");
    }
}

/// Answers a request whose announced body is absurdly long, then leaks its connection.
///
/// tiny_http 0.12 drains an unread body when the request is dropped (or its body reader reaches
/// the end of the stream), into a buffer the size of what remains of the announced length:
/// `Content-Length: 1000000000000000` would make that allocation abort the whole VMM, guest and
/// all. `upgrade` is the only way to answer and keep the body reader, which we then never drop:
/// the connection's two descriptors and tiny_http's thread for it are lost, a price only a
/// broken or hostile client makes us pay, and only the socket's owner can connect.
fn abandon(request: tiny_http::Request, reply: Reply) {
    let len = request.body_length().unwrap_or_default();
    log::warn!("an API client announced a {len}-byte body; answering and abandoning its connection");
    std::mem::forget(request.upgrade("none", reply.into_response()));
}

/// Everything from routing to the VMM's answer; never panics on what the client sent.
fn answer(request: &mut tiny_http::Request, dispatcher: &Dispatcher) -> Reply {
    let url = request.url();
    let path = url.split_once('?').map_or(url, |(path, _query)| path);
    let method = request.method().as_str();
    let endpoint = match routes::route(method, path) {
        Ok(endpoint) => endpoint,
        Err(RouteError::NotFound) => return Reply::error(404, format!("no such route: {path}")),
        Err(RouteError::MethodNotAllowed(allowed)) => {
            let allow = allowed.join(", ");
            return Reply::error(405, format!("method {method} is not allowed on {path} (allowed: {allow})"))
                .with_allow(allow);
        }
    };
    let max_body = dispatcher.options.max_body;
    if request.body_length().is_some_and(|len| len > max_body) {
        return too_large(max_body);
    }
    let body = if endpoint.takes_body() {
        match read_body(request.as_reader(), max_body) {
            Ok(Some(body)) => body,
            Ok(None) => return too_large(max_body),
            Err(e) => return Reply::error(400, format!("failed to read the request body: {e}")),
        }
    } else {
        Vec::new()
    };
    let api_request = match endpoint.request(&body) {
        Ok(api_request) => api_request,
        Err(e) => return Reply::api_error(&e),
    };
    match dispatcher.call(api_request) {
        Ok(Ok(response)) => Reply::from_response(endpoint, response),
        Ok(Err(e)) => Reply::api_error(&e),
        Err(e) => Reply::error(503, e.to_string()),
    }
}

fn too_large(max_body: usize) -> Reply {
    Reply::error(413, format!("request body too large (at most {max_body} bytes)"))
}

/// Reads at most `max` bytes of body; `None` if there is more (chunked bodies have no length to
/// check up front).
fn read_body(reader: &mut dyn Read, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut body)?;
    Ok((body.len() <= max).then_some(body))
}

/// An HTTP answer before it becomes a tiny_http `Response`.
struct Reply {
    status: u16,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    allow: Option<String>,
}

const JSON: &str = "application/json";
/// Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

impl Reply {
    fn json(status: u16, value: &impl Serialize) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply { status, content_type: Some(JSON), body, allow: None },
            // E.g. a kernel path that is not UTF-8.
            Err(e) => Reply::error(500, format!("failed to encode the answer as JSON: {e}")),
        }
    }

    /// Every error answer is `{"error": "<message>"}`.
    fn error(status: u16, message: String) -> Reply {
        #[derive(Serialize)]
        struct ErrorBody {
            error: String,
        }
        let body = serde_json::to_vec(&ErrorBody { error: message })
            .unwrap_or_else(|_| br#"{"error":"unprintable error"}"#.to_vec());
        Reply { status, content_type: Some(JSON), body, allow: None }
    }

    fn api_error(e: &ApiError) -> Reply {
        Reply::error(e.status(), e.to_string())
    }

    fn with_allow(mut self, allow: String) -> Reply {
        self.allow = Some(allow);
        self
    }

    fn from_response(endpoint: Endpoint, response: ApiResponse) -> Reply {
        if !endpoint.expects(&response) {
            log::error!("the VMM answered {endpoint:?} with {response:?}");
            return Reply::error(500, "internal error: the VMM gave an unexpected answer".to_string());
        }
        let status = endpoint.success_status();
        match response {
            ApiResponse::Vm(info) => Reply::json(status, &info),
            ApiResponse::Migration(info) => Reply::json(status, &info),
            ApiResponse::Accepted => Reply::json(status, &serde_json::json!({"status": "accepted"})),
            ApiResponse::Metrics(text) => {
                Reply { status, content_type: Some(PROMETHEUS_TEXT), body: text.into_bytes(), allow: None }
            }
            // No body, so no Content-Type.
            ApiResponse::Done => Reply { status, content_type: None, body: Vec::new(), allow: None },
        }
    }

    fn into_response(self) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
        let mut response = tiny_http::Response::from_data(self.body)
            .with_status_code(self.status)
            // Always a Content-Length, never chunked: simple clients (ours) need no decoder.
            .with_chunked_threshold(usize::MAX);
        let headers = [("Content-Type", self.content_type.map(str::to_string)), ("Allow", self.allow)];
        for (name, value) in headers {
            let Some(value) = value else { continue };
            // Both are ours and ASCII, so this cannot fail; skip rather than panic if it did.
            if let Ok(header) = tiny_http::Header::from_bytes(name, value) {
                response.add_header(header);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit() {
        let mut small: &[u8] = b"12345";
        assert_eq!(read_body(&mut small, 5).unwrap(), Some(b"12345".to_vec()));
        let mut big: &[u8] = b"123456";
        assert_eq!(read_body(&mut big, 5).unwrap(), None);
    }

    #[test]
    fn error_bodies_are_json() {
        let r = Reply::error(404, "no such route: /x\"".to_string());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"], "no such route: /x\"");
        assert_eq!(r.content_type, Some(JSON));
    }

    #[test]
    fn unexpected_vmm_answer_is_500() {
        let r = Reply::from_response(Endpoint::GetVm, ApiResponse::Done);
        assert_eq!(r.status, 500);
    }
}
