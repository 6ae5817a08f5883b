// SPDX-License-Identifier: Apache-2.0
//! The `vmm` binary's command line, as clap types (a module of `main.rs`, not of the library).

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vmm::arch::cpuid::CpuTemplate;
use vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB};
use vmm::disk_config::DiskConfig;
use vmm::jail::{JailDir, JailUser};
use vmm::net_config::NetConfig;
use vmm::seccomp::SeccompMode;
use vmm::transport::{self, LinkConfig, Security, pki};

#[derive(Parser)]
#[command(name = "vmm", version, about = "A KVM micro-VM monitor built for live migration")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Boot a guest kernel and run it until it powers off.
    Run(RunArgs),
    /// Measure what this host's KVM runs natively, emulates or cannot run, at CPL 3 and CPL 0.
    Probe,
    /// Show the state and configuration of a running VM.
    Status(StatusArgs),
    /// Pause a running VM's vCPUs.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Ask the guest to power off; the VMM exits when it has.
    Stop(ApiArgs),
    /// Live-migrate a running VM to a `vmm run --incoming` on another host, and wait for the end.
    Migrate(MigrateArgs),
    /// Pause a VM and write a snapshot of it into a directory (`vmm run --restore` runs it
    /// again); wait for the end.
    Snapshot(SnapshotArgs),
    /// Run a snapshot in a VMM that waits for one (`vmm run --await-restore`); returns once the
    /// guest runs.
    Restore(RestoreArgs),
    /// Make the certificates of mutual TLS between hosts: a cluster CA and host identities.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// A host of a cluster: run its agent, drain it, undrain it (`vmm host --help`).
    #[command(disable_help_flag = true)]
    Host(ClusterArgs),
    /// The cluster's state: hosts, VMs, migrations in flight (`vmm cluster --help`).
    #[command(disable_help_flag = true)]
    Cluster(ClusterArgs),
    /// VMs placed on a cluster's hosts: create, list, stop, move (`vmm vm --help`).
    #[command(disable_help_flag = true)]
    Vm(ClusterArgs),
    /// The cluster's load balancer: one elected leader moves VMs to even load out
    /// (`vmm balancer --help`).
    #[command(disable_help_flag = true)]
    Balancer(ClusterArgs),
}

/// Everything after `vmm host|cluster|vm|balancer`, passed on to `vmm-cluster` as it is.
#[derive(clap::Args)]
pub(crate) struct ClusterArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    pub(crate) args: Vec<OsString>,
}

#[derive(Subcommand)]
pub(crate) enum TlsCommand {
    /// Write a new cluster CA and a first host identity into DIR: ca.pem, ca-key.pem, cert.pem,
    /// key.pem (private keys mode 0600; existing files are never overwritten).
    Init {
        /// The directory (created, mode 0700, if missing).
        dir: PathBuf,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Write another host's identity into OUT_DIR (ca.pem, cert.pem, key.pem; no CA key),
    /// signed by the CA in CA_DIR.
    Issue {
        /// A directory with ca.pem and ca-key.pem (made by `vmm tls init`).
        ca_dir: PathBuf,
        /// Where the new identity goes (created, mode 0700, if missing).
        out_dir: PathBuf,
        #[command(flatten)]
        host: HostArgs,
    },
}

#[derive(clap::Args)]
pub(crate) struct HostArgs {
    /// The host's DNS name [default for `init`: this machine's host name].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// An address sources dial this host at; repeatable.
    #[arg(long = "ip", value_name = "ADDR")]
    pub(crate) ips: Vec<IpAddr>,
    /// How long the host certificate is valid, in days.
    #[arg(long, default_value_t = pki::DEFAULT_DAYS, value_name = "N")]
    pub(crate) days: u32,
}

/// How a migration connection is secured (`vmm run`, `vmm migrate`).
#[derive(clap::Args)]
pub(crate) struct SecurityArgs {
    /// TLS directory (ca.pem, cert.pem, key.pem; see `vmm tls init`) for mutual TLS on migration
    /// connections.
    #[arg(long, value_name = "DIR", env = "VMM_TLS_DIR")]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Migrate without TLS: nothing is encrypted or authenticated. Both ends need it.
    #[arg(long)]
    pub(crate) insecure_plaintext: bool,
    /// A migration fails when its peer acknowledges nothing for this long (a dead link), in ms.
    #[arg(long, value_name = "MS", default_value_t = transport::link::DEFAULT_STALL_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(transport::link::MIN_STALL_TIMEOUT.as_millis() as u64..))]
    pub(crate) stall_timeout_ms: u64,
}

impl SecurityArgs {
    /// The security asked for: `None` when neither TLS nor plaintext was given.
    pub(crate) fn security(&self) -> Result<Option<Security>, Box<dyn std::error::Error>> {
        if self.insecure_plaintext {
            eprintln!("vmm: warning: {}", transport::PLAINTEXT_WARNING);
            return Ok(Some(Security::InsecurePlaintext));
        }
        Ok(match &self.tls_dir {
            Some(dir) => Some(Security::tls(dir)?),
            None => None,
        })
    }

    pub(crate) fn link(&self) -> LinkConfig {
        LinkConfig::with_stall_ms(self.stall_timeout_ms).unwrap_or_default()
    }
}

#[derive(clap::Args)]
pub(crate) struct SnapshotArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// The directory to write: new, or empty.
    #[arg(long, value_name = "DIR")]
    pub(crate) to: PathBuf,
    /// Resume the guest once the snapshot is written (by default it stays paused).
    #[arg(long)]
    pub(crate) resume: bool,
    /// Copy the guest's disks into the snapshot (by default it refers to them by path).
    #[arg(long)]
    pub(crate) with_disks: bool,
    /// Print the final state as JSON (the API's `GET /vm/snapshot` answer).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args)]
pub(crate) struct RestoreArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// The snapshot's directory (`vmm snapshot --to DIR`).
    #[arg(long, value_name = "DIR")]
    pub(crate) from: PathBuf,
    /// Print the answer as JSON (the API's `PUT /vm/restore` answer).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args)]
pub(crate) struct ApiArgs {
    /// The API socket of the VMM to talk to.
    #[arg(long, value_name = "PATH")]
    pub(crate) api_sock: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Print the VM's description as JSON (the API's `GET /vm` answer).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args)]
pub(crate) struct MigrateArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Where the destination VMM listens.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub(crate) to: String,
    /// Longest acceptable pause of the guest, in ms [VMM default: 50].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) downtime_ms: Option<u64>,
    /// Cap on the copy bandwidth, in MiB/s [VMM default: unlimited].
    #[arg(long, value_name = "MIB_S", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_bandwidth_mib_s: Option<u64>,
    /// Most pre-copy rounds before forcing convergence [VMM default: 30].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_rounds: Option<u32>,
    /// Switch to post-copy after the first pre-copy round: the guest moves at once and the
    /// pages it dirtied meanwhile follow while it runs on the destination.
    #[arg(long, conflicts_with = "postcopy_auto")]
    pub(crate) postcopy: bool,
    /// With --postcopy: pre-copy rounds before the switch [VMM default: 1]. 0 moves the guest
    /// at once and every page it touched follows (none is sent twice, but its memory is on two
    /// hosts for the whole transfer).
    #[arg(long, value_name = "N", requires = "postcopy")]
    pub(crate) precopy_rounds: Option<u32>,
    /// Switch to post-copy when pre-copy stops converging, instead of throttling the vCPUs.
    #[arg(long)]
    pub(crate) postcopy_auto: bool,
    /// Print the final migration state as JSON (the API's `GET /vm/migration` answer).
    #[arg(long)]
    pub(crate) json: bool,
    /// TLS directory on this host for this migration (default: the source VMM's own --tls-dir).
    #[arg(long, value_name = "DIR", env = "VMM_TLS_DIR")]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Migrate without TLS: nothing is encrypted or authenticated. The destination needs it too.
    #[arg(long)]
    pub(crate) insecure_plaintext: bool,
    /// The migration fails when the destination acknowledges nothing for this long, in ms
    /// [VMM default: 5000].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(transport::link::MIN_STALL_TIMEOUT.as_millis() as u64..))]
    pub(crate) stall_timeout_ms: Option<u64>,
}

fn parse_host_port(s: &str) -> Result<String, String> {
    if vmm::api::routes::is_host_port(s) {
        Ok(s.to_string())
    } else {
        Err(format!("expected HOST:PORT with a numeric port, got '{s}'"))
    }
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, required_unless_present_any = ["incoming", "incoming_fd", "restore", "await_restore"])]
    pub(crate) kernel: Option<PathBuf>,
    /// Instead of booting, wait on ADDR:PORT for a live migration and run the guest it brings
    /// (its memory, vCPUs and devices come from the source; only --net, --disk, --api-sock, the
    /// security and the announce options apply).
    #[arg(long, value_name = "ADDR:PORT", group = "incoming_from", group = "received",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template", "incoming_fd", "restore"])]
    pub(crate) incoming: Option<String>,
    /// Like --incoming, on an inherited TCP socket: a listening one, or one connection that
    /// someone else (a host agent) accepted (post-copy then needs --incoming-conns-fd).
    #[arg(long, value_name = "FD", group = "incoming_from", group = "received",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template", "restore"])]
    pub(crate) incoming_fd: Option<i32>,
    /// Instead of booting, run the VM of a snapshot (`vmm snapshot`) again; its memory is
    /// loaded as the guest touches it (only --net, --disk, --api-sock and the announce options
    /// apply).
    #[arg(long, value_name = "DIR", group = "received",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template"])]
    pub(crate) restore: Option<PathBuf>,
    /// Instead of booting, set up and sandbox now, then wait on the API socket for the snapshot
    /// to run (`vmm restore --from DIR`, `PUT /vm/restore`): the fastest start. Only --net (the
    /// TAPs the snapshot's NICs use), --disk, --api-sock, --seccomp and the announce options
    /// apply (with --jail, the snapshots must be in a --jail-dir).
    #[arg(long, group = "received", requires = "api_sock",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template", "restore",
                                "incoming", "incoming_fd"])]
    pub(crate) await_restore: bool,
    /// With --await-restore: map and register guest memory of this size ahead too, so that a
    /// snapshot of a guest of this size starts without that work (it grows with the size); a
    /// snapshot of another size gets memory of its own.
    #[arg(long, value_name = "MIB", requires = "await_restore")]
    pub(crate) await_mem_mib: Option<u64>,
    /// With --incoming-fd on a connection a host agent accepted: an inherited unix socket
    /// (file descriptor N) on which the agent hands over the migration's later connections, one
    /// descriptor per message (post-copy's fault connection and its reconnections).
    #[arg(long, value_name = "N", requires = "incoming_from", conflicts_with = "incoming")]
    pub(crate) incoming_conns_fd: Option<i32>,
    /// With --incoming or --incoming-fd: an inherited unix socket (file descriptor N) to the
    /// host agent, which must commit the migration in the cluster before `Prepare` is answered
    /// (see docs/migration-protocol.md).
    #[arg(long, value_name = "N", requires = "incoming_from")]
    pub(crate) commit_hook_fd: Option<i32>,
    #[command(flatten)]
    pub(crate) security: SecurityArgs,
    /// Serve the API (HTTP + JSON) on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub(crate) api_sock: Option<PathBuf>,
    /// After an incoming migration or a restore, do not announce the guest at all (neither when
    /// it pauses on the source nor after it resumes here: no RARP, gratuitous ARP, guest announce
    /// or TCP duplicate ACKs): for measuring what the announce is worth.
    #[arg(long, requires = "received")]
    pub(crate) no_announce: bool,
    /// Announce rounds after an incoming migration.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub(crate) announce_rounds: u32,
    /// Gap before the second announce round, in ms; each later gap grows by --announce-step-ms.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub(crate) announce_initial_ms: u64,
    /// Growth of the gap between announce rounds, in ms.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    pub(crate) announce_step_ms: u64,
    /// After an incoming migration or a restore, do not send duplicate ACKs on the guest's TCP
    /// flows (they make peers retransmit what was lost during the move at once): for measuring
    /// their worth.
    #[arg(long, requires = "received")]
    pub(crate) no_tcp_kick: bool,
    /// Initial ramdisk (cpio archive) for the guest.
    #[arg(long)]
    pub(crate) initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub(crate) cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    pub(crate) mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub(crate) vcpus: u8,
    /// CPU features shown to the guest: `host` (all KVM supports) or `baseline` (what KVM's
    /// instruction emulator handles; for Linux on paravirtual nested KVM).
    #[arg(long, value_enum, default_value_t = CpuTemplate::Host)]
    pub(crate) cpu_template: CpuTemplate,
    /// A virtio-net device on a TAP: `tap=NAME[,mac=MAC]`. Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub(crate) nets: Vec<NetConfig>,
    /// A virtio-blk device on a raw image file: `path=FILE[,ro][,shared]`. Repeatable. With
    /// --incoming: this host's file for each of the guest's disks (a new file for a copied disk;
    /// a shared disk's path defaults to the source's).
    #[arg(long = "disk", value_name = "path=FILE[,ro][,shared]", value_parser = parse_disk)]
    pub(crate) disks: Vec<DiskConfig>,
    /// seccomp filters on every thread: `true` (a call outside a thread's filter stops the VMM
    /// with SIGSYS), `false` (none), or `log` (allowed, and logged by the kernel: for finding
    /// what a filter misses).
    #[arg(long, value_enum, default_value = "true", value_name = "true|false|log")]
    pub(crate) seccomp: SeccompMode,
    /// The same as --seccomp false (for debugging).
    #[arg(long, conflicts_with = "seccomp")]
    pub(crate) no_seccomp: bool,
    /// Once /dev/kvm, the TAPs, the disks and the sockets are open, run as UID:GID with no
    /// capabilities, in a mount namespace of its own whose root is empty but for the
    /// --jail-dir directories (needs root).
    #[arg(long, value_name = "UID:GID")]
    pub(crate) jail: Option<JailUser>,
    /// With --jail: show this host directory inside the jail at the same path, read-only, or
    /// writable with `,rw` (for the jail's user as the directory's permissions allow): where the
    /// VMM reads snapshots to restore (--await-restore) or writes snapshots. Only DIR itself, not
    /// the mounts below it; no symbolic link in its path; a DIR with a comma in it needs `,ro`
    /// or `,rw`. Repeatable.
    #[arg(long = "jail-dir", value_name = "DIR[,rw]", requires = "jail")]
    pub(crate) jail_dirs: Vec<JailDir>,
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse()
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse()
}
