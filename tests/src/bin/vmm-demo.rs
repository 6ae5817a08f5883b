// SPDX-License-Identifier: Apache-2.0
//! The migration demo: two "hosts" and a client on one L2 segment (network namespaces), a guest
//! running the echo workload on host A, a client streaming numbered messages to it every 10 ms
//! and checking every echo, a live migration to host B (and back, with `--round-trip`), a new
//! connection after each move, and a summary. Everything it creates is removed when it ends.
//!
//! Usage: vmm-demo [--round-trip] [--no-announce] [--no-tcp-kick] (run as root; see the README).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use vmm::api::{MigrateRequest, MigrationInfo, MigrationPhase};
use vmm_tests::TestBed;
use vmm_tests::echo_stream::EchoStream;
use vmm_tests::vm::{Vm, api_sock_path, guest_kernel};

const MIGRATION_PORT: u16 = 7100;
const INTERVAL: Duration = Duration::from_millis(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let round_trip = args.iter().any(|a| a == "--round-trip");
    // Destination options passed through: --no-announce, --no-tcp-kick.
    let dest_flags: Vec<String> =
        args.iter().filter(|a| *a == "--no-announce" || *a == "--no-tcp-kick").cloned().collect();
    if let Err(e) = run(round_trip, dest_flags) {
        eprintln!("vmm-demo: error: {e}");
        std::process::exit(1);
    }
}

fn run(round_trip: bool, dest_flags: Vec<String>) -> Result<(), String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist: this demo needs KVM".into());
    }
    let kernel = guest_kernel();
    println!("== building hosts A and B and a client on one L2 segment (network namespaces)");
    let bed = TestBed::builder().host("a").host("b").client("client").host_ips().build().map_err(|e| e.to_string())?;
    let guest_ip = bed.guest_ip(0);

    // Mutual TLS between the hosts, with certificates made the way `vmm tls init` and `vmm tls
    // issue` make them (a CA for this run, an identity per host naming its address).
    let tls_dir = |host: &str| -> Result<String, String> {
        let ip = bed.host(host).ip().ok_or("host has no IP")?;
        Ok(vmm_tests::pki::pki().host_dir(ip).display().to_string())
    };
    let src_sock = api_sock_path("demo-a");
    let args = vec![
        "run".to_string(),
        "--tls-dir".into(),
        tls_dir("a")?,
        "--kernel".into(),
        kernel.display().to_string(),
        "--mem-mib".into(),
        "256".into(),
        "--api-sock".into(),
        src_sock.display().to_string(),
        "--net".into(),
        format!("tap={},mac=52:54:00:de:e0:01", bed.host("a").tap()),
        "--cmdline".into(),
        format!("{} vmm.workload=echo", bed.guest_ip_cmdline(0)),
    ];
    let mut current = Vm::start(Some(bed.host("a")), &args);
    current
        .console
        .wait_line(Duration::from_secs(30), |l| l.starts_with("GUEST-READY"))
        .ok_or("the guest did not boot")?;
    println!("== guest up on host A at {guest_ip} (echo server on port 7000)");

    let client = bed.client();
    let stream = client.run_in(move || TcpStream::connect((guest_ip, 7000))).map_err(|e| e.to_string())?;
    let stream = stream.map_err(|e| format!("connecting to the guest: {e}"))?;
    // Debugging aid: VMM_DEMO_PCAP=FILE captures the client's traffic with tcpdump.
    let _pcap = std::env::var("VMM_DEMO_PCAP").ok().map(|file| {
        let mut cmd = client.command("tcpdump");
        cmd.args(["-i", "uplink", "-w", &file, "-U", "tcp port 7000 or arp"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        client.spawn(&mut cmd)
    });
    let echo = EchoStream::start(stream, INTERVAL).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(2));

    let hops: &[(&str, &str)] = if round_trip { &[("a", "b"), ("b", "a")] } else { &[("a", "b")] };
    let mut reports = Vec::new();
    for (i, &(from, to)) in hops.iter().enumerate() {
        let dst_sock = api_sock_path(&format!("demo-{to}"));
        let port = MIGRATION_PORT + i as u16;
        let mut dargs = vec![
            "run".to_string(),
            "--incoming".into(),
            format!("0.0.0.0:{port}"),
            "--api-sock".into(),
            dst_sock.display().to_string(),
            "--net".into(),
            format!("tap={}", bed.host(to).tap()),
            "--tls-dir".into(),
            tls_dir(to)?,
        ];
        dargs.extend(dest_flags.iter().cloned());
        let next = Vm::start(Some(bed.host(to)), &dargs);
        next.log
            .wait_line(Duration::from_secs(10), |l| l.contains("waiting for an incoming migration"))
            .ok_or("the destination did not start")?;
        let to_ip: Ipv4Addr = bed.host(to).ip().ok_or("host has no IP")?;
        println!(
            "== migrating the guest from host {} to host {} ({to_ip}:{port})",
            from.to_uppercase(),
            to.to_uppercase()
        );
        let info = migrate(&current, &format!("{to_ip}:{port}"))?;
        print_migration(&info);
        if current.wait_timeout(Duration::from_secs(10)).is_none() {
            return Err(format!("the VMM on host {from} did not exit after the migration"));
        }
        println!("   the VMM on host {} has exited; the guest runs on host {}", from.to_uppercase(), to.to_uppercase());
        // A brand-new connection: the listening socket moved with the guest.
        let t = Instant::now();
        let ok = client
            .run_in(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&(guest_ip, 7000).into(), Duration::from_secs(10))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(b"hello again\n")?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                if line == "hello again\n" { Ok(()) } else { Err(std::io::Error::other(format!("got {line:?}"))) }
            })
            .map_err(|e| e.to_string())?;
        match ok {
            Ok(()) => println!("   a new connection to port 7000 works ({} ms)", t.elapsed().as_millis()),
            Err(e) => {
                println!("   a new connection to port 7000 FAILED: {e}");
                if std::env::var_os("VMM_DEMO_DEBUG").is_some() {
                    println!("{}", next.describe());
                }
            }
        }
        reports.push(info);
        current = next;
        std::thread::sleep(Duration::from_secs(2));
    }
    if round_trip {
        // Prove there is no residual dependency on host B: it is gone, the guest is on A.
        println!("== removing nothing: the guest is back on host A");
    } else {
        println!("== removing host A's TAP: the guest needs nothing from host A any more");
        bed.remove_tap("a").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let s = echo.finish();
    println!("== summary");
    for (i, info) in reports.iter().enumerate() {
        println!(
            "   migration {} ({}): total {} ms, downtime {:.2} ms (source) / {:.2} ms (pause → running), {} round(s), {:.1} MiB sent, {} pages skipped",
            i + 1,
            if info.encrypted { "mutual TLS" } else { "PLAINTEXT" },
            info.total_ms,
            downtime_ms(info),
            pause_to_running_ms(info),
            info.round,
            info.bytes_sent as f64 / (1 << 20) as f64,
            info.pages_skipped
        );
    }
    let lost = s.lost();
    println!("   client: {} messages sent, {} echoed in order, {} lost", s.sent, s.echoed, lost);
    println!("   client-observed largest gap between echoes: {} ms", s.largest_gap.as_millis());
    for e in &s.errors {
        println!("   client error: {e}");
    }
    drop(current);
    drop(bed);
    println!("== cleaned up");
    if lost > 0 || !s.errors.is_empty() {
        return Err("the connection did not survive the migration intact".into());
    }
    Ok(())
}

fn migrate(vm: &Vm, to: &str) -> Result<MigrationInfo, String> {
    let api = vm.api();
    api.migrate(&MigrateRequest::to(to)).map_err(|e| format!("starting the migration: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let info = api.migration().map_err(|e| format!("following the migration: {e}"))?;
        match info.phase {
            MigrationPhase::Completed => return Ok(info),
            MigrationPhase::Failed => return Err(format!("migration failed: {}", info.error.unwrap_or_default())),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err("the migration did not finish within 60 s".into())
}

/// The source's downtime (pause until the destination's acknowledgement), in ms.
fn downtime_ms(i: &MigrationInfo) -> f64 {
    i.downtime_us.unwrap_or(0) as f64 / 1000.0
}

/// Pause on the source to running on the destination, in ms: both hosts share one clock here.
fn pause_to_running_ms(i: &MigrationInfo) -> f64 {
    match (i.paused_at_us, i.resumed_at_us) {
        (Some(p), Some(r)) => r.saturating_sub(p) as f64 / 1000.0,
        _ => f64::NAN,
    }
}

fn print_migration(i: &MigrationInfo) {
    println!(
        "   completed: total {} ms, guest paused {:.2} ms (pause → running on the destination {:.2} ms), {} round(s), {:.1} MiB sent",
        i.total_ms,
        downtime_ms(i),
        pause_to_running_ms(i),
        i.round,
        i.bytes_sent as f64 / (1 << 20) as f64
    );
}
