// SPDX-License-Identifier: Apache-2.0
//! A cluster on one machine, for the cluster tests, the cluster demo and the benchmark: the
//! test bed's hosts (network namespaces on one segment), each with a CPU quota of its own
//! ([`CpuCgroup`]) and a host agent (`vmm host run`), and a private etcd in the client's
//! namespace, where the cluster commands run too. Dropping it kills the agents and every VMM
//! they started (through their cgroups), stops etcd and removes the namespaces, the cgroups and
//! the state directories.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmm_cluster::cli::StatusReport;
use vmm_cluster::etcd_server::EtcdServer;

use crate::cgroup::CpuCgroup;
use crate::echo_stream::EchoStream;
use crate::vm::{build_dir, guest_kernel, vmm_bin};
use crate::{Process, TestBed};

/// Every host's shared migration port.
pub const MIGRATION_PORT: u16 = 7200;
/// Our guest's echo service.
pub const ECHO_PORT: u16 = 7000;

/// How a cluster is made.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// CPU quota per host, thousandths of a CPU (`None`: none).
    pub cpu_millis: Option<u64>,
    /// Memory capacity each agent announces, MiB.
    pub mem_mib: u64,
    pub etcd_members: usize,
    /// The agents' load report period, seconds.
    pub load_every_s: f64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { cpu_millis: Some(600), mem_mib: 2048, etcd_members: 1, load_every_s: 1.0 }
    }
}

/// The `vmm-cluster` binary of the tests' profile.
pub fn cluster_bin() -> PathBuf {
    let p = build_dir().join("vmm-cluster");
    assert!(p.exists(), "{} is missing: build the workspace first (`cargo build --workspace --release`)", p.display());
    p
}

/// A running cluster; see the module doc.
pub struct ClusterBed {
    pub bed: TestBed,
    cgroups: BTreeMap<String, CpuCgroup>,
    etcd: Option<EtcdServer>,
    endpoints: String,
    /// The client namespace's TLS identity for etcd (etcd's own too).
    etcd_tls: PathBuf,
    agents: BTreeMap<String, Process>,
    balancers: BTreeMap<String, Process>,
    state_root: PathBuf,
    options: ClusterOptions,
}

impl ClusterBed {
    /// Builds hosts `hosts` and a client, starts etcd, and starts an agent on every host.
    pub fn start(hosts: &[&str], options: ClusterOptions) -> ClusterBed {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let mut builder = TestBed::builder().client("ctl").host_ips();
        for h in hosts {
            builder = builder.host(h);
        }
        let bed = builder.build().expect("build the test bed");
        let mut cgroups = BTreeMap::new();
        for h in hosts {
            let g = CpuCgroup::create(&format!("cl{n}-{h}"), options.cpu_millis).expect("create the host's cgroup");
            cgroups.insert(h.to_string(), g);
        }
        let ip = IpAddr::V4(bed.client().ip());
        let members = options.etcd_members;
        // etcd over mutual TLS, with an identity of the test CA naming the client namespace's
        // address; every agent, command and balancer presents its own.
        let etcd_tls = crate::pki::pki().host_dir(bed.client().ip());
        let server_tls = etcd_tls.clone();
        let etcd = bed
            .client()
            .run_in(move || EtcdServer::start_tls(ip, members, &server_tls))
            .expect("enter the client namespace");
        let etcd = etcd.unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        let endpoints = etcd.endpoints_arg();
        let state_root = std::env::temp_dir().join(format!("vmm-cl-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_root);
        let mut cluster = ClusterBed {
            bed,
            cgroups,
            etcd: Some(etcd),
            endpoints,
            etcd_tls,
            agents: BTreeMap::new(),
            balancers: BTreeMap::new(),
            state_root,
            options,
        };
        for h in hosts {
            cluster.start_agent(h);
        }
        cluster.wait_until("every host to register", Duration::from_secs(30), |s| {
            hosts.iter().all(|h| s.hosts.iter().any(|r| r.name == *h && r.up))
        });
        cluster
    }

    /// etcd's client URLs, comma-separated (`https://`: see [`ClusterBed::etcd_tls`]).
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The TLS directory the client namespace's commands reach etcd with.
    pub fn etcd_tls(&self) -> &Path {
        &self.etcd_tls
    }

    /// Points `cmd` (a `vmm` command in the client namespace) at etcd: `VMM_ETCD` and
    /// `VMM_ETCD_TLS_DIR`.
    pub fn etcd_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("VMM_ETCD", &self.endpoints).env("VMM_ETCD_TLS_DIR", &self.etcd_tls)
    }

    /// Kills every etcd member: "etcd is down".
    pub fn kill_etcd(&mut self) {
        if let Some(e) = self.etcd.as_mut() {
            e.kill_all();
        }
    }

    /// Restarts every etcd member with its data (in the client's namespace, where it listens).
    pub fn restart_etcd(&mut self) {
        let etcd = self.etcd.as_mut().expect("etcd was started");
        let restarted = self.bed.client().run_in(|| etcd.restart_all()).expect("enter the client namespace");
        restarted.unwrap_or_else(|e| panic!("cannot restart etcd: {e}"));
    }

    /// Host `host`'s agent state directory.
    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.state_root.join(host)
    }

    /// Host `host`'s migration address.
    pub fn migration_addr(&self, host: &str) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.bed.host(host).ip().expect("hosts have addresses")), MIGRATION_PORT)
    }

    pub fn cgroup(&self, host: &str) -> &CpuCgroup {
        &self.cgroups[host]
    }

    /// Starts (or restarts) host `host`'s agent, its log in `<state dir>.log`.
    pub fn start_agent(&mut self, host: &str) {
        let dir = self.state_dir(host);
        std::fs::create_dir_all(&dir).expect("create the state directory");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_root.join(format!("{host}.log")))
            .expect("open the agent's log");
        let h = self.bed.host(host);
        let mut cmd = h.command_keeping_mounts(cluster_bin());
        let host_tls = crate::pki::pki().host_dir(self.bed.host(host).ip().expect("hosts have addresses"));
        cmd.args(["host", "run", "--name", host, "--etcd", &self.endpoints, "--etcd-tls-dir"])
            .arg(&host_tls)
            .arg("--state-dir")
            .arg(&dir)
            .args(["--listen", &self.migration_addr(host).to_string(), "--bridge", h.bridge()])
            .args(["--mem-mib", &self.options.mem_mib.to_string()])
            // Mutual TLS with this host's identity from the test CA (it names the host's address).
            .args(crate::pki::tls_args(
                &crate::pki::pki().host_dir(self.bed.host(host).ip().expect("hosts have addresses")),
            ))
            .args(["--load-every", &self.options.load_every_s.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.cgroups[host].enter(&mut cmd);
        let p = h.spawn(&mut cmd).expect("start the agent");
        self.agents.insert(host.to_string(), p);
    }

    /// Kills host `host`'s agent (SIGKILL), as a crash would. Its VMMs keep running.
    pub fn kill_agent(&mut self, host: &str) {
        if let Some(p) = self.agents.remove(host) {
            let _ = p.kill();
        }
    }

    /// The agent's process, if running.
    pub fn agent(&self, host: &str) -> Option<&Process> {
        self.agents.get(host)
    }

    /// Host `host`'s agent log so far.
    pub fn agent_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.state_root.join(format!("{host}.log"))).unwrap_or_default()
    }

    /// Starts a balancer (`vmm balancer --id ID ARGS`) in the client's namespace, where etcd
    /// is, its log in `balancer-<id>.log`.
    pub fn start_balancer(&mut self, id: &str, args: &[&str]) {
        std::fs::create_dir_all(&self.state_root).expect("create the state root");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_root.join(format!("balancer-{id}.log")))
            .expect("open the balancer's log");
        let mut cmd = self.bed.client().command(vmm_bin());
        self.etcd_env(cmd.args(["balancer", "--id", id]).args(args))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let p = self.bed.client().spawn(&mut cmd).expect("start the balancer");
        self.balancers.insert(id.to_string(), p);
    }

    /// Kills balancer `id` (SIGKILL), as a crash would.
    pub fn kill_balancer(&mut self, id: &str) {
        if let Some(p) = self.balancers.remove(id) {
            let _ = p.kill();
        }
    }

    /// Balancer `id`'s log so far.
    pub fn balancer_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.state_root.join(format!("balancer-{id}.log"))).unwrap_or_default()
    }

    /// Every VMM process running VM `vm`, on any host: (host, pid). The agents' VMMs live in
    /// their hosts' cgroups, with their API sockets in `<state dir>/vms/<vm>.<epoch>/`.
    pub fn vmm_processes(&self, vm: &str) -> Vec<(String, u32)> {
        let needle = format!("/vms/{vm}.");
        let mut found = Vec::new();
        for (host, group) in &self.cgroups {
            for pid in group.pids() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> =
                    cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                let is_vmm = args.iter().any(|a| a == "run") && args.iter().any(|a| a.contains(&needle));
                let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = state.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
                if is_vmm && !zombie {
                    found.push((host.clone(), pid));
                }
            }
        }
        found
    }

    /// Every agent's log and every VMM's log, for a failing assertion's message.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for id in self.balancers.keys() {
            out.push_str(&format!("\n===== balancer {id} =====\n{}", self.balancer_log(id)));
        }
        for h in self.cgroups.keys() {
            out.push_str(&format!("\n===== agent {h} =====\n{}", self.agent_log(h)));
            let vms = self.state_dir(h).join("vms");
            for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                let log = std::fs::read_to_string(e.path().join("vmm.log")).unwrap_or_default();
                out.push_str(&format!("\n----- {h}: VMM {} -----\n{log}", e.file_name().to_string_lossy()));
            }
        }
        out
    }

    /// Runs `vmm ARGS` (the cluster commands go through `vmm` to `vmm-cluster`) in the client
    /// namespace, pointed at etcd ([`ClusterBed::etcd_env`]).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd: Command = self.bed.client().command(vmm_bin());
        self.etcd_env(cmd.args(args)).stdin(Stdio::null());
        cmd.output().expect("run vmm")
    }

    /// [`ClusterBed::cli`], which must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`vmm {}` failed ({}):\n{}{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.describe()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`ClusterBed::cli`], which must fail; its stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "`vmm {}` succeeded but should not have:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `vmm vm create --name NAME --kernel <our guest> --cmdline CMDLINE --mem-mib MEM EXTRA..`:
    /// waits until the VM runs; what the command printed (where it was placed and runs), or why
    /// it failed.
    pub fn create_vm(&self, name: &str, cmdline: &str, mem_mib: u64, extra: &[&str]) -> Result<String, String> {
        let kernel = guest_kernel();
        let mem = mem_mib.to_string();
        let mut args = vec!["vm", "create", "--name", name, "--kernel", kernel.to_str().unwrap_or_default()];
        args.extend(["--cmdline", cmdline, "--mem-mib", &mem]);
        args.extend(extra);
        let out = self.cli(&args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("creating {name}: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// A client in the client namespace streaming a numbered line every 10 ms to the echo
    /// service of guest `i` of the bed (its address: [`TestBed::guest_ip`]), connected once the
    /// guest listens (within `timeout`).
    pub fn echo_stream(&self, i: u8, timeout: Duration) -> Result<EchoStream, String> {
        let ip = self.bed.guest_ip(i);
        // The VMM runs before the guest's services listen.
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let s = self
                .bed
                .client()
                .run_in(move || TcpStream::connect_timeout(&(ip, ECHO_PORT).into(), Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            match s {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to guest {i} at {ip}:{ECHO_PORT}: {e}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        EchoStream::start(stream, Duration::from_millis(10)).map_err(|e| format!("echo stream to {ip}: {e}"))
    }

    /// `vmm cluster status --json`.
    pub fn status(&self) -> Option<StatusReport> {
        let out = self.cli(&["cluster", "status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the status satisfies `pred`; returns it.
    pub fn wait_until(&self, what: &str, timeout: Duration, pred: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                Instant::now() < deadline,
                "gave up after {} s waiting for {what}; last status:\n{}{}",
                timeout.as_secs(),
                last.map(|s| vmm_cluster::cli::render_status(&s)).unwrap_or_else(|| "(none)".into()),
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// VM `vm`'s row, if it exists.
    pub fn vm(&self, vm: &str) -> Option<vmm_cluster::cli::VmRow> {
        self.status()?.vms.into_iter().find(|v| v.name == vm)
    }
}

impl Drop for ClusterBed {
    fn drop(&mut self) {
        // The cgroups hold the agents and all their VMMs: killing them first leaves nothing
        // inside the namespaces.
        self.agents.clear();
        self.balancers.clear();
        self.cgroups.clear();
        self.etcd = None;
        let _ = std::fs::remove_dir_all(&self.state_root);
    }
}
