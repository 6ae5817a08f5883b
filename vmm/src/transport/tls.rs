// SPDX-License-Identifier: Apache-2.0
//! Mutual TLS for migration connections (rustls, blocking, on our std sockets).
//!
//! A host's TLS directory ([`pki`](super::pki)) is read once, up front, with an error that names
//! the file and what is wrong with it, rather than at handshake time. From it come two shared
//! configurations: the client's (the source: presents this host's certificate, trusts only the
//! cluster's CA, and checks that the destination's certificate names the host or address it
//! dialled) and the server's (the destination: presents this host's certificate and requires
//! a client certificate signed by the cluster's CA). TLS 1.3 only, with the aws-lc-rs provider and
//! AES-128-GCM preferred (the fastest suite with AES instructions; see the README).
//!
//! Refusals become one sentence that says which side refused what: [`describe`].

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};

use super::pki::{CA_CERT, CERT, KEY};

/// Errors reading a TLS directory.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS directory {0}: {1}")]
    Dir(PathBuf, String),
    #[error("{0}: {1}")]
    File(PathBuf, String),
    #[error("TLS configuration from {0}: {1}")]
    Config(PathBuf, String),
}

/// This host's migration identity: the cluster's CA and this host's certificate and key, as
/// client and server configurations shared by every connection.
pub struct TlsIdentity {
    dir: PathBuf,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsIdentity({})", self.dir.display())
    }
}

/// The crypto provider: aws-lc-rs (its AES-GCM runs at about 1.6 times ring's speed here, and it
/// has the post-quantum key exchange X25519MLKEM768, which it prefers), with the TLS 1.3 suites
/// in the order that is fastest on CPUs with AES instructions (AES-128-GCM first; the provider's
/// own default puts AES-256-GCM first).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

/// A file of the TLS directory, checked: there, a regular file, readable.
fn read_file(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), TlsError> {
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            format!("missing (a TLS directory holds {CA_CERT}, {CERT} and {KEY}; `vmm tls init` or `vmm tls issue` writes them)")
        } else {
            e.to_string()
        };
        TlsError::File(path.clone(), why)
    })?;
    if !meta.is_file() {
        return Err(TlsError::File(path, "not a regular file".into()));
    }
    let bytes = std::fs::read(&path).map_err(|e| TlsError::File(path.clone(), format!("cannot read it: {e}")))?;
    Ok((path, bytes))
}

fn certificates(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let (path, pem) = read_file(dir, name)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File(path.clone(), format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::File(path, "holds no certificate".into()));
    }
    Ok(certs)
}

impl TlsIdentity {
    /// Reads and checks the TLS directory `dir`.
    pub fn load(dir: &Path) -> Result<TlsIdentity, TlsError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(TlsError::Dir(dir.to_path_buf(), "not a directory".into())),
            Err(e) => return Err(TlsError::Dir(dir.to_path_buf(), e.to_string())),
        }
        let cas = certificates(dir, CA_CERT)?;
        let chain = certificates(dir, CERT)?;
        let (key_path, key_pem) = read_file(dir, KEY)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| TlsError::File(key_path.clone(), format!("not a PEM private key: {e}")))?;
        if let Ok(m) = std::fs::metadata(&key_path)
            && m.permissions().mode() & 0o077 != 0
        {
            log::warn!(
                "{}: the private key is readable by other users (mode {:o})",
                key_path.display(),
                m.permissions().mode() & 0o777
            );
        }
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| TlsError::File(dir.join(CA_CERT), format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        // The crypto library sets up its random generator once per process, and then looks
        // whether /dev/sysgenid exists (a VM generation counter): do that now, while this VMM
        // may still look at files, rather than on a migration thread whose sandbox forbids it.
        provider
            .secure_random
            .fill(&mut [0u8; 16])
            .map_err(|_| TlsError::Config(dir.to_path_buf(), "the system's random generator failed".into()))?;
        let config_err = |e: rustls::Error| TlsError::Config(dir.to_path_buf(), e.to_string());
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(dir.to_path_buf(), e.to_string()))?;
        // Our own certificate should pass what our peers will check; if not, say so now (the
        // peers refuse it either way, and an expired certificate is for them to refuse).
        if let Err(e) = client_verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()) {
            log::warn!("{}: {}", dir.join(CERT).display(), describe_certificate(&e, "this host's", dir));
        }
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(dir.to_path_buf(), e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::File(key_path.clone(), format!("does not match {CERT}: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::File(key_path, format!("does not match {CERT}: {e}")))?;
        // One connection per migration: session tickets would only be a post-handshake message
        // for the source to read.
        server.send_tls13_tickets = 0;
        // Absolute, so that a request naming the same directory is recognised (`vmm migrate`
        // sends absolute paths).
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok(TlsIdentity { dir, client: Arc::new(client), server: Arc::new(server) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
}

/// Which end the description is written from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source: its peer is the destination.
    Client,
    /// The destination: its peer is the source.
    Server,
}

impl Side {
    fn peer(self) -> &'static str {
        match self {
            Side::Client => "the destination",
            Side::Server => "the source",
        }
    }
}

/// A rustls error as one sentence about who refused what. `dir` is this host's TLS directory.
pub fn describe(e: &rustls::Error, side: Side, dir: &Path) -> String {
    let peer = side.peer();
    match e {
        rustls::Error::InvalidCertificate(c) => certificate_sentence(c, &format!("{peer}'s"), dir),
        rustls::Error::NoCertificatesPresented => {
            format!("{peer} presented no certificate, and mutual TLS requires one")
        }
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::UnknownCA => {
                    "it does not trust our certificate (unknown CA: signed by another cluster's CA?)".to_string()
                }
                AlertDescription::CertificateExpired => "it says our certificate expired".to_string(),
                AlertDescription::BadCertificate => {
                    "it says our certificate is bad (wrong name, or not valid)".to_string()
                }
                AlertDescription::CertificateRequired => "it requires a client certificate".to_string(),
                AlertDescription::ProtocolVersion => "it does not speak TLS 1.3".to_string(),
                AlertDescription::DecryptError => "our certificate's signature did not verify".to_string(),
                other => format!("alert {other:?}"),
            };
            format!("{peer} refused the TLS connection: {why}")
        }
        rustls::Error::PeerIncompatible(p) => format!("{peer} speaks no TLS this VMM accepts (TLS 1.3 only): {p:?}"),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("{peer} does not speak TLS ({e})")
        }
        other => format!("TLS with {peer} failed: {other}"),
    }
}

/// A verifier's error about `whose` certificate.
fn describe_certificate(e: &rustls::Error, whose: &str, dir: &Path) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => certificate_sentence(c, whose, dir),
        other => format!("{whose} certificate is not acceptable: {other}"),
    }
}

/// The certificate errors with a sentence of their own.
fn certificate_sentence(c: &CertificateError, whose: &str, dir: &Path) -> String {
    let ca = dir.join(CA_CERT);
    match c {
        CertificateError::UnknownIssuer => {
            format!("{whose} certificate is not signed by our CA ({}): unknown issuer", ca.display())
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            let mut s = format!("{whose} certificate expired");
            if let CertificateError::ExpiredContext { time, not_after } = c {
                let _ = write!(s, " ({} s ago)", time.as_secs().saturating_sub(not_after.as_secs()));
            }
            s
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("{whose} certificate is not valid yet (are the clocks in sync?)")
        }
        CertificateError::NotValidForName => format!("{whose} certificate does not name the address we dialled"),
        CertificateError::NotValidForNameContext { expected, presented } => {
            // webpki writes the names as `DnsName("x")` and `IpAddress(1.2.3.4)`.
            let names: Vec<&str> = presented
                .iter()
                .map(|p| {
                    p.trim_start_matches("DnsName(\"")
                        .trim_start_matches("IpAddress(")
                        .trim_end_matches(')')
                        .trim_end_matches('"')
                })
                .collect();
            format!("{whose} certificate is for {} but we dialled {}", names.join(", "), expected.to_str())
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("{whose} certificate is not meant for this use (extended key usage)")
        }
        CertificateError::BadSignature => {
            format!("{whose} certificate's signature does not verify against our CA ({})", ca.display())
        }
        other => format!("{whose} certificate is not acceptable: {other:?} (CA: {})", ca.display()),
    }
}

/// The DNS names and addresses a certificate names (its subject alternative names).
pub fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::Ipv4Addr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::Ipv6Addr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether a certificate is valid for `name` (a DNS name or an address), as a client checks a
/// server's.
pub fn certificate_is_for(der: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(der) else { return false };
    let Ok(name) = rustls::pki_types::ServerName::try_from(name.to_string()) else { return false };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}
