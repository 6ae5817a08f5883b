// SPDX-License-Identifier: Apache-2.0
//! The store contract: what the cluster relies on from its store, checked against both
//! backends — the in-memory model and a real etcd (Debian's `etcd-server`, started by the test
//! on loopback in a temporary directory) — and, for the parts that matter under failure,
//! against a 3-member etcd that loses members.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use vmm_cluster::etcd_server::EtcdServer;
use vmm_cluster::store::{Compare, EtcdStore, MemoryStore, Op, Store, StoreError, Txn};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn etcd(members: usize) -> (EtcdServer, EtcdStore) {
    let server = tokio::task::spawn_blocking(move || EtcdServer::start(LOOPBACK, members))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let store = EtcdStore::connect(&server.endpoints()).await.unwrap();
    (server, store)
}

async fn basics<S: Store>(s: &S) {
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    s.put("/t/a", b"1".to_vec(), 0).await.unwrap();
    let a1 = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((a1.value.as_slice(), a1.version, a1.lease), (b"1".as_slice(), 1, 0));
    assert_eq!(a1.create_revision, a1.mod_revision);
    s.put("/t/a", b"2".to_vec(), 0).await.unwrap();
    let a2 = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((a2.value.as_slice(), a2.version), (b"2".as_slice(), 2));
    assert_eq!(a2.create_revision, a1.create_revision);
    assert!(a2.mod_revision > a1.mod_revision);
    s.put("/t/b", b"x".to_vec(), 0).await.unwrap();
    s.put("/tx", b"outside".to_vec(), 0).await.unwrap();
    let (kvs, rev) = s.range("/t/").await.unwrap();
    assert_eq!(kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/t/a", "/t/b"]);
    assert!(rev >= kvs[1].mod_revision);
    s.delete("/t/a").await.unwrap();
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    // Deleting what does not exist is no error.
    s.delete("/t/a").await.unwrap();
    // A new incarnation starts at version 1 with a new create revision.
    s.put("/t/a", b"3".to_vec(), 0).await.unwrap();
    let a3 = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a3.version, 1);
    assert!(a3.create_revision > a2.mod_revision);
}

async fn transactions<S: Store>(s: &S) {
    // Create-only: holds while the key is absent.
    let create =
        || Txn::new().when([Compare::absent("/c/k")]).then([Op::put("/c/k", "v1")]).otherwise([Op::get("/c/k")]);
    let r = s.txn(create()).await.unwrap();
    assert!(r.succeeded && r.gets.is_empty());
    let r = s.txn(create()).await.unwrap();
    assert!(!r.succeeded);
    let current = r.gets[0].clone().expect("the else branch's get sees the key");
    assert_eq!(current.value, b"v1");
    // Compare-and-put on the mod revision: the stale one fails, the fresh one wins.
    let cas = |rev| Txn::new().when([Compare::ModRevision("/c/k".into(), rev)]).then([Op::put("/c/k", "v2")]);
    assert!(!s.txn(cas(current.mod_revision - 1)).await.unwrap().succeeded);
    let won = s.txn(cas(current.mod_revision)).await.unwrap();
    assert!(won.succeeded);
    assert_eq!(s.get("/c/k").await.unwrap().unwrap().mod_revision, won.revision);
    // Version and value compares.
    assert!(s.txn(Txn::new().when([Compare::Version("/c/k".into(), 2)])).await.unwrap().succeeded);
    assert!(s.txn(Txn::new().when([Compare::Value("/c/k".into(), b"v2".to_vec())])).await.unwrap().succeeded);
    assert!(!s.txn(Txn::new().when([Compare::Value("/c/k".into(), b"v1".to_vec())])).await.unwrap().succeeded);
    // A value compare on an absent key is false; a revision compare against 0 is true.
    assert!(!s.txn(Txn::new().when([Compare::Value("/c/none".into(), Vec::new())])).await.unwrap().succeeded);
    assert!(s.txn(Txn::new().when([Compare::ModRevision("/c/none".into(), 0)])).await.unwrap().succeeded);
    // Several compares: all must hold; several ops: all or none.
    let r = s
        .txn(Txn::new().when([Compare::Version("/c/k".into(), 2), Compare::absent("/c/other")]).then([
            Op::put("/c/other", "o"),
            Op::delete("/c/k"),
            Op::get("/c/other"),
        ]))
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.gets.len(), 1);
    assert_eq!(r.gets[0].as_ref().unwrap().value, b"o");
    assert_eq!(s.get("/c/k").await.unwrap(), None);
    let r = s
        .txn(
            Txn::new()
                .when([Compare::absent("/c/other")])
                .then([Op::put("/c/k", "never")])
                .otherwise([Op::get("/c/k")]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.gets, vec![None]);
    assert_eq!(s.get("/c/k").await.unwrap(), None);
}

/// 20 racers try to create the same key, then 20 try to replace the value they all read:
/// exactly one wins each round.
async fn racers<S: Store>(s: &S) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let txn = Txn::new().when([Compare::absent("/race/k")]).then([Op::put("/race/k", format!("racer {i}"))]);
            s.txn(txn).await.unwrap().succeeded
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1, "exactly one of 20 create-only racers must win");
    let seen = s.get("/race/k").await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        let rev = seen.mod_revision;
        tasks.push(tokio::spawn(async move {
            let txn = Txn::new()
                .when([Compare::ModRevision("/race/k".into(), rev)])
                .then([Op::put("/race/k", format!("cas {i}"))]);
            s.txn(txn).await.unwrap().succeeded.then_some(i)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "exactly one of 20 compare-and-put racers must win: {winners:?}");
    assert_eq!(s.get("/race/k").await.unwrap().unwrap().value, format!("cas {}", winners[0]).into_bytes());
}

async fn leases<S: Store>(s: &S) {
    let (lease, ttl) = s.grant_lease(2).await.unwrap();
    assert!(lease != 0 && (1..=2).contains(&ttl), "{ttl}");
    s.put("/l/a", b"1".to_vec(), lease).await.unwrap();
    let kv = s.get("/l/a").await.unwrap().unwrap();
    assert_eq!(kv.lease, lease);
    assert!(s.txn(Txn::new().when([Compare::Lease("/l/a".into(), lease)])).await.unwrap().succeeded);
    assert!(!s.txn(Txn::new().when([Compare::Lease("/l/none".into(), lease)])).await.unwrap().succeeded);
    // Kept alive for longer than its TTL, it stays.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(s.keep_alive(lease).await.unwrap());
    }
    assert!(s.get("/l/a").await.unwrap().is_some());
    // Revoked: the key goes at once and renewals say the lease is gone.
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(s.get("/l/a").await.unwrap(), None);
    assert!(!s.keep_alive(lease).await.unwrap());
    assert!(!s.txn(Txn::new().when([Compare::Lease("/l/a".into(), lease)])).await.unwrap().succeeded);
    // A put with a lease that does not exist fails and writes nothing.
    let e = s.put("/l/b", b"1".to_vec(), lease).await.unwrap_err();
    assert!(matches!(e, StoreError::Failed(_)), "{e:?}");
    assert_eq!(s.get("/l/b").await.unwrap(), None);
    // Not kept alive: the key goes by itself.
    let (lease, _) = s.grant_lease(1).await.unwrap();
    s.put("/l/c", b"1".to_vec(), lease).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.get("/l/c").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "a 1 s lease's key still exists after 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!s.keep_alive(lease).await.unwrap());
}

async fn watches<S: Store>(s: &S) {
    let mut w = s.watch("/w/").await.unwrap();
    s.put("/outside", b"x".to_vec(), 0).await.unwrap();
    s.put("/w/a", b"1".to_vec(), 0).await.unwrap();
    s.delete("/w/a").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch =
            tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("watch event").unwrap().unwrap();
        seen.extend(batch.into_iter().map(|e| (e.key, e.deleted)));
    }
    assert_eq!(seen, [("/w/a".to_string(), false), ("/w/a".to_string(), true)]);
    // A lease's end is a delete event too.
    let (lease, _) = s.grant_lease(5).await.unwrap();
    s.put("/w/leased", b"1".to_vec(), lease).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch =
            tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("watch event").unwrap().unwrap();
        seen.extend(batch.into_iter().map(|e| (e.key, e.deleted)));
    }
    assert_eq!(seen, [("/w/leased".to_string(), false), ("/w/leased".to_string(), true)]);
}

async fn contract<S: Store>(s: &S) {
    basics(s).await;
    transactions(s).await;
    racers(s).await;
    leases(s).await;
    watches(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_keeps_the_contract() {
    let (_server, store) = etcd(1).await;
    contract(&store).await;
}

/// A 3-member etcd: the contract holds, a lost member changes nothing, and without a quorum
/// every request fails clearly (no hang), after which a restarted member brings it all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_etcd_survives_one_loss_and_fails_clearly_without_quorum() {
    let (mut server, store) = etcd(3).await;
    assert_eq!(server.endpoints().len(), 3);
    basics(&store).await;
    racers(&store).await;

    server.kill_member(0);
    // The client fails over to the remaining members, once they have a leader (if member 0
    // led, the others elect a new one first: a request may time out meanwhile). Its channel
    // learns that member 0's connection is gone only when it uses it or its keep-alive (2 s,
    // 2 s timeout) fails, so a request may still be sent there after one went through
    // elsewhere ("transport error"): give it that long first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = store.put("/q/after-one-loss", b"1".to_vec(), 0).await {
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
        assert!(Instant::now() < deadline, "two of three members did not serve within 30 s: {e}");
    }
    racers_again(&store).await;
    let (lease, _) = store.grant_lease(3).await.unwrap();
    assert!(store.keep_alive(lease).await.unwrap());

    server.kill_member(1);
    let started = Instant::now();
    let e = store.put("/q/no-quorum", b"1".to_vec(), 0).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    // Bounded by the request deadline, not a hang (a generous bound: the machine is shared).
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());

    let _server = tokio::task::spawn_blocking(move || {
        server.restart_member(1).unwrap();
        server
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.put("/q/quorum-again", b"1".to_vec(), 0).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "no quorum 30 s after a member came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.get("/q/after-one-loss").await.unwrap().unwrap().value, b"1");
}

async fn racers_again<S: Store>(s: &S) {
    s.delete("/race/k").await.unwrap();
    racers(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_a_clear_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap().local_addr().unwrap().port();
    let store = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")]).await.unwrap();
    let e = store.get("/x").await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}
