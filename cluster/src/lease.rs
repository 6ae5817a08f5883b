// SPDX-License-Identifier: Apache-2.0
//! An agent's lease, kept alive the careful way (GreptimeDB's election is the model): each
//! renewal runs under a timeout shorter than the TTL, the lease counts as alive only until
//! `time the last successful renewal was sent + TTL`, and the moment a renewal says the lease is
//! gone, or that deadline passes, the agent steps down and says so. Nothing is done on a lease
//! that is not known to be alive: [`Lease::is_alive`] is checked before acting, and the agent's
//! transactions also compare the lease in the store.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::store::{LeaseId, Store, StoreError};

/// The longest TTL an agent may use: a dead host shows as down within this plus etcd's own
/// expiry granularity (about half a second).
pub const MAX_TTL_S: i64 = 3;
/// Margin under the deadline at which the lease already counts as gone.
const MARGIN: Duration = Duration::from_millis(250);

/// How a lease ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Asked to stop.
    Cancelled,
    /// The store said the lease no longer exists.
    Lost,
    /// No renewal succeeded before the deadline.
    Expired(String),
}

/// A granted lease and what is known of its health.
pub struct Lease {
    id: LeaseId,
    ttl: Duration,
    alive_until: Mutex<Instant>,
    gone: AtomicBool,
}

impl Lease {
    /// Grants a lease of `ttl_s` seconds (1 to [`MAX_TTL_S`]).
    pub async fn grant<S: Store>(store: &S, ttl_s: i64) -> Result<Lease, StoreError> {
        let ttl_s = ttl_s.clamp(1, MAX_TTL_S);
        let sent = Instant::now();
        let (id, granted) = store.grant_lease(ttl_s).await?;
        let ttl = Duration::from_secs(granted.clamp(1, ttl_s) as u64);
        Ok(Lease { id, ttl, alive_until: Mutex::new(sent + ttl), gone: AtomicBool::new(false) })
    }

    pub fn id(&self) -> LeaseId {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the lease is known to be alive now (with a margin).
    pub fn is_alive(&self) -> bool {
        !self.gone.load(Ordering::SeqCst) && Instant::now() + MARGIN < *self.alive_until.lock().expect("Poisoned lock")
    }

    /// Renews the lease every third of its TTL, each renewal under a timeout of a third of the
    /// TTL, until `cancel` turns true or the lease is gone.
    pub async fn keep_alive<S: Store>(&self, store: &S, mut cancel: tokio::sync::watch::Receiver<bool>) -> LeaseEnd {
        let every = self.ttl / 3;
        loop {
            tokio::select! {
                _ = cancel.wait_for(|c| *c) => return LeaseEnd::Cancelled,
                _ = tokio::time::sleep(every) => {}
            }
            let sent = Instant::now();
            match tokio::time::timeout(every, store.keep_alive(self.id)).await {
                Ok(Ok(true)) => *self.alive_until.lock().expect("Poisoned lock") = sent + self.ttl,
                Ok(Ok(false)) => {
                    self.gone.store(true, Ordering::SeqCst);
                    tracing::error!(lease = self.id, "the lease is gone: stepping down");
                    return LeaseEnd::Lost;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = self.id, error = %e, "lease renewal failed");
                }
                Err(_) => {
                    tracing::warn!(lease = self.id, "lease renewal timed out after {} ms", every.as_millis());
                }
            }
            if !self.is_alive() {
                self.gone.store(true, Ordering::SeqCst);
                let why = format!("no renewal succeeded within its {} s TTL", self.ttl.as_secs());
                tracing::error!(lease = self.id, "the lease expired ({why}): stepping down");
                return LeaseEnd::Expired(why);
            }
        }
    }

    /// Gives the lease up (best effort), deleting what lives under it.
    pub async fn revoke<S: Store>(&self, store: &S) {
        self.gone.store(true, Ordering::SeqCst);
        if let Err(e) = store.revoke_lease(self.id).await {
            tracing::warn!(lease = self.id, error = %e, "could not revoke the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn kept_alive_until_revoked_then_gone() {
        let store = MemoryStore::new();
        let lease = Lease::grant(&store, 10).await.unwrap();
        assert_eq!(lease.ttl(), Duration::from_secs(MAX_TTL_S as u64));
        assert!(lease.is_alive());
        let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
        let s2 = store.clone();
        let id = lease.id();
        let revoker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            // Still alive past a renewal or two.
            s2.revoke_lease(id).await.unwrap();
        });
        let end = lease.keep_alive(&store, cancel).await;
        revoker.await.unwrap();
        assert_eq!(end, LeaseEnd::Lost);
        assert!(!lease.is_alive());
        drop(cancel_tx);
    }

    #[tokio::test]
    async fn cancelled_on_request() {
        let store = MemoryStore::new();
        let lease = Lease::grant(&store, 1).await.unwrap();
        let (tx, cancel) = tokio::sync::watch::channel(false);
        tx.send(true).unwrap();
        assert_eq!(lease.keep_alive(&store, cancel).await, LeaseEnd::Cancelled);
        lease.revoke(&store).await;
        assert!(!lease.is_alive());
    }
}
