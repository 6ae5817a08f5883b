// SPDX-License-Identifier: Apache-2.0
//! The sandbox of a running VMM, seen from outside through /proc: with `--jail 65534:65534`
//! every thread of the source and of the destination runs as that user and group with no
//! capability at all, no-new-privileges and a seccomp filter, in a mount namespace whose root
//! is empty, while the guest runs, while it migrates and after it moved; the guest's network
//! works before and after. Without `--jail` the filters are on by default too. A jailed VMM
//! writes a snapshot into a `--jail-dir DIR,rw`, and a jailed VMM waiting for a snapshot
//! (`--await-restore`) restores it from a read-only `--jail-dir`, and cannot see one outside.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use std::path::Path;

use vmm::api::client::ClientError;
use vmm::api::{MigrationPhase, RestoreRequest, SnapshotPhase};
use vmm_tests::TestBed;
use vmm_tests::moves::{
    ECHO_PORT, GUEST_TIMEOUT, MIGRATION_PORT, MIGRATION_TIMEOUT, assert_completed, assert_exits_cleanly, dump, request,
    start_destination_with, start_source,
};
use vmm_tests::snapshots::{SnapDir, restore_cli, snapshot_cli, start_waiting};
use vmm_tests::vm::{Vm, kvm_or_skip};

const JAIL: &str = "65534:65534";

/// The fields of /proc/PID/task/TID/status that say how sandboxed a thread is.
#[derive(Debug)]
struct ThreadSandbox {
    name: String,
    uid: String,
    gid: String,
    groups: String,
    cap_eff: String,
    cap_prm: String,
    cap_inh: String,
    cap_bnd: String,
    cap_amb: String,
    no_new_privs: String,
    seccomp: String,
}

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every thread of `pid` (those that end while being read are skipped).
fn threads(pid: u32) -> Vec<ThreadSandbox> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        out.push(ThreadSandbox {
            name: field(&status, "Name"),
            uid: field(&status, "Uid"),
            gid: field(&status, "Gid"),
            groups: field(&status, "Groups"),
            cap_eff: field(&status, "CapEff"),
            cap_prm: field(&status, "CapPrm"),
            cap_inh: field(&status, "CapInh"),
            cap_bnd: field(&status, "CapBnd"),
            cap_amb: field(&status, "CapAmb"),
            no_new_privs: field(&status, "NoNewPrivs"),
            seccomp: field(&status, "Seccomp"),
        });
    }
    out
}

/// Checks every thread of `vm`; returns the names of the threads seen.
fn assert_jailed(vm: &Vm, what: &str) -> Vec<String> {
    assert_jailed_with(vm, what, &[])
}

/// [`assert_jailed`] for a jail that shows `dirs` (each with its mount option, `ro` or `rw`):
/// its root holds only their first components, and each is mounted so.
fn assert_jailed_with(vm: &Vm, what: &str, dirs: &[(&Path, &str)]) -> Vec<String> {
    let pid = vm.pid();
    let all = threads(pid);
    assert!(!all.is_empty(), "{what}: no threads of {pid}{}", dump(&[(what, vm)]));
    const NONE: &str = "0000000000000000";
    for t in &all {
        let ok = t.uid == "65534 65534 65534 65534"
            && t.gid == "65534 65534 65534 65534"
            && t.groups.is_empty()
            && [&t.cap_eff, &t.cap_prm, &t.cap_inh, &t.cap_bnd, &t.cap_amb].iter().all(|c| *c == NONE)
            && t.no_new_privs == "1"
            && t.seccomp == "2";
        assert!(ok, "{what}: thread {t:?} is not sandboxed{}", dump(&[(what, vm)]));
    }
    // Its own mount namespace, whose root holds nothing.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).expect("mount namespace");
    assert_ne!(ns(&pid.to_string()), ns("self"), "{what}: in the host's mount namespace");
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("its root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    let mut want: Vec<String> = dirs
        .iter()
        .filter_map(|(d, _)| d.components().nth(1).map(|c| c.as_os_str().to_string_lossy().into_owned()))
        .collect();
    want.dedup();
    assert_eq!(root, want, "{what}: its root holds {root:?}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("its mounts");
    for (dir, option) in dirs {
        // Fields: id, parent, dev, root, mount point, options, ...
        let shown = mounts.lines().map(|l| l.split(' ').collect::<Vec<_>>()).any(|f| {
            f.get(4) == Some(&dir.to_str().unwrap_or(""))
                && f.get(5).is_some_and(|o| o.split(',').any(|x| x == *option))
        });
        assert!(shown, "{what}: {} is not mounted {option} in its jail:\n{mounts}", dir.display());
    }
    all.into_iter().map(|t| t.name).collect()
}

fn two_hosts() -> TestBed {
    TestBed::builder().host("a").host("b").client("client").host_ips().build().expect("build the test bed")
}

/// One line through the guest's echo service, from the client namespace.
fn assert_echo(bed: &TestBed, ctx: &[(&str, &Vm)]) {
    let addr = SocketAddr::from((bed.guest_ip(0), ECHO_PORT));
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let answer = bed
            .client()
            .run_in(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"jailed\n")?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line)
            })
            .expect("enter the client namespace");
        match answer {
            Ok(line) if line == "jailed\n" => return,
            other => assert!(Instant::now() < deadline, "the echo service does not answer: {other:?}{}", dump(ctx)),
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_jailed_guest_runs_and_migrates_to_a_jailed_destination() {
    if !kvm_or_skip("a_jailed_guest_runs_and_migrates_to_a_jailed_destination") {
        return;
    }
    let bed = two_hosts();
    let src = start_source(&bed, "a", &["--jail", JAIL], "vmm.workload=echo");
    let names = assert_jailed(&src, "source");
    assert!(names.iter().any(|n| n == "vcpu0") && names.iter().any(|n| n == "api"), "{names:?}");
    assert_echo(&bed, &[("source", &src)]);

    let (dst, to) = start_destination_with(&bed, "b", MIGRATION_PORT, &["--jail", JAIL]);
    assert_jailed(&dst, "destination (waiting)");
    let ctx = [("source", &src), ("destination", &dst)];
    if let Err(e) = src.api().migrate(&request(&to)) {
        panic!("PUT /vm/migrate failed: {e}{}", dump(&ctx));
    }
    // While it migrates: the source's migration thread and the destination's threads too.
    let mut saw_migration_thread = false;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let info = loop {
        // Reading a completed migration lets the source go: the last read is the outcome.
        match src.api().migration() {
            Ok(m) if matches!(m.phase, MigrationPhase::Completed | MigrationPhase::Failed) => break m,
            Ok(_) => {}
            Err(e) => panic!("the source stopped answering during the migration: {e}{}", dump(&ctx)),
        }
        saw_migration_thread |= assert_jailed(&src, "source (migrating)").iter().any(|n| n == "migration");
        assert_jailed(&dst, "destination (migrating)");
        assert!(Instant::now() < deadline, "the migration did not end{}", dump(&ctx));
    };
    assert_completed(&info, &ctx);
    println!("saw the source's migration thread while it ran: {saw_migration_thread}");
    assert_exits_cleanly(&src, &ctx);
    let names = assert_jailed(&dst, "destination (running the guest)");
    assert!(names.iter().any(|n| n == "vcpu0"), "{names:?}");
    assert_echo(&bed, &[("destination", &dst)]);
}

#[test]
fn filters_are_on_by_default_and_off_on_request() {
    if !kvm_or_skip("filters_are_on_by_default_and_off_on_request") {
        return;
    }
    let bed = two_hosts();
    let on = start_source(&bed, "a", &[], "vmm.workload=echo");
    for t in threads(on.pid()) {
        assert_eq!(t.seccomp, "2", "{t:?}{}", dump(&[("default", &on)]));
    }
    let off = start_source(&bed, "b", &["--no-seccomp"], "vmm.workload=echo");
    for t in threads(off.pid()) {
        assert_eq!(t.seccomp, "0", "{t:?}{}", dump(&[("--no-seccomp", &off)]));
    }
}

#[test]
fn a_jailed_vmm_writes_and_restores_snapshots_in_its_jail_dirs() {
    if !kvm_or_skip("a_jailed_vmm_writes_and_restores_snapshots_in_its_jail_dirs") {
        return;
    }
    let bed = TestBed::builder().host("a").client("client").host_ips().build().expect("build the test bed");
    // A directory the jail's user owns, writable in the source's jail.
    let dir = SnapDir::new("jail-dir");
    std::fs::create_dir(dir.path()).expect("create the jail directory");
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown the jail directory");
    let rw = format!("{},rw", dir.path().display());
    let src = start_source(&bed, "a", &["--jail", JAIL, "--jail-dir", &rw], "vmm.workload=echo");
    assert_jailed_with(&src, "source", &[(dir.path(), "rw")]);
    assert_echo(&bed, &[("source", &src)]);
    let snap = dir.file("snap");
    let info = snapshot_cli(&src, &snap, &[]).unwrap_or_else(|e| panic!("{e}{}", dump(&[("source", &src)])));
    assert_eq!(info.phase, SnapshotPhase::Completed, "{info:?}");
    assert!(snap.join("manifest.json").is_file(), "the jailed VMM's snapshot is not in {}", snap.display());
    src.kill();
    assert!(src.wait_timeout(Duration::from_secs(10)).is_some(), "the source did not end when killed");
    // A copy outside the jail's directories.
    let outside = SnapDir::new("outside-jail");
    std::fs::create_dir(outside.path()).expect("create the copy");
    for name in ["manifest.json", "state", "memory"] {
        std::fs::copy(snap.join(name), outside.file(name)).expect("copy the snapshot");
    }

    // Waiting, jailed, with the directory read-only: the copy outside is not there for it, the
    // snapshot inside is.
    let tap = format!("tap={}", bed.host("a").tap());
    let ro = dir.path().display().to_string();
    let vm = start_waiting(&bed, "a", &["--net", &tap, "--jail", JAIL, "--jail-dir", &ro]);
    let ctx = [("waiting", &vm)];
    assert_jailed_with(&vm, "waiting", &[(dir.path(), "ro")]);
    match vm.api().restore(&RestoreRequest { from: outside.path().display().to_string() }) {
        Err(ClientError::Api { status: 400, message }) => assert!(message.contains("--jail-dir"), "{message}"),
        other => panic!("a snapshot outside the jail: {other:?}{}", dump(&ctx)),
    }
    let info = restore_cli(&vm, &snap).unwrap_or_else(|e| panic!("{e}{}", dump(&ctx)));
    println!("jailed restore: {info:?}");
    let names = assert_jailed_with(&vm, "restored", &[(dir.path(), "ro")]);
    assert!(names.iter().any(|n| n == "vcpu0"), "{names:?}");
    assert_echo(&bed, &ctx);
}
