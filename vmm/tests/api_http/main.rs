// SPDX-License-Identifier: Apache-2.0
//! The API over a real unix socket: the server with a fake VMM thread behind it, talked to with
//! our client, with raw bytes for the malformed cases, and through the `vmm` binary's commands;
//! plus the check that `vmm/api/openapi.yaml` describes what the server serves.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::client::{ApiClient, ClientError, HttpResponse};
use vmm::api::routes::{self, ROUTES};
use vmm::api::server::{ApiServer, ApiServerError, ApiServerOptions, start_api_server, start_api_server_with};
use vmm::api::{
    ApiError, ApiMessage, ApiRequest, ApiResponse, DiskInfo, MigrateRequest, MigrationInfo, MigrationPhase,
    RestoreInfo, RestoreRequest, RoundInfo, SnapshotInfo, SnapshotPhase, SnapshotRequest, VmInfo, VmState,
};
use vmm::arch::cpuid::CpuTemplate;
use vmm::config::VmConfig;
use vmm::net_config::NetConfig;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

mod cli;
mod openapi;
mod robustness;
mod routing;
mod socket;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The fake VMM thread

fn sample_config() -> VmConfig {
    VmConfig {
        kernel: PathBuf::from("/boot/vmlinux"),
        initrd: Some(PathBuf::from("/boot/initrd.cpio")),
        cmdline: "console=ttyS0".to_string(),
        mem_mib: 256,
        vcpus: 2,
        cpu_template: CpuTemplate::Host,
        nets: vec!["tap=tap0,mac=52:54:00:12:34:56".parse::<NetConfig>().unwrap()],
        disks: vec!["path=/var/lib/vmm/data.img,shared".parse().unwrap()],
    }
}

fn sample_disk() -> DiskInfo {
    DiskInfo {
        path: PathBuf::from("/var/lib/vmm/data.img"),
        size_bytes: 1 << 30,
        allocated_bytes: 8 << 20,
        shared: true,
        ..Default::default()
    }
}

/// What a VMM would answer, as a small state machine: running/paused/shutting down, and a
/// migration that moves one phase further at each `GET /vm/migration`. A destination whose host
/// starts with "fail" makes the migration fail.
struct FakeVmm {
    state: VmState,
    migration: MigrationInfo,
    snapshot: SnapshotInfo,
    started: Instant,
    requests: u64,
}

impl FakeVmm {
    fn new() -> FakeVmm {
        FakeVmm {
            state: VmState::Running,
            migration: MigrationInfo::default(),
            snapshot: SnapshotInfo::default(),
            started: Instant::now(),
            requests: 0,
        }
    }

    fn answer(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.requests += 1;
        let busy = |what: &str, state: VmState| Err(ApiError::Conflict(format!("cannot {what}: the VM is {state:?}")));
        match request {
            ApiRequest::GetVm => Ok(ApiResponse::Vm(VmInfo {
                state: self.state,
                config: sample_config(),
                uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap(),
                disks: vec![sample_disk()],
            })),
            ApiRequest::Pause if self.state == VmState::Running => {
                self.state = VmState::Paused;
                Ok(ApiResponse::Done)
            }
            ApiRequest::Pause => busy("pause", self.state),
            ApiRequest::Resume if self.state == VmState::Paused => {
                self.state = VmState::Running;
                Ok(ApiResponse::Done)
            }
            ApiRequest::Resume => busy("resume", self.state),
            ApiRequest::Shutdown if self.state == VmState::ShuttingDown => busy("shut down", self.state),
            ApiRequest::Shutdown => {
                self.state = VmState::ShuttingDown;
                Ok(ApiResponse::Done)
            }
            ApiRequest::Migrate(req) if self.state == VmState::Running => {
                self.state = VmState::Migrating;
                self.migration =
                    MigrationInfo { phase: MigrationPhase::Setup, destination: Some(req.to), ..Default::default() };
                Ok(ApiResponse::Accepted)
            }
            ApiRequest::Migrate(_) => busy("migrate", self.state),
            ApiRequest::GetMigration => {
                self.advance_migration();
                Ok(ApiResponse::Migration(self.migration.clone()))
            }
            // A snapshot into a directory under /nonexistent fails; any other completes at once.
            ApiRequest::Snapshot(req) if matches!(self.state, VmState::Running | VmState::Paused) => {
                let failing = req.to.starts_with("/nonexistent");
                self.snapshot = SnapshotInfo {
                    phase: if failing { SnapshotPhase::Failed } else { SnapshotPhase::Completed },
                    dir: Some(req.to),
                    memory_bytes: 256 << 20,
                    memory_data_bytes: 3 << 20,
                    total_ms: 42,
                    downtime_ms: req.resume.then_some(40),
                    error: failing.then(|| "cannot create directory: No such file or directory".to_string()),
                    ..Default::default()
                };
                if !req.resume && !failing {
                    self.state = VmState::Paused;
                }
                Ok(ApiResponse::Accepted)
            }
            ApiRequest::Snapshot(_) => busy("take a snapshot", self.state),
            // The fake runs a VM already, as a real VMM that was not started waiting would.
            ApiRequest::Restore(_) => Err(ApiError::Conflict("this VMM runs a VM already".into())),
            ApiRequest::GetSnapshot => Ok(ApiResponse::Snapshot(self.snapshot.clone())),
            ApiRequest::Metrics => Ok(ApiResponse::Metrics(format!(
                "# TYPE vmm_api_requests_total counter\nvmm_api_requests_total {}\n",
                self.requests
            ))),
        }
    }

    fn advance_migration(&mut self) {
        let m = &mut self.migration;
        let failing = m.destination.as_deref().is_some_and(|d| d.starts_with("fail"));
        m.total_ms += 100;
        match m.phase {
            MigrationPhase::Setup if failing => {
                m.phase = MigrationPhase::Failed;
                m.error = Some("destination refused the VM: incompatible CPU".to_string());
                self.state = VmState::Running;
            }
            MigrationPhase::Setup => {
                m.phase = MigrationPhase::Precopy;
                m.round = 1;
            }
            MigrationPhase::Precopy if m.round < 3 => {
                m.round += 1;
                m.bytes_sent += 64 << 20;
                m.pages_sent += 16384;
                m.pages_skipped += 100;
                m.bandwidth_bytes_s = 640 << 20;
                m.eta_ms = 200;
            }
            MigrationPhase::Precopy => m.phase = MigrationPhase::StopAndCopy,
            MigrationPhase::StopAndCopy => {
                m.phase = MigrationPhase::Completed;
                m.downtime_ms = Some(12);
                m.downtime_destination_ms = Some(9);
                m.eta_ms = 0;
                self.state = VmState::Migrated;
            }
            MigrationPhase::Postcopy | MigrationPhase::PostcopyPaused => m.phase = MigrationPhase::Completed,
            MigrationPhase::None | MigrationPhase::Completed | MigrationPhase::Failed => {}
        }
    }
}

/// Runs a [`FakeVmm`] until the server side hangs up.
fn spawn_fake_vmm(rx: Receiver<ApiMessage>) {
    thread::spawn(move || {
        let mut vmm = FakeVmm::new();
        for (request, reply) in rx {
            let _ = reply.send(vmm.answer(request));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Harness

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A private directory for one test's socket, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("vmm-api-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server on a fresh socket with a [`FakeVmm`] behind it.
struct Harness {
    server: ApiServer,
    wake: Arc<EventFd>,
    // Last, so the directory goes after the server has removed its socket.
    dir: TempDir,
}

impl Harness {
    fn new() -> Harness {
        let dir = TempDir::new();
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let server = start_api_server(&dir.sock(), tx, Arc::clone(&wake)).unwrap();
        spawn_fake_vmm(rx);
        Harness { server, wake, dir }
    }

    fn with_options(options: ApiServerOptions) -> Harness {
        let dir = TempDir::new();
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let server = start_api_server_with(&dir.sock(), tx, Arc::clone(&wake), options).unwrap();
        spawn_fake_vmm(rx);
        Harness { server, wake, dir }
    }

    /// A raw connection, for what our client would never send.
    fn connect(&self) -> BufReader<UnixStream> {
        let stream = UnixStream::connect(self.sock()).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        BufReader::new(stream)
    }

    fn sock(&self) -> PathBuf {
        self.dir.sock()
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(self.sock()).with_timeout(IO_TIMEOUT)
    }

    fn send(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        self.client().send(method, path, body.map(str::as_bytes)).unwrap()
    }
}

fn migrate_defaults() -> MigrateRequest {
    MigrateRequest::default()
}

fn json(response: &HttpResponse) -> serde_json::Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&response.body)))
}

/// Asserts an error answer: its status, a JSON `{"error"}` body, and a message containing `needle`.
fn assert_error(response: &HttpResponse, status: u16, needle: &str) {
    assert_eq!(response.status, status, "{:?}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.header("Content-Type"), Some("application/json"));
    let message = json(response)["error"].as_str().unwrap().to_string();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

/// Sends `bytes` as they are, then reads everything the server sends until it closes.
fn raw_exchange(sock: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(bytes).unwrap();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads one answer off a raw connection: head, then a body of `Content-Length` bytes unless
/// `head_only` (the answer to a `HEAD`).
fn read_answer(reader: &mut BufReader<UnixStream>, head_only: bool) -> HttpResponse {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = reader.read_until(b'\n', &mut head).unwrap();
        assert!(n > 0, "the connection closed in the middle of an answer: {:?}", String::from_utf8_lossy(&head));
    }
    let mut fields = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut fields);
    assert!(parsed.parse(&head).unwrap().is_complete());
    let headers = parsed
        .headers
        .iter()
        .map(|field| (field.name.to_string(), String::from_utf8(field.value.to_vec()).unwrap()))
        .collect();
    let mut response = HttpResponse { status: parsed.code.unwrap(), headers, body: Vec::new() };
    if let (Some(len), false) = (response.header("Content-Length"), head_only) {
        response.body = vec![0; len.parse().unwrap()];
        reader.read_exact(&mut response.body).unwrap();
    }
    response
}

/// Whether the server closed the connection, with nothing more to read (within [`IO_TIMEOUT`]).
fn closed_by_server(reader: &mut BufReader<UnixStream>) -> bool {
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        // The server closed with something we sent still unread.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => rest.is_empty(),
        Err(e) => panic!("{e} after {:?}", String::from_utf8_lossy(&rest)),
    }
}

/// Sends a `GET /vm` on `reader`'s connection and checks the answer.
fn get_vm_on(reader: &mut BufReader<UnixStream>, extra_headers: &str) -> HttpResponse {
    let request = format!("GET /vm HTTP/1.1\r\nHost: x\r\n{extra_headers}\r\n");
    reader.get_mut().write_all(request.as_bytes()).unwrap();
    let response = read_answer(reader, false);
    assert_eq!(response.status, 200, "{:?}", String::from_utf8_lossy(&response.body));
    assert_eq!(serde_json::from_slice::<VmInfo>(&response.body).unwrap().state, VmState::Running);
    response
}
