// SPDX-License-Identifier: Apache-2.0
//! `vmm host run`: the host agent. It registers its host under a lease, runs each VM it owns as
//! its own `vmm run` process, accepts incoming migrations on one port for all VMs, carries out
//! moves, publishes its VMs' status and its load, and adopts the VMMs it finds in its state
//! directory when it starts. Its VMMs do not depend on it: killing the agent leaves them
//! running, and a new agent picks them up.
//!
//! Tasks, each stopped by one cancel signal and awaited by name: registration (lease and host
//! record, re-registering when the lease is lost), the watch on the cluster (wakes the
//! reconciler), the reconciler (runs [`reconcile::decide`] and carries out its actions; moves
//! and boots become tasks of their own), the load publisher, and the migration listener.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::error::ClusterError;
use crate::keys;
use crate::lease::{Lease, LeaseEnd};
use crate::local::{LocalVm, StateDir};
use crate::model::{Capacity, HostRecord, VmPhase, VmStatus, now_ms};
use crate::reconcile::{self, Action, LocalSummary};
use crate::store::{Compare, Op, Store, Txn};
use crate::view::{ClusterView, json};
use crate::vmm_client::Runner;
use crate::{incoming, load, outgoing, ownership};

/// How often the reconciler runs without being woken (changes in the cluster wake it at once;
/// this catches VMMs that exited).
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Pause before registering again after the lease was lost, or the store failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How the agent was asked to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub etcd: Vec<String>,
    pub state_dir: PathBuf,
    /// The shared migration port.
    pub listen: SocketAddr,
    /// What other hosts connect to (default: `listen`).
    pub advertise: SocketAddr,
    /// The bridge each VM's TAP joins.
    pub bridge: Option<String>,
    pub capacity: Capacity,
    pub lease_ttl_s: i64,
    /// How migrations to and from this host are secured; every VMM the agent starts gets it.
    pub security: MigrationSecurity,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    pub load_every: Duration,
}

/// The agent's end of the unix socket a destination VMM takes its move's later connections on
/// (`--incoming-conns-fd`), non-blocking.
pub type Handed = Arc<tokio::net::UnixStream>;

/// How a host's migrations are secured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationSecurity {
    /// Mutual TLS with the identity in this directory (`vmm run --tls-dir`).
    Tls(PathBuf),
    /// Plain TCP (`vmm run --insecure-plaintext`).
    InsecurePlaintext,
}

impl MigrationSecurity {
    /// The `vmm run` options that say so.
    pub fn vmm_args(&self) -> Vec<String> {
        match self {
            MigrationSecurity::Tls(dir) => vec!["--tls-dir".into(), dir.display().to_string()],
            MigrationSecurity::InsecurePlaintext => vec!["--insecure-plaintext".into()],
        }
    }
}

/// What the agent's tasks share.
pub struct Agent<S: Store> {
    pub cfg: AgentConfig,
    pub store: S,
    pub runner: Runner,
    lease: Mutex<Option<Arc<Lease>>>,
    /// The VMMs this agent knows, by (VM, epoch).
    locals: Mutex<BTreeMap<(String, u64), LocalVm>>,
    /// VMs a task of their own is working on: the reconciler leaves them alone.
    busy: Mutex<BTreeSet<String>>,
    /// The status last published per VM.
    reported: Mutex<BTreeMap<String, (u64, VmPhase)>>,
    wake: Notify,
    pub cancel: watch::Receiver<bool>,
    /// The host records of the last view (where the other agents are).
    hosts: Mutex<BTreeMap<String, HostRecord>>,
    /// Incoming moves whose destination VMM takes later connections (post-copy's), by move id:
    /// the address the move's first connection came from, and the unix socket (non-blocking)
    /// they are handed over on.
    handed: Mutex<BTreeMap<String, (IpAddr, Handed)>>,
}

/// Marks a VM busy for as long as it lives.
pub struct BusyGuard<S: Store> {
    agent: Arc<Agent<S>>,
    vm: String,
}

impl<S: Store> Drop for BusyGuard<S> {
    fn drop(&mut self) {
        self.agent.busy.lock().expect("Poisoned lock").remove(&self.vm);
        self.agent.wake.notify_one();
    }
}

impl<S: Store> Agent<S> {
    /// The current lease, if it is known to be alive.
    pub fn live_lease(&self) -> Option<Arc<Lease>> {
        self.lease.lock().expect("Poisoned lock").clone().filter(|l| l.is_alive())
    }

    pub fn me(&self) -> &str {
        &self.cfg.name
    }

    /// Host `name`'s registration as last seen.
    pub fn host_record(&self, name: &str) -> Option<HostRecord> {
        self.hosts.lock().expect("Poisoned lock").get(name).cloned()
    }

    /// Where later connections of incoming move `move_id` go: the address its first connection
    /// came from, and the channel to its destination VMM (see `incoming.rs`).
    pub fn handed(&self, move_id: &str) -> Option<(IpAddr, Handed)> {
        self.handed.lock().expect("Poisoned lock").get(move_id).cloned()
    }

    pub fn set_handed(&self, move_id: &str, from: IpAddr, channel: Handed) {
        self.handed.lock().expect("Poisoned lock").insert(move_id.to_string(), (from, channel));
    }

    pub fn drop_handed(&self, move_id: &str) {
        self.handed.lock().expect("Poisoned lock").remove(move_id);
    }

    /// Marks `vm` busy; `None` if it already is.
    pub fn claim(self: &Arc<Self>, vm: &str) -> Option<BusyGuard<S>> {
        let fresh = self.busy.lock().expect("Poisoned lock").insert(vm.to_string());
        fresh.then(|| BusyGuard { agent: self.clone(), vm: vm.to_string() })
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn local(&self, vm: &str, epoch: u64) -> Option<LocalVm> {
        self.locals.lock().expect("Poisoned lock").get(&(vm.to_string(), epoch)).cloned()
    }

    pub fn locals(&self) -> Vec<LocalVm> {
        self.locals.lock().expect("Poisoned lock").values().cloned().collect()
    }

    /// Records (and persists) a local VMM's new state.
    pub fn set_local(&self, l: LocalVm) {
        if let Err(e) = self.runner.dirs.save(&l) {
            tracing::error!(vm = %l.vm, error = %e, "cannot save the VMM's record");
        }
        self.locals.lock().expect("Poisoned lock").insert((l.vm.clone(), l.epoch), l);
    }

    /// Changes a local VMM's epoch (its VM came back at a new epoch): renames its directory.
    pub fn renumber(&self, l: &LocalVm, to: u64) -> Result<LocalVm, ClusterError> {
        let (from_dir, to_dir) = (self.runner.dirs.vm_dir(&l.vm, l.epoch), self.runner.dirs.vm_dir(&l.vm, to));
        std::fs::rename(&from_dir, &to_dir).map_err(ClusterError::io(format!(
            "cannot rename {} to {}",
            from_dir.display(),
            to_dir.display()
        )))?;
        self.locals.lock().expect("Poisoned lock").remove(&(l.vm.clone(), l.epoch));
        let mut moved = l.clone();
        moved.epoch = to;
        self.set_local(moved.clone());
        Ok(moved)
    }

    pub fn drop_local(&self, l: &LocalVm) {
        self.runner.forget(l);
        self.locals.lock().expect("Poisoned lock").remove(&(l.vm.clone(), l.epoch));
    }

    /// Publishes VM `vm`'s status under the lease (if alive).
    pub async fn report(&self, vm: &str, epoch: u64, phase: VmPhase, detail: Option<String>) {
        let Some(lease) = self.live_lease() else { return };
        let pid = self.local(vm, epoch).map(|l| l.pid);
        let status = VmStatus { host: self.me().to_string(), epoch, phase, pid, detail, since_ms: now_ms() };
        // Only while the VM is ours: a status must never claim a VM another host owns.
        let rec = match self.store.get(&keys::vm(vm)).await {
            Ok(Some(kv)) => kv,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(vm, error = %e, "cannot publish the VM's status");
                return;
            }
        };
        let txn = Txn::new()
            .when([
                Compare::ModRevision(keys::vm(vm), rec.mod_revision),
                Compare::Lease(keys::host(self.me()), lease.id()),
            ])
            .then([Op::put_leased(keys::status(vm), json(&status), lease.id())]);
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded => {
                self.reported.lock().expect("Poisoned lock").insert(vm.to_string(), (epoch, phase));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(vm, error = %e, "cannot publish the VM's status"),
        }
    }

    /// Forgets what was published (the lease changed, so the status records are gone).
    fn forget_reports(&self) {
        self.reported.lock().expect("Poisoned lock").clear();
    }
}

/// Runs the agent until `cancel` turns true.
pub async fn run<S: Store>(cfg: AgentConfig, store: S, cancel: watch::Receiver<bool>) -> Result<(), ClusterError> {
    let dirs = StateDir::open(&cfg.state_dir)?;
    let runner = Runner::new(cfg.vmm.clone(), cfg.bridge.clone(), cfg.security.vmm_args(), dirs);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(ClusterError::io(format!("cannot listen for migrations on {}", cfg.listen)))?;
    let agent = Arc::new(Agent {
        cfg,
        store,
        runner,
        lease: Mutex::new(None),
        locals: Mutex::new(BTreeMap::new()),
        busy: Mutex::new(BTreeSet::new()),
        reported: Mutex::new(BTreeMap::new()),
        wake: Notify::new(),
        cancel: cancel.clone(),
        hosts: Mutex::new(BTreeMap::new()),
        handed: Mutex::new(BTreeMap::new()),
    });
    adopt(&agent);
    // Registered before anything else runs, so that a clash with a live agent of the same name
    // is an error at start.
    register(&agent).await?;
    tracing::info!(host = %agent.me(), listen = %agent.cfg.listen, "agent up");

    let tasks: Vec<(&str, JoinHandle<()>)> = vec![
        ("registration", tokio::spawn(registration(agent.clone()))),
        ("watch", tokio::spawn(watch_cluster(agent.clone()))),
        ("reconcile", tokio::spawn(reconcile_loop(agent.clone()))),
        ("load", tokio::spawn(load::publish(agent.clone()))),
        ("migrations", tokio::spawn(incoming::listen(agent.clone(), listener))),
    ];
    for (name, task) in tasks {
        match task.await {
            Ok(()) => tracing::info!(task = name, "task ended"),
            Err(e) => tracing::error!(task = name, error = %e, "task failed"),
        }
    }
    // A clean stop takes the host down at once (its VMs keep running).
    let lease = agent.lease.lock().expect("Poisoned lock").take();
    if let Some(lease) = lease {
        lease.revoke(&agent.store).await;
    }
    tracing::info!(host = %agent.me(), "agent stopped; its VMs keep running");
    Ok(())
}

/// Picks up the VMMs recorded in the state directory.
fn adopt<S: Store>(agent: &Arc<Agent<S>>) {
    for l in agent.runner.dirs.load_all() {
        let alive = agent.runner.alive(&l);
        tracing::info!(vm = %l.vm, epoch = l.epoch, pid = l.pid, alive, "found a VMM of an earlier agent");
        agent.locals.lock().expect("Poisoned lock").insert((l.vm.clone(), l.epoch), l);
    }
}

/// Grants a lease and writes the host record under it. Waits for the record of an earlier
/// agent of this host to expire with its lease; fails if it is kept alive (another agent).
async fn register<S: Store>(agent: &Arc<Agent<S>>) -> Result<(), ClusterError> {
    let key = keys::host(agent.me());
    // The lease is granted once the way is clear: it must not expire while waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(crate::lease::MAX_TTL_S as u64 + 5);
    let mut waited = false;
    while let Some(kv) = agent.store.get(&key).await? {
        if tokio::time::Instant::now() >= deadline {
            let other = serde_json::from_slice::<HostRecord>(&kv.value).ok();
            return Err(ClusterError::Invalid(format!(
                "host {} is already registered by a live agent{}",
                agent.me(),
                other
                    .map(|o| format!(" (pid {}, migration port {})", o.agent_pid, o.migration_addr))
                    .unwrap_or_default()
            )));
        }
        if !waited {
            tracing::info!(host = %agent.me(), "waiting for the previous registration of this host to expire");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lease = Arc::new(Lease::grant(&agent.store, agent.cfg.lease_ttl_s).await?);
    let record = HostRecord {
        name: agent.me().to_string(),
        migration_addr: agent.cfg.advertise.to_string(),
        capacity: agent.cfg.capacity,
        lease: lease.id(),
        agent_pid: std::process::id(),
        since_ms: now_ms(),
        insecure_plaintext: agent.cfg.security == MigrationSecurity::InsecurePlaintext,
    };
    let txn =
        Txn::new().when([Compare::absent(key.clone())]).then([Op::put_leased(key.clone(), json(&record), lease.id())]);
    if !agent.store.txn(txn).await?.succeeded {
        lease.revoke(&agent.store).await;
        return Err(ClusterError::Failed(format!("another agent registered host {} meanwhile", agent.me())));
    }
    agent.forget_reports();
    *agent.lease.lock().expect("Poisoned lock") = Some(lease);
    agent.wake();
    Ok(())
}

/// Keeps the lease alive; registers again when it is lost.
async fn registration<S: Store>(agent: Arc<Agent<S>>) {
    let mut cancel = agent.cancel.clone();
    loop {
        let lease = agent.lease.lock().expect("Poisoned lock").clone();
        if let Some(lease) = lease {
            match lease.keep_alive(&agent.store, cancel.clone()).await {
                LeaseEnd::Cancelled => return,
                end => tracing::error!(host = %agent.me(), ?end, "lost the lease: not acting until registered again"),
            }
        }
        *agent.lease.lock().expect("Poisoned lock") = None;
        loop {
            tokio::select! {
                _ = cancel.wait_for(|c| *c) => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
            match register(&agent).await {
                Ok(()) => {
                    tracing::info!(host = %agent.me(), "registered again");
                    break;
                }
                Err(e) => tracing::warn!(host = %agent.me(), error = %e, "cannot register"),
            }
        }
    }
}

/// Wakes the reconciler on every change in the cluster.
async fn watch_cluster<S: Store>(agent: Arc<Agent<S>>) {
    let mut cancel = agent.cancel.clone();
    loop {
        match agent.store.watch(keys::ROOT).await {
            Ok(mut w) => loop {
                tokio::select! {
                    _ = cancel.wait_for(|c| *c) => return,
                    ev = w.next() => match ev {
                        Some(Ok(_)) => agent.wake(),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the cluster watch failed");
                            break;
                        }
                        None => break,
                    }
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot watch the cluster"),
        }
        // Changes may have been missed: reconcile from a fresh read.
        agent.wake();
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => return,
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }
}

/// Runs the reconciler on every wake-up and every second.
async fn reconcile_loop<S: Store>(agent: Arc<Agent<S>>) {
    let mut cancel = agent.cancel.clone();
    loop {
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => return,
            _ = agent.wake.notified() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
        if let Err(e) = reconcile_once(&agent).await {
            tracing::warn!(error = %e, "reconcile failed");
        }
    }
}

async fn reconcile_once<S: Store>(agent: &Arc<Agent<S>>) -> Result<(), ClusterError> {
    // Without a live lease the agent only watches: its VMMs run on regardless.
    if agent.live_lease().is_none() {
        return Ok(());
    }
    let view = ClusterView::load(&agent.store).await?;
    *agent.hosts.lock().expect("Poisoned lock") =
        view.hosts.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect();
    let locals: Vec<LocalSummary> =
        agent.locals().into_iter().map(|l| LocalSummary { alive: agent.runner.alive(&l), local: l }).collect();
    let busy = agent.busy.lock().expect("Poisoned lock").clone();
    let reported = agent.reported.lock().expect("Poisoned lock").clone();
    let actions = reconcile::decide(agent.me(), &view, &locals, &busy, &reported);
    for action in actions {
        tracing::debug!(?action, "reconcile");
        if let Err(e) = execute(agent, &view, action.clone()).await {
            tracing::warn!(?action, error = %e, "action failed");
        }
    }
    Ok(())
}

async fn execute<S: Store>(agent: &Arc<Agent<S>>, view: &ClusterView, action: Action) -> Result<(), ClusterError> {
    match action {
        Action::Boot { vm } => {
            let Some(rec) = view.vms.get(&vm).map(|r| r.value.clone()) else { return Ok(()) };
            let Some(guard) = agent.claim(&vm) else { return Ok(()) };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _guard = guard;
                boot(&agent, rec).await;
            });
        }
        Action::Shutdown { vm, epoch } => {
            if let Some(mut l) = agent.local(&vm, epoch) {
                let api = agent.runner.api(&l);
                let asked = tokio::task::spawn_blocking(move || api.shutdown()).await;
                if let Ok(Err(e)) = asked {
                    tracing::warn!(vm, error = %e, "cannot ask the guest to power off; killing its VMM");
                    agent.runner.kill(&l);
                }
                l.stopping = true;
                agent.set_local(l);
                agent.report(&vm, epoch, VmPhase::Stopping, None).await;
            }
        }
        Action::Kill { vm, epoch, why } => {
            if let Some(l) = agent.local(&vm, epoch) {
                tracing::warn!(vm, epoch, why, "killing a VMM");
                agent.runner.kill(&l);
            }
        }
        Action::Forget { vm, epoch } => {
            if let Some(l) = agent.local(&vm, epoch) {
                agent.drop_local(&l);
            }
        }
        Action::RemoveStopped { vm } => {
            let Some(lease) = agent.live_lease() else { return Ok(()) };
            if ownership::remove_stopped(&agent.store, &vm, agent.me(), lease.id()).await? {
                tracing::info!(vm, "stopped and removed");
                for l in agent.locals().into_iter().filter(|l| l.vm == vm) {
                    if !agent.runner.alive(&l) {
                        agent.drop_local(&l);
                    }
                }
            }
        }
        Action::Report { vm, epoch, phase, detail } => {
            let detail = match (phase, detail) {
                (VmPhase::Crashed, d) => {
                    let l = agent.local(&vm, epoch);
                    let exit = l.as_ref().and_then(|l| agent.runner.exit_status(l));
                    let tail = l.as_ref().map(|l| agent.runner.log_tail(l)).unwrap_or_default();
                    Some(format!(
                        "{}{}{}",
                        d.unwrap_or_default(),
                        exit.map(|e| format!(" ({e})")).unwrap_or_default(),
                        if tail.is_empty() { String::new() } else { format!(": {tail}") }
                    ))
                }
                (_, d) => d,
            };
            agent.report(&vm, epoch, phase, detail).await;
        }
        Action::Adopt { vm, from_epoch, to_epoch } => {
            let Some(guard) = agent.claim(&vm) else { return Ok(()) };
            if let Some(l) = agent.local(&vm, from_epoch) {
                outgoing::take_back(agent, &l, to_epoch).await?;
            }
            drop(guard);
        }
        Action::StartMove { vm, move_id } | Action::FollowMove { vm, move_id } => {
            let Some(guard) = agent.claim(&vm) else { return Ok(()) };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _guard = guard;
                outgoing::run(&agent, &vm, &move_id).await;
            });
        }
        Action::DrainOutgoing { vm, epoch } => {
            let Some(guard) = agent.claim(&vm) else { return Ok(()) };
            let Some(l) = agent.local(&vm, epoch) else { return Ok(()) };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _guard = guard;
                outgoing::drain(&agent, &l).await;
            });
        }
        Action::FailRequested { vm, move_id, why } => {
            if agent.live_lease().is_some() && ownership::fail_requested(&agent.store, &vm, &move_id, &why).await? {
                tracing::warn!(vm, move_id, why, "move failed");
            }
        }
        Action::FinishIncoming { vm, move_id, epoch } => {
            let Some(guard) = agent.claim(&vm) else { return Ok(()) };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _guard = guard;
                incoming::finish_adopted(&agent, &vm, &move_id, epoch).await;
            });
        }
        Action::HandBack { vm, move_id, revision, why } => {
            let Some(m) = view.moves.get(&vm).map(|m| m.value.clone()).filter(|m| m.id == move_id) else {
                return Ok(());
            };
            if ownership::hand_back(&agent.store, &m, revision, &why).await? {
                tracing::warn!(vm, move_id, why, "handed the VM back to its source");
            }
            for l in agent.locals().into_iter().filter(|l| l.vm == vm && l.epoch == m.epoch + 1) {
                if !agent.runner.alive(&l) {
                    agent.drop_local(&l);
                }
            }
        }
        Action::EndLostIncoming { vm, move_id, epoch, why } => {
            if ownership::finish(&agent.store, &vm, &move_id, ownership::Arrival::default()).await? {
                tracing::error!(vm, move_id, why, "the VM was lost on this host after its move committed");
            }
            agent.report(&vm, epoch, VmPhase::Lost, Some(why)).await;
        }
    }
    Ok(())
}

/// Boots a VM created on this host and reports how it went.
async fn boot<S: Store>(agent: &Arc<Agent<S>>, rec: crate::model::VmRecord) {
    if agent.live_lease().is_none() {
        return;
    }
    let (vm, epoch) = (rec.name.clone(), rec.epoch);
    let started = {
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || agent.runner.boot(&rec)).await
    };
    let l = match started {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::error!(vm, error = %e, "cannot boot the VM");
            agent.report(&vm, epoch, VmPhase::Crashed, Some(format!("cannot start its VMM: {e}"))).await;
            return;
        }
        Err(e) => {
            tracing::error!(vm, error = %e, "boot task failed");
            return;
        }
    };
    agent.set_local(l.clone());
    agent.report(&vm, epoch, VmPhase::Starting, None).await;
    // Running once its API answers (the guest boots within milliseconds to seconds).
    let api = agent.runner.api(&l);
    for _ in 0..600 {
        let api = api.clone();
        if let Ok(Ok(_)) = tokio::task::spawn_blocking(move || api.get_vm()).await {
            tracing::info!(vm, epoch, pid = l.pid, "VM running");
            agent.report(&vm, epoch, VmPhase::Running, None).await;
            return;
        }
        if !agent.runner.alive(&l) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reconciler reports the crash with the VMM's exit and log.
    agent.wake();
}
