// SPDX-License-Identifier: Apache-2.0
//! The API of a real `vmm` running our own guest, over its unix socket and through the `vmm`
//! command line: status, pause and resume, shutdown, every error class (including a migration to
//! a destination that never answers), clients that misbehave, many clients at once, the metrics,
//! and the command line's own errors.
//!
//! The guest runs the `dirty` workload, which prints `DIRTY pass=N ...` about once a second from
//! its own clock: new lines show that the guest runs, no new lines that it is stopped. The
//! machine running these tests is small and shared, so every wait is generous and nothing
//! asserts how long something took.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vmm::api::client::ApiClient;
use vmm::api::{MigrationInfo, MigrationPhase, VmInfo, VmState};
use vmm_tests::pki::{pki, tls_args};
use vmm_tests::vm::{Vm, api_sock_path, guest_kernel, kvm_or_skip, vmm_bin};

/// 2 MiB rewritten at 1 MiB/s: one pass, and so one `DIRTY` line, a second. Not 1 MiB: that is a
/// single step of the workload, and its rate limit only spaces the steps within a pass, so a
/// one-step region is rewritten without pause and keeps a host CPU busy.
const DIRTY_GUEST: &str = "vmm.workload=dirty vmm.dirty_mib=2 vmm.dirty_rate=1";
/// For anything that normally takes milliseconds to a couple of seconds.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers

/// Starts `vmm run` on our guest with `cmdline`, `extra` arguments, an API socket and a TLS
/// identity for migrations (unless `extra` says otherwise); waits for the API and the guest's
/// ready line.
fn start_vm(tag: &str, cmdline: &str, extra: &[&str]) -> Vm {
    let kernel = guest_kernel();
    let sock = api_sock_path(tag);
    let mut args: Vec<String> =
        ["run", "--kernel", path_str(&kernel), "--api-sock", path_str(&sock), "--cmdline", cmdline]
            .map(str::to_string)
            .into();
    if !extra.contains(&"--no-tls-identity") {
        args.extend(tls_args(pki().ca_dir()));
    }
    args.extend(extra.iter().filter(|&&a| a != "--no-tls-identity").map(|a| a.to_string()));
    let vm = Vm::start(None, &args);
    assert!(vm.wait_api(PATIENCE), "the API did not answer\n{}", vm.describe());
    let ready = vm.console.wait_line(PATIENCE, |l| l.starts_with("GUEST-READY"));
    assert!(ready.is_some(), "no ready line\n{}", vm.describe());
    vm
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn sock(vm: &Vm) -> PathBuf {
    vm.api_sock.clone().expect("started with --api-sock")
}

fn get_vm(vm: &Vm) -> VmInfo {
    vm.api().get_vm().unwrap_or_else(|e| panic!("GET /vm: {e}\n{}", vm.describe()))
}

fn migration(vm: &Vm) -> MigrationInfo {
    vm.api().migration().unwrap_or_else(|e| panic!("GET /vm/migration: {e}\n{}", vm.describe()))
}

fn assert_state(vm: &Vm, state: VmState) {
    let info = get_vm(vm);
    assert_eq!(info.state, state, "{info:?}\n{}", vm.describe());
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pass of a `DIRTY pass=N mib=.. ms=.. mismatches=..` line.
fn dirty_pass(line: &str) -> Option<u64> {
    line.strip_prefix("DIRTY pass=")?.split_whitespace().next()?.parse().ok()
}

/// The passes of every `DIRTY` line so far.
fn passes(vm: &Vm) -> Vec<u64> {
    vm.console.lines(|l| dirty_pass(l).is_some()).iter().filter_map(|l| dirty_pass(l)).collect()
}

fn last_pass(vm: &Vm) -> u64 {
    passes(vm).last().copied().unwrap_or(0)
}

/// Waits for a `DIRTY` line of a pass after `after`, i.e. for the guest to make progress.
fn wait_pass_after(vm: &Vm, after: u64, timeout: Duration) -> u64 {
    let line = vm.console.wait_line(timeout, |l| dirty_pass(l).is_some_and(|p| p > after));
    line.and_then(|l| dirty_pass(&l))
        .unwrap_or_else(|| panic!("no DIRTY line after pass {after} within {timeout:?}\n{}", vm.describe()))
}

/// The guest's passes only went up and its memory checks never failed.
fn assert_guest_sound(vm: &Vm) {
    let p = passes(vm);
    assert!(p.windows(2).all(|w| w[0] < w[1]), "passes out of order: {p:?}\n{}", vm.describe());
    let bad = vm.console.lines(|l| l.starts_with("DIRTY") && !l.trim_end().ends_with("mismatches=0"));
    assert!(bad.is_empty(), "the guest found corrupted memory: {bad:?}\n{}", vm.describe());
}

/// An HTTP answer read off the socket by hand.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    /// The `error` of a `{"error": "..."}` body.
    fn error(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["error"].as_str().map(str::to_string)
    }
}

/// Connects to `sock`, writes `request` as it is and reads until the server closes.
fn exchange(sock: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        // A reset after garbage is a fine way to refuse it; a timeout is not.
        let timed_out = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
        assert!(!timed_out, "no answer to {:?} within {PATIENCE:?}", String::from_utf8_lossy(request));
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// One HTTP/1.1 request written by hand; the status line and body of the answer.
fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let body = body.unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let text = exchange(sock, request.as_bytes());
    let status = text
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Answer { status, body }
}

/// Asserts that `answer` is an error with `status` and a JSON message containing `needle`;
/// returns the message.
fn assert_refused(vm: &Vm, what: &str, answer: &Answer, status: u16, needle: &str) -> String {
    assert_eq!(answer.status, status, "{what}: {answer:?}\n{}", vm.describe());
    let message = answer.error().unwrap_or_else(|| panic!("{what}: no {{\"error\"}} body in {answer:?}"));
    assert!(message.contains(needle), "{what}: {message:?} lacks {needle:?}");
    message
}

/// What a `vmm` command printed and how it ended.
#[derive(Debug)]
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn vmm_cli(args: &[&str]) -> CliRun {
    let out = Command::new(vmm_bin()).args(args).output().expect("run vmm");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    CliRun { code: out.status.code(), stdout: text(out.stdout), stderr: text(out.stderr) }
}

/// Asserts a command failed with exactly one line on stderr, `vmm: error: ...` containing
/// `needle`, and nothing on stdout.
fn assert_cli_error(run: &CliRun, needle: &str) {
    assert!(run.code.is_some_and(|c| c != 0), "should fail: {run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "not one line: {run:?}");
    assert!(run.stderr.starts_with("vmm: error: "), "{run:?}");
    assert!(run.stderr.contains(needle), "{needle:?} missing: {run:?}");
}

/// Asserts a command succeeded silently (`vmm pause|resume|stop`).
fn assert_cli_quiet_success(run: &CliRun) {
    assert_eq!((run.code, run.stdout.as_str(), run.stderr.as_str()), (Some(0), "", ""), "{run:?}");
}

/// Accepts one connection on `listener`, waiting at most `timeout`.
fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    wait_until(timeout, || {
        accepted = listener.accept().ok().map(|(s, _)| s);
        accepted.is_some()
    });
    accepted
}

/// Polls `GET /vm` and `GET /vm/migration` until the migration failed and the VM runs again.
fn wait_migration_failed(vm: &Vm) -> MigrationInfo {
    let settled =
        wait_until(PATIENCE, || migration(vm).phase == MigrationPhase::Failed && get_vm(vm).state == VmState::Running);
    let info = migration(vm);
    assert!(settled, "the migration did not fail back to running: {info:?}, {:?}\n{}", get_vm(vm), vm.describe());
    info
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn status_reports_the_running_vm() {
    if !kvm_or_skip("status_reports_the_running_vm") {
        return;
    }
    let vm = start_vm("status", DIRTY_GUEST, &["--mem-mib", "96", "--vcpus", "2"]);
    let first = get_vm(&vm);
    assert_eq!(first.state, VmState::Running, "{}", vm.describe());
    assert_eq!(first.config.kernel, guest_kernel());
    assert_eq!((first.config.mem_mib, first.config.vcpus), (96, 2));
    assert_eq!(first.config.cmdline, DIRTY_GUEST);
    assert!(first.config.initrd.is_none() && first.config.nets.is_empty(), "{first:?}");
    std::thread::sleep(Duration::from_millis(200));
    let second = get_vm(&vm);
    assert!(second.uptime_ms > first.uptime_ms, "uptime did not grow: {} then {}", first.uptime_ms, second.uptime_ms);

    let sock = sock(&vm);
    let run = vmm_cli(&["status", "--api-sock", path_str(&sock)]);
    assert_eq!((run.code, run.stderr.as_str()), (Some(0), ""), "{run:?}");
    let field = |label: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.strip_prefix(label).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {label:?} line in\n{}", run.stdout))
    };
    assert_eq!(field("state:"), "running");
    assert_eq!(field("vCPUs:"), "2");
    assert_eq!(field("memory:"), "96 MiB");
    assert_eq!(field("kernel:"), guest_kernel().display().to_string());
    assert_eq!(field("cmdline:"), DIRTY_GUEST);
    field("uptime:");

    let run = vmm_cli(&["status", "--api-sock", path_str(&sock), "--json"]);
    assert_eq!((run.code, run.stderr.as_str()), (Some(0), ""), "{run:?}");
    let info: VmInfo = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config, first.config);
    assert!(info.uptime_ms >= second.uptime_ms, "{info:?}");
    assert!(vm.try_wait().is_none(), "{}", vm.describe());
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_or_skip("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let vm = start_vm("pause", DIRTY_GUEST, &[]);
    let sock = sock(&vm);
    let first = wait_pass_after(&vm, 0, PATIENCE);
    let mut last = wait_pass_after(&vm, first, PATIENCE);

    // One round through the API, one through the command line.
    for via_cli in [false, true] {
        if via_cli {
            assert_cli_quiet_success(&vmm_cli(&["pause", "--api-sock", path_str(&sock)]));
        } else {
            vm.api().pause().unwrap_or_else(|e| panic!("pause: {e}\n{}", vm.describe()));
        }
        assert_state(&vm, VmState::Paused);
        // A line the guest wrote just before it stopped may still be on its way through the pipe.
        std::thread::sleep(Duration::from_millis(500));
        let before = passes(&vm);
        std::thread::sleep(Duration::from_secs(3));
        let after = passes(&vm);
        assert_eq!(before, after, "the guest printed while paused (via_cli={via_cli})\n{}", vm.describe());
        assert_state(&vm, VmState::Paused);
        last = last.max(after.last().copied().unwrap_or(0));

        if via_cli {
            assert_cli_quiet_success(&vmm_cli(&["resume", "--api-sock", path_str(&sock)]));
        } else {
            vm.api().resume().unwrap_or_else(|e| panic!("resume: {e}\n{}", vm.describe()));
        }
        assert_state(&vm, VmState::Running);
        last = wait_pass_after(&vm, last, PATIENCE);
        last = wait_pass_after(&vm, last, PATIENCE);
    }
    assert_guest_sound(&vm);
    assert!(vm.try_wait().is_none(), "{}", vm.describe());
}

#[test]
fn shutdown_powers_the_guest_off() {
    if !kvm_or_skip("shutdown_powers_the_guest_off") {
        return;
    }
    // Running, stopped with `vmm stop`; paused, stopped with the API (the VMM resumes it first).
    for paused in [false, true] {
        let vm = start_vm("shutdown", DIRTY_GUEST, &[]);
        let sock = sock(&vm);
        wait_pass_after(&vm, 0, PATIENCE);
        if paused {
            vm.api().pause().unwrap_or_else(|e| panic!("pause: {e}\n{}", vm.describe()));
            assert_state(&vm, VmState::Paused);
            vm.api().shutdown().unwrap_or_else(|e| panic!("shutdown: {e}\n{}", vm.describe()));
        } else {
            assert_cli_quiet_success(&vmm_cli(&["stop", "--api-sock", path_str(&sock)]));
        }
        let status = vm
            .wait_timeout(PATIENCE)
            .unwrap_or_else(|| panic!("vmm did not exit after the shutdown (paused={paused})\n{}", vm.describe()));
        assert!(status.success(), "exit {status:?} (paused={paused})\n{}", vm.describe());
        assert!(vm.console.wait_line(PATIENCE, |l| l.contains("GUEST-POWEROFF")).is_some(), "{}", vm.describe());
        // The guest powered off by itself, not by the grace period running out.
        assert!(!vm.log.text().contains("did not power off"), "{}", vm.describe());
        assert!(!sock.exists(), "the API socket {} is still there\n{}", sock.display(), vm.describe());
        assert_guest_sound(&vm);
    }
}

#[test]
fn error_classes_over_a_real_socket() {
    if !kvm_or_skip("error_classes_over_a_real_socket") {
        return;
    }
    let vm = start_vm("errors", DIRTY_GUEST, &[]);
    let sock = sock(&vm);
    let s = sock.as_path();

    let answer = http(s, "GET", "/no/such/route", None);
    assert_refused(&vm, "unknown route", &answer, 404, "no such route");
    assert_refused(&vm, "wrong method", &http(s, "DELETE", "/vm", None), 405, "not allowed");
    let answer = http(s, "PUT", "/vm/migrate", Some("{\"to\": "));
    assert_refused(&vm, "bad JSON", &answer, 400, "invalid body");
    let answer = http(s, "PUT", "/vm/migrate", Some(r#"{"downtime_ms": 20}"#));
    assert_refused(&vm, "no `to`", &answer, 400, "`to`");
    let answer = http(s, "PUT", "/vm/migrate", Some(r#"{"to": "127.0.0.1:1", "downtime_ms": 0}"#));
    assert_refused(&vm, "zero downtime", &answer, 400, "downtime_ms");
    assert_refused(&vm, "resume running", &http(s, "PUT", "/vm/resume", None), 409, "running");
    assert_eq!(http(s, "PUT", "/vm/pause", None).status, 204, "{}", vm.describe());
    assert_refused(&vm, "second pause", &http(s, "PUT", "/vm/pause", None), 409, "paused");
    assert_eq!(http(s, "PUT", "/vm/resume", None).status, 204, "{}", vm.describe());
    assert_state(&vm, VmState::Running);
    assert_eq!(migration(&vm).phase, MigrationPhase::None, "a refused migration left a trace");

    // A destination that takes the connection and then never answers: the migration stays in
    // its setup, waiting for the destination's go-ahead, while the guest runs on.
    let destination = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = destination.local_addr().unwrap().to_string();
    let before = wait_pass_after(&vm, last_pass(&vm), PATIENCE);
    let answer = http(s, "PUT", "/vm/migrate", Some(&format!(r#"{{"to": "{to}"}}"#)));
    assert_eq!(answer.status, 202, "{answer:?}\n{}", vm.describe());
    let held = accept_within(&destination, PATIENCE);
    assert!(held.is_some(), "the VMM never connected to {to}\n{}", vm.describe());
    assert_state(&vm, VmState::Migrating);
    let info = migration(&vm);
    assert_eq!((info.phase, info.destination.as_deref()), (MigrationPhase::Setup, Some(to.as_str())), "{info:?}");

    let body = r#"{"to": "127.0.0.1:9"}"#;
    assert_refused(&vm, "second migrate", &http(s, "PUT", "/vm/migrate", Some(body)), 409, "migrating");
    assert_refused(&vm, "resume migrating", &http(s, "PUT", "/vm/resume", None), 409, "migrating");
    assert_refused(&vm, "shutdown migrating", &http(s, "PUT", "/vm/shutdown", None), 409, "migrating");
    assert_cli_error(&vmm_cli(&["pause", "--api-sock", path_str(s)]), "cannot pause a VM that is migrating");
    let during = wait_pass_after(&vm, before, PATIENCE);
    assert_state(&vm, VmState::Migrating);

    // The destination hangs up: the migration fails and the VM is simply running again.
    drop(held);
    drop(destination);
    let info = wait_migration_failed(&vm);
    let error = info.error.clone().unwrap_or_default();
    assert!(!error.is_empty(), "a failed migration without an error: {info:?}");
    assert_eq!(info.destination.as_deref(), Some(to.as_str()), "{info:?}");
    eprintln!("migration to a destination that hung up: {error}");
    let metrics = vm.api().metrics().unwrap();
    assert!(metrics.lines().any(|l| l == r#"vmm_migration_phase{phase="failed"} 1"#), "{metrics}");
    let after = wait_pass_after(&vm, during, PATIENCE);

    // Another migration may start after a failed one: here to a port where nobody listens.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap().to_string();
    drop(closed);
    let answer = http(s, "PUT", "/vm/migrate", Some(&format!(r#"{{"to": "{nobody}"}}"#)));
    assert_eq!(answer.status, 202, "{answer:?}\n{}", vm.describe());
    let info = wait_migration_failed(&vm);
    assert_eq!(info.destination.as_deref(), Some(nobody.as_str()), "{info:?}");
    let error = info.error.unwrap_or_default();
    assert!(error.contains("cannot connect"), "{error:?}");
    eprintln!("migration to a closed port: {error}");

    wait_pass_after(&vm, after, PATIENCE);
    assert_guest_sound(&vm);
    assert!(vm.try_wait().is_none(), "{}", vm.describe());
}

/// Clients that send nothing, garbage or half a request neither disturb the guest nor keep a
/// normal client from being answered.
/// Without a TLS identity, a VMM refuses to migrate unless the request brings one or asks for
/// plaintext; a bad TLS directory in the request is named.
#[test]
fn a_vmm_without_a_tls_identity_refuses_to_migrate() {
    if !kvm_or_skip("a_vmm_without_a_tls_identity_refuses_to_migrate") {
        return;
    }
    let vm = start_vm("notls", "console=ttyS0 vmm.workload=idle", &["--no-tls-identity"]);
    let s = &sock(&vm);
    let answer = http(s, "PUT", "/vm/migrate", Some(r#"{"to": "127.0.0.1:9"}"#));
    let msg = assert_refused(&vm, "migrate without TLS", &answer, 400, "--tls-dir");
    assert!(msg.contains("insecure_plaintext"), "{msg}");
    let answer = http(s, "PUT", "/vm/migrate", Some(r#"{"to": "127.0.0.1:9", "tls_dir": "/nonexistent-tls"}"#));
    assert_refused(&vm, "migrate with a missing TLS directory", &answer, 400, "/nonexistent-tls");
    assert_eq!(migration(&vm).phase, MigrationPhase::None, "a refused migration left a trace");
    // `vmm migrate --tls-dir` passes the directory along.
    let run = vmm_cli(&["migrate", "--api-sock", path_str(s), "--to", "127.0.0.1:9", "--tls-dir", "/nonexistent-tls"]);
    assert_cli_error(&run, "/nonexistent-tls");
    assert_state(&vm, VmState::Running);
}

#[test]
fn bad_clients_do_not_disturb_the_vm() {
    if !kvm_or_skip("bad_clients_do_not_disturb_the_vm") {
        return;
    }
    let vm = start_vm("badclients", DIRTY_GUEST, &[]);
    let sock = sock(&vm);
    let mut last = wait_pass_after(&vm, 0, PATIENCE);

    // Clients that come and go. Garbage is refused with a 4xx or just closed, never anything else.
    for garbage in GARBAGE {
        let answer = exchange(&sock, garbage);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{garbage:?} got {answer:?}");
    }
    // Half a request, then gone: in the request line, in the headers, in a migration's body.
    for half in HALF_REQUESTS {
        UnixStream::connect(&sock).unwrap().write_all(half).unwrap();
    }
    assert_state(&vm, VmState::Running);

    // Clients that stay: one more connection that says nothing every round, and now and then
    // one that stops half-way or throws garbage in, while a normal client asks for the VM.
    let mut idle = Vec::new();
    for round in 1..=20 {
        idle.push(UnixStream::connect(&sock).unwrap());
        if round % 5 == 0 {
            let mut half = UnixStream::connect(&sock).unwrap();
            half.write_all(HALF_REQUESTS[round / 5 % HALF_REQUESTS.len()]).unwrap();
            idle.push(half);
            UnixStream::connect(&sock).unwrap().write_all(GARBAGE[round % GARBAGE.len()]).unwrap();
        }
        match vm.api().get_vm() {
            Ok(info) => assert_eq!(info.state, VmState::Running, "{info:?}"),
            Err(e) => panic!(
                "round {round}: GET /vm failed while {} connections that send nothing or half a request \
                 were open: {e}\n{}",
                idle.len(),
                vm.describe()
            ),
        }
        if round % 5 == 0 {
            last = wait_pass_after(&vm, last, PATIENCE);
        }
    }
    assert_eq!(migration(&vm).phase, MigrationPhase::None, "half a migrate request started a migration");
    drop(idle);
    assert_state(&vm, VmState::Running);
    wait_pass_after(&vm, last, PATIENCE);
    assert_guest_sound(&vm);
    assert!(vm.try_wait().is_none(), "{}", vm.describe());
}

/// Requests the server cannot parse.
const GARBAGE: [&[u8]; 5] = [
    b"\x00\xff\xfe\x01 garbage\r\n\r\n",
    b"HELLO\r\n\r\n",
    b"GET /vm\r\n\r\n",
    b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n",
    b"\r\n\r\n\r\n",
];

/// Requests cut short.
const HALF_REQUESTS: [&[u8]; 3] = [
    b"GET /vm HTTP/1.1\r\nHo",
    b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\n",
    b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"to\": \"127.0.0.1:",
];

#[test]
fn fifty_concurrent_status_requests() {
    if !kvm_or_skip("fifty_concurrent_status_requests") {
        return;
    }
    let vm = start_vm("fifty", DIRTY_GUEST, &[]);
    let start = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (client, start) = (ApiClient::new(sock(&vm)), start.clone());
            std::thread::spawn(move || {
                start.wait();
                client.get_vm()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().expect("client thread")).collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).map(ToString::to_string).collect();
    assert!(failed.is_empty(), "{} of 50 failed: {failed:?}\n{}", failed.len(), vm.describe());
    for info in results.into_iter().flatten() {
        assert_eq!(info.state, VmState::Running);
        assert_eq!(info.config.kernel, guest_kernel());
    }
    assert!(vm.try_wait().is_none(), "{}", vm.describe());
}

#[test]
fn metrics_are_prometheus_text() {
    if !kvm_or_skip("metrics_are_prometheus_text") {
        return;
    }
    let vm = start_vm("metrics", DIRTY_GUEST, &[]);
    wait_pass_after(&vm, 0, PATIENCE);
    let answer = vm.api().send("GET", "/metrics", None).unwrap_or_else(|e| panic!("{e}\n{}", vm.describe()));
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Content-Type"), Some("text/plain; version=0.0.4"));
    let text = String::from_utf8(answer.body).expect("UTF-8 metrics");

    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            let word = comment.split_whitespace().next();
            assert!(matches!(word, Some("HELP" | "TYPE")), "odd comment {line:?}");
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|| panic!("not a Prometheus sample: {line:?}\n{text}"));
        samples.push(sample);
    }
    let value =
        |name: &str, labels: &str| samples.iter().find(|s| s.name == name && s.labels == labels).map(|s| s.value);
    let exits: f64 = samples.iter().filter(|s| s.name == "vmm_vcpu_exits_total").map(|s| s.value).sum();
    assert!(text.contains("vmm_vcpu_exits_total{reason="), "{text}");
    assert!(exits > 0.0, "no vCPU exits counted\n{text}");
    assert!(value("vmm_uptime_seconds", "").is_some_and(|v| v > 0.0), "{text}");
    assert_eq!(value("vmm_migration_phase", r#"phase="none""#), Some(1.0), "{text}");
    let phases: f64 = samples.iter().filter(|s| s.name == "vmm_migration_phase").map(|s| s.value).sum();
    assert_eq!(phases, 1.0, "exactly one migration phase is current\n{text}");
    assert!(vm.try_wait().is_none(), "{}", vm.describe());
}

/// One `name{labels} value` or `name value` line.
struct Sample {
    name: String,
    /// What is between the braces, as written.
    labels: String,
    value: f64,
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let name_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    // Our label values are plain (no commas or escaped quotes), so a split is enough.
    let labels_ok = labels.is_empty()
        || labels.split(',').all(|pair| {
            pair.split_once('=').is_some_and(|(k, v)| {
                !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && v.len() >= 2
                    && v.starts_with('"')
                    && v.ends_with('"')
            })
        });
    (name_ok && labels_ok).then(|| Sample { name: name.to_string(), labels: labels.to_string(), value })
}

/// No VM needed: these fail before any request is sent.
#[test]
fn cli_errors_are_one_line() {
    let run = vmm_cli(&["status", "--api-sock", "/nonexistent.sock"]);
    assert_cli_error(&run, "cannot connect to the VMM API at /nonexistent.sock");

    // A socket file nobody listens on any more, as a VMM that was killed leaves behind.
    let stale = api_sock_path("stale");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    for command in ["status", "pause", "stop"] {
        let run = vmm_cli(&[command, "--api-sock", path_str(&stale)]);
        assert_cli_error(&run, &format!("cannot connect to the VMM API at {}", stale.display()));
        assert!(run.stderr.to_lowercase().contains("refused"), "{run:?}");
    }
    std::fs::remove_file(&stale).unwrap();
}
