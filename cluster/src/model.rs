// SPDX-License-Identifier: Apache-2.0
//! What the cluster's store holds, as plain serde types. Intent (what users asked for: a VM's
//! spec and desired state, a host's drain flag, a requested move) is kept apart from
//! observation (what agents saw: a host's registration, a VM's status, load figures), and
//! observations live under their agent's lease, so they vanish with it.
//!
//! The one record that decides anything is [`VmRecord`]: its `owner` and `epoch` change only in
//! fenced transactions (see `ownership.rs`), so at every instant exactly one host owns a VM.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest host or VM name.
pub const MAX_NAME: usize = 32;

/// Checks a host or VM name: 1 to 32 characters from `[a-z0-9-]`, starting with a letter or
/// digit (they appear in keys, file names and interface names).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} name {name:?}: use 1 to {MAX_NAME} characters from a-z, 0-9 and '-', not starting with '-'"
        ))
    }
}

/// What a host offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU time per second, in thousandths of a CPU (its cgroup's quota, or its CPU count).
    pub cpu_millis: u64,
    /// Memory for guests, in MiB.
    pub mem_mib: u64,
}

/// A live agent's registration (observation; under the agent's lease: it exists while the host
/// is up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// Where its shared migration port listens (`IP:PORT`).
    pub migration_addr: String,
    pub capacity: Capacity,
    /// The lease the agent's records live under.
    pub lease: i64,
    pub agent_pid: u32,
    /// When the agent registered, ms since the Unix epoch.
    pub since_ms: u64,
    /// The migration port takes plaintext connections (no TLS).
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// What users want of a host (intent; survives the agent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    /// Unschedulable: no VM is placed or moved onto it; `vmm host drain` moves its VMs off.
    pub drained: bool,
}

/// How to run a VM: what `vmm run` is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Guest kernel; the path must exist on every host.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// The guest's NIC (on a TAP the agent bridges onto its host's network), with this MAC;
    /// `None`: no NIC.
    #[serde(default)]
    pub mac: Option<String>,
}

/// What users want of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    /// Power it off and remove it from the cluster.
    Stopped,
}

/// A VM: its spec and desired state (intent) and who owns it (decided by fenced transactions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub spec: VmSpec,
    pub desired: Desired,
    /// The one host that may run it.
    pub owner: String,
    /// Bumped by every change of owner: 1 at creation.
    pub epoch: u64,
    pub created_ms: u64,
}

/// What the owner's agent sees of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Its VMM is starting (boot, or an incoming migration being received).
    Starting,
    Running,
    /// Being migrated away (the guest still runs here).
    Migrating,
    /// Paused after a migration that failed past the commit point: the cluster decides.
    InDoubt,
    /// Powering off.
    Stopping,
    /// Its VMM exited without being asked to.
    Crashed,
    /// The owner has no VMM for it (e.g. its destination died between the commit and the end
    /// of the migration).
    Lost,
}

/// The owner agent's view of a VM (observation; under that agent's lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub host: String,
    pub epoch: u64,
    pub phase: VmPhase,
    /// The VMM's process id on that host.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Why, for `crashed` and `lost`.
    #[serde(default)]
    pub detail: Option<String>,
    pub since_ms: u64,
}

/// Exponential moving averages of one figure over about 10 s and 60 s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ema {
    pub now: f64,
    pub ema_10s: f64,
    pub ema_60s: f64,
}

impl Ema {
    /// Folds in a sample taken `dt_s` seconds after the previous one.
    pub fn update(&mut self, sample: f64, dt_s: f64, first: bool) {
        self.now = sample;
        if first {
            self.ema_10s = sample;
            self.ema_60s = sample;
            return;
        }
        let a10 = 1.0 - (-dt_s / 10.0).exp();
        let a60 = 1.0 - (-dt_s / 60.0).exp();
        self.ema_10s += a10 * (sample - self.ema_10s);
        self.ema_60s += a60 * (sample - self.ema_60s);
    }
}

/// One VM's use of its host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmLoad {
    /// CPU used by its VMM process, in thousandths of a CPU.
    pub cpu_millis: Ema,
    /// CPU used by its vCPU threads alone (the guest's demand as far as it got it).
    pub vcpu_millis: Ema,
    /// What its vCPU threads asked for: time running plus time runnable but not running (the
    /// scheduler's run delay, which includes the time its host's cgroup was throttled), in
    /// thousandths of a CPU. A VM starved by its host's quota shows demand above its use.
    #[serde(default)]
    pub demand_millis: Ema,
    /// Resident memory of its VMM process, MiB.
    pub rss_mib: f64,
}

/// A host's load (observation; under the agent's lease; published every couple of seconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    pub host: String,
    pub at_ms: u64,
    pub capacity: Capacity,
    /// CPU used by everything in the host's cgroup (agent and VMMs), thousandths of a CPU.
    pub cpu_millis: Ema,
    /// Share of CFS periods in which the cgroup was throttled (0 to 1): demand above capacity.
    pub throttled: Ema,
    /// The sum of its VMs' demand (see [`VmLoad::demand_millis`]), thousandths of a CPU.
    #[serde(default)]
    pub demand_millis: Ema,
    /// Seconds between samples (the figures are about this fresh when `at_ms` is recent).
    #[serde(default)]
    pub every_s: f64,
    /// The agent's own CPU and memory.
    pub agent_cpu_millis: Ema,
    pub agent_rss_mib: f64,
    pub vms: BTreeMap<String, VmLoad>,
}

/// Where a move is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Asked for; the source's agent starts it.
    Requested,
    /// The destination's agent made the commit transaction: the destination owns the VM.
    Committed,
    /// The destination runs the VM.
    Done,
    /// It did not happen; the VM runs on the source (handed back if it had been committed).
    Failed,
}

impl MovePhase {
    pub fn is_final(self) -> bool {
        matches!(self, MovePhase::Done | MovePhase::Failed)
    }
}

/// Timestamps of a move (ms since the Unix epoch, each host's own clock), for the benchmark.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTimes {
    pub requested_ms: u64,
    /// The source asked its VMM to migrate.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// The destination's read of the move when the connection arrived: sent and answered (µs
    /// since the Unix epoch).
    #[serde(default)]
    pub accept_sent_us: Option<u64>,
    #[serde(default)]
    pub accept_done_us: Option<u64>,
    /// The destination's commit transaction: sent and answered (µs since the Unix epoch).
    #[serde(default)]
    pub commit_sent_us: Option<u64>,
    #[serde(default)]
    pub commit_done_us: Option<u64>,
    /// The guest paused on the source and ran on the destination (µs since the Unix epoch).
    #[serde(default)]
    pub paused_us: Option<u64>,
    #[serde(default)]
    pub resumed_us: Option<u64>,
    /// The guest's pause as the destination measured it (`Paused` received → running), µs.
    #[serde(default)]
    pub downtime_us: Option<u64>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// Pages the guest dirtied per second in the migration's last pre-copy round, as the source
    /// VMM measured it: the VM's dirty rate, known once it has moved.
    #[serde(default)]
    pub dirty_pages_s: Option<u64>,
}

/// A move of one VM between two hosts: created by `vmm vm move` or a drain (only if none is in
/// flight), carried out by the two agents, ended by one of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// Unique per move; the `Route` the source sends to the destination's migration port.
    pub id: String,
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The VM's epoch when the move was asked for; the commit makes it `epoch + 1`.
    pub epoch: u64,
    pub phase: MovePhase,
    /// Who asked (`vmm vm move`, `vmm host drain A`, ...).
    pub requested_by: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub times: MoveTimes,
    /// How the source migrates (`None`: pre-copy, as before the field existed).
    #[serde(default)]
    pub mode: Option<vmm::api::MigrationMode>,
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Now, in µs since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "vm-1", "0", &"x".repeat(MAX_NAME)] {
            assert!(check_name("VM", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "a b", &"x".repeat(MAX_NAME + 1), "é"] {
            assert!(check_name("VM", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ema_follows_a_step() {
        let mut e = Ema::default();
        e.update(0.0, 1.0, true);
        for _ in 0..10 {
            e.update(100.0, 1.0, false);
        }
        // After 10 s the 10 s average is about 63 % of the way, the 60 s one about 15 %.
        assert!((60.0..67.0).contains(&e.ema_10s), "{e:?}");
        assert!((13.0..18.0).contains(&e.ema_60s), "{e:?}");
        assert_eq!(e.now, 100.0);
    }

    #[test]
    fn records_round_trip() {
        let vm = VmRecord {
            name: "vm-1".into(),
            spec: VmSpec {
                kernel: "/k".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
                mem_mib: 64,
                vcpus: 1,
                mac: Some("52:54:00:00:00:01".into()),
            },
            desired: Desired::Running,
            owner: "a".into(),
            epoch: 3,
            created_ms: 1,
        };
        let json = serde_json::to_string(&vm).unwrap();
        assert_eq!(serde_json::from_str::<VmRecord>(&json).unwrap(), vm);
        let m = MoveRecord {
            id: "m1".into(),
            vm: "vm-1".into(),
            from: "a".into(),
            to: "b".into(),
            epoch: 3,
            phase: MovePhase::Committed,
            requested_by: "test".into(),
            error: None,
            times: MoveTimes::default(),
            mode: Some(vmm::api::MigrationMode::PostcopyAuto),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"phase\":\"committed\""), "{json}");
        assert_eq!(serde_json::from_str::<MoveRecord>(&json).unwrap(), m);
    }
}
