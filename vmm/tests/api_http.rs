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
    ApiError, ApiMessage, ApiRequest, ApiResponse, DiskInfo, MigrateRequest, MigrationInfo, MigrationPhase, RoundInfo,
    VmInfo, VmState,
};
use vmm::arch::cpuid::CpuTemplate;
use vmm::config::VmConfig;
use vmm::net_config::NetConfig;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

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
    started: Instant,
    requests: u64,
}

impl FakeVmm {
    fn new() -> FakeVmm {
        FakeVmm { state: VmState::Running, migration: MigrationInfo::default(), started: Instant::now(), requests: 0 }
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

// ---------------------------------------------------------------------------------------------
// Routes

#[test]
fn every_route_answers() {
    let h = Harness::new();

    let r = h.send("GET", "/vm", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let vm: VmInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.config, sample_config());

    for (path, state) in [("/vm/pause", VmState::Paused), ("/vm/resume", VmState::Running)] {
        let r = h.send("PUT", path, None);
        assert_eq!((r.status, r.body.len()), (204, 0), "{path}");
        assert_eq!(h.client().get_vm().unwrap().state, state);
    }

    let r = h.send("GET", "/vm/migration", None);
    assert_eq!(r.status, 200);
    assert_eq!(serde_json::from_slice::<MigrationInfo>(&r.body).unwrap().phase, MigrationPhase::None);

    let r = h.send("PUT", "/vm/migrate", Some(r#"{"to":"10.0.0.2:4000","downtime_ms":30}"#));
    assert_eq!(r.status, 202);
    assert_eq!(json(&r), serde_json::json!({"status": "accepted"}));
    let m = h.client().migration().unwrap();
    assert_eq!(m.destination.as_deref(), Some("10.0.0.2:4000"));
    assert_ne!(m.phase, MigrationPhase::None);

    let r = h.send("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain; version=0.0.4"));
    assert!(String::from_utf8(r.body).unwrap().contains("vmm_api_requests_total "));

    // A query string does not change the route.
    assert_eq!(h.send("GET", "/vm?verbose=1", None).status, 200);

    let r = h.send("PUT", "/vm/shutdown", None);
    assert_eq!(r.status, 204);
    assert_eq!(h.client().get_vm().unwrap().state, VmState::ShuttingDown);

    // Every request woke the VMM thread's event loop.
    assert!(h.wake.read().unwrap() >= 10);
}

#[test]
fn unknown_route_is_404() {
    let h = Harness::new();
    assert_error(&h.send("GET", "/vm/nothing-here", None), 404, "/vm/nothing-here");
    assert_error(&h.send("GET", "/", None), 404, "no such route");
}

#[test]
fn wrong_method_is_405_with_allow() {
    let h = Harness::new();
    let r = h.send("DELETE", "/vm", None);
    assert_error(&r, 405, "DELETE");
    assert_eq!(r.header("Allow"), Some("GET"));
    let r = h.send("GET", "/vm/pause", None);
    assert_error(&r, 405, "/vm/pause");
    assert_eq!(r.header("Allow"), Some("PUT"));
    let r = h.send("POST", "/vm/migrate", Some(r#"{"to":"a:1"}"#));
    assert_eq!((r.status, r.header("Allow")), (405, Some("PUT")));
}

#[test]
fn bad_migrate_bodies_are_400_naming_the_field() {
    let h = Harness::new();
    for (body, needle) in [
        ("", "`to`"),
        ("{", "invalid body"),
        ("[1,2]", "invalid body"),
        ("{}", "missing field `to`"),
        (r#"{"to":42}"#, "invalid type"),
        (r#"{"to":"nohost"}"#, "`to`"),
        (r#"{"to":"host:http"}"#, "`to`"),
        (r#"{"to":"h:1","downtime_ms":0}"#, "`downtime_ms`"),
        (r#"{"to":"h:1","downtime_ms":-5}"#, "invalid value"),
        (r#"{"to":"h:1","max_rounds":0}"#, "`max_rounds`"),
        (r#"{"to":"h:1","turbo":true}"#, "unknown field `turbo`"),
    ] {
        assert_error(&h.send("PUT", "/vm/migrate", Some(body)), 400, needle);
    }
    // None of them reached the VMM.
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn vmm_errors_pass_through() {
    let h = Harness::new();
    assert_error(&h.send("PUT", "/vm/resume", None), 409, "cannot resume");
    match h.client().resume() {
        Err(ClientError::Api { status: 409, message }) => assert!(message.contains("cannot resume"), "{message}"),
        other => panic!("{other:?}"),
    }
    h.client().migrate(&MigrateRequest { to: "h:1".into(), ..migrate_defaults() }).unwrap();
    assert_error(&h.send("PUT", "/vm/migrate", Some(r#"{"to":"h:1"}"#)), 409, "cannot migrate");
}

fn migrate_defaults() -> MigrateRequest {
    MigrateRequest::default()
}

#[test]
fn oversized_bodies_are_413() {
    let h = Harness::new();
    // Refused on the announced length, before reading anything.
    let big = "x".repeat(100 * 1024);
    assert_error(&h.send("PUT", "/vm/migrate", Some(&big)), 413, "too large");
    // A chunked body has no announced length: refused once the reader passes the cap.
    let chunk = "y".repeat(16 * 1024);
    let mut request =
        b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        request.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(&h.sock(), &request);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// Robustness

#[test]
fn absurd_content_length_does_not_kill_the_server() {
    let h = Harness::new();
    // Beyond isize::MAX, and beyond any machine's memory.
    for len in ["18446744073709551615", "1000000000000000"] {
        for path in ["/vm", "/vm/migrate"] {
            let request = format!("PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{{");
            let mut stream = UnixStream::connect(h.sock()).unwrap();
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut status = [0u8; 12];
            stream.read_exact(&mut status).unwrap();
            assert!(status.starts_with(b"HTTP/1.1 4"), "{}", String::from_utf8_lossy(&status));
            drop(stream);
            assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
        }
    }
}

#[test]
fn bad_clients_do_not_disturb_others() {
    let h = Harness::new();
    let client = h.client().with_timeout(Duration::from_secs(3));

    // Connects and says nothing.
    let _silent = UnixStream::connect(h.sock()).unwrap();
    // Stops half-way through the headers.
    let mut half_headers = UnixStream::connect(h.sock()).unwrap();
    half_headers.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nContent-").unwrap();
    // Announces a body too big to be buffered up front, sends some and stalls.
    let mut stalled = UnixStream::connect(h.sock()).unwrap();
    stalled.write_all(b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{\"to\":").unwrap();
    // Same, then hangs up: the server sees the body end early.
    {
        let mut gone = UnixStream::connect(h.sock()).unwrap();
        gone.write_all(b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{\"to\":").unwrap();
    }
    // A small body cut short, then hang-up.
    {
        let mut gone = UnixStream::connect(h.sock()).unwrap();
        gone.write_all(b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").unwrap();
    }
    // Garbage, binary garbage and a request line without a version.
    for garbage in [&b"\x00\xff\xfe garbage\r\n\r\n"[..], b"HELLO\r\n\r\n", b"GET /vm\r\n\r\n", b"\r\n\r\n\r\n"] {
        let answer = raw_exchange(&h.sock(), garbage);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
    // A header line without a colon.
    let answer = raw_exchange(&h.sock(), b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");

    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(client.get_vm().unwrap().state, VmState::Running);
    }
    client.pause().unwrap();
    client.resume().unwrap();
    assert!(start.elapsed() < Duration::from_secs(2), "normal clients were held up: {:?}", start.elapsed());

    // The stalled client, finishing at last, is answered too.
    stalled.write_all(&[b' '; 3994]).unwrap();
    stalled.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut answer = [0u8; 12];
    stalled.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 400");
    drop(half_headers);
    assert_eq!(client.get_vm().unwrap().state, VmState::Running);
}

#[test]
fn fifty_concurrent_requests_are_all_answered() {
    let h = Harness::new();
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let client = h.client();
            thread::spawn(move || client.get_vm())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap().state, VmState::Running);
    }
}

#[test]
fn vmm_gone_or_silent_is_503() {
    let dir = TempDir::new();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());

    let (tx, rx) = channel::<ApiMessage>();
    drop(rx);
    let gone = start_api_server(&dir.sock(), tx, Arc::clone(&wake)).unwrap();
    let r = ApiClient::new(dir.sock()).send("GET", "/vm", None).unwrap();
    assert_error(&r, 503, "not taking API requests");
    drop(gone);

    // Receives requests but never answers them.
    let (tx, rx) = channel::<ApiMessage>();
    let held = thread::spawn(move || rx.iter().collect::<Vec<_>>());
    let options = ApiServerOptions { reply_timeout: Duration::from_millis(200), ..Default::default() };
    let mut silent = start_api_server_with(&dir.sock(), tx, wake, options).unwrap();
    let r = ApiClient::new(dir.sock()).send("GET", "/vm", None).unwrap();
    assert_error(&r, 503, "did not answer in time");
    silent.stop();
    assert_eq!(held.join().unwrap().len(), 1);
}

#[test]
fn idle_connections_do_not_starve_a_request() {
    let h = Harness::new();
    // Twenty that say nothing, and five that stop half-way, all left open.
    let mut idle: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(h.sock()).unwrap()).collect();
    for half in [&b"GET /vm HTTP/1.1\r\nHo"[..], b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"] {
        for _ in 0..5 {
            let mut stream = UnixStream::connect(h.sock()).unwrap();
            stream.write_all(half).unwrap();
            idle.push(stream);
        }
    }
    let client = h.client().with_timeout(Duration::from_secs(2));
    let start = Instant::now();
    for _ in 0..10 {
        assert_eq!(client.get_vm().unwrap().state, VmState::Running);
    }
    assert!(start.elapsed() < Duration::from_secs(1), "held up by idle connections: {:?}", start.elapsed());
    drop(idle);
}

#[test]
fn connections_beyond_the_limit_get_503_at_once() {
    let h = Harness::with_options(ApiServerOptions { max_connections: 4, ..Default::default() });
    let idle: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(h.sock()).unwrap()).collect();
    // Accepted in order by one thread, so the four hold every place by now.
    let start = Instant::now();
    let mut extra = h.connect();
    let r = read_answer(&mut extra, false);
    assert_error(&r, 503, "too many API connections");
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(closed_by_server(&mut extra));
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());

    // The places come back when the idle clients go.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match h.client().get_vm() {
            Ok(vm) => break assert_eq!(vm.state, VmState::Running),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the server did not recover its connection places: {e}"),
        }
    }
}

#[test]
fn huge_content_length_is_413_before_reading() {
    let h = Harness::new();
    for len in ["1000000000000000", "18446744073709551616", "99999999999999999999999999999999"] {
        let start = Instant::now();
        let mut conn = h.connect();
        let request = format!("PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{{\"to\":");
        conn.get_mut().write_all(request.as_bytes()).unwrap();
        let r = read_answer(&mut conn, false);
        assert_error(&r, 413, "too large (at most 65536 bytes)");
        assert_eq!(r.header("Connection"), Some("close"));
        // The server shut its side at once, without waiting for the body.
        assert!(closed_by_server(&mut conn));
        assert!(start.elapsed() < Duration::from_secs(1), "{len}: {:?}", start.elapsed());
        assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
    }
    // Just over the limit, sent in full: the client can write it all and read the answer.
    let body = format!(r#"{{"to":"h:1","x":"{}"}}"#, "x".repeat(64 * 1024));
    assert_error(&h.send("PUT", "/vm/migrate", Some(&body)), 413, "too large");
}

#[test]
fn over_long_headers_are_431() {
    let h = Harness::new();
    let long_value = format!("GET /vm HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n", "v".repeat(20 * 1024));
    let long_target = format!("GET /vm?{} HTTP/1.1\r\nHost: x\r\n\r\n", "q".repeat(20 * 1024));
    let many = format!("GET /vm HTTP/1.1\r\n{}\r\n", (0..100).map(|i| format!("X-{i}: y\r\n")).collect::<String>());
    // No end of line at all, and still sending.
    let endless = "GET /vm HTTP/1.1\r\nX-Endless: ".to_string() + &"e".repeat(100 * 1024);
    for request in [long_value, long_target, many, endless] {
        let mut conn = h.connect();
        conn.get_mut().write_all(request.as_bytes()).unwrap();
        let r = read_answer(&mut conn, false);
        assert_error(&r, 431, "request header");
        assert!(closed_by_server(&mut conn));
        assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
    }
    // Just under the limit is fine.
    let mut conn = h.connect();
    get_vm_on(&mut conn, &format!("X-Long: {}\r\n", "v".repeat(15 * 1024)));
}

#[test]
fn stalled_clients_are_dropped_after_the_timeout() {
    let timeout = Duration::from_secs(1);
    let h = Harness::with_options(ApiServerOptions { request_timeout: timeout, ..Default::default() });
    let start = Instant::now();
    let mut silent = h.connect();
    let mut half_head = h.connect();
    half_head.get_mut().write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nContent-").unwrap();
    let mut half_body = h.connect();
    half_body.get_mut().write_all(b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"to\":").unwrap();
    // One byte at a time, each well within the timeout: the deadline is for the whole request.
    let mut trickle = h.connect();
    let trickler = {
        let mut stream = trickle.get_ref().try_clone().unwrap();
        thread::spawn(move || {
            for &b in b"GET /vm HTTP/1.1\r\nHost: x\r\nX-Slow: 0123456789abcdef\r\n\r\n" {
                if stream.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Meanwhile others are served.
    for _ in 0..5 {
        assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
    }
    assert!(start.elapsed() < timeout, "{:?}", start.elapsed());

    // Who began a request is told why it is dropped; who said nothing is just closed.
    for conn in [&mut half_head, &mut half_body, &mut trickle] {
        assert_error(&read_answer(conn, false), 408, "did not arrive in time");
        assert!(closed_by_server(conn));
    }
    assert!(closed_by_server(&mut silent));
    let waited = start.elapsed();
    assert!(waited >= timeout && waited < timeout * 3, "{waited:?}");
    trickler.join().unwrap();
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn connections_are_kept_alive_until_close() {
    let h =
        Harness::with_options(ApiServerOptions { request_timeout: Duration::from_millis(400), ..Default::default() });
    let mut conn = h.connect();
    // HTTP/1.1 connections stay open ...
    for _ in 0..3 {
        assert_eq!(get_vm_on(&mut conn, "").header("Connection"), None);
    }
    // ... also for errors whose request was read to its end, and for answers to HEAD (no body).
    conn.get_mut().write_all(b"GET /nowhere HTTP/1.1\r\n\r\nHEAD /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_error(&read_answer(&mut conn, false), 404, "/nowhere");
    let r = read_answer(&mut conn, true);
    assert_eq!((r.status, r.header("Allow")), (405, Some("GET")));
    // Pipelined requests are answered in order, bodies and all.
    let migrate = r#"{"to":"h:1"}"#;
    let pipelined = format!(
        "PUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\nPUT /vm/migrate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}\
         PUT /vm/migrate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n\
         PUT /vm/resume HTTP/1.1\r\nContent-Length: {}\r\n\r\n{migrate}",
        migrate.len()
    );
    conn.get_mut().write_all(pipelined.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut conn, false).status, 204);
    assert_error(&read_answer(&mut conn, false), 400, "missing field `to`");
    assert_error(&read_answer(&mut conn, false), 400, "missing field `to`");
    assert_eq!(read_answer(&mut conn, false).status, 204);
    // `Connection: close` ends it after the answer.
    assert_eq!(get_vm_on(&mut conn, "Connection: close\r\n").header("Connection"), Some("close"));
    assert!(closed_by_server(&mut conn));

    // HTTP/1.0 gets one answer per connection.
    let mut conn = h.connect();
    conn.get_mut().write_all(b"GET /vm HTTP/1.0\r\n\r\n").unwrap();
    let r = read_answer(&mut conn, false);
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    assert!(closed_by_server(&mut conn));

    // A request refused before its body was read closes the connection: the body's end is unknown.
    let mut conn = h.connect();
    conn.get_mut().write_all(b"POST /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap();
    let r = read_answer(&mut conn, false);
    assert_eq!((r.status, r.header("Connection")), (405, Some("close")));
    assert!(closed_by_server(&mut conn));

    // An idle connection is closed after the request timeout, without an answer.
    let mut conn = h.connect();
    get_vm_on(&mut conn, "");
    let idle_since = Instant::now();
    assert!(closed_by_server(&mut conn));
    assert!(idle_since.elapsed() < Duration::from_secs(2), "{:?}", idle_since.elapsed());
}

#[test]
fn expect_100_continue() {
    let h = Harness::new();
    let mut conn = h.connect();
    let body = br#"{"to":"10.0.0.2:4000"}"#;
    let head = format!("PUT /vm/migrate HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len());
    conn.get_mut().write_all(head.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut conn, true).status, 100);
    conn.get_mut().write_all(body).unwrap();
    assert_eq!(read_answer(&mut conn, false).status, 202);
    // Too large: refused without a 100, so the client need not send its body at all.
    let mut conn = h.connect();
    conn.get_mut()
        .write_all(b"PUT /vm/migrate HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 70000\r\n\r\n")
        .unwrap();
    assert_error(&read_answer(&mut conn, false), 413, "too large");
}

#[test]
fn stop_does_not_wait_for_open_connections() {
    let dir = TempDir::new();
    let (tx, rx) = channel::<ApiMessage>();
    let mut server = start_api_server(&dir.sock(), tx, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())).unwrap();
    let vmm = thread::spawn(move || {
        // Answers like a VMM, and returns once the server let go of its end of the channel.
        let mut fake = FakeVmm::new();
        for (request, reply) in rx {
            let _ = reply.send(fake.answer(request));
        }
    });
    let _idle: Vec<UnixStream> = (0..10).map(|_| UnixStream::connect(dir.sock()).unwrap()).collect();
    let mut half = UnixStream::connect(dir.sock()).unwrap();
    half.write_all(b"PUT /vm/migrate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{").unwrap();
    let mut kept = BufReader::new(UnixStream::connect(dir.sock()).unwrap());
    kept.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    get_vm_on(&mut kept, "");

    let start = Instant::now();
    server.stop();
    assert!(start.elapsed() < Duration::from_millis(500), "stop waited {:?}", start.elapsed());
    assert!(!dir.sock().exists());
    // The VMM's channel closed with `stop`, not with the last connection.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !vmm.is_finished() {
        assert!(Instant::now() < deadline, "the server still holds the VMM's channel");
        thread::sleep(Duration::from_millis(10));
    }
    // A connection still open is told the VMM is out of reach.
    kept.get_mut().write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_error(&read_answer(&mut kept, false), 503, "not taking API requests");
}

// ---------------------------------------------------------------------------------------------
// The socket file

#[test]
fn socket_is_private() {
    let h = Harness::new();
    let mode = std::fs::metadata(h.sock()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert_eq!(h.server.path(), h.sock());
}

#[test]
fn live_socket_is_refused() {
    let h = Harness::new();
    let (tx, _rx) = channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let err = start_api_server(&h.sock(), tx, wake).err().unwrap();
    assert!(matches!(err, ApiServerError::InUse(_)), "{err:?}");
    assert_eq!(err.to_string(), format!("API socket {} is in use by another process", h.sock().display()));
    // The first server is unharmed.
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = TempDir::new();
    // A socket whose listener is gone, as a crashed VMM leaves it.
    drop(UnixListener::bind(dir.sock()).unwrap());
    assert!(dir.sock().exists());
    let (tx, rx) = channel();
    spawn_fake_vmm(rx);
    let server = start_api_server(&dir.sock(), tx, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())).unwrap();
    assert_eq!(ApiClient::new(dir.sock()).get_vm().unwrap().state, VmState::Running);
    drop(server);

    std::fs::write(dir.sock(), b"precious").unwrap();
    let (tx, _rx) = channel();
    let err = start_api_server(&dir.sock(), tx, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())).err().unwrap();
    assert!(matches!(err, ApiServerError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(dir.sock()).unwrap(), b"precious");
}

#[test]
fn socket_is_removed_on_stop_and_drop() {
    let mut h = Harness::new();
    assert!(h.sock().exists());
    h.server.stop();
    assert!(!h.sock().exists());
    h.server.stop();
    assert!(matches!(h.client().get_vm(), Err(ClientError::Connect { .. })));

    let h = Harness::new();
    let sock = h.sock();
    drop(h.server);
    assert!(!sock.exists());
}

// ---------------------------------------------------------------------------------------------
// The command line

fn vmm_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm")).args(args).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[test]
fn cli_status() {
    let h = Harness::new();
    let sock = h.sock();
    let sock = sock.to_str().unwrap();

    let (code, out, err) = vmm_cli(&["status", "--api-sock", sock]);
    assert_eq!((code, err.as_str()), (0, ""));
    for needle in ["running", "256 MiB", "vCPUs", "/boot/vmlinux", "tap0", "52:54:00:12:34:56"] {
        assert!(out.contains(needle), "{needle} missing from\n{out}");
    }

    let (code, out, _) = vmm_cli(&["status", "--api-sock", sock, "--json"]);
    assert_eq!(code, 0);
    let vm: VmInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(vm.config, sample_config());
}

#[test]
fn cli_pause_resume_stop() {
    let h = Harness::new();
    let sock = h.sock();
    let sock = sock.to_str().unwrap();
    assert_eq!(vmm_cli(&["pause", "--api-sock", sock]), (0, String::new(), String::new()));
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Paused);
    assert_eq!(vmm_cli(&["resume", "--api-sock", sock]), (0, String::new(), String::new()));

    let (code, out, err) = vmm_cli(&["resume", "--api-sock", sock]);
    assert_ne!(code, 0);
    assert_eq!(out, "");
    assert!(err.starts_with("vmm: error: cannot resume"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    assert_eq!(vmm_cli(&["stop", "--api-sock", sock]).0, 0);
    assert_eq!(h.client().get_vm().unwrap().state, VmState::ShuttingDown);
}

#[test]
fn cli_migrate() {
    let h = Harness::new();
    let sock = h.sock();
    let sock = sock.to_str().unwrap();
    let (code, out, err) = vmm_cli(&["migrate", "--api-sock", sock, "--to", "127.0.0.1:4000", "--downtime-ms", "20"]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.starts_with("migration to 127.0.0.1:4000: completed\n"), "{out}");
    for needle in ["total time", "downtime (source)", "12 ms", "downtime (destination)", "9 ms", "rounds", "pages sent"]
    {
        assert!(out.contains(needle), "{needle} missing from\n{out}");
    }
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Migrated);

    // Again from the start, with --json and a failing destination.
    let h = Harness::new();
    let sock = h.sock();
    let (code, out, err) =
        vmm_cli(&["migrate", "--api-sock", sock.to_str().unwrap(), "--to", "fail.example:4000", "--json"]);
    assert_ne!(code, 0);
    let info: MigrationInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(info.phase, MigrationPhase::Failed);
    assert_eq!(
        err.trim_end(),
        "vmm: error: migration to fail.example:4000 failed: destination refused the VM: incompatible CPU"
    );
}

#[test]
fn cli_errors_are_one_line() {
    let (code, out, err) = vmm_cli(&["status", "--api-sock", "/nonexistent/api.sock"]);
    assert_ne!(code, 0);
    assert_eq!(out, "");
    assert!(err.starts_with("vmm: error: cannot connect to the VMM API at /nonexistent/api.sock: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A socket that answers nonsense.
    let dir = TempDir::new();
    let listener = UnixListener::bind(dir.sock()).unwrap();
    let nonsense = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
    });
    let (code, _, err) = vmm_cli(&["pause", "--api-sock", dir.sock().to_str().unwrap()]);
    nonsense.join().unwrap();
    assert_ne!(code, 0);
    assert!(err.starts_with("vmm: error: malformed answer from the VMM API"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // Bad arguments are clap's business, and never reach the socket.
    let (code, _, err) = vmm_cli(&["migrate", "--api-sock", "/x", "--to", "nohost"]);
    assert_eq!(code, 2);
    assert!(err.contains("HOST:PORT"), "{err}");
    let (code, _, _) = vmm_cli(&["migrate", "--api-sock", "/x", "--to", "h:1", "--downtime-ms", "0"]);
    assert_eq!(code, 2);
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document

const OPENAPI: &str = include_str!("../api/openapi.yaml");

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines of the block under `key` (a line `key:` at `level` spaces), up to the next line at
/// that indentation or less.
fn block<'a>(lines: &[&'a str], key: &str, level: usize) -> Vec<&'a str> {
    let start = lines
        .iter()
        .position(|l| indent(l) == level && l.trim_end() == format!("{}{key}:", " ".repeat(level)))
        .unwrap_or_else(|| panic!("no `{key}:` at indentation {level}"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > level)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .copied()
        .collect()
}

/// Keys of the entries directly under a block (at `level` spaces).
fn keys(lines: &[&str], level: usize) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|l| indent(l) == level)
        .filter_map(|l| l.trim().split_once(':').map(|(k, _)| k.trim_matches('"').to_string()))
        .collect()
}

/// The `(method, path, success status)` triples in `paths:`.
fn openapi_operations() -> BTreeSet<(String, String, u16)> {
    let lines: Vec<&str> = OPENAPI.lines().collect();
    let paths = block(&lines, "paths", 0);
    let mut ops = BTreeSet::new();
    for path in keys(&paths, 2) {
        let path_block = block(&paths, &path, 2);
        for method in keys(&path_block, 4) {
            let responses = block(&block(&path_block, &method, 4), "responses", 6);
            let success: Vec<u16> =
                keys(&responses, 8).iter().filter_map(|c| c.parse().ok()).filter(|c| (200..300).contains(c)).collect();
            assert_eq!(success.len(), 1, "{method} {path} documents {success:?}");
            ops.insert((method.to_uppercase(), path.clone(), success[0]));
        }
    }
    ops
}

fn schema(name: &str) -> Vec<&'static str> {
    let lines: Vec<&str> = OPENAPI.lines().collect();
    block(&block(&block(&lines, "components", 0), "schemas", 2), name, 4)
}

fn schema_properties(name: &str) -> BTreeSet<String> {
    keys(&block(&schema(name), "properties", 6), 8)
}

fn schema_enum(name: &str) -> BTreeSet<String> {
    let lines = schema(name);
    let line = lines.iter().find(|l| l.trim_start().starts_with("enum:")).unwrap();
    let list = line.trim().trim_start_matches("enum:").trim().trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(|v| v.trim().to_string()).collect()
}

fn json_keys(value: impl serde::Serialize) -> BTreeSet<String> {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

fn json_strings<T: serde::Serialize>(values: &[T]) -> BTreeSet<String> {
    values.iter().map(|v| serde_json::to_value(v).unwrap().as_str().unwrap().to_string()).collect()
}

#[test]
fn openapi_routes_match_the_server() {
    let served: BTreeSet<(String, String, u16)> = ROUTES
        .iter()
        .map(|&(method, path)| {
            let status = routes::route(method, path).unwrap().success_status();
            (method.to_string(), path.to_string(), status)
        })
        .collect();
    assert_eq!(openapi_operations(), served);
}

#[test]
fn openapi_schemas_match_serde() {
    let vm = VmInfo { state: VmState::Running, config: sample_config(), uptime_ms: 1, disks: vec![sample_disk()] };
    assert_eq!(schema_properties("VmInfo"), json_keys(&vm));
    assert_eq!(schema_properties("DiskInfo"), json_keys(&vm.disks[0]));
    assert_eq!(schema_properties("DiskCounters"), json_keys(&vm.disks[0].io));
    assert_eq!(schema_properties("VmConfig"), json_keys(&vm.config));
    assert_eq!(schema_properties("NetConfig"), json_keys(&vm.config.nets[0]));
    let migrate = MigrateRequest { to: "h:1".into(), ..migrate_defaults() };
    assert_eq!(schema_properties("MigrateRequest"), json_keys(&migrate));
    assert_eq!(schema_properties("MigrationInfo"), json_keys(MigrationInfo::default()));
    assert_eq!(schema_properties("RoundInfo"), json_keys(RoundInfo::default()));
    assert_eq!(schema_properties("Error"), BTreeSet::from(["error".to_string()]));

    // The match has no wildcard arm so that a new variant fails to compile here until the
    // document (and this list) has it.
    let all_states = [VmState::Running, VmState::Paused, VmState::Migrating, VmState::Migrated, VmState::ShuttingDown];
    for s in all_states {
        match s {
            VmState::Running | VmState::Paused | VmState::Migrating | VmState::Migrated | VmState::ShuttingDown => {}
        }
    }
    assert_eq!(schema_enum("VmState"), json_strings(&all_states));

    use MigrationPhase as P;
    let all_phases = [P::None, P::Setup, P::Precopy, P::StopAndCopy, P::Completed, P::Failed];
    for p in all_phases {
        match p {
            P::None | P::Setup | P::Precopy | P::StopAndCopy | P::Completed | P::Failed => {}
        }
    }
    assert_eq!(schema_enum("MigrationPhase"), json_strings(&all_phases));

    let all_templates = [CpuTemplate::Host, CpuTemplate::Baseline];
    for t in all_templates {
        match t {
            CpuTemplate::Host | CpuTemplate::Baseline => {}
        }
    }
    assert_eq!(schema_enum("CpuTemplate"), json_strings(&all_templates));
}
