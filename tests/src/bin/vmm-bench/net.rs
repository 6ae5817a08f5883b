// SPDX-License-Identifier: Apache-2.0
//! Network: client ↔ guest TCP throughput each way, request/response latency and the UDP echo
//! rate, through a TAP on a bridge, the client in its own namespace (as in the tests).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use guest_common::{DISCARD_PORT, ECHO_PORT, SOURCE_PATTERN, SOURCE_PORT};
use vmm_tests::TestBed;

use crate::monitor::{GuestImage, GuestSpec, Monitor, Running};
use crate::results::{Better, Results};

const MAC: &str = "52:54:00:be:4c:01";
/// How long each throughput sample streams.
const STREAM_TIME: Duration = Duration::from_secs(2);
const RR_COUNT: usize = 2000;
/// Datagrams the UDP rate keeps in flight.
const UDP_WINDOW: usize = 16;
/// The UDP rate's row.
pub const UDP_RATE: &str = "UDP echo, 64-byte datagrams, 16 in flight";

pub fn bench(results: &mut Results, runs: usize, guest: &GuestImage, ready_timeout: Duration) -> Result<(), String> {
    let bed = TestBed::builder().host("a").client("client").build().map_err(|e| e.to_string())?;
    let ip = bed.guest_ip(0);
    let section = guest.section("network");
    // Any one read, write or connect: 15 s for our guest, 2 minutes for Linux, which may be
    // emulated (draining the socket buffers after an upload then takes tens of seconds).
    let io_timeout = ready_timeout / 2;
    let spec = GuestSpec {
        kernel: &guest.kernel,
        initrd: guest.initrd.as_deref(),
        cmdline: format!("{} {} vmm.workload=echo", guest.cmdline, bed.guest_ip_cmdline(0)),
        mem_mib: 256,
        vcpus: 1,
        net: Some((bed.host("a").tap(), MAC)),
        disk: None,
    };
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let r = Running::start(m, Some(bed.host("a")), &spec, None);
            r.wait_ready(ready_timeout)?;
            let client = bed.client();
            client.wait_for_tcp((ip, ECHO_PORT).into(), Duration::from_secs(10)).map_err(|e| e.to_string())?;
            let (up, down, rr, udp) = client
                .run_in(move || -> Result<_, String> {
                    Ok((
                        upload(ip, io_timeout)?,
                        download(ip, io_timeout)?,
                        round_trips(ip, io_timeout)?,
                        udp_rate(ip)?,
                    ))
                })
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{}: {e}\n{}", m.name(), r.vm.describe()))?;
            results.add(&section, "client → guest throughput", "MB/s", Better::Higher, m, up);
            results.add(&section, "guest → client throughput", "MB/s", Better::Higher, m, down);
            results.add(&section, "request/response latency, median", "µs", Better::Lower, m, rr.0);
            results.add(&section, "request/response latency, 99th percentile", "µs", Better::Lower, m, rr.1);
            results.add(&section, UDP_RATE, "datagrams/s", Better::Higher, m, udp);
            drop(r);
        }
    }
    Ok(())
}

fn connect(ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&(ip, port).into(), timeout)
        .map_err(|e| format!("connecting to {ip}:{port}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    Ok(s)
}

/// To the discard service: counts only what the guest took, by waiting for its close after
/// ours (it closes once it has read everything).
fn upload(ip: Ipv4Addr, timeout: Duration) -> Result<f64, String> {
    let mut s = connect(ip, DISCARD_PORT, timeout)?;
    let buf = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < STREAM_TIME {
        s.write_all(&buf).map_err(|e| format!("upload: {e}"))?;
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut rest = [0u8; 64];
    let _ = s.read(&mut rest).map_err(|e| format!("upload: waiting for the guest's close: {e}"))?;
    Ok(sent as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// From the source service, checking that every byte is the pattern.
fn download(ip: Ipv4Addr, timeout: Duration) -> Result<f64, String> {
    let mut s = connect(ip, SOURCE_PORT, timeout)?;
    let mut buf = vec![0u8; 256 << 10];
    let start = Instant::now();
    let mut got = 0u64;
    while start.elapsed() < STREAM_TIME {
        let n = s.read(&mut buf).map_err(|e| format!("download: {e}"))?;
        if n == 0 {
            return Err("download: the guest closed the stream".into());
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            let at = (got as usize + i) % SOURCE_PATTERN.len();
            if b != SOURCE_PATTERN[at] {
                return Err(format!("download: wrong byte at offset {}", got as usize + i));
            }
        }
        got += n as u64;
    }
    let rate = got as f64 / start.elapsed().as_secs_f64() / 1e6;
    Ok(rate)
}

/// Datagrams through the UDP echo service for [`STREAM_TIME`], [`UDP_WINDOW`] in flight: each
/// reply sends the next one. A window that went silent for 200 ms (its datagrams lost) is sent
/// again. Returns the replies per second.
fn udp_rate(ip: Ipv4Addr) -> Result<f64, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp: {e}"))?;
    s.connect((ip, ECHO_PORT)).map_err(|e| format!("udp: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
    let msg = [b'u'; 64];
    let mut back = [0u8; 128];
    let send_window = || -> Result<(), String> {
        for _ in 0..UDP_WINDOW {
            s.send(&msg).map_err(|e| format!("udp: {e}"))?;
        }
        Ok(())
    };
    send_window()?;
    let start = Instant::now();
    let mut got = 0u64;
    while start.elapsed() < STREAM_TIME {
        match s.recv(&mut back) {
            Ok(n) if back[..n] == msg => {
                got += 1;
                s.send(&msg).map_err(|e| format!("udp: {e}"))?;
            }
            Ok(_) => return Err("udp: the guest sent back something else".into()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                send_window()?;
            }
            Err(e) => return Err(format!("udp: {e}")),
        }
    }
    if got == 0 {
        return Err("udp: the guest echoed no datagram".into());
    }
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

/// Small messages to the echo service, one at a time: (median, 99th percentile) in µs.
fn round_trips(ip: Ipv4Addr, timeout: Duration) -> Result<(f64, f64), String> {
    let mut s = connect(ip, ECHO_PORT, timeout)?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let msg = [b'r'; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(RR_COUNT);
    for _ in 0..RR_COUNT {
        let t = Instant::now();
        s.write_all(&msg).map_err(|e| format!("echo: {e}"))?;
        s.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if back != msg {
            return Err("echo: the guest sent back something else".into());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 99 / 100]))
}
