// SPDX-License-Identifier: Apache-2.0
//! The API's HTTP/1.1 framing: reading a request's head and body from a connection within its
//! limits and deadline ([`Connection`]), and encoding an answer ([`Reply`]). `httparse` parses
//! heads and chunk sizes; this module decides how much to read, for how long, and what a
//! request that breaks a limit gets (see [`super::server`] for the limits and why).

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::routes::Endpoint;
use super::types::{ApiError, ApiResponse};

/// Most header fields in a request head or a chunked body's trailer (HTTP 431 above).
const MAX_HEADER_FIELDS: usize = 64;
/// Longest chunk-size line (size and extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// How much is read from a socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// After refusing a request whose body we did not read, how long and how much we still read (and
/// discard) before closing: a client busy writing its body then gets to read our answer instead of
/// a broken pipe.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;

/// How a request's body is delimited (RFC 9112 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes (more than 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What the server needs from a request head, copied out of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) method: String,
    /// The request target as sent, query string included.
    pub(super) target: String,
    pub(super) framing: Framing,
    /// HTTP/1.1 without `Connection: close`.
    pub(super) keep_alive: bool,
    /// An HTTP/1.1 client waiting for `100 Continue` before it sends its body.
    pub(super) expect_continue: bool,
}

/// How reading a request can end without a request.
#[derive(Debug)]
pub(super) enum Failure {
    /// The client hung up or the socket failed: nobody to answer.
    Gone,
    /// The time for the request ran out.
    TimedOut,
    /// The request cannot be served; this answer goes back before the connection closes.
    Refused(Reply),
}

/// One client connection and the bytes read from it but not used yet.
pub(super) struct Connection {
    pub(super) stream: UnixStream,
    /// The rest of the current request, or the start of the next one (clients may send several
    /// without waiting for answers). Never more than a head or body limit plus one read.
    pub(super) buf: Vec<u8>,
}

pub(super) fn too_large(max_body: usize) -> Reply {
    Reply::error(413, format!("request body too large (at most {max_body} bytes)"))
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::Refused(Reply::error(400, message.into()))
}

fn header_too_large(message: impl Into<String>) -> Failure {
    Failure::Refused(Reply::error(431, message.into()))
}

impl Connection {
    /// Reads and parses the next request head. `None` if the client closed the connection or
    /// sent nothing in time between requests, neither of which needs an answer.
    pub(super) fn read_head(&mut self, max_header: usize, deadline: Instant) -> Result<Option<Head>, Failure> {
        loop {
            if !self.buf.is_empty() {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
                let mut request = httparse::Request::new(&mut fields);
                match request.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) if len > max_header => {
                        return Err(header_too_large(format!("request header too large (at most {max_header} bytes)")));
                    }
                    Ok(httparse::Status::Complete(len)) => {
                        let head = parse_head(&request)?;
                        self.buf.drain(..len);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() >= max_header => {
                        return Err(header_too_large(format!("request header too large (at most {max_header} bytes)")));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(header_too_large("too many request header fields"));
                    }
                    Err(e) => return Err(bad_request(format!("malformed request: {e}"))),
                }
            }
            // httparse skips empty lines before a request, as RFC 9112 section 2.2 allows; only
            // anything else counts as a request begun.
            let begun = self.buf.iter().any(|b| !b.is_ascii_whitespace());
            match self.fill(deadline) {
                Ok(0) if begun => return Err(bad_request("the request ended before its header did")),
                Ok(0) | Err(Failure::TimedOut) if !begun => return Ok(None),
                Ok(_) => {}
                Err(failure) => return Err(failure),
            }
        }
    }

    /// Reads a body of at most `max` bytes (413 above) delimited by `framing`.
    pub(super) fn read_body(
        &mut self,
        framing: Framing,
        max: usize,
        max_trailer: usize,
        deadline: Instant,
    ) -> Result<Vec<u8>, Failure> {
        match framing {
            Framing::Empty => Ok(Vec::new()),
            Framing::Length(len) => {
                // The caller checked `len` against `max`; this only guards the conversion.
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&len| len <= max)
                    .ok_or_else(|| Failure::Refused(too_large(max)))?;
                self.fill_to(len, deadline)?;
                Ok(self.buf.drain(..len).collect())
            }
            Framing::Chunked => self.read_chunked(max, max_trailer, deadline),
        }
    }

    /// Reads a chunked body (RFC 9112 section 7.1): chunks of at most `max` bytes in all, then a
    /// trailer section, read and ignored.
    fn read_chunked(&mut self, max: usize, max_trailer: usize, deadline: Instant) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        loop {
            let (line_len, size) = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete(found)) => break found,
                    Ok(httparse::Status::Partial) if self.buf.len() < MAX_CHUNK_LINE => self.fill_more(deadline)?,
                    Ok(httparse::Status::Partial) | Err(_) => return Err(bad_request("malformed chunked body")),
                }
            };
            self.buf.drain(..line_len);
            if size == 0 {
                break;
            }
            let room = max - body.len();
            let size = usize::try_from(size)
                .ok()
                .filter(|&size| size <= room)
                .ok_or_else(|| Failure::Refused(too_large(max)))?;
            // The chunk and the CRLF that ends it.
            let end = size.checked_add(2).ok_or_else(|| Failure::Refused(too_large(max)))?;
            self.fill_to(end, deadline)?;
            if self.buf[size..end] != *b"\r\n" {
                return Err(bad_request("malformed chunked body"));
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..end);
        }
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
            match httparse::parse_headers(&self.buf, &mut fields) {
                Ok(httparse::Status::Complete((len, _))) => {
                    self.buf.drain(..len);
                    return Ok(body);
                }
                Ok(httparse::Status::Partial) if self.buf.len() < max_trailer => self.fill_more(deadline)?,
                Ok(httparse::Status::Partial) => return Err(header_too_large("request trailer too large")),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(header_too_large("too many request trailer fields"));
                }
                Err(e) => return Err(bad_request(format!("malformed chunked body trailer: {e}"))),
            }
        }
    }

    /// Reads until at least `len` bytes are buffered; the body ending sooner is an error.
    fn fill_to(&mut self, len: usize, deadline: Instant) -> Result<(), Failure> {
        while self.buf.len() < len {
            self.fill_more(deadline)?;
        }
        Ok(())
    }

    /// Reads some more of a body; its ending here is an error.
    fn fill_more(&mut self, deadline: Instant) -> Result<(), Failure> {
        match self.fill(deadline)? {
            0 => Err(bad_request("the request body ended early")),
            _ => Ok(()),
        }
    }

    /// Reads what has arrived, waiting until `deadline` at most: the number of bytes added to
    /// `buf`, 0 at the end of the stream.
    fn fill(&mut self, deadline: Instant) -> Result<usize, Failure> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            // One deadline for all reads: a socket timeout alone would restart at every byte, and
            // a client sending one byte at a time could hold its thread forever.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::TimedOut);
            }
            self.stream.set_read_timeout(Some(left)).map_err(|_| Failure::Gone)?;
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                // A socket timeout shows as EAGAIN; the deadline check above decides.
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return Err(Failure::Gone),
            }
        }
    }

    /// Writes all of `bytes` by `deadline`. A client that hung up makes this fail with EPIPE
    /// rather than kill the process: Rust programs start with SIGPIPE ignored.
    pub(super) fn write_all(&mut self, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            self.stream.set_write_timeout(Some(left))?;
            match self.stream.write(bytes) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Before closing a connection whose request was not read to its end: says we are done, then
    /// reads and drops what the client still sends, for a while. Closing with unread data would
    /// make the client's writes fail before it got to read our answer. Never allocates.
    pub(super) fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER_TIME;
        let mut drained = 0;
        self.buf.clear();
        while drained < LINGER_BYTES {
            match self.fill(deadline) {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
            self.buf.clear();
        }
    }
}

/// Copies out of a complete httparse request what the server needs, checking how its body is
/// delimited (RFC 9112 section 6.3).
fn parse_head(request: &httparse::Request<'_, '_>) -> Result<Head, Failure> {
    // httparse fills all three in a complete request; refuse rather than panic if it did not.
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err(bad_request("malformed request line"));
    };
    let http11 = version >= 1;
    let mut content_length = None;
    let mut transfer_encoding: Option<Vec<u8>> = None;
    let mut close = !http11;
    let mut expect_continue = false;
    for field in request.headers.iter() {
        let value = field.value.trim_ascii();
        if field.name.eq_ignore_ascii_case("Content-Length") {
            let len = parse_content_length(value).ok_or_else(|| {
                bad_request(format!(
                    "invalid Content-Length {:?}",
                    String::from_utf8_lossy(&value[..value.len().min(40)])
                ))
            })?;
            // Repeats must agree, or the body's end depends on which one a reader believes.
            if content_length.is_some_and(|known| known != len) {
                return Err(bad_request("conflicting Content-Length headers"));
            }
            content_length = Some(len);
        } else if field.name.eq_ignore_ascii_case("Transfer-Encoding") {
            let codings = transfer_encoding.get_or_insert_with(Vec::new);
            if !codings.is_empty() {
                codings.push(b',');
            }
            codings.extend_from_slice(value);
        } else if field.name.eq_ignore_ascii_case("Connection") {
            close |= value.split(|&b| b == b',').any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if field.name.eq_ignore_ascii_case("Expect") {
            // HTTP/1.0 clients do not know 100 Continue (RFC 9110 section 10.1.1).
            expect_continue = http11 && value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let framing = match (transfer_encoding, content_length) {
        (Some(_), Some(_)) => {
            // A classic request smuggling vector; RFC 9112 section 6.1 lets a server refuse it.
            return Err(bad_request("a request cannot have both Content-Length and Transfer-Encoding"));
        }
        (Some(codings), None) if codings.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
        (Some(codings), None) => {
            let codings = String::from_utf8_lossy(&codings[..codings.len().min(40)]).into_owned();
            return Err(Failure::Refused(Reply::error(501, format!("unsupported Transfer-Encoding {codings:?}"))));
        }
        (None, None | Some(0)) => Framing::Empty,
        (None, Some(len)) => Framing::Length(len),
    };
    Ok(Head { method: method.to_string(), target: target.to_string(), framing, keep_alive: !close, expect_continue })
}

/// A `Content-Length` value: decimal digits only. Lengths beyond `u64` become `u64::MAX`, which
/// is too large a body anyway (413 rather than 400).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, digit| n.saturating_mul(10).saturating_add(u64::from(digit - b'0'))))
}

// ---------------------------------------------------------------------------------------------
// Answers

/// An HTTP answer, before it is encoded.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) content_type: Option<&'static str>,
    pub(super) body: Vec<u8>,
    pub(super) allow: Option<String>,
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
    pub(super) fn error(status: u16, message: String) -> Reply {
        #[derive(Serialize)]
        struct ErrorBody {
            error: String,
        }
        let body = serde_json::to_vec(&ErrorBody { error: message })
            .unwrap_or_else(|_| br#"{"error":"unprintable error"}"#.to_vec());
        Reply { status, content_type: Some(JSON), body, allow: None }
    }

    pub(super) fn api_error(e: &ApiError) -> Reply {
        Reply::error(e.status(), e.to_string())
    }

    pub(super) fn with_allow(mut self, allow: String) -> Reply {
        self.allow = Some(allow);
        self
    }

    pub(super) fn from_response(endpoint: Endpoint, response: ApiResponse) -> Reply {
        if !endpoint.expects(&response) {
            log::error!("the VMM answered {endpoint:?} with {response:?}");
            return Reply::error(500, "internal error: the VMM gave an unexpected answer".to_string());
        }
        let status = endpoint.success_status();
        match response {
            ApiResponse::Vm(info) => Reply::json(status, &info),
            ApiResponse::Migration(info) => Reply::json(status, &info),
            ApiResponse::Snapshot(info) => Reply::json(status, &info),
            ApiResponse::Restored(info) => Reply::json(status, &info),
            ApiResponse::Accepted => Reply::json(status, &serde_json::json!({"status": "accepted"})),
            ApiResponse::Metrics(text) => {
                Reply { status, content_type: Some(PROMETHEUS_TEXT), body: text.into_bytes(), allow: None }
            }
            // No body, so no Content-Type.
            ApiResponse::Done => Reply { status, content_type: None, body: Vec::new(), allow: None },
        }
    }

    /// The answer on the wire: always with a `Content-Length` (never chunked, so simple clients,
    /// ours included, need no decoder), `Connection: close` when the server closes after it, and
    /// without the body for a `HEAD` request.
    pub(super) fn encode(&self, close: bool, head_only: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nDate: {}\r\n",
            self.status,
            reason_phrase(self.status),
            http_date(SystemTime::now())
        );
        if let Some(content_type) = self.content_type {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        // RFC 9110 section 8.6: none in a 204 answer, which has no body.
        let has_body = self.status != 204;
        if has_body {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if has_body && !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The reason phrase of the status codes we send; optional in HTTP/1.1, so others get none.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// `time` as an IMF-fixdate (RFC 9110 section 5.6.7), e.g. "Sun, 06 Nov 1994 08:49:37 GMT",
/// for the `Date` header an origin server with a clock must send.
fn http_date(time: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday.
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    let days = secs / 86_400;
    let (hour, minute, second) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here): years
    // counted from March, so that the leap day is the last day of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 2 } else { month_from_march - 10 };
    let year = year_of_era + era * 400 + u64::from(month < 2);
    let weekday = WEEKDAYS[(days % 7) as usize];
    let month = MONTHS[month as usize];
    format!("{weekday}, {day:02} {month} {year} {hour:02}:{minute:02}:{second:02} GMT")
}

#[cfg(test)]
mod tests;
