// SPDX-License-Identifier: Apache-2.0
//! `vmm run --await-restore`: a VMM started, set up and sandboxed ahead of time, that waits on
//! its API for the snapshot to run (`PUT /vm/restore`, `vmm restore`).
//!
//! This is Firecracker's way to a fast start: the process, /dev/kvm, the TAPs, the userfaultfd,
//! the jail and the filters are all in place before anyone knows which snapshot will run, so
//! what is left when it is named is reading the snapshot, building the VM and restoring it.
//! The sandboxed VMM thread opens no file: the snapshot's files (and its disks, copied into
//! place when the snapshot holds a copy) are opened by the snapshot thread, the one thread whose
//! filter lets it open files, and handed over open.
//!
//! While it waits, every other request is refused (409) but `GET /metrics` (which says that it
//! waits, and for how long) and `PUT /vm/shutdown`, which ends the VMM. A snapshot that does not check (missing, damaged, not fitting this VMM's `--net`, for a
//! CPU with features this host lacks: what the host can give was asked before the wait) is
//! refused (400) and the VMM waits on; a failure once the VM is being built ends the VMM with
//! that error, as `vmm run --restore` would.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::SnapshotError;
use super::restore::{Prepared, RestoreOptions, Started, open_files, start};
use super::save::Writer;
use crate::api::{ApiError, ApiMessage, ApiRequest, ApiResponse};
use crate::disk_config::DiskConfig;
use crate::host::HostResources;
use crate::net_config::NetConfig;

/// Where the answer to the `PUT /vm/restore` that ran the guest goes.
pub type Reply = Sender<Result<ApiResponse, ApiError>>;

/// How the wait ended.
pub enum Waited {
    /// The snapshot in `from` runs: its vCPUs are starting, its devices are paused (see
    /// [`start`]; `started.at` is when the request was taken). `reply` is for the request, to
    /// be answered once the guest runs.
    Restored { started: Box<Started>, from: PathBuf, reply: Reply },
    /// `PUT /vm/shutdown`, or the API server went away: no guest ever ran.
    Stopped,
}

/// What a waiting VMM was started with.
pub struct StandbyOptions {
    /// Its `--net`s, opened (in `HostResources`): the snapshot's NICs run on these TAPs.
    pub nets: Vec<NetConfig>,
    /// Its `--disk`s: where the snapshot's disks are (none: the snapshot's own paths).
    pub disks: Vec<DiskConfig>,
    /// It runs in a jail (`--jail`), which shows only its `--jail-dir` directories.
    pub jailed: bool,
}

/// What a jailed VMM adds when it cannot find or open a snapshot.
const JAIL_HINT: &str = " (a jailed VMM sees only the directories its --jail-dir options name)";
/// [`super::restore::check`]'s word for a directory that is not there.
const NOT_A_SNAPSHOT: &str = "is not a snapshot directory";

/// Why nothing runs yet.
const WAITING: &str = "no VM yet: this VMM waits for a snapshot to run (PUT /vm/restore, `vmm restore`)";

/// Answers the API until a snapshot runs or the VMM is asked to stop.
pub fn wait(
    api: &Receiver<ApiMessage>,
    writer: &Writer,
    opts: &StandbyOptions,
    res: &mut HostResources,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Waited, SnapshotError> {
    let waiting_since = Instant::now();
    // Until a snapshot checks (or the API server is gone: then nothing will).
    let (prepared, from, reply) = loop {
        let Ok((request, reply)) = api.recv() else { return Ok(Waited::Stopped) };
        match request {
            ApiRequest::Restore(req) => {
                let from = PathBuf::from(&req.from);
                match open_on(writer, &from, opts, res, Instant::now()) {
                    Ok(prepared) => break (prepared, from, reply),
                    Err(e) => {
                        let unseen = matches!(e, SnapshotError::Io { .. }) || e.to_string().contains(NOT_A_SNAPSHOT);
                        let hint = if opts.jailed && unseen { JAIL_HINT } else { "" };
                        log::warn!("restore {} refused: {e}{hint}", from.display());
                        let _ = reply.send(Err(ApiError::BadRequest(format!("{e}{hint}"))));
                    }
                }
            }
            ApiRequest::Shutdown => {
                let _ = reply.send(Ok(ApiResponse::Done));
                return Ok(Waited::Stopped);
            }
            ApiRequest::Metrics => {
                let _ = reply.send(Ok(ApiResponse::Metrics(crate::metrics::render_waiting(waiting_since.elapsed()))));
            }
            _ => {
                let _ = reply.send(Err(ApiError::Conflict(WAITING.to_string())));
            }
        }
    };
    // From here on the VM is being built: it runs, or the VMM ends with the error.
    match start(prepared, res, console) {
        Ok(started) => Ok(Waited::Restored { started: Box::new(started), from, reply }),
        Err(e) => {
            let _ = reply.send(Err(ApiError::Internal(format!("restore {} failed: {e}", from.display()))));
            Err(e)
        }
    }
}

/// Has the snapshot thread read, check and open the snapshot in `from`, and hands its disks to
/// `res`. Nothing of `res` is used up on failure, so the next request can try again.
fn open_on(
    writer: &Writer,
    from: &std::path::Path,
    opts: &StandbyOptions,
    res: &mut HostResources,
    started: Instant,
) -> Result<Prepared, SnapshotError> {
    let (dir, nets, disks, taps) = (from.to_path_buf(), opts.nets.clone(), opts.disks.clone(), res.tap_count());
    let cpu = res.host_cpuid().map(<[_]>::to_vec);
    let mut opened = writer
        .call(move || {
            let opts = RestoreOptions { nets: &nets, disks: &disks, host_cpuid: cpu.as_deref() };
            open_files(&dir, &opts, taps)
        })
        .map_err(SnapshotError::Other)??;
    let uffd = res.take_uffd().map_err(|e| SnapshotError::Other(e.to_string()))?;
    for (i, disk) in std::mem::take(&mut opened.disks).into_iter().enumerate() {
        res.put_disk(i, disk);
    }
    Ok(Prepared::from_files(opened, uffd, started))
}
