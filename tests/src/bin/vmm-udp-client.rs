// SPDX-License-Identifier: Apache-2.0
//! A UDP client process for the UDP takeover test and for people: sends a numbered datagram to
//! a guest's UDP echo service at a steady pace and accounts for every reply (see
//! `vmm_tests::udp_stream`), until it gets SIGTERM or SIGINT. Then it prints what it saw and
//! exits: 0 if every datagram came back once, 1 if not, 2 if the guest never answered.
//!
//! Usage: vmm-udp-client IP:PORT INTERVAL_MS
//!
//! Output, one line each: `READY` once the first reply came back; at the end
//! `STATS sent=N received=N lost=N duplicated=N reordered=N foreign=N largest_gap_us=N errors=N`,
//! then `LOST first=SEQ count=N sent_unix_us=T` for each run of datagrams that never came back
//! (T: when the first of them was sent), then `ERROR <message>` per error.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, UNIX_EPOCH};

use vmm_tests::client_cli::{parse_target, stop_on_signals, wait_for_stop};
use vmm_tests::udp_stream::UdpStream;

/// How long the guest may take to answer the first datagram.
const FIRST_REPLY_WITHIN: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, interval) = match parse_target(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm-udp-client: {e}\nusage: vmm-udp-client IP:PORT INTERVAL_MS");
            std::process::exit(2);
        }
    };
    stop_on_signals();
    let local: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid address");
    let stream = match UdpSocket::bind(local).and_then(|s| UdpStream::start(s, addr, interval)) {
        Ok(s) => s,
        Err(e) => {
            println!("ERROR start: {e}");
            std::process::exit(2);
        }
    };
    if !stream.wait_reply_after_now(FIRST_REPLY_WITHIN) {
        println!("ERROR no reply from {addr} within {} s", FIRST_REPLY_WITHIN.as_secs());
        std::process::exit(2);
    }
    println!("READY");
    wait_for_stop();
    let (s, runs) = stream.finish();
    println!(
        "STATS sent={} received={} lost={} duplicated={} reordered={} foreign={} largest_gap_us={} errors={}",
        s.sent,
        s.received,
        s.lost(),
        s.duplicated,
        s.reordered,
        s.foreign,
        s.largest_gap.as_micros(),
        s.errors.len()
    );
    for r in &runs {
        let us = r.sent_at_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
        println!("LOST first={} count={} sent_unix_us={us}", r.first, r.count);
    }
    for e in &s.errors {
        println!("ERROR {e}");
    }
    let intact = s.lost() == 0 && s.duplicated == 0 && s.errors.is_empty();
    std::process::exit(if intact { 0 } else { 1 });
}
