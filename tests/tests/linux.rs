// SPDX-License-Identifier: Apache-2.0
//! Linux guests end to end: Linux 6.12 with our init (`resources/build/vmlinux` and
//! `initramfs.cpio`) gets the end-to-end tests our own guest has.
//!
//! - boots to its ready line with 1 and 2 vCPUs (keeping time with kvmclock) and powers off;
//! - the network from the client namespace: echo on several connections, ICMP, the control
//!   port, and 100 MB byte-exact through the echo service;
//! - live migration A→B→A of a 2-vCPU guest running the dirty workload and the CPU check (the
//!   init keeps known values in XMM/YMM, MXCSR and the x87 control word, and watches the TSC
//!   and `CLOCK_MONOTONIC`): no page lost, every register held, its clock goes forward, kvmclock
//!   stays its clock source;
//! - the address takeover: a client streaming through the echo service across A→B→A→B loses
//!   nothing, a new connection works after each move and after host A's TAP is deleted;
//! - the destination killed during pre-copy: the guest stays on the source, a second
//!   migration succeeds.
//! - an ext4 data disk on which the init appends checksummed records, each made durable with
//!   `fdatasync`, moves A→B→A with the guest, copied to a new file each time: after each move
//!   the guest reads its records back from the destination's disk (`O_DIRECT`) and finds every
//!   acknowledged one, correct; then the guest powers off, `e2fsck -fn` finds the image clean,
//!   and a fresh guest booted on it finds every record again;
//! - a snapshot of a 2-vCPU guest running the dirty workload and the CPU check, with an echo
//!   connection streaming, restored on the same TAP (`vmm run --restore`): no page lost, every
//!   register held, its clock goes on, the connection loses nothing; the same snapshot restored
//!   again into a VMM started ahead and waiting (`vmm restore`);
//! - post-copy (`--postcopy`) of such a guest dirtying 64 MiB as fast as it can, A→B, with an
//!   echo connection streaming: the same checks after the move.
//!
//! These need a KVM that runs guest kernel code natively. This binary has its own harness
//! (`harness = false`, [`vmm_tests::place::main`]), which runs them here on hardware KVM, and
//! on a KVM that emulates kernel code (this project's kvm_pvm machines) boots the nested host
//! (`resources/l1.sh`) once and runs itself there. Add tests to [`main`]'s list: a `#[test]`
//! attribute does nothing in this file.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::Trial;
use vmm::api::{MigrateRequest, MigrationMode, SnapshotPhase, VmState};
use vmm_tests::TestBed;
use vmm_tests::checks::{
    CpuCheck, DIRTY_64, Via, assert_clock_continues, assert_cpu_check, assert_echo, destination_killed_during_precopy,
    echo_exact, guest_echo_stream, move_dirty_guest, two_hosts, wait_echoes_resume,
};
use vmm_tests::client::{assert_intact, assert_new_connection, start_client, stop_client};
use vmm_tests::images::{Image, fsck};
use vmm_tests::moves::{
    CONTROL_PORT, ECHO_PORT, GUEST_TIMEOUT, GuestStatus, LINUX_BOOT_TIMEOUT, MIGRATION_PORT, assert_completed,
    assert_dirty_console, assert_exits_cleanly, assert_state, dump, exchange, guest_status, guest_timeout, hop,
    migrate_api, print_info, request, start_destination, start_guest, wait_more_passes,
};
use vmm_tests::snapshots::{SnapDir, restore_cli, snapshot_cli, start_restore, start_waiting};
use vmm_tests::vm::{Guest, LINUX_NATIVE_CMDLINE, Vm, ping};

fn main() -> ExitCode {
    // Inside the nested host, an emulated machine with faults of its own (see
    // `retrying_once_inside`), a failed test runs once more, loudly.
    let test = |name: &str, f: fn()| {
        let owned = name.to_string();
        Trial::test(name, move || {
            vmm_tests::place::retrying_once_inside(&owned, f);
            Ok(())
        })
    };
    vmm_tests::place::main(vec![
        test("linux_boots_to_the_ready_line_with_one_vcpu", || boots(1)),
        test("linux_boots_to_the_ready_line_with_two_vcpus", || boots(2)),
        test("linux_answers_echo_ping_and_control_from_the_client", answers_from_the_client),
        test("linux_echoes_100_megabytes_byte_exact", hundred_megabytes),
        test("linux_migrates_a_to_b_to_a_with_its_memory_registers_and_clock", migrates_back_and_forth),
        test("linux_keeps_its_connections_across_moves_and_a_deleted_tap", takeover),
        test("linux_stays_on_the_source_when_the_destination_dies_during_precopy", || {
            destination_killed_during_precopy(Guest::Linux)
        }),
        test("linux_keeps_every_fsynced_record_on_its_ext4_disk_across_moves", ext4_records_across_moves),
        test("linux_restores_from_a_snapshot_with_its_memory_registers_clock_and_connection", restores),
        test("linux_moves_by_postcopy_with_its_memory_registers_clock_and_connection", moves_by_postcopy),
    ])
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Linux with `vcpus` vCPUs to its ready line, then a clean poweroff; on the way it brought up
/// every vCPU and chose kvmclock.
fn boots(vcpus: u8) {
    let mut args = s(&["run", "--mem-mib", "256", "--vcpus", &vcpus.to_string()]);
    args.extend(Guest::Linux.boot_args());
    args.extend(["--cmdline".into(), format!("{LINUX_NATIVE_CMDLINE} vmm.workload=idle vmm.poweroff_after_ms=200")]);
    let vm = Vm::start(None, &args);
    let ready = vm.console.wait_line(LINUX_BOOT_TIMEOUT, |l| l.starts_with("GUEST-READY"));
    let ready = ready.unwrap_or_else(|| panic!("no ready line within {LINUX_BOOT_TIMEOUT:?}\n{}", vm.describe()));
    println!("{vcpus} vCPU(s): {ready} ({} ms after start)", vm.started.elapsed().as_millis());
    assert!(ready.contains("workload=idle") && ready.contains("kernel=linux"), "{ready}");
    let status = vm.wait_timeout(GUEST_TIMEOUT).unwrap_or_else(|| panic!("did not power off\n{}", vm.describe()));
    assert!(status.success(), "exit {status:?}\n{}", vm.describe());
    let console = vm.console.text();
    assert!(console.contains("GUEST-POWEROFF"), "{}", vm.describe());
    let cpus = format!("Brought up 1 node, {vcpus} CPU");
    assert!(console.contains(&cpus), "Linux did not bring up {vcpus} vCPU(s)\n{}", vm.describe());
    assert!(console.contains("Switched to clocksource kvm-clock"), "Linux did not choose kvmclock\n{}", vm.describe());
}

/// A test bed with host `a` and the client, and Linux with the echo workload on host a.
fn echo_guest() -> (TestBed, Vm) {
    let bed = TestBed::builder().host("a").client("client").build().expect("build the test bed");
    let vm = start_guest(&bed, "a", Guest::Linux, &["--mem-mib", "256"], "vmm.workload=echo");
    let addr = SocketAddr::from((bed.guest_ip(0), ECHO_PORT));
    if let Err(e) = bed.client().wait_for_tcp(addr, GUEST_TIMEOUT) {
        panic!("the echo service is not reachable: {e}\n{}", vm.describe());
    }
    (bed, vm)
}

fn answers_from_the_client() {
    let (bed, vm) = echo_guest();
    for n in 0..3 {
        let line = format!("line {n}\n");
        let back = exchange(&bed, ECHO_PORT, &line).unwrap_or_else(|e| panic!("echo: {e}\n{}", vm.describe()));
        assert_eq!(back, line, "{}", vm.describe());
    }
    let ip = bed.guest_ip(0);
    for _ in 0..3 {
        let rtt = bed.client().run_in(|| ping(ip, GUEST_TIMEOUT)).expect("enter the client namespace");
        let rtt = rtt.unwrap_or_else(|e| panic!("ping {ip}: {e}\n{}", vm.describe()));
        println!("ping {ip}: {rtt:?}");
    }
    let status = exchange(&bed, CONTROL_PORT, "status\n").unwrap_or_else(|e| panic!("status: {e}\n{}", vm.describe()));
    assert!(status.starts_with("STATUS workload=echo "), "status answered {status:?}\n{}", vm.describe());
}

fn hundred_megabytes() {
    const TOTAL: usize = 100_000_000;
    let (bed, vm) = echo_guest();
    let elapsed = echo_exact(&bed, 0, TOTAL, &vm);
    println!("Linux echo: {TOTAL} bytes each way in {elapsed:.2?} (informational)");
}

/// A→B (API) and back B→A (`vmm migrate --json`), 2 vCPUs, dirty workload and CPU check.
fn migrates_back_and_forth() {
    let bed = two_hosts();
    let workload = format!("{DIRTY_64} vmm.cpu_check=1");
    let mut vm = start_guest(&bed, "a", Guest::Linux, &["--mem-mib", "256", "--vcpus", "2"], &workload);
    assert_dirty_console(&vm, 0, &[("source", &vm)]);
    let mut check = assert_cpu_check(&vm, 0, &[("source", &vm)]);
    println!("before the moves: {check:?}");
    for (i, (to, via)) in [("b", Via::Api), ("a", Via::CliJson)].into_iter().enumerate() {
        let what = format!("Linux migration {} to host {to} ({via:?})", i + 1);
        vm = move_dirty_guest(&bed, vm, to, MIGRATION_PORT + i as u16, via, &what).0;
        // The check's counter goes on from where it was: its thread and registers moved.
        check = assert_cpu_check(&vm, check.rounds, &[("guest", &vm)]);
        println!("{what}: {check:?}");
        assert_quiet_kernel(&vm, "the move", &[("guest", &vm)]);
    }
}

/// The guest's kernel complained of nothing a move or a restore could cause: no oops, no
/// clock source marked unstable, no soft lockup.
fn assert_quiet_kernel(vm: &Vm, after: &str, ctx: &[(&str, &Vm)]) {
    let console = vm.console.text();
    for bad in ["Call Trace", "Marking clocksource", "soft lockup"] {
        assert!(!console.contains(bad), "{bad:?} on the console after {after}{}", dump(ctx));
    }
}

/// The dirty workload over 64 MiB at 64 MiB/s and the CPU check, on 2 vCPUs: the guest the
/// snapshot and post-copy tests move.
fn dirty_checked_guest(bed: &TestBed, dirty: &str) -> (Vm, CpuCheck) {
    let workload = format!("{dirty} vmm.cpu_check=1");
    let vm = start_guest(bed, "a", Guest::Linux, &["--mem-mib", "256", "--vcpus", "2"], &workload);
    assert_dirty_console(&vm, 0, &[("source", &vm)]);
    let check = assert_cpu_check(&vm, 0, &[("source", &vm)]);
    (vm, check)
}

/// After a restore or a move: the clock went on, the dirty workload goes on without a bad page,
/// the CPU check's thread and registers came along, the kernel complained of nothing.
fn assert_guest_went_on(bed: &TestBed, vm: &Vm, before: &GuestStatus, check_rounds: u64, what: &str) -> CpuCheck {
    let ctx = [(what, vm)];
    let after = guest_status(bed, &ctx);
    assert_eq!(after.dirty_mismatches, 0, "the dirty workload found corrupted pages: {after:?}{}", dump(&ctx));
    assert_clock_continues(before, &after, &ctx);
    let later = wait_more_passes(bed, after.dirty_passes, &ctx);
    assert_dirty_console(vm, 0, &ctx);
    let check = assert_cpu_check(vm, check_rounds, &ctx);
    assert_quiet_kernel(vm, what, &ctx);
    println!("{what}: dirty passes {} before, {} after; {check:?}", before.dirty_passes, later.dirty_passes);
    check
}

/// A snapshot (`vmm snapshot`: the guest stays paused; its VMM is then killed) restored on the
/// same TAP with `vmm run --restore`: the guest goes on, and the echo connection the client
/// kept open through it loses nothing. Then the same snapshot into a waiting VMM.
fn restores() {
    let bed = TestBed::builder().host("a").client("client").build().expect("build the test bed");
    let (src, check) = dirty_checked_guest(&bed, DIRTY_64);
    let stream = guest_echo_stream(&bed, 20, &[("source", &src)]);
    let dir = SnapDir::new("linux");
    let before = guest_status(&bed, &[("source", &src)]);
    let info = snapshot_cli(&src, dir.path(), &[]).unwrap_or_else(|e| panic!("{e}{}", dump(&[("source", &src)])));
    println!("snapshot: {info:?}");
    assert_eq!(info.phase, SnapshotPhase::Completed, "{info:?}");
    src.kill();
    let sent_before = stream.stats().sent;

    let (vm, _) = start_restore(&bed, "a", dir.path(), &[]);
    wait_echoes_resume(&stream, sent_before, &[("restored", &vm)]);
    assert_guest_went_on(&bed, &vm, &before, check.rounds, "the restore");
    let stats = stream.finish();
    println!("echo stream: {stats:?}");
    assert!(stats.intact(), "lines were lost or the connection broke: {stats:?}{}", dump(&[("restored", &vm)]));
    vm.kill();

    // Again from the same snapshot, into a VMM that waited for it with memory ready. Its
    // guest starts from the snapshot's moment again: its clock goes on from there.
    let tap = format!("tap={}", bed.host("a").tap());
    let waiting = start_waiting(&bed, "a", &["--net", &tap, "--await-mem-mib", "256"]);
    let info = restore_cli(&waiting, dir.path()).unwrap_or_else(|e| panic!("{e}{}", dump(&[("waiting", &waiting)])));
    println!("restore into a waiting VMM: {info:?}");
    assert_guest_went_on(&bed, &waiting, &before, check.rounds, "the second restore");
    assert_echo(&bed, &[("restored again", &waiting)]);
}

/// `--postcopy` of a guest dirtying 64 MiB as fast as it can, A→B, with an echo connection
/// streaming through the move.
fn moves_by_postcopy() {
    let bed = two_hosts();
    let (src, check) = dirty_checked_guest(&bed, "vmm.workload=dirty vmm.dirty_mib=64 vmm.dirty_rate=0");
    let stream = guest_echo_stream(&bed, 10, &[("source", &src)]);
    let (dst, addr) = start_destination(&bed, "b", MIGRATION_PORT);
    let ctx = [("source", &src), ("destination", &dst)];
    let before = guest_status(&bed, &ctx);
    let req = MigrateRequest { mode: Some(MigrationMode::Postcopy), ..request(&addr) };
    let info = migrate_api(&src, &req, &ctx);
    print_info("Linux post-copy to host b", &info);
    assert_completed(&info, &ctx);
    let pc = info.postcopy.clone().unwrap_or_else(|| panic!("the migration did not switch to post-copy: {info:?}"));
    println!("post-copy: {pc:?}");
    assert!(pc.pages_needed > 0, "nothing was left for post-copy: {pc:?}");
    assert!(pc.faults.is_some() && pc.duration_ms.is_some(), "no figures from the destination: {pc:?}");
    assert_exits_cleanly(&src, &ctx);
    assert_state(&dst, VmState::Running, &ctx);
    assert_guest_went_on(&bed, &dst, &before, check.rounds, "post-copy");
    let stats = stream.finish();
    println!("echo stream: {stats:?}");
    assert!(stats.intact(), "the echo stream lost lines or broke: {stats:?}{}", dump(&[("destination", &dst)]));
}

/// A client streams through the echo service while the guest moves A→B→A→B; a new connection
/// works after each move; then host A's TAP goes and nothing changes for the client.
fn takeover() {
    let bed = TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("test bed");
    let on_a = start_guest(&bed, "a", Guest::Linux, &["--mem-mib", "256"], "vmm.workload=echo");
    let client = start_client(&bed, &[("guest on a", &on_a)]);
    thread::sleep(Duration::from_secs(1));
    let mut vm = on_a;
    for (i, to) in ["b", "a", "b"].into_iter().enumerate() {
        let (next, info) = hop(&bed, vm, to, MIGRATION_PORT + i as u16, &[], &[("client", &client)]);
        vm = next;
        println!("move {} to host {to}: downtime {:?} µs (source's view)", i + 1, info.downtime_us);
        assert_new_connection(&bed, &format!("the move to host {to}"), &[("guest", &vm), ("client", &client)]);
        thread::sleep(Duration::from_secs(1));
    }
    bed.remove_tap("a").expect("delete host a's TAP");
    let ctx = [("guest on b", &vm), ("client", &client)];
    assert_new_connection(&bed, "host a's TAP was deleted", &ctx);
    thread::sleep(Duration::from_secs(1));
    let report = stop_client(&client, &ctx);
    // 5 s of streaming at 10 ms a line, with room for a slow machine.
    assert_intact(&report, 100, &ctx);
}

/// What the guest's `records` command answered: records acknowledged (durable), and the good
/// and bad ones it read back from its disk at that moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Records {
    acked: u64,
    found: u64,
    bad: u64,
}

fn parse_records(line: &str) -> Option<Records> {
    let mut words = line.split_ascii_whitespace();
    if words.next()? != "RECORDS" {
        return None;
    }
    let mut field = |key: &str| words.next()?.strip_prefix(key)?.strip_prefix('=')?.parse().ok();
    Some(Records { acked: field("acked")?, found: field("found")?, bad: field("bad")? })
}

/// Asks the guest to read its records back from the disk until it has acknowledged more than
/// `than`; every answer must show every acknowledged record there and correct, and no bad one.
/// Returns the last answer.
fn wait_records(bed: &TestBed, than: u64, ctx: &[(&str, &Vm)]) -> Records {
    let deadline = Instant::now() + guest_timeout();
    let mut last = None;
    loop {
        // Right after a move the network may need a moment to learn where the guest is.
        let answer = exchange(bed, CONTROL_PORT, "records\n");
        if let Some(r) = answer.as_deref().ok().and_then(parse_records) {
            assert!(
                r.found == r.acked && r.bad == 0,
                "the records on the disk are not the acknowledged ones: {r:?}{}",
                dump(ctx)
            );
            assert!(r.acked >= last.map_or(0, |l: Records| l.acked), "fewer records acknowledged than before: {r:?}");
            if r.acked > than {
                return r;
            }
            last = Some(r);
        }
        assert!(
            Instant::now() < deadline,
            "the guest acknowledged no record after {than}: last answer {answer:?}, {last:?}{}",
            dump(ctx)
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// The guest's console shows no file system or block layer trouble, and the init no failed
/// append (`disk: ...`). (Not "Call Trace": under the nested host's emulated CPU, Linux warns
/// about the XSAVE sizes CPUID reports while it boots.)
fn assert_no_disk_errors(vm: &Vm, what: &str) {
    let console = vm.console.text();
    for bad in ["EXT4-fs error", "EXT4-fs warning", "I/O error", "JBD2: ", "disk: "] {
        assert!(!console.contains(bad), "{bad:?} on the console {what}{}", dump(&[("guest", vm)]));
    }
}

/// The ext4 data disk with fsync'd records, copied A→B→A with the guest; then a clean file
/// system and every record found by a fresh guest.
fn ext4_records_across_moves() {
    let bed = two_hosts();
    // Small and sparse: only what mkfs and the records wrote is copied.
    let on_a = Image::ext4("ext4-a", 64 << 20);
    let (on_b, back_on_a) = (Image::future("ext4-b"), Image::future("ext4-a2"));
    let disk = on_a.arg("");
    // 20 records a second: each is a data block and a journal commit on the disk.
    let workload = "vmm.workload=disk vmm.disk_rate=20";
    let mut vm = start_guest(&bed, "a", Guest::Linux, &["--mem-mib", "128", "--disk", &disk], workload);
    let first = vm.console.wait_line(GUEST_TIMEOUT, |l| l.starts_with("DISK-RECORDS"));
    assert_eq!(first.as_deref(), Some("DISK-RECORDS found=0 bad=0"), "{}", dump(&[("guest", &vm)]));
    let mut records = wait_records(&bed, 20, &[("guest", &vm)]);
    println!("on host a, {} ms after start: {records:?} (informational)", vm.started.elapsed().as_millis());
    assert_no_disk_errors(&vm, "on host a");
    for (i, (to, image)) in [("b", &on_b), ("a", &back_on_a)].into_iter().enumerate() {
        let before = records.acked;
        let (next, info) = hop(&bed, vm, to, MIGRATION_PORT + i as u16, &["--disk", &image.arg("")], &[]);
        vm = next;
        println!("move {} to host {to}: {} bytes of disk data sent", i + 1, info.disk_bytes_sent);
        assert!(info.disk_bytes_sent > 0, "the disk was not copied: {info:?}");
        let config = vm.api().get_vm().expect("GET /vm").config;
        assert_eq!(config.disks[0].path, image.0, "the guest runs on the new copy");
        // Read back from the copy: every record acknowledged before the move, and the
        // workload goes on appending to it.
        records = wait_records(&bed, before, &[("guest", &vm)]);
        println!("after move {}: {records:?}", i + 1);
        assert_no_disk_errors(&vm, &format!("after the move to host {to}"));
    }

    // The guest closes the file, unmounts /data and powers off.
    let answer = exchange(&bed, CONTROL_PORT, "poweroff\n").unwrap_or_else(|e| panic!("poweroff: {e}"));
    assert_eq!(answer, "OK\n", "{}", dump(&[("guest", &vm)]));
    let status = vm.wait_timeout(guest_timeout());
    assert!(status.is_some_and(|s| s.success()), "the guest did not power off: {status:?}{}", dump(&[("guest", &vm)]));
    assert_no_disk_errors(&vm, "at poweroff");
    match fsck(&back_on_a.0) {
        Ok(report) => println!("{}", report.trim()),
        Err(e) => panic!("the final image is not clean: {e}"),
    }

    // A fresh guest on the final image finds every record it acknowledged, and adds none.
    let mut args = s(&["run", "--mem-mib", "128", "--disk", &back_on_a.arg("")]);
    args.extend(Guest::Linux.boot_args());
    args.extend([
        "--cmdline".into(),
        format!("{LINUX_NATIVE_CMDLINE} vmm.workload=disk vmm.disk_passes=1 vmm.poweroff_after_ms=0"),
    ]);
    let fresh = Vm::start(None, &args);
    let line = fresh.console.wait_line(LINUX_BOOT_TIMEOUT, |l| l.starts_with("DISK-RECORDS"));
    let line = line.unwrap_or_else(|| panic!("no DISK-RECORDS line{}", dump(&[("fresh guest", &fresh)])));
    println!(
        "fresh guest on the final image, {} ms after start: {line} (at least {} acknowledged)",
        fresh.started.elapsed().as_millis(),
        records.acked
    );
    let found = line.strip_prefix("DISK-RECORDS found=").and_then(|l| l.strip_suffix(" bad=0"));
    let found: u64 = found.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad records: {line}"));
    assert!(found >= records.acked, "{line}: {} records were acknowledged", records.acked);
    let status = fresh.wait_timeout(guest_timeout());
    assert!(
        status.is_some_and(|s| s.success()),
        "the fresh guest did not power off: {status:?}{}",
        dump(&[("fresh guest", &fresh)])
    );
    assert_no_disk_errors(&fresh, "of the fresh guest");
}
