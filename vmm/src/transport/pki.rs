// SPDX-License-Identifier: Apache-2.0
//! A cluster's certificates: `vmm tls init` makes a CA and a first host identity, `vmm tls
//! issue` signs another host's identity with that CA (rcgen, ECDSA P-256).
//!
//! A TLS directory holds `ca.pem` (the cluster's CA certificate), `cert.pem` and `key.pem` (this
//! host's identity), and on the host that signs, `ca-key.pem`. Private keys are written with
//! mode 0600 and no file is ever overwritten: a half-replaced identity is worse than an error.
//! Every host identity serves both ends of a migration (server and client authentication), and
//! names the host's DNS name and addresses, which a source checks against what it dialled.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// The CA certificate every host of a cluster trusts.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key, only where certificates are issued.
pub const CA_KEY: &str = "ca-key.pem";
/// This host's certificate.
pub const CERT: &str = "cert.pem";
/// This host's private key.
pub const KEY: &str = "key.pem";

/// How long a CA made by `vmm tls init` is valid.
const CA_DAYS: u32 = 3650;
/// Default validity of a host certificate.
pub const DEFAULT_DAYS: u32 = 365;
const DAY: Duration = Duration::from_secs(86_400);

/// Errors making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("'{0}' is neither a DNS name nor an IP address")]
    BadName(String),
    #[error("{0}: {1}")]
    Read(PathBuf, String),
    #[error("making the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("a validity of 0 days")]
    NoDays,
}

/// Who a host certificate is for, and for how long.
#[derive(Clone, Debug)]
pub struct HostSpec {
    /// A DNS name (also the certificate's common name).
    pub name: String,
    /// Addresses the host is dialled at.
    pub ips: Vec<IpAddr>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl HostSpec {
    /// Valid from an hour ago (clocks differ a little) for `days` days.
    pub fn new(name: &str, ips: &[IpAddr], days: u32) -> Result<HostSpec, PkiError> {
        if days == 0 {
            return Err(PkiError::NoDays);
        }
        check_name(name)?;
        let now = SystemTime::now();
        Ok(HostSpec {
            name: name.to_string(),
            ips: ips.to_vec(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + DAY * days,
        })
    }
}

/// The name a certificate can carry: a DNS name (an IP address goes in `--ip`).
fn check_name(name: &str) -> Result<(), PkiError> {
    if name.parse::<IpAddr>().is_ok() || rustls::pki_types::DnsName::try_from(name).is_err() {
        return Err(PkiError::BadName(name.to_string()));
    }
    Ok(())
}

/// This machine's host name, for `vmm tls init` without `--name`.
pub fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL either way.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if ok && check_name(&name).is_ok() { name } else { "localhost".into() }
}

fn datetime(t: SystemTime) -> OffsetDateTime {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A CA's parameters; `key` makes its name unique, so that certificates of two clusters are
/// told apart by issuer name ("unknown issuer") before any signature is checked.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let id: String = key.public_key_raw().iter().skip(1).take(6).map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("vmm migration CA {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    p.not_before = datetime(now - Duration::from_secs(3600));
    p.not_after = datetime(now + DAY * CA_DAYS);
    p
}

fn host_params(spec: &HostSpec) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.name.as_str());
    p.distinguished_name = dn;
    let dns = spec.name.clone().try_into().map_err(|_| PkiError::BadName(spec.name.clone()))?;
    p.subject_alt_names =
        std::iter::once(SanType::DnsName(dns)).chain(spec.ips.iter().map(|ip| SanType::IpAddress(*ip))).collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One identity for both ends: the destination serves, the source authenticates as a client.
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = datetime(spec.not_before);
    p.not_after = datetime(spec.not_after);
    Ok(p)
}

/// A new file with `mode`, never replacing one.
fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), PkiError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_path_buf())
        } else {
            PkiError::Io(path.to_path_buf(), e)
        }
    })?;
    f.write_all(text.as_bytes()).map_err(|e| PkiError::Io(path.to_path_buf(), e))
}

/// Creates `dir` (0700) if needed and checks that none of `files` exists in it yet, so that
/// nothing is written unless everything can be.
fn prepare_dir(dir: &Path, files: &[&str]) -> Result<(), PkiError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| PkiError::Io(dir.to_path_buf(), e))?;
    }
    for f in files {
        let p = dir.join(f);
        if p.exists() {
            return Err(PkiError::Exists(p));
        }
    }
    Ok(())
}

/// `vmm tls init`: a new CA and a first host identity in `dir`.
pub fn init(dir: &Path, host: &HostSpec) -> Result<(), PkiError> {
    prepare_dir(dir, &[CA_CERT, CA_KEY, CERT, KEY])?;
    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(&ca_key);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate()?;
    let cert = host_params(host)?.signed_by(&key, &issuer)?;
    write_new(&dir.join(CA_KEY), 0o600, &ca_key.serialize_pem())?;
    write_new(&dir.join(KEY), 0o600, &key.serialize_pem())?;
    write_new(&dir.join(CA_CERT), 0o644, &ca_cert.pem())?;
    write_new(&dir.join(CERT), 0o644, &cert.pem())
}

/// `vmm tls issue`: another host's identity in `out`, signed by the CA in `ca_dir` (which must
/// hold `ca.pem` and `ca-key.pem`). `out` gets `ca.pem`, `cert.pem` and `key.pem`, no CA key.
pub fn issue(ca_dir: &Path, out: &Path, host: &HostSpec) -> Result<(), PkiError> {
    let read = |name: &str| {
        let p = ca_dir.join(name);
        fs::read_to_string(&p).map_err(|e| PkiError::Io(p, e))
    };
    let ca_pem = read(CA_CERT)?;
    let ca_key_pem = read(CA_KEY)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Read(ca_dir.join(CA_KEY), e.to_string()))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(|e| PkiError::Read(ca_dir.join(CA_CERT), e.to_string()))?;
    prepare_dir(out, &[CA_CERT, CERT, KEY])?;
    let key = KeyPair::generate()?;
    let cert = host_params(host)?.signed_by(&key, &issuer)?;
    write_new(&out.join(KEY), 0o600, &key.serialize_pem())?;
    write_new(&out.join(CA_CERT), 0o644, &ca_pem)?;
    write_new(&out.join(CERT), 0o644, &cert.pem())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-pki-unit-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_and_issue_write_the_files_with_private_keys_0600() {
        let (ca, other) = (temp("ca"), temp("other"));
        init(&ca, &HostSpec::new("host-a", &["10.0.0.1".parse().unwrap()], 30).unwrap()).unwrap();
        issue(&ca, &other, &HostSpec::new("host-b", &[], 30).unwrap()).unwrap();
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ca.join(CA_KEY)), 0o600);
        assert_eq!(mode(ca.join(KEY)), 0o600);
        assert_eq!(mode(other.join(KEY)), 0o600);
        assert_eq!(mode(ca.join(CERT)), 0o644);
        assert!(!other.join(CA_KEY).exists(), "issue copied the CA key");
        assert_eq!(fs::read(ca.join(CA_CERT)).unwrap(), fs::read(other.join(CA_CERT)).unwrap());
        // Nothing is overwritten.
        let again = init(&ca, &HostSpec::new("host-a", &[], 30).unwrap());
        assert!(matches!(again, Err(PkiError::Exists(_))), "{again:?}");
        let again = issue(&ca, &other, &HostSpec::new("host-b", &[], 30).unwrap());
        assert!(matches!(again, Err(PkiError::Exists(_))), "{again:?}");
        fs::remove_dir_all(ca).unwrap();
        fs::remove_dir_all(other).unwrap();
    }

    #[test]
    fn names_must_be_dns_names() {
        for bad in ["", "a b", "10.0.0.1", "-", "x..y"] {
            assert!(matches!(HostSpec::new(bad, &[], 1), Err(PkiError::BadName(_))), "{bad:?}");
        }
        assert!(matches!(HostSpec::new("ok", &[], 0), Err(PkiError::NoDays)));
        assert!(HostSpec::new("host-1.example", &[], 1).is_ok());
    }

    #[test]
    fn issue_needs_the_ca_key() {
        let (ca, other, third) = (temp("ca2"), temp("other2"), temp("third2"));
        init(&ca, &HostSpec::new("host-a", &[], 30).unwrap()).unwrap();
        issue(&ca, &other, &HostSpec::new("host-b", &[], 30).unwrap()).unwrap();
        let r = issue(&other, &third, &HostSpec::new("host-c", &[], 30).unwrap());
        assert!(matches!(&r, Err(PkiError::Io(p, _)) if p.ends_with(CA_KEY)), "{r:?}");
        assert!(!third.exists(), "a failed issue created its output");
        for d in [ca, other] {
            fs::remove_dir_all(d).unwrap();
        }
    }
}
