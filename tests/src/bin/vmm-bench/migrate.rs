// SPDX-License-Identifier: Apache-2.0
//! Migration: guests of two sizes, idle and dirtying memory at two rates, and a guest whose
//! vCPUs all dirty memory, moved from host A to host B (two namespaces on one L2 segment) while
//! a client streams lines through the guest's TCP echo server and numbered datagrams through its
//! UDP echo service. Also the TCP bandwidth of this machine's loopback and of the A → B path,
//! measured in the same run, as the physical reference.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use guest_common::ECHO_PORT;
use serde::Serialize;
use vmm_tests::echo_stream::EchoStream;
use vmm_tests::udp_stream::UdpStream;
use vmm_tests::{Netns, TestBed};

use crate::boot::ms;
use crate::monitor::{GuestImage, GuestSpec, MigrationResult, Monitor, Running, Wire};
use crate::results::{Better, Results};

const MAC: &str = "52:54:00:be:4c:02";
const ECHO_INTERVAL: Duration = Duration::from_millis(10);
static PORT: AtomicU16 = AtomicU16::new(7300);
/// The downtime row both monitors measure the same way.
/// The source's migration thread's CPU time per GiB sent during pre-copy (ours only).
pub const SENDER_CPU: &str = "source CPU per GiB copied";
pub const DOWNTIME: &str = "downtime: pause → running on the destination";
/// The UDP stream's losses across the migration.
pub const UDP_LOST: &str = "UDP datagrams lost (one sent every 10 ms)";
/// The reference row: raw TCP of the same bytes into fresh memory.
pub const RAW_ROW: &str = "reference: raw TCP of the same bytes into fresh memory";

/// `vmm-bench --raw-receive ADDR BYTES`: listens on ADDR (a free port, printed as `PORT N`),
/// reads BYTES from one connection into freshly mapped anonymous memory and prints `MBPS X`,
/// from the first byte to the last.
pub fn raw_receive(addr: &str, bytes: &str) -> Result<(), String> {
    let ip: Ipv4Addr = addr.parse().map_err(|_| format!("{addr}: not an IPv4 address"))?;
    let bytes: usize = bytes.parse().map_err(|_| format!("{bytes}: not a number"))?;
    let listener = TcpListener::bind((ip, 0)).map_err(|e| e.to_string())?;
    println!("PORT {}", listener.local_addr().map_err(|e| e.to_string())?.port());
    let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
    // SAFETY: a fresh private anonymous mapping of `bytes`; checked before use, unmapped at exit.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping is `bytes` long, readable and writable, and only this slice uses it.
    let buf = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), bytes) };
    let mut got = 0;
    let mut start = None;
    while got < bytes {
        // Straight into the fresh pages: each first write faults a page in, as on a
        // destination VMM.
        let n = s.read(&mut buf[got..]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("the sender stopped after {got} of {bytes} bytes"));
        }
        start.get_or_insert_with(Instant::now);
        got += n;
    }
    let secs = start.map_or(0.0, |t| t.elapsed().as_secs_f64()).max(1e-6);
    println!("MBPS {}", bytes as f64 / secs / 1e6);
    Ok(())
}

/// A guest configuration to migrate.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub mem_mib: u64,
    /// vCPUs; with the dirty workload each dirties its own share of the memory.
    pub vcpus: u8,
    /// `None`: idle. `Some((MiB, MiB/s))`: the dirty workload over that much memory at that rate.
    pub dirty: Option<(u64, u64)>,
}

impl Case {
    pub fn label(&self) -> String {
        let mem =
            if self.mem_mib >= 1024 { format!("{} GiB", self.mem_mib / 1024) } else { format!("{} MiB", self.mem_mib) };
        let mem = if self.vcpus > 1 { format!("{mem}, {} vCPUs", self.vcpus) } else { mem };
        match self.dirty {
            None => format!("{mem} idle"),
            Some((mib, rate)) if self.vcpus > 1 => format!("{mem} all dirtying, {mib} MiB at {rate} MiB/s"),
            Some((mib, rate)) => format!("{mem}, dirtying {mib} MiB at {rate} MiB/s"),
        }
    }

    fn cmdline(&self, start: &str, ip: &str) -> String {
        match self.dirty {
            None => format!("{start} {ip} vmm.workload=idle"),
            Some((mib, rate)) => {
                format!("{start} {ip} vmm.workload=dirty vmm.dirty_mib={mib} vmm.dirty_rate={rate}")
            }
        }
    }
}

/// One migration, with what the client saw.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub case: String,
    pub monitor: Monitor,
    pub run: usize,
    /// Over mutual TLS (else plaintext).
    pub tls: bool,
    pub result: MigrationResult,
    pub largest_gap_ms: f64,
    pub lines_lost: u64,
    pub stream_errors: Vec<String>,
    pub datagrams_lost: u64,
    pub datagrams_duplicated: u64,
    pub largest_datagram_gap_ms: f64,
    /// A new connection to the guest after the move worked.
    pub new_connection_ok: bool,
}

pub struct Bench<'a> {
    bed: TestBed,
    guest: &'a GuestImage,
    /// How long a guest may take to its ready line.
    ready_timeout: Duration,
    /// The monitors whose migrations run.
    monitors: Vec<Monitor>,
    pub samples: Vec<Sample>,
}

impl<'a> Bench<'a> {
    pub fn new(guest: &'a GuestImage, ready_timeout: Duration, monitors: &[Monitor]) -> Result<Self, String> {
        let bed =
            TestBed::builder().host("a").host("b").client("client").host_ips().build().map_err(|e| e.to_string())?;
        Ok(Bench { bed, guest, ready_timeout, monitors: monitors.to_vec(), samples: Vec::new() })
    }

    /// TCP bandwidth on loopback (inside host A) and from host A to host B, in MB/s.
    pub fn bandwidth(&self, results: &mut Results) -> Result<(), String> {
        let a = self.bed.host("a");
        let b_ip = self.bed.host("b").ip().ok_or("host B has no address")?;
        let lo = stream_rate(a, a, Ipv4Addr::LOCALHOST)?;
        let path = stream_rate(a, self.bed.host("b"), b_ip)?;
        // Machine properties, not a monitor's: recorded under ours, shown without a ratio.
        results.add("reference", "TCP bandwidth, loopback", "MB/s", Better::Higher, Monitor::Ours, lo);
        results.add("reference", "TCP bandwidth, host A → host B", "MB/s", Better::Higher, Monitor::Ours, path);
        Ok(())
    }

    /// `runs` migrations of `case` with each monitor, alternating, each over TLS and in
    /// plaintext (back to back, which goes first alternating too, so that drift hits both);
    /// per run also a raw TCP transfer of the bytes our TLS migration sent.
    pub fn case(&mut self, results: &mut Results, case: &Case, runs: usize) -> Result<(), String> {
        let section = self.guest.section(&format!("migration: {}", case.label()));
        for run in 0..runs {
            let mut rates = Vec::new();
            let mut ours_bytes = None;
            for m in Monitor::alternating(run).into_iter().filter(|m| self.monitors.contains(m)) {
                let mut by_wire = [0.0; 2];
                let mut cpu_by_wire = [0.0; 2];
                let wires = if run % 2 == 0 { [true, false] } else { [false, true] };
                for tls in wires {
                    let i = if tls { 0 } else { 1 };
                    let s = self.once(case, m, run, tls)?;
                    let prefix = if tls { "" } else { "plaintext: " };
                    let r = &s.result;
                    let rate = r.copy_rate_mb_s();
                    by_wire[i] = rate;
                    results.add(&section, &format!("{prefix}total time"), "ms", Better::Lower, m, r.total_ms);
                    results.add(&section, &format!("{prefix}{DOWNTIME}"), "ms", Better::Lower, m, r.downtime_ms);
                    results.add(&section, &format!("{prefix}copy rate"), "MB/s", Better::Higher, m, rate);
                    if let Some(cpu) = r.sender_cpu_ms_per_gib() {
                        results.add(&section, &format!("{prefix}{SENDER_CPU}"), "ms", Better::Lower, m, cpu);
                        cpu_by_wire[i] = cpu;
                    }
                    if tls {
                        results.add(
                            &section,
                            "downtime as the source reports it",
                            "ms",
                            Better::Lower,
                            m,
                            r.reported_downtime_ms,
                        );
                        results.add(&section, "sent", "MiB", Better::Lower, m, r.bytes_sent as f64 / (1 << 20) as f64);
                        results.add(&section, "rounds", "", Better::Lower, m, f64::from(r.rounds));
                        results.add(&section, "client's largest echo gap", "ms", Better::Lower, m, s.largest_gap_ms);
                        results.add(&section, "echo lines lost", "", Better::Lower, m, s.lines_lost as f64);
                        results.add(&section, UDP_LOST, "", Better::Lower, m, s.datagrams_lost as f64);
                        results.add(
                            &section,
                            "client's largest UDP reply gap",
                            "ms",
                            Better::Lower,
                            m,
                            s.largest_datagram_gap_ms,
                        );
                        if s.datagrams_duplicated > 0 {
                            eprintln!(
                                "vmm-bench: {} {}: {} datagrams came back twice",
                                m.name(),
                                case.label(),
                                s.datagrams_duplicated
                            );
                        }
                        if m == Monitor::Ours {
                            ours_bytes = Some(r.bytes_sent);
                        }
                    }
                    if !s.stream_errors.is_empty() || !s.new_connection_ok {
                        eprintln!(
                            "vmm-bench: {} {} ({}): the connection did not survive intact: {:?}, new connection ok: {}",
                            m.name(),
                            case.label(),
                            if tls { "TLS" } else { "plaintext" },
                            s.stream_errors,
                            s.new_connection_ok
                        );
                    }
                    self.samples.push(s);
                }
                if by_wire[1] > 0.0 {
                    results.add(&section, "copy rate, TLS ÷ plaintext", "", Better::Higher, m, by_wire[0] / by_wire[1]);
                }
                if cpu_by_wire[0] > 0.0 && cpu_by_wire[1] > 0.0 {
                    let ratio = cpu_by_wire[1] / cpu_by_wire[0];
                    results.add(&section, "source CPU per byte, plaintext ÷ TLS", "", Better::Higher, m, ratio);
                }
                eprintln!(
                    "vmm-bench: {} run {}, {}: copy rate TLS {:.0} MB/s, plaintext {:.0} MB/s, TLS ÷ plaintext {:.2}; \
                     source CPU per GiB TLS {:.0} ms, plaintext {:.0} ms",
                    case.label(),
                    run + 1,
                    m.name(),
                    by_wire[0],
                    by_wire[1],
                    by_wire[0] / by_wire[1],
                    cpu_by_wire[0],
                    cpu_by_wire[1]
                );
                rates.push((m, by_wire[0]));
            }
            // The physical limit with the receiver's cost: the same bytes, raw TCP from host A
            // into freshly mapped memory in a process on host B.
            if let Some(bytes) = ours_bytes {
                let raw = self.raw_transfer(bytes)?;
                results.add(&section, RAW_ROW, "MB/s", Better::Higher, Monitor::Ours, raw);
                for (m, rate) in rates {
                    results.add(
                        &section,
                        "TLS copy rate ÷ raw TCP into fresh memory",
                        "",
                        Better::Higher,
                        m,
                        rate / raw,
                    );
                }
            }
        }
        Ok(())
    }

    /// Raw TCP of `bytes` from host A to a `vmm-bench --raw-receive` process on host B that
    /// reads them into freshly mapped memory; MB/s as the receiver saw it.
    fn raw_transfer(&self, bytes: u64) -> Result<f64, String> {
        let (a, b) = (self.bed.host("a"), self.bed.host("b"));
        let b_ip = b.ip().ok_or("host B has no address")?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = b.command(&exe);
        cmd.args(["--raw-receive", &b_ip.to_string(), &bytes.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| format!("starting the raw receiver: {e}"))?;
        let mut out = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).map_err(|e| e.to_string())?;
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .ok_or(format!("raw receiver said {line:?}"))?;
        let sent = a
            .run_in(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect((b_ip, port))?;
                s.set_nodelay(true)?;
                let buf = vec![0x5au8; 8 << 20];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                s.shutdown(Shutdown::Write)
            })
            .map_err(|e| e.to_string())?;
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).map_err(|e| e.to_string())?;
        let _ = child.wait();
        sent.map_err(|e| format!("raw transfer: {e}"))?;
        line.trim().strip_prefix("MBPS ").and_then(|v| v.parse().ok()).ok_or(format!("raw receiver said {line:?}"))
    }

    fn once(&self, case: &Case, m: Monitor, run: usize, tls: bool) -> Result<Sample, String> {
        let (a, b, client) = (self.bed.host("a"), self.bed.host("b"), self.bed.client());
        let wire = |ip: Option<Ipv4Addr>| match (tls, ip) {
            (true, Some(ip)) => Ok(Wire::Tls(vmm_tests::pki::pki().host_dir(ip))),
            (true, None) => Err("hosts have no addresses".to_string()),
            (false, _) => Ok(Wire::Plaintext),
        };
        let (wire_a, wire_b) = (wire(a.ip())?, wire(b.ip())?);
        let guest_ip = self.bed.guest_ip(0);
        let spec_a = GuestSpec {
            kernel: &self.guest.kernel,
            initrd: self.guest.initrd.as_deref(),
            cmdline: case.cmdline(&self.guest.cmdline, &self.bed.guest_ip_cmdline(0)),
            mem_mib: case.mem_mib,
            vcpus: case.vcpus,
            net: Some((a.tap(), MAC)),
            disk: None,
        };
        let (src, dst, to) =
            source_and_destination(&self.bed, m, spec_a, [&wire_a, &wire_b], self.ready_timeout, false)?;

        let stream = client
            .run_in(move || TcpStream::connect_timeout(&(guest_ip, ECHO_PORT).into(), Duration::from_secs(5)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connecting to the guest: {e}"))?;
        let echo = EchoStream::start(stream, ECHO_INTERVAL).map_err(|e| e.to_string())?;
        let udp = client
            .run_in(|| UdpSocket::bind("0.0.0.0:0"))
            .map_err(|e| e.to_string())?
            .and_then(|s| UdpStream::start(s, (guest_ip, ECHO_PORT).into(), ECHO_INTERVAL))
            .map_err(|e| format!("the UDP stream: {e}"))?;
        // Let the dirty workload reach its steady rate and the streams get going.
        std::thread::sleep(Duration::from_millis(1500));
        echo.reset_gap();
        udp.reset_gap();
        let result = src.migrate(&to, &dst)?;
        if !src.wait_exit(Duration::from_secs(30)) {
            return Err(format!("{}: the source did not exit after the migration", m.name()));
        }
        std::thread::sleep(Duration::from_millis(1000));
        let new_connection_ok = client
            .run_in(move || -> std::io::Result<bool> {
                let mut s = TcpStream::connect_timeout(&(guest_ip, ECHO_PORT).into(), Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"new\n")?;
                let mut back = [0u8; 4];
                s.read_exact(&mut back)?;
                Ok(&back == b"new\n")
            })
            .map_err(|e| e.to_string())?
            .unwrap_or(false);
        let stats = echo.finish();
        let (datagrams, _) = udp.finish();
        // Debugging aid: VMM_BENCH_DEBUG=1 (with VMM_LOG=debug for our VMM) shows both logs.
        if std::env::var_os("VMM_BENCH_DEBUG").is_some() {
            eprintln!("--- {} source ---\n{}--- destination ---\n{}", m.name(), src.vm.log.text(), dst.vm.log.text());
        }
        drop(dst);
        Ok(Sample {
            case: case.label(),
            monitor: m,
            run,
            tls,
            result,
            largest_gap_ms: ms(stats.largest_gap),
            lines_lost: stats.lost(),
            stream_errors: stats.errors,
            datagrams_lost: datagrams.lost(),
            datagrams_duplicated: datagrams.duplicated,
            largest_datagram_gap_ms: ms(datagrams.largest_gap),
            new_connection_ok,
        })
    }
}

/// Boots `spec_a` on host A of `bed` (over `wires[0]`; its NIC on A's TAP) and waits until the
/// guest answers on its echo port; starts a destination for it on host B (over `wires[1]`, the
/// same NIC on B's TAP) listening on a new port, ready for a migration that may switch to
/// post-copy if `postcopy`. Returns the source, the destination and the address to migrate to.
pub fn source_and_destination(
    bed: &TestBed,
    m: Monitor,
    spec_a: GuestSpec,
    wires: [&Wire; 2],
    ready_timeout: Duration,
    postcopy: bool,
) -> Result<(Running, Running, String), String> {
    let (a, b) = (bed.host("a"), bed.host("b"));
    let b_ip = b.ip().ok_or("host B has no address")?;
    let src = Running::start_wire(m, Some(a), &spec_a, None, Some(wires[0]));
    src.wait_ready(ready_timeout)?;
    bed.client()
        .wait_for_tcp((bed.guest_ip(0), ECHO_PORT).into(), Duration::from_secs(30))
        .map_err(|e| format!("{}: {e}\n{}", m.name(), src.vm.describe()))?;
    let port = PORT.fetch_add(1, Ordering::Relaxed);
    let spec_b = GuestSpec { net: spec_a.net.map(|(_, mac)| (b.tap(), mac)), ..spec_a };
    let dst = Running::start_wire(m, Some(b), &spec_b, Some(&format!("0.0.0.0:{port}")), Some(wires[1]));
    dst.wait_incoming_for(Duration::from_secs(30), postcopy)?;
    Ok((src, dst, format!("{b_ip}:{port}")))
}

/// Streams 2 s of data from a thread in `from` to a listener in `to` at `ip`; MB/s as the
/// receiver saw it.
pub fn stream_rate(from: &Netns, to: &Netns, ip: Ipv4Addr) -> Result<f64, String> {
    // The socket lives in the namespace it was created in, whichever thread accepts on it.
    let listener =
        to.run_in(move || TcpListener::bind((ip, 0))).map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let receiver = std::thread::spawn(move || -> Result<f64, String> {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut start = None;
        loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            start.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        let secs = start.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Ok(if secs > 0.0 { got as f64 / secs / 1e6 } else { 0.0 })
    });
    let sent = from
        .run_in(move || -> std::io::Result<()> {
            let mut s = TcpStream::connect((ip, port))?;
            let buf = vec![0u8; 1 << 20];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(2) {
                s.write_all(&buf)?;
            }
            s.shutdown(Shutdown::Write)
        })
        .map_err(|e| e.to_string())?;
    if let Err(e) = sent {
        // Unblock the receiver's accept before giving up.
        let _ = to.run_in(move || TcpStream::connect((ip, port)));
        let _ = receiver.join();
        return Err(format!("bandwidth: {e}"));
    }
    receiver.join().map_err(|_| "the receiver thread panicked".to_string())?
}
