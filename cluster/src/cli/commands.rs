// SPDX-License-Identifier: Apache-2.0
//! What each cluster command does: a fenced change through `ownership`, then (unless told not
//! to) waiting for the agents to carry it out, reading the cluster's records.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::status::{render, status_report, vms_table};
use super::{BalancerArgs, ClusterCmd, CreateArgs, DrainArgs, EtcdAccess, HostCmd, RunArgs, Top, VmCmd};
use crate::agent::{self, AgentConfig, MigrationSecurity};
use crate::balance::Policy;
use crate::balancer::{self, BalancerConfig};
use crate::error::ClusterError;
use crate::model::{Capacity, Desired, MovePhase, MoveRecord, VmPhase, VmRecord, VmSpec, check_name, now_ms, now_us};
use crate::ownership;
use crate::store::Store;
use crate::view::ClusterView;

/// How often the commands read the cluster while waiting.
const POLL: Duration = Duration::from_millis(100);

/// A wait that ended badly.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{0}")]
    Failed(String),
    #[error("gave up after {} s waiting for {what}", .after.as_secs())]
    Timeout { what: String, after: Duration },
}

/// Runs one command. `etcd` is `--etcd` and `--etcd-tls-dir`.
pub async fn run_command(top: Top, etcd: &EtcdAccess) -> Result<(), ClusterError> {
    match top {
        Top::Host(HostCmd::Run(args)) => host_run(args, etcd).await,
        Top::Host(HostCmd::Drain(args)) => drain(args, etcd).await,
        Top::Host(HostCmd::Undrain { host }) => {
            let store = super::connect(etcd).await?;
            ownership::set_drained(&store, &host, false).await?;
            println!("host {host} is schedulable again");
            Ok(())
        }
        Top::Cluster(ClusterCmd::Status { json, watch, every }) => {
            if watch && !(0.2..=3600.0).contains(&every) {
                return Err(ClusterError::Invalid("--every must be between 0.2 and 3600 s".into()));
            }
            let store = super::connect(etcd).await?;
            if watch {
                return super::watch::run(&store, Duration::from_secs_f64(every)).await;
            }
            let report = status_report(&ClusterView::load(&store).await?);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).map_err(|e| ClusterError::Failed(e.to_string()))?);
            } else {
                print!("{}", render(&report));
            }
            Ok(())
        }
        Top::Vm(VmCmd::List { json }) => {
            let store = super::connect(etcd).await?;
            let report = status_report(&ClusterView::load(&store).await?);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report.vms).map_err(|e| ClusterError::Failed(e.to_string()))?
                );
            } else {
                print!("{}", vms_table(&report));
            }
            Ok(())
        }
        Top::Vm(VmCmd::Create(args)) => create(args, etcd).await,
        Top::Balancer(args) => balancer(args, etcd).await,
        Top::Vm(VmCmd::Stop { name, no_wait }) => stop(&name, no_wait, etcd).await,
        Top::Vm(VmCmd::Move { name, to, no_wait, timeout, mode }) => {
            let store = super::connect(etcd).await?;
            let m =
                ownership::request_move_as(&store, &name, to.as_deref(), "vmm vm move", mode.migration_mode()).await?;
            println!("moving VM {name} from {} to {} (move {})", m.from, m.to, m.id);
            if no_wait {
                return Ok(());
            }
            let done = wait_move(&store, &m, Duration::from_secs(timeout)).await?;
            println!("VM {name} now runs on {}{}", done.to, move_summary(&done));
            Ok(())
        }
    }
}

fn vmm_next_to_me() -> PathBuf {
    std::env::current_exe().map(|e| e.with_file_name("vmm")).unwrap_or_else(|_| PathBuf::from("vmm"))
}

async fn host_run(args: RunArgs, etcd: &EtcdAccess) -> Result<(), ClusterError> {
    check_name("host", &args.name).map_err(ClusterError::Invalid)?;
    let security = match (&args.tls_dir, args.insecure_plaintext) {
        (_, true) => {
            eprintln!("vmm: warning: {}", vmm::transport::PLAINTEXT_WARNING);
            MigrationSecurity::InsecurePlaintext
        }
        (Some(dir), false) => {
            // Checked now (files present and readable, a key that matches) rather than at the
            // first migration.
            vmm::transport::Security::tls(dir)
                .map_err(|e| ClusterError::Invalid(format!("--tls-dir {}: {e}", dir.display())))?;
            MigrationSecurity::Tls(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
        }
        (None, false) => {
            return Err(ClusterError::Invalid(
                "give --tls-dir DIR (this host's TLS identity, see `vmm tls init`) or --insecure-plaintext".into(),
            ));
        }
    };
    let advertise = args.advertise.unwrap_or(args.listen);
    if advertise.ip().is_unspecified() {
        return Err(ClusterError::Invalid(format!(
            "--listen {} is not an address other hosts can reach: give --advertise IP:PORT",
            args.listen
        )));
    }
    let cpu_millis = args
        .cpu_millis
        .or_else(|| crate::procfs::own_cpu_cgroup().and_then(|c| crate::procfs::quota_millis(&c)))
        .unwrap_or_else(crate::procfs::machine_cpu_millis);
    let mem_mib = args.mem_mib.unwrap_or_else(crate::procfs::machine_mem_mib);
    let vmm = args.vmm.unwrap_or_else(vmm_next_to_me);
    if !vmm.is_file() {
        return Err(ClusterError::Invalid(format!("the vmm binary {} does not exist (give --vmm)", vmm.display())));
    }
    if !(0.1..=3600.0).contains(&args.load_every) {
        return Err(ClusterError::Invalid("--load-every must be between 0.1 and 3600 s".into()));
    }
    let cfg = AgentConfig {
        name: args.name,
        etcd: etcd.urls.split(',').map(str::to_string).collect(),
        state_dir: args.state_dir,
        listen: args.listen,
        advertise,
        bridge: args.bridge,
        capacity: Capacity { cpu_millis, mem_mib },
        lease_ttl_s: args.lease_ttl,
        security,
        vmm,
        load_every: Duration::from_secs_f64(args.load_every),
    };
    let store = super::connect(etcd).await?;
    agent::run(cfg, store, cancel_on_signals("stopping (the VMs keep running)")).await
}

/// A cancel signal that turns true at SIGTERM or SIGINT (logging `why`).
pub fn cancel_on_signals(why: &'static str) -> tokio::sync::watch::Receiver<bool> {
    let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot watch for SIGTERM and SIGINT");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("{why}");
        let _ = cancel_tx.send(true);
    });
    cancel
}

async fn balancer(args: BalancerArgs, etcd: &EtcdAccess) -> Result<(), ClusterError> {
    let id = args.id.unwrap_or_else(|| format!("balancer-{}", std::process::id()));
    check_name("balancer", &id).map_err(ClusterError::Invalid)?;
    if !(0.1..=3600.0).contains(&args.every) {
        return Err(ClusterError::Invalid("--every must be between 0.1 and 3600 s".into()));
    }
    let mut policy = Policy::default();
    if let Some(x) = args.start_spread {
        policy.start_spread = x;
    }
    if let Some(x) = args.stop_spread {
        policy.stop_spread = x;
    }
    if let Some(s) = args.cooldown {
        if !(0.0..=86_400.0).contains(&s) {
            return Err(ClusterError::Invalid("--cooldown must be between 0 and 86400 s".into()));
        }
        policy.cooldown_ms = (s * 1000.0) as u64;
    }
    if !(policy.stop_spread >= 0.0 && policy.stop_spread <= policy.start_spread) {
        return Err(ClusterError::Invalid(format!(
            "--stop-spread ({}) must be between 0 and --start-spread ({})",
            policy.stop_spread, policy.start_spread
        )));
    }
    let cfg = BalancerConfig {
        id,
        every: Duration::from_secs_f64(args.every),
        lease_ttl_s: args.lease_ttl,
        policy,
        dry_run: args.dry_run,
        once: args.once,
        json: args.json,
        mode: args.mode.migration_mode(),
    };
    let store = super::connect(etcd).await?;
    let cancel = cancel_on_signals("stopping");
    balancer::run(cfg, store, cancel).await
}

/// A MAC derived from the VM's name and the time: locally administered (0x52 first octet, as
/// QEMU's), unique enough for one cluster.
fn mac_for(name: &str) -> String {
    let h = format!("{name}{}", now_us())
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let b = h.to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

async fn create(args: CreateArgs, etcd: &EtcdAccess) -> Result<(), ClusterError> {
    let name = args.name.unwrap_or_else(|| format!("vm-{:06x}", now_us() & 0xff_ffff));
    check_name("VM", &name).map_err(ClusterError::Invalid)?;
    if let Some(h) = &args.host {
        check_name("host", h).map_err(ClusterError::Invalid)?;
    }
    if !args.kernel.is_file() {
        return Err(ClusterError::Invalid(format!("--kernel {}: no such file", args.kernel.display())));
    }
    if let Some(mac) = &args.mac
        && format!("tap=x,mac={mac}").parse::<vmm::net_config::NetConfig>().is_err()
    {
        return Err(ClusterError::Invalid(format!("--mac {mac}: not a MAC address")));
    }
    if args.mem_mib < 16 || args.vcpus == 0 || args.vcpus > 32 {
        return Err(ClusterError::Invalid("--mem-mib must be at least 16 and --vcpus 1 to 32".into()));
    }
    let mac = if args.no_net { None } else { Some(args.mac.unwrap_or_else(|| mac_for(&name))) };
    let record = VmRecord {
        name: name.clone(),
        spec: VmSpec {
            kernel: std::fs::canonicalize(&args.kernel).unwrap_or(args.kernel),
            initrd: args.initrd.map(|i| std::fs::canonicalize(&i).unwrap_or(i)),
            cmdline: args.cmdline,
            mem_mib: args.mem_mib,
            vcpus: args.vcpus,
            mac,
        },
        desired: Desired::Running,
        owner: String::new(),
        epoch: 1,
        created_ms: now_ms(),
    };
    let store = super::connect(etcd).await?;
    let created = ownership::create_vm(&store, record, args.host.as_deref()).await?;
    println!("VM {name} placed on host {}", created.owner);
    if args.no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + super::CREATE_TIMEOUT;
    loop {
        let view = ClusterView::load(&store).await?;
        match view.status.get(&name).map(|s| &s.value).filter(|s| s.epoch == 1 && s.host == created.owner) {
            Some(s) if s.phase == VmPhase::Running => {
                println!("VM {name} runs on host {} (pid {})", s.host, s.pid.map_or("?".into(), |p| p.to_string()));
                return Ok(());
            }
            Some(s) if matches!(s.phase, VmPhase::Crashed | VmPhase::Lost) => {
                return Err(WaitError::Failed(format!(
                    "VM {name} did not start on host {}: {}",
                    s.host,
                    s.detail.clone().unwrap_or_default()
                ))
                .into());
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout {
                what: format!("VM {name} to run on host {}", created.owner),
                after: super::CREATE_TIMEOUT,
            }
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn stop(name: &str, no_wait: bool, etcd: &EtcdAccess) -> Result<(), ClusterError> {
    let store = super::connect(etcd).await?;
    let r = ownership::stop_vm(&store, name).await?;
    println!("stopping VM {name} on host {}", r.owner);
    if no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + super::CREATE_TIMEOUT;
    while store.get(&crate::keys::vm(name)).await?.is_some() {
        if Instant::now() >= deadline {
            let view = ClusterView::load(&store).await?;
            let why = if view.is_up(&r.owner) { "its agent has not finished" } else { "its host is down" };
            return Err(WaitError::Timeout {
                what: format!("VM {name} to stop ({why})"),
                after: super::CREATE_TIMEOUT,
            }
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
    println!("VM {name} stopped and removed");
    Ok(())
}

/// Waits until move `m` ended; its record then.
async fn wait_move<S: Store>(store: &S, m: &MoveRecord, timeout: Duration) -> Result<MoveRecord, ClusterError> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = ClusterView::load(store).await?;
        match view.moves.get(&m.vm).map(|v| &v.value) {
            Some(now) if now.id == m.id && now.phase == MovePhase::Done => return Ok(now.clone()),
            Some(now) if now.id == m.id && now.phase == MovePhase::Failed => {
                return Err(WaitError::Failed(format!(
                    "moving VM {} from {} to {} failed: {}; it runs on {}",
                    m.vm,
                    m.from,
                    m.to,
                    now.error.clone().unwrap_or_else(|| "no reason given".into()),
                    view.vms.get(&m.vm).map_or("no host".into(), |v| v.value.owner.clone())
                ))
                .into());
            }
            Some(now) if now.id != m.id => {
                return Err(
                    WaitError::Failed(format!("move {} of VM {} was replaced by {}", m.id, m.vm, now.id)).into()
                );
            }
            None => return Err(WaitError::Failed(format!("VM {} and its move are gone", m.vm)).into()),
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout { what: format!("move {} of VM {}", m.id, m.vm), after: timeout }.into());
        }
        tokio::time::sleep(POLL).await;
    }
}

fn move_summary(m: &MoveRecord) -> String {
    let t = &m.times;
    let total = t.ended_ms.map(|e| e.saturating_sub(t.requested_ms));
    // Pause to running on the destination as the destination measured it (one clock).
    let downtime = t.downtime_us.map(|d| d as f64 / 1000.0);
    match (total, downtime) {
        (Some(total), Some(d)) => format!(" ({total} ms from the request, guest paused {d:.2} ms)"),
        (Some(total), None) => format!(" ({total} ms from the request)"),
        _ => String::new(),
    }
}

async fn drain(args: DrainArgs, etcd: &EtcdAccess) -> Result<(), ClusterError> {
    let store = super::connect(etcd).await?;
    let host = args.host.clone();
    ownership::set_drained(&store, &host, true).await?;
    println!("host {host} is drained (unschedulable)");
    if args.no_wait {
        return Ok(());
    }
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    let by = format!("vmm host drain {host}");
    let mut failed: Vec<String> = Vec::new();
    let mut moved = 0;
    let mut in_flight: Vec<MoveRecord> = Vec::new();
    loop {
        let view = ClusterView::load(&store).await?;
        // Moves that ended.
        let mut still = Vec::new();
        for m in in_flight.drain(..) {
            match view.moves.get(&m.vm).map(|v| &v.value) {
                Some(now) if now.id == m.id && now.phase == MovePhase::Done => {
                    moved += 1;
                    println!("  {} → {}{}", m.vm, m.to, move_summary(now));
                }
                Some(now) if now.id == m.id && !now.phase.is_final() => {
                    if now.times.requested_ms + timeout.as_millis() as u64 <= now_ms() {
                        failed.push(format!("{}: no end within {} s", m.vm, timeout.as_secs()));
                    } else {
                        still.push(m);
                    }
                }
                other => {
                    let why = other.and_then(|o| o.error.clone()).unwrap_or_else(|| "ended without moving".into());
                    println!("  {} → {} FAILED: {why}", m.vm, m.to);
                    failed.push(format!("{}: {why}", m.vm));
                }
            }
        }
        in_flight = still;
        // What is left to start: the host's VMs with no move of ours, not failed before.
        let pending: Vec<&VmRecord> = view
            .vms_on(&host)
            .map(|v| &v.value)
            .filter(|v| v.desired == Desired::Running)
            .filter(|v| !in_flight.iter().any(|m| m.vm == v.name))
            .filter(|v| !failed.iter().any(|f| f.starts_with(&format!("{}:", v.name))))
            .collect();
        if pending.is_empty() && in_flight.is_empty() {
            break;
        }
        let room = args.parallel as usize - in_flight.len().min(args.parallel as usize);
        // Largest first: the hardest to place while there is the most room.
        let mut next: Vec<&VmRecord> = pending.into_iter().filter(|v| view.move_in_flight(&v.name).is_none()).collect();
        next.sort_by(|a, b| b.spec.mem_mib.cmp(&a.spec.mem_mib).then(a.name.cmp(&b.name)));
        for v in next.into_iter().take(room) {
            match ownership::request_move(&store, &v.name, None, &by).await {
                Ok(m) => {
                    println!("  moving {} to {}", m.vm, m.to);
                    in_flight.push(m);
                }
                Err(e) => {
                    println!("  {} cannot move: {e}", v.name);
                    failed.push(format!("{}: {e}", v.name));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    println!(
        "drained host {host} in {:.1} s: {moved} VM(s) moved, {} failed",
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::Failed(format!("host {host} still holds VMs: {}", failed.join("; "))))
    }
}
