// SPDX-License-Identifier: Apache-2.0
//! `vmm run --restore DIR`: runs a snapshot's VM again.
//!
//! Everything that can be checked cheaply is checked before anything is built: the manifest
//! (format, version), the state file (size, magic, version, length limit, CRC-64, and the
//! manifest's record of that CRC), the state's own version, the memory layout against what this
//! VMM lays out, the chunk table against the memory file's size, this host's CPU against the
//! guest's CPUID, and the disks. Copied disks are copied into place (each chunk checked) before
//! the guest starts. Guest memory is not read up front: it is registered with a userfaultfd and
//! loaded chunk by chunk, each checked, on first touch and by a background loader (see
//! [`crate::uffd::file`]), so the time to a running guest does not depend on its memory size.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::kvm_cpuid_entry2;

use migration::snapshot::{
    MAX_MANIFEST_BYTES, MAX_STATE_BYTES, MEMORY_CHUNK, Manifest, STATE_HEADER_LEN, decode_state,
};

use super::sparse::copy_checked;
use super::{MANIFEST, MEMORY, STATE, SnapshotError, SnapshotState, disk_file};
use crate::arch::layout::ram_regions;
use crate::builder::{Foundation, build_vm_on};
use crate::config::VmConfig;
use crate::disk_config::DiskConfig;
use crate::host::HostResources;
use crate::migrate::cpu::check_against;
use crate::migrate::{check_cpuid, restore_machine};
use crate::net_config::NetConfig;
use crate::seccomp::ThreadKind;
use crate::uffd::file::{FileSource, LoadAhead, file_layout};
use crate::uffd::{GuestUffd, Handler, NewUffd, UffdStats};
use crate::vstate::vcpu::ExitReason;

/// "Not a vCPU" index for the end of a VM reported by its memory's page handler.
const MEMORY_HANDLER: u8 = u8::MAX - 1;

/// What `vmm run --restore` was given besides the directory.
pub struct RestoreOptions<'a> {
    /// This host's TAPs, NIC by NIC (none: the snapshot's).
    pub nets: &'a [NetConfig],
    /// This host's disk files, disk by disk (none: the snapshot's paths; a copied disk needs one).
    pub disks: &'a [DiskConfig],
    /// What this host's CPU can give a guest, if asked ahead ([`crate::migrate::cpu::host_cpuid`],
    /// a waiting VMM): the guest's features are then checked before any disk is copied, and
    /// [`start`] does not ask again. Otherwise they are checked on the new VM's first vCPU.
    pub host_cpuid: Option<&'a [kvm_cpuid_entry2]>,
}

/// A snapshot read and checked, ready to be built.
pub struct Checked {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: SnapshotState,
    memory: File,
}

/// Opens the snapshot file at `path`, which must be a regular file: without blocking, so that a
/// FIFO put in its place cannot hang the thread opening it (a waiting VMM's).
pub(super) fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(SnapshotError::io("open", path))?;
    if !f.metadata().map_err(SnapshotError::io("stat", path))?.is_file() {
        return Err(SnapshotError::Damaged(format!("{} is not a regular file", path.display())));
    }
    Ok(f)
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = open_regular(path)?;
    let len = f.metadata().map_err(SnapshotError::io("stat", path))?.len();
    if len > limit {
        return Err(SnapshotError::Damaged(format!(
            "{} is {len} bytes, more than the {limit} allowed",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(limit).read_to_end(&mut bytes).map_err(SnapshotError::io("read", path))?;
    Ok(bytes)
}

/// Reads and checks everything but the memory file's contents.
pub fn check(dir: &Path) -> Result<Checked, SnapshotError> {
    if !dir.is_dir() {
        return Err(SnapshotError::Other(format!("{} is not a snapshot directory", dir.display())));
    }
    let mpath = dir.join(MANIFEST);
    if !mpath.exists() {
        return Err(SnapshotError::Damaged(format!(
            "{} has no {MANIFEST}: not a snapshot, or one that was never finished",
            dir.display()
        )));
    }
    let manifest: Manifest = serde_json::from_slice(&read_limited(&mpath, MAX_MANIFEST_BYTES)?)
        .map_err(|e| SnapshotError::Damaged(format!("{}: {e}", mpath.display())))?;
    manifest.check()?;

    let spath = dir.join(STATE);
    let bytes = read_limited(&spath, MAX_STATE_BYTES + STATE_HEADER_LEN as u64 + 8)?;
    if bytes.len() as u64 != manifest.state.size {
        return Err(SnapshotError::Damaged(format!(
            "{} is {} bytes, the manifest says {}",
            spath.display(),
            bytes.len(),
            manifest.state.size
        )));
    }
    let payload = decode_state(&mut std::io::Cursor::new(&bytes), bytes.len() as u64)?;
    let trailer = bytes.len().checked_sub(8).map(|at| u64::from_le_bytes(bytes[at..].try_into().unwrap_or_default()));
    if manifest.state.crc64.is_some() && manifest.state.crc64 != trailer {
        return Err(SnapshotError::Damaged(format!(
            "{} is not the state file the manifest describes",
            spath.display()
        )));
    }
    let state: SnapshotState = serde_json::from_slice(&payload)
        .map_err(|e| SnapshotError::Damaged(format!("the state in {}: {e}", spath.display())))?;
    if !state.machine.version.compatible() {
        return Err(SnapshotError::Mismatch(format!(
            "machine state version {}.{} (this VMM reads {}.0 to {}.{})",
            state.machine.version.major,
            state.machine.version.minor,
            migration::STATE_VERSION.major,
            migration::STATE_VERSION.major,
            migration::STATE_VERSION.minor
        )));
    }

    let c = &state.config;
    crate::vstate::memory::check_mem_size(c.mem_mib).map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
    let expected = ram_regions(c.mem_mib << 20);
    let got: Vec<(u64, u64)> = state.memory.regions.iter().map(|r| (r.start, r.size)).collect();
    if expected != got {
        return Err(SnapshotError::Mismatch(format!(
            "memory layout {got:x?} is not what this VMM lays out for {} MiB ({expected:x?})",
            c.mem_mib
        )));
    }
    let total: u64 = got.iter().map(|r| r.1).sum();
    state.memory.table.validate(MEMORY_CHUNK, total)?;
    if state.machine.vcpus.len() != usize::from(c.vcpus) {
        return Err(SnapshotError::Damaged(format!("{} vCPU states for {} vCPUs", state.machine.vcpus.len(), c.vcpus)));
    }
    if state.disks.len() != c.disks.len() {
        return Err(SnapshotError::Damaged(format!(
            "{} disks described for {} configured",
            state.disks.len(),
            c.disks.len()
        )));
    }
    let mem_path = dir.join(MEMORY);
    let memory = open_regular(&mem_path)?;
    let mem_len = memory.metadata().map_err(SnapshotError::io("stat", &mem_path))?.len();
    if mem_len != total || manifest.memory.size != total {
        return Err(SnapshotError::Damaged(format!(
            "{} is {mem_len} bytes; the manifest says {}, the guest has {total}",
            mem_path.display(),
            manifest.memory.size
        )));
    }
    for (i, d) in state.disks.iter().enumerate() {
        if let Some(t) = &d.copy {
            t.validate(migration::snapshot::DISK_CHUNK, d.state.size)?;
            let p = dir.join(disk_file(i));
            let len = std::fs::metadata(&p).map_err(SnapshotError::io("stat", &p))?.len();
            if len != d.state.size {
                return Err(SnapshotError::Damaged(format!(
                    "{} is {len} bytes, the disk {}",
                    p.display(),
                    d.state.size
                )));
            }
        }
    }
    Ok(Checked { dir: dir.to_path_buf(), manifest, state, memory })
}

/// New disk files a restore created: removed unless the guest runs (the VMM thread's filter
/// allows removing files, for this and for a failed incoming migration's disks).
struct NewDisks {
    paths: Vec<PathBuf>,
    committed: bool,
}

impl NewDisks {
    fn new() -> NewDisks {
        NewDisks { paths: Vec::new(), committed: false }
    }
}

impl Drop for NewDisks {
    fn drop(&mut self) {
        if !self.committed {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// This host's configuration for the snapshot's VM: its TAPs, and its disks (copied ones are
/// copied into new files here, each chunk checked).
fn local_config(c: &Checked, opts: &RestoreOptions, new: &mut NewDisks) -> Result<VmConfig, SnapshotError> {
    let mut config = c.state.config.clone();
    if !opts.nets.is_empty() {
        if opts.nets.len() != config.nets.len() {
            return Err(SnapshotError::Mismatch(format!(
                "the guest has {} NIC(s), --net was given {} time(s)",
                config.nets.len(),
                opts.nets.len()
            )));
        }
        for (n, local) in config.nets.iter_mut().zip(opts.nets) {
            n.tap = local.tap.clone();
        }
    }
    let copied = c.state.disks.iter().filter(|d| d.copy.is_some()).count();
    if !opts.disks.is_empty() && opts.disks.len() != config.disks.len() {
        return Err(SnapshotError::Mismatch(format!(
            "the guest has {} disk(s), --disk was given {} time(s)",
            config.disks.len(),
            opts.disks.len()
        )));
    }
    if opts.disks.is_empty() && copied > 0 {
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot holds a copy of {copied} disk(s): give --disk path=FILE (a new file) for each of the \
             guest's {} disk(s)",
            config.disks.len()
        )));
    }
    for (i, (disk, snap)) in config.disks.iter_mut().zip(&c.state.disks).enumerate() {
        disk.read_only = snap.state.read_only;
        disk.shared = snap.state.shared;
        disk.path = opts.disks.get(i).map_or_else(|| snap.state.path.clone(), |l| l.path.clone());
        let Some(table) = &snap.copy else { continue };
        // A copy of the snapshot's disk, so that the snapshot stays as it is (and can be
        // restored again).
        let created = block::Disk::create(&disk.path, snap.state.size, false).map_err(|e| {
            SnapshotError::Other(format!("disk {i}: {e} (a disk copied in the snapshot needs a new file)"))
        })?;
        new.paths.push(disk.path.clone());
        copy_checked(&c.dir.join(disk_file(i)), table, |off, bytes| created.write_at(bytes, off))?;
        created.flush().map_err(SnapshotError::io("flush", &disk.path))?;
    }
    Ok(config)
}

/// A snapshot checked and this host's side of it set up: everything `vmm run --restore` must
/// open or create (the snapshot's files, copied disks, the userfaultfd) is, so the VMM can be
/// sandboxed before the VM is built.
pub struct Prepared {
    checked: Checked,
    /// The VM's configuration with this host's TAPs and disks.
    pub config: VmConfig,
    new_disks: NewDisks,
    uffd: NewUffd,
    started: Instant,
    /// The guest's CPU features were checked against this host's already.
    cpu_checked: bool,
}

/// Reads and checks the snapshot in `dir` and sets up this host's side of it.
pub fn prepare(dir: &Path, opts: &RestoreOptions) -> Result<Prepared, SnapshotError> {
    let started = Instant::now();
    let checked = check(dir)?;
    let mut new_disks = NewDisks::new();
    let config = local_config(&checked, opts, &mut new_disks)?;
    let uffd = NewUffd::create()?;
    log::debug!("restore: snapshot checked, disks ready at {} µs", started.elapsed().as_micros());
    Ok(Prepared { checked, config, new_disks, uffd, started, cpu_checked: false })
}

/// A snapshot's files read, checked and opened by a thread that may open files, for a
/// sandboxed VMM to build from ([`Prepared::from_files`]).
pub struct Opened {
    checked: Checked,
    /// The VM's configuration with this host's TAPs and disks.
    pub config: VmConfig,
    new_disks: NewDisks,
    /// The guest's disk images, by index, opened as `config` says.
    pub disks: Vec<block::Disk>,
    cpu_checked: bool,
}

/// Reads and checks the snapshot in `dir`, copies its copied disks into place and opens every
/// disk: all of a restore's file work, for the one thread of a sandboxed VMM that may do it.
/// `taps`: how many TAPs the VMM has for the guest's NICs, checked before any disk is copied,
/// as the guest's CPU features are with `opts.host_cpuid`. Should the restore fail, the disk
/// files it created are removed.
pub fn open_files(dir: &Path, opts: &RestoreOptions, taps: usize) -> Result<Opened, SnapshotError> {
    let checked = check(dir)?;
    let nics = checked.state.config.nets.len();
    if nics != taps {
        return Err(SnapshotError::Mismatch(format!(
            "the guest has {nics} NIC(s), this VMM was started with {taps} --net"
        )));
    }
    if let (Some(have), Some(v0)) = (opts.host_cpuid, checked.state.machine.vcpus.first()) {
        check_against(have, v0.cpuid.as_slice())?;
    }
    let mut new_disks = NewDisks::new();
    let config = local_config(&checked, opts, &mut new_disks)?;
    let disks = config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let err = |e: String| SnapshotError::Other(format!("disk {i} ({}): {e}", d.path.display()));
            // Not a FIFO or a device, whose opening could block this thread for good.
            if !std::fs::metadata(&d.path).is_ok_and(|m| m.is_file()) {
                return Err(err("not a regular file".to_string()));
            }
            block::Disk::open(&d.path, d.read_only, d.shared).map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Opened { checked, config, new_disks, disks, cpu_checked: opts.host_cpuid.is_some() })
}

impl Prepared {
    /// A restore from files opened elsewhere ([`open_files`]; take its `disks` first), with a
    /// userfaultfd opened before the sandbox, started at `started`.
    pub fn from_files(opened: Opened, uffd: NewUffd, started: Instant) -> Prepared {
        let Opened { checked, config, new_disks, disks: _, cpu_checked } = opened;
        Prepared { checked, config, new_disks, uffd, started, cpu_checked }
    }
}

/// A restored VM starting: see [`start`].
pub struct Started {
    pub vmm: crate::Vmm,
    /// When [`prepare`] began.
    pub at: Instant,
    /// The memory loader loads on demand only until this is released (or dropped): once the
    /// guest runs, so that filling memory ahead does not slow its start down.
    pub load_ahead: LoadAhead,
}

/// Builds, restores and starts the prepared snapshot's VM from `res` (see
/// [`HostResources::open_for_restore`]). The vCPUs are starting (the guest's first run is in
/// [`crate::vstate::vcpu::FirstRun`]). The devices stay paused: the caller resumes them
/// ([`crate::migrate::resume_devices`]) once its thread has its filter on, since resuming reads
/// the guest's queues.
pub fn start(
    prepared: Prepared,
    res: &mut HostResources,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Started, SnapshotError> {
    let Prepared { checked, config, mut new_disks, uffd, started: t0, cpu_checked } = prepared;
    let step = |what: &str| log::debug!("restore: {what} at {} µs", t0.elapsed().as_micros());
    // The loader first, before the VM exists, so that it has started (its thread and filter
    // take about half a millisecond here) and put in place the pages KVM touches in
    // `restore_machine` (see `pv_pages`) by the time this thread gets there.
    let foundation = Foundation::new(&config, res)?;
    let (handler, load_ahead) = start_loader(&foundation, &checked, uffd)?;
    step("memory registered");
    let built = build_vm_on(foundation, &config, res, console)?;
    step("machine built");
    // On the new VM's first vCPU, which has not run: no probe VM needed.
    if let (false, Some(v0), Some(vcpu)) = (cpu_checked, checked.state.machine.vcpus.first(), built.vcpus.first()) {
        let m = &built.machine;
        check_cpuid(&m.kvm, Some((vcpu.fd(), &m.supported_cpuid)), v0.cpuid.as_slice())?;
        step("CPU checked");
    }
    restore_machine(&built, &checked.state.machine)?;
    step("machine restored");
    *built.machine.lazy_memory.lock().expect("Poisoned lock") = Some(Arc::new(handler));
    let vmm = crate::Vmm::start(built)?;
    new_disks.committed = true;
    step("vCPUs started");
    Ok(Started { vmm, at: t0, load_ahead })
}

/// Guest pages that KVM itself writes as soon as the vCPUs' MSRs are restored (kvmclock) or
/// they run (steal time, async page faults, PV EOI): the addresses in the paravirtual MSRs the
/// guest enabled. Loaded first, the restore does not wait on a fault for them.
fn pv_pages(vcpus: &[migration::VcpuState]) -> Vec<u64> {
    const PV_MSRS: [u32; 5] = [0x4b56_4d01, 0x12, 0x4b56_4d03, 0x4b56_4d02, 0x4b56_4d04];
    vcpus
        .iter()
        .flat_map(|v| v.msrs.as_slice().iter())
        .filter(|m| PV_MSRS.contains(&m.index) && m.data & 1 != 0)
        .map(|m| m.data & !0xfff)
        .collect()
}

/// Registers the new machine's memory with `uffd` and starts the loader that fills it from the
/// snapshot's memory file, on demand until the returned [`LoadAhead`] is released.
fn start_loader(
    foundation: &Foundation,
    checked: &Checked,
    uffd: NewUffd,
) -> Result<(Handler, LoadAhead), SnapshotError> {
    let uffd = GuestUffd::register(uffd, &foundation.memory)?;
    let regions: Vec<(u64, u64)> = checked.state.memory.regions.iter().map(|r| (r.start, r.size)).collect();
    let stats = Arc::new(UffdStats::default());
    let file = checked.memory.try_clone().map_err(SnapshotError::io("open", &checked.dir.join(MEMORY)))?;
    let mut source = FileSource::new(
        file,
        checked.dir.join(MEMORY),
        checked.state.memory.table.clone(),
        file_layout(&regions),
        stats.clone(),
    )?;
    source.load_first(&pv_pages(&checked.state.machine.vcpus));
    let load_ahead = source.hold_back()?;
    let notifier = foundation.exits.notifier.clone();
    let handler = Handler::start(
        "mem-loader",
        ThreadKind::MemLoader,
        Arc::new(uffd),
        Box::new(source),
        stats,
        Box::new(move |msg| notifier.notify(MEMORY_HANDLER, ExitReason::Error(msg))),
    )?;
    Ok((handler, load_ahead))
}
