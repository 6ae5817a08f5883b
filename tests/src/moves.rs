// SPDX-License-Identifier: Apache-2.0
//! Moving a guest between the hosts of a test bed: what the migration and takeover tests share.
//! Booting our guest on a host, starting a destination that waits for it, migrating through the
//! API and waiting for the end, and labelled dumps of every VM for a failing assertion.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::{MigrateRequest, MigrationInfo, MigrationPhase};

use crate::TestBed;
use crate::vm::{Guest, Vm, api_sock_path};

/// A guest boots to its ready line within this, even on a loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Linux boots to its ready line within this, even in the nested host on a loaded machine.
pub const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// A destination prints its listening line within this.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a migration may take here (2 cores shared with other tests' VMs).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// A source VMM exits once its completed migration was read (or 10 s after it completed if no
/// one reads it); a failed destination exits at once.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest answers on the network within this (also right after a move).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// First port of the destinations (each host is a namespace of its own, so any port is free).
pub const MIGRATION_PORT: u16 = 7100;
/// The guest's echo service.
pub const ECHO_PORT: u16 = 7000;
/// The guest's control service (`status`, `ping`, `poweroff`).
pub const CONTROL_PORT: u16 = 7001;
/// The MAC of the guest [`start_source`] boots.
pub const GUEST_MAC: &str = "52:54:00:00:00:10";

/// A test bed with hosts `hosts` (each with an address) and a client named `client`.
pub fn bed_with(hosts: &[&str]) -> TestBed {
    let mut b = TestBed::builder();
    for h in hosts {
        b = b.host(h);
    }
    b.client("client").host_ips().build().expect("build the test bed")
}

/// Owned strings for an argument list.
pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Every VM's console and log, labelled, for a failing assertion's message.
pub fn dump(vms: &[(&str, &Vm)]) -> String {
    vms.iter().map(|(name, vm)| format!("\n===== {name} (pid {}) =====\n{}", vm.pid(), vm.describe())).collect()
}

/// Boots our guest kernel in host `host` with a NIC on its TAP and `ip=` for guest 0, and waits
/// for its ready line.
pub fn start_source(bed: &TestBed, host: &str, extra: &[&str], workload: &str) -> Vm {
    start_guest(bed, host, Guest::Ours, extra, workload)
}

/// [`start_source`] for either guest.
pub fn start_guest(bed: &TestBed, host: &str, guest: Guest, extra: &[&str], workload: &str) -> Vm {
    let sock = api_sock_path(&format!("src-{host}"));
    let mut args = s(&["run", "--api-sock", sock.to_str().unwrap()]);
    args.extend(guest.boot_args());
    args.extend(s(extra));
    args.extend(["--net".to_string(), format!("tap={},mac={GUEST_MAC}", bed.host(host).tap())]);
    args.extend(["--cmdline".to_string(), format!("{} {} {workload}", guest.cmdline(), bed.guest_ip_cmdline(0))]);
    let vm = Vm::start(Some(bed.host(host)), &args);
    let timeout = if guest == Guest::Linux { LINUX_BOOT_TIMEOUT } else { BOOT_TIMEOUT };
    let ready = vm.console.wait_line(timeout, |l| l.starts_with("GUEST-READY"));
    assert!(ready.is_some(), "the guest did not boot on host {host}{}", dump(&[("source", &vm)]));
    assert!(vm.wait_api(LISTEN_TIMEOUT), "the source's API does not answer{}", dump(&[("source", &vm)]));
    vm
}

/// Starts `vmm run --incoming 0.0.0.0:PORT` in host `host` with its TAP, and waits until it
/// listens. Returns it with the address the source must migrate to.
pub fn start_destination(bed: &TestBed, host: &str, port: u16) -> (Vm, String) {
    start_destination_with(bed, host, port, &[])
}

/// [`start_destination`] with more `vmm run` flags (`--no-announce`, `--no-tcp-kick`).
pub fn start_destination_with(bed: &TestBed, host: &str, port: u16, extra: &[&str]) -> (Vm, String) {
    let sock = api_sock_path(&format!("dst-{host}"));
    let mut args = vec![
        "run".to_string(),
        "--incoming".into(),
        format!("0.0.0.0:{port}"),
        "--api-sock".into(),
        sock.to_str().unwrap().to_string(),
        "--net".into(),
        format!("tap={}", bed.host(host).tap()),
    ];
    args.extend(s(extra));
    let vm = Vm::start(Some(bed.host(host)), &args);
    let listening = vm.log.wait_line(LISTEN_TIMEOUT, |l| l.contains("waiting for an incoming migration"));
    assert!(listening.is_some(), "the destination on host {host} does not listen{}", dump(&[("destination", &vm)]));
    let ip = bed.host(host).ip().expect("hosts have addresses");
    (vm, format!("{ip}:{port}"))
}

pub fn request(to: &str) -> MigrateRequest {
    MigrateRequest { to: to.to_string(), downtime_ms: None, max_bandwidth_mib_s: None, max_rounds: None }
}

/// The threads of process `pid` and where they are, for a hang's report: gdb's backtraces if
/// gdb is installed, else each thread's name and kernel wait channel.
pub fn thread_stacks(pid: u32) -> String {
    let gdb = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output();
    if let Ok(out) = gdb
        && out.status.success()
    {
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    let mut report = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        report.push_str(&format!("{:?} {} wchan={}\n", task.file_name(), read("comm").trim(), read("wchan")));
    }
    report
}

/// Polls the source's migration until it completed or failed. A source stuck with its guest
/// paused (stop-and-copy) for much longer than its own 30 s I/O timeouts is hung: its threads'
/// stacks go into the failure message.
pub fn wait_migration(src: &Vm, ctx: &[(&str, &Vm)]) -> MigrationInfo {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let mut last: Option<MigrationInfo> = None;
    let mut stopped_since = None;
    loop {
        match src.api().migration() {
            Ok(info) if matches!(info.phase, MigrationPhase::Completed | MigrationPhase::Failed) => return info,
            Ok(info) => {
                if info.phase == MigrationPhase::StopAndCopy {
                    let since = *stopped_since.get_or_insert_with(Instant::now);
                    assert!(
                        since.elapsed() < Duration::from_secs(90),
                        "the source has been in stop-and-copy (guest paused) for 90 s: {info:?}\n\
                         source threads:\n{}{}",
                        thread_stacks(src.pid()),
                        dump(ctx)
                    );
                }
                last = Some(info);
            }
            Err(e) => {
                assert!(src.try_wait().is_none(), "the source exited during the migration ({e}){}", dump(ctx));
            }
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end within {} s; last progress {last:?}\nsource threads:\n{}{}",
            MIGRATION_TIMEOUT.as_secs(),
            thread_stacks(src.pid()),
            dump(ctx)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a migration through the API and waits for its end.
pub fn migrate_api(src: &Vm, req: &MigrateRequest, ctx: &[(&str, &Vm)]) -> MigrationInfo {
    if let Err(e) = src.api().migrate(req) {
        panic!("PUT /vm/migrate {req:?} failed: {e}{}", dump(ctx));
    }
    wait_migration(src, ctx)
}

pub fn print_info(what: &str, info: &MigrationInfo) {
    println!(
        "{what}: {:?} in {} ms, downtime {:?} ms (source) / {:?} ms (destination), {} round(s), {} bytes \
         ({:.1} MiB) sent, {} pages sent, {} pages skipped",
        info.phase,
        info.total_ms,
        info.downtime_ms,
        info.downtime_destination_ms,
        info.round,
        info.bytes_sent,
        info.bytes_sent as f64 / f64::from(1 << 20),
        info.pages_sent,
        info.pages_skipped
    );
}

pub fn assert_completed(info: &MigrationInfo, ctx: &[(&str, &Vm)]) {
    assert_eq!(info.phase, MigrationPhase::Completed, "migration did not complete: {info:?}{}", dump(ctx));
    assert!(info.error.is_none(), "a completed migration with an error: {info:?}");
    assert!(info.bytes_sent > 0 && info.round >= 1, "{info:?}");
}

/// Moves the guest from `src` to a fresh destination in host `to` (extra `vmm run` flags
/// `extra`), checks that the migration completed and the old VMM exited cleanly, and returns
/// the destination, now the guest's VMM, with the migration's figures.
pub fn hop(bed: &TestBed, src: Vm, to: &str, port: u16, extra: &[&str], ctx: &[(&str, &Vm)]) -> (Vm, MigrationInfo) {
    let (dst, addr) = start_destination_with(bed, to, port, extra);
    let all = [ctx, &[("source", &src), ("destination", &dst)]].concat();
    let info = migrate_api(&src, &request(&addr), &all);
    print_info(&format!("migration to host {to}"), &info);
    assert_completed(&info, &all);
    assert_exits_cleanly(&src, &all);
    (dst, info)
}

/// The old source exits 0 once its completed migration was read.
pub fn assert_exits_cleanly(src: &Vm, ctx: &[(&str, &Vm)]) {
    let status = src.wait_timeout(EXIT_TIMEOUT);
    assert!(status.is_some(), "the source VMM did not exit after the migration{}", dump(ctx));
    assert!(status.unwrap().success(), "the source VMM exited with {status:?}{}", dump(ctx));
}
