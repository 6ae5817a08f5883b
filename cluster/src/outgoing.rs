// SPDX-License-Identifier: Apache-2.0
//! The source side of a move: ask the local VMM to migrate to the destination's shared port
//! (with the move's id as its route), follow it, and settle how it ended from the cluster's
//! records. The commit is the destination's (see `incoming.rs`); this side never resumes a guest
//! that was committed away unless the cluster handed it back.

use std::sync::Arc;
use std::time::Duration;

use vmm::api::{MigrateRequest, MigrationInfo, MigrationPhase, VmState};

use crate::agent::Agent;
use crate::error::ClusterError;
use crate::keys;
use crate::local::LocalVm;
use crate::model::{MovePhase, MoveRecord, VmPhase, VmRecord};
use crate::ownership;
use crate::store::Store;
use crate::view::{ClusterView, Versioned, parse};

/// How often the source's migration is polled.
const POLL: Duration = Duration::from_millis(50);
/// How often the records are read while waiting for the cluster to settle a move.
const SETTLE_POLL: Duration = Duration::from_millis(200);

enum Outcome {
    Completed(Box<MigrationInfo>),
    /// Failed; the guest runs here.
    Failed(String),
    /// Failed past the commit point; the guest is paused here.
    InDoubt(String),
    /// The VMM is gone.
    Gone,
}

/// Carries out (or, after an agent restart, follows) move `move_id` of `vm` from this host.
pub async fn run<S: Store>(agent: &Arc<Agent<S>>, vm: &str, move_id: &str) {
    if let Err(e) = run_inner(agent, vm, move_id).await {
        tracing::warn!(vm, move_id, error = %e, "outgoing move");
    }
}

async fn run_inner<S: Store>(agent: &Arc<Agent<S>>, vm: &str, move_id: &str) -> Result<(), ClusterError> {
    let view = ClusterView::load(&agent.store).await?;
    let Some(m) = view.moves.get(vm).map(|m| m.value.clone()).filter(|m| m.id == move_id && !m.phase.is_final()) else {
        return Ok(());
    };
    let Some(mut l) = agent.local(vm, m.epoch) else {
        ownership::fail_requested(&agent.store, vm, move_id, "the source has no VMM for the VM").await?;
        return Ok(());
    };
    // Not started yet, or an earlier agent died between recording the start and the VMM
    // taking the request (its migration shows no phase then).
    let never_asked =
        l.outgoing.as_deref() != Some(move_id) || migration_phase(agent, &l).await == Some(MigrationPhase::None);
    if m.phase == MovePhase::Requested && never_asked {
        if let Err(e) = start(agent, &view, &m, &mut l).await {
            tracing::warn!(vm, move_id, error = %e, "cannot start the migration");
            l.outgoing = None;
            agent.set_local(l.clone());
            ownership::fail_requested(&agent.store, vm, move_id, &e.to_string()).await?;
            agent.report(vm, l.epoch, VmPhase::Running, None).await;
            return Ok(());
        }
    }
    let outcome = follow(agent, &l).await;
    match outcome {
        Outcome::Completed(info) => {
            // Post-copy's pages: those the guest had dirtied when it switched, which followed it.
            let postcopy_pages = info.postcopy.as_ref().map(|p| p.pages_needed);
            tracing::info!(
                vm,
                move_id,
                to = %m.to,
                total_ms = info.total_ms,
                downtime_us = ?info.downtime_us,
                mode = ?info.mode,
                postcopy_pages = ?postcopy_pages,
                "moved away"
            );
            // The rate the last pre-copy round measured (the stop-and-copy round does not set it).
            let noted = ownership::note_pause(
                &agent.store,
                vm,
                move_id,
                info.paused_at_us,
                info.resumed_at_us,
                Some(info.dirty_rate_pages_s),
            );
            if let Err(e) = noted.await {
                tracing::warn!(vm, error = %e, "cannot record the move's timing");
            }
            // The source VMM exits once its outcome was read; then its leftovers go.
            for _ in 0..200 {
                if !agent.runner.alive(&l) {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            agent.runner.kill(&l);
            agent.drop_local(&l);
        }
        Outcome::Failed(why) => settle_failed(agent, &m, l, &why).await?,
        Outcome::InDoubt(why) => settle_in_doubt(agent, &m, l, &why).await?,
        Outcome::Gone => {
            let why = format!("the source VMM exited during the migration: {}", agent.runner.log_tail(&l));
            ownership::fail_requested(&agent.store, vm, move_id, &why).await?;
            agent.wake();
        }
    }
    Ok(())
}

async fn start<S: Store>(
    agent: &Arc<Agent<S>>,
    view: &ClusterView,
    m: &MoveRecord,
    l: &mut LocalVm,
) -> Result<(), ClusterError> {
    if agent.live_lease().is_none() {
        return Err(ClusterError::Failed("the source's agent has no live lease".into()));
    }
    let dest =
        view.hosts.get(&m.to).ok_or_else(|| ClusterError::Failed(format!("destination host {} is down", m.to)))?;
    let rec = view.vms.get(&m.vm).ok_or_else(|| ClusterError::Failed(format!("VM {} no longer exists", m.vm)))?;
    if rec.value.owner != agent.me() || rec.value.epoch != m.epoch {
        return Err(ClusterError::Failed(format!("VM {} is no longer at epoch {} here", m.vm, m.epoch)));
    }
    if !agent.runner.alive(l) {
        return Err(ClusterError::Failed("the VM's VMM is not running".into()));
    }
    // Written before the connection: nothing else writes the move until the destination
    // commits it, which compares the move's revision as the destination read it.
    ownership::mark_started(&agent.store, &m.vm, &m.id).await?;
    l.outgoing = Some(m.id.clone());
    agent.set_local(l.clone());
    // The VMM's own TLS identity (the agent's --tls-dir), or plaintext as the agent runs.
    let request = MigrateRequest {
        route: Some(m.id.clone()),
        mode: m.mode,
        insecure_plaintext: agent.cfg.security == crate::agent::MigrationSecurity::InsecurePlaintext,
        ..MigrateRequest::to(&dest.value.migration_addr)
    };
    let api = agent.runner.api(l);
    tokio::task::spawn_blocking(move || api.migrate(&request))
        .await
        .map_err(|e| ClusterError::Failed(e.to_string()))?
        .map_err(|e| ClusterError::Vmm(format!("the VMM refused to migrate: {e}")))?;
    tracing::info!(vm = %m.vm, move_id = %m.id, to = %m.to, addr = %dest.value.migration_addr, "migration started");
    agent.report(&m.vm, l.epoch, VmPhase::Migrating, None).await;
    Ok(())
}

/// A source VMM whose move is done (found by a restarted agent): it ends once its migration
/// does (after a post-copy switch it serves the destination's missing pages until then), or
/// once it no longer answers; then it and its leftovers go.
pub async fn drain<S: Store>(agent: &Arc<Agent<S>>, l: &LocalVm) {
    loop {
        match migration_phase(agent, l).await {
            Some(MigrationPhase::Postcopy | MigrationPhase::PostcopyPaused) if agent.runner.alive(l) => {
                if *agent.cancel.borrow() {
                    return;
                }
                tokio::time::sleep(SETTLE_POLL).await;
            }
            _ => break,
        }
    }
    tracing::info!(vm = %l.vm, epoch = l.epoch, "the source VMM of a finished move is done");
    agent.runner.kill(l);
    agent.drop_local(l);
}

/// The local VMM's migration phase, if it answers.
async fn migration_phase<S: Store>(agent: &Arc<Agent<S>>, l: &LocalVm) -> Option<MigrationPhase> {
    let api = agent.runner.api(l);
    tokio::task::spawn_blocking(move || api.migration()).await.ok()?.ok().map(|i| i.phase)
}

/// Polls the local VMM's migration until it ends.
async fn follow<S: Store>(agent: &Arc<Agent<S>>, l: &LocalVm) -> Outcome {
    let api = agent.runner.api(l);
    loop {
        let a = api.clone();
        match tokio::task::spawn_blocking(move || a.migration()).await {
            Ok(Ok(info)) if info.phase == MigrationPhase::Completed => return Outcome::Completed(Box::new(info)),
            Ok(Ok(info)) if info.phase == MigrationPhase::Failed => {
                let why = info.error.unwrap_or_else(|| "no reason given".into());
                let a = api.clone();
                let state = tokio::task::spawn_blocking(move || a.get_vm()).await;
                return match state {
                    Ok(Ok(vm)) if vm.state == VmState::Paused => Outcome::InDoubt(why),
                    _ => Outcome::Failed(why),
                };
            }
            Ok(Ok(_)) => {}
            _ if !agent.runner.alive(l) => return Outcome::Gone,
            _ => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn read<S: Store>(
    agent: &Arc<Agent<S>>,
    vm: &str,
) -> Result<(Option<MoveRecord>, Option<VmRecord>), ClusterError> {
    let txn =
        crate::store::Txn::new().then([crate::store::Op::get(keys::moves(vm)), crate::store::Op::get(keys::vm(vm))]);
    let r = agent.store.txn(txn).await?;
    let m = match r.gets.first() {
        Some(Some(kv)) => Some(parse::<MoveRecord>(kv)?.value),
        _ => None,
    };
    let v = match r.gets.get(1) {
        Some(Some(kv)) => Some(parse::<VmRecord>(kv).map(|v: Versioned<VmRecord>| v.value)?),
        _ => None,
    };
    Ok((m, v))
}

/// The migration failed and the guest runs here. Usually the move was never committed: end it
/// as failed. If the destination committed it while this side did not hear so, the VM is the
/// destination's until it hands it back (it does, since its VMM never ran the guest).
async fn settle_failed<S: Store>(
    agent: &Arc<Agent<S>>,
    m: &MoveRecord,
    mut l: LocalVm,
    why: &str,
) -> Result<(), ClusterError> {
    tracing::warn!(vm = %m.vm, move_id = %m.id, why, "migration failed; the guest runs on here");
    loop {
        let (mv, rec) = read(agent, &m.vm).await?;
        match mv {
            Some(mv) if mv.id == m.id && mv.phase == MovePhase::Requested => {
                if ownership::fail_requested(&agent.store, &m.vm, &m.id, why).await? {
                    break;
                }
            }
            Some(mv) if mv.id == m.id && mv.phase == MovePhase::Committed => {}
            _ => {
                // Ended (handed back, or otherwise): follow the record.
                if let Some(rec) = rec.filter(|r| r.owner == agent.me() && r.epoch > l.epoch) {
                    l = take_back(agent, &l, rec.epoch).await?;
                }
                break;
            }
        }
        if *agent.cancel.borrow() {
            return Ok(());
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
    l.outgoing = None;
    agent.set_local(l.clone());
    agent.report(&m.vm, l.epoch, VmPhase::Running, None).await;
    Ok(())
}

/// The migration failed past the commit point and the guest is paused here: only the cluster's
/// records say whether the destination runs it (then this copy goes) or handed it back (then
/// this copy runs on).
async fn settle_in_doubt<S: Store>(
    agent: &Arc<Agent<S>>,
    m: &MoveRecord,
    l: LocalVm,
    why: &str,
) -> Result<(), ClusterError> {
    tracing::warn!(vm = %m.vm, move_id = %m.id, why, "migration in doubt: the guest stays paused until the cluster settles it");
    agent.report(&m.vm, l.epoch, VmPhase::InDoubt, Some(why.to_string())).await;
    loop {
        match read(agent, &m.vm).await {
            Ok((mv, rec)) => {
                let mv = mv.filter(|mv| mv.id == m.id);
                match (mv.map(|mv| mv.phase), rec) {
                    (Some(MovePhase::Done), _) | (_, None) => {
                        tracing::info!(vm = %m.vm, "the destination runs the VM: dropping the paused copy");
                        agent.runner.kill(&l);
                        agent.drop_local(&l);
                        return Ok(());
                    }
                    // Never committed (so never run there): ending the move fences a late commit,
                    // which compares the move's revision.
                    (Some(MovePhase::Requested), Some(_))
                        if ownership::fail_requested(&agent.store, &m.vm, &m.id, why).await? =>
                    {
                        take_back(agent, &l, l.epoch).await?;
                        return Ok(());
                    }
                    (Some(MovePhase::Committed), _) => {}
                    (_, Some(rec)) if rec.owner == agent.me() && rec.epoch > l.epoch => {
                        take_back(agent, &l, rec.epoch).await?;
                        return Ok(());
                    }
                    (_, Some(rec)) if rec.owner != agent.me() => {
                        agent.runner.kill(&l);
                        agent.drop_local(&l);
                        return Ok(());
                    }
                    _ => {}
                }
            }
            Err(e) => tracing::warn!(vm = %m.vm, error = %e, "cannot read the cluster to settle a move in doubt"),
        }
        if *agent.cancel.borrow() {
            return Ok(());
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// The VM is this host's again (at `epoch`): resume its VMM if the failed migration left it
/// paused, and renumber it.
pub async fn take_back<S: Store>(agent: &Arc<Agent<S>>, l: &LocalVm, epoch: u64) -> Result<LocalVm, ClusterError> {
    let api = agent.runner.api(l);
    let a = api.clone();
    let state =
        tokio::task::spawn_blocking(move || a.get_vm()).await.map_err(|e| ClusterError::Failed(e.to_string()))?;
    if matches!(&state, Ok(vm) if vm.state == VmState::Paused) {
        tokio::task::spawn_blocking(move || api.resume())
            .await
            .map_err(|e| ClusterError::Failed(e.to_string()))?
            .map_err(|e| ClusterError::Vmm(format!("cannot resume the guest: {e}")))?;
        tracing::info!(vm = %l.vm, "the cluster handed the VM back: resumed");
    }
    let mut l = if epoch != l.epoch { agent.renumber(l, epoch)? } else { l.clone() };
    l.outgoing = None;
    agent.set_local(l.clone());
    agent.report(&l.vm, l.epoch, VmPhase::Running, None).await;
    Ok(l)
}
