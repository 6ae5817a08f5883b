// SPDX-License-Identifier: Apache-2.0
//! Snapshots: a paused VM written to a directory ([`save`], `vmm snapshot`), and a VM run again
//! from one ([`restore`], `vmm run --restore`), its memory loaded on demand so that the time to
//! a running guest does not grow with its memory.
//!
//! The format (manifest, checksummed state file, sparse memory file checked chunk by chunk,
//! copied disks) is `migration::snapshot`'s; the state is the migration's [`MachineState`].
//!
//! Integrity: the manifest and the state file are read whole and checked (version, sizes,
//! CRC-64) before anything is built. The memory file is only checked for its size up front:
//! reading and checking gigabytes before the guest runs would make the start as slow as the
//! memory is large. Instead each 256 KiB chunk is checked against its CRC-64 when it is loaded,
//! on the guest's first touch or by the loader that fills memory in the background right after
//! the start; a damaged chunk is never placed, and the VM stops with an error naming it. A
//! guest never runs on bytes that did not pass their check. Copied disks are checked as they
//! are copied into place, before the guest starts.

pub mod restore;
pub mod save;
pub mod sparse;
pub mod standby;

use block::DiskState;
use migration::protocol::RegionLayout;
use migration::snapshot::{ChunkTable, SnapshotFormatError};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::migrate::{MachineState, MigrateError};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The state file's name.
pub const STATE: &str = "state";
/// The memory file's name.
pub const MEMORY: &str = "memory";

/// The file a copied disk `index` is kept in.
pub fn disk_file(index: usize) -> String {
    format!("disk-{index}.raw")
}

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    Format(#[from] SnapshotFormatError),
    #[error("{0} is not an empty directory: a snapshot goes into a new or empty directory")]
    NotEmpty(String),
    #[error("{0}")]
    Machine(#[from] MigrateError),
    #[error("{0}")]
    Build(#[from] crate::builder::BuildError),
    #[error("{0}")]
    Vmm(#[from] crate::vmm::VmmError),
    #[error("{0}")]
    Uffd(#[from] crate::uffd::UffdError),
    #[error("the snapshot does not fit: {0}")]
    Mismatch(String),
    #[error("the snapshot is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Other(String),
}

impl SnapshotError {
    fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.display().to_string();
        move |source| SnapshotError::Io { what, path, source }
    }
}

/// Guest memory as the snapshot holds it.
#[derive(Serialize, Deserialize)]
pub struct MemorySnapshot {
    /// The regions, in the order the memory file holds them.
    pub regions: Vec<RegionLayout>,
    pub table: ChunkTable,
}

/// One disk of the guest.
#[derive(Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// The disk as the VM used it (its path is where a disk kept by reference is found).
    pub state: DiskState,
    /// For a copied disk, the chunk table of its copy ([`disk_file`]).
    #[serde(default)]
    pub copy: Option<ChunkTable>,
}

/// The state file's payload.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub config: VmConfig,
    pub machine: MachineState,
    pub memory: MemorySnapshot,
    #[serde(default)]
    pub disks: Vec<DiskSnapshot>,
}
