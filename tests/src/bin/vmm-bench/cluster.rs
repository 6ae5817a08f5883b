// SPDX-License-Identifier: Apache-2.0
//! The cluster section (`--only cluster`): hosts with agents and a private etcd, as the cluster
//! tests build them (`vmm_tests::cluster`).
//!
//! - Density: idle 64 MiB VMs of our guest (no NIC) created on one host through the cluster;
//!   then, with nothing moving, the agent's CPU and memory over a quiet window, in all and per
//!   VM, and each VMM's resident memory. Then the agent is killed: how long until the cluster
//!   shows the host as down.
//! - Drain: hosts a, b, c with 0.6 CPU each, N VMs on host a, each with a client streaming a
//!   line every 10 ms to its echo service; the time `vmm host drain a` takes, the clients'
//!   largest gap during it and lines lost; once with idle guests, once with guests dirtying
//!   64 MiB at 64 MiB/s.
//! - The store on a migration's path, from the moves' records: the etcd round trips between the
//!   source connecting and the guest running on the destination (the destination reads the
//!   move, then commits it at `Prepare`), their duration, and how many fall inside the guest's
//!   pause (by design none: the commit is made before the source pauses the guest).

use std::time::{Duration, Instant};

use vmm_cluster::model::MoveRecord;
use vmm_cluster::store::{EtcdStore, EtcdTls};
use vmm_cluster::view::ClusterView;
use vmm_tests::cluster::{ClusterBed, ClusterOptions};
use vmm_tests::echo_stream::EchoStream;

use crate::monitor::Monitor::Ours;
use crate::results::{Better, Results};

/// How the section is sized.
pub struct Settings {
    pub density_vms: usize,
    pub drain_vms: u8,
    pub drain_mib: u64,
    pub runs: usize,
    /// Quiet window over which the idle agent is measured.
    pub idle_window: Duration,
}

pub const SECTION_DENSITY: &str = "cluster: density";
pub const AGENT_CPU: &str = "agent CPU with every VM idle";
pub const VMS_RUNNING: &str = "idle 64 MiB VMs running on one host";
pub const IN_DOWNTIME: &str = "etcd round trips inside the guest's pause";

/// CPU time of process `pid`, seconds.
fn cpu_s(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

fn create(c: &ClusterBed, name: &str, cmdline: &str, mem_mib: u64, extra: &[&str]) -> Result<(), String> {
    c.create_vm(name, cmdline, mem_mib, extra).map(drop)
}

/// Density and the agent's footprint; then how long a dead agent's host takes to show as down.
pub fn density(results: &mut Results, s: &Settings) -> Result<(), String> {
    let mem = vmm_cluster::procfs::machine_mem_mib().saturating_sub(2048).max(1024);
    let mut c = ClusterBed::start(&["a"], ClusterOptions { cpu_millis: None, mem_mib: mem, ..Default::default() });
    let agent = c.agent("a").map(|p| p.id()).ok_or("no agent")?;
    std::thread::sleep(Duration::from_secs(2));
    let base_rss = rss_mib(agent).unwrap_or(0.0);
    let started = Instant::now();
    let mut running = 0;
    for i in 0..s.density_vms {
        match create(&c, &format!("d{i}"), "console=ttyS0 vmm.workload=idle", 64, &["--no-net", "--host", "a"]) {
            Ok(()) => running += 1,
            Err(e) => {
                eprintln!("vmm-bench: density stopped at {running} VMs: {e}");
                break;
            }
        }
    }
    eprintln!("vmm-bench: {running} idle VMs created in {:.1} s", started.elapsed().as_secs_f64());
    results.add(SECTION_DENSITY, VMS_RUNNING, "VMs", Better::Higher, Ours, running as f64);
    // Let the boots settle, then measure a quiet window.
    std::thread::sleep(Duration::from_secs(3));
    let (c0, t0) = (cpu_s(agent).ok_or("agent gone")?, Instant::now());
    std::thread::sleep(s.idle_window);
    let cpu = (cpu_s(agent).ok_or("agent gone")? - c0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_mib(agent).unwrap_or(0.0);
    results.add(SECTION_DENSITY, AGENT_CPU, "% of a CPU", Better::Lower, Ours, cpu);
    results.add(SECTION_DENSITY, "agent RSS", "MiB", Better::Lower, Ours, rss);
    if running > 0 {
        results.add(SECTION_DENSITY, "agent CPU per VM", "% of a CPU", Better::Lower, Ours, cpu / running as f64);
        let per = (rss - base_rss).max(0.0) * 1024.0 / running as f64;
        results.add(SECTION_DENSITY, "agent RSS per VM (over the agent alone)", "KiB", Better::Lower, Ours, per);
        let status = c.status().ok_or("no status")?;
        let vmm_rss: Vec<f64> = status.vms.iter().filter_map(|v| v.pid).filter_map(rss_mib).collect();
        if !vmm_rss.is_empty() {
            let avg = vmm_rss.iter().sum::<f64>() / vmm_rss.len() as f64;
            results.add(SECTION_DENSITY, "VMM process RSS per idle 64 MiB VM", "MiB", Better::Lower, Ours, avg);
        }
    }
    // How long a dead agent's host takes to show as down (lease TTL 3 s).
    c.kill_agent("a");
    let killed = Instant::now();
    c.wait_until("host a to show as down", Duration::from_secs(30), |st| st.hosts.iter().any(|h| !h.up));
    results.add(
        SECTION_DENSITY,
        "agent killed → host shown down",
        "ms",
        Better::Lower,
        Ours,
        killed.elapsed().as_secs_f64() * 1e3,
    );
    Ok(())
}

/// One drain of `s.drain_vms` VMs off host a, `dirty` or idle.
pub fn drain(results: &mut Results, s: &Settings, dirty: bool) -> Result<(), String> {
    let label = if dirty { "dirtying 64 MiB at 64 MiB/s" } else { "idle" };
    let section = format!("cluster: drain {}×{} MiB, {label}", s.drain_vms, s.drain_mib);
    for run in 0..s.runs {
        eprintln!("vmm-bench: {section}, run {}", run + 1);
        let c = ClusterBed::start(&["a", "b", "c"], ClusterOptions::default());
        for i in 0..s.drain_vms {
            let workload =
                if dirty { "vmm.workload=dirty vmm.dirty_mib=64 vmm.dirty_rate=64" } else { "vmm.workload=echo" };
            let cmdline = format!("console=ttyS0 {} {workload}", c.bed.guest_ip_cmdline(i));
            create(&c, &format!("vm{i}"), &cmdline, s.drain_mib, &["--host", "a"])?;
        }
        let mut streams = Vec::new();
        for i in 0..s.drain_vms {
            streams.push(c.echo_stream(i, Duration::from_secs(30))?);
        }
        std::thread::sleep(Duration::from_secs(1));
        for st in &streams {
            st.reset_gap();
        }
        let t = Instant::now();
        let out = c.cli(&["host", "drain", "a"]);
        let took = t.elapsed();
        if !out.status.success() {
            return Err(format!("the drain failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        std::thread::sleep(Duration::from_millis(500));
        let stats: Vec<_> = streams.into_iter().map(EchoStream::finish).collect();
        let gap = stats.iter().map(|s| s.largest_gap).max().unwrap_or_default();
        let lost: u64 = stats.iter().map(|s| s.lost()).sum();
        results.add(&section, "drain time (vmm host drain)", "ms", Better::Lower, Ours, took.as_secs_f64() * 1e3);
        results.add(
            &section,
            "clients' largest echo gap during the drain",
            "ms",
            Better::Lower,
            Ours,
            gap.as_secs_f64() * 1e3,
        );
        results.add(&section, "echo lines lost", "", Better::Lower, Ours, lost as f64);
        for m in moves(&c)? {
            record_move(results, &section, &m);
        }
    }
    Ok(())
}

/// The moves' records, read from etcd.
pub fn moves(c: &ClusterBed) -> Result<Vec<MoveRecord>, String> {
    let endpoints: Vec<String> = c.endpoints().split(',').map(String::from).collect();
    let tls = EtcdTls::load(c.etcd_tls()).map_err(|e| e.to_string())?;
    let view = c
        .bed
        .client()
        .run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async {
                let store = EtcdStore::connect_with(&endpoints, Some(&tls)).await.map_err(|e| e.to_string())?;
                ClusterView::load(&store).await.map_err(|e| e.to_string())
            })
        })
        .map_err(|e| e.to_string())??;
    Ok(view.moves.into_values().map(|m| m.value).collect())
}

/// What one move's record says about the store on its path.
fn record_move(results: &mut Results, section: &str, m: &MoveRecord) {
    let t = &m.times;
    let (Some(as_), Some(ad), Some(cs), Some(cd)) =
        (t.accept_sent_us, t.accept_done_us, t.commit_sent_us, t.commit_done_us)
    else {
        return;
    };
    let ms = |us: u64| us as f64 / 1e3;
    results.add(
        section,
        "etcd round trips between the source's connect and the guest running on the destination",
        "",
        Better::Lower,
        Ours,
        2.0,
    );
    results.add(
        section,
        "destination reads the move (etcd round trip)",
        "ms",
        Better::Lower,
        Ours,
        ms(ad.saturating_sub(as_)),
    );
    results.add(
        section,
        "destination commits the move (etcd transaction)",
        "ms",
        Better::Lower,
        Ours,
        ms(cd.saturating_sub(cs)),
    );
    if let (Some(p), Some(r)) = (t.paused_us, t.resumed_us) {
        let inside = [(as_, ad), (cs, cd)].iter().filter(|(a, b)| *a < r && *b > p).count();
        results.add(section, IN_DOWNTIME, "", Better::Lower, Ours, inside as f64);
        results.add(
            section,
            "guest pause: paused on the source → running on the destination",
            "ms",
            Better::Lower,
            Ours,
            ms(r.saturating_sub(p)),
        );
    }
    if let (Some(started), Some(r)) = (t.started_ms, t.resumed_us) {
        results.add(
            section,
            "move: source asks its VMM → guest running on the destination",
            "ms",
            Better::Lower,
            Ours,
            (r / 1000).saturating_sub(started) as f64,
        );
    }
    if let Some(ended) = t.ended_ms {
        results.add(
            section,
            "move: request → done",
            "ms",
            Better::Lower,
            Ours,
            ended.saturating_sub(t.requested_ms) as f64,
        );
    }
}

/// The cluster targets, from the issue.
pub fn targets(r: &Results, s: &Settings, line: &mut dyn FnMut(bool, String)) {
    if let Some(n) = r.median(SECTION_DENSITY, VMS_RUNNING, Ours) {
        let want = s.density_vms.min(50) as f64;
        line(
            n >= want,
            format!(
                "cluster: {want:.0} idle 64 MiB VMs on one host: {n:.0} ran (50 asked by the issue; {} tried)",
                s.density_vms
            ),
        );
    }
    if let Some(cpu) = r.median(SECTION_DENSITY, AGENT_CPU, Ours) {
        line(cpu < 1.0, format!("cluster: agent under 1 % of a CPU with every VM idle: {cpu:.2} %"));
    }
    for row in r.rows.iter().filter(|row| row.metric == IN_DOWNTIME) {
        let max = row.vmm.iter().copied().fold(0.0, f64::max);
        line(
            max == 0.0,
            format!(
                "{}: no etcd round trip inside the guest's pause: at most {max:.0} in {} moves",
                row.section,
                row.vmm.len()
            ),
        );
    }
}
