// SPDX-License-Identifier: Apache-2.0
//! `vmm balancer`: the daemon around the planner. Any number run; one is elected leader through
//! etcd (`election.rs`) and only it acts. Each round (every `--every` seconds) the leader reads
//! the cluster at one revision, makes a plan ([`balance::plan`]), re-checks it
//! ([`balance::check`]), publishes it under its lease for `vmm cluster status`, and asks for its
//! moves with transactions fenced on its leadership; the host agents carry them out as they
//! would any `vmm vm move`. A leader that loses its lease stops at once (its requests would be
//! refused anyway) and campaigns again. Moves it asked for before dying are carried out by the
//! agents, and the next leader sees them in flight.
//!
//! `--dry-run` takes no part in the election: it prints each round's plan and acts on nothing.

use std::time::Duration;

use tokio::sync::watch;

use crate::balance::{self, BalanceInput, Plan, PlanRecord, Policy};
use crate::election::{self, Leadership};
use crate::error::ClusterError;
use crate::keys;
use crate::model::now_ms;
use crate::ownership::{self, OwnershipError};
use crate::store::{Op, Store, Txn};
use crate::view::{ClusterView, json};

/// How the balancer was asked to run.
#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// This instance's name (in the leader record and in the moves it asks for).
    pub id: String,
    pub every: Duration,
    pub lease_ttl_s: i64,
    pub policy: Policy,
    pub dry_run: bool,
    /// Dry run: one plan, then exit.
    pub once: bool,
    /// Dry run: print the input and the plan as JSON (a snapshot for the planner's tests).
    pub json: bool,
    /// How the moves it asks for migrate (`None`: pre-copy).
    pub mode: Option<vmm::api::MigrationMode>,
}

/// One round's plan on a fresh view.
async fn plan_round<S: Store>(store: &S, policy: &Policy, active: bool) -> Result<(BalanceInput, Plan), ClusterError> {
    let view = ClusterView::load(store).await?;
    let input = balance::input::from_view(&view, now_ms(), active);
    let plan = balance::plan(&input, policy);
    Ok((input, plan))
}

/// Runs until cancelled (or, for `--dry-run --once`, after one plan).
pub async fn run<S: Store>(cfg: BalancerConfig, store: S, cancel: watch::Receiver<bool>) -> Result<(), ClusterError> {
    if cfg.dry_run {
        return dry_run(&cfg, &store, cancel).await;
    }
    loop {
        let Some(leadership) = election::campaign(&store, &cfg.id, cfg.lease_ttl_s, cancel.clone()).await else {
            return Ok(());
        };
        let keeper = {
            let (store, lease, cancel) = (store.clone(), leadership.lease.clone(), cancel.clone());
            tokio::spawn(async move { lease.keep_alive(&store, cancel).await })
        };
        lead(&cfg, &store, &leadership, cancel.clone()).await;
        if *cancel.borrow() {
            // A clean stop hands over at once: the next candidate need not wait for the TTL.
            leadership.lease.revoke(&store).await;
            let _ = keeper.await;
            tracing::info!(id = cfg.id, "stopped; leadership given up");
            return Ok(());
        }
        keeper.abort();
        tracing::error!(id = cfg.id, "leadership lost (lease gone): acting on nothing, campaigning again");
    }
}

/// Rounds while the lease is alive.
async fn lead<S: Store>(cfg: &BalancerConfig, store: &S, leadership: &Leadership, mut cancel: watch::Receiver<bool>) {
    // Carry the hysteresis over from the previous leader's last plan.
    let mut active = match ClusterView::load(store).await {
        Ok(v) => v.balancer_plan.is_some_and(|p| p.value.plan.active),
        Err(_) => false,
    };
    while leadership.is_alive() && !*cancel.borrow() {
        match plan_round(store, &cfg.policy, active).await {
            Ok((input, plan)) => {
                active = plan.active;
                act(cfg, store, leadership, &input, plan).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the cluster"),
        }
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => return,
            _ = tokio::time::sleep(cfg.every) => {}
        }
    }
}

/// Checks, publishes and carries out one plan.
async fn act<S: Store>(cfg: &BalancerConfig, store: &S, leadership: &Leadership, input: &BalanceInput, plan: Plan) {
    let mut record = PlanRecord {
        leader: cfg.id.clone(),
        at_ms: input.now_ms,
        policy: cfg.policy.clone(),
        plan,
        requested: Vec::new(),
        refused: Vec::new(),
    };
    if let Err(e) = balance::check(input, &cfg.policy, &record.plan) {
        // A planner bug must not move VMs: say so and act on nothing.
        tracing::error!(error = e, "the plan broke a rule; not acting on it");
        record.refused.push(("(plan)".into(), e));
        record.plan.moves.clear();
    }
    let by = format!("vmm balancer {}", cfg.id);
    for m in &record.plan.moves {
        if !leadership.is_alive() {
            record.refused.push((m.vm.clone(), "leadership lost".into()));
            break;
        }
        match ownership::request_move_fenced(store, &m.vm, Some(&m.to), &by, Some(leadership.fence()), cfg.mode).await {
            Ok(r) => {
                tracing::info!(
                    vm = m.vm,
                    from = m.from,
                    to = m.to,
                    move_id = r.id,
                    spread_before = m.spread_before,
                    spread_after = m.spread_after,
                    cost = m.cost,
                    "move asked for"
                );
                record.requested.push(m.vm.clone());
            }
            Err(OwnershipError::Fenced) => {
                tracing::error!(vm = m.vm, "refused: no longer the leader");
                record.refused.push((m.vm.clone(), OwnershipError::Fenced.to_string()));
                break;
            }
            Err(e) => {
                tracing::warn!(vm = m.vm, to = m.to, error = %e, "move refused");
                record.refused.push((m.vm.clone(), e.to_string()));
            }
        }
    }
    if record.plan.moves.is_empty() {
        tracing::debug!(why = record.plan.why, "nothing to move");
    }
    // Published under the leader's lease and only while it leads.
    let txn = Txn::new().when([leadership.fence()]).then([Op::put_leased(
        keys::balancer_plan(),
        json(&record),
        leadership.lease.id(),
    )]);
    if let Err(e) = store.txn(txn).await {
        tracing::warn!(error = %e, "cannot publish the plan");
    }
}

async fn dry_run<S: Store>(
    cfg: &BalancerConfig,
    store: &S,
    mut cancel: watch::Receiver<bool>,
) -> Result<(), ClusterError> {
    let mut active = false;
    loop {
        let (input, plan) = plan_round(store, &cfg.policy, active).await?;
        active = plan.active;
        if let Err(e) = balance::check(&input, &cfg.policy, &plan) {
            return Err(ClusterError::Failed(format!("the plan broke a rule: {e}")));
        }
        if cfg.json {
            let out = serde_json::json!({ "input": input, "plan": plan });
            println!("{}", serde_json::to_string_pretty(&out).map_err(|e| ClusterError::Failed(e.to_string()))?);
        } else {
            print!("{}", balance::render(&plan));
        }
        if cfg.once {
            return Ok(());
        }
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => return Ok(()),
            _ = tokio::time::sleep(cfg.every) => {}
        }
    }
}
