// SPDX-License-Identifier: Apache-2.0
//! The agent's state directory: one subdirectory per VMM it started (`vms/<vm>.<epoch>/`, with
//! the VMM's API socket, console and log, and `local.json`), so that a restarted agent knows
//! which processes are its VMMs and adopts them. A lock file keeps a second agent off the
//! same directory.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ClusterError;

/// How a VMM came to run here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Booted here.
    Booted,
    /// Received by migration.
    Incoming { move_id: String },
}

/// What the agent keeps about one VMM it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalVm {
    pub vm: String,
    /// The VM's epoch while this VMM runs it (an incoming VMM: the epoch its commit gives).
    pub epoch: u64,
    pub pid: u32,
    /// The process's start time (ticks since boot): with the pid, proof it is still ours.
    pub start_time: u64,
    pub tap: Option<String>,
    pub role: Role,
    /// Incoming: the commit transaction succeeded, leaving the VM record at this revision.
    #[serde(default)]
    pub committed_revision: Option<i64>,
    /// Incoming: the VMM said the guest may run here (`COMPLETE`).
    #[serde(default)]
    pub may_run: bool,
    /// An outgoing migration was started for this move.
    #[serde(default)]
    pub outgoing: Option<String>,
    /// A shutdown was asked for.
    #[serde(default)]
    pub stopping: bool,
}

/// The state directory.
pub struct StateDir {
    root: PathBuf,
    /// Held (flock) for as long as the agent runs.
    _lock: File,
}

impl StateDir {
    /// Opens (creating) `root` and locks it for this agent.
    pub fn open(root: &Path) -> Result<StateDir, ClusterError> {
        let vms = root.join("vms");
        std::fs::create_dir_all(&vms).map_err(ClusterError::io(format!("cannot create {}", vms.display())))?;
        let lock_path = root.join("agent.lock");
        let lock =
            File::create(&lock_path).map_err(ClusterError::io(format!("cannot create {}", lock_path.display())))?;
        // SAFETY: flock on an fd we own; no memory involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ClusterError::Invalid(format!(
                "another agent is using the state directory {} ({})",
                root.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(StateDir { root: root.to_path_buf(), _lock: lock })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of VM `vm`'s VMM for `epoch`.
    pub fn vm_dir(&self, vm: &str, epoch: u64) -> PathBuf {
        self.root.join("vms").join(format!("{vm}.{epoch}"))
    }

    /// Writes `local.json` for `l` (atomically: a crash leaves the old or the new one).
    pub fn save(&self, l: &LocalVm) -> Result<(), ClusterError> {
        let dir = self.vm_dir(&l.vm, l.epoch);
        std::fs::create_dir_all(&dir).map_err(ClusterError::io(format!("cannot create {}", dir.display())))?;
        let tmp = dir.join("local.json.tmp");
        let json = serde_json::to_vec_pretty(l).map_err(|e| ClusterError::Failed(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(ClusterError::io(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join("local.json"))
            .map_err(ClusterError::io(format!("cannot write {}", dir.display())))
    }

    /// Every VMM recorded here; unreadable records are skipped with a warning.
    pub fn load_all(&self) -> Vec<LocalVm> {
        let mut all = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.root.join("vms")) else { return all };
        for e in entries.flatten() {
            let path = e.path().join("local.json");
            match std::fs::read(&path).map(|b| serde_json::from_slice::<LocalVm>(&b)) {
                Ok(Ok(l)) => all.push(l),
                Ok(Err(err)) => tracing::warn!(path = %path.display(), error = %err, "skipping a malformed VMM record"),
                // A directory without a record: a VMM that never started.
                Err(_) => {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        all.sort_by(|a, b| (&a.vm, a.epoch).cmp(&(&b.vm, b.epoch)));
        all
    }

    /// Removes VMM `vm`/`epoch`'s directory.
    pub fn remove(&self, vm: &str, epoch: u64) {
        let dir = self.vm_dir(vm, epoch);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a VMM's directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_restart_and_the_directory_is_exclusive() {
        let root = std::env::temp_dir().join(format!("vmm-statedir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let l = LocalVm {
            vm: "v".into(),
            epoch: 2,
            pid: 42,
            start_time: 7,
            tap: Some("vt1".into()),
            role: Role::Incoming { move_id: "v.1.5".into() },
            committed_revision: Some(9),
            may_run: true,
            outgoing: None,
            stopping: false,
        };
        {
            let dir = StateDir::open(&root).unwrap();
            assert!(StateDir::open(&root).is_err(), "two agents on one directory");
            dir.save(&l).unwrap();
            std::fs::create_dir_all(root.join("vms/empty.1")).unwrap();
        }
        let dir = StateDir::open(&root).unwrap();
        assert_eq!(dir.load_all(), vec![l.clone()]);
        assert!(!root.join("vms/empty.1").exists());
        dir.remove("v", 2);
        assert!(dir.load_all().is_empty());
        drop(dir);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
