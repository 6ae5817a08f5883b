// SPDX-License-Identifier: Apache-2.0
//! Unit tests of `vmm/src/api/http.rs`.

use super::*;

fn head(raw: &[u8]) -> Result<Head, u16> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
    let mut request = httparse::Request::new(&mut fields);
    assert!(request.parse(raw).unwrap().is_complete(), "{}", String::from_utf8_lossy(raw));
    parse_head(&request).map_err(|failure| match failure {
        Failure::Refused(reply) => reply.status,
        other => panic!("{other:?}"),
    })
}

#[test]
fn heads() {
    let h = head(b"GET /vm?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(
        (h.method.as_str(), h.target.as_str(), h.framing, h.keep_alive),
        ("GET", "/vm?x=1", Framing::Empty, true)
    );
    let h = head(b"PUT /vm/migrate HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\ncontent-length: 007\r\nExpect: 100-Continue\r\n\r\n")
        .unwrap();
    assert_eq!((h.framing, h.keep_alive, h.expect_continue), (Framing::Length(7), false, true));
    let h = head(b"GET /vm HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!((h.framing, h.keep_alive, h.expect_continue), (Framing::Empty, false, false));
    let h = head(b"PUT /vm/migrate HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Chunked);
    let h = head(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Length(5));
    let h = head(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Length(u64::MAX));
}

#[test]
fn bad_heads() {
    for (raw, status) in [
        (&b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..], 400),
        (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ] {
        assert_eq!(head(raw), Err(status), "{}", String::from_utf8_lossy(raw));
    }
}

/// A connection whose client already sent `input` and closed its side.
fn connection(input: &[u8]) -> Connection {
    let (server, mut client) = UnixStream::pair().unwrap();
    client.write_all(input).unwrap();
    drop(client);
    Connection { stream: server, buf: Vec::new() }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn refused_status(result: Result<Vec<u8>, Failure>) -> u16 {
    match result {
        Err(Failure::Refused(reply)) => reply.status,
        other => panic!("{other:?}"),
    }
}

#[test]
fn bodies() {
    let mut conn = connection(b"12345GET");
    assert_eq!(conn.read_body(Framing::Length(5), 5, 100, soon()).unwrap(), b"12345");
    assert_eq!(conn.buf, b"GET");
    let mut conn = connection(b"1234");
    assert_eq!(refused_status(conn.read_body(Framing::Length(5), 5, 100, soon())), 400);

    let mut conn = connection(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\nNEXT");
    assert_eq!(conn.read_body(Framing::Chunked, 5, 100, soon()).unwrap(), b"abcde");
    assert_eq!(conn.buf, b"NEXT");
    for (raw, status) in [
        (&b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"[..], 413),
        (b"fffffffffffffff\r\n", 413),
        (b"3\r\nabcX\r\n0\r\n\r\n", 400),
        (b"x\r\n", 400),
        (b"3\r\nab", 400),
        (b"0\r\nBad Trailer\r\n\r\n", 400),
    ] {
        let mut conn = connection(raw);
        assert_eq!(refused_status(conn.read_body(Framing::Chunked, 5, 100, soon())), status, "{raw:?}");
    }
    let mut long_line = b"1;".to_vec();
    long_line.resize(2000, b'x');
    let mut conn = connection(&long_line);
    assert_eq!(refused_status(conn.read_body(Framing::Chunked, 5, 100, soon())), 400);
}

#[test]
fn slow_body_times_out() {
    let (server, mut client) = UnixStream::pair().unwrap();
    client.write_all(b"12").unwrap();
    let mut conn = Connection { stream: server, buf: Vec::new() };
    let start = Instant::now();
    let result = conn.read_body(Framing::Length(5), 5, 100, Instant::now() + Duration::from_millis(100));
    assert!(matches!(result, Err(Failure::TimedOut)), "{result:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn encoding() {
    let r = Reply::error(404, "no such route: /x\"".to_string());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"], "no such route: /x\"");
    assert_eq!(r.content_type, Some(JSON));
    let text = String::from_utf8(r.encode(true, false)).unwrap();
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\nDate: "), "{text}");
    assert!(text.contains("\r\nContent-Type: application/json\r\n"), "{text}");
    assert!(text.contains(&format!("\r\nContent-Length: {}\r\n", r.body.len())), "{text}");
    assert!(text.ends_with(&format!("\r\nConnection: close\r\n\r\n{}", String::from_utf8_lossy(&r.body))), "{text}");

    let head_only = String::from_utf8(r.encode(false, true)).unwrap();
    assert!(head_only.ends_with(&format!("Content-Length: {}\r\n\r\n", r.body.len())), "{head_only}");

    let done = Reply::from_response(Endpoint::Pause, ApiResponse::Done);
    let text = String::from_utf8(done.encode(false, false)).unwrap();
    assert!(text.starts_with("HTTP/1.1 204 No Content\r\n") && text.ends_with("GMT\r\n\r\n"), "{text}");
}

#[test]
fn unexpected_vmm_answer_is_500() {
    let r = Reply::from_response(Endpoint::GetVm, ApiResponse::Done);
    assert_eq!(r.status, 500);
}

#[test]
fn dates() {
    let at = |secs| http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    assert_eq!(at(1_709_251_199), "Thu, 29 Feb 2024 23:59:59 GMT");
    assert_eq!(at(4_102_444_800), "Fri, 01 Jan 2100 00:00:00 GMT");
}
