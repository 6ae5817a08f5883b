// SPDX-License-Identifier: Apache-2.0
//! The `vmm` command line.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use clap::{Parser, Subcommand};
use net::announce::AnnounceSchedule;
use vmm::api::client::{ApiClient, ClientError};
use vmm::api::display;
use vmm::api::server::{ApiServerOptions, bind_api_socket};
use vmm::api::{MigrateRequest, MigrationMode, MigrationPhase, SnapshotPhase, SnapshotRequest};
use vmm::arch::cpuid::CpuTemplate;
use vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB};
use vmm::disk_config::DiskConfig;
use vmm::host::HostResources;
use vmm::jail::JailUser;
use vmm::migrate::params::MigrationDefaults;
use vmm::migrate::receive::{IncomingConfig, IncomingFrom};
use vmm::net_config::NetConfig;
use vmm::seccomp::{SeccompMode, ThreadKind};
use vmm::transport::{self, LinkConfig, Security, pki};
use vmm::{ExitReason, VmConfig, Vmm};

/// The binary next to `vmm` that serves `vmm host|cluster|vm ...`, git style: the cluster
/// layer builds on this crate, so it cannot live in it.
const CLUSTER_BIN: &str = "vmm-cluster";

#[derive(Parser)]
#[command(name = "vmm", version, about = "A KVM micro-VM monitor built for live migration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
struct ClusterArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

#[derive(Subcommand)]
enum TlsCommand {
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
struct HostArgs {
    /// The host's DNS name [default for `init`: this machine's host name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// An address sources dial this host at; repeatable.
    #[arg(long = "ip", value_name = "ADDR")]
    ips: Vec<IpAddr>,
    /// How long the host certificate is valid, in days.
    #[arg(long, default_value_t = pki::DEFAULT_DAYS, value_name = "N")]
    days: u32,
}

/// How a migration connection is secured (`vmm run`, `vmm migrate`).
#[derive(clap::Args)]
struct SecurityArgs {
    /// TLS directory (ca.pem, cert.pem, key.pem; see `vmm tls init`) for mutual TLS on migration
    /// connections.
    #[arg(long, value_name = "DIR", env = "VMM_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Migrate without TLS: nothing is encrypted or authenticated. Both ends need it.
    #[arg(long)]
    insecure_plaintext: bool,
    /// A migration fails when its peer acknowledges nothing for this long (a dead link), in ms.
    #[arg(long, value_name = "MS", default_value_t = transport::link::DEFAULT_STALL_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(transport::link::MIN_STALL_TIMEOUT.as_millis() as u64..))]
    stall_timeout_ms: u64,
}

impl SecurityArgs {
    /// The security asked for: `None` when neither TLS nor plaintext was given.
    fn security(&self) -> Result<Option<Security>, Box<dyn std::error::Error>> {
        if self.insecure_plaintext {
            eprintln!("vmm: warning: {}", transport::PLAINTEXT_WARNING);
            return Ok(Some(Security::InsecurePlaintext));
        }
        Ok(match &self.tls_dir {
            Some(dir) => Some(Security::tls(dir)?),
            None => None,
        })
    }

    fn link(&self) -> LinkConfig {
        LinkConfig::with_stall_ms(self.stall_timeout_ms).unwrap_or_default()
    }
}

#[derive(clap::Args)]
struct SnapshotArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The directory to write: new, or empty.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Resume the guest once the snapshot is written (by default it stays paused).
    #[arg(long)]
    resume: bool,
    /// Copy the guest's disks into the snapshot (by default it refers to them by path).
    #[arg(long)]
    with_disks: bool,
    /// Print the final state as JSON (the API's `GET /vm/snapshot` answer).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ApiArgs {
    /// The API socket of the VMM to talk to.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Print the VM's description as JSON (the API's `GET /vm` answer).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Where the destination VMM listens.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    to: String,
    /// Longest acceptable pause of the guest, in ms [VMM default: 50].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    downtime_ms: Option<u64>,
    /// Cap on the copy bandwidth, in MiB/s [VMM default: unlimited].
    #[arg(long, value_name = "MIB_S", value_parser = clap::value_parser!(u64).range(1..))]
    max_bandwidth_mib_s: Option<u64>,
    /// Most pre-copy rounds before forcing convergence [VMM default: 30].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_rounds: Option<u32>,
    /// Switch to post-copy after the first pre-copy round: the guest moves at once and the
    /// pages it dirtied meanwhile follow while it runs on the destination.
    #[arg(long, conflicts_with = "postcopy_auto")]
    postcopy: bool,
    /// With --postcopy: pre-copy rounds before the switch [VMM default: 1]. 0 moves the guest
    /// at once and every page it touched follows (none is sent twice, but its memory is on two
    /// hosts for the whole transfer).
    #[arg(long, value_name = "N", requires = "postcopy")]
    precopy_rounds: Option<u32>,
    /// Switch to post-copy when pre-copy stops converging, instead of throttling the vCPUs.
    #[arg(long)]
    postcopy_auto: bool,
    /// Print the final migration state as JSON (the API's `GET /vm/migration` answer).
    #[arg(long)]
    json: bool,
    /// TLS directory on this host for this migration (default: the source VMM's own --tls-dir).
    #[arg(long, value_name = "DIR", env = "VMM_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Migrate without TLS: nothing is encrypted or authenticated. The destination needs it too.
    #[arg(long)]
    insecure_plaintext: bool,
    /// The migration fails when the destination acknowledges nothing for this long, in ms
    /// [VMM default: 5000].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(transport::link::MIN_STALL_TIMEOUT.as_millis() as u64..))]
    stall_timeout_ms: Option<u64>,
}

fn parse_host_port(s: &str) -> Result<String, String> {
    if vmm::api::routes::is_host_port(s) {
        Ok(s.to_string())
    } else {
        Err(format!("expected HOST:PORT with a numeric port, got '{s}'"))
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, required_unless_present_any = ["incoming", "incoming_fd", "restore"])]
    kernel: Option<PathBuf>,
    /// Instead of booting, wait on ADDR:PORT for a live migration and run the guest it brings
    /// (its memory, vCPUs and devices come from the source; only --net, --disk, --api-sock, the
    /// security and the announce options apply).
    #[arg(long, value_name = "ADDR:PORT", group = "incoming_from", group = "received",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template", "incoming_fd", "restore"])]
    incoming: Option<String>,
    /// Like --incoming, on an inherited TCP socket: a listening one, or one connection that
    /// someone else (a host agent) accepted (post-copy needs a listening one).
    #[arg(long, value_name = "FD", group = "incoming_from", group = "received",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template", "restore"])]
    incoming_fd: Option<i32>,
    /// Instead of booting, run the VM of a snapshot (`vmm snapshot`) again; its memory is
    /// loaded as the guest touches it (only --net, --disk, --api-sock and the announce options
    /// apply).
    #[arg(long, value_name = "DIR", group = "received",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "cpu_template"])]
    restore: Option<PathBuf>,
    /// With --incoming or --incoming-fd: an inherited unix socket (file descriptor N) to the
    /// host agent, which must commit the migration in the cluster before `Prepare` is answered
    /// (see docs/migration-protocol.md).
    #[arg(long, value_name = "N", requires = "incoming_from")]
    commit_hook_fd: Option<i32>,
    #[command(flatten)]
    security: SecurityArgs,
    /// Serve the API (HTTP + JSON) on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// After an incoming migration or a restore, do not announce the guest at all (neither when
    /// it pauses on the source nor after it resumes here: no RARP, gratuitous ARP, guest announce
    /// or TCP duplicate ACKs): for measuring what the announce is worth.
    #[arg(long, requires = "received")]
    no_announce: bool,
    /// Announce rounds after an incoming migration.
    #[arg(long, default_value_t = 5, value_name = "N")]
    announce_rounds: u32,
    /// Gap before the second announce round, in ms; each later gap grows by --announce-step-ms.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    announce_initial_ms: u64,
    /// Growth of the gap between announce rounds, in ms.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    announce_step_ms: u64,
    /// After an incoming migration or a restore, do not send duplicate ACKs on the guest's TCP
    /// flows (they make peers retransmit what was lost during the move at once): for measuring
    /// their worth.
    #[arg(long, requires = "received")]
    no_tcp_kick: bool,
    /// Initial ramdisk (cpio archive) for the guest.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// CPU features shown to the guest: `host` (all KVM supports) or `baseline` (what KVM's
    /// instruction emulator handles; for Linux on paravirtual nested KVM).
    #[arg(long, value_enum, default_value_t = CpuTemplate::Host)]
    cpu_template: CpuTemplate,
    /// A virtio-net device on a TAP: `tap=NAME[,mac=MAC]`. Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A virtio-blk device on a raw image file: `path=FILE[,ro][,shared]`. Repeatable. With
    /// --incoming: this host's file for each of the guest's disks (a new file for a copied disk;
    /// a shared disk's path defaults to the source's).
    #[arg(long = "disk", value_name = "path=FILE[,ro][,shared]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// seccomp filters on every thread: `true` (a call outside a thread's filter stops the VMM
    /// with SIGSYS), `false` (none), or `log` (allowed, and logged by the kernel: for finding
    /// what a filter misses).
    #[arg(long, value_enum, default_value = "true", value_name = "true|false|log")]
    seccomp: SeccompMode,
    /// The same as --seccomp false (for debugging).
    #[arg(long, conflicts_with = "seccomp")]
    no_seccomp: bool,
    /// Once /dev/kvm, the TAPs, the disks and the sockets are open, run as UID:GID with no
    /// capabilities, in a mount namespace of its own with an empty root (needs root).
    #[arg(long, value_name = "UID:GID")]
    jail: Option<JailUser>,
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse()
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse()
}

fn main() -> ExitCode {
    // Logs go to stderr (stdout is the guest's console); `VMM_LOG=debug` for more.
    vmm::logging::init("vmm", "warn");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Probe => probe(),
        Command::Status(args) => status(args),
        Command::Pause(args) => api_call(args, ApiClient::pause),
        Command::Resume(args) => api_call(args, ApiClient::resume),
        Command::Stop(args) => api_call(args, ApiClient::shutdown),
        Command::Migrate(args) => migrate(args),
        Command::Snapshot(args) => snapshot(args),
        Command::Tls(cmd) => tls(cmd),
        Command::Host(a) => cluster("host", a),
        Command::Cluster(a) => cluster("cluster", a),
        Command::Vm(a) => cluster("vm", a),
        Command::Balancer(a) => cluster("balancer", a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let seccomp = if args.no_seccomp { SeccompMode::Off } else { args.seccomp };
    // Set-up: everything the VM uses of the host is opened now, before the VMM is sandboxed.
    // The API socket first: a path in use is an error before anything else happens.
    let api_socket = args.api_sock.as_deref().map(bind_api_socket).transpose()?;
    let config = VmConfig {
        kernel: args.kernel.clone().unwrap_or_default(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        cpu_template: args.cpu_template,
        nets: args.nets.clone(),
        disks: args.disks.clone(),
    };
    // The TLS identity is read now too, before the sandbox.
    let security = args.security.security()?;
    let link = args.security.link();
    let incoming_at = args.incoming.is_some() || args.incoming_fd.is_some();
    if incoming_at && security.is_none() {
        return Err(NO_IDENTITY.into());
    }
    // Taken over now, before the sandbox: checking it asks the kernel about the socket.
    let mut hook = args.commit_hook_fd.map(vmm::migrate::hook::CommitHook::from_fd).transpose()?;
    let mut restore = None;
    let (mut res, incoming) = match (&args.incoming, args.incoming_fd, &args.restore) {
        (_, _, Some(dir)) => {
            let opts = vmm::snapshot::restore::RestoreOptions { nets: &args.nets, disks: &args.disks };
            let prepared = vmm::snapshot::restore::prepare(dir, &opts)?;
            let res = HostResources::open_for_restore(&prepared.config)?;
            restore = Some((dir.clone(), prepared));
            (res, None)
        }
        (Some(listen), _, None) => {
            let listener = vmm::migrate::receive::listen(listen)?;
            (HostResources::open_for_incoming(&args.nets, &args.disks)?, Some(IncomingFrom::Listener(listener)))
        }
        (None, Some(fd), None) => {
            (HostResources::open_for_incoming(&args.nets, &args.disks)?, Some(IncomingFrom::Fd(fd)))
        }
        (None, None, None) => (HostResources::open_for_boot(&config)?, None),
    };
    vmm::host::read_host_facts();
    // The sandbox: the jail (one thread yet), then each thread's filter as it starts.
    if let Some(user) = args.jail {
        vmm::jail::enter(user)?;
    }
    vmm::seccomp::init(seccomp)?;
    if args.jail.is_some() || seccomp != SeccompMode::Off {
        res.seal();
    }
    let api = match api_socket {
        Some(socket) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
            let server = socket.start(tx, wake.clone(), ApiServerOptions::default())?;
            Some((server, rx, wake))
        }
        None => None,
    };
    // Snapshots are written by a thread that may create files: it starts before the VMM thread
    // gives that up.
    let snapshot_writer = vmm::snapshot::save::Writer::start()?;
    vmm::seccomp::apply(ThreadKind::Vmm)?;

    let schedule = (!args.no_announce).then_some(AnnounceSchedule {
        rounds: args.announce_rounds,
        initial_ms: args.announce_initial_ms,
        step_ms: args.announce_step_ms,
        kick_tcp: !args.no_tcp_kick,
    });
    let mut vmm = match (incoming, restore) {
        (_, Some((dir, prepared))) => {
            let (mut vmm, took) = vmm::snapshot::restore::start(prepared, &mut res, Box::new(std::io::stdout()))?;
            // On stderr whatever the log level: scripts and tests wait for it.
            eprintln!("vmm: restored {}: the guest runs ({} µs)", dir.display(), took.as_micros());
            if let Some(schedule) = schedule {
                vmm.announce(schedule);
            }
            vmm
        }
        (Some(from), None) => {
            let security = security.clone().ok_or(NO_IDENTITY)?;
            let cfg = IncomingConfig { from, security, link, hook: hook.take() };
            let (vmm, downtime) = vmm::migrate::receive::start_incoming(
                cfg,
                &args.nets,
                &args.disks,
                &mut res,
                schedule,
                Box::new(std::io::stdout()),
            )?;
            log::info!("migration received; the guest was paused {:?}", downtime.unwrap_or_default());
            vmm
        }
        (None, None) => {
            let built = vmm::build_vm_for_boot(&config, &mut res, Box::new(std::io::stdout()))?;
            Vmm::start(built)?
        }
    };
    vmm.attach_snapshot_writer(snapshot_writer);
    vmm.set_migration_defaults(MigrationDefaults { security, link });
    let _server = api.map(|(server, rx, wake)| {
        vmm.attach_api(rx, wake);
        server
    });
    match vmm.run()? {
        ExitReason::Reset(how) => {
            log::info!("guest stopped ({how})");
            Ok(ExitCode::SUCCESS)
        }
        ExitReason::Migrated => {
            log::info!("the guest now runs on the migration destination");
            Ok(ExitCode::SUCCESS)
        }
        ExitReason::Error(e) => Err(e.into()),
    }
}

/// `vmm host|cluster|vm|balancer ...`: replaces this process with the binary that serves them, found next
/// to this one.
fn cluster(command: &str, args: ClusterArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let path = exe.with_file_name(CLUSTER_BIN);
    if !path.is_file() {
        return Err(format!(
            "`vmm {command}` is served by {CLUSTER_BIN}, which is not installed next to {}",
            exe.display()
        )
        .into());
    }
    use std::os::unix::process::CommandExt;
    // exec only returns on failure.
    let e = std::process::Command::new(&path).arg(command).args(&args.args).exec();
    Err(format!("cannot run {}: {e}", path.display()).into())
}

fn probe() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let kvm = vmm::builder::open_kvm()?;
    print!("{}", vmm::probe::table(&kvm));
    Ok(ExitCode::SUCCESS)
}

/// `vmm pause|resume|stop`: silent on success, like `kill`.
fn api_call(
    args: ApiArgs,
    call: fn(&ApiClient) -> Result<(), ClientError>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    call(&ApiClient::new(args.api_sock))?;
    Ok(ExitCode::SUCCESS)
}

fn status(args: StatusArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let info = ApiClient::new(args.api.api_sock).get_vm()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", display::vm_summary(&info));
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the snapshot, follows it every 100 ms until it completes or fails, then prints the
/// summary; fails if the snapshot did.
fn snapshot(args: SnapshotArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let client = ApiClient::new(&args.api.api_sock);
    // The VMM resolves a relative path from its own working directory: send an absolute one.
    let dir = std::path::absolute(&args.to)?;
    let request = SnapshotRequest { to: dir.display().to_string(), resume: args.resume, with_disks: args.with_disks };
    client.snapshot(&request)?;
    let info = loop {
        let info = client.snapshot_info()?;
        if matches!(info.phase, SnapshotPhase::Completed | SnapshotPhase::Failed) {
            break info;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", display::snapshot_summary(&info));
    }
    if info.phase == SnapshotPhase::Failed {
        let why = info.error.as_deref().unwrap_or("no reason given");
        return Err(format!("snapshot {} failed: {why}", dir.display()).into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the migration, follows it every 100 ms until it completes or fails, then prints the
/// summary; fails if the migration did.
fn migrate(args: MigrateArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let client = ApiClient::new(&args.api.api_sock);
    if args.insecure_plaintext {
        eprintln!("vmm: warning: {}", transport::PLAINTEXT_WARNING);
    }
    // The source VMM reads the directory, maybe from another working directory.
    let tls_dir = match (&args.tls_dir, args.insecure_plaintext) {
        (Some(dir), false) => Some(absolute(dir)?.display().to_string()),
        _ => None,
    };
    let request = MigrateRequest {
        to: args.to.clone(),
        downtime_ms: args.downtime_ms,
        max_bandwidth_mib_s: args.max_bandwidth_mib_s,
        max_rounds: args.max_rounds,
        mode: if args.postcopy {
            Some(MigrationMode::Postcopy)
        } else if args.postcopy_auto {
            Some(MigrationMode::PostcopyAuto)
        } else {
            None
        },
        precopy_rounds: args.precopy_rounds,
        tls_dir,
        insecure_plaintext: args.insecure_plaintext,
        stall_timeout_ms: args.stall_timeout_ms,
        route: None,
    };
    // Only to size the progress bar, so a failure here is no reason to stop.
    let guest_bytes = client.get_vm().ok().map(|vm| vm.config.mem_mib.saturating_mul(1 << 20));
    client.migrate(&request)?;

    let bar = display::MigrationBar::new(guest_bytes);
    let mut phase = MigrationPhase::Setup;
    let info = loop {
        let info = match client.migration() {
            Ok(info) => info,
            Err(e) => {
                bar.finish();
                // A source VMM exits soon after a migration completes; if it went before we saw
                // that, say where we were rather than just "connection refused".
                return Err(format!(
                    "lost track of the migration to {} during {}: {e}",
                    args.to,
                    display::phase_name(phase)
                )
                .into());
            }
        };
        phase = info.phase;
        bar.update(&info);
        if matches!(phase, MigrationPhase::Completed | MigrationPhase::Failed) {
            break info;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    bar.finish();

    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", display::migration_summary(&info));
    }
    if info.phase == MigrationPhase::Failed {
        let why = info.error.as_deref().unwrap_or("no reason given");
        return Err(format!("migration to {} failed: {why}", args.to).into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a destination without a TLS identity does not start.
const NO_IDENTITY: &str = "an incoming migration needs --tls-dir DIR (or VMM_TLS_DIR) with this host's certificates \
                           (see `vmm tls init`), or --insecure-plaintext";

fn absolute(p: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()).into())
}

/// `vmm tls init|issue`.
fn tls(cmd: TlsCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let spec = |h: &HostArgs, default_name: Option<String>| -> Result<pki::HostSpec, Box<dyn std::error::Error>> {
        let name = h.name.clone().or(default_name).ok_or("--name NAME is required")?;
        Ok(pki::HostSpec::new(&name, &h.ips, h.days)?)
    };
    match cmd {
        TlsCommand::Init { dir, host } => {
            let spec = spec(&host, Some(pki::local_hostname()))?;
            pki::init(&dir, &spec)?;
            eprintln!(
                "vmm: wrote a new CA and the identity of {} into {} (keep {} on this host only)",
                describe_host(&spec),
                dir.display(),
                pki::CA_KEY
            );
        }
        TlsCommand::Issue { ca_dir, out_dir, host } => {
            let spec = spec(&host, None)?;
            pki::issue(&ca_dir, &out_dir, &spec)?;
            eprintln!("vmm: wrote the identity of {} into {}", describe_host(&spec), out_dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_host(spec: &pki::HostSpec) -> String {
    let mut names = vec![spec.name.clone()];
    names.extend(spec.ips.iter().map(|ip| ip.to_string()));
    names.join(", ")
}
