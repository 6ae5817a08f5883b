// SPDX-License-Identifier: Apache-2.0
//! The cluster's command line: `vmm host run|drain|undrain`, `vmm cluster status`,
//! `vmm vm create|list|stop|move`. The `vmm` binary runs `vmm-cluster` for these, so the help
//! and the messages speak of `vmm`.

mod commands;
mod status;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::ClusterError;
use crate::store::{EtcdStore, EtcdTls};

pub use commands::{WaitError, cancel_on_signals, run_command};
pub use status::{BalancerRow, HostRow, MoveRow, StatusReport, VmRow, render as render_status, status_report};

#[derive(Parser)]
#[command(name = "vmm", bin_name = "vmm", version, about = "vmm's cluster commands (run through `vmm`)")]
pub struct Cli {
    /// etcd's client URLs, comma-separated (`https://` ones with --etcd-tls-dir).
    #[arg(long, global = true, env = "VMM_ETCD", default_value = "http://127.0.0.1:2379", value_name = "URLS")]
    pub etcd: String,
    /// This host's TLS directory for etcd over mutual TLS (`ca.pem`, `cert.pem`, `key.pem`, as
    /// `vmm tls init` and `vmm tls issue` write them).
    #[arg(long, global = true, env = "VMM_ETCD_TLS_DIR", value_name = "DIR")]
    pub etcd_tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Subcommand)]
pub enum Top {
    /// A host: run its agent, or take it out of service and back.
    #[command(subcommand)]
    Host(HostCmd),
    /// The whole cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// VMs placed on the cluster's hosts.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The load balancer: run any number; one is elected leader and moves VMs so that load
    /// relative to capacity evens out (until SIGTERM or SIGINT).
    Balancer(BalancerArgs),
}

#[derive(Args)]
pub struct BalancerArgs {
    /// This instance's name [default: balancer-PID].
    #[arg(long)]
    pub id: Option<String>,
    /// Seconds between plans.
    #[arg(long, default_value_t = 2.0, value_name = "S")]
    pub every: f64,
    /// The leader's lease, seconds (1 to 3): a dead leader is replaced after about this.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i64).range(1..=crate::lease::MAX_TTL_S))]
    pub lease_ttl: i64,
    /// Print each plan and act on nothing (takes no part in the election).
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print one plan and exit.
    #[arg(long, requires = "dry_run")]
    pub once: bool,
    /// With --dry-run: print the planner's input and plan as JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Start balancing when the spread of load ÷ capacity is above this.
    #[arg(long, value_name = "X")]
    pub start_spread: Option<f64>,
    /// Stop once the spread is below this.
    #[arg(long, value_name = "X")]
    pub stop_spread: Option<f64>,
    /// Seconds a VM stays where it is after it moved.
    #[arg(long, value_name = "S")]
    pub cooldown: Option<f64>,
    /// How the moves it asks for migrate.
    #[arg(long, value_enum, default_value_t = MoveMode::Precopy)]
    pub mode: MoveMode,
}

/// How a move migrates the VM (`vmm migrate`'s modes; see the README's Post-copy section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MoveMode {
    /// Copy rounds while the guest runs, throttling it if they stop shrinking.
    Precopy,
    /// One copy round, then the guest moves and the pages it dirtied follow it.
    Postcopy,
    /// Pre-copy, switching to post-copy when the rounds stop shrinking (instead of throttling).
    PostcopyAuto,
}

impl MoveMode {
    /// As the move record and the VMM's API say it (`None`: pre-copy, the default).
    pub fn migration_mode(self) -> Option<vmm::api::MigrationMode> {
        match self {
            MoveMode::Precopy => None,
            MoveMode::Postcopy => Some(vmm::api::MigrationMode::Postcopy),
            MoveMode::PostcopyAuto => Some(vmm::api::MigrationMode::PostcopyAuto),
        }
    }
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Run this host's agent (until SIGTERM or SIGINT; its VMs keep running after it).
    Run(RunArgs),
    /// Mark a host unschedulable and move every VM off it, one at a time by default; waits.
    Drain(DrainArgs),
    /// Make a drained host schedulable again.
    Undrain { host: String },
}

#[derive(Args)]
pub struct RunArgs {
    /// This host's name in the cluster (a-z, 0-9, '-').
    #[arg(long)]
    pub name: String,
    /// Where the agent keeps its VMMs' sockets, consoles and records.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The shared migration port every incoming migration arrives on.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: SocketAddr,
    /// The address other hosts connect to [default: --listen, which must then be a specific
    /// address].
    #[arg(long, value_name = "IP:PORT")]
    pub advertise: Option<SocketAddr>,
    /// The bridge every VM's TAP joins (the host's network).
    #[arg(long, value_name = "NAME")]
    pub bridge: Option<String>,
    /// CPU capacity in thousandths of a CPU [default: this process's cgroup CPU quota, else the
    /// machine's CPUs].
    #[arg(long, value_name = "N")]
    pub cpu_millis: Option<u64>,
    /// Memory for guests, MiB [default: the machine's memory].
    #[arg(long, value_name = "MIB")]
    pub mem_mib: Option<u64>,
    /// The lease's time to live, in seconds (1 to 3): a dead agent's host shows as down after it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i64).range(1..=crate::lease::MAX_TTL_S))]
    pub lease_ttl: i64,
    /// This host's TLS identity (ca.pem, cert.pem, key.pem; see `vmm tls init|issue`): every
    /// migration to or from this host is mutual TLS. The certificate must name the address
    /// other hosts dial (`--advertise`).
    #[arg(long, value_name = "DIR", env = "VMM_TLS_DIR", required_unless_present = "insecure_plaintext")]
    pub tls_dir: Option<PathBuf>,
    /// Migrate to and from this host over plain TCP: neither encrypted nor authenticated
    /// (every host of the cluster must then run so).
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure_plaintext: bool,
    /// The `vmm` binary to run VMs with [default: `vmm` next to this binary].
    #[arg(long, value_name = "PATH")]
    pub vmm: Option<PathBuf>,
    /// Seconds between load reports.
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    pub load_every: f64,
}

#[derive(Args)]
pub struct DrainArgs {
    pub host: String,
    /// Moves at once (the default, one outgoing migration per host, keeps the host responsive).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub parallel: u32,
    /// Only mark the host drained; do not move anything or wait.
    #[arg(long)]
    pub no_wait: bool,
    /// Longest wait for one move, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Hosts (up or down, drained, capacity, load), VMs (owner, state, CPU, memory) and
    /// migrations in flight.
    Status {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Draw the status again every --every seconds until Ctrl-C (SIGINT) or SIGTERM: in
        /// place on a terminal, one frame after another, each after a line with its time,
        /// elsewhere.
        #[arg(long)]
        watch: bool,
        /// Seconds between two frames of --watch (0.2 to 3600).
        #[arg(long, requires = "watch", default_value_t = 2.0, value_name = "SECS")]
        every: f64,
    },
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM on the host with the most free capacity that fits (or on --host), and wait
    /// until it runs.
    Create(CreateArgs),
    /// The cluster's VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Power a VM off and remove it from the cluster; waits until it is gone.
    Stop {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Live-migrate a VM to another host (--to, or the best one); waits for the end.
    Move {
        name: String,
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
        #[arg(long)]
        no_wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// How the VM migrates.
        #[arg(long, value_enum, default_value_t = MoveMode::Precopy)]
        mode: MoveMode,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name [default: vm-RANDOM].
    #[arg(long)]
    pub name: Option<String>,
    /// Guest kernel (the path must exist on every host).
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long, default_value = vmm::config::DEFAULT_CMDLINE)]
    pub cmdline: String,
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEM_MIB)]
    pub mem_mib: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// The NIC's MAC [default: one derived from the name].
    #[arg(long)]
    pub mac: Option<String>,
    /// No NIC.
    #[arg(long, conflicts_with = "mac")]
    pub no_net: bool,
    /// The host to create it on, instead of the best one.
    #[arg(long)]
    pub host: Option<String>,
    /// Return once it is recorded, without waiting for it to run.
    #[arg(long)]
    pub no_wait: bool,
}

/// Where etcd is and how to reach it: `--etcd` and `--etcd-tls-dir`.
#[derive(Clone, Debug)]
pub struct EtcdAccess {
    pub urls: String,
    pub tls_dir: Option<PathBuf>,
}

impl Cli {
    pub fn etcd_access(&self) -> EtcdAccess {
        EtcdAccess { urls: self.etcd.clone(), tls_dir: self.etcd_tls_dir.clone() }
    }
}

/// Connects to etcd as `--etcd` and `--etcd-tls-dir` say.
pub async fn connect(etcd: &EtcdAccess) -> Result<EtcdStore, ClusterError> {
    let endpoints: Vec<String> =
        etcd.urls.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect();
    let tls = etcd.tls_dir.as_deref().map(EtcdTls::load).transpose()?;
    Ok(EtcdStore::connect_with(&endpoints, tls.as_ref()).await?)
}

/// How long the commands wait for the cluster by default.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
