// SPDX-License-Identifier: Apache-2.0
//! An in-process store with etcd's semantics (revisions, transactions, leases, watches), for
//! unit tests of what is built on the store. It passes the same contract tests as the etcd
//! backend. Leases expire when the store is next used after their deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, TxnResult, Watch};

/// Events a watcher may have queued before it is dropped (it then sees its watch end).
const WATCH_QUEUE: usize = 1024;

type WatchSender = mpsc::Sender<Result<Vec<Event>, StoreError>>;

#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    revision: Revision,
    data: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Prefix and queue of each watch.
    watchers: Vec<(String, WatchSender)>,
}

#[derive(Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: LeaseId,
}

struct Lease {
    ttl_s: i64,
    deadline: Instant,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().expect("Poisoned lock");
        inner.expire(Instant::now());
        inner
    }
}

impl Inner {
    fn kv(&self, key: &str) -> Option<KeyValue> {
        self.data.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            lease: e.lease,
        })
    }

    fn holds(&self, c: &Compare) -> bool {
        let e = self.data.get(c.key());
        match c {
            Compare::ModRevision(_, r) => e.map_or(0, |e| e.mod_revision) == *r,
            Compare::CreateRevision(_, r) => e.map_or(0, |e| e.create_revision) == *r,
            Compare::Version(_, v) => e.map_or(0, |e| e.version) == *v,
            Compare::Lease(_, l) => e.map_or(0, |e| e.lease) == *l,
            Compare::Value(_, v) => e.is_some_and(|e| &e.value == v),
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: LeaseId) {
        if self.leases.remove(&id).is_none() {
            return;
        }
        let keys: Vec<String> = self.data.iter().filter(|(_, e)| e.lease == id).map(|(k, _)| k.clone()).collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        let mut events = Vec::new();
        for k in keys {
            self.data.remove(&k);
            events.push(Event { key: k, deleted: true, revision: self.revision });
        }
        self.notify(events);
    }

    fn notify(&mut self, events: Vec<Event>) {
        self.watchers.retain(|(prefix, tx)| {
            let mine: Vec<Event> = events.iter().filter(|e| e.key.starts_with(prefix.as_str())).cloned().collect();
            // A full or closed queue ends this watch; its owner watches again and rereads.
            mine.is_empty() || tx.try_send(Ok(mine)).is_ok()
        });
    }

    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        // Leases are checked before anything changes, so a failing put changes nothing.
        for op in ops {
            if let Op::Put { lease, .. } = op
                && *lease != 0
                && !self.leases.contains_key(lease)
            {
                return Err(StoreError::Failed(format!("etcdserver: requested lease not found ({lease:x})")));
            }
        }
        let writes = ops.iter().any(|op| !matches!(op, Op::Get { .. }));
        if writes {
            self.revision += 1;
        }
        let rev = self.revision;
        let mut gets = Vec::new();
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let (create_revision, version) = match self.data.get(key) {
                        Some(e) => (e.create_revision, e.version + 1),
                        None => (rev, 1),
                    };
                    self.data.insert(
                        key.clone(),
                        Entry { value: value.clone(), create_revision, mod_revision: rev, version, lease: *lease },
                    );
                    events.push(Event { key: key.clone(), deleted: false, revision: rev });
                }
                Op::Delete { key } => {
                    if self.data.remove(key).is_some() {
                        events.push(Event { key: key.clone(), deleted: true, revision: rev });
                    }
                }
                Op::Get { key } => gets.push(self.kv(key)),
            }
        }
        self.notify(events);
        Ok(gets)
    }
}

impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kv(key))
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let inner = self.lock();
        let kvs = inner
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, _)| inner.kv(k))
            .collect();
        Ok((kvs, inner.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let mut inner = self.lock();
        let succeeded = txn.when.iter().all(|c| inner.holds(c));
        let ops = if succeeded { &txn.then } else { &txn.otherwise };
        let gets = inner.apply(ops)?;
        Ok(TxnResult { succeeded, revision: inner.revision, gets })
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<(LeaseId, i64), StoreError> {
        if ttl_s <= 0 {
            return Err(StoreError::Failed(format!("lease TTL must be positive, got {ttl_s}")));
        }
        let mut inner = self.lock();
        inner.next_lease += 1;
        let id = inner.next_lease;
        inner.leases.insert(id, Lease { ttl_s, deadline: Instant::now() + Duration::from_secs(ttl_s as u64) });
        Ok((id, ttl_s))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + Duration::from_secs(l.ttl_s as u64);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.leases.contains_key(&lease) {
            return Err(StoreError::Failed(format!("etcdserver: requested lease not found ({lease:x})")));
        }
        inner.revoke(lease);
        Ok(())
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        self.lock().watchers.push((prefix.to_string(), tx));
        Ok(Watch::new(rx))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
