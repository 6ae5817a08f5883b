// SPDX-License-Identifier: Apache-2.0
//! The whole cluster as one consistent snapshot: every key under the root, read in one request
//! at one revision and parsed. The CLI and the agents decide from this; every change they then
//! make is a transaction that compares the revisions they saw, so a decision taken on a stale
//! view is refused rather than applied.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use crate::balance::PlanRecord;
use crate::election::LeaderRecord;
use crate::keys::{self, Key};
use crate::model::{HostLoad, HostRecord, HostSpec, MoveRecord, VmRecord, VmStatus};
use crate::store::{KeyValue, Revision, Store, StoreError};

/// A parsed value with the revisions a transaction compares.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: Revision,
    pub lease: i64,
}

/// Every record of the cluster at one revision.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub revision: Revision,
    pub hosts: BTreeMap<String, Versioned<HostRecord>>,
    pub specs: BTreeMap<String, Versioned<HostSpec>>,
    pub vms: BTreeMap<String, Versioned<VmRecord>>,
    pub status: BTreeMap<String, Versioned<VmStatus>>,
    pub loads: BTreeMap<String, Versioned<HostLoad>>,
    pub moves: BTreeMap<String, Versioned<MoveRecord>>,
    /// The elected balancer and its last plan, if a balancer leads.
    pub balancer_leader: Option<Versioned<LeaderRecord>>,
    pub balancer_plan: Option<Versioned<PlanRecord>>,
    /// The placement guard's mod revision (0 if never written): see `ownership.rs`.
    pub placement_revision: Revision,
    /// Keys whose values did not parse (reported, otherwise ignored).
    pub malformed: Vec<String>,
}

/// The key every placement decision bumps, so that two decisions made on the same view cannot
/// both land (they would both count the same free memory).
pub fn placement_key() -> String {
    format!("{}placement", keys::ROOT)
}

impl ClusterView {
    /// Reads the whole cluster (one request).
    pub async fn load<S: Store>(store: &S) -> Result<ClusterView, StoreError> {
        let (kvs, revision) = store.range(keys::ROOT).await?;
        Ok(ClusterView::from_kvs(&kvs, revision))
    }

    /// Parses what a range over the root returned.
    pub fn from_kvs(kvs: &[KeyValue], revision: Revision) -> ClusterView {
        let mut view = ClusterView { revision, ..Default::default() };
        let placement = placement_key();
        for kv in kvs {
            if kv.key == placement {
                view.placement_revision = kv.mod_revision;
                continue;
            }
            let ok = match Key::parse(&kv.key) {
                Some(Key::Host(n)) => insert(&mut view.hosts, n, kv),
                Some(Key::HostSpec(n)) => insert(&mut view.specs, n, kv),
                Some(Key::Vm(n)) => insert(&mut view.vms, n, kv),
                Some(Key::Status(n)) => insert(&mut view.status, n, kv),
                Some(Key::Load(n)) => insert(&mut view.loads, n, kv),
                Some(Key::Move(n)) => insert(&mut view.moves, n, kv),
                Some(Key::Balancer(n)) if n == "leader" => set(&mut view.balancer_leader, kv),
                Some(Key::Balancer(n)) if n == "plan" => set(&mut view.balancer_plan, kv),
                Some(Key::Balancer(_)) | None => false,
            };
            if !ok {
                view.malformed.push(kv.key.clone());
            }
        }
        view
    }

    /// The host has a live agent.
    pub fn is_up(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    pub fn is_drained(&self, host: &str) -> bool {
        self.specs.get(host).is_some_and(|s| s.value.drained)
    }

    /// The host was ever seen: it is up, has a spec, or owns or is moving a VM.
    pub fn knows_host(&self, host: &str) -> bool {
        self.is_up(host)
            || self.specs.contains_key(host)
            || self.vms.values().any(|v| v.value.owner == host)
            || self.moves.values().any(|m| m.value.from == host || m.value.to == host)
    }

    /// Every host name the cluster knows, sorted.
    pub fn host_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.hosts.keys().chain(self.specs.keys()).cloned().collect();
        names.extend(self.vms.values().map(|v| v.value.owner.clone()));
        names.sort();
        names.dedup();
        names
    }

    /// The VM's move, if one is in flight.
    pub fn move_in_flight(&self, vm: &str) -> Option<&Versioned<MoveRecord>> {
        self.moves.get(vm).filter(|m| !m.value.phase.is_final())
    }

    /// VMs owned by `host`, by name.
    pub fn vms_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Versioned<VmRecord>> + 'a {
        self.vms.values().filter(move |v| v.value.owner == host)
    }
}

fn insert<T: DeserializeOwned>(map: &mut BTreeMap<String, Versioned<T>>, name: String, kv: &KeyValue) -> bool {
    match serde_json::from_slice(&kv.value) {
        Ok(value) => {
            map.insert(name, Versioned { value, mod_revision: kv.mod_revision, lease: kv.lease });
            true
        }
        Err(_) => false,
    }
}

fn set<T: DeserializeOwned>(slot: &mut Option<Versioned<T>>, kv: &KeyValue) -> bool {
    *slot = parse(kv).ok();
    slot.is_some()
}

/// Parses one value read from the store.
pub fn parse<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>, StoreError> {
    serde_json::from_slice(&kv.value)
        .map(|value| Versioned { value, mod_revision: kv.mod_revision, lease: kv.lease })
        .map_err(|e| StoreError::Malformed { key: kv.key.clone(), why: e.to_string() })
}

/// Serialises a value for the store.
pub fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Our model types are plain data: serialising them cannot fail.
    serde_json::to_vec(value).expect("model types serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Capacity, Desired, VmSpec};

    fn kv(key: String, value: Vec<u8>, rev: i64) -> KeyValue {
        KeyValue { key, value, create_revision: rev, mod_revision: rev, version: 1, lease: 0 }
    }

    #[test]
    fn a_view_parses_what_it_knows_and_reports_the_rest() {
        let host = HostRecord {
            name: "a".into(),
            migration_addr: "10.0.0.1:7200".into(),
            capacity: Capacity { cpu_millis: 600, mem_mib: 1024 },
            lease: 7,
            agent_pid: 1,
            since_ms: 0,
            insecure_plaintext: true,
        };
        let vm = VmRecord {
            name: "v".into(),
            spec: VmSpec {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
                mem_mib: 64,
                vcpus: 1,
                mac: None,
            },
            desired: Desired::Running,
            owner: "a".into(),
            epoch: 1,
            created_ms: 0,
        };
        let kvs = vec![
            kv(keys::host("a"), json(&host), 3),
            kv(keys::vm("v"), json(&vm), 4),
            kv(keys::vm("broken"), b"{".to_vec(), 5),
            kv(placement_key(), b"x".to_vec(), 6),
            kv(format!("{}unknown/x", keys::ROOT), b"{}".to_vec(), 7),
        ];
        let view = ClusterView::from_kvs(&kvs, 9);
        assert_eq!(view.revision, 9);
        assert!(view.is_up("a") && !view.is_up("b"));
        assert!(view.knows_host("a") && !view.knows_host("b"));
        assert_eq!(view.vms["v"].mod_revision, 4);
        assert_eq!(view.vms_on("a").count(), 1);
        assert_eq!(view.placement_revision, 6);
        assert_eq!(view.malformed, [keys::vm("broken"), format!("{}unknown/x", keys::ROOT)]);
    }
}
