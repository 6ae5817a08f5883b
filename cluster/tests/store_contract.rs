// SPDX-License-Identifier: Apache-2.0
//! The store contract: what the cluster relies on from its store, checked against both
//! backends — the in-memory model and a real etcd (Debian's `etcd-server`, started by the test
//! on loopback in a temporary directory), also over mutual TLS — and, for the parts that
//! matter under failure, against a 3-member etcd that loses members.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::transport::pki::{self, HostSpec};
use vmm_cluster::etcd_server::EtcdServer;
use vmm_cluster::store::{Compare, EtcdStore, EtcdTls, MemoryStore, Op, Store, StoreError, Txn};

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

/// Certificates for etcd over mutual TLS, in a temporary directory removed on drop: the
/// cluster's CA with etcd's identity (naming loopback), a host's identity from that CA, and a
/// stranger (another CA's).
struct Pki {
    root: PathBuf,
}

impl Pki {
    fn new(test: &str) -> Pki {
        let root = std::env::temp_dir().join(format!("vmm-etcd-pki-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let pki = Pki { root };
        pki::init(&pki.etcd(), &HostSpec::new("etcd", &[LOOPBACK], 1).unwrap()).unwrap();
        pki::issue(&pki.etcd(), &pki.host(), &HostSpec::new("host-a", &[], 1).unwrap()).unwrap();
        pki::init(&pki.stranger(), &HostSpec::new("stranger", &[LOOPBACK], 1).unwrap()).unwrap();
        pki
    }

    /// The CA (and its key) and etcd's own identity.
    fn etcd(&self) -> PathBuf {
        self.root.join("etcd")
    }

    fn host(&self) -> PathBuf {
        self.root.join("host")
    }

    fn stranger(&self) -> PathBuf {
        self.root.join("stranger")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn etcd_tls(pki: &Pki) -> EtcdServer {
    let dir = pki.etcd();
    tokio::task::spawn_blocking(move || EtcdServer::start_tls(LOOPBACK, 1, &dir))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start etcd with TLS: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mutual_tls_keeps_the_contract() {
    let pki = Pki::new("contract");
    let server = etcd_tls(&pki).await;
    assert!(server.endpoints()[0].starts_with("https://"), "{:?}", server.endpoints());
    let tls = EtcdTls::load(&pki.host()).unwrap();
    let store = EtcdStore::connect_with(&server.endpoints(), Some(&tls)).await.unwrap();
    contract(&store).await;
}

/// What etcd over TLS refuses, and what the client refuses before sending anything; each a
/// clear error, none a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_refuses_strangers_and_plaintext() {
    let pki = Pki::new("refusals");
    let server = etcd_tls(&pki).await;
    let https = server.endpoints();
    let host = EtcdTls::load(&pki.host()).unwrap();

    // An https URL without a TLS directory, and a TLS directory with an http URL: refused here.
    let e = EtcdStore::connect(&https).await.err().expect("https without a TLS directory was accepted");
    assert!(matches!(e, StoreError::Config(_)) && e.to_string().contains("--etcd-tls-dir"), "{e}");
    let http: Vec<String> = https.iter().map(|u| u.replacen("https://", "http://", 1)).collect();
    let e = EtcdStore::connect_with(&http, Some(&host)).await.err().expect("http with a TLS directory was accepted");
    assert!(matches!(e, StoreError::Config(_)) && e.to_string().contains("https://"), "{e}");

    // Plaintext to etcd's TLS port: nothing gets through.
    let plain = EtcdStore::connect(&http).await.unwrap();
    let e = plain.get("/x").await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }) && e.to_string().contains("--etcd-tls-dir"), "{e:?}");

    // Another CA's host: it does not trust etcd's certificate, and etcd would not trust its own.
    let stranger = EtcdTls::load(&pki.stranger()).unwrap();
    let store = EtcdStore::connect_with(&https, Some(&stranger)).await.unwrap();
    let e = store.get("/x").await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // Our CA, so it trusts etcd, but another CA's certificate: etcd refuses it.
    let mixed = pki.root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(pki.host().join(pki::CA_CERT), mixed.join(pki::CA_CERT)).unwrap();
    std::fs::copy(pki.stranger().join(pki::CERT), mixed.join(pki::CERT)).unwrap();
    std::fs::copy(pki.stranger().join(pki::KEY), mixed.join(pki::KEY)).unwrap();
    let store = EtcdStore::connect_with(&https, Some(&EtcdTls::load(&mixed).unwrap())).await.unwrap();
    let e = store.put("/x", b"1".to_vec(), 0).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // A missing TLS directory names the file, and so does a file that is not PEM.
    let e = EtcdTls::load(&pki.root.join("nowhere")).unwrap_err();
    assert!(matches!(e, StoreError::Config(_)) && e.to_string().contains("ca.pem"), "{e}");
    std::fs::write(mixed.join(pki::KEY), "not a key").unwrap();
    let e = EtcdTls::load(&mixed).unwrap_err();
    assert!(e.to_string().contains("key.pem: not a PEM private key"), "{e}");

    // Nothing of all that reached etcd; the cluster's own host still gets through.
    let ok = EtcdStore::connect_with(&https, Some(&host)).await.unwrap();
    assert_eq!(ok.get("/x").await.unwrap(), None);
}

/// The command line: `--etcd-tls-dir` (or `VMM_ETCD_TLS_DIR`) with `https://` URLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_commands_reach_etcd_over_tls() {
    let pki = Pki::new("cli");
    let server = etcd_tls(&pki).await;
    let cli = |args: &[&str], env_dir: Option<&Path>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-cluster"));
        c.env_remove("VMM_ETCD_TLS_DIR").env_remove("VMM_ETCD").arg("--etcd").arg(server.endpoints_arg()).args(args);
        if let Some(d) = env_dir {
            c.env("VMM_ETCD_TLS_DIR", d);
        }
        c.output().unwrap()
    };
    let host = pki.host();
    let out = cli(&["--etcd-tls-dir", host.to_str().unwrap(), "vm", "list"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["vm", "list"], Some(&host));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["vm", "list"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--etcd-tls-dir"), "{err}");
}
