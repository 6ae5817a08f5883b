// SPDX-License-Identifier: Apache-2.0
//! The migration transport over loopback, with certificates made by `vmm::transport::pki`:
//! mutual TLS both ways; every refusal (wrong name, unknown CA on either side, expired, no
//! client certificate, plaintext against TLS both ways, garbage, a peer that connects and
//! stalls) is a sentence on the refusing side, and the destination then still takes the real
//! source; `--incoming-fd` sockets (listening and connected).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use migration::protocol::{self, Command};
use vmm::transport::pki::{self, HostSpec};
use vmm::transport::{
    IncomingSocket, LinkConfig, MigrationListener, MigrationStream, Security, TransportError, accept_connection,
    channel_from_fd, connect, socket_from_fd,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A directory removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("vmm-transport-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spec(name: &str, ips: &[IpAddr]) -> HostSpec {
    HostSpec::new(name, ips, 30).unwrap()
}

/// A cluster: a CA with host `a` (127.0.0.1) in `ca`, and `issue`d identities.
struct Cluster {
    ca: Dir,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let ca = Dir::new(&format!("{tag}-ca"));
        pki::init(&ca.0, &spec("host-a", &[LOOPBACK])).unwrap();
        Cluster { ca }
    }

    fn issue(&self, tag: &str, host: &HostSpec) -> Dir {
        let d = Dir::new(tag);
        pki::issue(&self.ca.0, &d.0, host).unwrap();
        d
    }
}

fn tls(dir: &Path) -> Security {
    Security::tls(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A listener on 127.0.0.1 and its `host:port`.
fn listen(security: Security) -> (MigrationListener, String) {
    let l = MigrationListener::bind("127.0.0.1:0", security, LinkConfig::default()).unwrap();
    let to = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
    (l, to)
}

/// Accepts on a thread: the first stream that passes.
fn accept_in_background(l: MigrationListener) -> thread::JoinHandle<Result<MigrationStream, TransportError>> {
    thread::spawn(move || l.accept())
}

/// The source writes first (as a real one sends `Start` at once: a plaintext destination
/// takes a connection once its first bytes came), then both ends exchange a line.
fn exchange(
    src: &mut MigrationStream,
    dst: thread::JoinHandle<Result<MigrationStream, TransportError>>,
) -> MigrationStream {
    src.write_all(b"from the source\n").unwrap();
    let mut dst = dst.join().unwrap().unwrap();
    let mut got = [0u8; 16];
    dst.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the source\n");
    dst.write_all(b"ok\n").unwrap();
    let mut back = [0u8; 3];
    src.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ok\n");
    dst
}

fn expect_refused(r: Result<MigrationStream, TransportError>, needles: &[&str]) -> String {
    let e = match r {
        Ok(_) => panic!("connected, but expected a refusal with {needles:?}"),
        Err(e) => e.to_string(),
    };
    println!("refused: {e}");
    assert!(needles.iter().any(|n| e.contains(n)), "{e:?} lacks any of {needles:?}");
    e
}

#[test]
fn mutual_tls_carries_bytes_both_ways_and_names_both_peers() {
    let c = Cluster::new("ok");
    let b = c.issue("ok-b", &spec("host-b", &[LOOPBACK]));
    let (l, to) = listen(tls(&b.0));
    let dst = accept_in_background(l);
    let mut src = connect(&to, &tls(&c.ca.0), &LinkConfig::default()).unwrap();
    let mut dst = exchange(&mut src, dst);
    assert!(src.is_tls() && dst.is_tls());
    assert_eq!(src.peer_names(), vec!["host-b".to_string(), "127.0.0.1".into()]);
    assert_eq!(dst.peer_names(), vec!["host-a".to_string(), "127.0.0.1".into()]);
    assert!(dst.peer_is("host-a") && !dst.peer_is("host-b"));
    // A large transfer, as memory batches are.
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i * 7 + i / 4096) as u8).collect();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        src.write_all(&sent).unwrap();
        src
    });
    let mut got = vec![0u8; data.len()];
    dst.read_exact(&mut got).unwrap();
    assert!(got == data, "the bytes changed on the way");
    writer.join().unwrap();
}

#[test]
fn a_destination_with_the_wrong_name_is_refused() {
    let c = Cluster::new("name");
    let wrong = c.issue("name-wrong", &spec("host-c", &["10.9.9.9".parse().unwrap()]));
    let right = c.issue("name-right", &spec("host-b", &[LOOPBACK]));
    let (l, to) = listen(tls(&wrong.0));
    let dst_wrong = accept_in_background(l);
    let e = expect_refused(connect(&to, &tls(&c.ca.0), &LinkConfig::default()), &["is for"]);
    assert!(e.contains("host-c") && e.contains("10.9.9.9") && e.contains("we dialled 127.0.0.1"), "{e}");
    // With a certificate that names the address dialled, the same source gets in.
    let (l, to) = listen(tls(&right.0));
    let dst = accept_in_background(l);
    let mut src = connect(&to, &tls(&c.ca.0), &LinkConfig::default()).unwrap();
    exchange(&mut src, dst);
    drop(dst_wrong);
}

#[test]
fn refusals_leave_the_destination_waiting_for_the_real_source() {
    let c = Cluster::new("refuse");
    let other = Cluster::new("refuse-other");
    let b = c.issue("refuse-b", &spec("host-b", &[LOOPBACK]));
    let (l, to) = listen(tls(&b.0));
    let dst = accept_in_background(l);
    let link = LinkConfig::default();

    // A peer that connects first and says nothing does not hold up the others.
    let idle = TcpStream::connect(&to).unwrap();

    // A source of another cluster: it does not trust the destination's certificate.
    expect_refused(connect(&to, &tls(&other.ca.0), &link), &["not signed by our CA", "unknown issuer"]);

    // A source that trusts our CA but whose own certificate is another cluster's: the
    // destination refuses it, which a TLS 1.3 client learns at its first read.
    let mixed = Dir::new("refuse-mixed");
    std::fs::create_dir_all(&mixed.0).unwrap();
    std::fs::copy(c.ca.0.join(pki::CA_CERT), mixed.0.join(pki::CA_CERT)).unwrap();
    std::fs::copy(other.ca.0.join(pki::CERT), mixed.0.join(pki::CERT)).unwrap();
    std::fs::copy(other.ca.0.join(pki::KEY), mixed.0.join(pki::KEY)).unwrap();
    refused_by_the_destination(connect(&to, &tls(&mixed.0), &link), "does not trust our certificate");

    // A source with an expired certificate of our CA.
    let now = SystemTime::now();
    let expired = HostSpec {
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
        ..spec("host-old", &[LOOPBACK])
    };
    let old = c.issue("refuse-old", &expired);
    refused_by_the_destination(connect(&to, &tls(&old.0), &link), "expired");

    // A plaintext source: told in a frame it understands.
    let mut plain = connect(&to, &Security::InsecurePlaintext, &link).unwrap();
    protocol::write_frame(&mut plain, Command::Start, b"{}").unwrap();
    let answer = protocol::read_response(&mut plain).expect("a plain answer");
    assert!(!answer.ok && answer.error.as_deref().is_some_and(|e| e.contains("requires mutual TLS")), "{answer:?}");

    // Garbage.
    let mut junk = TcpStream::connect(&to).unwrap();
    let _ = junk.write_all(&[0x42; 300]);

    // A TLS client without a certificate (a raw rustls client trusting our CA).
    no_client_certificate(&c.ca.0, &to);

    // Finally the real source gets in.
    let mut src = connect(&to, &tls(&c.ca.0), &link).unwrap();
    exchange(&mut src, dst);
    drop(idle);
}

/// A source the destination refuses: at once, or (TLS 1.3 clients finish first) at its first
/// read, with `needle` in what it is told.
fn refused_by_the_destination(r: Result<MigrationStream, TransportError>, needle: &str) {
    match r {
        Err(e) => println!("refused at once: {e}"),
        Ok(mut s) => {
            let _ = s.write_all(b"hello");
            let e = s.read(&mut [0u8; 1]).expect_err("the destination accepted the source");
            println!("refused at the first read: {e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}

fn no_client_certificate(ca_dir: &Path, to: &str) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_dir.join(pki::CA_CERT)).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(to).unwrap());
    let _ = s.write_all(b"hello");
    let e = s.read(&mut [0u8; 1]).expect_err("the destination accepted a client without a certificate");
    println!("no client certificate: {e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

#[test]
fn a_tls_source_is_told_the_destination_speaks_plaintext() {
    let c = Cluster::new("plain");
    let (l, to) = listen(Security::InsecurePlaintext);
    let dst = accept_in_background(l);
    expect_refused(connect(&to, &tls(&c.ca.0), &LinkConfig::default()), &["speaks plaintext migration"]);
    // A plaintext source then gets in.
    let mut src = connect(&to, &Security::InsecurePlaintext, &LinkConfig::default()).unwrap();
    let dst = exchange(&mut src, dst);
    assert!(!dst.is_tls());
}

#[test]
fn an_expired_destination_certificate_is_refused() {
    let c = Cluster::new("exp");
    let now = SystemTime::now();
    let expired = HostSpec {
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
        ..spec("host-b", &[LOOPBACK])
    };
    let b = c.issue("exp-b", &expired);
    let (l, to) = listen(tls(&b.0));
    let _dst = accept_in_background(l);
    expect_refused(connect(&to, &tls(&c.ca.0), &LinkConfig::default()), &["certificate expired"]);
}

#[test]
fn bad_tls_directories_are_named() {
    let c = Cluster::new("dirs");
    let missing = Dir::new("dirs-missing");
    let e = Security::tls(&missing.0).unwrap_err().to_string();
    assert!(e.contains("TLS directory"), "{e}");
    let partial = Dir::new("dirs-partial");
    std::fs::create_dir_all(&partial.0).unwrap();
    std::fs::copy(c.ca.0.join(pki::CA_CERT), partial.0.join(pki::CA_CERT)).unwrap();
    let e = Security::tls(&partial.0).unwrap_err().to_string();
    assert!(e.contains("cert.pem") && e.contains("missing"), "{e}");
    std::fs::write(partial.0.join(pki::CERT), "not a certificate").unwrap();
    std::fs::copy(c.ca.0.join(pki::KEY), partial.0.join(pki::KEY)).unwrap();
    let e = Security::tls(&partial.0).unwrap_err().to_string();
    assert!(e.contains("cert.pem") && e.contains("no certificate"), "{e}");
    // A key that is not the certificate's.
    std::fs::copy(c.ca.0.join(pki::CERT), partial.0.join(pki::CERT)).unwrap();
    std::fs::copy(c.ca.0.join(pki::CA_KEY), partial.0.join(pki::KEY)).unwrap();
    let e = Security::tls(&partial.0).unwrap_err().to_string();
    assert!(e.contains("key.pem") && e.contains("does not match"), "{e}");
}

#[test]
fn incoming_fd_takes_a_listening_or_a_connected_socket() {
    let c = Cluster::new("fd");
    let b = c.issue("fd-b", &spec("host-b", &[LOOPBACK]));
    let link = LinkConfig::default();
    // A listening socket.
    let raw = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{}", raw.local_addr().unwrap().port());
    let l = match socket_from_fd(raw.into_raw_fd()).unwrap() {
        IncomingSocket::Listener(l) => MigrationListener::from_listener(l, tls(&b.0), link),
        IncomingSocket::Connection(_) => panic!("a listening socket taken for a connection"),
    };
    let dst = accept_in_background(l);
    let mut src = connect(&to, &tls(&c.ca.0), &link).unwrap();
    exchange(&mut src, dst);
    // A connection accepted by someone else.
    let agent = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{}", agent.local_addr().unwrap().port());
    let source = {
        let (to, ca) = (to.clone(), c.ca.0.clone());
        thread::spawn(move || connect(&to, &tls(&ca), &LinkConfig::default()))
    };
    let (conn, _) = agent.accept().unwrap();
    let conn = match socket_from_fd(conn.into_raw_fd()).unwrap() {
        IncomingSocket::Connection(c) => c,
        IncomingSocket::Listener(_) => panic!("a connection taken for a listener"),
    };
    let dst = thread::spawn(move || accept_connection(conn, &tls(&b.0), &LinkConfig::default()));
    let mut src = source.join().unwrap().unwrap();
    exchange(&mut src, dst);
    // Not a socket.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let e = socket_from_fd(file.into_raw_fd()).err().expect("a file taken for a socket").to_string();
    assert!(e.contains("not a socket"), "{e}");
}

/// Connections handed over on a unix socket (`--incoming-conns-fd`, as a host agent does for
/// post-copy's later connections): each is handshaken as on a listener; what is not a TCP
/// connection is refused and the wait goes on; the agent closing its end ends the wait.
#[test]
fn handed_connections_are_taken_like_accepted_ones() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    let c = Cluster::new("handed");
    let b = c.issue("handed-b", &spec("host-b", &[LOOPBACK]));
    let (agent_end, vmm_end) = UnixStream::pair().unwrap();
    let channel = channel_from_fd(vmm_end.into_raw_fd()).unwrap();
    let l = MigrationListener::from_handed(channel, tls(&b.0), LinkConfig::default());
    assert!(l.local_addr().is_err(), "handed connections have no listening address");
    let port = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{}", port.local_addr().unwrap().port());
    let l = Arc::new(l);
    for round in 0..2 {
        let waiting = {
            let l = l.clone();
            thread::spawn(move || l.accept_while(&|| true))
        };
        if round == 1 {
            // Not a connection first: a file, then a listening socket. Both refused; it waits on.
            let file = std::fs::File::open("/proc/self/status").unwrap();
            agent_end.send_with_fd(&[0u8][..], file.as_raw_fd()).unwrap();
            agent_end.send_with_fd(&[0u8][..], port.as_raw_fd()).unwrap();
        }
        let source = {
            let (to, ca) = (to.clone(), c.ca.0.clone());
            thread::spawn(move || connect(&to, &tls(&ca), &LinkConfig::default()))
        };
        let (conn, _) = port.accept().unwrap();
        agent_end.send_with_fd(&[0u8][..], conn.as_raw_fd()).unwrap();
        drop(conn);
        let mut src = source.join().unwrap().unwrap();
        exchange(&mut src, waiting);
    }
    // The agent goes away: the wait ends with a clear error.
    let waiting = {
        let l = l.clone();
        thread::spawn(move || l.accept_while(&|| true))
    };
    drop(agent_end);
    let e = waiting.join().unwrap().err().expect("a connection from nowhere").to_string();
    assert!(e.contains("closed the channel"), "{e}");
    // Not a unix socket.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = channel_from_fd(tcp.into_raw_fd()).expect_err("a TCP socket taken for a channel").to_string();
    assert!(e.contains("not a unix socket"), "{e}");
}

/// A source that refuses the destination's certificate says why in its alert, and the
/// destination passes that on.
#[test]
fn the_destination_says_why_a_source_hung_up() {
    let c = Cluster::new("hear");
    let other = Cluster::new("hear-other");
    let b = c.issue("hear-b", &spec("host-b", &[LOOPBACK]));
    let agent = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{}", agent.local_addr().unwrap().port());
    let source = thread::spawn(move || connect(&to, &tls(&other.ca.0), &LinkConfig::default()).map(drop));
    let (conn, _) = agent.accept().unwrap();
    let e = accept_connection(conn, &tls(&b.0), &LinkConfig::default()).err().expect("accepted").to_string();
    println!("the destination says: {e}");
    assert!(e.contains("the source refused the TLS connection: it does not trust our certificate"), "{e}");
    expect_refused(source.join().unwrap().map(|()| unreachable!()), &["unknown issuer"]);

    // A destination whose certificate names another address.
    let wrong = c.issue("hear-wrong", &spec("host-c", &["10.9.9.9".parse().unwrap()]));
    let to = format!("127.0.0.1:{}", agent.local_addr().unwrap().port());
    let source = thread::spawn(move || connect(&to, &tls(&c.ca.0), &LinkConfig::default()).map(drop));
    let (conn, _) = agent.accept().unwrap();
    let e = accept_connection(conn, &tls(&wrong.0), &LinkConfig::default()).err().expect("accepted").to_string();
    println!("the destination says: {e}");
    assert!(e.contains("the source refused the TLS connection: it says our certificate is bad"), "{e}");
    expect_refused(source.join().unwrap().map(|()| unreachable!()), &["we dialled 127.0.0.1"]);
}

/// A plain rustls client with host a's identity (the CA directory's), offering only `suite`.
fn rustls_client(ca_dir: &Path, suite: rustls::SupportedCipherSuite) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_dir.join(pki::CA_CERT)).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(ca_dir.join(pki::CERT)).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(ca_dir.join(pki::KEY)).unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite];
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    rustls::ClientConnection::new(Arc::new(config), name).unwrap()
}

/// A plain rustls client (not our transport) and our destination exchange megabytes both ways
/// with each cipher suite, across key updates the rustls end starts and asks us to answer (so
/// both ends change keys mid-stream): nothing in our stream's reads and writes depends on our
/// own source being the peer.
#[test]
fn a_standard_tls_peer_talks_to_our_destination_across_key_updates() {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let c = Cluster::new("interop");
    let b = c.issue("interop-b", &spec("host-b", &[LOOPBACK]));
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 13 + i / 4099) as u8).collect();
    let data = Arc::new(data);
    for suite in [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
        let (l, to) = listen(tls(&b.0));
        let dst = accept_in_background(l);
        let conn = rustls_client(&c.ca.0, suite);
        let sent = data.clone();
        let client = thread::spawn(move || {
            let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(&to).unwrap());
            let (first, rest) = sent.split_at(1 << 20);
            s.write_all(first).unwrap();
            // A KeyUpdate that asks the peer to update its keys too.
            s.conn.refresh_traffic_keys().unwrap();
            s.write_all(rest).unwrap();
            s.flush().unwrap();
            let mut back = vec![0u8; sent.len()];
            s.read_exact(&mut back).unwrap();
            assert!(back == *sent, "the rustls client read other bytes than it sent");
            // Once more, after our end has updated its keys.
            s.conn.refresh_traffic_keys().unwrap();
            s.write_all(b"again").unwrap();
            let mut last = [0u8; 4];
            s.read_exact(&mut last).unwrap();
            assert_eq!(&last, b"done");
            s.conn.negotiated_cipher_suite().map(|s| s.suite())
        });
        let mut dst = dst.join().unwrap().unwrap();
        let mut got = vec![0u8; data.len()];
        dst.read_exact(&mut got).unwrap();
        assert!(got == *data, "{suite:?}: our destination read other bytes than were sent");
        dst.write_all(&got).unwrap();
        let mut again = [0u8; 5];
        dst.read_exact(&mut again).unwrap();
        assert_eq!(&again, b"again");
        dst.write_all(b"done").unwrap();
        assert_eq!(client.join().unwrap(), Some(suite.suite()));
    }
}

#[test]
fn a_kept_listener_takes_later_connections_and_its_wait_can_be_called_off() {
    let c = Cluster::new("keep");
    let b = c.issue("keep-b", &spec("host-b", &[LOOPBACK]));
    let (l, to) = listen(tls(&b.0));
    let l = Arc::new(l);
    // Two connections, one after the other, on the same listener (post-copy's main and fault
    // connections, or a reconnection).
    for round in 0..2 {
        let l2 = l.clone();
        let dst = thread::spawn(move || l2.accept_while(&|| true));
        let mut src = connect(&to, &tls(&c.ca.0), &LinkConfig::default()).unwrap();
        let dst = exchange(&mut src, dst);
        assert!(dst.is_tls(), "round {round}");
    }
    // A wait called off ends with Stopped, and the listener still works after it.
    let calls = std::sync::atomic::AtomicU32::new(0);
    let r = l.accept_while(&|| calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2);
    assert!(matches!(r, Err(TransportError::Stopped)), "{:?}", r.map(|s| s.describe_peer()));
    let l2 = l.clone();
    let dst = thread::spawn(move || l2.accept_while(&|| true));
    let mut src = connect(&to, &tls(&c.ca.0), &LinkConfig::default()).unwrap();
    exchange(&mut src, dst);
}
