// SPDX-License-Identifier: Apache-2.0
//! Running `vmm` processes in tests: where the binaries are, starting a VM (in a test bed
//! namespace or in the caller's), following its console, and talking to its API.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm::api::client::ApiClient;

use crate::{Netns, Process};

/// The build directory of the test executable (`target/<profile>`): the binaries a test uses
/// are the ones built with the same profile.
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // target/<profile>/deps/<test> for tests, target/<profile>/<bin> for the demo.
    let dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().expect("target/<profile>") } else { dir }
        .to_path_buf()
}

fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn built(name: &str, how: &str) -> PathBuf {
    let p = build_dir().join(name);
    assert!(p.exists(), "{} is missing: {how} (the README's test command does this)", p.display());
    p
}

/// The `vmm` binary.
pub fn vmm_bin() -> PathBuf {
    built("vmm", "build the workspace first with the same profile as the tests (`cargo build --workspace --release`)")
}

/// Our own guest kernel.
pub fn guest_kernel() -> PathBuf {
    built(
        "vmm-guest",
        "build the workspace first with the same profile as the tests (`cargo build --workspace --release`)",
    )
}

/// The takeover tests' client process.
pub fn echo_client_bin() -> PathBuf {
    built(
        "vmm-echo-client",
        "build the workspace first with the same profile as the tests (`cargo build --workspace --release`)",
    )
}

/// The Linux guest kernel and initramfs built by `resources/`, if they exist.
pub fn linux_artifacts() -> Option<(PathBuf, PathBuf)> {
    let dir = workspace_dir().join("resources/build");
    let (k, i) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    (k.exists() && i.exists()).then_some((k, i))
}

/// The kernel command line that gets Linux furthest here: XSAVE and the instructions KVM's
/// emulator lacks hidden with the kernel's own switches, so that no code path, alternative or
/// early check uses them whatever CPUID says. `--cpu-template baseline` hides the same kind of
/// features through CPUID, but only from code at CPL 0: at CPL 3 CPUID runs natively on this
/// KVM and returns the host's values.
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 noxsave clearcpuid=smap,smep,popcnt,cx16,fsgsbase,\
rdtscp,movbe,rdrand,rdseed,bmi1,bmi2,avx,avx2,erms,fsrm,invpcid,pcid,umip,pku,rdpid,clflushopt,clwb";

/// The kernel command line of Linux where KVM runs guest kernel code natively (hardware KVM,
/// or the nested host's): no instruction needs hiding there.
pub const LINUX_NATIVE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Which guest a test boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// Our own guest kernel, `vmm-guest`.
    Ours,
    /// Linux 6.12 with our initramfs, on a KVM that runs its kernel code natively.
    Linux,
}

impl Guest {
    /// `--kernel PATH [--initrd PATH]`. Panics with what to do if the Linux build is missing.
    pub fn boot_args(self) -> Vec<String> {
        match self {
            Guest::Ours => vec!["--kernel".into(), guest_kernel().display().to_string()],
            Guest::Linux => {
                let (kernel, initrd) = linux_artifacts().unwrap_or_else(|| {
                    panic!(
                        "resources/build/vmlinux or initramfs.cpio is missing: run resources/build_kernel.sh and \
                         resources/build_initramfs.sh (resources/setup.sh does both)"
                    )
                });
                ["--kernel", &kernel.display().to_string(), "--initrd", &initrd.display().to_string()]
                    .map(String::from)
                    .to_vec()
            }
        }
    }

    /// The start of the kernel command line (the console and how to power off).
    pub fn cmdline(self) -> &'static str {
        match self {
            Guest::Ours => "console=ttyS0",
            Guest::Linux => LINUX_NATIVE_CMDLINE,
        }
    }

    /// The `kernel=` word of its ready line.
    pub fn ready_name(self) -> &'static str {
        match self {
            Guest::Ours => "vmm-guest",
            Guest::Linux => "linux",
        }
    }
}

/// Whether KVM is there. When it is not, say so loudly: the caller skips the test.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n*** SKIPPED {test}: /dev/kvm does not exist on this host, so no guest can run ***\n");
    false
}

/// A unique path for an API socket.
pub fn api_sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vmm-test-{}-{}-{tag}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Set: every line a process started by the tests prints is also written to stderr at once.
pub const ECHO_ENV: &str = "VMM_TESTS_ECHO";

/// Text a process printed, line by line with the time each line arrived, with a way to wait
/// for more.
#[derive(Clone, Default)]
pub struct Output {
    inner: Arc<(Mutex<Vec<Line>>, Condvar)>,
}

/// A line and when it arrived.
type Line = (Instant, String);

impl Output {
    /// Follows `reader`; with `VMM_TESTS_ECHO` set, each line also goes to stderr as it arrives,
    /// prefixed with `tag` (to watch a run that hangs, e.g. on the nested host's console).
    fn follow(reader: impl Read + Send + 'static, tag: String) -> Output {
        let out = Output::default();
        let o = out.clone();
        let echo = std::env::var_os(ECHO_ENV).is_some();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let now = Instant::now();
                        let (lines, cv) = &*o.inner;
                        let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
                        if echo {
                            eprintln!("[{tag}] {text}");
                        }
                        lines.lock().expect("Poisoned lock").push((now, text));
                        cv.notify_all();
                    }
                }
            }
            // Wake waiters so they notice the end.
            o.inner.1.notify_all();
        });
        out
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.inner.0.lock().expect("Poisoned lock").iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// Waits until a line satisfying `pred` was printed (at any time so far); returns it.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.wait_line_at(timeout, pred).map(|(_, l)| l)
    }

    /// Like [`Output::wait_line`], also returning when the line arrived.
    pub fn wait_line_at(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.inner;
        let mut guard = lines.lock().expect("Poisoned lock");
        loop {
            if let Some(l) = guard.iter().find(|(_, l)| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = cv.wait_timeout(guard, deadline - now).expect("Poisoned lock").0;
        }
    }

    /// Lines satisfying `pred` so far.
    pub fn lines(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.inner.0.lock().expect("Poisoned lock").iter().filter(|(_, l)| pred(l)).map(|(_, l)| l.clone()).collect()
    }
}

enum Proc {
    Ns(Process),
    Here(Mutex<Child>),
}

/// How a process enters its namespace.
#[derive(Clone, Copy)]
enum Spawn {
    /// The command does it (`ip netns exec`).
    Command,
    /// It is started from a thread inside the namespace.
    FromInside,
}

/// A running `vmm` process. It is killed when dropped (and, if started in a test bed
/// namespace, also when the bed goes away).
pub struct Vm {
    proc: Proc,
    pub console: Output,
    pub log: Output,
    pub api_sock: Option<PathBuf>,
    /// When the process was started.
    pub started: Instant,
}

impl Vm {
    /// Starts `vmm` with `args` inside `netns` (or in this process's namespace if `None`).
    /// Passing `--api-sock` in `args` makes [`Vm::api`] available.
    pub fn start(netns: Option<&Netns>, args: &[String]) -> Vm {
        Vm::start_program(netns, &vmm_bin(), args)
    }

    /// [`Vm::start`] with more environment variables (e.g. `VMM_FAULT_STOP_AT`).
    pub fn start_env(netns: Option<&Netns>, args: &[String], env: &[(&str, &str)]) -> Vm {
        Vm::start_program_env(netns, &vmm_bin(), args, env)
    }

    /// Like [`Vm::start`] for another monitor (the benchmark runs QEMU through this too).
    pub fn start_program(netns: Option<&Netns>, program: &Path, args: &[String]) -> Vm {
        Vm::start_program_env(netns, program, args, &[])
    }

    /// Like [`Vm::start`], but the VMM is born in `netns` ([`Netns::spawn_from_inside`]: a
    /// `posix_spawn` from a thread in the namespace) instead of going through `ip netns exec`:
    /// no other program runs before it and no fork of this process comes first, so the time
    /// from the spawn is the VMM's own (the benchmark's restore rows).
    pub fn start_direct(netns: &Netns, args: &[String]) -> Vm {
        let program = vmm_bin();
        Vm::start_cmd(Some((netns, Spawn::FromInside)), Command::new(&program), &program, args, &[])
    }

    fn start_program_env(netns: Option<&Netns>, program: &Path, args: &[String], env: &[(&str, &str)]) -> Vm {
        let cmd = match netns {
            Some(ns) => ns.command(program),
            None => Command::new(program),
        };
        Vm::start_cmd(netns.map(|ns| (ns, Spawn::Command)), cmd, program, args, env)
    }

    fn start_cmd(
        netns: Option<(&Netns, Spawn)>,
        mut cmd: Command,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Vm {
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.envs(env.iter().copied());
        let api_sock = args.iter().position(|a| a == "--api-sock").and_then(|i| args.get(i + 1)).map(PathBuf::from);
        let started = Instant::now();
        let (proc, stdout, stderr) = match netns {
            Some((ns, how)) => {
                let p = match how {
                    Spawn::Command => ns.spawn(&mut cmd),
                    Spawn::FromInside => ns.spawn_from_inside(&mut cmd),
                }
                .expect("start vmm in the namespace");
                let (o, e) = (p.take_stdout(), p.take_stderr());
                (Proc::Ns(p), o, e)
            }
            None => {
                let mut c = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
                let (o, e) = (c.stdout.take(), c.stderr.take());
                (Proc::Here(Mutex::new(c)), o, e)
            }
        };
        let name = program.file_name().map_or("?".into(), |n| n.to_string_lossy().into_owned());
        let sock =
            api_sock.as_ref().and_then(|p| p.file_name()).map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let tag = format!("{name} {} {sock}", args.first().map_or("", |a| a.as_str()));
        let console = Output::follow(stdout.expect("piped stdout"), format!("{tag} out"));
        let log = Output::follow(stderr.expect("piped stderr"), format!("{tag} err"));
        Vm { proc, console, log, api_sock, started }
    }

    /// The API client for this VM (it must have been started with `--api-sock`).
    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.api_sock.clone().expect("VM started without --api-sock"))
    }

    /// Waits for the API socket to answer.
    pub fn wait_api(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.api().get_vm().is_ok() {
                return true;
            }
            if self.try_wait().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The exit status if the process ended.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        match &self.proc {
            Proc::Ns(p) => p.try_wait().ok().flatten(),
            Proc::Here(c) => c.lock().expect("Poisoned lock").try_wait().ok().flatten(),
        }
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process now.
    pub fn kill(&self) {
        match &self.proc {
            Proc::Ns(p) => {
                let _ = p.kill();
            }
            Proc::Here(c) => {
                let mut c = c.lock().expect("Poisoned lock");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Sends `signal` to the process (e.g. `libc::SIGCONT`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory effects; the pid is our child's, not yet reaped.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits until the process is stopped (state `T`, e.g. at a fault point); false if it
    /// exited or `timeout` passed first.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')) {
                return true;
            }
            if self.try_wait().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Ns(p) => p.id(),
            Proc::Here(c) => c.lock().expect("Poisoned lock").id(),
        }
    }

    /// Console and log, for a failing assertion's message.
    pub fn describe(&self) -> String {
        format!("--- console ---\n{}\n--- vmm log ---\n{}{}", self.console.text(), self.log.text(), self.counters())
    }

    /// The device and exit counters of a VM that has an API and still answers it (what a
    /// stalled stream needs: did frames stop, did the vCPU stop exiting); empty otherwise.
    fn counters(&self) -> String {
        let Some(sock) = &self.api_sock else { return String::new() };
        match ApiClient::new(sock).with_timeout(Duration::from_secs(5)).metrics() {
            Ok(text) => {
                let wanted = |l: &&str| l.starts_with("vmm_net_") || l.starts_with("vmm_vcpu_exits");
                let lines: Vec<&str> = text.lines().filter(wanted).collect();
                format!("--- counters ---\n{}\n", lines.join("\n"))
            }
            Err(e) => format!("--- counters ---\n(not read: {e})\n{}", self.threads()),
        }
    }

    /// What each thread of a VMM that does not answer its API is doing: state and kernel wait
    /// from /proc, and the user stacks from gdb where it is installed.
    fn threads(&self) -> String {
        let pid = self.pid();
        let mut out = String::from("--- threads ---\n");
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let dir = task.path();
                let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                let stat = read("stat");
                // The state follows the parenthesised name.
                let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').next()).unwrap_or("?");
                out += &format!(
                    "{} {} state {state} wchan {}\n",
                    read("comm").trim(),
                    task.file_name().to_string_lossy(),
                    read("wchan")
                );
            }
        }
        let gdb = Command::new("timeout")
            .args(["60", "gdb", "-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 30"])
            .stdin(Stdio::null())
            .output();
        if let Ok(o) = gdb {
            let text = String::from_utf8_lossy(&o.stdout);
            out +=
                &text.lines().filter(|l| l.starts_with('#') || l.starts_with("Thread")).collect::<Vec<_>>().join("\n");
        }
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Proc::Here(c) = &self.proc {
            let mut c = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(p) = &self.api_sock {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Sends one ICMP echo request to `to` from the calling thread's namespace and waits for the
/// reply (`ping` is not always installed; a raw socket is).
pub fn ping(to: std::net::Ipv4Addr, timeout: Duration) -> std::io::Result<Duration> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let id = (std::process::id() & 0xffff) as u16;
    let mut pkt = vec![8u8, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1];
    pkt.extend_from_slice(b"vmm-test-ping");
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    // SAFETY: sockaddr_in is plain data.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as u16;
    addr.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
    let start = Instant::now();
    // SAFETY: sending a valid buffer to a valid address of the given size.
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let deadline = start + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let left = deadline - Instant::now();
        let tv = libc::timeval {
            tv_sec: left.as_secs() as libc::time_t,
            tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: setting a timeval option with its size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let n = (&sock).read(&mut buf).unwrap_or(0);
        // Raw ICMP sockets deliver the IP header too: skip it, then look for our echo reply.
        if n > 20 {
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl.min(n)..n];
            let src = std::net::Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if icmp.len() >= 8 && icmp[0] == 0 && src == to && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                return Ok(start.elapsed());
            }
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no echo reply from {to}")))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
