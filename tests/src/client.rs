// SPDX-License-Identifier: Apache-2.0
//! The takeover tests' client: `vmm-echo-client`, a separate process in the client namespace
//! that streams a numbered line every 10 ms through the guest's echo service and checks every
//! echo; new connections to the echo port; moving a guest with the client watching. Shared by
//! the takeover tests of both guests.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::TestBed;
use crate::moves::{ECHO_PORT, EXIT_TIMEOUT, GUEST_TIMEOUT, dump};
use crate::vm::Vm;

/// The client writes a line this often (ms).
pub const CLIENT_INTERVAL_MS: &str = "10";

/// Starts the client process in the client namespace and waits until it is connected.
pub fn start_client(bed: &TestBed, ctx: &[(&str, &Vm)]) -> Vm {
    let program = crate::vm::echo_client_bin();
    let args = vec![format!("{}:{ECHO_PORT}", bed.guest_ip(0)), CLIENT_INTERVAL_MS.to_string()];
    let client = Vm::start_program(Some(bed.client()), &program, &args);
    let connected = client.console.wait_line(GUEST_TIMEOUT, |l| l == "CONNECTED" || l.starts_with("ERROR"));
    assert_eq!(
        connected.as_deref(),
        Some("CONNECTED"),
        "the client did not connect{}",
        dump(&[ctx, &[("client", &client)]].concat())
    );
    client
}

/// What the client process saw, from its last lines.
#[derive(Debug)]
pub struct ClientReport {
    pub sent: u64,
    pub echoed: u64,
    pub lost: u64,
    pub largest_gap: Duration,
    pub errors: Vec<String>,
    pub exit_ok: bool,
}

/// Stops the client (SIGTERM), waits for it and reads its report.
pub fn stop_client(client: &Vm, ctx: &[(&str, &Vm)]) -> ClientReport {
    // SAFETY: plain kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(client.pid() as libc::pid_t, libc::SIGTERM) };
    let status = client.wait_timeout(EXIT_TIMEOUT);
    let all = || dump(&[ctx, &[("client", client)]].concat());
    let status = status.unwrap_or_else(|| panic!("the client did not stop{}", all()));
    let stats = client.console.wait_line(Duration::from_secs(5), |l| l.starts_with("STATS "));
    let stats = stats.unwrap_or_else(|| panic!("the client printed no STATS line{}", all()));
    let field = |name: &str| -> u64 {
        stats
            .split(' ')
            .find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
    };
    ClientReport {
        sent: field("sent"),
        echoed: field("echoed"),
        lost: field("lost"),
        largest_gap: Duration::from_micros(field("largest_gap_us")),
        errors: client.console.lines(|l| l.starts_with("ERROR")),
        exit_ok: status.success(),
    }
}

/// The open connection carried every line, in order, and for a while.
pub fn assert_intact(r: &ClientReport, min_lines: u64, ctx: &[(&str, &Vm)]) {
    println!(
        "client: {} lines sent, {} echoed in order, {} lost, largest gap between echoes {} ms",
        r.sent,
        r.echoed,
        r.lost,
        r.largest_gap.as_millis()
    );
    assert!(r.errors.is_empty(), "the connection broke: {:?}{}", r.errors, dump(ctx));
    assert_eq!(r.lost, 0, "lines were lost: {r:?}{}", dump(ctx));
    assert!(r.exit_ok, "the client reported a failure: {r:?}");
    assert!(r.echoed >= min_lines, "the client echoed only {} lines, expected at least {min_lines}: {r:?}", r.echoed);
}

/// A brand-new connection to the echo port from the client namespace, one line through it.
/// One attempt: the kernel's own SYN retries cover `timeout`.
pub fn new_connection(bed: &TestBed, timeout: Duration) -> Result<Duration, String> {
    let addr = SocketAddr::from((bed.guest_ip(0), ECHO_PORT));
    bed.client()
        .run_in(move || -> Result<Duration, String> {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
            s.write_all(b"a new connection\n").map_err(|e| format!("write: {e}"))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).map_err(|e| format!("read: {e}"))?;
            if line != "a new connection\n" {
                return Err(format!("echoed {line:?}"));
            }
            Ok(t.elapsed())
        })
        .expect("enter the client namespace")
}

pub fn assert_new_connection(bed: &TestBed, after: &str, ctx: &[(&str, &Vm)]) {
    match new_connection(bed, Duration::from_secs(10)) {
        Ok(t) => println!("a new connection after {after} answered in {} ms", t.as_millis()),
        Err(e) => panic!("a new connection to port {ECHO_PORT} after {after} failed: {e}{}", dump(ctx)),
    }
}
