// SPDX-License-Identifier: Apache-2.0
//! Unit tests of `cluster/src/ownership.rs`.

use super::*;
use crate::model::{Capacity, HostRecord, VmSpec};
use crate::store::MemoryStore;

async fn register(store: &MemoryStore, name: &str, mem: u64) -> LeaseId {
    let (lease, _) = store.grant_lease(30).await.unwrap();
    let rec = HostRecord {
        name: name.into(),
        migration_addr: "127.0.0.1:1".into(),
        capacity: Capacity { cpu_millis: 1000, mem_mib: mem },
        lease,
        agent_pid: 1,
        since_ms: 0,
        insecure_plaintext: true,
    };
    store.put(&keys::host(name), json(&rec), lease).await.unwrap();
    lease
}

fn vm(name: &str, mem: u64) -> VmRecord {
    VmRecord {
        name: name.into(),
        spec: VmSpec { kernel: "/k".into(), initrd: None, cmdline: String::new(), mem_mib: mem, vcpus: 1, mac: None },
        desired: Desired::Running,
        owner: String::new(),
        epoch: 0,
        created_ms: 0,
    }
}

#[tokio::test]
async fn create_places_and_refuses_what_does_not_fit() {
    let s = MemoryStore::new();
    register(&s, "a", 256).await;
    register(&s, "b", 512).await;
    let v = create_vm(&s, vm("v1", 128), None).await.unwrap();
    assert_eq!((v.owner.as_str(), v.epoch), ("b", 1));
    assert_eq!(create_vm(&s, vm("v1", 64), None).await, Err(OwnershipError::VmExists("v1".into())));
    let e = create_vm(&s, vm("big", 1024), None).await.unwrap_err();
    assert!(matches!(e, OwnershipError::Placement(PlacementError::NoRoom { .. })), "{e:?}");
    let e = create_vm(&s, vm("v2", 64), Some("zz")).await.unwrap_err();
    assert_eq!(e, OwnershipError::Placement(PlacementError::UnknownHost("zz".into())));
    set_drained(&s, "a", true).await.unwrap();
    let e = create_vm(&s, vm("v2", 64), Some("a")).await.unwrap_err();
    assert_eq!(e, OwnershipError::Placement(PlacementError::Drained("a".into())));
}

#[tokio::test]
async fn a_move_commits_once_and_a_second_request_is_refused() {
    let s = MemoryStore::new();
    register(&s, "a", 1024).await;
    let lease_b = register(&s, "b", 1024).await;
    create_vm(&s, vm("v", 64), Some("a")).await.unwrap();
    let m = request_move(&s, "v", Some("b"), "test").await.unwrap();
    assert_eq!((m.from.as_str(), m.to.as_str(), m.epoch), ("a", "b", 1));
    let e = request_move(&s, "v", Some("b"), "test 2").await.unwrap_err();
    assert!(matches!(e, OwnershipError::MoveInFlight { .. }), "{e:?}");
    assert!(e.to_string().contains("a → b"), "{e}");
    // The destination accepts and commits.
    let acc = accept(&s, "b", &m.id).await.unwrap();
    assert!(accept(&s, "a", &m.id).await.unwrap_err().contains("not to this host"));
    let (rev, _) = commit(&s, "b", lease_b, &acc).await.unwrap();
    let now: Versioned<VmRecord> = parse(&s.get(&keys::vm("v")).await.unwrap().unwrap()).unwrap();
    assert_eq!((now.value.owner.as_str(), now.value.epoch, now.mod_revision), ("b", 2, rev));
    // The same commit again is refused: the VM changed.
    assert!(commit(&s, "b", lease_b, &acc).await.unwrap_err().contains("changed meanwhile"));
    // Finished; a new move may follow.
    let arrival = Arrival { commit_done_us: Some(5), resumed_us: Some(2), downtime_us: Some(1) };
    assert!(finish(&s, "v", &m.id, arrival).await.unwrap());
    assert!(!finish(&s, "v", &m.id, Arrival::default()).await.unwrap());
    assert!(note_pause(&s, "v", &m.id, Some(1), Some(2), Some(3)).await.unwrap());
    let done: Versioned<MoveRecord> = parse(&s.get(&keys::moves("v")).await.unwrap().unwrap()).unwrap();
    assert_eq!(done.value.phase, MovePhase::Done);
    assert_eq!((done.value.times.paused_us, done.value.times.commit_done_us), (Some(1), Some(5)));
    let back = request_move(&s, "v", Some("a"), "test").await.unwrap();
    assert_eq!((back.from.as_str(), back.epoch), ("b", 2));
}

#[tokio::test]
async fn twenty_concurrent_move_requests_make_one_move() {
    let s = MemoryStore::new();
    register(&s, "a", 4096).await;
    register(&s, "b", 4096).await;
    create_vm(&s, vm("v", 64), Some("a")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { request_move(&s, "v", Some("b"), &format!("racer {i}")).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(OwnershipError::MoveInFlight { .. }) => {}
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn a_fenced_agent_cannot_commit_and_a_hand_back_restores_the_source() {
    let s = MemoryStore::new();
    register(&s, "a", 1024).await;
    let lease_b = register(&s, "b", 1024).await;
    create_vm(&s, vm("v", 64), Some("a")).await.unwrap();
    let m = request_move(&s, "v", Some("b"), "test").await.unwrap();
    let acc = accept(&s, "b", &m.id).await.unwrap();
    // B's lease ends (agent cut off): its commit is refused.
    s.revoke_lease(lease_b).await.unwrap();
    assert!(commit(&s, "b", lease_b, &acc).await.unwrap_err().contains("fenced"));
    // B registers again and commits; then its VMM dies before COMPLETE: hand back.
    let lease_b2 = register(&s, "b", 1024).await;
    let (rev, _) = commit(&s, "b", lease_b2, &acc).await.unwrap();
    let mv: Versioned<MoveRecord> = parse(&s.get(&keys::moves("v")).await.unwrap().unwrap()).unwrap();
    assert!(hand_back(&s, &mv.value, rev, "the destination VMM exited").await.unwrap());
    let now: Versioned<VmRecord> = parse(&s.get(&keys::vm("v")).await.unwrap().unwrap()).unwrap();
    assert_eq!((now.value.owner.as_str(), now.value.epoch), ("a", 3));
    let mv: Versioned<MoveRecord> = parse(&s.get(&keys::moves("v")).await.unwrap().unwrap()).unwrap();
    assert_eq!(mv.value.phase, MovePhase::Failed);
    // A second hand-back (stale revision) does nothing.
    assert!(!hand_back(&s, &mv.value, rev, "again").await.unwrap());
}

#[tokio::test]
async fn moves_refuse_bad_input() {
    let s = MemoryStore::new();
    register(&s, "a", 1024).await;
    register(&s, "b", 70).await;
    create_vm(&s, vm("v", 64), Some("a")).await.unwrap();
    assert_eq!(request_move(&s, "nope", Some("b"), "t").await, Err(OwnershipError::UnknownVm("nope".into())));
    assert!(matches!(request_move(&s, "v", Some("a"), "t").await, Err(OwnershipError::AlreadyThere { .. })));
    assert!(matches!(
        request_move(&s, "v", Some("b"), "t").await,
        Err(OwnershipError::Placement(PlacementError::NoRoomOn { .. }))
    ));
    assert!(matches!(
        request_move(&s, "v", Some("c"), "t").await,
        Err(OwnershipError::Placement(PlacementError::UnknownHost(_)))
    ));
    stop_vm(&s, "v").await.unwrap();
    assert_eq!(request_move(&s, "v", None, "t").await, Err(OwnershipError::Stopping("v".into())));
}
