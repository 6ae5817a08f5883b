// SPDX-License-Identifier: Apache-2.0
//! A migration request checked into what the source runs with ([`MigrateParams`]), with the
//! VMM's own defaults for what the request leaves out.

use std::net::ToSocketAddrs;
use std::time::Duration;

use migration::protocol;

use crate::api::{MigrateRequest, MigrationMode};
use crate::transport::{self, LinkConfig, Security};

/// Default guest pause target (QEMU and Cloud Hypervisor default to 300 ms).
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(50);
/// Default limit on pre-copy rounds.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// What the user asked for, checked.
#[derive(Clone, Debug)]
pub struct MigrateParams {
    pub to: String,
    /// Sent first in a `Route` frame, for a host agent's shared migration port.
    pub route: Option<String>,
    pub downtime: Duration,
    /// Bytes per second, if capped.
    pub max_bandwidth: Option<u64>,
    pub max_rounds: u32,
    pub mode: MigrationMode,
    /// With [`MigrationMode::Postcopy`]: pre-copy rounds before the switch (0: at once).
    pub precopy_rounds: u32,
    /// Mutual TLS (by default) or plaintext.
    pub security: Security,
    /// The stall bound and timeouts of the connection.
    pub link: LinkConfig,
}

/// What a VMM uses for a migration its request does not say otherwise about (`vmm run
/// --tls-dir`, `--insecure-plaintext`, `--stall-timeout-ms`).
#[derive(Clone, Debug, Default)]
pub struct MigrationDefaults {
    /// `None`: no TLS identity, so a request must bring one (or ask for plaintext).
    pub security: Option<Security>,
    pub link: LinkConfig,
}

impl MigrateParams {
    /// Checks a request; `defaults` fill in what it leaves out.
    pub fn from_request(r: &MigrateRequest, defaults: &MigrationDefaults) -> Result<Self, String> {
        // Resolving a name reads /etc (hosts, resolv.conf, nsswitch): a sandboxed VMM cannot.
        if crate::seccomp::enabled() && r.to.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "to: '{}': this VMM is sandboxed (seccomp) and resolves no host names: give an IP address and port",
                r.to
            ));
        }
        if r.to.to_socket_addrs().map(|mut a| a.next().is_none()).unwrap_or(true) {
            return Err(format!("to: '{}' is not a reachable host:port", r.to));
        }
        let downtime = match r.downtime_ms {
            Some(0) => return Err("downtime_ms: must be at least 1".into()),
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_DOWNTIME,
        };
        let max_bandwidth = match r.max_bandwidth_mib_s {
            Some(0) => return Err("max_bandwidth_mib_s: must be at least 1".into()),
            other => other.map(|m| m << 20),
        };
        let max_rounds = match r.max_rounds {
            Some(0) => return Err("max_rounds: must be at least 1".into()),
            other => other.unwrap_or(DEFAULT_MAX_ROUNDS),
        };
        let link = match r.stall_timeout_ms {
            Some(ms) => LinkConfig::with_stall_ms(ms).map_err(|e| format!("stall_timeout_ms: {e}"))?,
            None => defaults.link,
        };
        let security = if r.insecure_plaintext {
            if r.tls_dir.is_some() {
                return Err("tls_dir and insecure_plaintext: choose one".into());
            }
            log::warn!("{}", transport::PLAINTEXT_WARNING);
            Security::InsecurePlaintext
        } else if let Some(dir) = &r.tls_dir {
            match &defaults.security {
                // The VMM's own directory (e.g. VMM_TLS_DIR set for every command): already read.
                Some(s @ Security::Tls(id)) if id.dir() == std::path::Path::new(dir) => s.clone(),
                _ if crate::seccomp::enabled() => {
                    return Err(format!(
                        "tls_dir '{dir}': this VMM is sandboxed (seccomp) and opens no files after it started: \
                         give it --tls-dir when starting it, or start it with --no-seccomp"
                    ));
                }
                _ => Security::tls(std::path::Path::new(dir)).map_err(|e| format!("tls_dir: {e}"))?,
            }
        } else {
            defaults.security.clone().ok_or(
                "this VMM has no TLS identity for migrations: start it with --tls-dir DIR (or VMM_TLS_DIR), \
                 or give tls_dir in the request (vmm migrate --tls-dir); plaintext only with insecure_plaintext",
            )?
        };
        let mode = r.mode.unwrap_or_default();
        let precopy_rounds = match (r.precopy_rounds, mode) {
            (None, _) => 1,
            (Some(n), MigrationMode::Postcopy) if n <= max_rounds => n,
            (Some(n), MigrationMode::Postcopy) => {
                return Err(format!("precopy_rounds: {n} is more than max_rounds ({max_rounds})"));
            }
            (Some(_), _) => return Err("precopy_rounds: only with mode postcopy".into()),
        };
        if let Some(route) = &r.route {
            protocol::check_route(route).map_err(|e| format!("route: {e}"))?;
        }
        Ok(MigrateParams {
            to: r.to.clone(),
            route: r.route.clone(),
            downtime,
            max_bandwidth,
            max_rounds,
            security,
            link,
            mode,
            precopy_rounds,
        })
    }
}
