// SPDX-License-Identifier: Apache-2.0
//! Runs the real `init` binary in test mode (it is not PID 1 here) and talks to it like a host
//! talks to the guest: its stdout is the console, and TCP reaches the echo and control ports.
//!
//! The ports are fixed, so every test runs init, and its own clients, in a network namespace of
//! its own: the test body runs on a thread that has done `unshare(CLONE_NEWNET)`, and the
//! processes and threads that thread starts inherit the namespace. That needs root (or
//! CAP_SYS_ADMIN); without it the tests fail and say so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

use guest_common::{CONTROL_PORT, ECHO_PORT, READY_PREFIX, compute};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `body` on a fresh thread inside a new network namespace with `lo` up.
fn in_netns<T: Send>(body: impl FnOnce() -> T + Send) -> T {
    in_netns_with(true, body)
}

/// Runs `body` on a fresh thread inside a new network namespace, `lo` up or left down.
fn in_netns_with<T: Send>(lo_up: bool, body: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        let t = s.spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "unshare(CLONE_NEWNET) failed: {}. These tests run init in a network \
                     namespace of its own and need root (CAP_SYS_ADMIN) for it",
                    std::io::Error::last_os_error()
                );
            }
            if lo_up {
                set_lo_up();
            }
            body()
        });
        t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `ip link set lo up` for the calling thread's namespace.
fn set_lo_up() {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("UDP socket");
    // SAFETY: ifreq is plain data for which all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
    // SAFETY: `req` is a valid ifreq naming `lo`; the kernel fills in its flags.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    assert_eq!(rc, 0, "SIOCGIFFLAGS lo: {}", std::io::Error::last_os_error());
    // SAFETY: SIOCGIFFLAGS filled `ifru_flags`.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; the kernel only reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    assert_eq!(rc, 0, "SIOCSIFFLAGS lo: {}", std::io::Error::last_os_error());
}

/// A running `init`, killed when dropped so that a failing test leaves nothing behind.
struct Init {
    child: Child,
    lines: Receiver<String>,
    /// Every console line read so far, for checks and failure messages.
    seen: Vec<String>,
}

impl Init {
    fn start(cmdline: &str) -> Self {
        Self::start_with(cmdline, Stdio::null())
    }

    fn start_with(cmdline: &str, stdin: Stdio) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_init"));
        cmd.arg(cmdline).stdin(stdin);
        Self::spawn(cmd)
    }

    /// [`Init::start`] with the disk workload's directory (test mode has no /data).
    fn start_with_data(cmdline: &str, data: &std::path::Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_init"));
        cmd.arg(cmdline).stdin(Stdio::null()).env("VMM_INIT_DATA_DIR", data);
        Self::spawn(cmd)
    }

    /// Starts init as PID 1 of new PID and mount namespaces, so that it runs as in a guest:
    /// its mounts stay in that mount namespace, and its restart only ends the PID namespace
    /// (Linux kills its init with SIGHUP) instead of rebooting the host. Its command line is
    /// the host's /proc/cmdline, which names no workload: echo.
    fn start_as_pid1() -> Self {
        let mut cmd = Command::new("unshare");
        // --kill-child: killing unshare (our Drop) kills init too.
        cmd.args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private"])
            .arg(env!("CARGO_BIN_EXE_init"))
            .stdin(Stdio::null());
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("cannot start init");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    fn stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("stdin is piped")
    }

    /// Waits for a console line starting with `prefix` and returns it.
    fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line starting with {prefix:?} within {timeout:?}; console: {:#?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "init ended ({:?}) before a line starting with {prefix:?}; console: {:#?}",
                    self.child.try_wait(),
                    self.seen
                ),
            }
        }
    }

    fn expect_ready(&mut self, workload: &str) -> String {
        let line = self.expect_line(READY_PREFIX, READY_TIMEOUT);
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 5, "{line}");
        let uptime = fields[1].strip_prefix("uptime_ms=").expect(&line);
        assert!(uptime.parse::<u64>().is_ok_and(|ms| ms > 0), "{line}");
        assert_eq!(
            fields[2..],
            [format!("workload={workload}"), format!("cpus={}", host_cpus()), "kernel=linux".to_string()]
        );
        line
    }

    /// Waits for init to end by itself and drains the rest of its console.
    fn expect_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for init") {
                break status;
            }
            assert!(Instant::now() < deadline, "init still runs; console: {:#?}", self.seen);
            thread::sleep(Duration::from_millis(10));
        };
        // The pipe closes once init is gone.
        while let Ok(line) = self.lines.recv_timeout(EXIT_TIMEOUT) {
            self.seen.push(line);
        }
        status
    }

    fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("wait for init");
        assert!(status.is_none(), "init ended ({status:?}); console: {:#?}", self.seen);
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPUs this test process may run on: what init in test mode counts as its CPUs.
fn host_cpus() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set and its size are valid.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity: {}", std::io::Error::last_os_error());
    // SAFETY: CPU_COUNT only reads the set.
    unsafe { libc::CPU_COUNT(&set) as usize }
}

/// The value of `key=` in a line of `key=value` fields.
fn field(line: &str, key: &str) -> u64 {
    line.split_ascii_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    s
}

/// Sends `line` on the control port and returns the one-line answer.
fn control(line: &str) -> String {
    let mut s = connect(CONTROL_PORT);
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).expect("answer");
    answer
}

/// Closes `s` with a reset (SO_LINGER with a zero timeout) instead of a FIN.
fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `linger` is a valid SO_LINGER value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// Deterministic bytes that differ from one `seed` to the next (xorshift64).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` and reads the echo concurrently (the server blocks once our receive buffer is
/// full, so writing everything first could deadlock), then checks it byte for byte.
fn round_trip(s: TcpStream, data: &[u8]) {
    let mut writer = s.try_clone().expect("clone");
    let mut reader = s;
    thread::scope(|scope| {
        scope.spawn(|| {
            writer.write_all(data).expect("write");
            writer.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::with_capacity(data.len());
        reader.read_to_end(&mut back).expect("read echo");
        assert_eq!(back.len(), data.len(), "echoed length");
        assert!(back == data, "echoed bytes differ");
    });
}

#[test]
fn ready_line_names_the_workload() {
    for (cmdline, workload) in [
        ("console=ttyS0 vmm.workload=idle", "idle"),
        ("console=ttyS0 vmm.workload=dirty vmm.dirty_mib=1", "dirty"),
        ("console=ttyS0", "echo"),
    ] {
        in_netns(|| Init::start(cmdline).expect_ready(workload));
    }
}

#[test]
fn echo_is_exact_concurrent_and_survives_resets() {
    in_netns(|| {
        let mut init = Init::start("vmm.workload=echo");
        init.expect_ready("echo");

        // Two connections at once, 1 MiB each, different bytes.
        thread::scope(|scope| {
            for seed in [1, 2] {
                let s = connect(ECHO_PORT);
                scope.spawn(move || round_trip(s, &pattern(seed, 1 << 20)));
            }
        });

        // A client that resets, once idle and once with its echo still in flight.
        reset(connect(ECHO_PORT));
        let mut s = connect(ECHO_PORT);
        s.write_all(&pattern(3, 64 << 10)).expect("write");
        reset(s);

        // New connections still work, over IPv6 too.
        thread::sleep(Duration::from_millis(100));
        round_trip(connect(ECHO_PORT), b"still here\n");
        let v6 = TcpStream::connect(("::1", ECHO_PORT)).expect("connect over IPv6");
        v6.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        round_trip(v6, &pattern(4, 64 << 10));
        init.assert_running();
    });
}

#[test]
fn status_answers() {
    in_netns(|| {
        let mut init = Init::start("vmm.workload=idle");
        init.expect_ready("idle");
        let status = control("status");
        assert!(status.starts_with(&format!("STATUS workload=idle cpus={} uptime_ms=", host_cpus())), "{status}");
        assert!(
            status.ends_with(
                " dirty_passes=0 dirty_mismatches=0 disk_passes=0 disk_mismatches=0 job_units=0 job_done=0 job_rate=0 \
                 job_elapsed_ms=0 duty=0 busy_pct=0\n"
            ),
            "{status}"
        );
        assert_eq!(control("reboot"), "ERR unknown command\n");
        assert_eq!(control("records"), "ERR the disk workload is not running\n");
        init.assert_running();
    });
}

#[test]
fn poweroff_over_control_exits_0() {
    in_netns(|| {
        let mut init = Init::start("vmm.workload=echo");
        init.expect_ready("echo");
        let mut s = connect(CONTROL_PORT);
        s.write_all(b"poweroff\n").expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer, then end of stream");
        assert_eq!(answer, "OK\n");
        assert_eq!(init.expect_exit().code(), Some(0));
        assert_eq!(init.seen.last().map(String::as_str), Some("GUEST-POWEROFF"));
    });
}

#[test]
fn poweroff_from_the_console() {
    in_netns(|| {
        let mut init = Init::start_with("vmm.workload=idle", Stdio::piped());
        init.expect_ready("idle");
        let mut stdin = init.stdin();
        stdin.write_all(b"status\n").expect("write console");
        init.expect_line("STATUS workload=idle ", READY_TIMEOUT);
        stdin.write_all(b"poweroff\n").expect("write console");
        assert_eq!(init.expect_exit().code(), Some(0));
        assert_eq!(init.seen.last().map(String::as_str), Some("GUEST-POWEROFF"));
    });
}

#[test]
fn poweroff_after_ms() {
    in_netns(|| {
        let mut init = Init::start("vmm.workload=idle vmm.poweroff_after_ms=200");
        init.expect_ready("idle");
        let ready = Instant::now();
        assert_eq!(init.expect_exit().code(), Some(0));
        assert!(ready.elapsed() >= Duration::from_millis(150), "{:?}", ready.elapsed());
        assert!(init.seen.iter().any(|l| l == "GUEST-POWEROFF"), "{:#?}", init.seen);
    });
}

#[test]
fn dirty_passes_verify() {
    in_netns(|| {
        // One region per CPU: 4 MiB on as many CPUs as the test may use.
        let mut init = Init::start("vmm.workload=dirty vmm.dirty_mib=4 vmm.dirty_rate=0");
        init.expect_ready("dirty");
        let cpus = host_cpus();
        // Each CPU's third pass (or a later one): a fast CPU may have printed it before the
        // ready line, which the wait above already consumed.
        let mut reported = std::collections::BTreeSet::new();
        let note = |line: &str, reported: &mut std::collections::BTreeSet<u64>| {
            if line.starts_with("DIRTY pass=") && field(line, "pass") >= 3 {
                assert_eq!(field(line, "mib"), 4 / cpus as u64, "{line}");
                assert_eq!(field(line, "mismatches"), 0, "{line}");
                reported.insert(field(line, "cpu"));
            }
        };
        for line in init.seen.clone() {
            note(&line, &mut reported);
        }
        while reported.len() < cpus {
            let line = init.expect_line("DIRTY pass=", Duration::from_secs(60));
            note(&line, &mut reported);
        }
        assert_eq!(reported, (0..cpus as u64).collect(), "every CPU dirties its own region");
        let status = control("status");
        assert!(status.starts_with("STATUS workload=dirty "), "{status}");
        assert_eq!(field(&status, "dirty_mismatches"), 0, "{status}");
        assert!(field(&status, "dirty_passes") >= 3, "{status}");
        assert_eq!(control("poweroff"), "OK\n");
        assert_eq!(init.expect_exit().code(), Some(0));
        let bad: Vec<_> = init.seen.iter().filter(|l| l.starts_with("DIRTY-MISMATCH")).collect();
        assert!(bad.is_empty(), "{bad:#?}");
    });
}

/// Waits until the status line says `disk_passes` reached `n`; returns that line.
fn wait_disk_passes(n: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = control("status");
        if field(&status, "disk_passes") >= n {
            return status;
        }
        assert!(Instant::now() < deadline, "stuck: {status}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn disk_records_are_durable_checked_at_start_and_damage_is_found() {
    let data = std::env::temp_dir().join(format!("vmm-init-test-records-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("records");
    in_netns(|| {
        let mut init = Init::start_with_data("vmm.workload=disk vmm.disk_passes=200", &data);
        assert_eq!(init.expect_line("DISK-RECORDS", Duration::from_secs(10)), "DISK-RECORDS found=0 bad=0");
        init.expect_ready("disk");
        let status = wait_disk_passes(200);
        assert_eq!(field(&status, "disk_mismatches"), 0, "{status}");
        // Read back from the file itself: every acknowledged record, and no more.
        assert_eq!(control("records"), "RECORDS acked=200 found=200 bad=0\n");
        assert_eq!(control("poweroff"), "OK\n");
        assert_eq!(init.expect_exit().code(), Some(0));
    });
    let written = std::fs::read(&file).unwrap();
    assert_eq!(written.len(), 200 * 64, "every acknowledged record, and no more");
    // The next start finds them all and goes on after them.
    in_netns(|| {
        let mut init = Init::start_with_data("vmm.workload=disk vmm.disk_passes=300", &data);
        assert_eq!(init.expect_line("DISK-RECORDS", Duration::from_secs(10)), "DISK-RECORDS found=200 bad=0");
        init.expect_ready("disk");
        // While records are being appended: no record written but not yet acknowledged is seen.
        let records = control("records");
        assert_eq!(field(&records, "found"), field(&records, "acked"), "{records}");
        assert_eq!(field(&records, "bad"), 0, "{records}");
        wait_disk_passes(300);
        assert_eq!(control("poweroff"), "OK\n");
        assert_eq!(init.expect_exit().code(), Some(0));
    });
    let mut all = std::fs::read(&file).unwrap();
    assert_eq!(all.len(), 300 * 64);
    assert_eq!(all[..200 * 64], written[..], "the first records are untouched");
    // One flipped byte in record 50: found, and nothing more is appended.
    all[50 * 64 + 20] ^= 0xff;
    std::fs::write(&file, &all).unwrap();
    in_netns(|| {
        let mut init = Init::start_with_data("vmm.workload=disk", &data);
        assert_eq!(init.expect_line("DISK-RECORDS", Duration::from_secs(10)), "DISK-RECORDS found=50 bad=250");
        init.expect_ready("disk");
        let status = control("status");
        assert_eq!((field(&status, "disk_passes"), field(&status, "disk_mismatches")), (50, 250), "{status}");
        assert_eq!(control("records"), "RECORDS acked=50 found=50 bad=250\n");
        assert_eq!(control("poweroff"), "OK\n");
        assert_eq!(init.expect_exit().code(), Some(0));
    });
    assert_eq!(std::fs::read(&file).unwrap().len(), 300 * 64);
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn dirty_rate_is_throttled() {
    in_netns(|| {
        // 2 MiB at 20 MiB/s, whatever the CPUs: each pass over each CPU's share takes 100 ms.
        let mut init = Init::start("vmm.workload=dirty vmm.dirty_mib=2 vmm.dirty_rate=20");
        init.expect_ready("dirty");
        let line = init.expect_line("DIRTY pass=2 ", Duration::from_secs(30));
        assert!(field(&line, "ms") >= 90, "{line}");
    });
}

#[test]
fn udp_echo_returns_every_datagram() {
    in_netns(|| {
        let mut init = Init::start("vmm.workload=echo");
        init.expect_ready("echo");
        for (bind, to) in [("127.0.0.1:0", ("127.0.0.1", ECHO_PORT)), ("[::1]:0", ("::1", ECHO_PORT))] {
            let s = UdpSocket::bind(bind).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
            for (i, len) in [1usize, 100, 1472, 8000].into_iter().enumerate() {
                let data = pattern(i as u64 + 10, len);
                s.send_to(&data, to).expect("send");
                let mut back = vec![0u8; 65536];
                let (n, from) = s.recv_from(&mut back).expect("echo");
                assert_eq!(&back[..n], &data[..], "datagram of {len} bytes from {from}");
            }
        }
        init.assert_running();
    });
}

#[test]
fn compute_job_prints_the_known_result() {
    in_netns(|| {
        let units = 300;
        let mut init = Init::start(&format!("vmm.workload=compute vmm.work={units}"));
        init.expect_ready("compute");
        let done = init.expect_line("JOB-DONE ", Duration::from_secs(120));
        let result = guest_common::JobDone { units, result: compute::job_result(units), elapsed_ms: 0 }.to_string();
        let (want, _) = result.rsplit_once(' ').expect("elapsed_ms field");
        assert!(done.starts_with(&format!("{want} elapsed_ms=")), "{done}, expected {want}");
        let status = control("status");
        assert_eq!(field(&status, "job_units"), units, "{status}");
        assert_eq!(field(&status, "job_done"), units, "{status}");
        assert_eq!(field(&status, "job_elapsed_ms"), field(&done, "elapsed_ms"), "{status} vs {done}");
        init.assert_running();
    });
}

#[test]
fn burn_reports_its_duty_and_load() {
    in_netns(|| {
        let mut init = Init::start("vmm.workload=burn vmm.duty=20");
        init.expect_ready("burn");
        // The busy time's rate window needs a few seconds of readings.
        thread::sleep(Duration::from_millis(3500));
        let status = control("status");
        assert_eq!(field(&status, "duty"), 20, "{status}");
        // The guest's own account: the threads spin by the clock, so whatever else runs on this
        // host, they count about the duty (a host too busy to wake them on time counts less).
        let busy = field(&status, "busy_pct");
        assert!((1..=25).contains(&busy), "{status}");
        init.assert_running();
    });
}

#[test]
fn as_pid1_it_sets_up_the_system_and_restarts() {
    // `lo` stays down here: reaching init over 127.0.0.1 shows that init set it up.
    in_netns_with(false, || {
        let mut init = Init::start_as_pid1();
        init.expect_ready("echo");
        round_trip(connect(ECHO_PORT), b"pid 1\n");
        let status = control("status");
        assert!(status.starts_with("STATUS workload=echo "), "{status}");
        assert_eq!(control("poweroff"), "OK\n");
        // RB_AUTOBOOT in a PID namespace kills its init with SIGHUP; unshare passes it on.
        let status = init.expect_exit();
        assert_eq!(status.signal(), Some(libc::SIGHUP), "{status:?}; console: {:#?}", init.seen);
        assert_eq!(init.seen.last().map(String::as_str), Some("GUEST-POWEROFF"));
        // Setup (mounts, lo) logged no errors.
        let errors: Vec<_> = init.seen.iter().filter(|l| l.starts_with("init:")).collect();
        assert!(errors.is_empty(), "{errors:#?}");
    });
}
