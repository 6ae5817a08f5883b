// SPDX-License-Identifier: Apache-2.0
//! A private etcd (Debian's `etcd-server`) for tests, the demo and the benchmark: one member or
//! a cluster of several, on an address the caller owns, in a temporary data directory, on free
//! ports. Dropping it (also while a test panics) kills every member and removes the data.
//!
//! The members are started from the calling thread, so they live in that thread's network
//! namespace: call [`EtcdServer::start`] inside `Netns::run_in` to serve a test bed's
//! namespaces.
//!
//! [`EtcdServer::start_tls`] starts it with mutual TLS on its client and peer URLs (the
//! certificates of a `vmm tls` directory; clients must present one of the same CA), and a
//! plain metrics URL that serves only `/health`, for the start-up check.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmm::transport::pki::{CA_CERT, CERT, KEY};

/// How long a member may take to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error("etcd is not installed (install Debian's etcd-server; resources/setup.sh does): {0}")]
    NotInstalled(std::io::Error),
    #[error("cannot prepare etcd's data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("cannot find a free port on {0}: {1}")]
    Port(IpAddr, std::io::Error),
    #[error("etcd member {name} did not become healthy within {} s; its log:\n{log}", START_TIMEOUT.as_secs())]
    Unhealthy { name: String, log: String },
}

struct Member {
    name: String,
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    /// Where `/health` answers in plain HTTP (the client URL, or with TLS the metrics URL).
    health: SocketAddr,
    args: Vec<String>,
}

/// A running etcd of one or more members.
pub struct EtcdServer {
    members: Vec<Member>,
    dir: PathBuf,
    /// `https` with mutual TLS, else `http`.
    scheme: &'static str,
}

impl EtcdServer {
    /// Starts a cluster of `members` etcd processes listening on `ip`, and waits until every
    /// member is healthy.
    pub fn start(ip: IpAddr, members: usize) -> Result<EtcdServer, EtcdServerError> {
        EtcdServer::start_with(ip, members, None)
    }

    /// [`EtcdServer::start`] with mutual TLS between clients and members and among members:
    /// `tls_dir` holds the members' identity (`cert.pem`, `key.pem`, naming `ip`) and the CA
    /// whose certificates clients must present (`ca.pem`), as `vmm tls issue` writes them.
    pub fn start_tls(ip: IpAddr, members: usize, tls_dir: &Path) -> Result<EtcdServer, EtcdServerError> {
        EtcdServer::start_with(ip, members, Some(tls_dir))
    }

    fn start_with(ip: IpAddr, members: usize, tls: Option<&Path>) -> Result<EtcdServer, EtcdServerError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir =
            std::env::temp_dir().join(format!("vmm-etcd-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| EtcdServerError::DataDir(dir.clone(), e))?;
        // From here on Drop removes the directory and whatever was started.
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut server = EtcdServer { members: Vec::new(), dir, scheme };
        let mut ports = Vec::new();
        // Held until every port is chosen, so no two are the same. Three per member: client,
        // peer, metrics.
        let mut held = Vec::new();
        for _ in 0..members.max(1) * 3 {
            let l = TcpListener::bind((ip, 0)).map_err(|e| EtcdServerError::Port(ip, e))?;
            ports.push(l.local_addr().map_err(|e| EtcdServerError::Port(ip, e))?.port());
            held.push(l);
        }
        drop(held);
        let names: Vec<String> = (0..members.max(1)).map(|i| format!("m{i}")).collect();
        let initial: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n}={scheme}://{}", SocketAddr::new(ip, ports[3 * i + 1])))
            .collect();
        let token = server.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            let client = SocketAddr::new(ip, ports[3 * i]);
            let peer = SocketAddr::new(ip, ports[3 * i + 1]);
            let metrics = SocketAddr::new(ip, ports[3 * i + 2]);
            let data = server.dir.join(name);
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={scheme}://{client}"),
                format!("--advertise-client-urls={scheme}://{client}"),
                format!("--listen-peer-urls={scheme}://{peer}"),
                format!("--initial-advertise-peer-urls={scheme}://{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".to_string(),
                format!("--initial-cluster-token={token}"),
                "--logger=zap".to_string(),
                "--log-outputs=stderr".to_string(),
                "--log-level=warn".to_string(),
            ];
            let health = match tls {
                None => client,
                Some(dir) => {
                    let file = |f: &str| dir.join(f).display().to_string();
                    let (cert, key, ca) = (file(CERT), file(KEY), file(CA_CERT));
                    args.extend([
                        format!("--cert-file={cert}"),
                        format!("--key-file={key}"),
                        format!("--trusted-ca-file={ca}"),
                        "--client-cert-auth".to_string(),
                        format!("--peer-cert-file={cert}"),
                        format!("--peer-key-file={key}"),
                        format!("--peer-trusted-ca-file={ca}"),
                        "--peer-client-cert-auth".to_string(),
                        format!("--listen-metrics-urls=http://{metrics}"),
                    ]);
                    metrics
                }
            };
            server.members.push(Member { name: name.clone(), child: None, client, peer, health, args });
            server.spawn(i)?;
        }
        for i in 0..server.members.len() {
            server.wait_healthy(i)?;
        }
        Ok(server)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) -> Result<(), EtcdServerError> {
        let log = self.log_path(i);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| EtcdServerError::DataDir(log.clone(), e))?;
        let err = file.try_clone().map_err(|e| EtcdServerError::DataDir(log.clone(), e))?;
        let child = Command::new("etcd")
            .args(&self.members[i].args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(EtcdServerError::NotInstalled)?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, i: usize) -> Result<(), EtcdServerError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let at = self.members[i].health;
        loop {
            if health(at) {
                return Ok(());
            }
            let exited = self.members[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten()).is_some();
            if exited || Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                return Err(EtcdServerError::Unhealthy { name: self.members[i].name.clone(), log });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URLs, one per member (`https://` with TLS).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("{}://{}", self.scheme, m.client)).collect()
    }

    /// The client URLs as one comma-separated argument.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// The data directory of all members.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills member `i` (SIGKILL), as a crash would.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` with its data, and waits until it is healthy.
    pub fn restart_member(&mut self, i: usize) -> Result<(), EtcdServerError> {
        self.kill_member(i);
        // Its data directory already holds the cluster: no "new" cluster state any more.
        for a in &mut self.members[i].args {
            if a == "--initial-cluster-state=new" {
                *a = "--initial-cluster-state=existing".into();
            }
        }
        self.spawn(i)?;
        self.wait_healthy(i)
    }

    /// Kills every member (the data stays until drop): "etcd is down".
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// Restarts every member after [`EtcdServer::kill_all`].
    pub fn restart_all(&mut self) -> Result<(), EtcdServerError> {
        for i in 0..self.members.len() {
            self.kill_member(i);
            for a in &mut self.members[i].args {
                if a == "--initial-cluster-state=new" {
                    *a = "--initial-cluster-state=existing".into();
                }
            }
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    /// The peer address of member `i`.
    pub fn peer(&self, i: usize) -> SocketAddr {
        self.members[i].peer
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether etcd at `addr` answers its `/health` with a healthy cluster.
fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}
