// SPDX-License-Identifier: Apache-2.0
//! The two monitors under test, driven the same way: start a guest (or a migration
//! destination), wait for it, migrate it, and read back what the monitor reports.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use vmm_tests::Netns;
use vmm_tests::vm::{Vm, api_sock_path};

use crate::qmp::Qmp;

mod moves;
pub use moves::{MigrationResult, Outcome, Plan};

/// The downtime limit both monitors get (QEMU's own default is 300 ms).
pub const DOWNTIME_LIMIT_MS: u64 = 50;
/// Bandwidth cap for QEMU (bytes/s): high enough never to be the limit here. Ours has none.
const QEMU_MAX_BANDWIDTH: u64 = 100 << 30;
/// The QEMU binary (Debian's `qemu-system-x86`).
pub const QEMU: &str = "qemu-system-x86_64";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Monitor {
    #[serde(rename = "vmm")]
    Ours,
    #[serde(rename = "qemu")]
    Qemu,
}

impl Monitor {
    pub const BOTH: [Monitor; 2] = [Monitor::Ours, Monitor::Qemu];

    pub fn name(self) -> &'static str {
        match self {
            Monitor::Ours => "vmm",
            Monitor::Qemu => "QEMU",
        }
    }

    /// Both monitors, in an order that alternates with `run` so slow drift of the machine
    /// hits both equally.
    pub fn alternating(run: usize) -> [Monitor; 2] {
        if run % 2 == 0 { [Monitor::Ours, Monitor::Qemu] } else { [Monitor::Qemu, Monitor::Ours] }
    }
}

/// A guest kernel to run and how: our guest, or Linux with its initramfs.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The start of every command line (console, power off).
    pub cmdline: String,
    /// Prefix of the result sections (empty for our guest).
    pub section: &'static str,
}

impl GuestImage {
    /// A section name for this guest.
    pub fn section(&self, name: &str) -> String {
        format!("{}{name}", self.section)
    }
}

/// A guest to boot.
pub struct GuestSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// TAP device and MAC address.
    pub net: Option<(&'a str, &'a str)>,
    /// A raw disk image (virtio-blk). A destination's: ours creates it (it must not exist),
    /// QEMU's must exist with the source's size.
    pub disk: Option<&'a Path>,
}

/// How a migration connection is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Mutual TLS with this host's identity (a TLS directory of the test PKI; QEMU gets the
    /// same certificates as `tls-creds-x509`).
    Tls(PathBuf),
    Plaintext,
}

impl Wire {
    pub fn is_tls(&self) -> bool {
        matches!(self, Wire::Tls(_))
    }
}

/// A running monitor process.
pub struct Running {
    pub vm: Vm,
    pub monitor: Monitor,
    qmp: Option<PathBuf>,
    /// A QEMU destination's QMP connection, open before the migration so that it hears the
    /// guest resume.
    events: RefCell<Option<Qmp>>,
    /// How this monitor migrates (`None`: it does not).
    wire: Option<Wire>,
    /// A QEMU destination's address (`-incoming defer`, started once TLS is set).
    incoming: Option<String>,
    /// The guest has a disk that a migration copies (QEMU: block migration).
    copy_disks: bool,
}

/// QEMU's `tls-creds-x509` directory made from a TLS directory of ours: the same CA, and this
/// host's certificate and key for both ends.
fn qemu_creds(dir: &Path) -> Result<PathBuf, String> {
    let out = dir.join("qemu");
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (from, to) in [
        ("ca.pem", "ca-cert.pem"),
        ("cert.pem", "server-cert.pem"),
        ("key.pem", "server-key.pem"),
        ("cert.pem", "client-cert.pem"),
        ("key.pem", "client-key.pem"),
    ] {
        std::fs::copy(dir.join(from), out.join(to)).map_err(|e| format!("{to}: {e}"))?;
    }
    Ok(out)
}

impl Running {
    /// Boots `spec` (or, with `incoming`, waits for a migration on that address) in `netns`.
    pub fn start(monitor: Monitor, netns: Option<&Netns>, spec: &GuestSpec, incoming: Option<&str>) -> Running {
        Running::start_wire(monitor, netns, spec, incoming, None)
    }

    /// [`Running::start`] for a migration over `wire`.
    pub fn start_wire(
        monitor: Monitor,
        netns: Option<&Netns>,
        spec: &GuestSpec,
        incoming: Option<&str>,
        wire: Option<&Wire>,
    ) -> Running {
        let wire = wire.cloned();
        let copy_disks = spec.disk.is_some();
        match monitor {
            Monitor::Ours => {
                let sock = api_sock_path("bench");
                let mut args = vec!["run".to_string()];
                match incoming {
                    Some(addr) => args.extend(["--incoming".into(), addr.to_string()]),
                    None => {
                        args.extend(["--kernel".into(), spec.kernel.display().to_string()]);
                        if let Some(i) = spec.initrd {
                            args.extend(["--initrd".into(), i.display().to_string()]);
                        }
                        args.extend(["--cmdline".into(), spec.cmdline.clone()]);
                        args.extend(["--mem-mib".into(), spec.mem_mib.to_string()]);
                        args.extend(["--vcpus".into(), spec.vcpus.to_string()]);
                    }
                }
                if let Some(disk) = spec.disk {
                    args.extend(["--disk".into(), format!("path={}", disk.display())]);
                }
                if let Some((tap, mac)) = spec.net {
                    // A destination takes the MAC from the migrated state.
                    let net = if incoming.is_some() { format!("tap={tap}") } else { format!("tap={tap},mac={mac}") };
                    args.extend(["--net".into(), net]);
                }
                args.extend(["--api-sock".into(), sock.display().to_string()]);
                match &wire {
                    Some(Wire::Tls(dir)) => args.extend(["--tls-dir".into(), dir.display().to_string()]),
                    Some(Wire::Plaintext) => args.push("--insecure-plaintext".into()),
                    None => {}
                }
                let vm = Vm::start(netns, &args);
                Running { vm, monitor, qmp: None, events: RefCell::new(None), wire, incoming: None, copy_disks }
            }
            Monitor::Qemu => {
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let qmp = std::env::temp_dir().join(format!("vmm-bench-qmp-{}-{n}.sock", std::process::id()));
                let _ = std::fs::remove_file(&qmp);
                let mut args = qemu_args(spec);
                args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
                if let Some(Wire::Tls(dir)) = &wire {
                    let endpoint = if incoming.is_some() { "server" } else { "client" };
                    // A failure here shows as QEMU's own error when it starts.
                    let creds = qemu_creds(dir).unwrap_or_else(|e| dir.join(format!("qemu-creds-failed: {e}")));
                    args.extend([
                        "-object".into(),
                        format!("tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on", creds.display()),
                    ]);
                }
                match (incoming, &wire) {
                    // TLS must be set before the destination listens: start it through QMP.
                    (Some(_), Some(Wire::Tls(_))) => args.extend(["-incoming".into(), "defer".into()]),
                    (Some(addr), _) => args.extend(["-incoming".into(), format!("tcp:{addr}")]),
                    (None, _) => {}
                }
                let vm = Vm::start_program(netns, Path::new(QEMU), &args);
                let incoming = incoming.map(str::to_string);
                Running { vm, monitor, qmp: Some(qmp), events: RefCell::new(None), wire, incoming, copy_disks }
            }
        }
    }

    /// Waits for the guest's ready line; returns the time from process start to that line.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, String> {
        self.wait_console(timeout, |l| l.starts_with(guest_common::READY_PREFIX))
    }

    /// Waits for a console line; returns the time from process start to that line.
    pub fn wait_console(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<Duration, String> {
        match self.vm.console.wait_line_at(timeout, pred) {
            Some((at, _)) => Ok(at.duration_since(self.vm.started)),
            None => {
                Err(format!("{}: the expected console line did not come\n{}", self.monitor.name(), self.vm.describe()))
            }
        }
    }

    /// Waits until a destination is ready to receive.
    pub fn wait_incoming(&self, timeout: Duration) -> Result<(), String> {
        self.wait_incoming_for(timeout, false)
    }

    /// [`Running::wait_incoming`] for a migration that may switch to post-copy (QEMU's
    /// destination needs the `postcopy-ram` capability before the migration starts).
    pub fn wait_incoming_for(&self, timeout: Duration, postcopy: bool) -> Result<(), String> {
        match self.monitor {
            Monitor::Ours => self
                .vm
                .log
                .wait_line(timeout, |l| l.contains("waiting for an incoming migration"))
                .map(drop)
                .ok_or_else(|| format!("the destination did not start\n{}", self.vm.describe())),
            // QMP answers once QEMU's main loop runs, and it listens for the migration before
            // (with TLS, once told to, after the credentials are set).
            Monitor::Qemu => {
                let mut qmp = self.qmp(timeout)?;
                if postcopy {
                    let cap = json!([{ "capability": "postcopy-ram", "state": true }]);
                    qmp.execute("migrate-set-capabilities", json!({ "capabilities": cap }))?;
                }
                if let (Some(Wire::Tls(_)), Some(addr)) = (&self.wire, &self.incoming) {
                    qmp.execute("migrate-set-parameters", json!({ "tls-creds": "tls0" }))?;
                    qmp.execute("migrate-incoming", json!({ "uri": format!("tcp:{addr}") }))?;
                }
                *self.events.borrow_mut() = Some(qmp);
                Ok(())
            }
        }
    }

    fn qmp(&self, timeout: Duration) -> Result<Qmp, String> {
        let path = self.qmp.as_ref().ok_or("not QEMU")?;
        Qmp::connect(path, timeout).map_err(|e| format!("{e}\n{}", self.vm.describe()))
    }

    /// The process id (for its memory use).
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Waits for the process to end (a migration source does after the migration).
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        self.vm.wait_timeout(timeout).is_some()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.vm.kill();
        if let Some(q) = &self.qmp {
            let _ = std::fs::remove_file(q);
        }
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// QEMU's command line for `spec`: the microvm machine without ACPI, option ROMs or RTC (our
/// VMM has none of those either), KVM, the host CPU minus IA32_ARCH_CAPABILITIES (this nested
/// KVM refuses to set that MSR), a serial console on stdout, virtio-mmio in its modern (v2)
/// form and a TAP without vhost, as ours uses.
fn qemu_args(spec: &GuestSpec) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-global",
        "virtio-mmio.force-legacy=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-m".into(), spec.mem_mib.to_string()]);
    a.extend(["-smp".into(), spec.vcpus.to_string()]);
    a.extend(["-kernel".into(), spec.kernel.display().to_string()]);
    if let Some(i) = spec.initrd {
        a.extend(["-initrd".into(), i.display().to_string()]);
    }
    a.extend(["-append".into(), spec.cmdline.clone()]);
    if let Some((tap, mac)) = spec.net {
        a.extend(["-netdev".into(), format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off")]);
        a.extend(["-device".into(), format!("virtio-net-device,netdev=n0,mac={mac}")]);
    }
    if let Some(disk) = spec.disk {
        // Buffered I/O with flushes honoured (QEMU's default cache mode), as ours does.
        a.extend(["-drive".into(), format!("file={},if=none,format=raw,id=d0", disk.display())]);
        a.extend(["-device".into(), "virtio-blk-device,drive=d0".into()]);
    }
    a
}
