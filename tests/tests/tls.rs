// SPDX-License-Identifier: Apache-2.0
//! Mutual TLS on migration connections, end to end with real VMMs in a test bed:
//!
//! - `vmm tls init` and `vmm tls issue` write the files, private keys 0600, and never
//!   overwrite; `VMM_TLS_DIR` stands in for `--tls-dir`; a destination without either (or
//!   `--insecure-plaintext`) refuses to start, with one line;
//! - a source refused by the destination (another cluster's certificate, an expired one,
//!   plaintext) or refusing it (a certificate for another address, a plaintext destination)
//!   fails with one clear line while its guest runs on; the destination logs one line per
//!   refused peer (garbage and a silent early connection included) and keeps waiting, and the
//!   real source then migrates; plaintext works when both ends ask for it.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm::api::{MigrateRequest, MigrationPhase, VmState};
use vmm::transport::pki::{self, HostSpec};
use vmm_tests::TestBed;
use vmm_tests::moves::{
    LISTEN_TIMEOUT, MIGRATION_PORT, assert_completed, assert_exits_cleanly, assert_state, dump, exchange, migrate_api,
    request, start_destination_with, start_source,
};
use vmm_tests::pki::pki;
use vmm_tests::vm::{Vm, kvm_or_skip, vmm_bin};

const REFUSED: &str = "refused a migration connection from";

fn temp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-tls-e2e-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn vmm(args: &[&str]) -> (bool, String) {
    let o = Command::new(vmm_bin()).args(args).stdin(Stdio::null()).output().expect("run vmm");
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn tls_init_and_issue_write_the_files_and_destinations_need_an_identity() {
    let (ca, other) = (temp("ca"), temp("other"));
    let (ok, err) = vmm(&["tls", "init", ca.to_str().unwrap(), "--name", "host-a", "--ip", "10.1.2.3"]);
    assert!(ok, "{err}");
    println!("{err}");
    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for (f, m) in [(pki::CA_CERT, 0o644), (pki::CA_KEY, 0o600), (pki::CERT, 0o644), (pki::KEY, 0o600)] {
        assert_eq!(mode(ca.join(f)), m, "{f}");
    }
    let (ok, err) = vmm(&["tls", "issue", ca.to_str().unwrap(), other.to_str().unwrap(), "--name", "host-b"]);
    assert!(ok, "{err}");
    assert!(!other.join(pki::CA_KEY).exists() && mode(other.join(pki::KEY)) == 0o600);
    // Nothing is overwritten; a bad name or a missing CA is one line.
    for (args, needle) in [
        (vec!["tls", "init", ca.to_str().unwrap()], "already exists"),
        (vec!["tls", "issue", other.to_str().unwrap(), "/tmp/nowhere-vmm", "--name", "x"], "ca-key.pem"),
        (vec!["tls", "issue", ca.to_str().unwrap(), "/tmp/nowhere-vmm", "--name", "a b"], "neither a DNS name"),
        (vec!["tls", "issue", ca.to_str().unwrap(), "/tmp/nowhere-vmm"], "--name"),
    ] {
        let (ok, err) = vmm(&args);
        println!("{args:?}: {err}");
        assert!(!ok && err.lines().filter(|l| l.starts_with("vmm: error:")).count() == 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/nowhere-vmm").exists());

    // A destination needs an identity or an explicit --insecure-plaintext.
    let (ok, err) = vmm(&["run", "--incoming", "127.0.0.1:1"]);
    assert!(!ok && err.contains("--tls-dir") && err.contains("--insecure-plaintext"), "{err}");
    let (ok, err) = vmm(&["run", "--incoming", "127.0.0.1:1", "--tls-dir", "/nonexistent-vmm-tls"]);
    assert!(!ok && err.contains("/nonexistent-vmm-tls"), "{err}");
    // VMM_TLS_DIR stands in for --tls-dir.
    let mut child = Command::new(vmm_bin())
        .args(["run", "--incoming", "127.0.0.1:0"])
        .env("VMM_TLS_DIR", &other)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stderr.take().unwrap()), &mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("waiting for an incoming migration") && line.contains("mutual TLS"), "{line}");
    assert!(line.contains(other.to_str().unwrap()), "{line}");
    // Plaintext is said loudly.
    let (_, err) = vmm(&["run", "--incoming", "not-an-address", "--insecure-plaintext"]);
    assert!(err.contains("warning") && err.contains("neither encrypted nor authenticated"), "{err}");
    std::fs::remove_dir_all(ca).unwrap();
    std::fs::remove_dir_all(other).unwrap();
}

fn two_hosts() -> TestBed {
    TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build the test bed")
}

/// A request from the source with another TLS directory.
fn with_dir(addr: &str, dir: &std::path::Path) -> MigrateRequest {
    MigrateRequest { tls_dir: Some(dir.display().to_string()), ..request(addr) }
}

fn refusals(vm: &Vm) -> Vec<String> {
    vm.log.lines(|l| l.contains(REFUSED))
}

/// Waits until the destination logged a refusal line containing `says`; returns it.
fn wait_refusal(dst: &Vm, says: &str, ctx: &[(&str, &Vm)]) -> String {
    let deadline = std::time::Instant::now() + LISTEN_TIMEOUT;
    loop {
        if let Some(l) = refusals(dst).into_iter().find(|l| l.contains(says)) {
            return l;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal line with {says:?}{}", dump(ctx));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn refused_peers_leave_the_guest_on_the_source_and_the_destination_waiting() {
    if !kvm_or_skip("refused_peers_leave_the_guest_on_the_source_and_the_destination_waiting") {
        return;
    }
    let bed = two_hosts();
    let (a_ip, b_ip) = (bed.host("a").ip().unwrap(), bed.host("b").ip().unwrap());
    // Without seccomp: this source reads the TLS directories the requests name (a sandboxed
    // VMM opens no files after it started; checked at the end).
    let src = start_source(&bed, "a", &["--mem-mib", "256", "--no-seccomp"], "vmm.workload=echo");
    let (dst, addr) = start_destination_with(&bed, "b", MIGRATION_PORT, &[]);
    // A destination whose certificate names another address.
    let wrong =
        pki().issue("wrong-name", HostSpec::new("elsewhere", &["10.9.9.9".parse::<IpAddr>().unwrap()], 30).unwrap());
    let wrong_dir = wrong.display().to_string();
    // (Without --net: host b's TAP belongs to the other destination, and this one never gets
    // as far as building a VM.)
    let port = (MIGRATION_PORT + 1).to_string();
    let wrong_dst = Vm::start(
        Some(bed.host("b")),
        &["run", "--incoming", &format!("0.0.0.0:{port}"), "--tls-dir", &wrong_dir].map(String::from),
    );
    assert!(
        wrong_dst.log.wait_line(LISTEN_TIMEOUT, |l| l.contains("waiting for an incoming migration")).is_some(),
        "the wrong-name destination does not listen{}",
        dump(&[("wrong-name destination", &wrong_dst)])
    );
    let wrong_addr = format!("{b_ip}:{port}");
    let ctx = [("source", &src), ("destination", &dst), ("wrong-name destination", &wrong_dst)];

    // Someone connects first and says nothing; then garbage.
    let dst_addr: SocketAddr = addr.parse().unwrap();
    let silent = bed.client().run_in(move || TcpStream::connect(dst_addr)).unwrap().expect("connect");
    bed.client()
        .run_in(move || -> std::io::Result<()> { TcpStream::connect(dst_addr)?.write_all(&[0x42; 512]) })
        .unwrap()
        .expect("send garbage");
    println!("garbage: {}", wait_refusal(&dst, "does not speak TLS", &ctx));
    let cases: Vec<(&str, MigrateRequest, &str, Option<&str>)> = vec![
        (
            "another cluster's certificate",
            with_dir(&addr, &pki().foreign_dir(a_ip)),
            "not signed by our CA",
            Some("does not trust our certificate"),
        ),
        ("an expired certificate", with_dir(&addr, &pki().expired_dir(a_ip)), "certificate expired", Some("expired")),
        (
            "plaintext",
            MigrateRequest { insecure_plaintext: true, ..request(&addr) },
            "requires mutual TLS",
            Some("speaks plaintext migration"),
        ),
        ("a destination certificate for another address", request(&wrong_addr), "but we dialled", None),
    ];
    for (what, req, source_says, destination_says) in cases {
        let info = migrate_api(&src, &req, &ctx);
        println!("{what}: the source says: {:?}", info.error);
        assert_eq!(info.phase, MigrationPhase::Failed, "{what}: {info:?}{}", dump(&ctx));
        let error = info.error.clone().unwrap_or_default();
        assert!(error.contains(source_says), "{what}: {error:?} lacks {source_says:?}");
        assert!(!error.contains('\n'), "{what}: more than one line: {error:?}");
        assert_state(&src, VmState::Running, &ctx);
        match destination_says {
            Some(says) => println!("{what}: the destination says: {}", wait_refusal(&dst, says, &ctx)),
            None => println!("{what}: that destination says: {}", wait_refusal(&wrong_dst, "", &ctx)),
        }
        // The guest answers from host a all along.
        exchange(&bed, 7000, "still here\n").unwrap_or_else(|e| panic!("{what}: the guest does not answer: {e}"));
    }
    assert!(dst.try_wait().is_none(), "the destination gave up{}", dump(&ctx));

    // The real source gets in.
    let info = migrate_api(&src, &request(&addr), &ctx);
    assert_completed(&info, &ctx);
    assert!(info.encrypted, "{info:?}");
    assert_exits_cleanly(&src, &ctx);
    assert_state(&dst, VmState::Running, &ctx);
    // Each refused peer is one line: garbage, three sources, and the silent one (once it closes).
    drop(silent);
    let deadline = std::time::Instant::now() + LISTEN_TIMEOUT;
    while refusals(&dst).len() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = refusals(&dst);
    assert_eq!(all.len(), 5, "{all:#?}{}", dump(&ctx));
    assert!(all.iter().any(|l| l.contains("without a word") || l.contains("nothing received")), "{all:#?}");

    // The destination, sandboxed (the default), refuses to read a TLS directory named in a
    // request after it started, and says how to give it one.
    let req = MigrateRequest { tls_dir: Some(pki().foreign_dir(b_ip).display().to_string()), ..request("127.0.0.1:9") };
    let refused = dst.api().migrate(&req).expect_err("a sandboxed VMM read a TLS directory late");
    assert!(refused.to_string().contains("sandboxed"), "{refused}");

    // Plaintext needs both ends: a TLS source and a plaintext destination refuse each other,
    // then both in plaintext works.
    let (plain, plain_addr) = start_destination_with(&bed, "a", MIGRATION_PORT + 2, &["--insecure-plaintext"]);
    let ctx = [("source", &dst), ("plaintext destination", &plain)];
    let info = migrate_api(&dst, &request(&plain_addr), &ctx);
    println!("TLS to a plaintext destination: {:?}", info.error);
    assert!(info.error.as_deref().is_some_and(|e| e.contains("speaks plaintext")), "{info:?}");
    println!("the plaintext destination says: {}", wait_refusal(&plain, "speaks TLS", &ctx));
    assert_state(&dst, VmState::Running, &ctx);
    let info = migrate_api(&dst, &MigrateRequest { insecure_plaintext: true, ..request(&plain_addr) }, &ctx);
    assert_completed(&info, &ctx);
    assert!(!info.encrypted, "{info:?}");
    assert!(dst.log.text().contains("neither encrypted nor authenticated"), "no warning{}", dump(&ctx));
    exchange(&bed, 7000, "still here\n").expect("the guest answers from host a again");
}
