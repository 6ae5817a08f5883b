// SPDX-License-Identifier: Apache-2.0
//! A small HTTP/1.1 client for the API socket, used by `vmm status|pause|resume|stop|migrate`:
//! one request per connection, answers with a `Content-Length` body (which is all our server
//! sends). Kept to std so the command line needs no HTTP crate.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::types::{MigrateRequest, MigrationInfo, RestoreInfo, RestoreRequest, SnapshotInfo, SnapshotRequest, VmInfo};

/// Longer than the server's own wait for the VMM thread, so a slow VMM shows up as the server's
/// 503 with its message rather than as a bare client timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Caps on what we read, so a confused peer cannot make the client eat memory.
const MAX_HEADER_BYTES: u64 = 64 * 1024;
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Why a call to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM API at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to send the request to the VMM API: {0}")]
    Send(#[source] std::io::Error),
    #[error("failed to read the answer of the VMM API: {0}")]
    Receive(#[source] std::io::Error),
    #[error("the VMM API did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("malformed answer from the VMM API: {0}")]
    Malformed(String),
    /// The server refused the request; `message` is its `error` text.
    #[error("{message}")]
    Api { status: u16, message: String },
}

/// A parsed HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Names as sent; look them up with [`HttpResponse::header`].
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name`, ignoring case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A client of one VMM's API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient { socket: socket.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// How long to wait for the connection to accept and for the answer.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /vm`.
    pub fn get_vm(&self) -> Result<VmInfo, ClientError> {
        self.get_json("/vm")
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.expect("PUT", "/vm/pause", None, 204).map(drop)
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.expect("PUT", "/vm/resume", None, 204).map(drop)
    }

    /// `PUT /vm/shutdown`.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.expect("PUT", "/vm/shutdown", None, 204).map(drop)
    }

    /// `PUT /vm/migrate`: starts a migration, which then runs on in the VMM.
    pub fn migrate(&self, request: &MigrateRequest) -> Result<(), ClientError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| ClientError::Malformed(format!("cannot encode the request: {e}")))?;
        self.expect("PUT", "/vm/migrate", Some(&body), 202).map(drop)
    }

    /// `GET /vm/migration`.
    pub fn migration(&self) -> Result<MigrationInfo, ClientError> {
        self.get_json("/vm/migration")
    }

    /// `PUT /vm/snapshot`: starts a snapshot, which then runs on in the VMM.
    pub fn snapshot(&self, request: &SnapshotRequest) -> Result<(), ClientError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| ClientError::Malformed(format!("cannot encode the request: {e}")))?;
        self.expect("PUT", "/vm/snapshot", Some(&body), 202).map(drop)
    }

    /// `GET /vm/snapshot`.
    pub fn snapshot_info(&self) -> Result<SnapshotInfo, ClientError> {
        self.get_json("/vm/snapshot")
    }

    /// `PUT /vm/restore`: runs the snapshot in a VMM waiting for one (`vmm run
    /// --await-restore`); answered once the guest runs.
    pub fn restore(&self, request: &RestoreRequest) -> Result<RestoreInfo, ClientError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| ClientError::Malformed(format!("cannot encode the request: {e}")))?;
        // The VMM answers once the guest runs, after copying any copied disk into place.
        let patient = ApiClient {
            socket: self.socket.clone(),
            timeout: self.timeout.max(super::server::RESTORE_REPLY_TIMEOUT + Duration::from_secs(5)),
        };
        let response = patient.expect("PUT", "/vm/restore", Some(&body), 200)?;
        serde_json::from_slice(&response.body).map_err(|e| ClientError::Malformed(format!("PUT /vm/restore: {e}")))
    }

    /// `GET /metrics`: Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let response = self.expect("GET", "/metrics", None, 200)?;
        String::from_utf8(response.body).map_err(|_| ClientError::Malformed("the metrics are not UTF-8".to_string()))
    }

    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.expect("GET", path, None, 200)?;
        serde_json::from_slice(&response.body).map_err(|e| ClientError::Malformed(format!("GET {path}: {e}")))
    }

    /// Sends a request and insists on `status`; an error status becomes [`ClientError::Api`]
    /// with the server's message.
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        status: u16,
    ) -> Result<HttpResponse, ClientError> {
        let response = self.send(method, path, body)?;
        if response.status == status {
            return Ok(response);
        }
        if response.status >= 400 {
            return Err(ClientError::Api { status: response.status, message: error_message(&response) });
        }
        Err(ClientError::Malformed(format!("{method} {path} answered HTTP {} instead of {status}", response.status)))
    }

    /// Sends one request on a fresh connection and reads the answer, whatever its status.
    pub fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<HttpResponse, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .map_err(|source| ClientError::Connect { path: self.socket.clone(), source })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(ClientError::Send)?;

        let body = body.unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
        .into_bytes();
        if !body.is_empty() {
            request.extend_from_slice(b"Content-Type: application/json\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);
        (&stream).write_all(&request).map_err(|e| self.io_error(e, ClientError::Send))?;

        read_response(&mut BufReader::new(&stream), method == "HEAD").map_err(|e| match e {
            ReadError::Io(e) => self.io_error(e, ClientError::Receive),
            ReadError::Malformed(m) => ClientError::Malformed(m),
        })
    }

    fn io_error(&self, e: std::io::Error, wrap: fn(std::io::Error) -> ClientError) -> ClientError {
        // A socket timeout surfaces as EAGAIN.
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            ClientError::Timeout(self.timeout)
        } else {
            wrap(e)
        }
    }
}

/// The `error` of a `{"error": "..."}` body, or the best we can say without one (a server other
/// than ours, or a proxy, may answer without a JSON body).
fn error_message(response: &HttpResponse) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(&response.body) {
        return body.error;
    }
    match std::str::from_utf8(&response.body).map(str::trim) {
        Ok(text) if !text.is_empty() && text.len() <= 200 => {
            format!("HTTP {}: {text}", response.status)
        }
        _ => format!("the VMM API answered HTTP {}", response.status),
    }
}

/// Why an answer could not be read.
#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Malformed(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn malformed<T>(what: impl Into<String>) -> Result<T, ReadError> {
    Err(ReadError::Malformed(what.into()))
}

/// Parses an HTTP/1.x answer: status line, headers, then a body of `Content-Length` bytes (or up
/// to the end of the stream, as we asked for `Connection: close`).
fn read_response(reader: &mut impl BufRead, head_only: bool) -> Result<HttpResponse, ReadError> {
    let mut header_budget = MAX_HEADER_BYTES;
    let status_line = read_line(reader, &mut header_budget)?;
    let status = parse_status_line(&status_line)?;

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut header_budget)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return malformed(format!("bad header line {line:?}"));
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut response = HttpResponse { status, headers, body: Vec::new() };

    // These never have a body, whatever the headers say (RFC 9112 section 6.3).
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(response);
    }
    if response.header("Transfer-Encoding").is_some() {
        return malformed("chunked answers are not supported");
    }
    match response.header("Content-Length") {
        Some(len) => {
            let Ok(len) = len.parse::<usize>() else {
                return malformed(format!("bad Content-Length {len:?}"));
            };
            if len > MAX_BODY_BYTES {
                return malformed(format!("answer of {len} bytes is too large"));
            }
            response.body = vec![0; len];
            reader.read_exact(&mut response.body).map_err(|e| {
                if e.kind() == ErrorKind::UnexpectedEof {
                    ReadError::Malformed("connection closed before a complete answer".into())
                } else {
                    ReadError::Io(e)
                }
            })?;
        }
        None => {
            let limit = u64::try_from(MAX_BODY_BYTES).unwrap_or(u64::MAX) + 1;
            reader.take(limit).read_to_end(&mut response.body)?;
            if response.body.len() > MAX_BODY_BYTES {
                return malformed("answer too large");
            }
        }
    }
    Ok(response)
}

/// One CRLF- (or LF-) terminated line, without its terminator; counts against `budget`.
fn read_line(reader: &mut impl BufRead, budget: &mut u64) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = reader.take(*budget).read_until(b'\n', &mut line)?;
    *budget -= u64::try_from(n).unwrap_or(u64::MAX).min(*budget);
    if line.last() != Some(&b'\n') {
        return if *budget == 0 {
            malformed("headers too long")
        } else {
            malformed("connection closed before a complete answer")
        };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).or_else(|_| malformed("header line is not UTF-8"))
}

fn parse_status_line(line: &str) -> Result<u16, ReadError> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return malformed(format!("bad status line {line:?}"));
    }
    match code.parse::<u16>() {
        Ok(status) if (100..600).contains(&status) => Ok(status),
        _ => malformed(format!("bad status line {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<HttpResponse, ReadError> {
        read_response(&mut std::io::Cursor::new(raw), false)
    }

    #[test]
    fn parses_a_json_answer() {
        let r =
            parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}trailing").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Content-Length"), Some("2"));
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn no_body_for_204_and_read_to_eof_without_length() {
        let r = parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = parse(b"HTTP/1.0 200 OK\n\nhello").unwrap();
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for raw in [
            &b""[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-",
        ] {
            assert!(matches!(parse(raw), Err(ReadError::Malformed(_))), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn error_messages() {
        let r = |body: &[u8]| HttpResponse { status: 409, headers: vec![], body: body.to_vec() };
        assert_eq!(error_message(&r(br#"{"error":"already running"}"#)), "already running");
        assert_eq!(error_message(&r(b"")), "the VMM API answered HTTP 409");
        assert_eq!(error_message(&r(b"nope")), "HTTP 409: nope");
    }
}
