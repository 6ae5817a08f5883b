// SPDX-License-Identifier: Apache-2.0
//! A migration destination fed corrupted, truncated, wrong-version, random, out-of-order or
//! impossible streams by a fake source (over mutual TLS, with the test PKI) ends with one clear
//! error line and a non-zero exit, never a panic or a hang.

use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use migration::memory::{BatchWriter, PAGE_SIZE};
use migration::protocol::{self, Command as Frame, RegionLayout, StartPayload};
use vmm::transport::{self, LinkConfig, MigrationStream};
use vmm_tests::moves::{EXIT_TIMEOUT, LISTEN_TIMEOUT, dump, s};
use vmm_tests::pki::{pki, tls_args};
use vmm_tests::vm::{Vm, kvm_or_skip};

/// A deterministic xorshift64 byte stream.
fn random_bytes(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A `Start` a real destination accepts: a 64 MiB, one-vCPU VM without NICs.
fn valid_start(mem_mib: u64) -> StartPayload {
    let config = vmm::VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        mem_mib,
        vcpus: 1,
        cpu_template: Default::default(),
        nets: vec![],
        disks: vec![],
    };
    StartPayload {
        state_version: migration::STATE_VERSION,
        config: serde_json::to_value(&config).expect("config as JSON"),
        memory: vec![RegionLayout { start: 0, size: mem_mib << 20 }],
        cpuid: vec![],
        tsc_khz: None,
        disks: vec![],
        postcopy_id: None,
    }
}

fn frame(command: Frame, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::write_frame(&mut out, command, payload).expect("frame");
    out
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Starts `vmm run --incoming 127.0.0.1:PORT` (mutual TLS with the test PKI's CA identity),
/// lets `feed` talk to it as a fake but authenticated source, and expects the destination to
/// end with a non-zero exit and exactly one `vmm: error:` line that contains one of `expected`
/// (case-insensitively). Returns that line.
fn bad_source(case: &str, expected: &[&str], feed: impl FnOnce(&mut MigrationStream)) -> String {
    let tls_dir = pki().ca_dir().to_path_buf();
    let (dst, port) = loop {
        let port = free_port();
        let mut args = s(&["run", "--incoming", &format!("127.0.0.1:{port}")]);
        args.extend(tls_args(&tls_dir));
        let dst = Vm::start(None, &args);
        if dst.log.wait_line(LISTEN_TIMEOUT, |l| l.contains("waiting for an incoming migration")).is_some() {
            break (dst, port);
        }
        // Someone took the port in between: try another.
        assert!(
            dst.log.text().contains("cannot listen"),
            "{case}: the destination does not listen{}",
            dump(&[("destination", &dst)])
        );
    };
    let security = transport::Security::tls(&tls_dir).expect("the test PKI");
    let link = LinkConfig { io_timeout: Duration::from_secs(60), ..LinkConfig::default() };
    let mut stream = transport::connect(&format!("127.0.0.1:{port}"), &security, &link).expect("connect");
    feed(&mut stream);
    let _ = stream.tcp().shutdown(Shutdown::Write);
    // What the destination says before it goes (it tells a real source why).
    let answer = protocol::read_frame(&mut stream).map(|f| String::from_utf8_lossy(&f.payload).into_owned());
    let status = dst.wait_timeout(EXIT_TIMEOUT);
    let ctx = [("destination", &dst)];
    assert!(status.is_some(), "{case}: the destination did not exit{}", dump(&ctx));
    let status = status.unwrap();
    // The process is gone, but the thread that collects its stderr may not have read it all yet.
    dst.log.wait_line(Duration::from_secs(10), |l| l.starts_with("vmm: error:"));
    thread::sleep(Duration::from_millis(200));
    let log = dst.log.text();
    println!("{case}: exit {status}, answer {answer:?}, log:\n{log}");
    assert!(!status.success(), "{case}: the destination exited 0{}", dump(&ctx));
    assert!(status.code().is_some(), "{case}: the destination died of a signal ({status}){}", dump(&ctx));
    assert!(!log.contains("panicked"), "{case}: the destination panicked{}", dump(&ctx));
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("vmm: error:")).collect();
    assert_eq!(errors.len(), 1, "{case}: expected one error line{}", dump(&ctx));
    let lower = errors[0].to_lowercase();
    assert!(
        expected.iter().any(|e| lower.contains(&e.to_lowercase())),
        "{case}: expected one of {expected:?} in {:?}{}",
        errors[0],
        dump(&ctx)
    );
    errors[0].to_string()
}

#[test]
fn corrupted_truncated_wrong_version_and_random_streams_end_the_destination_cleanly() {
    if !kvm_or_skip("corrupted_truncated_wrong_version_and_random_streams_end_the_destination_cleanly") {
        return;
    }
    let start_json = serde_json::to_vec(&valid_start(64)).expect("Start as JSON");

    // (a) A frame of a protocol version from the future.
    let future = protocol::PROTOCOL_VERSION + 1;
    bad_source("future version", &[&format!("version {future}")], |s| {
        let mut f = frame(Frame::Start, &start_json);
        f[4..6].copy_from_slice(&future.to_le_bytes());
        s.write_all(&f).expect("send");
    });

    // (b) A Start whose payload does not match its CRC.
    bad_source("bad checksum", &["checksum", "corrupt"], |s| {
        let mut f = frame(Frame::Start, &start_json);
        f[16] ^= 0x5a;
        s.write_all(&f).expect("send");
    });

    // (c) A valid Start, accepted; then a Memory frame cut short and the connection closed.
    bad_source("truncated memory frame", &["closed in the middle", "truncated"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        let answer = protocol::read_response(s).expect("the destination answers Start");
        assert!(answer.ok, "a valid Start was refused: {answer:?}");
        let payload = random_bytes(64 << 10, 7);
        let memory = frame(Frame::Memory, &payload);
        s.write_all(&memory[..protocol::HEADER_LEN + 1000]).expect("send part of a Memory frame");
    });

    // (d) Random bytes.
    bad_source("random bytes", &["not a migration stream", "bad magic"], |s| {
        let _ = s.write_all(&random_bytes(16 << 10, 0x243f_6a88_85a3_08d3));
    });

    // (e) Random bytes after an accepted Start.
    bad_source("random bytes after Start", &["not a migration stream", "bad magic"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        let _ = s.write_all(&random_bytes(16 << 10, 0x1319_8a2e_0370_7344));
    });

    // (f) A connection closed without a byte.
    bad_source("empty stream", &["closed in the middle", "truncated"], |_| {});

    // (g) A frame announcing an absurd length, then nothing.
    bad_source("huge frame", &["larger than"], |s| {
        let mut f = frame(Frame::Memory, b"x");
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        s.write_all(&f[..protocol::HEADER_LEN]).expect("send");
    });

    // (h) A valid Start, then the source gives up.
    bad_source("abandoned after Start", &["abandoned"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        s.write_all(&frame(Frame::Abandon, &[])).expect("send Abandon");
    });

    // (i) Memory records outside the guest's memory.
    bad_source("pages outside guest memory", &["outside guest memory"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        let mut batch = BatchWriter::with_capacity(2 * PAGE_SIZE);
        batch.push_page(1 << 40, &[0xa5; PAGE_SIZE]);
        s.write_all(&frame(Frame::Memory, batch.as_bytes())).expect("send Memory");
    });

    // (j) Complete without the machine's State.
    bad_source("Complete before State", &["before the machine's state"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        s.write_all(&frame(Frame::Paused, &[])).expect("send Paused");
        s.write_all(&frame(Frame::Complete, &[])).expect("send Complete");
    });

    // (k) A State that is not JSON.
    bad_source("garbage State", &["invalid State"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        s.write_all(&frame(Frame::State, &random_bytes(3000, 99))).expect("send State");
        s.write_all(&frame(Frame::Complete, &[])).expect("send Complete");
    });

    // (l) Starts with impossible machines: no vCPU, too many, more memory than any host has
    // (whose size in bytes wraps around to 0 in 64 bits).
    for (what, mutate) in [
        ("0 vCPUs", (|c: &mut vmm::VmConfig| c.vcpus = 0) as fn(&mut vmm::VmConfig)),
        ("200 vCPUs", |c| c.vcpus = 200),
        ("16 EiB of memory", |c| c.mem_mib = 1 << 44),
    ] {
        bad_source(what, &["vcpu", "memory", "more than this host"], |s| {
            let mut config: vmm::VmConfig = serde_json::from_value(valid_start(64).config).expect("a VmConfig");
            mutate(&mut config);
            let mut start = valid_start(64);
            start.memory = vmm::arch::layout::ram_regions(config.mem_mib.wrapping_shl(20))
                .into_iter()
                .map(|(start, size)| RegionLayout { start, size })
                .collect();
            start.config = serde_json::to_value(&config).expect("config as JSON");
            protocol::write_json(s, Frame::Start, &start).expect("send Start");
            let answer = protocol::read_response(s);
            println!("{what}: the destination answered {answer:?}");
        });
    }

    // (n) Post-copy's early drop in a migration that did not offer post-copy.
    let all_pages = || migration::postcopy::PageBitmap { regions: vec![(0, 64 << 8, vec![0; 256])] };
    bad_source("PostcopyDrop without post-copy", &["did not offer post-copy"], |s| {
        s.write_all(&frame(Frame::Start, &start_json)).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        s.write_all(&frame(Frame::PostcopyDrop, &all_pages().encode())).expect("send PostcopyDrop");
    });

    // (o) A source that offers post-copy, drops page 0 ahead of the switch, then sends pages
    // (which could refill what was dropped), or leaves page 0 out of the final list (it would
    // never be asked for).
    let postcopy_start = |s: &mut MigrationStream| {
        let mut start = valid_start(64);
        start.postcopy_id = Some(0x5eed);
        protocol::write_json(s, Frame::Start, &start).expect("send Start");
        assert!(protocol::read_response(s).expect("the destination answers Start").ok);
        let to = s.tcp().peer_addr().expect("the destination's address").to_string();
        let security = transport::Security::tls(pki().ca_dir()).expect("the test PKI");
        let mut fault = transport::connect(&to, &security, &LinkConfig::default()).expect("fault connection");
        let hello = migration::postcopy::ChannelHello { id: 0x5eed };
        protocol::write_json(&mut fault, Frame::PostcopyChannel, &hello).expect("send PostcopyChannel");
        let mut first = all_pages();
        first.regions[0].2[0] = 1;
        s.write_all(&frame(Frame::PostcopyDrop, &first.encode())).expect("send PostcopyDrop");
        fault
    };
    bad_source("Memory after PostcopyDrop", &["Memory after PostcopyDrop"], |s| {
        let _fault = postcopy_start(s);
        let mut batch = BatchWriter::with_capacity(2 * PAGE_SIZE);
        batch.push_page(0, &[0xa5; PAGE_SIZE]);
        s.write_all(&frame(Frame::Memory, batch.as_bytes())).expect("send Memory");
    });
    bad_source("PostcopyDirty without a dropped page", &["leaves out 1 pages"], |s| {
        let _fault = postcopy_start(s);
        s.write_all(&frame(Frame::Paused, &[])).expect("send Paused");
        s.write_all(&frame(Frame::PostcopyDirty, &all_pages().encode())).expect("send PostcopyDirty");
    });

    // (m) A Start the destination cannot host (its memory layout is not a 64 MiB VM's): refused
    // with the reason on the wire, and the process ends.
    bad_source("incompatible Start", &["memory layout"], |s| {
        let mut start = valid_start(64);
        start.memory = vec![RegionLayout { start: 0, size: 32 << 20 }];
        protocol::write_json(s, Frame::Start, &start).expect("send Start");
        let answer = protocol::read_response(s).expect("the destination answers Start");
        assert!(!answer.ok && answer.error.as_deref().is_some_and(|e| e.contains("memory layout")), "{answer:?}");
    });
}
