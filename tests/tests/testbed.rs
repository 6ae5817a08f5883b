// SPDX-License-Identifier: Apache-2.0
//! Tests of the network test bed itself: topology, L3 and L2 connectivity over the segment,
//! isolation of concurrent beds, removal of TAPs and hosts, and cleanup on drop and on panic.
//!
//! They need root and iproute2, like the end-to-end tests that use the bed.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::panic::{self, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm_tests::l2::{self, BROADCAST_MAC, ETHERTYPE_EXPERIMENTAL};
use vmm_tests::{Netns, TestBed, TestBedError, list_netns, sweep_stale};

const TIMEOUT: Duration = Duration::from_secs(5);
/// A locally administered MAC for frames that pretend to come from a guest.
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE_ARP: u16 = 0x0806;

/// Interface names of the root namespace (`ip -o link`).
fn root_links() -> BTreeSet<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().expect("ip -o link");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // "4: eth0: <...> ..." or "5: veth0@if4: <...>"
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect()
}

/// Namespaces of the bed with id `id` that still exist.
fn leftovers(id: &str) -> Vec<String> {
    list_netns()
        .expect("list namespaces")
        .into_iter()
        .filter(|name| name == id || name.starts_with(&format!("{id}-")))
        .collect()
}

fn has_link(netns: &Netns, ifname: &str) -> bool {
    netns.run_ip(&["link", "show", ifname]).is_ok()
}

/// Starts an echo server on `ip` inside `server`, connects to it from inside `from` and checks
/// that bytes make the round trip.
fn tcp_echo(from: &Netns, server: &Netns, ip: Ipv4Addr) {
    let listener =
        server.run_in(|| TcpListener::bind((ip, 0))).expect("enter server namespace").expect("bind listener");
    let addr = listener.local_addr().expect("listener address");
    // The listener already lives in the server's namespace: a plain thread can serve it.
    let echo = thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.expect("accept");
            let mut buf = [0u8; 5];
            // wait_for_tcp's probe connects and closes without sending anything.
            if stream.read_exact(&mut buf).is_ok() {
                stream.write_all(&buf).expect("server write");
                return;
            }
        }
    });
    from.wait_for_tcp(addr, TIMEOUT).expect("server reachable");
    let reply = from
        .run_in(|| {
            let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>(buf)
        })
        .expect("enter client namespace");
    assert_eq!(&reply.expect("echo round trip"), b"hello");
    echo.join().expect("echo server");
}

/// Calls `send` until a frame matching `pred` arrives on `rx`, for at most [`TIMEOUT`]. Resending
/// covers the moment a bridge port needs to start forwarding after a TAP's carrier came up.
fn send_until_seen(
    mut send: impl FnMut(),
    rx: &mut std::fs::File,
    mut pred: impl FnMut(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        send();
        let frame = l2::wait_for_frame(rx, Duration::from_millis(200), &mut pred).expect("read");
        if frame.is_some() {
            return frame;
        }
    }
    None
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn ethertype(frame: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?))
}

/// An ARP request (opcode 1) asking for `target`.
fn is_arp_request_for(frame: &[u8], target: Ipv4Addr) -> bool {
    ethertype(frame) == Some(ETHERTYPE_ARP)
        && frame.get(20..22) == Some(&[0, 1])
        && frame.get(38..42) == Some(&target.octets())
}

/// An ARP reply from `(sha, spa)` to `(tha, tpa)`.
fn arp_reply(sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 2];
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa.octets());
    l2::ethernet_frame(tha, sha, ETHERTYPE_ARP, &arp)
}

#[test]
fn hosts_and_client_share_a_segment() {
    let bed = TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build test bed");

    let existing = list_netns().expect("list namespaces");
    let names = bed.netns_names();
    assert_eq!(names.len(), 4, "segment, a, b, client: {names:?}");
    for name in &names {
        assert!(existing.contains(name), "{name} missing from {existing:?}");
        assert!(bed.owns_netns(name));
    }
    assert_eq!(bed.host("a").netns(), format!("{}-a", bed.id()));

    for host in bed.hosts() {
        let tap = host.run_ip(&["-d", "link", "show", host.tap()]).expect("TAP exists");
        assert!(tap.contains("tun type tap"), "{tap}");
        assert!(tap.contains("master br0"), "{tap}");
        let uplink = host.run_ip(&["-d", "link", "show", "uplink"]).expect("uplink exists");
        assert!(uplink.contains("veth") && uplink.contains("master br0"), "{uplink}");
    }

    let [a, b, c, _] = bed.subnet().octets();
    let a_ip = Ipv4Addr::new(a, b, c, 10);
    let b_ip = Ipv4Addr::new(a, b, c, 11);
    assert_eq!(bed.host("a").ip(), Some(a_ip));
    assert_eq!(bed.host("b").ip(), Some(b_ip));
    assert_eq!(bed.client().ip(), Ipv4Addr::new(a, b, c, 1));
    assert_eq!(bed.client_ip(), bed.client().ip());
    assert_eq!(bed.guest_ip(3), Ipv4Addr::new(a, b, c, 103));
    assert_eq!(bed.guest_ip_cmdline(0), format!("ip={a}.{b}.{c}.100::{a}.{b}.{c}.1:255.255.255.0::eth0:off"));

    // The client reaches both hosts, and host a reaches host b (a migration connection).
    tcp_echo(bed.client(), bed.host("a"), a_ip);
    tcp_echo(bed.client(), bed.host("b"), b_ip);
    tcp_echo(bed.host("a"), bed.host("b"), b_ip);

    // command() runs the program inside the namespace.
    let out = bed
        .client()
        .command("ip")
        .args(["-o", "-4", "addr", "show", "dev", bed.client().interface()])
        .output()
        .expect("ip netns exec");
    assert!(out.status.success());
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(addrs.contains(&format!("{}/24", bed.client_ip())), "{addrs}");
}

#[test]
fn frames_pass_between_the_client_and_a_hosts_tap() {
    let bed = TestBed::builder().host("a").client("client").build().expect("build test bed");
    let host = bed.host("a");
    let client = bed.client();

    // Hosts are L2 only unless asked otherwise.
    assert_eq!(host.ip(), None);
    for dev in ["br0", "uplink", "tap0"] {
        let addrs = host.run_ip(&["-o", "-4", "addr", "show", "dev", dev]).expect("ip addr");
        assert!(addrs.trim().is_empty(), "{dev}: {addrs}");
    }

    let mut tap = host.open_tap().expect("attach to tap0");
    let mut sock = client.open_packet_socket(client.interface()).expect("packet socket");

    // A broadcast from the client arrives on the TAP.
    let token = format!("to-tap {}", bed.id());
    let frame = l2::ethernet_frame(BROADCAST_MAC, [0x02, 0, 0, 0, 0, 0x02], ETHERTYPE_EXPERIMENTAL, token.as_bytes());
    let seen = send_until_seen(
        || {
            sock.write_all(&frame).expect("send from client");
        },
        &mut tap,
        |f| contains(f, token.as_bytes()),
    );
    assert!(seen.is_some(), "broadcast from the client never reached tap0");

    // So does the ARP request of a client that looks for a guest.
    let guest = bed.guest_ip(0);
    let udp =
        client.run_in(|| UdpSocket::bind((bed.client_ip(), 0))).expect("enter client namespace").expect("bind UDP");
    let request = send_until_seen(
        || {
            udp.send_to(b"ping", (guest, 9)).expect("send UDP");
        },
        &mut tap,
        |f| is_arp_request_for(f, guest),
    )
    .expect("ARP request for the guest never reached tap0");
    assert_eq!(&request[28..32], &bed.client_ip().octets(), "ARP sender IP");
    let client_mac: [u8; 6] = request[22..28].try_into().expect("6 bytes");

    // A frame written into the TAP (as by a guest) reaches the client.
    let token = format!("from-tap {}", bed.id());
    let frame = l2::ethernet_frame(BROADCAST_MAC, GUEST_MAC, ETHERTYPE_EXPERIMENTAL, token.as_bytes());
    let seen = send_until_seen(
        || {
            tap.write_all(&frame).expect("write to tap0");
        },
        &mut sock,
        |f| f[6..12] == GUEST_MAC && contains(f, token.as_bytes()),
    );
    assert!(seen.is_some(), "frame written to tap0 never reached the client");

    // Answer the ARP like a guest would: the client then sends its datagrams to the guest's
    // MAC, which shows that unicast forwarding works both ways.
    let reply = arp_reply(GUEST_MAC, guest, client_mac, bed.client_ip());
    let mut tap_tx = tap.try_clone().expect("dup tap0 fd");
    let datagram = send_until_seen(
        || {
            tap_tx.write_all(&reply).expect("write ARP reply");
            udp.send_to(b"ping", (guest, 9)).expect("send UDP");
        },
        &mut tap,
        |f| f[0..6] == GUEST_MAC && ethertype(f) == Some(0x0800) && f[30..34] == guest.octets(),
    );
    let datagram = datagram.expect("no unicast IPv4 frame for the guest's MAC on tap0");
    assert!(contains(&datagram, b"ping"));
}

#[test]
fn dropping_the_bed_removes_everything() {
    let links_before = root_links();
    let bed = TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build test bed");
    let id = bed.id().to_string();
    let host = bed.host("a");
    let sleeper = host.spawn(host.command("sleep").arg("600")).expect("spawn sleep");
    assert!(sleeper.try_wait().expect("try_wait").is_none());
    assert_eq!(leftovers(&id).len(), 4);

    drop(bed);

    let status = sleeper.try_wait().expect("try_wait");
    assert!(status.is_some(), "sleep in host a was not killed");
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert_eq!(root_links(), links_before, "root namespace interfaces changed");
}

#[test]
fn a_bed_dropped_during_a_panic_removes_everything() {
    let links_before = root_links();
    let mut seen = None;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let bed = TestBed::builder().host("a").client("client").host_ips().build().expect("build test bed");
        let client = bed.client();
        let sleeper = client.spawn(client.command("sleep").arg("600")).expect("spawn sleep");
        seen = Some((bed.id().to_string(), sleeper));
        panic!("deliberate panic with a live test bed");
    }));
    assert!(result.is_err());

    let (id, sleeper) = seen.expect("the closure ran up to the panic");
    let status = sleeper.try_wait().expect("try_wait");
    assert!(status.is_some(), "sleep in the client was not killed");
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert_eq!(root_links(), links_before, "root namespace interfaces changed");
}

#[test]
fn removing_a_tap_and_a_host_leaves_the_others_working() {
    let mut bed =
        TestBed::builder().host("a").host("b").host("c").client("client").host_ips().build().expect("build test bed");
    let a_ip = bed.host("a").ip().expect("host a has an address");
    let b_ip = bed.host("b").ip().expect("host b has an address");
    let c_ip = bed.host("c").ip().expect("host c has an address");
    let a_netns = bed.host("a").netns().to_string();
    let host = bed.host("a");
    let sleeper = host.spawn(host.command("sleep").arg("600")).expect("spawn sleep");

    bed.remove_tap("a").expect("remove tap of a");
    assert!(!has_link(bed.host("a"), "tap0"));
    assert!(has_link(bed.host("b"), "tap0"));
    // Host a keeps its address and bridge (whose MAC must not change with the TAP gone).
    tcp_echo(bed.client(), bed.host("a"), a_ip);

    // A second removal fails with the command line and ip's complaint.
    match bed.remove_tap("a") {
        Err(TestBedError::Command { cmdline, stderr, .. }) => {
            assert!(cmdline.contains("link del tap0"), "{cmdline}");
            assert!(!stderr.is_empty());
        }
        other => panic!("expected a failed ip command, got {other:?}"),
    }

    bed.remove_host("a").expect("remove host a");
    assert!(bed.try_host("a").is_none());
    assert!(!list_netns().expect("list").contains(&a_netns), "{a_netns} still exists");
    assert!(sleeper.try_wait().expect("try_wait").is_some(), "sleep in a survived");
    assert!(!has_link(bed.segment(), "port0"), "host a still plugged in");
    assert!(has_link(bed.segment(), "port1"));

    tcp_echo(bed.client(), bed.host("b"), b_ip);
    tcp_echo(bed.host("b"), bed.host("c"), c_ip);
    assert_eq!(bed.host("c").ip(), Some(c_ip), "addresses do not shift");

    assert!(matches!(bed.remove_host("a"), Err(TestBedError::UnknownHost(_))));
    assert!(matches!(bed.remove_tap("a"), Err(TestBedError::UnknownHost(_))));
}

#[test]
fn two_beds_at_once_do_not_clash() {
    let build = || TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build test bed");
    let (one, two) = thread::scope(|s| {
        let one = s.spawn(build);
        let two = s.spawn(build);
        (one.join().expect("bed one"), two.join().expect("bed two"))
    });
    assert_ne!(one.id(), two.id());
    assert_ne!(one.subnet(), two.subnet());
    let one_names: BTreeSet<_> = one.netns_names().into_iter().collect();
    assert!(two.netns_names().iter().all(|name| !one_names.contains(name)));
    assert!(two.netns_names().iter().all(|name| !one.owns_netns(name)));

    for bed in [&one, &two] {
        let a_ip = bed.host("a").ip().expect("address");
        tcp_echo(bed.client(), bed.host("a"), a_ip);
    }

    // The segments are separate L2 domains: a broadcast in one never shows up in the other.
    let mut seg_one = one.segment().open_packet_socket("br0").expect("sniff one");
    let mut seg_two = two.segment().open_packet_socket("br0").expect("sniff two");
    let mut tx = one.client().open_packet_socket("uplink").expect("packet socket");
    let token = format!("only in {}", one.id());
    let frame = l2::ethernet_frame(BROADCAST_MAC, [0x02, 0, 0, 0, 0, 0x03], ETHERTYPE_EXPERIMENTAL, token.as_bytes());
    let seen = send_until_seen(
        || {
            tx.write_all(&frame).expect("send");
        },
        &mut seg_one,
        |f| contains(f, token.as_bytes()),
    );
    assert!(seen.is_some(), "broadcast missing on its own segment");
    let leaked =
        l2::wait_for_frame(&mut seg_two, Duration::from_millis(500), |f| contains(f, token.as_bytes())).expect("read");
    assert!(leaked.is_none(), "broadcast leaked into the other bed");

    let one_id = one.id().to_string();
    drop(one);
    assert_eq!(leftovers(&one_id), Vec::<String>::new());
    let a_ip = two.host("a").ip().expect("address");
    tcp_echo(two.client(), two.host("a"), a_ip);
}

#[test]
fn sweep_removes_only_namespaces_of_dead_processes() {
    let bed = TestBed::builder().host("a").build().expect("build test bed");
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    // No process can have a pid above pid_max; and this process never gets to bed u32::MAX, so
    // a bed with that number is from an earlier process that had our pid. (The first bed number
    // is our pid so that test binaries running at once do not create the same name.)
    let stale = [
        format!("vmmtb-{}-{}-x", pid_max + 1, std::process::id()),
        format!("vmmtb-{}-{}", std::process::id(), u32::MAX),
    ];
    for name in &stale {
        let status = Command::new("ip").args(["netns", "add", name]).status().expect("ip netns add");
        assert!(status.success());
    }
    let swept = sweep_stale();
    let remaining = list_netns().expect("list namespaces");
    // Clean up by hand in case the sweep did not, before asserting.
    for name in stale.iter().filter(|name| remaining.contains(name)) {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
    swept.expect("sweep");
    for name in &stale {
        assert!(!remaining.contains(name), "{name} was not swept");
    }
    for name in bed.netns_names() {
        assert!(remaining.contains(&name), "live bed namespace {name} was swept");
    }
}

#[test]
fn threads_and_processes_run_inside_the_namespace() {
    let bed = TestBed::builder().client("client").build().expect("build test bed");
    let client = bed.client();
    let netns_of_thread = || std::fs::read_link("/proc/thread-self/ns/net").expect("readlink");

    let own = netns_of_thread();
    let inside = client.run_in(netns_of_thread).expect("run_in");
    assert_ne!(own, inside);
    assert_eq!(netns_of_thread(), own, "the calling thread must not move");
    let out = client.command("readlink").arg("/proc/self/ns/net").output().expect("readlink in the namespace");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), inside.to_string_lossy());

    // IPv6 is off inside the bed (a quiet segment), which says nothing about the root namespace.
    let out =
        client.command("cat").arg("/proc/sys/net/ipv6/conf/all/disable_ipv6").output().expect("cat in the namespace");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // A panic in the closure reaches the caller.
    let result = panic::catch_unwind(AssertUnwindSafe(|| client.run_in(|| panic!("deliberate panic inside run_in"))));
    assert!(result.is_err());

    // A background thread serving on the namespace's loopback.
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let server = client
        .spawn_in(move || {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let _ = port_tx.send(listener.local_addr()?.port());
            let (mut stream, _) = listener.accept()?;
            stream.write_all(b"hi")?;
            Ok::<_, std::io::Error>(())
        })
        .expect("spawn_in");
    let port = port_rx.recv_timeout(TIMEOUT).expect("server port");
    let greeting = client
        .run_in(|| {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
            let mut buf = String::new();
            stream.read_to_string(&mut buf)?;
            Ok::<_, std::io::Error>(buf)
        })
        .expect("run_in")
        .expect("connect over the namespace's loopback");
    assert_eq!(greeting, "hi");
    server.join().expect("server");

    // Processes: exit status, piped output, signals.
    let done = client.spawn(&mut client.command("true")).expect("spawn");
    let status = done.wait_timeout(TIMEOUT).expect("wait").expect("exited");
    assert!(status.success());

    let mut cmd = client.command("ip");
    cmd.args(["-o", "-4", "addr", "show", "dev", "uplink"]).stdout(Stdio::piped());
    let ip = client.spawn(&mut cmd).expect("spawn");
    let mut addrs = String::new();
    ip.take_stdout().expect("piped stdout").read_to_string(&mut addrs).expect("read stdout");
    assert!(addrs.contains(&bed.client_ip().to_string()), "{addrs}");
    assert!(ip.wait_timeout(TIMEOUT).expect("wait").is_some());

    let sleeper = client.spawn(client.command("sleep").arg("600")).expect("spawn");
    sleeper.signal(libc::SIGTERM).expect("SIGTERM");
    let status = sleeper.wait_timeout(TIMEOUT).expect("wait").expect("exited");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
}

#[test]
fn invalid_beds_are_rejected_before_anything_is_created() {
    assert!(matches!(TestBed::builder().host("a").host("a").build(), Err(TestBedError::DuplicateName(_))));
    assert!(matches!(TestBed::builder().host("a").client("a").build(), Err(TestBedError::DuplicateName(_))));
    assert!(matches!(TestBed::builder().host("a/b").build(), Err(TestBedError::InvalidName(_))));
    assert!(matches!(TestBed::builder().host("").build(), Err(TestBedError::InvalidName(_))));
}
