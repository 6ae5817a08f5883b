// SPDX-License-Identifier: Apache-2.0
//! The cluster demo: a 3-member etcd, three hosts (network namespaces on one segment, each with
//! 0.6 CPU of its own through a cgroup and a host agent), six VMs of our guest placed by the
//! cluster, a client streaming a numbered line every 10 ms to each VM's echo service, then
//! `vmm host drain a` while they stream. It prints `vmm cluster status` before and after and a
//! summary per VM, exits non-zero if any line was lost, and removes everything it made.
//!
//! Usage: vmm-cluster-demo [--vms N] [--mem-mib N] (run as root; see the README).

use std::process::ExitCode;
use std::time::Duration;

use vmm_tests::cluster::{ClusterBed, ClusterOptions};
use vmm_tests::echo_stream::{EchoStream, StreamStats};

const HOSTS: [&str; 3] = ["a", "b", "c"];

struct Options {
    vms: u8,
    mem_mib: u64,
}

fn parse() -> Result<Options, String> {
    let mut o = Options { vms: 6, mem_mib: 128 };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--vms" => o.vms = value("--vms")?.parse().map_err(|e| format!("--vms: {e}"))?,
            "--mem-mib" => o.mem_mib = value("--mem-mib")?.parse().map_err(|e| format!("--mem-mib: {e}"))?,
            other => return Err(format!("unknown option {other:?} (options: --vms N, --mem-mib N)")),
        }
    }
    if !(1..=50).contains(&o.vms) || o.mem_mib < 16 {
        return Err("--vms must be 1 to 50 and --mem-mib at least 16".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm-cluster-demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vmm-cluster-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(o: &Options) -> Result<bool, String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist: this demo needs KVM".into());
    }
    println!("== a 3-member etcd and hosts a, b, c (network namespaces, 0.6 CPU each), one agent per host");
    let c = ClusterBed::start(&HOSTS, ClusterOptions { etcd_members: 3, ..Default::default() });
    println!("   etcd: {} (mutual TLS: the test CA signs etcd's certificate and every host's)", c.endpoints());
    println!("== creating {} VMs of {} MiB with `vmm vm create` (each placed on the freest host)", o.vms, o.mem_mib);
    for i in 0..o.vms {
        let name = format!("vm{i}");
        let cmdline = format!("console=ttyS0 {} vmm.workload=echo", c.bed.guest_ip_cmdline(i));
        let out = c.create_vm(&name, &cmdline, o.mem_mib, &[])?;
        println!("   {}", out.lines().last().unwrap_or_default());
    }
    println!("== a client per VM streams a numbered line every 10 ms to its echo port");
    let mut streams = Vec::new();
    for i in 0..o.vms {
        streams.push(c.echo_stream(i, Duration::from_secs(30))?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let before = c.status().ok_or("cannot read the cluster's status")?;
    println!("== vmm cluster status\n{}", c.cli_ok(&["cluster", "status"]));

    println!("== vmm host drain a (while the clients stream)");
    let out = c.cli(&["host", "drain", "a"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        println!("   drain failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::thread::sleep(Duration::from_secs(2));
    println!("== vmm cluster status\n{}", c.cli_ok(&["cluster", "status"]));
    let after = c.status().ok_or("cannot read the cluster's status")?;

    let stats: Vec<StreamStats> = streams.into_iter().map(EchoStream::finish).collect();
    println!("== summary");
    println!("   VM    before  after  sent  echoed  lost  largest gap");
    let mut intact = out.status.success();
    for (i, s) in stats.iter().enumerate() {
        let name = format!("vm{i}");
        let host = |r: &vmm_cluster::cli::StatusReport| {
            r.vms.iter().find(|v| v.name == name).map_or("?".to_string(), |v| v.owner.clone())
        };
        println!(
            "   {name:<5} {:<7} {:<6} {:<5} {:<7} {:<5} {} ms{}",
            host(&before),
            host(&after),
            s.sent,
            s.echoed,
            s.lost(),
            s.largest_gap.as_millis(),
            if s.errors.is_empty() { String::new() } else { format!("  errors: {}", s.errors.join("; ")) }
        );
        intact &= s.intact();
    }
    let lost: u64 = stats.iter().map(StreamStats::lost).sum();
    println!("   lines lost in all: {lost}");
    drop(c);
    println!("== cleaned up (etcd, agents, VMs, namespaces, cgroups)");
    Ok(intact)
}
