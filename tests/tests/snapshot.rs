// SPDX-License-Identifier: Apache-2.0
//! Snapshots end to end, in host `a` of a test bed with a client:
//!
//! - a guest dirtying and verifying 64 MiB, with an echo connection streaming a line every
//!   10 ms, is snapshotted (`vmm snapshot`: it stays paused), its VMM killed, and restored on the
//!   same TAP (`vmm run --restore`): its workload finds no page lost or stale, the open
//!   connection goes on with nothing lost, and new connections work;
//! - the same snapshot restores twice, each time with the guest's memory intact (the second
//!   time into a waiting VMM that prepared memory of another size);
//! - a VMM started ahead and waiting (`vmm run --await-restore`) answers nothing but a restore,
//!   refuses a directory that is no snapshot, a damaged snapshot and one whose NIC it has no
//!   TAP for (and waits on), then runs the snapshot it is given (`vmm restore`, into memory it
//!   prepared for the guest's size with `--await-mem-mib`) with the echo
//!   connection going on and memory intact, refuses a second one, and snapshots again (its
//!   memory was all loaded); one asked to stop before any snapshot exits;
//! - damaged snapshots are refused: a flipped byte in the state file, a memory file cut short,
//!   no manifest, a newer format, all before any guest runs; a flipped byte in a memory chunk
//!   the guest uses stops the VM with an error naming the chunk, the guest never having seen the
//!   byte;
//! - disks: a guest writing and verifying its disk, snapshotted with its disk copied
//!   (`--with-disks`), restores onto a new file with the disk's data; and snapshotted with the
//!   disk by reference, restores on the same file.
//!
//! Times are printed, not asserted.

use std::os::unix::fs::FileExt;
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::client::ClientError;
use vmm::api::{RestoreRequest, SnapshotPhase, VmState};
use vmm_tests::TestBed;
use vmm_tests::checks::{
    assert_no_dirty_mismatch_on_console, guest_echo_stream, more_dirty_passes, wait_echoes_resume,
};
use vmm_tests::guest::{GuestStatus, status};
use vmm_tests::moves::{ECHO_PORT, EXIT_TIMEOUT, GUEST_TIMEOUT, bed_with, dump, start_source};
use vmm_tests::snapshots::{
    RESTORE_TIMEOUT, RESTORED, SnapDir, restore_cli, snapshot_cli, spawn_restore, start_restore, start_waiting,
};
use vmm_tests::vm::{Vm, kvm_or_skip};

const DIRTY_64: &str = "vmm.workload=dirty vmm.dirty_mib=64 vmm.dirty_rate=64";

fn guest_status(bed: &TestBed, ctx: &[(&str, &Vm)]) -> GuestStatus {
    status(bed, GUEST_TIMEOUT).unwrap_or_else(|e| panic!("{e}{}", dump(ctx)))
}

/// Snapshots the guest of `src` into `dir` (it stays paused), then kills its VMM so that its
/// TAP is free for the restore.
fn snapshot_and_kill(src: Vm, dir: &SnapDir, extra: &[&str]) {
    let info = snapshot_cli(&src, dir.path(), extra).unwrap_or_else(|e| panic!("{e}{}", dump(&[("source", &src)])));
    println!("snapshot: {info:?}");
    assert_eq!(info.phase, SnapshotPhase::Completed, "{info:?}");
    assert!(info.error.is_none(), "{info:?}");
    assert!(info.memory_data_bytes > 0 && info.memory_data_bytes < info.memory_bytes, "{info:?}");
    assert_eq!(src.api().get_vm().expect("GET /vm").state, VmState::Paused, "a snapshot leaves the guest paused");
    src.kill();
}

#[test]
fn a_restored_guest_keeps_its_memory_and_its_connection() {
    if !kvm_or_skip("a_restored_guest_keeps_its_memory_and_its_connection") {
        return;
    }
    let bed = bed_with(&["a"]);
    let src = start_source(&bed, "a", &["--mem-mib", "256"], DIRTY_64);
    more_dirty_passes(&bed, 0, &[("source", &src)]);
    let stream = guest_echo_stream(&bed, 20, &[("source", &src)]);

    let dir = SnapDir::new("dirty");
    let before = guest_status(&bed, &[("source", &src)]);
    snapshot_and_kill(src, &dir, &[]);
    let killed_at = Instant::now();
    let sent_before = stream.stats().sent;

    let (dst, running_at) = start_restore(&bed, "a", dir.path(), &[]);
    let ctx = [("restored", &dst)];
    println!("restore: the guest runs {} ms after the old VMM was killed", (running_at - killed_at).as_millis());
    wait_echoes_resume(&stream, sent_before, &ctx);
    let after = more_dirty_passes(&bed, before.num("dirty_passes"), &ctx);
    println!(
        "dirty passes: {} before the snapshot, {} after the restore",
        before.num("dirty_passes"),
        after.num("dirty_passes")
    );
    assert_no_dirty_mismatch_on_console(&dst, &ctx);
    let stats = stream.finish();
    println!("echo stream: {stats:?}");
    assert!(stats.intact(), "lines were lost or the connection broke: {stats:?}{}", dump(&ctx));
    // A new connection works too.
    vmm_tests::guest::exchange(&bed, ECHO_PORT, "new\n")
        .unwrap_or_else(|e| panic!("new connection: {e}{}", dump(&ctx)));
    assert_eq!(dst.api().get_vm().expect("GET /vm").state, VmState::Running);
}

#[test]
fn one_snapshot_restores_twice() {
    if !kvm_or_skip("one_snapshot_restores_twice") {
        return;
    }
    let bed = bed_with(&["a"]);
    let src = start_source(&bed, "a", &["--mem-mib", "128"], DIRTY_64);
    let before = more_dirty_passes(&bed, 1, &[("source", &src)]);
    let dir = SnapDir::new("twice");
    snapshot_and_kill(src, &dir, &[]);
    let files_before = std::fs::read(dir.file("state")).expect("read the state file");
    for round in 1..=2 {
        // The second time into a waiting VMM ready for another size: its memory goes, the
        // snapshot's comes.
        let vm = if round == 1 {
            start_restore(&bed, "a", dir.path(), &[]).0
        } else {
            let tap = format!("tap={}", bed.host("a").tap());
            let vm = start_waiting(&bed, "a", &["--net", &tap, "--await-mem-mib", "512"]);
            restore_cli(&vm, dir.path()).unwrap_or_else(|e| panic!("{e}{}", dump(&[("waiting", &vm)])));
            vm
        };
        let ctx = [("restored", &vm)];
        let st = more_dirty_passes(&bed, before.num("dirty_passes"), &ctx);
        println!("restore {round}: dirty passes {} -> {}", before.num("dirty_passes"), st.num("dirty_passes"));
        assert_no_dirty_mismatch_on_console(&vm, &ctx);
        vm.kill();
        assert!(vm.wait_timeout(EXIT_TIMEOUT).is_some(), "the restored VMM did not end{}", dump(&ctx));
    }
    assert_eq!(
        std::fs::read(dir.file("state")).expect("read the state file"),
        files_before,
        "a restore changed the snapshot"
    );
}

/// `PUT /vm/restore` of `dir` to `vm`, which must refuse it with `status`: returns the message.
fn refused_put(vm: &Vm, dir: &std::path::Path, status: u16) -> String {
    match vm.api().restore(&RestoreRequest { from: dir.display().to_string() }) {
        Err(ClientError::Api { status: got, message }) if got == status => message,
        other => panic!("restore {} answered {other:?}, not {status}{}", dir.display(), dump(&[("waiting", vm)])),
    }
}

#[test]
fn a_waiting_vmm_runs_the_snapshot_it_is_given() {
    if !kvm_or_skip("a_waiting_vmm_runs_the_snapshot_it_is_given") {
        return;
    }
    let bed = bed_with(&["a"]);
    let src = start_source(&bed, "a", &["--mem-mib", "256"], DIRTY_64);
    more_dirty_passes(&bed, 0, &[("source", &src)]);
    let stream = guest_echo_stream(&bed, 20, &[("source", &src)]);
    let dir = SnapDir::new("for-waiting");
    let before = guest_status(&bed, &[("source", &src)]);
    snapshot_and_kill(src, &dir, &[]);
    let sent_before = stream.stats().sent;

    // Without a TAP for the guest's NIC: refused; and asked to stop, it stops.
    let bare = start_waiting(&bed, "a", &[]);
    let message = refused_put(&bare, dir.path(), 400);
    assert!(message.contains("NIC") && message.contains("--net"), "{message}");
    bare.api().shutdown().unwrap_or_else(|e| panic!("stop a waiting VMM: {e}{}", dump(&[("waiting", &bare)])));
    let status = bare.wait_timeout(EXIT_TIMEOUT);
    assert!(status.is_some_and(|s| s.success()), "a waiting VMM asked to stop: {status:?}{}", dump(&[("bare", &bare)]));

    // Ready for a guest of this size: its memory is mapped and registered with KVM ahead.
    let tap = format!("tap={}", bed.host("a").tap());
    let vm = start_waiting(&bed, "a", &["--net", &tap, "--await-mem-mib", "256"]);
    let ctx = [("waiting", &vm)];
    // Nothing runs yet, so nothing but a restore is answered.
    match vm.api().get_vm() {
        Err(ClientError::Api { status: 409, message }) => assert!(message.contains("no VM yet"), "{message}"),
        other => panic!("GET /vm of a waiting VMM: {other:?}{}", dump(&ctx)),
    }
    // But its metrics say that it waits.
    let metrics = vm.api().metrics().unwrap_or_else(|e| panic!("GET /metrics of a waiting VMM: {e}{}", dump(&ctx)));
    assert!(metrics.contains("\nvmm_waiting_for_snapshot 1\n"), "{metrics}");
    // No snapshot there, and a damaged one: refused before anything is built; it waits on.
    let message = refused_put(&vm, &dir.file("nothing-here"), 400);
    assert!(message.contains("not a snapshot directory"), "{message}");
    let bad = state_bit_flipped(&dir, "for-waiting-bad");
    let message = refused_put(&vm, bad.path(), 400);
    assert!(message.contains("damaged") && message.contains("CRC-64"), "{message}");
    // A guest this host's CPU cannot run: refused as well, from what the VMM asked its KVM
    // before it waited.
    let cpu = with_cpu_features_this_host_lacks(&dir, "for-waiting-cpu");
    let message = refused_put(&vm, cpu.path(), 400);
    assert!(message.contains("lacks features the guest uses: leaf 0x7.0"), "{message}");
    assert!(vm.try_wait().is_none(), "the waiting VMM ended{}", dump(&ctx));
    assert!(vm.console.text().trim().is_empty(), "a guest printed something{}", dump(&ctx));

    let info = restore_cli(&vm, dir.path()).unwrap_or_else(|e| panic!("{e}{}", dump(&ctx)));
    println!("restore into the waiting VMM: {info:?}");
    assert!(info.to_running_us > 0 && info.from == dir.path().display().to_string(), "{info:?}");
    assert!(vm.log.text().contains(RESTORED), "{}", dump(&ctx));
    let metrics = vm.api().metrics().unwrap_or_else(|e| panic!("GET /metrics: {e}{}", dump(&ctx)));
    assert!(
        metrics.contains("\nvmm_waiting_for_snapshot 0\n") && metrics.contains("vmm_net_rx_packets_total"),
        "{metrics}"
    );
    wait_echoes_resume(&stream, sent_before, &ctx);
    let after = more_dirty_passes(&bed, before.num("dirty_passes"), &ctx);
    assert_no_dirty_mismatch_on_console(&vm, &ctx);
    // One guest per VMM.
    let message = refused_put(&vm, dir.path(), 409);
    assert!(message.contains("runs a VM already"), "{message}");
    // Snapshotting it reads all of its memory, so the loader must have filled it in.
    let again = SnapDir::new("from-waiting");
    let info = snapshot_cli(&vm, again.path(), &["--resume"]).unwrap_or_else(|e| panic!("{e}{}", dump(&ctx)));
    assert_eq!(info.phase, SnapshotPhase::Completed, "{info:?}");
    more_dirty_passes(&bed, after.num("dirty_passes"), &ctx);
    assert_no_dirty_mismatch_on_console(&vm, &ctx);
    let stats = stream.finish();
    assert!(stats.intact(), "lines were lost or the connection broke: {stats:?}{}", dump(&ctx));
}

/// A restore of `dir` that must fail: returns its log.
fn refused_restore(bed: &TestBed, dir: &SnapDir) -> String {
    let vm = spawn_restore(bed, "a", dir.path(), &[]);
    let status = vm.wait_timeout(RESTORE_TIMEOUT);
    let ctx = [("restore", &vm)];
    assert!(
        status.is_some_and(|s| !s.success()),
        "the restore of a damaged snapshot did not fail: {status:?}{}",
        dump(&ctx)
    );
    let log = vm.log.text();
    assert!(!log.contains("the guest runs"), "a damaged snapshot's guest was started{}", dump(&ctx));
    assert!(vm.console.text().trim().is_empty(), "the guest printed something{}", dump(&ctx));
    log
}

/// A copy of `from` with one bit of its state file flipped.
fn state_bit_flipped(from: &SnapDir, tag: &str) -> SnapDir {
    let bad = copy_snapshot(from, tag);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(bad.file("state")).expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 500).expect("read");
    f.write_all_at(&[b[0] ^ 4], 500).expect("write");
    bad
}

/// A copy of `from` whose guest ran on a CPU with every feature bit of leaf 7 (this host lacks
/// some of them), its state file and the manifest's record of it rewritten so that they check.
fn with_cpu_features_this_host_lacks(from: &SnapDir, tag: &str) -> SnapDir {
    use migration::snapshot::{Manifest, decode_state, encode_state};
    let bad = copy_snapshot(from, tag);
    let bytes = std::fs::read(bad.file("state")).expect("read the state file");
    let payload = decode_state(&mut std::io::Cursor::new(&bytes), bytes.len() as u64).expect("decode the state");
    let mut state: vmm::snapshot::SnapshotState = serde_json::from_slice(&payload).expect("parse the state");
    for vcpu in &mut state.machine.vcpus {
        for e in vcpu.cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 7 && e.index == 0) {
            (e.ebx, e.ecx, e.edx) = (u32::MAX, u32::MAX, u32::MAX);
        }
    }
    let bytes = encode_state(&serde_json::to_vec(&state).expect("serialize the state"));
    std::fs::write(bad.file("state"), &bytes).expect("write the state file");
    let manifest = std::fs::read(bad.file("manifest.json")).expect("read the manifest");
    let mut manifest: Manifest = serde_json::from_slice(&manifest).expect("parse the manifest");
    manifest.state.size = bytes.len() as u64;
    manifest.state.crc64 = bytes.last_chunk::<8>().map(|t| u64::from_le_bytes(*t));
    let manifest = serde_json::to_vec_pretty(&manifest).expect("serialize the manifest");
    std::fs::write(bad.file("manifest.json"), manifest).expect("write the manifest");
    bad
}

/// Copies a snapshot directory's files.
fn copy_snapshot(from: &SnapDir, tag: &str) -> SnapDir {
    let to = SnapDir::new(tag);
    std::fs::create_dir(to.path()).expect("create the copy");
    for e in std::fs::read_dir(from.path()).expect("read the snapshot") {
        let e = e.expect("entry");
        // `cp --sparse=always` would keep the holes; a plain copy is fine for a 128 MiB file.
        std::fs::copy(e.path(), to.file(&e.file_name().to_string_lossy())).expect("copy");
    }
    to
}

#[test]
fn damaged_snapshots_are_refused() {
    if !kvm_or_skip("damaged_snapshots_are_refused") {
        return;
    }
    let bed = bed_with(&["a"]);
    let src = start_source(&bed, "a", &["--mem-mib", "128"], DIRTY_64);
    more_dirty_passes(&bed, 0, &[("source", &src)]);
    let good = SnapDir::new("good");
    snapshot_and_kill(src, &good, &[]);

    // A flipped bit in the state file.
    let bad = state_bit_flipped(&good, "state-bit");
    let log = refused_restore(&bed, &bad);
    println!("flipped state bit: {log}");
    assert!(log.contains("damaged") && log.contains("CRC-64"), "{log}");

    // The memory file cut short.
    let bad = copy_snapshot(&good, "short");
    let f = std::fs::OpenOptions::new().write(true).open(bad.file("memory")).expect("open");
    f.set_len(64 << 20).expect("truncate");
    let log = refused_restore(&bed, &bad);
    println!("short memory file: {log}");
    assert!(log.contains("memory") && log.contains("bytes"), "{log}");

    // No manifest: a snapshot never finished.
    let bad = copy_snapshot(&good, "no-manifest");
    std::fs::remove_file(bad.file("manifest.json")).expect("remove");
    let log = refused_restore(&bed, &bad);
    assert!(log.contains("never finished"), "{log}");

    // A format this VMM cannot read.
    let bad = copy_snapshot(&good, "newer");
    let text = std::fs::read_to_string(bad.file("manifest.json")).expect("read");
    let newer = text.replacen("\"major\": 1", "\"major\": 9", 1);
    assert_ne!(newer, text);
    std::fs::write(bad.file("manifest.json"), newer).expect("write");
    let log = refused_restore(&bed, &bad);
    assert!(log.contains("format 9.0 cannot be read"), "{log}");

    // A guest that ran on a CPU with features this host lacks.
    let bad = with_cpu_features_this_host_lacks(&good, "cpu");
    let log = refused_restore(&bed, &bad);
    assert!(log.contains("lacks features the guest uses: leaf 0x7.0"), "{log}");

    // A flipped byte in a memory chunk the guest works on: found when the chunk is loaded, and
    // the VM stops; the guest never reads the byte (its workload would report a mismatch).
    let bad = copy_snapshot(&good, "memory-bit");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(bad.file("memory")).expect("open");
    let data = first_data_offset(&f, 32 << 20);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, data + 77).expect("read");
    f.write_all_at(&[b[0] ^ 1], data + 77).expect("write");
    let vm = spawn_restore(&bed, "a", bad.path(), &[]);
    let status = vm.wait_timeout(RESTORE_TIMEOUT);
    let ctx = [("restore", &vm)];
    assert!(
        status.is_some_and(|s| !s.success()),
        "a damaged memory chunk did not stop the VM: {status:?}{}",
        dump(&ctx)
    );
    let log = vm.log.text();
    println!("flipped memory bit: {log}");
    assert!(log.contains("memory is damaged: chunk"), "{}", dump(&ctx));
    assert!(!vm.console.text().contains("DIRTY-MISMATCH"), "the guest read the damaged byte{}", dump(&ctx));

    // The good one still restores.
    let (vm, _) = start_restore(&bed, "a", good.path(), &[]);
    more_dirty_passes(&bed, 0, &[("restored", &vm)]);
}

/// The first offset at or after `from` where `f` holds data (SEEK_DATA).
fn first_data_offset(f: &std::fs::File, from: u64) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own.
    let off = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    assert!(off >= 0, "no data in the memory file after {from:#x}");
    off as u64
}

/// A sparse image file removed when dropped (`future`: only a path, for a file a restore makes).
struct Image(std::path::PathBuf);

impl Image {
    fn new(tag: &str, size: u64) -> Image {
        let img = Image::future(tag);
        std::fs::File::create(&img.0).expect("create image").set_len(size).expect("size image");
        img
    }

    fn future(tag: &str) -> Image {
        let p = std::env::temp_dir().join(format!("vmm-snap-disk-{}-{tag}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Image(p)
    }

    fn arg(&self) -> String {
        format!("path={}", self.0.display())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until the disk workload has done more passes than `than`, with no bad block.
fn more_disk_passes(bed: &TestBed, than: u64, ctx: &[(&str, &Vm)]) -> GuestStatus {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let st = guest_status(bed, ctx);
        assert_eq!(st.num("disk_mismatches"), 0, "the disk workload found bad blocks: {st:?}{}", dump(ctx));
        if st.num("disk_passes") > than {
            return st;
        }
        assert!(Instant::now() < deadline, "the disk workload stopped at {than} passes{}", dump(ctx));
        thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn disks_copied_or_by_reference_restore_with_their_data() {
    if !kvm_or_skip("disks_copied_or_by_reference_restore_with_their_data") {
        return;
    }
    let bed = bed_with(&["a"]);
    let workload = "vmm.workload=disk vmm.disk_mib=8 vmm.disk_rate=16";
    for copied in [true, false] {
        let what = if copied { "copied" } else { "by reference" };
        let image = Image::new(if copied { "copied-src" } else { "ref" }, 64 << 20);
        let src = start_source(&bed, "a", &["--mem-mib", "128", "--disk", &image.arg()], workload);
        let before = more_disk_passes(&bed, 0, &[("source", &src)]);
        let dir = SnapDir::new(if copied { "disk-copied" } else { "disk-ref" });
        snapshot_and_kill(src, &dir, if copied { &["--with-disks"] } else { &[] });
        let restored_disk = Image::future("copied-dst");
        let extra: Vec<String> = if copied { vec!["--disk".into(), restored_disk.arg()] } else { vec![] };
        if copied {
            assert!(dir.file("disk-0.raw").exists(), "no copy of the disk in the snapshot");
            // Without a file of its own for the copied disk, the restore is refused.
            let vm = spawn_restore(&bed, "a", dir.path(), &[]);
            let st = vm.wait_timeout(RESTORE_TIMEOUT);
            assert!(st.is_some_and(|s| !s.success()), "{}", dump(&[("restore", &vm)]));
            assert!(vm.log.text().contains("--disk path=FILE"), "{}", dump(&[("restore", &vm)]));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (vm, _) = start_restore(&bed, "a", dir.path(), &extra);
        let ctx = [("restored", &vm)];
        let after = more_disk_passes(&bed, before.num("disk_passes"), &ctx);
        println!(
            "disk {what}: disk passes {} before, {} after the restore",
            before.num("disk_passes"),
            after.num("disk_passes")
        );
        if copied {
            let meta = std::fs::metadata(&restored_disk.0).expect("the restored disk exists");
            assert_eq!(meta.len(), 64 << 20);
            let f = std::fs::File::open(&restored_disk.0).expect("open the restored disk");
            let mut head = vec![0u8; 4096];
            f.read_exact_at(&mut head, 0).expect("read");
            assert!(head.iter().any(|b| *b != 0), "the restored disk does not hold the guest's data");
        }
        vm.kill();
        assert!(vm.wait_timeout(EXIT_TIMEOUT).is_some());
    }
}
