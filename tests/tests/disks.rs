// SPDX-License-Identifier: Apache-2.0
//! Disks end to end: our guest's `disk` workload (writes and verifies a pattern over its
//! virtio-blk disk) on hosts `a` and `b` of one test bed.
//!
//! - a copied disk moves A→B→A with the guest: each destination gets a new file; after every
//!   move the workload found no block lost or stale and the old VMM exited 0;
//! - a shared disk (`,shared`) moves A→B→A: the destination opens the same file;
//! - a 1 GiB sparse disk with 8 MiB written sends about 8 MiB of disk data, and the
//!   destination's file holds exactly what the guest wrote;
//! - a destination whose file system fills up while the disk arrives fails, removes its
//!   partial file, and the guest runs on at the source with its disk intact;
//! - `GET /vm` and `/metrics` count the guest's requests, and a VMM that stops (the guest
//!   powered off, or moved away) leaves its image with nothing in the page cache unwritten;
//!   a destination makes its received copy durable once the guest runs there.
//!
//! Figures are printed, never asserted beyond the byte counts the issue sets.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::{MigrationPhase, VmState};
use vmm_tests::TestBed;
use vmm_tests::images::Image;
use vmm_tests::moves::{
    CONTROL_PORT, GUEST_MAC, GUEST_TIMEOUT, LISTEN_TIMEOUT, MIGRATION_PORT, assert_completed, assert_exits_cleanly,
    dump, host_tls_dir, migrate_api, print_info, request, s, wait_migration,
};
use vmm_tests::pki::tls_args;
use vmm_tests::vm::{Vm, api_sock_path, guest_kernel, kvm_or_skip};

fn two_hosts() -> TestBed {
    TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build the test bed")
}

fn start_source(bed: &TestBed, disk: &str, workload: &str) -> Vm {
    let sock = api_sock_path("disk-src-a");
    let mut args = s(&["run", "--kernel", guest_kernel().to_str().unwrap(), "--api-sock", sock.to_str().unwrap()]);
    args.extend(s(&["--mem-mib", "128", "--disk", disk]));
    args.extend(["--net".to_string(), format!("tap={},mac={GUEST_MAC}", bed.host("a").tap())]);
    args.extend(["--cmdline".to_string(), format!("console=ttyS0 {} {workload}", bed.guest_ip_cmdline(0))]);
    args.extend(tls_args(&host_tls_dir(bed, "a")));
    let vm = Vm::start(Some(bed.host("a")), &args);
    let ready = vm.console.wait_line(Duration::from_secs(30), |l| l.starts_with("GUEST-READY"));
    assert!(ready.is_some(), "the guest did not boot{}", dump(&[("source", &vm)]));
    assert!(vm.wait_api(LISTEN_TIMEOUT), "the source's API does not answer{}", dump(&[("source", &vm)]));
    vm
}

fn start_destination(bed: &TestBed, host: &str, port: u16, disk: Option<&str>) -> (Vm, String) {
    start_destination_env(bed, host, port, disk, &[])
}

fn start_destination_env(
    bed: &TestBed,
    host: &str,
    port: u16,
    disk: Option<&str>,
    env: &[(&str, &str)],
) -> (Vm, String) {
    let sock = api_sock_path(&format!("disk-dst-{host}-{port}"));
    let mut args = s(&["run", "--incoming", &format!("0.0.0.0:{port}"), "--api-sock", sock.to_str().unwrap(), "--net"]);
    args.push(format!("tap={}", bed.host(host).tap()));
    if let Some(d) = disk {
        args.extend(s(&["--disk", d]));
    }
    args.extend(tls_args(&host_tls_dir(bed, host)));
    let vm = Vm::start_env(Some(bed.host(host)), &args, env);
    let listening = vm.log.wait_line(LISTEN_TIMEOUT, |l| l.contains("waiting for an incoming migration"));
    assert!(listening.is_some(), "the destination does not listen{}", dump(&[("destination", &vm)]));
    (vm, format!("{}:{port}", bed.host(host).ip().expect("hosts have addresses")))
}

/// (disk_passes, disk_mismatches) from the guest's control port, retrying while the network
/// learns where the guest is.
fn disk_status(bed: &TestBed, ctx: &[(&str, &Vm)]) -> (u64, u64) {
    let addr = SocketAddr::from((bed.guest_ip(0), CONTROL_PORT));
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let answer = bed
            .client()
            .run_in(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"status\n")?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line)
            })
            .expect("enter the client namespace");
        let field = |line: &str, name: &str| -> Option<u64> {
            line.split_whitespace().find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        if let Ok(line) = &answer
            && let (Some(p), Some(m)) = (field(line, "disk_passes"), field(line, "disk_mismatches"))
        {
            return (p, m);
        }
        assert!(Instant::now() < deadline, "the guest does not answer `status`: {answer:?}{}", dump(ctx));
        thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the disk workload completed more than `than` passes, none with a mismatch.
fn wait_passes(bed: &TestBed, than: u64, ctx: &[(&str, &Vm)]) -> u64 {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let (passes, mismatches) = disk_status(bed, ctx);
        assert_eq!(mismatches, 0, "the disk workload found lost or stale blocks{}", dump(ctx));
        if passes > than {
            return passes;
        }
        assert!(Instant::now() < deadline, "the disk workload is stuck at {passes} passes{}", dump(ctx));
        thread::sleep(Duration::from_millis(200));
    }
}

/// Moves the guest from `src` to `host`, whose `--disk` is `disk`; checks the workload before
/// and after and that the old VMM exits 0. Returns the new VMM.
fn move_guest(bed: &TestBed, src: Vm, host: &str, port: u16, disk: Option<&str>, what: &str) -> Vm {
    let before = wait_passes(bed, 0, &[("source", &src)]);
    let (dst, addr) = start_destination(bed, host, port, disk);
    let ctx = [("source", &src), ("destination", &dst)];
    let info = migrate_api(&src, &request(&addr), &ctx);
    print_info(what, &info);
    println!("{what}: {} bytes of disk data sent", info.disk_bytes_sent);
    assert_completed(&info, &ctx);
    wait_passes(bed, before, &ctx);
    assert_exits_cleanly(&src, &ctx);
    dst
}

#[test]
fn copied_disk_moves_back_and_forth_without_losing_a_block() {
    if !kvm_or_skip("copied_disk_moves_back_and_forth_without_losing_a_block") {
        return;
    }
    let bed = two_hosts();
    let on_a = Image::new("copied-a", 64 << 20);
    let (on_b, back_on_a) = (Image::future("copied-b"), Image::future("copied-a2"));
    let vm = start_source(&bed, &on_a.arg(""), "vmm.workload=disk vmm.disk_mib=32 vmm.disk_rate=16");
    let vm = move_guest(&bed, vm, "b", MIGRATION_PORT, Some(&on_b.arg("")), "copied disk to host b");
    assert!(on_b.0.exists(), "host b has its own copy");
    // The source flushed the image it leaves behind before it exited.
    assert_eq!(unwritten_pages(&on_a.0), 0, "the source's image still has unwritten pages");
    let vm = move_guest(&bed, vm, "a", MIGRATION_PORT + 1, Some(&back_on_a.arg("")), "copied disk back to host a");
    assert_eq!(vm.api().get_vm().expect("GET /vm").config.disks[0].path, back_on_a.0);
}

#[test]
fn shared_disk_moves_back_and_forth_without_losing_a_block() {
    if !kvm_or_skip("shared_disk_moves_back_and_forth_without_losing_a_block") {
        return;
    }
    let bed = two_hosts();
    let shared = Image::new("shared", 64 << 20);
    let vm = start_source(&bed, &shared.arg(",shared"), "vmm.workload=disk vmm.disk_mib=32 vmm.disk_rate=16");
    // A sandboxed destination (the default) opens only what its own --disk names.
    let vm = move_guest(&bed, vm, "b", MIGRATION_PORT, Some(&shared.arg(",shared")), "shared disk to host b");
    let vm = move_guest(&bed, vm, "a", MIGRATION_PORT + 1, Some(&shared.arg(",shared")), "shared disk back to a");
    let info = vm.api().get_vm().expect("GET /vm");
    assert!(info.config.disks[0].shared);
}

/// The pattern the disk workload leaves after pass `pass` in the byte range `[0, len)`.
fn pattern(pass: u64, len: usize) -> Vec<u8> {
    (0..len as u64 / 8).flat_map(|i| guest_common::dirty::expected(pass, i).to_le_bytes()).collect()
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[test]
fn a_sparse_disk_sends_what_was_written_not_its_size() {
    if !kvm_or_skip("a_sparse_disk_sends_what_was_written_not_its_size") {
        return;
    }
    let bed = two_hosts();
    let on_a = Image::new("sparse-a", 1 << 30);
    let on_b = Image::future("sparse-b");
    // One pass over 8 MiB, then the workload stops: 8 MiB of the 1 GiB disk are allocated.
    let src = start_source(&bed, &on_a.arg(""), "vmm.workload=disk vmm.disk_mib=8 vmm.disk_passes=1");
    wait_passes(&bed, 0, &[("source", &src)]);
    let info = src.api().get_vm().expect("GET /vm");
    assert!(info.disks[0].allocated_bytes >= 8 << 20, "{:?}", info.disks[0]);
    assert!(info.disks[0].allocated_bytes < 16 << 20, "{:?}", info.disks[0]);
    let (dst, addr) = start_destination_env(&bed, "b", MIGRATION_PORT, Some(&on_b.arg("")), &[("VMM_LOG", "info")]);
    let ctx = [("source", &src), ("destination", &dst)];
    let info = migrate_api(&src, &request(&addr), &ctx);
    print_info("1 GiB sparse disk, 8 MiB written", &info);
    assert_completed(&info, &ctx);
    let written = 8u64 << 20;
    println!("disk data sent: {} bytes for {written} written", info.disk_bytes_sent);
    assert!(info.disk_bytes_sent >= written, "every written block is sent: {}", info.disk_bytes_sent);
    assert!(info.disk_bytes_sent <= written + written / 10, "holes are not sent: {}", info.disk_bytes_sent);
    assert_exits_cleanly(&src, &ctx);
    // The destination's file holds what the guest wrote, and is as sparse as the source's.
    let mut got = vec![0u8; written as usize];
    let f = std::fs::File::open(&on_b.0).expect("the destination's image");
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).expect("read it");
    assert!(got == pattern(1, written as usize), "the destination's disk differs from what the guest wrote");
    assert_eq!(f.metadata().expect("stat").len(), 1 << 30);
    assert!(allocated(&on_b.0) < 16 << 20, "sparse on the destination too: {} bytes", allocated(&on_b.0));
    // What arrived went through the page cache; the destination makes it durable on the side.
    let synced = dst.log.wait_line(GUEST_TIMEOUT, |l| l.contains("received copy made durable"));
    assert!(synced.is_some(), "the destination does not make the received disk durable{}", dump(&ctx));
    assert_eq!(unwritten_pages(&on_b.0), 0, "the destination's image still has unwritten pages");
}

/// Pages of the file at `path` that sit in the page cache dirty or under writeback, i.e. not
/// yet on its device (cachestat(2), Linux 6.5).
fn unwritten_pages(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // Offset 0, length 0: the whole file.
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live locals of the kernel's layout.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, f.as_raw_fd(), &range as *const Range, &mut st as *mut Stat, 0) };
    assert_eq!(rc, 0, "cachestat {}: {}", path.display(), std::io::Error::last_os_error());
    st.dirty + st.writeback
}

/// One sample of a `/metrics` family for disk 0.
fn disk_metric(text: &str, name: &str, path: &Path) -> u64 {
    let prefix = format!("{name}{{disk=\"0\",path=\"{}\"}} ", path.display());
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line[prefix.len()..].parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn the_api_counts_the_guests_io_and_a_stopped_vmm_leaves_its_image_durable() {
    if !kvm_or_skip("the_api_counts_the_guests_io_and_a_stopped_vmm_leaves_its_image_durable") {
        return;
    }
    let bed = two_hosts();
    let image = Image::new("stop", 64 << 20);
    // A pass over 32 MiB takes 4 s: the VMM stops in the middle of one, between two flushes.
    let vm = start_source(&bed, &image.arg(""), "vmm.workload=disk vmm.disk_mib=32 vmm.disk_rate=8");
    let ctx = [("vm", &vm)];
    wait_passes(&bed, 0, &ctx);
    let info = vm.api().get_vm().expect("GET /vm");
    println!("GET /vm disks: {:?}", info.disks);
    assert_eq!(info.disks.len(), 1);
    let d = &info.disks[0];
    assert_eq!(d.path, image.0);
    assert_eq!(d.size_bytes, 64 << 20);
    assert!(!d.read_only && !d.shared);
    // One pass reads and writes 32 MiB in 64 KiB requests, then flushes.
    assert!(d.io.writes >= 512 && d.io.write_bytes >= 32 << 20, "{d:?}");
    assert!(d.io.reads >= 512 && d.io.read_bytes >= 32 << 20, "{d:?}");
    assert!(d.io.flushes >= 1, "{d:?}");
    assert_eq!((d.io.io_errors, d.io.unsupported, d.io.bad_descriptors), (0, 0, 0), "{d:?}");
    assert_eq!(d.dirty_blocks, 0, "no migration copies the disk");
    assert!(d.allocated_bytes >= 32 << 20, "{d:?}");

    let text = vm.api().metrics().expect("GET /metrics");
    assert!(disk_metric(&text, "vmm_disk_writes_total", &image.0) >= d.io.writes);
    assert!(disk_metric(&text, "vmm_disk_read_bytes_total", &image.0) >= d.io.read_bytes);
    assert!(disk_metric(&text, "vmm_disk_flushes_total", &image.0) >= d.io.flushes);
    assert_eq!(disk_metric(&text, "vmm_disk_errors_total", &image.0), 0);
    assert_eq!(disk_metric(&text, "vmm_disk_size_bytes", &image.0), 64 << 20);
    assert_eq!(disk_metric(&text, "vmm_disk_dirty_blocks", &image.0), 0);

    // Writes since the last flush are in the page cache (the host writes them back by itself
    // only after 30 s): the stop must write them.
    thread::sleep(Duration::from_secs(1));
    let before = unwritten_pages(&image.0);
    println!("pages not yet written before the stop: {before}");
    if before == 0 {
        println!("*** the host wrote the image back by itself: this run cannot tell whether the stop flushes ***");
    }
    vm.api().shutdown().expect("PUT /vm/shutdown");
    let status = vm.wait_timeout(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "the VMM did not exit cleanly: {status:?}{}", dump(&ctx));
    assert_eq!(unwritten_pages(&image.0), 0, "the stopped VMM left unwritten pages of its image");
}

/// A tmpfs of its own, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(bytes: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-disks-test-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "vmm-disks-test"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount a tmpfs (tests run as root)");
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_destination_that_runs_out_of_space_removes_its_file_and_the_guest_runs_on() {
    if !kvm_or_skip("a_destination_that_runs_out_of_space_removes_its_file_and_the_guest_runs_on") {
        return;
    }
    let bed = two_hosts();
    let on_a = Image::new("full-a", 64 << 20);
    let src = start_source(&bed, &on_a.arg(""), "vmm.workload=disk vmm.disk_mib=16 vmm.disk_rate=8");
    wait_passes(&bed, 0, &[("source", &src)]);
    // 4 MiB of room for a disk with 16 MiB written.
    let fs = SmallFs::mount(4 << 20);
    let target = fs.0.join("disk.img");
    let (dst, addr) = start_destination(&bed, "b", MIGRATION_PORT, Some(&format!("path={}", target.display())));
    let ctx = [("source", &src), ("destination", &dst)];
    src.api().migrate(&request(&addr)).expect("PUT /vm/migrate");
    let info = wait_migration(&src, &ctx);
    print_info("to a destination without room", &info);
    assert_eq!(info.phase, MigrationPhase::Failed, "{info:?}{}", dump(&ctx));
    let exited = dst.wait_timeout(Duration::from_secs(30)).expect("the destination exits");
    assert!(!exited.success());
    assert!(dst.log.text().contains("No space left"), "the destination says why{}", dump(&ctx));
    assert!(!target.exists(), "the partial file is removed");
    assert_eq!(src.api().get_vm().expect("GET /vm").state, VmState::Running);
    let before = disk_status(&bed, &ctx).0;
    wait_passes(&bed, before, &ctx);
}
