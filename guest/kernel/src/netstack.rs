// SPDX-License-Identifier: Apache-2.0
//! The guest's network stack (smoltcp) and its services: the echo server on TCP and UDP port
//! 7000, the control service on port 7001, and the discard (7002) and source (7003) services
//! that benchmarks measure one-way throughput with, as the Linux guest's init offers them.

use alloc::vec;
use alloc::vec::Vec;

use guest_common::{CONTROL_PORT, DISCARD_PORT, ECHO_PORT, Ipv4Config, SOURCE_PATTERN, SOURCE_PORT};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address};

use crate::clock;
use crate::virtio_net::VirtioNet;

/// Connections the echo service serves at once (each is one smoltcp socket).
const ECHO_SOCKETS: usize = 8;
/// Echo socket buffers: large enough for a full window at this link's speed.
const ECHO_BUFFER: usize = 256 << 10;
/// Datagrams the UDP echo service holds each way, and their room (a full-size datagram is
/// 1472 bytes here: no IP fragments).
const UDP_PACKETS: usize = 64;
const UDP_BUFFER: usize = 64 << 10;
/// Connections the discard and the source service each serve at once.
const STREAM_SOCKETS: usize = 2;
const CONTROL_SOCKETS: usize = 2;
const CONTROL_BUFFER: usize = 4096;
/// How long a control connection may take to say something.
const CONTROL_IDLE: Duration = Duration::from_secs(30);

/// How long `ping` waits for the reply.
const PING_TIMEOUT_NS: u64 = 2_000_000_000;

/// A `ping` the control service is waiting on: (control connection, target, sent at, sequence).
struct PendingPing {
    control: usize,
    target: Ipv4Address,
    sent_ns: u64,
    seq: u16,
}

/// What the control service asks of the rest of the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Request {
    None,
    Poweroff,
}

struct Control {
    handle: SocketHandle,
    line: Vec<u8>,
    /// Set once `OK` to a poweroff is queued: power off when it has left.
    poweroff_pending: bool,
}

pub struct NetStack {
    pub device: VirtioNet,
    /// The NIC's IOAPIC pin.
    pub irq: u8,
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: Vec<SocketHandle>,
    discard: Vec<SocketHandle>,
    /// Source connections and how far into [`SOURCE_PATTERN`] each has sent.
    source: Vec<(SocketHandle, usize)>,
    control: Vec<Control>,
    /// The UDP echo socket (with the echo service).
    udp_echo: Option<SocketHandle>,
    echo_enabled: bool,
    scratch: Vec<u8>,
    icmp: SocketHandle,
    ping_ident: u16,
    ip: Option<Ipv4Config>,
    last_announce_check_ns: u64,
    ping: Option<PendingPing>,
    ping_seq: u16,
}

pub fn now() -> Instant {
    Instant::from_micros(clock::now_ns() as i64 / 1000)
}

impl NetStack {
    pub fn new(mut device: VirtioNet, ip: Option<Ipv4Config>, echo_enabled: bool) -> Self {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(device.mac)));
        config.random_seed = clock::rdtsc();
        let mut iface = Interface::new(config, &mut device, now());
        if let Some(ip) = ip {
            let [a, b, c, d] = ip.address;
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), ip.prefix_len));
            });
            if let Some([a, b, c, d]) = ip.gateway {
                let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
            }
        }
        let mut sockets = SocketSet::new(vec![]);
        let mut echo = Vec::new();
        let mut discard = Vec::new();
        let mut source = Vec::new();
        if echo_enabled {
            let mut add = |rx: usize, tx: usize| {
                sockets.add(tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; tx])))
            };
            for _ in 0..ECHO_SOCKETS {
                echo.push(add(ECHO_BUFFER, ECHO_BUFFER));
            }
            // One-way services need a big buffer one way only.
            for _ in 0..STREAM_SOCKETS {
                discard.push(add(ECHO_BUFFER, 1024));
                source.push((add(1024, ECHO_BUFFER), 0));
            }
        }
        let udp_echo = echo_enabled.then(|| {
            let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_PACKETS], vec![0; UDP_BUFFER]);
            sockets.add(udp::Socket::new(buffer(), buffer()))
        });
        let mut control = Vec::new();
        for _ in 0..CONTROL_SOCKETS {
            let s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; CONTROL_BUFFER]),
                tcp::SocketBuffer::new(vec![0; CONTROL_BUFFER]),
            );
            control.push(Control { handle: sockets.add(s), line: Vec::new(), poweroff_pending: false });
        }
        let mut icmp_socket = icmp::Socket::new(
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 2048]),
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 2048]),
        );
        // Each guest its own identifier: a socket bound to an identifier swallows incoming echo
        // requests carrying it, and then smoltcp does not answer them.
        let ping_ident = (clock::rdtsc() as u16) | 1;
        let _ = icmp_socket.bind(icmp::Endpoint::Ident(ping_ident));
        let icmp = sockets.add(icmp_socket);
        NetStack {
            device,
            irq: 0,
            iface,
            sockets,
            echo,
            discard,
            source,
            control,
            udp_echo,
            echo_enabled,
            scratch: vec![0; 64 << 10],
            icmp,
            ping_ident,
            ip,
            last_announce_check_ns: 0,
            ping: None,
            ping_seq: 0,
        }
    }

    /// Moves frames and serves sockets until nothing more happens right now. Returns whether
    /// anything happened, and what the control service was asked.
    pub fn poll(&mut self, status_line: &dyn Fn() -> alloc::string::String) -> (bool, Request) {
        let mut busy = false;
        let mut request = Request::None;
        loop {
            let mut progress = false;
            let t = now();
            if self.iface.poll(t, &mut self.device, &mut self.sockets) == smoltcp::iface::PollResult::SocketStateChanged
            {
                progress = true;
            }
            if self.echo_enabled {
                progress |= self.serve_echo();
                progress |= self.serve_udp_echo();
                progress |= self.serve_discard();
                progress |= self.serve_source();
            }
            let (p, r) = self.serve_control(status_line);
            progress |= p;
            progress |= self.serve_ping();
            if r != Request::None {
                request = r;
            }
            // Whatever the sockets queued goes out in this same round.
            self.iface.poll(now(), &mut self.device, &mut self.sockets);
            self.device.flush();
            if !progress && !self.device.rx_ready() {
                break;
            }
            busy = true;
        }
        (busy, request)
    }

    /// After a migration the NIC asks the guest to announce itself: gratuitous ARP (request and
    /// reply form) for our address, so switches and peers learn where we are, then the
    /// acknowledgement that clears the request.
    pub fn announce_if_asked(&mut self, now_ns: u64) {
        self.last_announce_check_ns = now_ns;
        if !self.device.announce_requested() {
            return;
        }
        self.announce();
        self.device.ack_announce();
        self.device.flush();
    }

    /// Gratuitous ARP for our address, request and reply form: at boot, so that switches
    /// that knew our MAC elsewhere (a guest that was here before) learn where it is now, and
    /// when the NIC asks after a migration.
    pub fn announce(&mut self) {
        if let Some(ip) = self.ip {
            let mac = self.device.mac;
            self.device.send_raw(&guest_common::arp::garp_request(mac, ip.address));
            self.device.send_raw(&guest_common::arp::garp_reply(mac, ip.address));
            self.device.flush();
        }
    }

    /// [`Self::announce_if_asked`] at most every 100 ms (one MMIO read each time).
    pub fn maybe_check_announce(&mut self, now_ns: u64) {
        if now_ns.saturating_sub(self.last_announce_check_ns) >= 100_000_000 {
            self.announce_if_asked(now_ns);
        }
    }

    /// When smoltcp next needs to run (retransmits, delayed ACKs), in kvmclock nanoseconds.
    pub fn next_deadline_ns(&mut self) -> Option<u64> {
        let t = now();
        let stack = self.iface.poll_delay(t, &self.sockets).map(|d| clock::now_ns() + d.total_micros() * 1000);
        let ping = self.ping.as_ref().map(|p| p.sent_ns + PING_TIMEOUT_NS);
        match (stack, ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn serve_echo(&mut self) -> bool {
        let mut progress = false;
        for &h in &self.echo {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if !s.is_open() {
                // Back to listening, so a new connection can come in at any time.
                let _ = s.listen(ECHO_PORT);
                continue;
            }
            // Echo as much as the send buffer takes; the rest waits in the receive buffer,
            // which shrinks the window and so slows the sender: no byte is ever dropped.
            while s.can_recv() && s.can_send() {
                let room = (s.send_capacity() - s.send_queue()).min(self.scratch.len());
                if room == 0 {
                    break;
                }
                let n = match s.recv_slice(&mut self.scratch[..room]) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                let sent = s.send_slice(&self.scratch[..n]).unwrap_or(0);
                debug_assert_eq!(sent, n, "room was checked");
                progress = true;
            }
            if !s.may_recv() && s.recv_queue() == 0 && s.may_send() {
                // The peer finished sending and everything was echoed: close our side too.
                s.close();
                progress = true;
            }
        }
        progress
    }

    /// Sends every datagram back to where it came from, from the address it came to. A datagram
    /// that finds the send buffer full is dropped, as UDP may.
    fn serve_udp_echo(&mut self) -> bool {
        let Some(h) = self.udp_echo else { return false };
        let s = self.sockets.get_mut::<udp::Socket>(h);
        if !s.is_open() {
            let _ = s.bind(ECHO_PORT);
        }
        let mut progress = false;
        loop {
            match s.recv_slice(&mut self.scratch) {
                Ok((n, meta)) => {
                    let _ = s.send_slice(&self.scratch[..n], meta);
                    progress = true;
                }
                // Larger than our scratch buffer: cannot happen without IP fragments; dropped.
                Err(udp::RecvError::Truncated) => progress = true,
                Err(udp::RecvError::Exhausted) => break,
            }
        }
        progress
    }

    fn serve_discard(&mut self) -> bool {
        let mut progress = false;
        for &h in &self.discard {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if !s.is_open() {
                let _ = s.listen(DISCARD_PORT);
                continue;
            }
            // Dropped where it lies: nothing is copied.
            while let Ok(n) = s.recv(|b| (b.len(), b.len()))
                && n > 0
            {
                progress = true;
            }
            if !s.may_recv() && s.may_send() {
                s.close();
                progress = true;
            }
        }
        progress
    }

    fn serve_source(&mut self) -> bool {
        let mut progress = false;
        for (h, offset) in &mut self.source {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_open() {
                *offset = 0;
                let _ = s.listen(SOURCE_PORT);
                continue;
            }
            // The client ends the stream by closing its side (or resetting).
            if !s.may_recv() {
                if s.may_send() {
                    s.close();
                    progress = true;
                }
                continue;
            }
            // Also drain whatever the client sends, so its close is seen.
            while let Ok(n) = s.recv(|b| (b.len(), b.len()))
                && n > 0
            {}
            while s.can_send() {
                let n = s
                    .send(|buf| {
                        let mut n = 0;
                        while n < buf.len() {
                            let chunk = &SOURCE_PATTERN[*offset..];
                            let k = chunk.len().min(buf.len() - n);
                            buf[n..n + k].copy_from_slice(&chunk[..k]);
                            n += k;
                            *offset = (*offset + k) % SOURCE_PATTERN.len();
                        }
                        (n, n)
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                progress = true;
            }
        }
        progress
    }

    fn serve_control(&mut self, status_line: &dyn Fn() -> alloc::string::String) -> (bool, Request) {
        let mut progress = false;
        let mut request = Request::None;
        let mut ping_request = None;
        for (ci, c) in self.control.iter_mut().enumerate() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                c.line.clear();
                c.poweroff_pending = false;
                let _ = s.listen(CONTROL_PORT);
                s.set_timeout(Some(CONTROL_IDLE));
                continue;
            }
            if c.poweroff_pending {
                if s.send_queue() == 0 {
                    request = Request::Poweroff;
                }
                continue;
            }
            let mut buf = [0u8; 256];
            while let Ok(n) = s.recv_slice(&mut buf) {
                if n == 0 {
                    break;
                }
                progress = true;
                for &b in &buf[..n] {
                    if b != b'\n' {
                        // A line longer than any command is junk; keep the tail only.
                        if c.line.len() < 128 {
                            c.line.push(b);
                        }
                        continue;
                    }
                    let line = core::str::from_utf8(&c.line).unwrap_or("").trim();
                    let reply = match line {
                        "status" => status_line(),
                        l if l.starts_with("ping ") => match l[5..].trim().parse::<Ipv4Address>() {
                            Ok(ip) => {
                                // Answered when the echo reply comes (see serve_ping).
                                ping_request = Some((ci, ip));
                                alloc::string::String::new()
                            }
                            Err(_) => alloc::format!("ERROR not an IPv4 address: '{}'", &l[5..]),
                        },
                        "poweroff" => {
                            c.poweroff_pending = true;
                            "OK".into()
                        }
                        "" => alloc::string::String::new(),
                        _ => alloc::format!("ERROR unknown command '{line}'"),
                    };
                    if !reply.is_empty() {
                        let _ = s.send_slice(reply.as_bytes());
                        let _ = s.send_slice(b"\n");
                    }
                    c.line.clear();
                }
            }
            if !s.may_recv() && s.may_send() && !c.poweroff_pending {
                s.close();
            }
        }
        if let Some((control, target)) = ping_request {
            self.start_ping(control, target);
        }
        (progress, request)
    }

    fn control_reply(&mut self, control: usize, text: &str) {
        if let Some(c) = self.control.get(control) {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            let _ = s.send_slice(text.as_bytes());
            let _ = s.send_slice(b"\n");
        }
    }

    fn start_ping(&mut self, control: usize, target: Ipv4Address) {
        if self.ping.is_some() {
            self.control_reply(control, "ERROR a ping is already in flight");
            return;
        }
        self.ping_seq = self.ping_seq.wrapping_add(1);
        let repr = Icmpv4Repr::EchoRequest { ident: self.ping_ident, seq_no: self.ping_seq, data: b"vmm-guest-ping" };
        let s = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        match s.send(repr.buffer_len(), IpAddress::Ipv4(target)) {
            Ok(buf) => {
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &ChecksumCapabilities::default());
                self.ping = Some(PendingPing { control, target, sent_ns: clock::now_ns(), seq: self.ping_seq });
            }
            Err(_) => self.control_reply(control, &alloc::format!("NO-REPLY {target} (cannot send)")),
        }
    }

    /// Answers a pending `ping` when its echo reply arrives or it times out.
    fn serve_ping(&mut self) -> bool {
        let Some(p) = &self.ping else { return false };
        let (control, target, sent_ns, seq) = (p.control, p.target, p.sent_ns, p.seq);
        let ping_ident = self.ping_ident;
        let s = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        while let Ok((data, from)) = s.recv() {
            let Ok(packet) = Icmpv4Packet::new_checked(data) else { continue };
            let Ok(repr) = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default()) else { continue };
            if let Icmpv4Repr::EchoReply { ident, seq_no, .. } = repr
                && ident == ping_ident
                && seq_no == seq
                && from == IpAddress::Ipv4(target)
            {
                let rtt_us = (clock::now_ns() - sent_ns) / 1000;
                self.ping = None;
                self.control_reply(control, &alloc::format!("PONG {target} rtt_us={rtt_us}"));
                return true;
            }
        }
        if clock::now_ns() - sent_ns > PING_TIMEOUT_NS {
            self.ping = None;
            self.control_reply(control, &alloc::format!("NO-REPLY {target}"));
            return true;
        }
        false
    }
}
