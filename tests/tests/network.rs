// SPDX-License-Identifier: Apache-2.0
//! End-to-end network tests with our own guest kernel on a test bed: the echo service from the
//! client namespace (several connections, reconnects), ICMP echo, 100 MB byte-exact through the
//! echo service, two guests on one segment pinging each other through their control ports, the
//! dirty workload running a minute without a mismatch, a clean poweroff over the control port,
//! and a bed that leaves no namespace or `vmm` process behind.
//!
//! Timeouts are generous on purpose: these machines have two cores shared with other tests' VMs,
//! so nothing here asserts on speed (throughput is only printed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vmm_tests::checks::echo_exact;
use vmm_tests::vm::{Vm, guest_kernel, kvm_or_skip, ping};
use vmm_tests::{Netns, TestBed, list_netns};

/// TCP port of the guest's echo service.
const ECHO_PORT: u16 = 7000;
/// TCP port of the guest's control service.
const CONTROL_PORT: u16 = 7001;
/// How long a guest may take from `vmm run` to its ready line on a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long any single network step (connect, one read, one reply) may take.
const NET_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `vmm` may take to exit after the guest was told to power off.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest's memory for every test.
const MEM_MIB: &str = "256";

fn kernel_arg() -> String {
    guest_kernel().to_str().expect("guest kernel path is UTF-8").to_string()
}

/// A distinct, locally administered MAC for guest `i`.
fn guest_mac(i: u8) -> String {
    format!("52:54:00:6e:77:{:02x}", i + 1)
}

/// Starts guest `i` (address `bed.guest_ip(i)`) with `workload` on host `host` of `bed`, and waits
/// for its ready line.
fn start_guest(bed: &TestBed, host: &str, i: u8, workload: &str) -> Vm {
    let host = bed.host(host);
    let args = [
        "run".to_string(),
        "--kernel".to_string(),
        kernel_arg(),
        "--mem-mib".to_string(),
        MEM_MIB.to_string(),
        "--net".to_string(),
        format!("tap={},mac={}", host.tap(), guest_mac(i)),
        "--cmdline".to_string(),
        format!("console=ttyS0 {} vmm.workload={workload}", bed.guest_ip_cmdline(i)),
    ];
    let vm = Vm::start(Some(host), &args);
    wait_ready(&vm, workload);
    vm
}

/// Waits for the guest's ready line and checks it names `workload`.
fn wait_ready(vm: &Vm, workload: &str) {
    let ready = vm
        .console
        .wait_line(BOOT_TIMEOUT, |l| l.starts_with("GUEST-READY"))
        .unwrap_or_else(|| panic!("no GUEST-READY line within {BOOT_TIMEOUT:?}\n{}", vm.describe()));
    assert!(
        ready.contains(&format!("workload={workload}")) && ready.contains("kernel=vmm-guest"),
        "unexpected ready line {ready:?}\n{}",
        vm.describe()
    );
}

/// Opens a TCP connection to `addr` from inside `netns`, with [`NET_TIMEOUT`] on reads and
/// writes. The socket stays in that namespace, so any thread can use it afterwards.
fn connect_in(netns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    netns.run_in(|| TcpStream::connect_timeout(&addr, NET_TIMEOUT)).expect("enter the namespace").and_then(|s| {
        s.set_read_timeout(Some(NET_TIMEOUT))?;
        s.set_write_timeout(Some(NET_TIMEOUT))?;
        Ok(s)
    })
}

/// Waits until guest `i`'s echo service accepts connections from the client.
fn wait_for_echo(bed: &TestBed, i: u8, vm: &Vm) {
    let addr = SocketAddr::from((bed.guest_ip(i), ECHO_PORT));
    if let Err(e) = bed.client().wait_for_tcp(addr, NET_TIMEOUT) {
        panic!("echo service of guest {i} not reachable: {e}\n{}", vm.describe());
    }
}

/// A connection with a line reader on top.
struct LineConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineConn {
    fn open(netns: &Netns, addr: SocketAddr) -> std::io::Result<Self> {
        let stream = connect_in(netns, addr)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(LineConn { stream, reader })
    }

    /// Sends `line` and a newline, and returns the next line received (without its newline).
    fn ask(&mut self, line: &str) -> std::io::Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        self.read_line()
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(reply.trim_end_matches(['\r', '\n']).to_string())
    }

    /// Half-closes and expects the peer to close too, with nothing more to read.
    fn finish(mut self) -> std::io::Result<()> {
        self.stream.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest)?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{} unexpected bytes before EOF", rest.len())))
        }
    }
}

/// Opens a line connection from the client to guest `i`'s `port`, failing with the VM's output.
fn open_line_conn(bed: &TestBed, i: u8, port: u16, vm: &Vm) -> LineConn {
    let addr = SocketAddr::from((bed.guest_ip(i), port));
    LineConn::open(bed.client(), addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}\n{}", vm.describe()))
}

/// Sends `line` to guest `i`'s control port from the client and returns the one-line answer.
fn control(bed: &TestBed, i: u8, line: &str, vm: &Vm) -> String {
    let mut conn = open_line_conn(bed, i, CONTROL_PORT, vm);
    conn.ask(line).unwrap_or_else(|e| panic!("control {line:?} to guest {i}: {e}\n{}", vm.describe()))
}

/// Round-trips `line` over an echo connection.
fn echo_line(conn: &mut LineConn, line: &str, vm: &Vm) {
    let back = conn.ask(line).unwrap_or_else(|e| panic!("echo of {line:?}: {e}\n{}", vm.describe()));
    assert_eq!(back, line, "echo returned something else\n{}", vm.describe());
}

/// Pings `ip` from the client namespace and returns the round-trip time.
fn ping_from_client(bed: &TestBed, ip: Ipv4Addr, vm: &Vm) -> Duration {
    bed.client()
        .run_in(|| ping(ip, NET_TIMEOUT))
        .expect("enter the client namespace")
        .unwrap_or_else(|e| panic!("ping {ip} from the client: {e}\n{}", vm.describe()))
}

/// Whether a process with this pid exists (a zombie counts: it was not reaped).
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn echo_answers_from_the_client_namespace() {
    if !kvm_or_skip("echo_answers_from_the_client_namespace") {
        return;
    }
    let bed = TestBed::builder().host("a").client("client").build().expect("build test bed");
    let vm = start_guest(&bed, "a", 0, "echo");
    wait_for_echo(&bed, 0, &vm);

    let mut first = open_line_conn(&bed, 0, ECHO_PORT, &vm);
    for n in 0..5 {
        echo_line(&mut first, &format!("first connection, line {n}"), &vm);
    }

    // A second connection while the first is still open; both keep working, interleaved.
    let mut second = open_line_conn(&bed, 0, ECHO_PORT, &vm);
    echo_line(&mut second, "second connection, line 0", &vm);
    echo_line(&mut first, "first connection, after the second opened", &vm);
    echo_line(&mut second, "second connection, line 1", &vm);

    // Closing: the guest closes its side once everything was echoed.
    first.finish().unwrap_or_else(|e| panic!("closing the first connection: {e}\n{}", vm.describe()));
    echo_line(&mut second, "second connection, after the first closed", &vm);
    second.finish().unwrap_or_else(|e| panic!("closing the second connection: {e}\n{}", vm.describe()));

    // And a new connection after both were closed.
    let mut third = open_line_conn(&bed, 0, ECHO_PORT, &vm);
    echo_line(&mut third, "third connection", &vm);
    third.finish().unwrap_or_else(|e| panic!("closing the third connection: {e}\n{}", vm.describe()));
    assert!(vm.try_wait().is_none(), "vmm exited\n{}", vm.describe());
}

#[test]
fn ping_works() {
    if !kvm_or_skip("ping_works") {
        return;
    }
    let bed = TestBed::builder().host("a").client("client").build().expect("build test bed");
    let vm = start_guest(&bed, "a", 0, "echo");
    for _ in 0..3 {
        let rtt = ping_from_client(&bed, bed.guest_ip(0), &vm);
        println!("ping {}: rtt {rtt:?}", bed.guest_ip(0));
    }
}

#[test]
fn hundred_megabytes_round_trip_byte_exact() {
    if !kvm_or_skip("hundred_megabytes_round_trip_byte_exact") {
        return;
    }
    const TOTAL: usize = 100_000_000;
    let bed = TestBed::builder().host("a").client("client").build().expect("build test bed");
    let vm = start_guest(&bed, "a", 0, "echo");
    wait_for_echo(&bed, 0, &vm);
    let elapsed = echo_exact(&bed, 0, TOTAL, &vm);
    let mb_s = TOTAL as f64 / elapsed.as_secs_f64() / 1e6;
    println!("echo: {TOTAL} bytes each way in {elapsed:.2?}: {mb_s:.1} MB/s (informational)");
}

#[test]
fn two_guests_on_one_segment_reach_each_other() {
    if !kvm_or_skip("two_guests_on_one_segment_reach_each_other") {
        return;
    }
    let bed = TestBed::builder().host("a").host("b").client("client").build().expect("build test bed");
    let vms = [start_guest(&bed, "a", 0, "echo"), start_guest(&bed, "b", 1, "echo")];
    let describe = || vms.iter().map(Vm::describe).collect::<Vec<_>>().join("\n=== next guest ===\n");

    // Both reachable from the client: ICMP and the echo service.
    for (i, vm) in (0u8..).zip(&vms) {
        ping_from_client(&bed, bed.guest_ip(i), vm);
        wait_for_echo(&bed, i, vm);
        let mut conn = open_line_conn(&bed, i, ECHO_PORT, vm);
        echo_line(&mut conn, &format!("hello guest {i}"), vm);
    }

    // Each guest pings the other through its control port.
    for (from, to) in [(0u8, 1u8), (1, 0)] {
        let target = bed.guest_ip(to);
        let reply = control(&bed, from, &format!("ping {target}"), &vms[usize::from(from)]);
        assert!(
            reply.starts_with(&format!("PONG {target} rtt_us=")),
            "guest {from} pinging guest {to} ({target}) answered {reply:?}\n{}",
            describe()
        );
        println!("guest {from} -> guest {to}: {reply}");
    }
}

#[test]
fn dirty_runs_for_a_minute_without_mismatch() {
    if !kvm_or_skip("dirty_runs_for_a_minute_without_mismatch") {
        return;
    }
    const RUN: Duration = Duration::from_secs(60);
    let args = [
        "run".to_string(),
        "--kernel".to_string(),
        kernel_arg(),
        "--mem-mib".to_string(),
        MEM_MIB.to_string(),
        "--cmdline".to_string(),
        "console=ttyS0 vmm.workload=dirty vmm.dirty_mib=64 vmm.dirty_rate=0".to_string(),
    ];
    let vm = Vm::start(None, &args);
    wait_ready(&vm, "dirty");

    // Let it run, watching that it does not stop on its own meanwhile.
    let end = Instant::now() + RUN;
    while Instant::now() < end {
        if let Some(status) = vm.try_wait() {
            panic!("vmm exited ({status}) during the run\n{}", vm.describe());
        }
        thread::sleep(Duration::from_millis(500).min(end.saturating_duration_since(Instant::now())));
    }
    assert!(vm.try_wait().is_none(), "vmm exited at the end of the run\n{}", vm.describe());

    let console = vm.console.text();
    assert!(!console.contains("DIRTY-MISMATCH"), "the guest found a mismatch\n{}", vm.describe());
    let dirty: Vec<&str> = console.lines().filter(|l| l.starts_with("DIRTY ")).collect();
    assert!(dirty.len() >= 2, "fewer than two DIRTY lines in {RUN:?}\n{}", vm.describe());
    let mut last_pass = 0u64;
    for line in &dirty {
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name}N in {line:?}\n{}", vm.describe()))
        };
        assert_eq!(field("mismatches="), 0, "{line:?}\n{}", vm.describe());
        assert_eq!(field("mib="), 64, "the guest covers another size: {line:?}\n{}", vm.describe());
        let pass = field("pass=");
        assert!(pass > last_pass, "pass went from {last_pass} to {pass} in {line:?}\n{}", vm.describe());
        last_pass = pass;
    }
    println!("dirty: {} DIRTY lines, last pass {last_pass} after {RUN:?}", dirty.len());
    vm.kill();
}

#[test]
fn guests_power_off_cleanly_over_the_control_port() {
    if !kvm_or_skip("guests_power_off_cleanly_over_the_control_port") {
        return;
    }
    let bed = TestBed::builder().host("a").client("client").build().expect("build test bed");
    let vm = start_guest(&bed, "a", 0, "echo");
    bed.client()
        .wait_for_tcp(SocketAddr::from((bed.guest_ip(0), CONTROL_PORT)), NET_TIMEOUT)
        .unwrap_or_else(|e| panic!("control port not reachable: {e}\n{}", vm.describe()));

    let status = control(&bed, 0, "status", &vm);
    assert!(status.starts_with("STATUS workload=echo "), "status answered {status:?}\n{}", vm.describe());

    let reply = control(&bed, 0, "poweroff", &vm);
    assert_eq!(reply, "OK", "poweroff answered {reply:?}\n{}", vm.describe());
    let exit = vm
        .wait_timeout(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("vmm still running {EXIT_TIMEOUT:?} after poweroff\n{}", vm.describe()));
    assert!(exit.success(), "vmm exited with {exit}\n{}", vm.describe());
    let poweroffs = vm.console.lines(|l| l.starts_with("GUEST-POWEROFF")).len();
    assert_eq!(poweroffs, 1, "expected one GUEST-POWEROFF line\n{}", vm.describe());
}

#[test]
fn the_test_bed_leaves_nothing_behind() {
    if !kvm_or_skip("the_test_bed_leaves_nothing_behind") {
        return;
    }
    let bed = TestBed::builder().host("a").client("client").build().expect("build test bed");
    let id = bed.id().to_string();
    let vm = start_guest(&bed, "a", 0, "echo");
    wait_for_echo(&bed, 0, &vm);
    let pid = vm.pid();
    assert!(process_exists(pid), "vmm {pid} not running\n{}", vm.describe());

    drop(bed);

    let left: Vec<String> = list_netns()
        .expect("list namespaces")
        .into_iter()
        .filter(|name| name == &id || name.starts_with(&format!("{id}-")))
        .collect();
    assert!(left.is_empty(), "namespaces of bed {id} left behind: {left:?}");
    // The bed kills and reaps its processes before it deletes the namespaces.
    assert!(!process_exists(pid), "vmm {pid} still exists after the bed was dropped\n{}", vm.describe());
    assert!(vm.try_wait().is_some(), "the bed's kill did not end vmm {pid}\n{}", vm.describe());
}
