// SPDX-License-Identifier: Apache-2.0
//! Restore (ours only; QEMU has no lazy restore to set beside it): our guest with its echo
//! workload on a TAP in host A, of 256 MiB and of 4 GiB (touching only a few MiB of it), is
//! snapshotted (`vmm snapshot`, which leaves it paused) and its VMM killed; then
//! `vmm run --restore` is spawned `runs` times from that one snapshot (its files are in the
//! page cache after the first), each time joining the namespace itself, with nothing run in
//! front of it. Rows: the time from the spawn to the guest's first run (the VMM's line says
//! when its first vCPU was about to enter KVM_RUN, on the monotonic clock the spawn's time is
//! read on too, so the line's own way through the pipe to this process is not counted), the
//! VMM's own figure in that line (from the restore's start), and the time from the spawn to the
//! guest's first answer to a client in another namespace sending a UDP datagram to its echo
//! port every millisecond.
//! Then the same snapshot `runs` times into a VMM started ahead and waiting (`vmm run
//! --await-restore`, given ~20 ms to settle, as a VMM kept ready would be), named by
//! `PUT /vm/restore`: Firecracker's snapshot load, into a process that runs already; and `runs`
//! times into one that also prepared memory of the guest's size (`--await-mem-mib`). Rows: the
//! time from the request to the guest's first run (on the monotonic clock, from the answer),
//! to the answer, and to the first UDP echo answer.
//! Firecracker's published snapshot-load figures are quoted in the notes, not measured here.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_common::ECHO_PORT;
use vmm::api::RestoreRequest;
use vmm_tests::snapshots::{
    RESTORE_TIMEOUT, RESTORED, SnapDir, restore_args, snapshot_cli, wait_until_waiting, waiting_args,
};
use vmm_tests::vm::Vm;
use vmm_tests::{Netns, NsThread, TestBed};

use crate::boot::ms;
use crate::monitor::{GuestSpec, Monitor, Running};
use crate::results::{Better, Results};

/// Guest sizes, MiB.
pub const SIZES: [u64; 2] = [256, 4096];
const MAC: &str = "52:54:00:be:4c:20";
/// Room left beside a guest's memory for everything else (its memory is mostly untouched,
/// but a restore that touched all of it must still fit).
const HEADROOM_MIB: u64 = 1024;
/// Free space the snapshot directory needs (the guest's few MiB of data, and margin).
const DISK_NEEDED_MIB: u64 = 1024;
/// The rows the targets read.
pub const TO_RUNNING: &str = "spawn → the guest runs (vCPU 0 enters KVM_RUN)";
pub const OWN: &str = "the VMM's own figure in that line (reading the snapshot → the vCPUs run)";
pub const TO_ANSWER: &str = "spawn → the guest's first UDP echo answer";
/// A waiting VMM's rows: request → the guest runs, → the answer, → the first UDP echo answer.
pub const WAITING: [&str; 3] = [
    "waiting VMM: request → the guest runs (Firecracker's snapshot load)",
    "waiting VMM: request → its answer (PUT /vm/restore returns)",
    "waiting VMM: request → the guest's first UDP echo answer",
];
/// The same for a waiting VMM that prepared memory of the guest's size (`--await-mem-mib`).
pub const READY: [&str; 3] = [
    "waiting VMM with memory ready (--await-mem-mib): request → the guest runs",
    "waiting VMM with memory ready: request → its answer",
    "waiting VMM with memory ready: request → the guest's first UDP echo answer",
];
/// How long a waiting VMM is left before it is named the snapshot: the time its threads take to
/// settle, and KVM's after creating the VM's interrupt controllers.
const SETTLE: Duration = Duration::from_millis(20);
/// Firecracker's published figures (its perf tests on m5d.metal, 2023), quoted, not measured.
pub const FIRECRACKER: &str = "Firecracker (published, not measured here: its snapshot-load test on m5d.metal, 2023): \
                               P50 2.40 ms at 128 MB, 2.84 ms at 1 GiB, 4.99 ms at 4 GiB, 12.0 ms at 16 GiB, \
                               21.3 ms at 32 GiB; it grows with memory size";

pub fn section(mem_mib: u64) -> String {
    if mem_mib >= 1024 {
        format!("restore: {} GiB, echo workload", mem_mib / 1024)
    } else {
        format!("restore: {mem_mib} MiB, echo workload")
    }
}

pub fn bench(results: &mut Results, runs: usize, kernel: &Path) -> Result<(), String> {
    let bed = TestBed::builder().host("a").client("client").host_ips().build().map_err(|e| e.to_string())?;
    results.note(FIRECRACKER.to_string());
    for mem_mib in SIZES {
        let sec = section(mem_mib);
        if let Err(why) = room_for(mem_mib) {
            eprintln!("\n*** vmm-bench: SKIPPED {sec}: {why} ***\n");
            results.note(format!("{sec}: SKIPPED, {why}"));
            continue;
        }
        eprintln!("vmm-bench: {sec}, {runs} restores");
        sized(results, &bed, kernel, mem_mib, runs).map_err(|e| format!("{sec}: {e}"))?;
    }
    Ok(())
}

/// Whether this machine has the memory and disk space for a guest of `mem_mib` now.
fn room_for(mem_mib: u64) -> Result<(), String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    let available_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:")?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no MemAvailable in /proc/meminfo")?
        / 1024;
    if available_mib < mem_mib + HEADROOM_MIB {
        return Err(format!(
            "{available_mib} MiB of memory available, {} MiB needed (the guest and {HEADROOM_MIB} MiB)",
            mem_mib + HEADROOM_MIB
        ));
    }
    let tmp = std::env::temp_dir();
    let path = std::ffi::CString::new(tmp.display().to_string()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs is plain data, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own; the path is NUL-terminated.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(format!("statvfs {}: {}", tmp.display(), std::io::Error::last_os_error()));
    }
    let free_mib = (st.f_bavail as u64 * st.f_frsize as u64) >> 20;
    if free_mib < DISK_NEEDED_MIB {
        return Err(format!("{free_mib} MiB free in {}, {DISK_NEEDED_MIB} MiB needed", tmp.display()));
    }
    Ok(())
}

fn sized(results: &mut Results, bed: &TestBed, kernel: &Path, mem_mib: u64, runs: usize) -> Result<(), String> {
    let sec = section(mem_mib);
    let (a, client) = (bed.host("a"), bed.client());
    let guest_ip = bed.guest_ip(0);
    let spec = GuestSpec {
        kernel,
        initrd: None,
        cmdline: format!("console=ttyS0 {} vmm.workload=echo", bed.guest_ip_cmdline(0)),
        mem_mib,
        vcpus: 1,
        net: Some((a.tap(), MAC)),
        disk: None,
    };
    let src = Running::start(Monitor::Ours, Some(a), &spec, None);
    src.wait_ready(Duration::from_secs(30))?;
    client
        .wait_for_tcp((guest_ip, ECHO_PORT).into(), Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", src.vm.describe()))?;
    let dir = SnapDir::new(&format!("bench-{mem_mib}"));
    let info = snapshot_cli(&src.vm, dir.path(), &[])?;
    results.add(
        &sec,
        "snapshot: memory written as data",
        "MiB",
        Better::Lower,
        Monitor::Ours,
        mib(info.memory_data_bytes),
    );
    results.add(&sec, "snapshot: request → written", "ms", Better::Lower, Monitor::Ours, info.total_ms as f64);
    // The restore takes the TAP over.
    src.vm.kill();
    drop(src);
    let args = restore_args(bed, "a", dir.path(), &[]);
    for run in 0..runs {
        let probe = Probe::start(client, SocketAddr::from((guest_ip, ECHO_PORT)))?;
        let vm = Vm::start_direct(a, &args);
        let line = vm.log.wait_line_at(RESTORE_TIMEOUT, |l| l.contains(RESTORED) || l.contains("error"));
        let (running_at, line) = match line {
            Some((at, l)) if l.contains(RESTORED) => (at, l),
            other => return Err(format!("restore {}: the guest did not start: {other:?}\n{}", run + 1, vm.describe())),
        };
        let answered = probe.first_answer(Duration::from_secs(30));
        let Some(answered) = answered else {
            return Err(format!("restore {}: no UDP echo answer within 30 s\n{}", run + 1, vm.describe()));
        };
        let Some((own_us, ran_us)) = figures(&line) else {
            return Err(format!("restore {}: the VMM's line has no figures: {line}", run + 1));
        };
        // The line's arrival if it has no clock reading (an older VMM), or one past its arrival
        // (which cannot be).
        let spawned_us = monotonic_us(vm.started);
        let to_running = match ran_us.and_then(|r| r.checked_sub(spawned_us).filter(|_| r <= monotonic_us(running_at)))
        {
            Some(us) => us as f64 / 1e3,
            None => ms(running_at - vm.started),
        };
        results.add(&sec, TO_RUNNING, "ms", Better::Lower, Monitor::Ours, to_running);
        results.add(&sec, OWN, "ms", Better::Lower, Monitor::Ours, own_us as f64 / 1e3);
        results.add(
            &sec,
            TO_ANSWER,
            "ms",
            Better::Lower,
            Monitor::Ours,
            ms(answered.saturating_duration_since(vm.started)),
        );
        // Let the snapshot's data finish loading, then what the restored process holds.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(rss) = rss_mib(vm.pid()) {
            results.add(&sec, "restored VMM's RSS after 300 ms", "MiB", Better::Lower, Monitor::Ours, rss);
        }
        vm.kill();
        if vm.wait_timeout(Duration::from_secs(10)).is_none() {
            return Err(format!("restore {}: the VMM did not end when killed", run + 1));
        }
    }
    let tap = format!("tap={}", a.tap());
    let size = mem_mib.to_string();
    for (rows, extra) in [(WAITING, vec!["--net", &tap]), (READY, vec!["--net", &tap, "--await-mem-mib", &size])] {
        let args = waiting_args("a", &extra);
        for run in 0..runs {
            into_waiting(results, &sec, rows, bed, &args, dir.path())
                .map_err(|e| format!("{} {}: {e}", rows[0], run + 1))?;
        }
    }
    Ok(())
}

/// One restore into a VMM started with `args` and waiting, its figures under `rows`.
fn into_waiting(
    results: &mut Results,
    sec: &str,
    rows: [&str; 3],
    bed: &TestBed,
    args: &[String],
    dir: &Path,
) -> Result<(), String> {
    let (a, client) = (bed.host("a"), bed.client());
    let probe = Probe::start(client, SocketAddr::from((bed.guest_ip(0), ECHO_PORT)))?;
    let vm = Vm::start_direct(a, args);
    wait_until_waiting(&vm).map_err(|e| format!("{e}\n{}", vm.describe()))?;
    std::thread::sleep(SETTLE);
    let asked = Instant::now();
    let info = vm
        .api()
        .restore(&RestoreRequest { from: dir.display().to_string() })
        .map_err(|e| format!("PUT /vm/restore: {e}\n{}", vm.describe()))?;
    let replied = Instant::now();
    let Some(answered) = probe.first_answer(Duration::from_secs(30)) else {
        return Err(format!("no UDP echo answer within 30 s\n{}", vm.describe()));
    };
    let to_running = info.running_at_monotonic_us.saturating_sub(monotonic_us(asked)) as f64 / 1e3;
    results.add(sec, rows[0], "ms", Better::Lower, Monitor::Ours, to_running);
    results.add(sec, rows[1], "ms", Better::Lower, Monitor::Ours, ms(replied - asked));
    results.add(sec, rows[2], "ms", Better::Lower, Monitor::Ours, ms(answered.saturating_duration_since(asked)));
    vm.kill();
    if vm.wait_timeout(Duration::from_secs(10)).is_none() {
        return Err("the VMM did not end when killed".to_string());
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `vmm: restored DIR: the guest runs (N µs; monotonic M µs)` → (N, M); M is missing in an
/// older VMM's line.
fn figures(line: &str) -> Option<(u64, Option<u64>)> {
    let inner = line.rsplit_once('(')?.1.trim_end().strip_suffix(" µs)")?;
    match inner.split_once(" µs; monotonic ") {
        Some((own, at)) => Some((own.trim().parse().ok()?, Some(at.trim().parse().ok()?))),
        None => Some((inner.trim().parse().ok()?, None)),
    }
}

/// `at` on the monotonic clock, in µs (Rust's `Instant` is that clock on Linux).
fn monotonic_us(at: Instant) -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_us = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    now_us.saturating_sub(at.elapsed().as_micros() as u64)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kib as f64 / 1024.0)
}

/// A client sending a datagram to the guest's echo port every millisecond until the first
/// answer, from the client namespace.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<Option<Instant>>>,
}

impl Probe {
    fn start(client: &Netns, to: SocketAddr) -> Result<Probe, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = client
            .spawn_in(move || -> Option<Instant> {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
                sock.set_read_timeout(Some(Duration::from_millis(1))).ok()?;
                let mut buf = [0u8; 64];
                while !st.load(Ordering::Relaxed) {
                    // A send fails while the guest's address is not yet resolved: go on.
                    let _ = sock.send_to(b"restore-probe\n", to);
                    if let Ok((n, from)) = sock.recv_from(&mut buf)
                        && from == to
                        && &buf[..n] == b"restore-probe\n"
                    {
                        return Some(Instant::now());
                    }
                }
                None
            })
            .map_err(|e| format!("the UDP probe: {e}"))?;
        Ok(Probe { stop, thread: Some(thread) })
    }

    /// When the first answer came, waiting up to `timeout` for it.
    fn first_answer(mut self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(NsThread::join)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join();
        }
    }
}

/// The target: ≤ 3 ms to running for both sizes alike, from a spawn and into a waiting
/// VMM (Firecracker's measure).
pub fn targets(r: &Results, line: &mut impl FnMut(bool, String)) {
    let med = |mem: u64, metric: &str| r.median(&section(mem), metric, Monitor::Ours);
    for mem in SIZES {
        if let Some(t) = med(mem, TO_RUNNING) {
            let own = med(mem, OWN).map_or(String::new(), |o| format!(" (the VMM's own figure {o:.2} ms)"));
            line(t <= 3.0, format!("{}: spawn → running ≤ 3 ms: {t:.2} ms{own}", section(mem)));
        }
        for (how, rows) in [("waiting VMM", WAITING), ("waiting VMM with memory ready", READY)] {
            if let Some(t) = med(mem, rows[0]) {
                line(t <= 3.0, format!("{}: {how}, request → running ≤ 3 ms: {t:.2} ms", section(mem)));
            }
        }
    }
    let (first, last) = (SIZES[0], SIZES[SIZES.len() - 1]);
    let growth = [
        ("from a spawn", TO_RUNNING),
        ("into a waiting VMM", WAITING[0]),
        ("into a waiting VMM with memory ready", READY[0]),
    ];
    for (how, metric) in growth {
        if let (Some(small), Some(large)) = (med(first, metric), med(last, metric)) {
            line(
                large <= 1.25 * small,
                format!(
                    "restore {how}: time to running does not grow with memory size ({} vs {}, within 1.25 ×): \
                     {large:.2} ms vs {small:.2} ms ({:.2} ×; Firecracker: 2.08 × from 128 MB to 4 GiB)",
                    section(last),
                    section(first),
                    large / small
                ),
            );
        }
    }
}
