// SPDX-License-Identifier: Apache-2.0
//! What the API speaks: requests the HTTP layer hands to the VMM thread, and the answers. The
//! JSON shapes here are the API's public contract (see `vmm/api/openapi.yaml`).

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Lifecycle state of the VM as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// A live migration to another host is under way (the guest still runs here).
    Migrating,
    /// The guest now runs on the destination; this VMM is about to exit.
    Migrated,
    /// A shutdown was requested; waiting for the guest to power off.
    ShuttingDown,
    /// Paused while a snapshot is written.
    Snapshotting,
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
    pub uptime_ms: u64,
    /// The guest's disks, in the order the guest sees them (as `config.disks`).
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
}

/// One disk of a running VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The image on this host.
    pub path: std::path::PathBuf,
    pub size_bytes: u64,
    /// Bytes the image takes on its file system (a sparse image takes less than its size).
    pub allocated_bytes: u64,
    pub read_only: bool,
    pub shared: bool,
    /// 4 KiB blocks the guest wrote that a migration copying this disk has yet to send (0 when
    /// no migration copies it).
    pub dirty_blocks: u64,
    /// The guest's requests since the VMM started (on a migration destination: since the
    /// guest arrived).
    pub io: block::metrics::BlockCounters,
}

/// `PUT /vm/migrate` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination `host:port` (a `vmm run --incoming` listening there).
    pub to: String,
    /// Longest acceptable pause of the guest, in ms (default 50).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Cap on the copy bandwidth, in MiB/s (default: unlimited).
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Most pre-copy rounds before the migration forces convergence (default 30).
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// TLS directory (`ca.pem`, `cert.pem`, `key.pem`) on the source's host for this
    /// migration (default: the VMM's own `--tls-dir`).
    #[serde(default)]
    pub tls_dir: Option<String>,
    /// Migrate without TLS: neither encrypted nor authenticated (the destination must run with
    /// `--insecure-plaintext` too).
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The stall bound: the migration fails when the destination acknowledges nothing for this
    /// long, in ms (default: the VMM's `--stall-timeout-ms`, 5000).
    #[serde(default)]
    pub stall_timeout_ms: Option<u64>,
    /// Sent first, in a `Route` frame before the TLS handshake: for a destination that is a host
    /// agent's shared migration port (`vmm host run`), which move this is. Absent for a plain
    /// `vmm run --incoming`.
    #[serde(default)]
    pub route: Option<String>,
    /// Pre-copy only (default), post-copy after the first round, or post-copy once pre-copy
    /// stops converging.
    #[serde(default)]
    pub mode: Option<MigrationMode>,
    /// With `mode` `postcopy`: the pre-copy rounds before the switch (default 1). 0 switches
    /// at once: every page the guest touched follows it, none goes twice, and no round runs
    /// with the guest's writes tracked; but the guest's memory is on two hosts for the whole
    /// transfer instead of its last part.
    #[serde(default)]
    pub precopy_rounds: Option<u32>,
}

impl MigrateRequest {
    /// A request with every default, to `to`.
    pub fn to(to: &str) -> MigrateRequest {
        MigrateRequest { to: to.to_string(), ..Default::default() }
    }
}

/// How a migration moves memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// Copy rounds while the guest runs until what is left fits the downtime (throttling the
    /// vCPUs if the rounds stop shrinking), then the rest with the guest paused.
    #[default]
    Precopy,
    /// One full copy round (or `precopy_rounds`), then the guest moves at once; the pages it
    /// dirtied meanwhile follow while it runs on the destination (fetched on first touch, pushed
    /// in the background).
    Postcopy,
    /// Pre-copy, switching to post-copy when the rounds stop shrinking (instead of throttling).
    PostcopyAuto,
}

/// The post-copy part of a migration, once it switched.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyInfo {
    /// When the guest moved, in ms since the migration started.
    pub switched_at_ms: u64,
    /// Pages the destination lacked at the switch.
    pub pages_needed: u64,
    /// Pages sent in the background.
    pub pages_pushed: u64,
    /// Pages sent in answer to the destination's faults.
    pub pages_requested: u64,
    /// Faults the destination asked about.
    pub requests: u64,
    /// Times the link broke and the transfer went on over a new one.
    pub reconnects: u32,
    /// As the destination counted them at the end: faults on missing pages, and their latency
    /// from the fault to the page in place (median and 99th percentile, µs).
    pub faults: Option<u64>,
    pub fault_latency_median_us: Option<u64>,
    pub fault_latency_p99_us: Option<u64>,
    /// From the switch to the last page, ms.
    pub duration_ms: Option<u64>,
}

/// `PUT /vm/snapshot` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The directory to write (created; if it exists it must be empty).
    pub to: String,
    /// Resume the guest once the snapshot is written (default: it stays paused).
    #[serde(default)]
    pub resume: bool,
    /// Copy the disks into the snapshot (default: it refers to them by path).
    #[serde(default)]
    pub with_disks: bool,
}

/// `PUT /vm/restore` body: the snapshot a VMM started with `vmm run --await-restore` runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot's directory, an absolute path (the VMM's working directory is not the
    /// client's).
    pub from: String,
}

/// The answer to `PUT /vm/restore`, sent once the guest runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInfo {
    /// The snapshot's directory.
    pub from: String,
    /// From the VMM taking the request to the guest's first vCPU entering KVM_RUN, in µs.
    pub to_running_us: u64,
    /// The same moment on the VMM host's monotonic clock (`CLOCK_MONOTONIC`), in µs.
    pub running_at_monotonic_us: u64,
}

/// Where a snapshot is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotPhase {
    /// No snapshot has been asked for.
    #[default]
    None,
    /// The guest is paused and the snapshot is being written.
    Saving,
    /// Written (the guest is paused, or running again if `resume` was asked).
    Completed,
    /// Failed; what was written is removed and the guest is as it was before.
    Failed,
}

/// `GET /vm/snapshot`: the current or last snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub phase: SnapshotPhase,
    /// The snapshot's directory.
    pub dir: Option<String>,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Bytes of memory written as data (the rest of the memory file is holes).
    pub memory_data_bytes: u64,
    /// Bytes of copied disks written as data.
    pub disk_data_bytes: u64,
    /// From the request to the end, in ms.
    pub total_ms: u64,
    /// How long the guest was paused for it, in ms, if it was resumed.
    pub downtime_ms: Option<u64>,
    pub error: Option<String>,
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// No migration has been asked for.
    #[default]
    None,
    /// Connecting and checking the destination accepts this VM.
    Setup,
    /// Copying memory while the guest runs.
    Precopy,
    /// Guest paused: last dirty pages and device state.
    StopAndCopy,
    /// The guest runs on the destination; the pages it lacks are still being sent.
    Postcopy,
    /// Post-copy with the link broken: the destination's guest is paused, this host keeps the
    /// memory and reconnects.
    PostcopyPaused,
    /// The destination runs the guest.
    Completed,
    /// Failed; the guest runs on here, unless the failure came after `Complete` without an
    /// answer from the destination (see `error`): then it stays paused here.
    Failed,
}

/// `GET /vm/migration`: progress of the current or last migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub phase: MigrationPhase,
    /// The mode asked for.
    #[serde(default)]
    pub mode: MigrationMode,
    /// Post-copy's figures, once the migration switched to it.
    #[serde(default)]
    pub postcopy: Option<PostcopyInfo>,
    pub destination: Option<String>,
    /// The connection is mutual TLS (false: `--insecure-plaintext`).
    #[serde(default)]
    pub encrypted: bool,
    /// Pre-copy round (1 is the full copy; 0 before it, and throughout a post-copy with no
    /// pre-copy round).
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages not sent because they were never touched or all zero.
    pub pages_skipped: u64,
    /// Disk bytes sent as data (copied disks; included in `bytes_sent`).
    #[serde(default)]
    pub disk_bytes_sent: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_rate_pages_s: u64,
    /// Bytes per second the last round achieved.
    pub bandwidth_bytes_s: u64,
    /// Pause the guest would see if it stopped now.
    pub estimated_downtime_ms: u64,
    /// Estimated time to completion.
    pub eta_ms: u64,
    /// Total time so far, or of the finished migration.
    pub total_ms: u64,
    /// `total_ms` in µs.
    pub total_us: u64,
    /// Guest pause measured on the source: from the pause to the destination's acknowledgement,
    /// which it sends once the guest runs there.
    pub downtime_ms: Option<u64>,
    /// `downtime_ms` in µs.
    pub downtime_us: Option<u64>,
    /// When the guest's vCPUs stopped here, in µs since the Unix epoch.
    pub paused_at_us: Option<u64>,
    /// When they started on the destination, in µs since the Unix epoch on the destination's
    /// clock: with `paused_at_us`, the guest's downtime on hosts whose clocks agree.
    pub resumed_at_us: Option<u64>,
    /// Guest pause measured on the destination (reported back in its acknowledgement).
    pub downtime_destination_ms: Option<u64>,
    pub error: Option<String>,
    /// Every copy round so far, the stop-and-copy one last.
    pub rounds: Vec<RoundInfo>,
}

/// One copy round of a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundInfo {
    pub round: u32,
    /// When it started, in µs since the migration started.
    pub started_us: u64,
    /// Pages it had to send: all touched pages in round 1, then those dirtied since.
    pub pages: u64,
    /// Bytes sent before it started.
    pub bytes_before: u64,
    /// CPU time the source's migration thread had used when it started, in µs: with
    /// `bytes_before`, what sending a byte costs the source (TLS against plaintext, say), a
    /// figure that, unlike a rate, holds when other work shares the CPUs.
    #[serde(default)]
    pub cpu_us: u64,
    /// The guest was paused for it.
    pub stop_and_copy: bool,
}

/// A request to the VMM thread.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    GetVm,
    Pause,
    Resume,
    Shutdown,
    Migrate(MigrateRequest),
    GetMigration,
    Snapshot(SnapshotRequest),
    GetSnapshot,
    /// Prometheus text exposition of the VMM's counters.
    Metrics,
    /// Run a snapshot's VM (only a VMM waiting for one, `vmm run --await-restore`).
    Restore(RestoreRequest),
}

/// The VMM thread's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    Vm(VmInfo),
    /// Done (HTTP 204).
    Done,
    /// Started, runs on (HTTP 202).
    Accepted,
    Migration(MigrationInfo),
    Snapshot(SnapshotInfo),
    Metrics(String),
    Restored(RestoreInfo),
}

/// Why a request failed, by HTTP class.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 400
    #[error("{0}")]
    BadRequest(String),
    /// 409: not possible in the VM's current state.
    #[error("{0}")]
    Conflict(String),
    /// 500
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::BadRequest(_) => 400,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
        }
    }
}

/// One request in flight from the HTTP thread to the VMM thread, with where to answer.
pub type ApiMessage = (ApiRequest, std::sync::mpsc::Sender<Result<ApiResponse, ApiError>>);
