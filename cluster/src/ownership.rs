// SPDX-License-Identifier: Apache-2.0
//! Every change of who owns a VM, and every request that leads to one, as one fenced
//! transaction: it compares the revisions the decision was made on (and the acting agent's
//! lease), so a decision taken on a stale view, or by an agent whose lease is gone, is refused
//! instead of applied. The commit point of a migration is [`commit`]: `owner = source ∧ epoch = E
//! → owner = destination, epoch E + 1`.
//!
//! When a transaction fails, the records are read again to say why (another move in flight,
//! the VM moved meanwhile, ...), never retried blindly.

use crate::keys;
use crate::model::{Desired, HostSpec, MovePhase, MoveRecord, MoveTimes, VmRecord, now_ms, now_us};
use crate::placement::{self, PlacementError};
use crate::store::{Compare, LeaseId, Op, Revision, Store, StoreError, Txn};
use crate::view::{ClusterView, Versioned, json, parse, placement_key};

/// Why a cluster operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Placement(#[from] PlacementError),
    #[error("no VM named {0:?} in the cluster")]
    UnknownVm(String),
    #[error("a VM named {0:?} already exists")]
    VmExists(String),
    #[error("VM {vm} is already on host {host}")]
    AlreadyThere { vm: String, host: String },
    #[error("another move of VM {vm} is in flight ({from} → {to}, {phase:?}, asked by {by}); this one is refused")]
    MoveInFlight { vm: String, from: String, to: String, phase: MovePhase, by: String },
    #[error("VM {0} is being stopped")]
    Stopping(String),
    #[error("the cluster changed while deciding ({0}); nothing was done, try again")]
    Conflict(String),
    #[error("the lease this was asked under is gone (an agent unregistered, or a balancer no longer leading): refused")]
    Fenced,
    #[error("host {from} migrates {} and host {to} {}: a move needs both ends alike", mode(*.from_plain), mode(*.to_plain))]
    SecurityMismatch { from: String, to: String, from_plain: bool, to_plain: bool },
}

/// Tries a decision a few times when all it lost was the race for the placement guard.
const PLACEMENT_ATTEMPTS: usize = 5;

/// Creates VM `record.name` on `record.owner` (chosen by the caller, checked here).
pub async fn create_vm<S: Store>(
    store: &S,
    mut record: VmRecord,
    host: Option<&str>,
) -> Result<VmRecord, OwnershipError> {
    for _ in 0..PLACEMENT_ATTEMPTS {
        let view = ClusterView::load(store).await?;
        if view.vms.contains_key(&record.name) {
            return Err(OwnershipError::VmExists(record.name.clone()));
        }
        let table = placement::hosts(&view);
        let owner = match host {
            Some(h) => {
                placement::check_target(&table, h, record.spec.mem_mib)?;
                h.to_string()
            }
            None => placement::place(&table, record.spec.mem_mib, &[])?,
        };
        let lease = view.hosts.get(&owner).map_or(0, |h| h.value.lease);
        record.owner = owner.clone();
        record.epoch = 1;
        let txn = Txn::new()
            .when([
                Compare::absent(keys::vm(&record.name)),
                Compare::ModRevision(placement_key(), view.placement_revision),
                // The host is still the one whose registration the decision saw.
                Compare::Lease(keys::host(&owner), lease),
            ])
            .then([Op::put(keys::vm(&record.name), json(&record)), bump_placement()]);
        if store.txn(txn).await?.succeeded {
            return Ok(record);
        }
    }
    Err(OwnershipError::Conflict("placement decisions kept racing".into()))
}

fn mode(plain: bool) -> &'static str {
    if plain { "in plaintext" } else { "over mutual TLS" }
}

fn bump_placement() -> Op {
    Op::put(placement_key(), now_ms().to_string())
}

/// A move of `vm` to `to` (or to the best host if `None`), if none is in flight.
pub async fn request_move<S: Store>(
    store: &S,
    vm: &str,
    to: Option<&str>,
    requested_by: &str,
) -> Result<MoveRecord, OwnershipError> {
    request_move_fenced(store, vm, to, requested_by, None, None).await
}

/// [`request_move`] migrating as `mode` says (`None`: pre-copy).
pub async fn request_move_as<S: Store>(
    store: &S,
    vm: &str,
    to: Option<&str>,
    requested_by: &str,
    mode: Option<vmm::api::MigrationMode>,
) -> Result<MoveRecord, OwnershipError> {
    request_move_fenced(store, vm, to, requested_by, None, mode).await
}

/// [`request_move`] on behalf of someone whose right to act is `fence` (the balancer's
/// leadership): the request's transaction compares it too, and fails with
/// [`OwnershipError::Fenced`] if it no longer holds.
pub async fn request_move_fenced<S: Store>(
    store: &S,
    vm: &str,
    to: Option<&str>,
    requested_by: &str,
    fence: Option<Compare>,
    mode: Option<vmm::api::MigrationMode>,
) -> Result<MoveRecord, OwnershipError> {
    for _ in 0..PLACEMENT_ATTEMPTS {
        let view = ClusterView::load(store).await?;
        let record = view.vms.get(vm).ok_or_else(|| OwnershipError::UnknownVm(vm.to_string()))?;
        let r = &record.value;
        if r.desired == Desired::Stopped {
            return Err(OwnershipError::Stopping(vm.to_string()));
        }
        if let Some(m) = view.move_in_flight(vm) {
            return Err(in_flight(&m.value));
        }
        let table = placement::hosts(&view);
        let to = match to {
            Some(h) if h == r.owner => {
                return Err(OwnershipError::AlreadyThere { vm: vm.to_string(), host: h.to_string() });
            }
            Some(h) => {
                placement::check_target(&table, h, r.spec.mem_mib)?;
                h.to_string()
            }
            None => placement::place(&table, r.spec.mem_mib, &[&r.owner])?,
        };
        if !view.is_up(&r.owner) {
            return Err(PlacementError::HostDown(r.owner.clone()).into());
        }
        let plain = |h: &str| view.hosts.get(h).is_some_and(|h| h.value.insecure_plaintext);
        if plain(&r.owner) != plain(&to) {
            return Err(OwnershipError::SecurityMismatch {
                from: r.owner.clone(),
                to: to.clone(),
                from_plain: plain(&r.owner),
                to_plain: plain(&to),
            });
        }
        let lease = view.hosts.get(&to).map_or(0, |h| h.value.lease);
        let previous = view.moves.get(vm).map_or(0, |m| m.mod_revision);
        let seen = record.mod_revision;
        let record = MoveRecord {
            id: format!("{vm}.{}.{}", r.epoch, now_us()),
            vm: vm.to_string(),
            from: r.owner.clone(),
            to: to.clone(),
            epoch: r.epoch,
            phase: MovePhase::Requested,
            requested_by: requested_by.to_string(),
            error: None,
            times: MoveTimes { requested_ms: now_ms(), ..Default::default() },
            mode,
        };
        let txn = Txn::new()
            .when([
                Compare::ModRevision(keys::vm(vm), seen),
                // No other move appeared meanwhile (or replaced the finished one we saw).
                Compare::ModRevision(keys::moves(vm), previous),
                Compare::ModRevision(placement_key(), view.placement_revision),
                Compare::Lease(keys::host(&to), lease),
            ])
            .when(fence.clone())
            .then([Op::put(keys::moves(vm), json(&record)), bump_placement()])
            .otherwise([Op::get(keys::moves(vm)), Op::get(keys::vm(vm))]);
        let result = store.txn(txn).await?;
        if result.succeeded {
            return Ok(record);
        }
        if let Some(f) = &fence
            && !store.txn(Txn::new().when([f.clone()])).await?.succeeded
        {
            return Err(OwnershipError::Fenced);
        }
        // Say precisely why, if it was not just the placement guard.
        if let Some(Some(kv)) = result.gets.first()
            && kv.mod_revision != previous
        {
            let m: Versioned<MoveRecord> = parse(kv)?;
            if !m.value.phase.is_final() {
                return Err(in_flight(&m.value));
            }
        }
        match result.gets.get(1) {
            Some(None) => return Err(OwnershipError::UnknownVm(vm.to_string())),
            Some(Some(kv)) if kv.mod_revision != seen => {
                let now: Versioned<VmRecord> = parse(kv)?;
                if now.value.owner != r.owner {
                    return Err(OwnershipError::Conflict(format!("VM {vm} moved to {} meanwhile", now.value.owner)));
                }
            }
            _ => {}
        }
    }
    Err(OwnershipError::Conflict("placement decisions kept racing".into()))
}

fn in_flight(m: &MoveRecord) -> OwnershipError {
    OwnershipError::MoveInFlight {
        vm: m.vm.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        phase: m.phase,
        by: m.requested_by.clone(),
    }
}

/// What the destination's agent read when the migration's connection arrived.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub vm: Versioned<VmRecord>,
    pub mv: Versioned<MoveRecord>,
    /// When the read was sent and answered, µs since the Unix epoch.
    pub sent_us: u64,
    pub done_us: u64,
}

/// Reads the move `route` names and checks it is a move of a running VM to `me` that has not
/// started committing: what the destination's agent does before it starts a destination VMM.
pub async fn accept<S: Store>(store: &S, me: &str, route: &str) -> Result<Accepted, String> {
    // The route is `<vm>.<epoch>.<µs>`: the VM's name comes first (names have no dots).
    let vm = route.split('.').next().unwrap_or_default();
    crate::model::check_name("VM", vm).map_err(|e| format!("route {route:?}: {e}"))?;
    let txn = Txn::new().then([Op::get(keys::moves(vm)), Op::get(keys::vm(vm))]);
    let sent_us = now_us();
    let got = store.txn(txn).await.map_err(|e| e.to_string())?;
    let done_us = now_us();
    let mv: Versioned<MoveRecord> = match got.gets.first() {
        Some(Some(kv)) => parse(kv).map_err(|e| e.to_string())?,
        _ => return Err(format!("no move {route} is known")),
    };
    let rec: Versioned<VmRecord> = match got.gets.get(1) {
        Some(Some(kv)) => parse(kv).map_err(|e| e.to_string())?,
        _ => return Err(format!("VM {vm} does not exist")),
    };
    let m = &mv.value;
    if m.id != route {
        return Err(format!("move {route} is not the VM's current move ({})", m.id));
    }
    if m.to != me {
        return Err(format!("move {route} goes to host {}, not to this host ({me})", m.to));
    }
    if m.phase != MovePhase::Requested {
        return Err(format!("move {route} is {:?}, not waiting for a destination", m.phase));
    }
    if rec.value.owner != m.from || rec.value.epoch != m.epoch {
        return Err(format!(
            "VM {vm} is at epoch {} on {}, the move was asked for epoch {} on {}",
            rec.value.epoch, rec.value.owner, m.epoch, m.from
        ));
    }
    Ok(Accepted { vm: rec, mv, sent_us, done_us })
}

/// The commit point of a migration, made by the destination's agent before the source pauses
/// the guest: the VM becomes `me`'s at epoch E + 1, if nothing changed since [`accept`] and this
/// agent's lease (`lease`) is still the one its host record lives under. Returns the revisions
/// of the VM and the move after the commit.
pub async fn commit<S: Store>(
    store: &S,
    me: &str,
    lease: LeaseId,
    a: &Accepted,
) -> Result<(Revision, MoveTimes), String> {
    let mut vm = a.vm.value.clone();
    vm.owner = me.to_string();
    vm.epoch += 1;
    let mut mv = a.mv.value.clone();
    mv.phase = MovePhase::Committed;
    mv.times.accept_sent_us = Some(a.sent_us);
    mv.times.accept_done_us = Some(a.done_us);
    let sent = now_us();
    mv.times.commit_sent_us = Some(sent);
    let txn = Txn::new()
        .when([
            Compare::ModRevision(keys::vm(&vm.name), a.vm.mod_revision),
            Compare::ModRevision(keys::moves(&vm.name), a.mv.mod_revision),
            Compare::Lease(keys::host(me), lease),
        ])
        .then([Op::put(keys::vm(&vm.name), json(&vm)), Op::put(keys::moves(&vm.name), json(&mv))])
        .otherwise([Op::get(keys::vm(&vm.name)), Op::get(keys::moves(&vm.name)), Op::get(keys::host(me))]);
    let result = store.txn(txn).await.map_err(|e| format!("the commit transaction failed: {e}"))?;
    if result.succeeded {
        let mut times = mv.times;
        times.commit_done_us = Some(now_us());
        return Ok((result.revision, times));
    }
    Err(match (result.gets.first(), result.gets.get(1), result.gets.get(2)) {
        (_, _, Some(None)) => "this agent's lease is gone (fenced)".to_string(),
        (_, _, Some(Some(h))) if h.lease != lease => "this agent's lease is gone (fenced)".to_string(),
        (Some(None), _, _) => format!("VM {} no longer exists", vm.name),
        (Some(Some(kv)), _, _) if kv.mod_revision != a.vm.mod_revision => format!("VM {} changed meanwhile", vm.name),
        _ => format!("move {} changed meanwhile", mv.id),
    })
}

/// Gives the VM back to the move's source: the destination's agent does this when its VMM ended
/// after the commit without ever being told the guest may run (`COMPLETE`), so the paused copy
/// on the source is the only one.
pub async fn hand_back<S: Store>(
    store: &S,
    mv: &MoveRecord,
    vm_revision: Revision,
    why: &str,
) -> Result<bool, StoreError> {
    let Some(kv) = store.get(&keys::vm(&mv.vm)).await? else { return Ok(false) };
    let current: Versioned<VmRecord> = parse(&kv)?;
    if kv.mod_revision != vm_revision || current.value.owner != mv.to {
        return Ok(false);
    }
    let mut vm = current.value;
    vm.owner = mv.from.clone();
    vm.epoch += 1;
    let mut m = mv.clone();
    m.phase = MovePhase::Failed;
    m.error = Some(format!("handed back to {} after the commit: {why}", mv.from));
    m.times.ended_ms = Some(now_ms());
    let txn = Txn::new()
        .when([Compare::ModRevision(keys::vm(&vm.name), vm_revision)])
        .then([Op::put(keys::vm(&vm.name), json(&vm)), Op::put(keys::moves(&vm.name), json(&m))]);
    Ok(store.txn(txn).await?.succeeded)
}

/// What the destination knows of a move's end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Arrival {
    /// When the commit transaction's answer came, µs since the Unix epoch.
    pub commit_done_us: Option<u64>,
    /// When the guest's vCPUs started here, µs since the Unix epoch.
    pub resumed_us: Option<u64>,
    /// The pause measured here, µs.
    pub downtime_us: Option<u64>,
}

/// Ends a move whose commit happened as `Done` (the destination runs the VM, or ran it), if it
/// is still the committed move `id`.
pub async fn finish<S: Store>(store: &S, vm: &str, id: &str, arrival: Arrival) -> Result<bool, StoreError> {
    update_move(store, vm, id, |m| {
        if m.phase != MovePhase::Committed {
            return false;
        }
        m.phase = MovePhase::Done;
        m.times.commit_done_us = m.times.commit_done_us.or(arrival.commit_done_us);
        m.times.resumed_us = m.times.resumed_us.or(arrival.resumed_us);
        m.times.downtime_us = m.times.downtime_us.or(arrival.downtime_us);
        m.times.ended_ms = Some(now_ms());
        true
    })
    .await
}

/// Ends move `id` as failed before its commit: the VM stayed on its source.
pub async fn fail_requested<S: Store>(store: &S, vm: &str, id: &str, error: &str) -> Result<bool, StoreError> {
    update_move(store, vm, id, |m| {
        if m.phase != MovePhase::Requested {
            return false;
        }
        m.phase = MovePhase::Failed;
        m.error = Some(error.to_string());
        m.times.ended_ms = Some(now_ms());
        true
    })
    .await
}

/// Records when the guest paused on the source and ran on the destination, and the guest's
/// dirty rate in the last pre-copy round (the source learns them from its VMM), whatever phase
/// the move is in.
pub async fn note_pause<S: Store>(
    store: &S,
    vm: &str,
    id: &str,
    paused_us: Option<u64>,
    resumed_us: Option<u64>,
    dirty_pages_s: Option<u64>,
) -> Result<bool, StoreError> {
    update_move(store, vm, id, |m| {
        m.times.paused_us = paused_us.or(m.times.paused_us);
        m.times.resumed_us = resumed_us.or(m.times.resumed_us);
        m.times.dirty_pages_s = dirty_pages_s.or(m.times.dirty_pages_s);
        true
    })
    .await
}

/// Changes move `id` of `vm` with `f` (which says whether to write), compare-and-put on the
/// move's revision, reading again if another writer got in between.
async fn update_move<S: Store>(
    store: &S,
    vm: &str,
    id: &str,
    f: impl Fn(&mut MoveRecord) -> bool,
) -> Result<bool, StoreError> {
    for _ in 0..10 {
        let Some(kv) = store.get(&keys::moves(vm)).await? else { return Ok(false) };
        let mut m: Versioned<MoveRecord> = parse(&kv)?;
        if m.value.id != id || !f(&mut m.value) {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::ModRevision(keys::moves(vm), kv.mod_revision)])
            .then([Op::put(keys::moves(vm), json(&m.value))]);
        if store.txn(txn).await?.succeeded {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Notes when the source started its migration (before it connects: nothing else writes the
/// move until the destination commits).
pub async fn mark_started<S: Store>(store: &S, vm: &str, id: &str) -> Result<bool, StoreError> {
    update_move(store, vm, id, |m| {
        if m.phase != MovePhase::Requested {
            return false;
        }
        m.times.started_ms = Some(now_ms());
        true
    })
    .await
}

/// Asks for VM `vm` to be powered off and removed; its owner's agent does it.
pub async fn stop_vm<S: Store>(store: &S, vm: &str) -> Result<VmRecord, OwnershipError> {
    let kv = store.get(&keys::vm(vm)).await?.ok_or_else(|| OwnershipError::UnknownVm(vm.to_string()))?;
    let mut r: Versioned<VmRecord> = parse(&kv)?;
    if r.value.desired == Desired::Stopped {
        return Ok(r.value);
    }
    r.value.desired = Desired::Stopped;
    let txn = Txn::new()
        .when([Compare::ModRevision(keys::vm(vm), kv.mod_revision)])
        .then([Op::put(keys::vm(vm), json(&r.value))]);
    if store.txn(txn).await?.succeeded {
        Ok(r.value)
    } else {
        Err(OwnershipError::Conflict(format!("VM {vm} changed meanwhile")))
    }
}

/// Removes a stopped VM's records: its owner's agent does this once its VMM is gone.
pub async fn remove_stopped<S: Store>(store: &S, vm: &str, me: &str, lease: LeaseId) -> Result<bool, StoreError> {
    let Some(kv) = store.get(&keys::vm(vm)).await? else { return Ok(true) };
    let r: Versioned<VmRecord> = parse(&kv)?;
    if r.value.owner != me || r.value.desired != Desired::Stopped {
        return Ok(false);
    }
    let txn = Txn::new()
        .when([Compare::ModRevision(keys::vm(vm), kv.mod_revision), Compare::Lease(keys::host(me), lease)])
        .then([Op::delete(keys::vm(vm)), Op::delete(keys::status(vm)), Op::delete(keys::moves(vm))]);
    Ok(store.txn(txn).await?.succeeded)
}

/// Marks `host` drained or not.
pub async fn set_drained<S: Store>(store: &S, host: &str, drained: bool) -> Result<(), OwnershipError> {
    let view = ClusterView::load(store).await?;
    if !view.knows_host(host) {
        return Err(PlacementError::UnknownHost(host.to_string()).into());
    }
    let txn = Txn::new().then([Op::put(keys::host_spec(host), json(&HostSpec { drained })), bump_placement()]);
    store.txn(txn).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
