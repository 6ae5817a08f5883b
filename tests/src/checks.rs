// SPDX-License-Identifier: Apache-2.0
//! What a migration must keep, checked from outside the guest: its control port's `status`
//! (workload, uptime, dirty passes and mismatches), its echo service, its clock, the dirty
//! workload's console lines, the VM's state; and moving a dirty-workload guest with every
//! check after the move. Shared by the migration tests of both guests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::{MigrateRequest, MigrationInfo, MigrationPhase, VmState};

use crate::TestBed;
use crate::echo_stream::EchoStream;
use crate::guest::{GuestStatus as ControlStatus, exchange, status};
use crate::moves::{
    ECHO_PORT, GuestStatus, MIGRATION_PORT, assert_completed, assert_dirty_console, assert_exits_cleanly, assert_state,
    dump, guest_status, guest_timeout, migrate_api, migration_timeout, nested_stall_ms, print_info, request,
    start_destination, start_guest, wait_migration, wait_more_passes,
};
use crate::vm::{Guest, Vm, vmm_bin};

/// Runs `vmm migrate --api-sock SRC --to TO [extra]` (which polls until the end and prints a
/// summary, or JSON with `--json`); returns its exit success, stdout and stderr.
pub fn migrate_cli(src: &Vm, to: &str, extra: &[&str], ctx: &[(&str, &Vm)]) -> (bool, String, String) {
    let sock: PathBuf = src.api_sock.clone().expect("the source has an API socket");
    let mut child = Command::new(vmm_bin())
        .args(["migrate", "--api-sock", sock.to_str().unwrap(), "--to", to])
        .args(extra)
        .args(nested_stall_args(extra))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm migrate");
    let deadline = Instant::now() + migration_timeout();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vmm migrate") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`vmm migrate --to {to}` did not end within {} s{}", migration_timeout().as_secs(), dump(ctx));
        }
        thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().expect("piped").read_to_string(&mut out).expect("read vmm migrate's stdout");
    child.stderr.take().expect("piped").read_to_string(&mut err).expect("read vmm migrate's stderr");
    (status.success(), out, err)
}

/// `--stall-timeout-ms` for `vmm migrate` inside the nested host, unless `extra` has one.
fn nested_stall_args(extra: &[&str]) -> Vec<String> {
    match nested_stall_ms() {
        Some(ms) if !extra.contains(&"--stall-timeout-ms") => vec!["--stall-timeout-ms".into(), ms.to_string()],
        _ => Vec::new(),
    }
}

/// The guest's echo server on port 7000 answers a line with the same line.
pub fn assert_echo(bed: &TestBed, ctx: &[(&str, &Vm)]) {
    let deadline = Instant::now() + guest_timeout();
    loop {
        match exchange(bed, ECHO_PORT, "still here\n") {
            Ok(line) if line == "still here\n" => return,
            other => assert!(Instant::now() < deadline, "the echo server does not answer: {other:?}{}", dump(ctx)),
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// An echo connection from the bed's client to guest 0, streaming a line every 10 ms, once its
/// first `first` lines came back.
pub fn guest_echo_stream(bed: &TestBed, first: u64, ctx: &[(&str, &Vm)]) -> EchoStream {
    let guest = bed.guest_ip(0);
    let conn = bed
        .client()
        .run_in(move || TcpStream::connect_timeout(&(guest, ECHO_PORT).into(), Duration::from_secs(5)))
        .expect("enter the client")
        .unwrap_or_else(|e| panic!("connect to the echo service: {e}{}", dump(ctx)));
    let stream = EchoStream::start(conn, Duration::from_millis(10)).expect("start the echo stream");
    let deadline = Instant::now() + guest_timeout();
    while stream.stats().echoed < first {
        assert!(Instant::now() < deadline, "no echoes: {:?}{}", stream.stats(), dump(ctx));
        thread::sleep(Duration::from_millis(20));
    }
    stream
}

/// Waits until what the client sent before a move or a restore (`sent_before` lines) and 50
/// more came back on the same connection.
pub fn wait_echoes_resume(stream: &EchoStream, sent_before: u64, ctx: &[(&str, &Vm)]) {
    let deadline = Instant::now() + guest_timeout();
    while stream.stats().echoed < sent_before + 50 {
        let st = stream.stats();
        assert!(st.errors.is_empty(), "the echo connection broke: {st:?}{}", dump(ctx));
        assert!(Instant::now() < deadline, "the echo connection did not resume: {st:?}{}", dump(ctx));
        thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's clock went on across a move: later than `before`, and by no more than the wall
/// time that passed (plus a second for the two readings' own delays).
pub fn assert_clock_continues(before: &GuestStatus, after: &GuestStatus, ctx: &[(&str, &Vm)]) {
    let wall = after.answered.duration_since(before.asked).as_millis() as u64;
    assert!(after.uptime_ms > before.uptime_ms, "the guest's uptime went back: {before:?} -> {after:?}{}", dump(ctx));
    let jump = after.uptime_ms - before.uptime_ms;
    assert!(
        jump <= wall + 1000,
        "the guest's uptime jumped by {jump} ms in {wall} ms of wall time: {before:?} -> {after:?}{}",
        dump(ctx)
    );
    println!("guest uptime {} -> {} ms (+{jump} ms in {wall} ms of wall time)", before.uptime_ms, after.uptime_ms);
}

/// How a test moves the guest.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Api,
    /// `vmm migrate --json`, whose output is the final `MigrationInfo`.
    CliJson,
    /// `vmm migrate`, which prints a summary for people.
    Cli,
}

/// Moves the dirty-workload guest running in `src` to a fresh destination in host `to`, checks
/// everything a move must keep, and returns the destination (now the guest's VMM) with the
/// migration's figures (none from the plain CLI, whose summary is printed instead).
pub fn move_dirty_guest(
    bed: &TestBed,
    src: Vm,
    to: &str,
    port: u16,
    via: Via,
    what: &str,
) -> (Vm, Option<MigrationInfo>) {
    let (dst, addr) = start_destination(bed, to, port);
    let ctx = [("source", &src), ("destination", &dst)];
    let before = guest_status(bed, &ctx);
    assert_eq!(before.dirty_mismatches, 0, "{before:?}{}", dump(&ctx));
    let info = match via {
        Via::Api => Some(migrate_api(&src, &request(&addr), &ctx)),
        Via::CliJson => {
            let (ok, out, err) = migrate_cli(&src, &addr, &["--json"], &ctx);
            assert!(ok, "`vmm migrate --json` failed\n{out}\n{err}{}", dump(&ctx));
            Some(serde_json::from_str(&out).unwrap_or_else(|e| panic!("`vmm migrate --json` printed {out:?}: {e}")))
        }
        Via::Cli => {
            let (ok, out, err) = migrate_cli(&src, &addr, &[], &ctx);
            println!("{what}: `vmm migrate` printed:\n{out}{err}");
            assert!(ok, "`vmm migrate` failed\n{out}\n{err}{}", dump(&ctx));
            assert!(out.contains(&format!("migration to {addr}: completed")), "{out}");
            for row in ["total time", "downtime (source)", "downtime (destination)", "rounds", "bytes sent"] {
                assert!(out.contains(row), "no {row:?} in the summary:\n{out}");
            }
            None
        }
    };
    if let Some(info) = &info {
        print_info(what, info);
        assert_completed(info, &ctx);
    }
    assert_exits_cleanly(&src, &ctx);
    assert_state(&dst, VmState::Running, &ctx);

    let after = guest_status(bed, &ctx);
    assert_eq!(after.workload, "dirty", "{after:?}");
    assert_eq!(after.dirty_mismatches, 0, "the dirty workload found corrupted pages: {after:?}{}", dump(&ctx));
    assert_clock_continues(&before, &after, &ctx);
    assert!(after.dirty_passes >= before.dirty_passes, "{before:?} -> {after:?}{}", dump(&ctx));
    let later = wait_more_passes(bed, after.dirty_passes, &ctx);
    assert_dirty_console(&dst, 0, &ctx);
    println!(
        "{what}: dirty passes {} before, {} after, {} later",
        before.dirty_passes, after.dirty_passes, later.dirty_passes
    );
    (dst, info)
}

/// The dirty workload over 64 MiB at 64 MiB/s.
pub const DIRTY_64: &str = "vmm.workload=dirty vmm.dirty_mib=64 vmm.dirty_rate=64";

/// Hosts a and b with addresses (the migration connection runs between them) and a client.
pub fn two_hosts() -> TestBed {
    TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build the test bed")
}

/// The destination is killed while pre-copy runs: the guest keeps running on the source with its
/// memory intact, and a second migration then succeeds. The echo workload's footprint is about
/// 250 KiB, which even the slowest cap (1 MiB/s) copies in a quarter of a second, so the guest
/// dirties 64 MiB instead and the copy is capped at 8 MiB/s: round 1 alone takes about 8 s.
pub fn destination_killed_during_precopy(guest: Guest) {
    let bed = two_hosts();
    let src = start_guest(&bed, "a", guest, &["--mem-mib", "512"], DIRTY_64);
    let (dst, addr) = start_destination(&bed, "b", MIGRATION_PORT);
    let ctx = [("source", &src), ("destination", &dst)];
    let last_pass = assert_dirty_console(&src, 0, &ctx);
    let req = MigrateRequest { max_bandwidth_mib_s: Some(8), ..request(&addr) };
    src.api().migrate(&req).unwrap_or_else(|e| panic!("PUT /vm/migrate: {e}{}", dump(&ctx)));
    let started = Instant::now();
    let deadline = started + migration_timeout();
    let mut info = src.api().migration().expect("GET /vm/migration");
    while info.phase == MigrationPhase::Setup || started.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "the migration did not get to pre-copy: {info:?}{}", dump(&ctx));
        thread::sleep(Duration::from_millis(50));
        info = src.api().migration().expect("GET /vm/migration");
    }
    println!("after {} ms: {info:?}", started.elapsed().as_millis());
    assert_eq!(info.phase, MigrationPhase::Precopy, "expected pre-copy after a second at 8 MiB/s{}", dump(&ctx));
    assert_state(&src, VmState::Migrating, &ctx);
    dst.kill();
    let info = wait_migration(&src, &ctx);
    print_info("migration to a killed destination", &info);
    println!("error: {:?}", info.error);
    assert_eq!(info.phase, MigrationPhase::Failed, "{info:?}{}", dump(&ctx));
    assert!(info.error.as_deref().is_some_and(|e| !e.is_empty()), "a failure without a reason: {info:?}");
    assert!(src.try_wait().is_none(), "the source exited{}", dump(&ctx));
    assert_state(&src, VmState::Running, &ctx);
    let st = guest_status(&bed, &ctx);
    assert_eq!((st.workload.as_str(), st.dirty_mismatches), ("dirty", 0), "{st:?}{}", dump(&ctx));
    wait_more_passes(&bed, st.dirty_passes, &ctx);
    assert_dirty_console(&src, last_pass, &ctx);

    // Nothing of the failed attempt sticks (dirty logging, throttling, paused devices): the
    // next migration works and the guest's memory arrives intact.
    move_dirty_guest(&bed, src, "b", MIGRATION_PORT + 1, Via::Api, "second attempt to host b");
}

/// The fields of the last `CPU-CHECK ...` line the guest printed (see the Linux init's
/// `cpucheck.rs`): the check's rounds, its mismatch counts and the clock source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuCheck {
    pub rounds: u64,
    pub mismatches: u64,
    pub tsc_backwards: u64,
    pub clock_backwards: u64,
    pub clocksource: String,
    pub avx: bool,
}

/// Parses a `CPU-CHECK rounds=N mismatches=M tsc_backwards=T clock_backwards=C clocksource=S
/// avx=A cpu=K` line.
pub fn parse_cpu_check(line: &str) -> Option<CpuCheck> {
    let rest = line.strip_prefix("CPU-CHECK ")?;
    let field = |name: &str| rest.split(' ').find_map(|f| f.strip_prefix(name)?.strip_prefix('='));
    let num = |name: &str| field(name)?.parse::<u64>().ok();
    Some(CpuCheck {
        rounds: num("rounds")?,
        mismatches: num("mismatches")?,
        tsc_backwards: num("tsc_backwards")?,
        clock_backwards: num("clock_backwards")?,
        clocksource: field("clocksource")?.to_string(),
        avx: field("avx")? == "1",
    })
}

/// Waits for a `CPU-CHECK` line on `vm`'s console with more rounds than `after`, and checks that
/// every register, the TSC and the clock held (no `CPU-CHECK-MISMATCH` line, all counts 0) and
/// that the guest keeps time with kvmclock. Returns that line's figures.
pub fn assert_cpu_check(vm: &Vm, after: u64, ctx: &[(&str, &Vm)]) -> CpuCheck {
    let line = vm.console.wait_line(guest_timeout(), |l| parse_cpu_check(l).is_some_and(|c| c.rounds > after));
    let line = line.unwrap_or_else(|| panic!("no CPU-CHECK line after round {after} on the console{}", dump(ctx)));
    let mismatches = vm.console.lines(|l| l.starts_with("CPU-CHECK-MISMATCH"));
    assert!(mismatches.is_empty(), "the guest's registers or clocks did not hold: {mismatches:?}{}", dump(ctx));
    let check = parse_cpu_check(&line).expect("matched above");
    let clean =
        CpuCheck { rounds: check.rounds, clocksource: "kvm-clock".into(), avx: check.avx, ..Default::default() };
    assert_eq!(check, clean, "{line}{}", dump(ctx));
    check
}

/// A deterministic pseudo-random byte stream (xorshift64), filled block by block.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Sizes of the blocks a stream of `total` bytes is cut into: writer and reader generate the
/// same blocks, so a short last block does not shift the pattern.
fn blocks(total: usize, block: usize) -> impl Iterator<Item = usize> {
    (0..total.div_ceil(block)).map(move |k| block.min(total - k * block))
}

/// Sends `total` pseudo-random bytes through guest `i`'s echo service from the client while
/// reading the echo, checks every byte and that the guest closes after the last one; returns
/// the time it took. Panics with the VM's output on any difference.
pub fn echo_exact(bed: &TestBed, i: u8, total: usize, vm: &Vm) -> Duration {
    const BLOCK: usize = 64 << 10;
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    const TIMEOUT: Duration = Duration::from_secs(60);
    let addr = SocketAddr::from((bed.guest_ip(i), ECHO_PORT));
    // The socket is made inside the client namespace; the threads using it need not be there.
    let mut reader = bed
        .client()
        .run_in(|| TcpStream::connect_timeout(&addr, TIMEOUT))
        .expect("enter the client namespace")
        .and_then(|s| {
            s.set_read_timeout(Some(TIMEOUT))?;
            s.set_write_timeout(Some(TIMEOUT))?;
            Ok(s)
        })
        .unwrap_or_else(|e| panic!("connect {addr}: {e}\n{}", vm.describe()));
    let mut writer = reader.try_clone().expect("clone the socket for the writer");

    let start = Instant::now();
    let writing = thread::spawn(move || -> std::io::Result<()> {
        let mut rng = XorShift(SEED);
        let mut buf = vec![0u8; BLOCK];
        for len in blocks(total, BLOCK) {
            rng.fill(&mut buf[..len]);
            writer.write_all(&buf[..len])?;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });

    let mut rng = XorShift(SEED);
    let (mut expected, mut got) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut offset = 0usize;
    for len in blocks(total, BLOCK) {
        rng.fill(&mut expected[..len]);
        if let Err(e) = reader.read_exact(&mut got[..len]) {
            panic!("reading the echo at byte {offset} of {total}: {e}\n{}\n{}", guest_probe(bed, i), vm.describe());
        }
        if let Some(i) = expected[..len].iter().zip(&got[..len]).position(|(a, b)| a != b) {
            panic!(
                "echoed data differs at byte {}: expected {:#04x}, got {:#04x}\n{}",
                offset + i,
                expected[i],
                got[i],
                vm.describe()
            );
        }
        offset += len;
    }
    let elapsed = start.elapsed();
    writing.join().expect("writer thread").unwrap_or_else(|e| panic!("writing: {e}\n{}", vm.describe()));

    // The guest closes once it echoed everything: nothing more may come.
    let mut extra = Vec::new();
    let n = reader.read_to_end(&mut extra).unwrap_or_else(|e| panic!("reading to EOF: {e}\n{}", vm.describe()));
    assert_eq!(n, 0, "{n} bytes more than were sent\n{}", vm.describe());
    elapsed
}

/// After a stream stalled: does guest `i` still answer a ping and a new echo connection? (Both
/// go through the same NIC: if they work, the device and the guest are alive and the stall is
/// the stream's own.)
fn guest_probe(bed: &TestBed, i: u8) -> String {
    let ip = bed.guest_ip(i);
    let ping = bed.client().run_in(|| crate::vm::ping(ip, Duration::from_secs(3)));
    let echo = if i == 0 { Some(exchange(bed, ECHO_PORT, "probe\n")) } else { None };
    format!("--- probe after the stall ---\nping: {ping:?}\nnew echo connection: {echo:?}")
}

/// Waits until the dirty workload has done more passes than `than` (asked on its control port),
/// with no mismatch found.
pub fn more_dirty_passes(bed: &TestBed, than: u64, ctx: &[(&str, &Vm)]) -> ControlStatus {
    let deadline = Instant::now() + guest_timeout();
    loop {
        let st = status(bed, guest_timeout()).unwrap_or_else(|e| panic!("{e}{}", dump(ctx)));
        assert_eq!(st.num("dirty_mismatches"), 0, "the dirty workload found bad pages: {st:?}{}", dump(ctx));
        if st.num("dirty_passes") > than {
            return st;
        }
        assert!(Instant::now() < deadline, "the dirty workload stopped at {than} passes{}", dump(ctx));
        thread::sleep(Duration::from_millis(300));
    }
}

/// No `DIRTY-MISMATCH` line on `vm`'s console, and every pass reported 0 mismatches.
pub fn assert_no_dirty_mismatch_on_console(vm: &Vm, ctx: &[(&str, &Vm)]) {
    let text = vm.console.text();
    assert!(!text.contains("DIRTY-MISMATCH"), "the dirty workload found bad pages{}", dump(ctx));
    for l in text.lines().filter(|l| l.starts_with("DIRTY pass=")) {
        assert!(l.ends_with("mismatches=0"), "{l}{}", dump(ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_check_lines() {
        let line =
            "CPU-CHECK rounds=437 mismatches=0 tsc_backwards=2 clock_backwards=0 clocksource=kvm-clock avx=1 cpu=1";
        let c = parse_cpu_check(line).unwrap();
        assert_eq!((c.rounds, c.mismatches, c.tsc_backwards, c.clock_backwards), (437, 0, 2, 0));
        assert_eq!((c.clocksource.as_str(), c.avx), ("kvm-clock", true));
        assert_eq!(parse_cpu_check("CPU-CHECK-MISMATCH what=xmm3 round=2"), None);
        assert_eq!(parse_cpu_check("CPU-CHECK rounds=x mismatches=0"), None);
        assert_eq!(parse_cpu_check("DIRTY pass=1 mib=64 ms=1030"), None);
    }

    #[test]
    fn dirty_lines() {
        use crate::moves::{dirty_line_mismatches, dirty_line_pass};
        assert_eq!(dirty_line_pass("DIRTY pass=12 mib=64 ms=1030"), Some(12));
        assert_eq!(dirty_line_mismatches("DIRTY pass=12 mib=64 ms=1030"), None);
        assert_eq!(dirty_line_mismatches("DIRTY pass=3 mib=64 ms=9 mismatches=4"), Some(4));
    }
}
