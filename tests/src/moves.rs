// SPDX-License-Identifier: Apache-2.0
//! Moving a guest between the hosts of a test bed: what the migration and takeover tests share.
//! Booting our guest on a host, starting a destination that waits for it, migrating through the
//! API and waiting for the end, and labelled dumps of every VM for a failing assertion.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::{MigrateRequest, MigrationInfo, MigrationPhase, VmState};

use crate::TestBed;
use crate::pki::{pki, tls_args};
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
/// How much longer than here the waits for a guest and a link's stall bound are inside the
/// nested host, where everything runs under QEMU's emulator on a shared machine (a migration
/// there can take minutes, and a thread can go unscheduled for seconds).
pub const NESTED_SLOWNESS: u32 = 6;

/// [`NESTED_SLOWNESS`] inside the nested host, else 1.
pub fn slowness() -> u32 {
    if crate::place::inside_nested_host() { NESTED_SLOWNESS } else { 1 }
}

/// How long to wait for the guest to answer or print something: [`GUEST_TIMEOUT`], longer
/// inside the nested host (there an emulated Linux guest's vCPU may get a fraction of a core
/// for minutes while the machine is busy).
pub fn guest_timeout() -> Duration {
    GUEST_TIMEOUT * slowness()
}

/// How long a migration may take: [`MIGRATION_TIMEOUT`], twice that inside the nested host (a
/// Linux guest's move there has been seen to take four minutes while the machine was busy).
pub fn migration_timeout() -> Duration {
    MIGRATION_TIMEOUT * slowness().min(2)
}

/// The stall bound given to migrations and destinations inside the nested host (the VMM's
/// default, 5 s, is for real links; under emulation 5 s without an acknowledgement happens).
pub fn nested_stall_ms() -> Option<u64> {
    crate::place::inside_nested_host().then_some(5000 * u64::from(NESTED_SLOWNESS))
}

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

/// The TLS directory of host `host` of `bed` (from the test PKI; it names the host's address).
pub fn host_tls_dir(bed: &TestBed, host: &str) -> std::path::PathBuf {
    match bed.host(host).ip() {
        Some(ip) => pki().host_dir(ip),
        None => pki().ca_dir().to_path_buf(),
    }
}

/// How a test's VMM on host `host` secures its migrations: mutual TLS with the host's identity
/// from the test PKI, except inside the nested host, where moves run `--insecure-plaintext`.
/// There QEMU's emulator runs AES-GCM at about 22 MB/s (`openssl speed -evp aes-128-gcm` in the
/// nested host: 22.6 MB/s, against 261 MB/s for a plain copy), so a Linux guest's move of
/// 358 MiB spent most of its 84 to 108 s encrypting and decrypting on the one emulated CPU it
/// shares with the guest. What runs there is about KVM (vCPU and VM state, the dirty log); the
/// TLS code does not depend on it and every move on this machine's KVM runs over TLS.
pub fn security_args(bed: &TestBed, host: &str) -> Vec<String> {
    if crate::place::inside_nested_host() {
        vec!["--insecure-plaintext".to_string()]
    } else {
        tls_args(&host_tls_dir(bed, host))
    }
}

/// Boots our guest kernel in host `host` with a NIC on its TAP and `ip=` for guest 0, and waits
/// for its ready line. It migrates as [`security_args`] says (TLS with the host's identity).
pub fn start_source(bed: &TestBed, host: &str, extra: &[&str], workload: &str) -> Vm {
    start_guest_env(bed, host, Guest::Ours, extra, workload, &[])
}

/// [`start_source`] with environment variables for the VMM (e.g. `VMM_FAULT_STOP_AT`).
pub fn start_source_env(bed: &TestBed, host: &str, extra: &[&str], workload: &str, env: &[(&str, &str)]) -> Vm {
    start_guest_env(bed, host, Guest::Ours, extra, workload, env)
}

/// [`start_source`] for either guest.
pub fn start_guest(bed: &TestBed, host: &str, guest: Guest, extra: &[&str], workload: &str) -> Vm {
    start_guest_env(bed, host, guest, extra, workload, &[])
}

/// [`start_guest`] with environment variables for the VMM.
pub fn start_guest_env(
    bed: &TestBed,
    host: &str,
    guest: Guest,
    extra: &[&str],
    workload: &str,
    env: &[(&str, &str)],
) -> Vm {
    let sock = api_sock_path(&format!("src-{host}"));
    let mut args = s(&["run", "--api-sock", sock.to_str().unwrap()]);
    args.extend(guest.boot_args());
    if !extra.contains(&"--tls-dir") && !extra.contains(&"--insecure-plaintext") {
        args.extend(security_args(bed, host));
    }
    if let Some(ms) = nested_stall_ms().filter(|_| !extra.contains(&"--stall-timeout-ms")) {
        args.extend(["--stall-timeout-ms".to_string(), ms.to_string()]);
    }
    args.extend(s(extra));
    args.extend(["--net".to_string(), format!("tap={},mac={GUEST_MAC}", bed.host(host).tap())]);
    args.extend(["--cmdline".to_string(), format!("{} {} {workload}", guest.cmdline(), bed.guest_ip_cmdline(0))]);
    let vm = Vm::start_env(Some(bed.host(host)), &args, env);
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

/// [`start_destination`] with more `vmm run` flags (`--no-announce`, `--no-tcp-kick`, another
/// `--tls-dir` or `--insecure-plaintext` instead of the host's identity from the test PKI).
pub fn start_destination_with(bed: &TestBed, host: &str, port: u16, extra: &[&str]) -> (Vm, String) {
    start_destination_env(bed, host, port, extra, &[])
}

/// [`start_destination_with`] with environment variables for the VMM.
pub fn start_destination_env(
    bed: &TestBed,
    host: &str,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vm, String) {
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
    if !extra.contains(&"--tls-dir") && !extra.contains(&"--insecure-plaintext") {
        args.extend(security_args(bed, host));
    }
    args.extend(s(extra));
    let vm = Vm::start_env(Some(bed.host(host)), &args, env);
    let listening = vm.log.wait_line(LISTEN_TIMEOUT, |l| l.contains("waiting for an incoming migration"));
    assert!(listening.is_some(), "the destination on host {host} does not listen{}", dump(&[("destination", &vm)]));
    let ip = bed.host(host).ip().expect("hosts have addresses");
    (vm, format!("{ip}:{port}"))
}

pub fn request(to: &str) -> MigrateRequest {
    MigrateRequest { stall_timeout_ms: nested_stall_ms(), ..MigrateRequest::to(to) }
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
    let deadline = Instant::now() + migration_timeout();
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
            migration_timeout().as_secs(),
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
    // A round at least: the stop-and-copy one, or post-copy's switch.
    assert!(info.bytes_sent > 0 && !info.rounds.is_empty(), "{info:?}");
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

/// The dirty workload's figures from one `status` answer of the guest's control port (the
/// typed view of [`crate::guest::GuestStatus`] that the migration checks use).
#[derive(Clone, Debug)]
pub struct GuestStatus {
    pub workload: String,
    pub uptime_ms: u64,
    pub dirty_passes: u64,
    pub dirty_mismatches: u64,
    /// Before the request went out and after the answer came back.
    pub asked: Instant,
    pub answered: Instant,
}

/// Reads a `STATUS ...` line (parsed as the guest module reads it) into the dirty workload's
/// figures; `None` unless every one of them is there.
pub fn parse_status(line: &str) -> Option<GuestStatus> {
    let now = Instant::now();
    let s = crate::guest::GuestStatus::parse(line, now, now)?;
    let num = |key: &str| s.fields.get(key).and_then(|v| v.parse().ok());
    Some(GuestStatus {
        workload: s.fields.get("workload")?.clone(),
        uptime_ms: num("uptime_ms")?,
        dirty_passes: num("dirty_passes")?,
        dirty_mismatches: num("dirty_mismatches")?,
        asked: now,
        answered: now,
    })
}

pub use crate::guest::exchange;

/// Asks the guest for `status` on its control port from the client, retrying until it answers
/// (right after a move the network may need a moment to learn where the guest is).
pub fn guest_status(bed: &TestBed, ctx: &[(&str, &Vm)]) -> GuestStatus {
    let deadline = Instant::now() + guest_timeout();
    loop {
        let asked = Instant::now();
        let answer = exchange(bed, CONTROL_PORT, "status\n");
        let answered = Instant::now();
        match answer.as_deref().map(parse_status) {
            Ok(Some(status)) => return GuestStatus { asked, answered, ..status },
            other => assert!(
                Instant::now() < deadline,
                "the guest does not answer `status` on {}:{CONTROL_PORT}: {other:?}{}",
                bed.guest_ip(0),
                dump(ctx)
            ),
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the guest's dirty workload completed more passes than `than`.
pub fn wait_more_passes(bed: &TestBed, than: u64, ctx: &[(&str, &Vm)]) -> GuestStatus {
    let deadline = Instant::now() + guest_timeout();
    loop {
        let st = guest_status(bed, ctx);
        assert_eq!(st.dirty_mismatches, 0, "the dirty workload found corrupted pages: {st:?}{}", dump(ctx));
        if st.dirty_passes > than {
            return st;
        }
        assert!(Instant::now() < deadline, "the dirty workload stopped at {} passes: {st:?}{}", than, dump(ctx));
        thread::sleep(Duration::from_millis(500));
    }
}

/// The `mismatches=` count of a `DIRTY pass=N mib=M ms=T mismatches=X` console line.
pub fn dirty_line_mismatches(line: &str) -> Option<u64> {
    line.split(' ').find_map(|f| f.strip_prefix("mismatches=")).and_then(|v| v.parse().ok())
}

/// The `pass=` number of a `DIRTY pass=N ...` console line.
pub fn dirty_line_pass(line: &str) -> Option<u64> {
    line.split(' ').find_map(|f| f.strip_prefix("pass=")).and_then(|v| v.parse().ok())
}

/// The VM's console shows the dirty workload's progress lines (a new one after `after_pass`),
/// all with `mismatches=0`, and no `DIRTY-MISMATCH` line.
pub fn assert_dirty_console(vm: &Vm, after_pass: u64, ctx: &[(&str, &Vm)]) -> u64 {
    let line = vm.console.wait_line(guest_timeout(), |l| {
        l.starts_with("DIRTY pass=") && dirty_line_pass(l).is_some_and(|p| p > after_pass)
    });
    assert!(line.is_some(), "no DIRTY line after pass {after_pass} on the console{}", dump(ctx));
    let text = vm.console.text();
    assert!(!text.contains("DIRTY-MISMATCH"), "the dirty workload found corrupted pages{}", dump(ctx));
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("DIRTY pass=")).collect();
    for l in &lines {
        // Our guest counts mismatches on each line; the Linux init only prints DIRTY-MISMATCH lines.
        assert!(dirty_line_mismatches(l).is_none_or(|m| m == 0), "line {l:?}{}", dump(ctx));
    }
    lines.iter().filter_map(|l| dirty_line_pass(l)).max().unwrap_or(0)
}

pub fn assert_state(vm: &Vm, want: VmState, ctx: &[(&str, &Vm)]) {
    match vm.api().get_vm() {
        Ok(info) => assert_eq!(info.state, want, "{info:?}{}", dump(ctx)),
        Err(e) => panic!("GET /vm failed: {e}{}", dump(ctx)),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn a_status_line_gives_the_dirty_figures_or_nothing() {
        let s = parse_status("STATUS workload=dirty cpus=2 uptime_ms=1500 dirty_passes=7 dirty_mismatches=0\n")
            .expect("a full status line");
        assert_eq!((s.workload.as_str(), s.uptime_ms, s.dirty_passes, s.dirty_mismatches), ("dirty", 1500, 7, 0));
        assert!(parse_status("STATUS workload=echo uptime_ms=3").is_none(), "figures missing");
        assert!(parse_status("STATUS workload=dirty uptime_ms=x dirty_passes=1 dirty_mismatches=0").is_none());
        assert!(parse_status("ERROR unknown command").is_none());
    }
}
