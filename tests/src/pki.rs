// SPDX-License-Identifier: Apache-2.0
//! The test PKI: one cluster CA per test process, made on first use with the VMM's own
//! certificate code (`vmm::transport::pki`, what `vmm tls init` and `vmm tls issue` run), and
//! host identities issued from it on demand (each names the address a source dials), so every
//! migration test runs over mutual TLS at the cost of a few milliseconds.
//!
//! Everything lives in `$TMPDIR/vmm-test-pki-<pid>/`, removed when the test process exits
//! (`atexit`); directories of test processes that died are swept on the next first use.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use vmm::transport::pki::{self, HostSpec};

const PREFIX: &str = "vmm-test-pki-";

/// A CA and the identities issued from it so far.
pub struct TestPki {
    root: PathBuf,
    ca: PathBuf,
    issued: Mutex<HashMap<String, PathBuf>>,
}

static PKI: OnceLock<TestPki> = OnceLock::new();

extern "C" fn remove_pki() {
    if let Some(p) = PKI.get() {
        let _ = std::fs::remove_dir_all(&p.root);
    }
}

/// Removes the PKI directories of test processes that are gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|p| p.parse::<i32>().ok()) else { continue };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The test process's PKI, made on first use.
pub fn pki() -> &'static TestPki {
    PKI.get_or_init(|| {
        sweep_stale();
        let root = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ca = root.join("ca");
        let spec = HostSpec::new("localhost", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], 30).expect("a host spec");
        pki::init(&ca, &spec).unwrap_or_else(|e| panic!("making the test CA in {}: {e}", ca.display()));
        // SAFETY: registers a plain function to run at exit.
        unsafe { libc::atexit(remove_pki) };
        TestPki { root, ca, issued: Mutex::new(HashMap::new()) }
    })
}

impl TestPki {
    /// The CA's own directory (with `ca-key.pem`); its identity names `localhost` and
    /// 127.0.0.1.
    pub fn ca_dir(&self) -> &Path {
        &self.ca
    }

    /// An identity of this CA naming `ip` (and `localhost`, 127.0.0.1): what a host of a test
    /// bed at `ip` uses at either end of a migration.
    pub fn host_dir(&self, ip: Ipv4Addr) -> PathBuf {
        let ips = [IpAddr::V4(ip), IpAddr::V4(Ipv4Addr::LOCALHOST)];
        self.issue(&format!("host-{ip}"), HostSpec::new("localhost", &ips, 30).expect("a host spec"))
    }

    /// An identity of this CA made from `spec` (a wrong name, an expired certificate), kept
    /// under `tag`.
    pub fn issue(&self, tag: &str, spec: HostSpec) -> PathBuf {
        let mut issued = self.issued.lock().expect("Poisoned lock");
        if let Some(d) = issued.get(tag) {
            return d.clone();
        }
        let dir = self.root.join(tag);
        pki::issue(&self.ca, &dir, &spec).unwrap_or_else(|e| panic!("issuing {tag}: {e}"));
        issued.insert(tag.to_string(), dir.clone());
        dir
    }

    /// An identity naming `ip` that expired yesterday.
    pub fn expired_dir(&self, ip: Ipv4Addr) -> PathBuf {
        let now = SystemTime::now();
        let spec = HostSpec {
            not_before: now - Duration::from_secs(10 * 86_400),
            not_after: now - Duration::from_secs(86_400),
            ..HostSpec::new("localhost", &[IpAddr::V4(ip)], 1).expect("a host spec")
        };
        self.issue(&format!("expired-{ip}"), spec)
    }

    /// A CA of another cluster, with an identity naming `ip`.
    pub fn foreign_dir(&self, ip: Ipv4Addr) -> PathBuf {
        let mut issued = self.issued.lock().expect("Poisoned lock");
        let tag = format!("foreign-{ip}");
        if let Some(d) = issued.get(&tag) {
            return d.clone();
        }
        let dir = self.root.join(&tag);
        let spec = HostSpec::new("localhost", &[IpAddr::V4(ip), IpAddr::V4(Ipv4Addr::LOCALHOST)], 30).expect("spec");
        pki::init(&dir, &spec).unwrap_or_else(|e| panic!("making a foreign CA: {e}"));
        issued.insert(tag, dir.clone());
        dir
    }

    /// The security of a test's own fake source or destination at `ip` (in-process).
    pub fn security(&self, ip: Ipv4Addr) -> vmm::transport::Security {
        vmm::transport::Security::tls(&self.host_dir(ip)).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `--tls-dir DIR` for a `vmm` command line.
pub fn tls_args(dir: &Path) -> Vec<String> {
    vec!["--tls-dir".to_string(), dir.display().to_string()]
}
