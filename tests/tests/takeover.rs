// SPDX-License-Identifier: Apache-2.0
//! Address takeover end to end: the guest's peers never notice that it moved. In a test bed
//! (hosts and a client on one L2 segment, see `vmm_tests::bed`), with our guest running the
//! echo workload and a client that is a separate process in the client namespace
//! (`vmm-echo-client`, streaming a numbered line every 10 ms and checking every echo):
//!
//! - the open connection goes through a move A→B and back B→A with no reset and no lost,
//!   duplicated or reordered byte, and a new connection to port 7000 works right after each move
//!   (the listening socket moved with the guest);
//! - nothing is left behind: after A→B the source VMM has exited, then host A's TAP and then the
//!   whole host A namespace are deleted, and the open connection and new ones keep working;
//! - what the announce is worth, observed on the segment's bridge: after a move without any
//!   announce (`--no-announce`) the bridge still sends the guest's frames to the old host's
//!   port, and after a move with it the bridge sends them to the new host's port before anyone
//!   else has said a word.
//!
//! The client's largest gap and the downtime are printed, never asserted (the machines these
//! tests run on are small and shared; `vmm-bench` compares them with QEMU's). Run with
//! `--nocapture` to see them.

use std::thread;
use std::time::{Duration, Instant};

use vmm_tests::TestBed;
use vmm_tests::bed::BRIDGE_NAME;
use vmm_tests::client::{assert_intact, assert_new_connection, new_connection, start_client, stop_client};
use vmm_tests::moves::{GUEST_MAC, MIGRATION_PORT, bed_with, dump, hop, start_source};
use vmm_tests::vm::kvm_or_skip;

const ECHO: &str = "vmm.workload=echo";
/// Flags that turn every announce off on a destination (RARP, gratuitous ARP, guest announce,
/// TCP duplicate ACKs).
const NO_ANNOUNCE: &[&str] = &["--no-announce", "--no-tcp-kick"];

/// The port of the segment's bridge behind which it last saw `mac`, if it knows it.
fn segment_port_of(bed: &TestBed, mac: &str) -> Option<String> {
    let out = bed
        .segment()
        .command("bridge")
        .args(["fdb", "show", "br", BRIDGE_NAME])
        .output()
        .expect("run `bridge fdb show` in the segment namespace");
    assert!(out.status.success(), "bridge fdb show: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.split(' ').next().is_some_and(|m| m.eq_ignore_ascii_case(mac)))?;
    let mut words = line.split(' ');
    words.find(|w| *w == "dev")?;
    words.next().map(str::to_string)
}

/// Polls the segment's bridge until it places the guest's MAC behind `port`.
fn wait_segment_port(bed: &TestBed, port: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let now = segment_port_of(bed, GUEST_MAC);
        if now.as_deref() == Some(port) || Instant::now() >= deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_open_connection_survives_a_round_trip_and_new_connections_work() {
    if !kvm_or_skip("an_open_connection_survives_a_round_trip_and_new_connections_work") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let on_a = start_source(&bed, "a", &[], ECHO);
    let client = start_client(&bed, &[("guest on a", &on_a)]);
    thread::sleep(Duration::from_secs(1));

    let (on_b, to_b) = hop(&bed, on_a, "b", MIGRATION_PORT, &[], &[("client", &client)]);
    assert_new_connection(&bed, "the move to host b", &[("guest on b", &on_b), ("client", &client)]);
    thread::sleep(Duration::from_secs(1));

    let (on_a, to_a) = hop(&bed, on_b, "a", MIGRATION_PORT + 1, &[], &[("client", &client)]);
    let ctx = [("guest on a", &on_a), ("client", &client)];
    assert_new_connection(&bed, "the move back to host a", &ctx);
    thread::sleep(Duration::from_secs(1));

    let report = stop_client(&client, &ctx);
    println!(
        "downtimes: {:?} µs and {:?} µs (source's view)",
        to_b.downtime_us.unwrap_or_default(),
        to_a.downtime_us.unwrap_or_default()
    );
    // 3 s of streaming at 10 ms a line, with room for a slow machine.
    assert_intact(&report, 100, &ctx);
}

#[test]
fn nothing_is_left_behind_on_the_old_host() {
    if !kvm_or_skip("nothing_is_left_behind_on_the_old_host") {
        return;
    }
    let mut bed = bed_with(&["a", "b"]);
    let on_a = start_source(&bed, "a", &[], ECHO);
    let client = start_client(&bed, &[("guest on a", &on_a)]);
    thread::sleep(Duration::from_secs(1));

    // The source VMM has exited when this returns.
    let (on_b, _) = hop(&bed, on_a, "b", MIGRATION_PORT, &[], &[("client", &client)]);
    let ctx = [("guest on b", &on_b), ("client", &client)];

    bed.remove_tap("a").expect("delete host a's TAP");
    assert_new_connection(&bed, "host a's TAP was deleted", &ctx);
    thread::sleep(Duration::from_secs(1));

    let a_netns = bed.host("a").netns().to_string();
    bed.remove_host("a").expect("delete host a");
    assert!(bed.try_host("a").is_none());
    let left = vmm_tests::list_netns().expect("list namespaces");
    assert!(!left.contains(&a_netns), "host a's namespace {a_netns} still exists: {left:?}");
    assert_new_connection(&bed, "host a was deleted", &ctx);
    thread::sleep(Duration::from_secs(1));

    let report = stop_client(&client, &ctx);
    assert_intact(&report, 100, &ctx);
    assert!(on_b.try_wait().is_none(), "the guest's VMM on host b exited{}", dump(&ctx));
}

#[test]
fn the_announce_points_the_segment_at_the_new_host() {
    if !kvm_or_skip("the_announce_points_the_segment_at_the_new_host") {
        return;
    }
    // Ports of the segment's bridge: host i is behind `port<i>`.
    let bed = bed_with(&["a", "b", "c"]);
    let on_a = start_source(&bed, "a", &[], ECHO);
    // The guest announced itself at boot; one exchange makes sure the segment has seen it.
    assert_new_connection(&bed, "boot", &[("guest on a", &on_a)]);
    let before = wait_segment_port(&bed, "port0", Duration::from_secs(2));
    assert_eq!(before.as_deref(), Some("port0"), "the segment did not learn the guest on host a");

    // No announce and no traffic: nothing tells the segment that the guest moved.
    let (on_b, _) = hop(&bed, on_a, "b", MIGRATION_PORT, NO_ANNOUNCE, &[]);
    let stale = segment_port_of(&bed, GUEST_MAC);
    println!("without the announce, right after the move to host b the segment sends the guest's frames to {stale:?}");
    assert_eq!(
        stale.as_deref(),
        Some("port0"),
        "without any announce the segment was expected to still point at host a (port0): if the guest \
         now talks on its own after a move, this control no longer isolates the announce{}",
        dump(&[("guest on b", &on_b)])
    );
    match new_connection(&bed, Duration::from_secs(3)) {
        Ok(t) => println!("without the announce a new connection still answered, in {} ms", t.as_millis()),
        Err(e) => println!("without the announce a new connection failed within 3 s: {e}"),
    }

    // With the announce (the default): the segment follows the guest to host c by itself.
    let (on_c, _) = hop(&bed, on_b, "c", MIGRATION_PORT + 1, &[], &[]);
    let t = Instant::now();
    let now = wait_segment_port(&bed, "port2", Duration::from_secs(2));
    println!(
        "with the announce, the segment sends the guest's frames to {now:?} (seen {} ms after the old VMM exited)",
        t.elapsed().as_millis()
    );
    assert_eq!(
        now.as_deref(),
        Some("port2"),
        "the announce did not move the segment to host c{}",
        dump(&[("guest on c", &on_c)])
    );
    assert_new_connection(&bed, "the announced move to host c", &[("guest on c", &on_c)]);
}
