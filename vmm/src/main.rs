// SPDX-License-Identifier: Apache-2.0
//! The `vmm` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use clap::Parser;
use net::announce::AnnounceSchedule;
use vmm::api::client::{ApiClient, ClientError};
use vmm::api::display;
use vmm::api::server::{ApiServer, ApiServerOptions, BoundApiSocket, bind_api_socket};
use vmm::api::{
    ApiError, ApiMessage, ApiResponse, MigrateRequest, MigrationMode, MigrationPhase, RestoreInfo, RestoreRequest,
    SnapshotPhase, SnapshotRequest,
};
use vmm::host::HostResources;
use vmm::migrate::params::MigrationDefaults;
use vmm::migrate::receive::{IncomingConfig, IncomingFrom};
use vmm::seccomp::{SeccompMode, ThreadKind};
use vmm::snapshot::standby::{self, StandbyOptions, Waited};
use vmm::transport::{self, pki};
use vmm::{ExitReason, VmConfig, Vmm};

mod args;

use args::{
    ApiArgs, Cli, ClusterArgs, Command, HostArgs, MigrateArgs, RestoreArgs, RunArgs, SnapshotArgs, StatusArgs,
    TlsCommand,
};

/// The binary next to `vmm` that serves `vmm host|cluster|vm ...`, git style: the cluster
/// layer builds on this crate, so it cannot live in it.
const CLUSTER_BIN: &str = "vmm-cluster";

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
        Command::Restore(args) => restore(args),
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
        _ if args.await_restore => (HostResources::open_for_standby(&args.nets, args.await_mem_mib)?, None),
        (_, _, Some(dir)) => {
            let opts =
                vmm::snapshot::restore::RestoreOptions { nets: &args.nets, disks: &args.disks, host_cpuid: None };
            let prepared = vmm::snapshot::restore::prepare(dir, &opts)?;
            let res = HostResources::open_for_restore(&prepared.config)?;
            restore = Some((dir.clone(), prepared));
            (res, None)
        }
        (Some(listen), _, None) => {
            let listener = vmm::migrate::receive::listen(listen)?;
            (HostResources::open_for_incoming(&args.nets, &args.disks)?, Some(IncomingFrom::Listener(listener)))
        }
        (None, Some(fd), None) => (
            HostResources::open_for_incoming(&args.nets, &args.disks)?,
            Some(IncomingFrom::Fd { fd, conns: args.incoming_conns_fd }),
        ),
        (None, None, None) => (HostResources::open_for_boot(&config)?, None),
    };
    vmm::host::read_host_facts();
    // The sandbox: the jail (one thread yet), then each thread's filter as it starts.
    if let Some(user) = args.jail {
        vmm::jail::enter(user, &args.jail_dirs)?;
    }
    vmm::seccomp::init(seccomp)?;
    res.ask_supported_cpuid();
    if args.jail.is_some() || seccomp != SeccompMode::Off {
        res.seal();
    }
    // Every start but a restore's seals the VMM thread before it builds or receives anything. A
    // restore starts the guest first and seals the thread right after (before its event loop,
    // and the devices' resume, read anything the guest wrote): the filter and the API server's
    // and snapshot writer's threads are then not part of the time to running.
    let mut api_socket = api_socket;
    let early = if restore.is_none() { Some(seal_vmm_thread(api_socket.take())?) } else { None };
    let schedule = (!args.no_announce).then_some(AnnounceSchedule {
        rounds: args.announce_rounds,
        initial_ms: args.announce_initial_ms,
        step_ms: args.announce_step_ms,
        kick_tcp: !args.no_tcp_kick,
    });
    let mut restored = None;
    // A waiting VMM's `PUT /vm/restore`, answered once the guest runs.
    let mut standby_reply = None;
    let mut vmm = match (incoming, restore) {
        (_, Some((dir, prepared))) => {
            let started = vmm::snapshot::restore::start(prepared, &mut res, Box::new(std::io::stdout()))?;
            restored = Some((dir, started.at, started.load_ahead));
            started.vmm
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
        (None, None) if args.await_restore => {
            let (Some(Sealed { api: Some((server, rx, _)), snapshot_writer }), Some(path)) = (&early, &args.api_sock)
            else {
                return Err("--await-restore needs --api-sock".into());
            };
            let opts =
                StandbyOptions { nets: args.nets.clone(), disks: args.disks.clone(), jailed: args.jail.is_some() };
            // Every thread has its filter on before it says it waits: the line scripts wait for
            // before they name the snapshot.
            vmm::seccomp::wait_for_filters();
            eprintln!("vmm: waiting for a snapshot to run: PUT /vm/restore on {}", path.display());
            let waited = standby::wait(rx, snapshot_writer, &opts, &mut res, Box::new(std::io::stdout()));
            if !matches!(waited, Ok(Waited::Restored { .. })) {
                // The VMM ends: the answer to the request that ended it is written first.
                server.drain(Duration::from_secs(1));
            }
            match waited? {
                Waited::Stopped => return Ok(ExitCode::SUCCESS),
                Waited::Restored { started, from, reply } => {
                    restored = Some((from, started.at, started.load_ahead));
                    standby_reply = Some(reply);
                    started.vmm
                }
            }
        }
        (None, None) => {
            let built = vmm::build_vm_for_boot(&config, &mut res, Box::new(std::io::stdout()))?;
            Vmm::start(built)?
        }
    };
    // Waiting for the first vCPU to run before sealing leaves it the CPU while it starts, rather
    // than to the threads and the filter the seal starts and installs.
    let ran = restored.as_ref().map(|(dir, started, _)| report_restored(&vmm, dir, *started));
    let Sealed { api, snapshot_writer } = match early {
        Some(sealed) => sealed,
        None => seal_vmm_thread(api_socket.take())?,
    };
    if let Some((dir, _, load_ahead)) = restored {
        // The guest runs: the loader may fill its memory ahead of its touches now.
        load_ahead.release();
        vmm::migrate::resume_devices(vmm.machine());
        // A waiting VMM answers the request that named the snapshot (the client may have gone;
        // the guest runs anyway).
        if let (Some(reply), Some(ran)) = (standby_reply, ran) {
            let answer = match ran {
                Some((to_running_us, running_at_monotonic_us)) => Ok(ApiResponse::Restored(RestoreInfo {
                    from: dir.display().to_string(),
                    to_running_us,
                    running_at_monotonic_us,
                })),
                None => Err(ApiError::Internal("the restored VM stopped before its guest ran".to_string())),
            };
            let _ = reply.send(answer);
        }
        if let Some(schedule) = schedule {
            vmm.announce(schedule);
        }
    }
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

/// The line scripts and tests wait for, on stderr whatever the log level: when the guest first
/// ran (its first vCPU about to enter KVM_RUN), from the restore's start and on the monotonic
/// clock, which `vmm-bench` compares with the time it spawned this process. Not printed if a
/// vCPU thread failed before it ran (the VM ends with its error). Returns the two figures, µs.
fn report_restored(vmm: &Vmm, dir: &Path, started: Instant) -> Option<(u64, u64)> {
    // A vCPU thread either runs or gives up at once; the bound is only against a hang.
    let Some(at) = vmm.machine().vcpu_shared.first_run.wait(Duration::from_secs(30)) else {
        log::error!("restored {}: no vCPU ran", dir.display());
        return None;
    };
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill. Rust's `Instant` is this clock on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_us = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    let at_us = now_us.saturating_sub(at.elapsed().as_micros() as u64);
    let to_running_us = at.saturating_duration_since(started).as_micros() as u64;
    eprintln!("vmm: restored {}: the guest runs ({to_running_us} µs; monotonic {at_us} µs)", dir.display());
    Some((to_running_us, at_us))
}

/// What the VMM thread starts before it gives up creating threads that may open files.
struct Sealed {
    api: Option<(ApiServer, std::sync::mpsc::Receiver<ApiMessage>, Arc<EventFd>)>,
    snapshot_writer: vmm::snapshot::save::Writer,
}

/// The VMM thread's last steps before its own filter: the API server's threads start on
/// `api_socket`, and the snapshot writer (a thread that may create files) starts; then the
/// filter goes on.
fn seal_vmm_thread(api_socket: Option<BoundApiSocket>) -> Result<Sealed, Box<dyn std::error::Error>> {
    let api = match api_socket {
        Some(socket) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
            let server = socket.start(tx, wake.clone(), ApiServerOptions::default())?;
            Some((server, rx, wake))
        }
        None => None,
    };
    let snapshot_writer = vmm::snapshot::save::Writer::start()?;
    vmm::seccomp::apply(ThreadKind::Vmm)?;
    Ok(Sealed { api, snapshot_writer })
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

/// `vmm restore`: runs a snapshot in a waiting VMM and prints when its guest ran.
fn restore(args: RestoreArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // The VMM reads the directory from its own working directory: send an absolute path.
    let from = absolute(&args.from)?.display().to_string();
    let info = ApiClient::new(&args.api.api_sock).restore(&RestoreRequest { from })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("restored {}: the guest runs ({} µs after the VMM took the request)", info.from, info.to_running_us);
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
