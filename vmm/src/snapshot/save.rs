// SPDX-License-Identifier: Apache-2.0
//! Taking a snapshot (`PUT /vm/snapshot`, `vmm snapshot`), on a worker thread of its own while
//! the VMM thread keeps answering the API.
//!
//! The vCPUs pause and read their state, the devices pause (a disk is drained) and every disk
//! is flushed; then the machine's state, guest memory and, with `with_disks`, a copy of each
//! disk that is not shared are written, and the manifest last (the snapshot exists once it is
//! there). Memory goes as a sparse file: only pages the guest ever touched are read (mincore),
//! and only those that are not all zero are written. Without `resume` the guest stays paused,
//! so that the snapshot is the last state it had (it can then run elsewhere from it). A failure
//! removes what was written and leaves the guest as it was.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use migration::STATE_VERSION;
use migration::protocol::RegionLayout;
use migration::snapshot::{DISK_CHUNK, FORMAT, FileEntry, MEMORY_CHUNK, Manifest, SNAPSHOT_VERSION, encode_state};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::sparse::SparseWriter;
use super::{DiskSnapshot, MANIFEST, MEMORY, MemorySnapshot, STATE, SnapshotError, SnapshotState, disk_file};
use crate::api::{SnapshotInfo, SnapshotRequest};
use crate::builder::Machine;
use crate::migrate::{MachineState, dirty, pause_devices, resume_devices, save_devices, save_disks, save_vm_state};
use crate::vstate::vcpu::VcpuSet;

const PAGE: u64 = 4096;

/// A snapshot to write, run on the [`Writer`].
pub type Job = Box<dyn FnOnce() + Send>;

/// The thread snapshots are written on. It is started while the VMM may still create files and
/// installs its own seccomp filter, the one that lets it create the snapshot's files: every
/// other thread is sandboxed so that it opens nothing (see `crate::seccomp`).
pub struct Writer {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start() -> std::io::Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        // Its filter goes on before it takes a job (see `seccomp::spawn` for when the VMM waits
        // for it).
        let thread = crate::seccomp::spawn("snapshot", crate::seccomp::ThreadKind::Snapshot, move || {
            for job in rx {
                job();
            }
        })?;
        Ok(Writer { jobs: Some(tx), thread: Some(thread) })
    }

    /// Runs `job` on the writer thread.
    pub fn run(&self, job: Job) -> Result<(), String> {
        self.jobs.as_ref().and_then(|j| j.send(job).ok()).ok_or_else(|| "the snapshot thread is gone".to_string())
    }

    /// Runs `job` on the writer thread and waits for its result (a sandboxed VMM thread's way
    /// to open files).
    pub fn call<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.run(Box::new(move || {
            let _ = tx.send(job());
        }))?;
        rx.recv().map_err(|_| "the snapshot thread is gone".to_string())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What was asked, checked.
#[derive(Clone, Debug)]
pub struct SnapshotParams {
    pub dir: PathBuf,
    pub resume: bool,
    pub with_disks: bool,
}

impl From<&SnapshotRequest> for SnapshotParams {
    fn from(r: &SnapshotRequest) -> Self {
        SnapshotParams { dir: PathBuf::from(&r.to), resume: r.resume, with_disks: r.with_disks }
    }
}

/// How the guest is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Running again.
    Resumed,
    /// Paused, its devices too (a resume resumes both).
    Paused,
}

/// Files and the directory a failed snapshot removes again.
#[derive(Default)]
struct Written {
    dir: Option<PathBuf>,
    files: Vec<PathBuf>,
    done: bool,
}

impl Drop for Written {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Takes a snapshot of `m` into `params.dir`. `was_running`: the vCPUs ran before (a failure
/// resumes them). Progress goes into `progress`.
pub fn take(
    m: &Machine,
    vcpus: &Mutex<VcpuSet>,
    params: &SnapshotParams,
    was_running: bool,
    progress: &Mutex<SnapshotInfo>,
) -> Result<After, SnapshotError> {
    let started = Instant::now();
    let mut written = Written::default();
    prepare_dir(&params.dir, &mut written)?;
    // Pages still arriving (a restore's loader, an incoming post-copy) must all be here.
    m.memory_complete().map_err(|e| SnapshotError::Other(format!("guest memory is incomplete: {e}")))?;

    let paused_at = Instant::now();
    {
        let v = vcpus.lock().expect("Poisoned lock");
        v.pause_and_save().map_err(|e| SnapshotError::Other(format!("pausing the vCPUs: {e}")))?;
    }
    let states = vcpus.lock().expect("Poisoned lock").saved_states();
    pause_devices(m);
    let result = states
        .map_err(|e| SnapshotError::Other(format!("saving the vCPUs: {e}")))
        .and_then(|states| write_all(m, params, states, &mut written, progress));
    match result {
        Ok(()) => {
            written.done = true;
            let after = if params.resume {
                resume_devices(m);
                vcpus
                    .lock()
                    .expect("Poisoned lock")
                    .resume()
                    .map_err(|e| SnapshotError::Other(format!("resuming the vCPUs: {e}")))?;
                After::Resumed
            } else {
                After::Paused
            };
            let mut p = progress.lock().expect("Poisoned lock");
            p.total_ms = started.elapsed().as_millis() as u64;
            p.downtime_ms = (after == After::Resumed).then(|| paused_at.elapsed().as_millis() as u64);
            log::info!(
                "snapshot {}: {} bytes of memory written in {} ms",
                params.dir.display(),
                p.memory_data_bytes,
                p.total_ms
            );
            Ok(after)
        }
        Err(e) => {
            resume_devices(m);
            if was_running && let Err(r) = vcpus.lock().expect("Poisoned lock").resume() {
                log::error!("resuming the vCPUs after a failed snapshot: {r}");
            }
            Err(e)
        }
    }
}

/// The directory must be new (created here) or empty.
fn prepare_dir(dir: &Path, written: &mut Written) -> Result<(), SnapshotError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {
            written.dir = Some(dir.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(dir).map_err(SnapshotError::io("read directory", dir))?;
            if entries.next().is_some() {
                return Err(SnapshotError::NotEmpty(dir.display().to_string()));
            }
            Ok(())
        }
        Err(e) => Err(SnapshotError::io("create directory", dir)(e)),
    }
}

fn write_all(
    m: &Machine,
    params: &SnapshotParams,
    vcpus: Vec<migration::VcpuState>,
    written: &mut Written,
    progress: &Mutex<SnapshotInfo>,
) -> Result<(), SnapshotError> {
    let dir = &params.dir;
    // The disks are drained: make what the guest wrote durable before it is copied or referred to.
    for d in &m.disks {
        let disk = d.block.lock().expect("Poisoned lock").disk().clone();
        disk.flush().map_err(SnapshotError::io("flush disk", &d.config.path))?;
    }
    let (serial, nets) = save_devices(m);
    let machine =
        MachineState { version: STATE_VERSION, vm: save_vm_state(&m.vm)?, vcpus, serial, nets, disks: save_disks(m) };

    let (memory, memory_data) = write_memory(m, &dir.join(MEMORY), written)?;
    let memory_len = memory.table.len;
    {
        let mut p = progress.lock().expect("Poisoned lock");
        p.memory_bytes = memory_len;
        p.memory_data_bytes = memory_data;
    }

    let mut disks = Vec::with_capacity(m.disks.len());
    let mut disk_files = Vec::with_capacity(m.disks.len());
    for (i, d) in m.disks.iter().enumerate() {
        let disk = d.block.lock().expect("Poisoned lock").disk().clone();
        let state = disk.state().clone();
        if params.with_disks && !state.shared {
            let path = dir.join(disk_file(i));
            let (table, bytes) = copy_disk(&disk, &path, written)?;
            progress.lock().expect("Poisoned lock").disk_data_bytes += bytes;
            disk_files.push(Some(FileEntry { file: disk_file(i), size: table.len, crc64: None }));
            disks.push(DiskSnapshot { state, copy: Some(table) });
        } else {
            disk_files.push(None);
            disks.push(DiskSnapshot { state, copy: None });
        }
    }

    let state = SnapshotState { config: m.config.clone(), machine, memory, disks };
    let payload = serde_json::to_vec(&state).map_err(|e| SnapshotError::Other(format!("encoding the state: {e}")))?;
    let bytes = encode_state(&payload);
    let state_crc = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap_or_default());
    write_new(&dir.join(STATE), &bytes, written)?;

    let manifest = Manifest {
        format: FORMAT.into(),
        version: SNAPSHOT_VERSION,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        created_at_us: migration::protocol::unix_now_us(),
        state: FileEntry { file: STATE.into(), size: bytes.len() as u64, crc64: Some(state_crc) },
        memory: FileEntry { file: MEMORY.into(), size: memory_len, crc64: None },
        mem_mib: m.config.mem_mib,
        memory_data_bytes: memory_data,
        disk_files,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::Other(e.to_string()))?;
    // Last, and atomically: a directory with a manifest is a complete snapshot.
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    write_new(&tmp, &json, written)?;
    let fin = dir.join(MANIFEST);
    std::fs::rename(&tmp, &fin).map_err(SnapshotError::io("rename", &tmp))?;
    written.files.push(fin);
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(SnapshotError::io("sync directory", dir))?;
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], written: &mut Written) -> Result<(), SnapshotError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(SnapshotError::io("create", path))?;
    written.files.push(path.to_path_buf());
    f.write_all(bytes).map_err(SnapshotError::io("write", path))?;
    f.sync_data().map_err(SnapshotError::io("sync", path))
}

/// Writes guest memory, the regions one after the other, reading only the pages the guest ever
/// touched. Returns the memory's description and the bytes written as data.
fn write_memory(m: &Machine, path: &Path, written: &mut Written) -> Result<(MemorySnapshot, u64), SnapshotError> {
    let mem = m.vm.memory();
    let regions: Vec<RegionLayout> =
        mem.iter().map(|r| RegionLayout { start: r.start_addr().raw_value(), size: r.len() }).collect();
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let touched = dirty::touched(&m.vm);
    let mut w = SparseWriter::create(path, total, MEMORY_CHUNK)?;
    written.files.push(path.to_path_buf());
    let pages_per_chunk = MEMORY_CHUNK / PAGE;
    let mut buf = vec![0u8; MEMORY_CHUNK as usize];
    let mut first_chunk = 0;
    for (r, map) in regions.iter().zip(&touched) {
        if r.size % MEMORY_CHUNK != 0 {
            return Err(SnapshotError::Other(format!(
                "memory region at {:#x} is not a whole number of {MEMORY_CHUNK}-byte chunks",
                r.start
            )));
        }
        let is_touched = |p: u64| map.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0);
        for c in 0..r.size / MEMORY_CHUNK {
            let pages = c * pages_per_chunk..(c + 1) * pages_per_chunk;
            if !pages.clone().any(is_touched) {
                continue;
            }
            buf.fill(0);
            for p in pages.filter(|&p| is_touched(p)) {
                let at = ((p - c * pages_per_chunk) * PAGE) as usize;
                mem.read_slice(&mut buf[at..at + PAGE as usize], GuestAddress(r.start + p * PAGE))
                    .map_err(|e| SnapshotError::Other(format!("reading guest page {:#x}: {e}", r.start + p * PAGE)))?;
            }
            w.put(first_chunk + c, &buf)?;
        }
        first_chunk += r.size / MEMORY_CHUNK;
    }
    let bytes = w.data_bytes;
    let table = w.finish()?;
    Ok((MemorySnapshot { regions, table }, bytes))
}

/// Copies a (paused, flushed) disk's allocated extents into a new sparse file.
fn copy_disk(
    disk: &block::Disk,
    path: &Path,
    written: &mut Written,
) -> Result<(migration::snapshot::ChunkTable, u64), SnapshotError> {
    let size = disk.size();
    let src = disk.state().path.clone();
    let mut w = SparseWriter::create(path, size, DISK_CHUNK)?;
    written.files.push(path.to_path_buf());
    let extents = disk.allocated_extents().map_err(SnapshotError::io("find the allocated extents of", &src))?;
    let mut buf = vec![0u8; DISK_CHUNK as usize];
    let mut last = None;
    for (off, len) in extents {
        if len == 0 {
            continue;
        }
        for c in off / DISK_CHUNK..=(off + len - 1) / DISK_CHUNK {
            if last.is_some_and(|l| c <= l) {
                continue;
            }
            last = Some(c);
            let n = DISK_CHUNK.min(size - c * DISK_CHUNK) as usize;
            disk.read_at(&mut buf[..n], c * DISK_CHUNK).map_err(SnapshotError::io("read disk", &src))?;
            w.put(c, &buf[..n])?;
        }
    }
    let bytes = w.data_bytes;
    Ok((w.finish()?, bytes))
}
