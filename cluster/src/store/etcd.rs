// SPDX-License-Identifier: Apache-2.0
//! The etcd v3 backend, on the `etcd-client` crate (gRPC over tonic). Every call has a
//! deadline, so an unreachable etcd is a clear [`StoreError::Unavailable`] after a few seconds,
//! never a hang.
//!
//! With `https://` URLs the connection is mutual TLS ([`EtcdTls`]): the client trusts only the
//! cluster's CA and presents this host's certificate, which etcd started with
//! `--client-cert-auth` and that CA as `--trusted-ca-file` requires. Then only the cluster's
//! hosts can read or change the cluster's state.

use std::error::Error as _;
use std::path::Path;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use vmm::transport::pki::{CA_CERT, CERT, KEY};

use super::{Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, TxnResult, Watch};

/// Longest any one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a connection attempt to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// This host's identity for etcd over mutual TLS: a directory as `vmm tls init` or `vmm tls
/// issue` writes it. `ca.pem` is the CA that must have signed etcd's certificate (which must
/// name the host or address in the URL); `cert.pem` and `key.pem` are what this host presents,
/// for etcd to check against its `--trusted-ca-file`.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    options: TlsOptions,
}

impl EtcdTls {
    /// Reads the TLS directory `dir`; a missing, unreadable or non-PEM file is an error naming it.
    pub fn load(dir: &Path) -> Result<EtcdTls, StoreError> {
        // `what` ends a PEM block's BEGIN line: "CERTIFICATE-----", or "PRIVATE KEY-----" for
        // any key type ("EC PRIVATE KEY", PKCS#8's "PRIVATE KEY").
        let read = |name: &str, what: &str| {
            let path = dir.join(name);
            let pem = std::fs::read(&path).map_err(|e| StoreError::Config(format!("{}: {e}", path.display())))?;
            let text = String::from_utf8_lossy(&pem);
            if !text.lines().any(|l| l.starts_with("-----BEGIN ") && l.ends_with(what)) {
                let kind = what.trim_end_matches('-').to_lowercase();
                return Err(StoreError::Config(format!("{}: not a PEM {kind}", path.display())));
            }
            Ok(pem)
        };
        let (cert_tag, key_tag) = ("CERTIFICATE-----", "PRIVATE KEY-----");
        let (ca, cert, key) = (read(CA_CERT, cert_tag)?, read(CERT, cert_tag)?, read(KEY, key_tag)?);
        let options =
            TlsOptions::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(cert, key));
        Ok(EtcdTls { options })
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    timeout: Duration,
    /// Whether the connection is TLS (for a hint when a plaintext one is cut off).
    tls: bool,
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://HOST:PORT`, or `HOST:PORT`) in plaintext.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect_with(endpoints, None).await
    }

    /// Connects to etcd at `endpoints`: `https://HOST:PORT` with `tls` (mutual TLS), or
    /// `http://HOST:PORT` without (a bare `HOST:PORT` is either, as `tls` says). Mixing them is
    /// an error, and so is an `https://` URL without `tls`. The connection is made lazily: an
    /// unreachable etcd, or one that refuses this host's certificate, shows up as an error of
    /// the first request.
    pub async fn connect_with(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<EtcdStore, StoreError> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable { endpoints: joined, why: "no endpoint given".into() });
        }
        check_schemes(endpoints, tls.is_some())?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = tls {
            options = options.with_tls(tls.options.clone());
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Unavailable { endpoints: joined.clone(), why: describe(&e) })?;
        Ok(EtcdStore { client, endpoints: joined, timeout: REQUEST_TIMEOUT, tls: tls.is_some() })
    }

    /// Runs one request under the deadline, mapping its errors. A request that could not even
    /// connect (with several members, the balancer may pick one that is down) is tried again
    /// until the deadline: it never reached etcd, so this is safe for any request. A request
    /// that may have reached etcd is never repeated here; its caller reads the state afresh.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let err = match tokio::time::timeout_at(deadline, f()).await {
                Err(_) => return Err(self.unavailable(format!("no answer within {} s", self.timeout.as_secs()))),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
            };
            let unsent = never_sent(&err);
            let err = self.map_error(err);
            if !unsent || tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(err);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    fn unavailable(&self, mut why: String) -> StoreError {
        // A TLS etcd cuts a plaintext client off mid-request, which is all the client sees.
        // Under TLS 1.3 etcd checks our certificate after the client has finished its side of
        // the handshake; its refusal is a fatal alert, but when the connection is gone before
        // the alert is read the client sees only a cut connection. Either way, name the cause.
        if let Some(hint) = cut_connection_hint(self.tls, &why) {
            why.push_str(hint);
        }
        StoreError::Unavailable { endpoints: self.endpoints.clone(), why }
    }

    fn map_error(&self, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        match e {
            E::TransportError(_) | E::IoError(_) => self.unavailable(describe(&e)),
            // gRPC's codes (tonic is not a direct dependency): cancelled, deadline exceeded and
            // unavailable mean the request did not get through.
            E::GRpcStatus(ref s) => match s.code() as i32 {
                1 | 4 | 14 => self.unavailable(s.message().to_string()),
                // No answer from etcd at all: the connection failed under the request (a
                // plaintext client at a TLS port, say); its causes say how.
                2 if s.message() == "transport error" => self.unavailable(describe(&e)),
                _ => StoreError::Failed(s.message().to_string()),
            },
            other => StoreError::Failed(other.to_string()),
        }
    }
}

/// An `https://` URL needs a TLS identity and an `http://` one must not have one: a plaintext
/// client would be refused by a TLS etcd with nothing clearer than a broken connection, and a
/// TLS identity given for a plaintext URL would silently protect nothing.
fn check_schemes(endpoints: &[String], tls: bool) -> Result<(), StoreError> {
    for e in endpoints {
        if e.starts_with("https://") && !tls {
            return Err(StoreError::Config(format!(
                "{e} is etcd over TLS: give this host's TLS directory (--etcd-tls-dir or VMM_ETCD_TLS_DIR)"
            )));
        }
        if e.starts_with("http://") && tls {
            return Err(StoreError::Config(format!(
                "{e} is plaintext, but a TLS directory for etcd was given: use https:// URLs"
            )));
        }
    }
    Ok(())
}

/// An error with its causes: tonic's transport errors say only "transport error" on their own,
/// and why (a refused certificate, a refused connection) is in their sources.
fn describe(e: &etcd_client::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

/// What most likely cut a connection under a request, for an error that says only that it was
/// cut (see `EtcdStore::unavailable`).
fn cut_connection_hint(tls: bool, why: &str) -> Option<&'static str> {
    // hyper names an I/O error's kind in its Debug form (`Kind(ConnectionReset)`).
    let text = why.to_lowercase();
    let cut = ["operation was canceled", "connection reset", "connectionreset", "broken pipe", "brokenpipe"]
        .iter()
        .any(|c| text.contains(c));
    if !cut {
        None
    } else if !tls {
        Some(" (if etcd serves TLS there, give https:// URLs and --etcd-tls-dir)")
    } else if !text.contains("certificate") {
        Some(" (etcd may have refused this host's certificate: is it signed by the CA etcd trusts?)")
    } else {
        None
    }
}

/// Pause before trying a request that could not connect again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether a request failed before it reached any etcd member (so repeating it is safe).
fn never_sent(e: &etcd_client::Error) -> bool {
    let text = match e {
        etcd_client::Error::TransportError(t) => t.to_string(),
        etcd_client::Error::GRpcStatus(s) if s.code() as i32 == 14 => s.message().to_string(),
        _ => return false,
    };
    text.contains("connect")
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn to_compare(c: &Compare) -> EtcdCompare {
    match c {
        Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k.as_str(), CompareOp::Equal, *r),
        Compare::CreateRevision(k, r) => EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, *r),
        Compare::Version(k, v) => EtcdCompare::version(k.as_str(), CompareOp::Equal, *v),
        Compare::Lease(k, l) => EtcdCompare::lease(k.as_str(), CompareOp::Equal, *l),
        Compare::Value(k, v) => EtcdCompare::value(k.as_str(), CompareOp::Equal, v.clone()),
    }
}

fn to_op(op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            TxnOp::put(key.as_str(), value.clone(), options)
        }
        Op::Delete { key } => TxnOp::delete(key.as_str(), None),
        Op::Get { key } => TxnOp::get(key.as_str(), None),
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .call(|| {
                let (mut c, key) = (self.client.clone(), key.to_string());
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(to_kv))
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let resp = self
            .call(|| {
                let (mut c, prefix) = (self.client.clone(), prefix.to_string());
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.kvs().iter().map(to_kv).collect(), revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let etcd_txn = etcd_client::Txn::new()
            .when(txn.when.iter().map(to_compare).collect::<Vec<_>>())
            .and_then(txn.then.iter().map(to_op).collect::<Vec<_>>())
            .or_else(txn.otherwise.iter().map(to_op).collect::<Vec<_>>());
        let resp = self
            .call(|| {
                let (mut c, t) = (self.client.clone(), etcd_txn.clone());
                async move { c.txn(t).await }
            })
            .await?;
        let gets = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(to_kv)),
                _ => None,
            })
            .collect();
        Ok(TxnResult { succeeded: resp.succeeded(), revision: resp.header().map_or(0, |h| h.revision()), gets })
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<(LeaseId, i64), StoreError> {
        let resp = self
            .call(|| {
                let mut c = self.client.clone();
                async move { c.lease_grant(ttl_s, None).await }
            })
            .await?;
        Ok((resp.id(), resp.ttl()))
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<bool, StoreError> {
        // etcd keeps leases alive over a stream; opening one sends the first renewal and reads
        // its answer. One short-lived stream per renewal costs a round trip on the existing
        // connection and leaves no state to resynchronise.
        let renewed = self
            .call(|| {
                let mut c = self.client.clone();
                async move { c.lease_keep_alive(id).await }
            })
            .await;
        match renewed {
            Ok(_) => Ok(true),
            // What etcd-client makes of a renewal answered with TTL 0.
            Err(StoreError::Failed(why)) if why.contains("lease not found") => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(|| {
            let mut c = self.client.clone();
            async move { c.lease_revoke(id).await }
        })
        .await
        .map(drop)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let stream = self
            .call(|| {
                let (mut c, prefix) = (self.client.clone(), prefix.to_string());
                async move { c.watch(prefix, Some(WatchOptions::new().with_prefix())).await }
            })
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            // Keeps the request half alive for as long as the watch runs.
            let (_requests, mut responses) = stream.split();
            loop {
                let batch = match responses.message().await {
                    Ok(Some(resp)) if resp.canceled() => {
                        Err(StoreError::Failed(format!("watch cancelled: {}", resp.cancel_reason())))
                    }
                    Ok(Some(resp)) => {
                        let revision = resp.header().map_or(0, |h| h.revision());
                        Ok(resp
                            .events()
                            .iter()
                            .filter_map(|e| {
                                let kv = e.kv()?;
                                Some(Event {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    deleted: e.event_type() == EventType::Delete,
                                    revision: kv.mod_revision().max(revision),
                                })
                            })
                            .collect::<Vec<_>>())
                    }
                    Ok(None) => Err(this.unavailable("the watch stream ended".into())),
                    Err(e) => Err(this.map_error(e)),
                };
                let end = batch.is_err();
                if matches!(&batch, Ok(events) if events.is_empty()) {
                    continue;
                }
                if tx.send(batch).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Watch::new(rx))
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::cut_connection_hint;

    #[test]
    fn a_cut_connection_names_its_likely_cause() {
        // Plaintext to a TLS port.
        let hint = cut_connection_hint(false, "transport error: operation was canceled").unwrap();
        assert!(hint.contains("--etcd-tls-dir"), "{hint}");
        // TLS, etcd refused our certificate but the alert was lost with the connection.
        let hint = cut_connection_hint(true, "transport error: connection reset by peer").unwrap();
        assert!(hint.contains("certificate"), "{hint}");
        // The alert was read: the error already says so.
        assert_eq!(cut_connection_hint(true, "operation was canceled: received fatal alert: BadCertificate"), None);
        assert!(cut_connection_hint(false, "hyper::Error(Io, Kind(ConnectionReset))").is_some());
        // Anything else is not a cut connection.
        assert_eq!(cut_connection_hint(false, "no answer within 5 s"), None);
        assert_eq!(cut_connection_hint(true, "tcp connect error: Connection refused"), None);
    }
}
