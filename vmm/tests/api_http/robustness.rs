// SPDX-License-Identifier: Apache-2.0
//! Clients that misbehave, many clients, a VMM gone or silent.

use super::*;

#[test]
fn absurd_content_length_does_not_kill_the_server() {
    let h = Harness::new();
    // Beyond isize::MAX, and beyond any machine's memory.
    for len in ["18446744073709551615", "1000000000000000"] {
        for path in ["/vm", "/vm/migrate"] {
            let request = format!("PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{{");
            let mut stream = UnixStream::connect(h.sock()).unwrap();
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut status = [0u8; 12];
            stream.read_exact(&mut status).unwrap();
            assert!(status.starts_with(b"HTTP/1.1 4"), "{}", String::from_utf8_lossy(&status));
            drop(stream);
            assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
        }
    }
}

#[test]
fn bad_clients_do_not_disturb_others() {
    let h = Harness::new();
    let client = h.client().with_timeout(Duration::from_secs(3));

    // Connects and says nothing.
    let _silent = UnixStream::connect(h.sock()).unwrap();
    // Stops half-way through the headers.
    let mut half_headers = UnixStream::connect(h.sock()).unwrap();
    half_headers.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nContent-").unwrap();
    // Announces a body too big to be buffered up front, sends some and stalls.
    let mut stalled = UnixStream::connect(h.sock()).unwrap();
    stalled.write_all(b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{\"to\":").unwrap();
    // Same, then hangs up: the server sees the body end early.
    {
        let mut gone = UnixStream::connect(h.sock()).unwrap();
        gone.write_all(b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{\"to\":").unwrap();
    }
    // A small body cut short, then hang-up.
    {
        let mut gone = UnixStream::connect(h.sock()).unwrap();
        gone.write_all(b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").unwrap();
    }
    // Garbage, binary garbage and a request line without a version.
    for garbage in [&b"\x00\xff\xfe garbage\r\n\r\n"[..], b"HELLO\r\n\r\n", b"GET /vm\r\n\r\n", b"\r\n\r\n\r\n"] {
        let answer = raw_exchange(&h.sock(), garbage);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
    // A header line without a colon.
    let answer = raw_exchange(&h.sock(), b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");

    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(client.get_vm().unwrap().state, VmState::Running);
    }
    client.pause().unwrap();
    client.resume().unwrap();
    assert!(start.elapsed() < Duration::from_secs(2), "normal clients were held up: {:?}", start.elapsed());

    // The stalled client, finishing at last, is answered too.
    stalled.write_all(&[b' '; 3994]).unwrap();
    stalled.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut answer = [0u8; 12];
    stalled.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 400");
    drop(half_headers);
    assert_eq!(client.get_vm().unwrap().state, VmState::Running);
}

#[test]
fn fifty_concurrent_requests_are_all_answered() {
    let h = Harness::new();
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let client = h.client();
            thread::spawn(move || client.get_vm())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap().state, VmState::Running);
    }
}

#[test]
fn vmm_gone_or_silent_is_503() {
    let dir = TempDir::new();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());

    let (tx, rx) = channel::<ApiMessage>();
    drop(rx);
    let gone = start_api_server(&dir.sock(), tx, Arc::clone(&wake)).unwrap();
    let r = ApiClient::new(dir.sock()).send("GET", "/vm", None).unwrap();
    assert_error(&r, 503, "not taking API requests");
    drop(gone);

    // Receives requests but never answers them.
    let (tx, rx) = channel::<ApiMessage>();
    let held = thread::spawn(move || rx.iter().collect::<Vec<_>>());
    let options = ApiServerOptions { reply_timeout: Duration::from_millis(200), ..Default::default() };
    let mut silent = start_api_server_with(&dir.sock(), tx, wake, options).unwrap();
    let r = ApiClient::new(dir.sock()).send("GET", "/vm", None).unwrap();
    assert_error(&r, 503, "did not answer in time");
    silent.stop();
    assert_eq!(held.join().unwrap().len(), 1);
}

#[test]
fn idle_connections_do_not_starve_a_request() {
    let h = Harness::new();
    // Twenty that say nothing, and five that stop half-way, all left open.
    let mut idle: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(h.sock()).unwrap()).collect();
    for half in [&b"GET /vm HTTP/1.1\r\nHo"[..], b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"] {
        for _ in 0..5 {
            let mut stream = UnixStream::connect(h.sock()).unwrap();
            stream.write_all(half).unwrap();
            idle.push(stream);
        }
    }
    let client = h.client().with_timeout(Duration::from_secs(2));
    let start = Instant::now();
    for _ in 0..10 {
        assert_eq!(client.get_vm().unwrap().state, VmState::Running);
    }
    assert!(start.elapsed() < Duration::from_secs(1), "held up by idle connections: {:?}", start.elapsed());
    drop(idle);
}

#[test]
fn connections_beyond_the_limit_get_503_at_once() {
    let h = Harness::with_options(ApiServerOptions { max_connections: 4, ..Default::default() });
    let idle: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(h.sock()).unwrap()).collect();
    // Accepted in order by one thread, so the four hold every place by now.
    let start = Instant::now();
    let mut extra = h.connect();
    let r = read_answer(&mut extra, false);
    assert_error(&r, 503, "too many API connections");
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(closed_by_server(&mut extra));
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());

    // The places come back when the idle clients go.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match h.client().get_vm() {
            Ok(vm) => break assert_eq!(vm.state, VmState::Running),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the server did not recover its connection places: {e}"),
        }
    }
}

#[test]
fn huge_content_length_is_413_before_reading() {
    let h = Harness::new();
    for len in ["1000000000000000", "18446744073709551616", "99999999999999999999999999999999"] {
        let start = Instant::now();
        let mut conn = h.connect();
        let request = format!("PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{{\"to\":");
        conn.get_mut().write_all(request.as_bytes()).unwrap();
        let r = read_answer(&mut conn, false);
        assert_error(&r, 413, "too large (at most 65536 bytes)");
        assert_eq!(r.header("Connection"), Some("close"));
        // The server shut its side at once, without waiting for the body.
        assert!(closed_by_server(&mut conn));
        assert!(start.elapsed() < Duration::from_secs(1), "{len}: {:?}", start.elapsed());
        assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
    }
    // Just over the limit, sent in full: the client can write it all and read the answer.
    let body = format!(r#"{{"to":"h:1","x":"{}"}}"#, "x".repeat(64 * 1024));
    assert_error(&h.send("PUT", "/vm/migrate", Some(&body)), 413, "too large");
}

#[test]
fn over_long_headers_are_431() {
    let h = Harness::new();
    let long_value = format!("GET /vm HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n", "v".repeat(20 * 1024));
    let long_target = format!("GET /vm?{} HTTP/1.1\r\nHost: x\r\n\r\n", "q".repeat(20 * 1024));
    let many = format!("GET /vm HTTP/1.1\r\n{}\r\n", (0..100).map(|i| format!("X-{i}: y\r\n")).collect::<String>());
    // No end of line at all, and still sending.
    let endless = "GET /vm HTTP/1.1\r\nX-Endless: ".to_string() + &"e".repeat(100 * 1024);
    for request in [long_value, long_target, many, endless] {
        let mut conn = h.connect();
        conn.get_mut().write_all(request.as_bytes()).unwrap();
        let r = read_answer(&mut conn, false);
        assert_error(&r, 431, "request header");
        assert!(closed_by_server(&mut conn));
        assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
    }
    // Just under the limit is fine.
    let mut conn = h.connect();
    get_vm_on(&mut conn, &format!("X-Long: {}\r\n", "v".repeat(15 * 1024)));
}

#[test]
fn stalled_clients_are_dropped_after_the_timeout() {
    let timeout = Duration::from_secs(1);
    let h = Harness::with_options(ApiServerOptions { request_timeout: timeout, ..Default::default() });
    let start = Instant::now();
    let mut silent = h.connect();
    let mut half_head = h.connect();
    half_head.get_mut().write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nContent-").unwrap();
    let mut half_body = h.connect();
    half_body.get_mut().write_all(b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"to\":").unwrap();
    // One byte at a time, each well within the timeout: the deadline is for the whole request.
    let mut trickle = h.connect();
    let trickler = {
        let mut stream = trickle.get_ref().try_clone().unwrap();
        thread::spawn(move || {
            for &b in b"GET /vm HTTP/1.1\r\nHost: x\r\nX-Slow: 0123456789abcdef\r\n\r\n" {
                if stream.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Meanwhile others are served.
    for _ in 0..5 {
        assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
    }
    assert!(start.elapsed() < timeout, "{:?}", start.elapsed());

    // Who began a request is told why it is dropped; who said nothing is just closed.
    for conn in [&mut half_head, &mut half_body, &mut trickle] {
        assert_error(&read_answer(conn, false), 408, "did not arrive in time");
        assert!(closed_by_server(conn));
    }
    assert!(closed_by_server(&mut silent));
    let waited = start.elapsed();
    assert!(waited >= timeout && waited < timeout * 3, "{waited:?}");
    trickler.join().unwrap();
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn connections_are_kept_alive_until_close() {
    let h =
        Harness::with_options(ApiServerOptions { request_timeout: Duration::from_millis(400), ..Default::default() });
    let mut conn = h.connect();
    // HTTP/1.1 connections stay open ...
    for _ in 0..3 {
        assert_eq!(get_vm_on(&mut conn, "").header("Connection"), None);
    }
    // ... also for errors whose request was read to its end, and for answers to HEAD (no body).
    conn.get_mut().write_all(b"GET /nowhere HTTP/1.1\r\n\r\nHEAD /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_error(&read_answer(&mut conn, false), 404, "/nowhere");
    let r = read_answer(&mut conn, true);
    assert_eq!((r.status, r.header("Allow")), (405, Some("GET")));
    // Pipelined requests are answered in order, bodies and all.
    let migrate = r#"{"to":"h:1"}"#;
    let pipelined = format!(
        "PUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\nPUT /vm/migrate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}\
         PUT /vm/migrate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n\
         PUT /vm/resume HTTP/1.1\r\nContent-Length: {}\r\n\r\n{migrate}",
        migrate.len()
    );
    conn.get_mut().write_all(pipelined.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut conn, false).status, 204);
    assert_error(&read_answer(&mut conn, false), 400, "missing field `to`");
    assert_error(&read_answer(&mut conn, false), 400, "missing field `to`");
    assert_eq!(read_answer(&mut conn, false).status, 204);
    // `Connection: close` ends it after the answer.
    assert_eq!(get_vm_on(&mut conn, "Connection: close\r\n").header("Connection"), Some("close"));
    assert!(closed_by_server(&mut conn));

    // HTTP/1.0 gets one answer per connection.
    let mut conn = h.connect();
    conn.get_mut().write_all(b"GET /vm HTTP/1.0\r\n\r\n").unwrap();
    let r = read_answer(&mut conn, false);
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    assert!(closed_by_server(&mut conn));

    // A request refused before its body was read closes the connection: the body's end is unknown.
    let mut conn = h.connect();
    conn.get_mut().write_all(b"POST /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap();
    let r = read_answer(&mut conn, false);
    assert_eq!((r.status, r.header("Connection")), (405, Some("close")));
    assert!(closed_by_server(&mut conn));

    // An idle connection is closed after the request timeout, without an answer.
    let mut conn = h.connect();
    get_vm_on(&mut conn, "");
    let idle_since = Instant::now();
    assert!(closed_by_server(&mut conn));
    assert!(idle_since.elapsed() < Duration::from_secs(2), "{:?}", idle_since.elapsed());
}

#[test]
fn expect_100_continue() {
    let h = Harness::new();
    let mut conn = h.connect();
    let body = br#"{"to":"10.0.0.2:4000"}"#;
    let head = format!("PUT /vm/migrate HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len());
    conn.get_mut().write_all(head.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut conn, true).status, 100);
    conn.get_mut().write_all(body).unwrap();
    assert_eq!(read_answer(&mut conn, false).status, 202);
    // Too large: refused without a 100, so the client need not send its body at all.
    let mut conn = h.connect();
    conn.get_mut()
        .write_all(b"PUT /vm/migrate HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 70000\r\n\r\n")
        .unwrap();
    assert_error(&read_answer(&mut conn, false), 413, "too large");
}

#[test]
fn stop_does_not_wait_for_open_connections() {
    let dir = TempDir::new();
    let (tx, rx) = channel::<ApiMessage>();
    let mut server = start_api_server(&dir.sock(), tx, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())).unwrap();
    let vmm = thread::spawn(move || {
        // Answers like a VMM, and returns once the server let go of its end of the channel.
        let mut fake = FakeVmm::new();
        for (request, reply) in rx {
            let _ = reply.send(fake.answer(request));
        }
    });
    let _idle: Vec<UnixStream> = (0..10).map(|_| UnixStream::connect(dir.sock()).unwrap()).collect();
    let mut half = UnixStream::connect(dir.sock()).unwrap();
    half.write_all(b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{").unwrap();
    let mut kept = BufReader::new(UnixStream::connect(dir.sock()).unwrap());
    kept.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    get_vm_on(&mut kept, "");

    let start = Instant::now();
    server.stop();
    assert!(start.elapsed() < Duration::from_millis(500), "stop waited {:?}", start.elapsed());
    assert!(!dir.sock().exists());
    // The VMM's channel closed with `stop`, not with the last connection.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !vmm.is_finished() {
        assert!(Instant::now() < deadline, "the server still holds the VMM's channel");
        thread::sleep(Duration::from_millis(10));
    }
    // A connection still open is told the VMM is out of reach.
    kept.get_mut().write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_error(&read_answer(&mut kept, false), 503, "not taking API requests");
}
