// SPDX-License-Identifier: Apache-2.0
//! A UDP flow through live migration, as the TCP takeover tests do it for TCP: in a test bed
//! (hosts and a client on one L2 segment), our guest runs its UDP echo service on port 7000 and
//! a client process in the client namespace (`vmm-udp-client`) sends a numbered datagram every
//! 10 ms and accounts for every reply, while the guest moves A→B→A.
//!
//! Asserted: the stream goes on after each move (a new flow works too), no datagram comes back
//! twice, and each move loses at most the datagrams sent while the guest was paused (pause →
//! running on the destination, plus one for the boundary); nothing is lost outside the moves.
//! The losses per move are printed: the goal is 0, which the destination's early announce and the
//! source's TAP drain should make possible.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmm::api::MigrationInfo;
use vmm_tests::TestBed;
use vmm_tests::moves::{ECHO_PORT, EXIT_TIMEOUT, GUEST_TIMEOUT, MIGRATION_PORT, bed_with, dump, hop, start_source};
use vmm_tests::vm::{Vm, kvm_or_skip};

/// The client sends a datagram this often (ms).
const INTERVAL_MS: u64 = 10;
/// After a move, losses of datagrams sent up to this long after it ended still count for it.
const AFTER_MOVE: Duration = Duration::from_secs(2);

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Starts the client in the client namespace and waits until the guest answered it.
fn start_client(bed: &TestBed, ctx: &[(&str, &Vm)]) -> Vm {
    let program = Path::new(env!("CARGO_BIN_EXE_vmm-udp-client"));
    let args = vec![format!("{}:{ECHO_PORT}", bed.guest_ip(0)), INTERVAL_MS.to_string()];
    let client = Vm::start_program(Some(bed.client()), program, &args);
    let ready = client.console.wait_line(GUEST_TIMEOUT, |l| l == "READY" || l.starts_with("ERROR"));
    assert_eq!(
        ready.as_deref(),
        Some("READY"),
        "the guest does not answer{}",
        dump(&[ctx, &[("client", &client)]].concat())
    );
    client
}

/// What the client saw: its totals and its loss runs as (first sequence number, count, sent at
/// µs since the Unix epoch).
#[derive(Debug)]
struct Report {
    sent: u64,
    received: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    foreign: u64,
    largest_gap_us: u64,
    runs: Vec<(u64, u64, u64)>,
    errors: Vec<String>,
}

fn field(line: &str, key: &str) -> u64 {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Stops the client (SIGTERM), waits for it and reads its report.
fn stop_client(client: &Vm, ctx: &[(&str, &Vm)]) -> Report {
    // SAFETY: plain kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(client.pid() as libc::pid_t, libc::SIGTERM) };
    let all = || dump(&[ctx, &[("client", client)]].concat());
    assert!(client.wait_timeout(EXIT_TIMEOUT).is_some(), "the client did not stop{}", all());
    let stats = client.console.wait_line(Duration::from_secs(5), |l| l.starts_with("STATS "));
    let stats = stats.unwrap_or_else(|| panic!("the client printed no STATS line{}", all()));
    Report {
        sent: field(&stats, "sent"),
        received: field(&stats, "received"),
        lost: field(&stats, "lost"),
        duplicated: field(&stats, "duplicated"),
        reordered: field(&stats, "reordered"),
        foreign: field(&stats, "foreign"),
        largest_gap_us: field(&stats, "largest_gap_us"),
        runs: client
            .console
            .lines(|l| l.starts_with("LOST "))
            .iter()
            .map(|l| (field(l, "first"), field(l, "count"), field(l, "sent_unix_us")))
            .collect(),
        errors: client.console.lines(|l| l.starts_with("ERROR")),
    }
}

/// One datagram through a brand-new socket from the client namespace.
fn new_flow(bed: &TestBed) -> Result<(), String> {
    let to = SocketAddr::from((bed.guest_ip(0), ECHO_PORT));
    bed.client()
        .run_in(move || -> Result<(), String> {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            // A datagram may be lost: try a few times.
            for _ in 0..10 {
                s.send_to(b"a new flow", to).map_err(|e| e.to_string())?;
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    return if &buf[..n] == b"a new flow" { Ok(()) } else { Err(format!("echoed {:?}", &buf[..n])) };
                }
            }
            Err("no answer to 10 datagrams".into())
        })
        .expect("enter the client namespace")
}

/// One move: its wall-clock window and figures.
struct Move {
    to: &'static str,
    started_us: u64,
    ended_us: u64,
    info: MigrationInfo,
}

impl Move {
    /// Pause on the source → running on the destination, in ms (the source's downtime if the
    /// destination's timestamps are missing).
    fn paused_ms(&self) -> f64 {
        match (self.info.paused_at_us, self.info.resumed_at_us) {
            (Some(p), Some(r)) => r.saturating_sub(p) as f64 / 1000.0,
            _ => self.info.downtime_us.unwrap_or(0) as f64 / 1000.0,
        }
    }

    /// The datagrams the client sent while the guest was paused, plus one for the boundary.
    fn allowed_loss(&self) -> u64 {
        (self.paused_ms() / INTERVAL_MS as f64).ceil() as u64 + 1
    }

    fn contains(&self, sent_us: u64) -> bool {
        (self.started_us..=self.ended_us + AFTER_MOVE.as_micros() as u64).contains(&sent_us)
    }
}

#[test]
fn a_udp_flow_survives_a_round_trip() {
    if !kvm_or_skip("a_udp_flow_survives_a_round_trip") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let on_a = start_source(&bed, "a", &["--vcpus", "2"], "vmm.workload=echo");
    let client = start_client(&bed, &[("guest on a", &on_a)]);
    thread::sleep(Duration::from_secs(1));

    let mut moves = Vec::new();
    let mut vm = on_a;
    for (i, to) in ["b", "a"].into_iter().enumerate() {
        let started_us = unix_us(SystemTime::now());
        let (dst, info) = hop(&bed, vm, to, MIGRATION_PORT + i as u16, &[], &[("client", &client)]);
        let ended_us = unix_us(SystemTime::now());
        vm = dst;
        if let Err(e) = new_flow(&bed) {
            panic!(
                "a new UDP flow after the move to host {to} failed: {e}{}",
                dump(&[("guest", &vm), ("client", &client)])
            );
        }
        moves.push(Move { to, started_us, ended_us, info });
        thread::sleep(Duration::from_secs(1));
    }
    thread::sleep(AFTER_MOVE);

    let ctx = [("guest", &vm), ("client", &client)];
    let r = stop_client(&client, &ctx);
    println!(
        "client: {} datagrams sent, {} came back, {} lost, {} duplicated, {} reordered, {} foreign, largest gap {} ms",
        r.sent,
        r.received,
        r.lost,
        r.duplicated,
        r.reordered,
        r.foreign,
        r.largest_gap_us / 1000
    );
    let mut explained = 0;
    for (i, m) in moves.iter().enumerate() {
        // A move's window ends where the next one starts, so that a loss counts for one move
        // only (the second move starts within AFTER_MOVE of the first one's end).
        let until = moves.get(i + 1).map_or(u64::MAX, |next| next.started_us);
        let lost: u64 = r.runs.iter().filter(|(_, _, at)| m.contains(*at) && *at < until).map(|(_, n, _)| n).sum();
        explained += lost;
        println!(
            "move to host {}: {lost} datagram(s) lost, guest paused {:.1} ms (at most {} allowed)",
            m.to,
            m.paused_ms(),
            m.allowed_loss()
        );
        assert!(
            lost <= m.allowed_loss(),
            "the move to host {} lost {lost} datagrams, more than were sent while the guest was paused \
             ({:.1} ms): {r:?}{}",
            m.to,
            m.paused_ms(),
            dump(&ctx)
        );
    }
    assert!(r.errors.is_empty(), "the client reported errors: {:?}{}", r.errors, dump(&ctx));
    assert_eq!(r.duplicated, 0, "datagrams came back twice: {r:?}{}", dump(&ctx));
    assert_eq!(r.foreign, 0, "replies that were never sent: {r:?}");
    assert_eq!(r.lost, explained, "datagrams were lost outside the moves: {r:?}{}", dump(&ctx));
    // About 5 s of stream at 10 ms, with room for a slow machine.
    assert!(r.received >= 200, "the stream carried only {} datagrams: {r:?}", r.received);
}
