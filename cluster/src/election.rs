// SPDX-License-Identifier: Apache-2.0
//! One leader among any number of balancers, elected through etcd (GreptimeDB's election is the
//! model). A candidate that sees no leader record grants itself a lease and creates the record
//! under it in one transaction that requires the key to be absent, so exactly one wins; it
//! counts as elected only after a first successful renewal of that lease. It then leads while
//! its lease is known to be alive ([`Lease::is_alive`], renewed under a timeout shorter than the
//! TTL), and steps down at once when it is not. Everything a leader writes compares the leader
//! record's lease, so a leader that lost its lease cannot act even if it has not noticed yet.
//! When a leader dies its record vanishes with its lease, and the next candidate to look takes
//! over: within the TTL plus etcd's expiry granularity plus one poll.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::keys;
use crate::lease::Lease;
use crate::model::now_ms;
use crate::store::{Compare, Op, Store, StoreError, Txn};
use crate::view::{json, parse};

/// How often a follower looks for a leader record.
const POLL: Duration = Duration::from_millis(250);

/// Who leads (`balancer/leader`, under the leader's lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub id: String,
    pub pid: u32,
    pub since_ms: u64,
    pub lease: i64,
}

/// A won election.
pub struct Leadership {
    pub lease: Arc<Lease>,
    pub record: LeaderRecord,
}

impl Leadership {
    /// The compare every write of the leader carries: the leader record is still under its
    /// lease.
    pub fn fence(&self) -> Compare {
        Compare::Lease(keys::balancer_leader(), self.lease.id())
    }

    pub fn is_alive(&self) -> bool {
        self.lease.is_alive()
    }
}

/// Campaigns until elected (`Some`) or cancelled (`None`). Store errors are logged and retried.
pub async fn campaign<S: Store>(
    store: &S,
    id: &str,
    ttl_s: i64,
    mut cancel: watch::Receiver<bool>,
) -> Option<Leadership> {
    let mut following: Option<String> = None;
    loop {
        if *cancel.borrow() {
            return None;
        }
        match try_once(store, id, ttl_s).await {
            Ok(Ok(won)) => {
                tracing::info!(id, lease = won.lease.id(), "elected leader");
                return Some(won);
            }
            Ok(Err(leader)) => {
                if following.as_deref() != Some(leader.as_str()) {
                    tracing::info!(id, leader, "following");
                    following = Some(leader);
                }
            }
            Err(e) => tracing::warn!(id, error = %e, "cannot campaign"),
        }
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => return None,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// One attempt: elected, or who leads.
async fn try_once<S: Store>(store: &S, id: &str, ttl_s: i64) -> Result<Result<Leadership, String>, StoreError> {
    let key = keys::balancer_leader();
    if let Some(kv) = store.get(&key).await? {
        let leader = parse::<LeaderRecord>(&kv).map_or_else(|_| "an unreadable record".into(), |r| r.value.id);
        return Ok(Err(leader));
    }
    let lease = Lease::grant(store, ttl_s).await?;
    let record = LeaderRecord { id: id.to_string(), pid: std::process::id(), since_ms: now_ms(), lease: lease.id() };
    let txn = Txn::new()
        .when([Compare::absent(&key)])
        .then([Op::put_leased(&key, json(&record), lease.id())])
        .otherwise([Op::get(&key)]);
    let result = store.txn(txn).await?;
    if !result.succeeded {
        let _ = store.revoke_lease(lease.id()).await;
        let leader = result
            .gets
            .first()
            .and_then(|g| g.as_ref())
            .and_then(|kv| parse::<LeaderRecord>(kv).ok())
            .map_or_else(|| "another candidate".into(), |r| r.value.id);
        return Ok(Err(leader));
    }
    // Elected only once a renewal succeeded within a third of the TTL.
    let renewed = tokio::time::timeout(lease.ttl() / 3, store.keep_alive(lease.id())).await;
    if !matches!(renewed, Ok(Ok(true))) || !lease.is_alive() {
        let _ = store.revoke_lease(lease.id()).await;
        return Err(StoreError::Failed("the new lease could not be renewed: not leading".into()));
    }
    Ok(Ok(Leadership { lease: Arc::new(lease), record }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn one_of_many_candidates_wins_and_the_next_takes_over_when_it_goes() {
        let store = MemoryStore::new();
        let (_tx, cancel) = watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (store, cancel) = (store.clone(), cancel.clone());
            tasks.push(tokio::spawn(async move {
                let id = format!("b{i}");
                tokio::time::timeout(Duration::from_millis(600), campaign(&store, &id, 3, cancel)).await.ok().flatten()
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(l) = t.await.unwrap() {
                winners.push(l);
            }
        }
        assert_eq!(winners.len(), 1, "exactly one leader");
        let first = winners.pop().unwrap();
        let kv = store.get(&keys::balancer_leader()).await.unwrap().unwrap();
        assert_eq!(parse::<LeaderRecord>(&kv).unwrap().value, first.record);
        // The leader's writes carry its fence, which holds while it leads.
        let ok = store.txn(Txn::new().when([first.fence()])).await.unwrap();
        assert!(ok.succeeded);
        // It goes (its lease is revoked): another candidate is elected, and the old fence fails.
        first.lease.revoke(&store).await;
        let next = campaign(&store, "b9", 1, cancel.clone()).await.unwrap();
        assert_eq!(next.record.id, "b9");
        assert!(!store.txn(Txn::new().when([first.fence()])).await.unwrap().succeeded);
        assert!(store.txn(Txn::new().when([next.fence()])).await.unwrap().succeeded);
    }

    #[tokio::test]
    async fn a_cancelled_campaign_ends() {
        let store = MemoryStore::new();
        let (tx, cancel) = watch::channel(false);
        let _leader = campaign(&store, "a", 3, cancel.clone()).await.unwrap();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { campaign(&store, "b", 3, cancel).await.is_none() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        assert!(waiting.await.unwrap());
    }
}
