// SPDX-License-Identifier: Apache-2.0
//! The cluster's store behind one small trait: keys and values with revisions, transactions
//! (when / then / else, as etcd has them), leases and prefix watches. Two backends implement
//! it and pass the same contract tests (`cluster/tests/store_contract.rs`): [`etcd::EtcdStore`]
//! (the real one) and [`memory::MemoryStore`] (an in-process model, for unit tests of the
//! decisions built on top).
//!
//! Semantics follow etcd's: a revision is a cluster-wide counter bumped by every write; each key
//! has a create revision, a mod revision and a version (0 for all three when it does not
//! exist); a key put with a lease disappears when the lease expires or is revoked.

pub mod etcd;
pub mod memory;

use std::future::Future;

pub use etcd::{EtcdStore, EtcdTls};
pub use memory::MemoryStore;

/// A cluster-wide revision (etcd's).
pub type Revision = i64;
/// A lease id; 0 is "no lease".
pub type LeaseId = i64;

/// Why a store call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    #[error("the cluster store (etcd at {endpoints}) is unreachable: {why}")]
    Unavailable { endpoints: String, why: String },
    /// The store answered with an error.
    #[error("the cluster store refused the request: {0}")]
    Failed(String),
    /// A value in the store is not what this version writes.
    #[error("malformed value at {key}: {why}")]
    Malformed { key: String, why: String },
    /// How to reach the store is wrong (an `https://` URL without a TLS directory, a TLS
    /// directory that cannot be read): nothing was sent.
    #[error("the cluster store: {0}")]
    Config(String),
}

/// A key and its value, with etcd's revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: LeaseId,
}

/// One condition of a transaction. A key that does not exist has create and mod revision,
/// version and lease 0, and no value (a `Value` compare on it is false).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    ModRevision(String, Revision),
    CreateRevision(String, Revision),
    Version(String, i64),
    /// The key exists and is attached to this lease (0: has no lease).
    Lease(String, LeaseId),
    Value(String, Vec<u8>),
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Compare {
        Compare::CreateRevision(key.into(), 0)
    }

    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision(k, _)
            | Compare::CreateRevision(k, _)
            | Compare::Version(k, _)
            | Compare::Lease(k, _)
            | Compare::Value(k, _) => k,
        }
    }
}

/// One operation of a transaction branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: LeaseId },
    Delete { key: String },
    Get { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease: 0 }
    }

    pub fn put_leased(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }

    pub fn get(key: impl Into<String>) -> Op {
        Op::Get { key: key.into() }
    }
}

/// A transaction: if every compare holds, the `then` operations run, else the `otherwise` ones,
/// all atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Txn {
        self.when.extend(compares);
        self
    }

    pub fn then(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.then.extend(ops);
        self
    }

    pub fn otherwise(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.otherwise.extend(ops);
        self
    }
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held (and so `then` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
    /// For each `Get` of the branch that ran, in order: the key, if it exists.
    pub gets: Vec<Option<KeyValue>>,
}

/// A change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub key: String,
    /// `false` for a put, `true` for a delete (or a lease expiry).
    pub deleted: bool,
    pub revision: Revision,
}

/// Changes under a prefix, as they happen. `None` from [`Watch::next`] means the watch ended
/// (the store went away): watch again, and read the state afresh, since changes may have
/// been missed.
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<Event>, StoreError>>,
}

impl Watch {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Result<Vec<Event>, StoreError>>) -> Watch {
        Watch { rx }
    }

    /// The next batch of changes; `None` when the watch ended.
    pub async fn next(&mut self) -> Option<Result<Vec<Event>, StoreError>> {
        self.rx.recv().await
    }
}

/// The store. Methods return `Send` futures so that callers can spawn them.
pub trait Store: Clone + Send + Sync + 'static {
    /// One key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Every key starting with `prefix`, in key order, and the store's revision when read.
    fn range(&self, prefix: &str) -> impl Future<Output = Result<(Vec<KeyValue>, Revision), StoreError>> + Send;

    /// Runs a transaction.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnResult, StoreError>> + Send;

    /// Grants a lease of `ttl_s` seconds; returns its id and the TTL granted.
    fn grant_lease(&self, ttl_s: i64) -> impl Future<Output = Result<(LeaseId, i64), StoreError>> + Send;

    /// Renews a lease for its full TTL; `false` if it no longer exists.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Revokes a lease, deleting its keys.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Watches every key starting with `prefix`, from now on.
    fn watch(&self, prefix: &str) -> impl Future<Output = Result<Watch, StoreError>> + Send;

    /// Where the store is, for messages.
    fn describe(&self) -> String;

    /// Puts `value` at `key` unconditionally.
    fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send {
        let txn = Txn::new().then([Op::Put { key: key.to_string(), value, lease }]);
        async move { self.txn(txn).await.map(drop) }
    }

    /// Deletes `key` (nothing happens if it does not exist).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        let txn = Txn::new().then([Op::delete(key)]);
        async move { self.txn(txn).await.map(drop) }
    }
}
