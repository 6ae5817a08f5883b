// SPDX-License-Identifier: Apache-2.0
//! Snapshots in tests and the benchmark: a temporary snapshot directory, `vmm snapshot` run as a
//! user would, and `vmm run --restore` started in a host of a test bed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmm::api::{RestoreInfo, SnapshotInfo};

use crate::TestBed;
use crate::moves::{dump, s};
use crate::vm::{Vm, api_sock_path, vmm_bin};

/// A snapshot is written within this, even on a loaded machine.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// A restored VMM says its guest runs within this.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// What `vmm run --restore` prints on stderr once the guest runs.
pub const RESTORED: &str = "the guest runs";
/// What `vmm run --await-restore` prints on stderr once it waits for a snapshot.
pub const WAITING: &str = "waiting for a snapshot to run";

/// A path for a snapshot directory (not created), removed with everything in it when dropped.
pub struct SnapDir(pub PathBuf);

impl SnapDir {
    pub fn new(tag: &str) -> SnapDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-snap-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        SnapDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for SnapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `vmm snapshot --api-sock SOCK --to DIR --json [extra]` and returns its figures, or its
/// stdout and stderr if it failed.
pub fn snapshot_cli(vm: &Vm, dir: &Path, extra: &[&str]) -> Result<SnapshotInfo, String> {
    let sock = vm.api_sock.clone().expect("the VM has an API socket");
    let mut child = Command::new(vmm_bin())
        .args(["snapshot", "--api-sock", sock.to_str().unwrap(), "--to", dir.to_str().unwrap(), "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start vmm snapshot: {e}"))?;
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`vmm snapshot` did not end within {} s", SNAPSHOT_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    let _ = child.stdout.take().map(|mut o| o.read_to_string(&mut out));
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    if !status.success() {
        return Err(format!("`vmm snapshot` failed ({status}):\n{out}\n{err}"));
    }
    serde_json::from_str(&out).map_err(|e| format!("`vmm snapshot --json` printed {out:?}: {e}"))
}

/// Starts `vmm run --restore DIR --api-sock ... --net tap=TAP [extra]` in host `host` and waits
/// until it says the guest runs. Returns the VMM and when that line came.
pub fn start_restore(bed: &TestBed, host: &str, dir: &Path, extra: &[&str]) -> (Vm, Instant) {
    let vm = spawn_restore(bed, host, dir, extra);
    let line = vm.log.wait_line_at(RESTORE_TIMEOUT, |l| l.contains(RESTORED) || l.contains("error"));
    match line {
        Some((at, l)) if l.contains(RESTORED) => (vm, at),
        other => panic!("the restore did not start the guest: {other:?}{}", dump(&[("restored", &vm)])),
    }
}

/// Starts `vmm run --restore` in host `host` without waiting.
pub fn spawn_restore(bed: &TestBed, host: &str, dir: &Path, extra: &[&str]) -> Vm {
    Vm::start(Some(bed.host(host)), &restore_args(bed, host, dir, extra))
}

/// `run --restore DIR --api-sock ... --net tap=TAP [extra]` for host `host` of `bed`.
pub fn restore_args(bed: &TestBed, host: &str, dir: &Path, extra: &[&str]) -> Vec<String> {
    let sock = api_sock_path(&format!("restore-{host}"));
    let mut args = s(&["run", "--restore", &dir.display().to_string(), "--api-sock", &sock.display().to_string()]);
    args.extend(["--net".to_string(), format!("tap={}", bed.host(host).tap())]);
    args.extend(s(extra));
    args
}

/// Starts `vmm run --await-restore --api-sock ... [extra]` in host `host` and waits until it
/// says it waits for a snapshot.
pub fn start_waiting(bed: &TestBed, host: &str, extra: &[&str]) -> Vm {
    let vm = Vm::start(Some(bed.host(host)), &waiting_args(host, extra));
    if let Err(e) = wait_until_waiting(&vm) {
        panic!("{e}{}", dump(&[("waiting", &vm)]));
    }
    vm
}

/// `run --await-restore --api-sock ... [extra]` for host `host`.
pub fn waiting_args(host: &str, extra: &[&str]) -> Vec<String> {
    let sock = api_sock_path(&format!("waiting-{host}"));
    let mut args = s(&["run", "--await-restore", "--api-sock", &sock.display().to_string()]);
    args.extend(s(extra));
    args
}

/// Waits until `vm` (`vmm run --await-restore`) says it waits for a snapshot.
pub fn wait_until_waiting(vm: &Vm) -> Result<(), String> {
    match vm.log.wait_line(RESTORE_TIMEOUT, |l| l.contains(WAITING) || l.contains("error")) {
        Some(l) if l.contains(WAITING) => Ok(()),
        other => Err(format!("the VMM does not wait for a snapshot: {other:?}")),
    }
}

/// Runs `vmm restore --api-sock SOCK --from DIR --json` against `vm` (a waiting VMM) and
/// returns its answer, or its output if it failed.
pub fn restore_cli(vm: &Vm, dir: &Path) -> Result<RestoreInfo, String> {
    let sock = vm.api_sock.clone().expect("the VM has an API socket");
    let out = Command::new(vmm_bin())
        .args(["restore", "--api-sock", &sock.display().to_string(), "--from", &dir.display().to_string(), "--json"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("start vmm restore: {e}"))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("`vmm restore` failed ({}):\n{stdout}\n{stderr}", out.status));
    }
    serde_json::from_str(&stdout).map_err(|e| format!("`vmm restore --json` printed {stdout:?}: {e}"))
}
