// SPDX-License-Identifier: Apache-2.0
//! A client process for the takeover tests: connects to a guest's echo server, streams numbered
//! lines at a steady pace and checks every echo (see `vmm_tests::echo_stream`), until it gets
//! SIGTERM or SIGINT. Then it prints what it saw and exits: 0 if every line came back in order,
//! 1 if not, 2 if it could not connect.
//!
//! Usage: vmm-echo-client IP:PORT INTERVAL_MS
//!
//! Output, one line each: `CONNECTED` once connected; at the end
//! `STATS sent=N echoed=N lost=N largest_gap_us=N errors=N`, then `ERROR <message>` per error.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use vmm_tests::client_cli::{parse_target, stop_on_signals, wait_for_stop};
use vmm_tests::echo_stream::EchoStream;

/// How long to keep trying to connect (the guest may still be starting its server).
const CONNECT_FOR: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, interval) = match parse_target(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm-echo-client: {e}\nusage: vmm-echo-client IP:PORT INTERVAL_MS");
            std::process::exit(2);
        }
    };
    stop_on_signals();
    let stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            println!("ERROR connect to {addr}: {e}");
            std::process::exit(2);
        }
    };
    let echo = match EchoStream::start(stream, interval) {
        Ok(e) => e,
        Err(e) => {
            println!("ERROR start: {e}");
            std::process::exit(2);
        }
    };
    println!("CONNECTED");
    wait_for_stop();
    let s = echo.finish();
    println!(
        "STATS sent={} echoed={} lost={} largest_gap_us={} errors={}",
        s.sent,
        s.echoed,
        s.lost(),
        s.largest_gap.as_micros(),
        s.errors.len()
    );
    for e in &s.errors {
        println!("ERROR {e}");
    }
    std::process::exit(if s.intact() { 0 } else { 1 });
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_FOR;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
