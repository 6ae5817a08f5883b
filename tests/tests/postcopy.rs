// SPDX-License-Identifier: Apache-2.0
//! Post-copy end to end, between hosts `a` and `b` of a test bed with a client:
//!
//! - a 1 GiB guest dirtying 256 MiB as fast as it can (pre-copy's "never converges" case) moves
//!   with `--postcopy` while an echo connection streams a line every 10 ms: the migration
//!   completes, the pages the guest dirtied arrive by fault and by push, its workload finds no
//!   page lost or stale, and the echo stream loses nothing;
//! - with no pre-copy round (`precopy_rounds` 0), the guest moves at once and every page it
//!   touched follows it, and it is intact; with two, the switch comes after the second;
//! - `postcopy_auto` switches once pre-copy stops converging, and the guest is intact;
//! - the link is cut (host a's uplink set down) in the middle of post-copy, while the pages
//!   still come (pushed at 24 MiB/s): the destination pauses the guest, the source keeps the
//!   memory and reconnects once the link is back, the transfer completes, and the guest is
//!   intact.
//!
//! Figures are printed, never asserted.

use std::thread;
use std::time::{Duration, Instant};

use vmm::api::{MigrateRequest, MigrationInfo, MigrationMode, MigrationPhase, VmState};
use vmm_tests::TestBed;
use vmm_tests::checks::{assert_no_dirty_mismatch_on_console, guest_echo_stream, more_dirty_passes};
use vmm_tests::moves::{
    MIGRATION_PORT, MIGRATION_TIMEOUT, assert_completed, assert_exits_cleanly, bed_with, dump, print_info, request,
    start_destination, start_source, wait_migration,
};
use vmm_tests::vm::{Vm, kvm_or_skip};

fn print_postcopy(what: &str, info: &MigrationInfo) {
    print_info(what, info);
    println!("{what}: mode {:?}, post-copy {:?}", info.mode, info.postcopy);
}

/// Moves the dirtying guest of `src` to host b with `req` and checks everything a move must keep.
fn move_with(bed: &TestBed, src: Vm, req: MigrateRequest, what: &str) -> (Vm, MigrationInfo) {
    let before = more_dirty_passes(bed, 0, &[("source", &src)]);
    let stream = guest_echo_stream(bed, 10, &[("source", &src)]);
    let (dst, addr) = start_destination(bed, "b", MIGRATION_PORT);
    let ctx = [("source", &src), ("destination", &dst)];
    let req = MigrateRequest { to: addr, ..req };
    src.api().migrate(&req).unwrap_or_else(|e| panic!("PUT /vm/migrate: {e}{}", dump(&ctx)));
    let info = wait_migration(&src, &ctx);
    print_postcopy(what, &info);
    assert_completed(&info, &ctx);
    let pc = info.postcopy.clone().unwrap_or_else(|| panic!("the migration did not switch to post-copy: {info:?}"));
    assert!(pc.pages_needed > 0, "nothing was left for post-copy: {pc:?}");
    assert!(pc.faults.is_some() && pc.duration_ms.is_some(), "no figures from the destination: {pc:?}");
    assert_exits_cleanly(&src, &ctx);
    assert_eq!(dst.api().get_vm().expect("GET /vm").state, VmState::Running);
    let after = more_dirty_passes(bed, before.num("dirty_passes"), &ctx);
    println!("{what}: dirty passes {} before, {} after", before.num("dirty_passes"), after.num("dirty_passes"));
    assert_no_dirty_mismatch_on_console(&dst, &ctx);
    let stats = stream.finish();
    println!("{what}: echo stream {stats:?}");
    assert!(stats.intact(), "the echo stream lost lines or broke: {stats:?}{}", dump(&ctx));
    (dst, info)
}

#[test]
fn postcopy_moves_a_guest_that_never_converges() {
    if !kvm_or_skip("postcopy_moves_a_guest_that_never_converges") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let src = start_source(&bed, "a", &["--mem-mib", "1024"], "vmm.workload=dirty vmm.dirty_mib=256 vmm.dirty_rate=0");
    let req = MigrateRequest { mode: Some(MigrationMode::Postcopy), ..request("") };
    let (_dst, info) = move_with(&bed, src, req, "post-copy of 1 GiB dirtying 256 MiB");
    assert_eq!(info.rounds.len(), 2, "post-copy switches after the first round: {info:?}");
}

#[test]
fn postcopy_with_no_precopy_round_moves_the_guest_at_once() {
    if !kvm_or_skip("postcopy_with_no_precopy_round_moves_the_guest_at_once") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let src = start_source(&bed, "a", &["--mem-mib", "512"], "vmm.workload=dirty vmm.dirty_mib=128 vmm.dirty_rate=0");
    let req = MigrateRequest { mode: Some(MigrationMode::Postcopy), precopy_rounds: Some(0), ..request("") };
    let (_dst, info) = move_with(&bed, src, req, "post-copy with no pre-copy round");
    // The switch is the only round, and every page the guest touched (its 128 MiB at least)
    // was left for after it: none went before.
    let [switch] = info.rounds.as_slice() else { panic!("more than the switch: {info:?}") };
    assert!(switch.stop_and_copy && switch.round == 1 && switch.bytes_before < 1 << 20, "{switch:?}");
    let needed = info.postcopy.as_ref().map_or(0, |p| p.pages_needed);
    assert!(needed >= (128 << 20) / 4096, "only {needed} pages followed the guest: {info:?}");
}

#[test]
fn postcopy_after_two_precopy_rounds_switches_after_the_second() {
    if !kvm_or_skip("postcopy_after_two_precopy_rounds_switches_after_the_second") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let src = start_source(&bed, "a", &["--mem-mib", "512"], "vmm.workload=dirty vmm.dirty_mib=128 vmm.dirty_rate=0");
    // Capped so that the second round cannot converge: the switch must come after it.
    let req = MigrateRequest {
        mode: Some(MigrationMode::Postcopy),
        precopy_rounds: Some(2),
        max_bandwidth_mib_s: Some(64),
        ..request("")
    };
    let (_dst, info) = move_with(&bed, src, req, "post-copy after two rounds");
    let kinds: Vec<(u32, bool)> = info.rounds.iter().map(|r| (r.round, r.stop_and_copy)).collect();
    assert_eq!(kinds, [(1, false), (2, false), (3, true)], "two rounds, then the switch: {info:?}");
    assert_eq!(info.round, 2, "{info:?}");
}

#[test]
fn postcopy_auto_switches_when_precopy_stalls() {
    if !kvm_or_skip("postcopy_auto_switches_when_precopy_stalls") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let src = start_source(&bed, "a", &["--mem-mib", "512"], "vmm.workload=dirty vmm.dirty_mib=128 vmm.dirty_rate=0");
    // A cap the guest's dirtying outruns, so that the rounds cannot shrink.
    let req = MigrateRequest { mode: Some(MigrationMode::PostcopyAuto), max_bandwidth_mib_s: Some(64), ..request("") };
    let (_dst, info) = move_with(&bed, src, req, "post-copy when pre-copy stalls");
    assert!(info.rounds.len() >= 3, "it switched before a round failed to shrink: {info:?}");
}

#[test]
fn a_link_cut_during_postcopy_recovers() {
    if !kvm_or_skip("a_link_cut_during_postcopy_recovers") {
        return;
    }
    let bed = bed_with(&["a", "b"]);
    let src = start_source(&bed, "a", &["--mem-mib", "512"], "vmm.workload=dirty vmm.dirty_mib=256 vmm.dirty_rate=0");
    let before = more_dirty_passes(&bed, 0, &[("source", &src)]);
    let (dst, addr) = start_destination(&bed, "b", MIGRATION_PORT);
    let ctx = [("source", &src), ("destination", &dst)];
    // Pushed at 24 MiB/s, the 256 MiB the guest dirties take about 10 s to follow.
    let req = MigrateRequest { mode: Some(MigrationMode::Postcopy), max_bandwidth_mib_s: Some(24), ..request(&addr) };
    src.api().migrate(&req).unwrap_or_else(|e| panic!("PUT /vm/migrate: {e}{}", dump(&ctx)));
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = src.api().migration().expect("GET /vm/migration");
        assert!(info.phase != MigrationPhase::Failed, "{info:?}{}", dump(&ctx));
        assert!(info.phase != MigrationPhase::Completed, "post-copy ended before the link could be cut: {info:?}");
        if info.phase == MigrationPhase::Postcopy && info.postcopy.as_ref().is_some_and(|p| p.pages_pushed > 1000) {
            break;
        }
        assert!(Instant::now() < deadline, "no post-copy: {info:?}{}", dump(&ctx));
        thread::sleep(Duration::from_millis(100));
    }
    // Cut: host a loses its link to the segment (the guest on b keeps its own).
    bed.host("a").run_ip(&["link", "set", "uplink", "down"]).expect("cut host a's link");
    let cut_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = src.api().migration().expect("GET /vm/migration");
        if info.phase == MigrationPhase::PostcopyPaused {
            println!("the source noticed the break after {} ms", cut_at.elapsed().as_millis());
            break;
        }
        assert!(info.phase != MigrationPhase::Completed, "post-copy completed across a cut link: {info:?}");
        assert!(Instant::now() < deadline, "the source never noticed the cut: {info:?}{}", dump(&ctx));
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(2));
    assert!(src.try_wait().is_none() && dst.try_wait().is_none(), "a VMM ended during the break{}", dump(&ctx));
    bed.host("a").run_ip(&["link", "set", "uplink", "up"]).expect("restore host a's link");
    println!("link back after {} ms", cut_at.elapsed().as_millis());
    let info = wait_migration(&src, &ctx);
    print_postcopy("post-copy across a cut link", &info);
    assert_completed(&info, &ctx);
    let pc = info.postcopy.clone().expect("post-copy figures");
    assert!(pc.reconnects >= 1, "no reconnection counted: {pc:?}");
    assert_exits_cleanly(&src, &ctx);
    let after = more_dirty_passes(&bed, before.num("dirty_passes"), &ctx);
    println!("dirty passes {} before, {} after", before.num("dirty_passes"), after.num("dirty_passes"));
    assert_no_dirty_mismatch_on_console(&dst, &ctx);
}
