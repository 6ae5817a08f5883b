// SPDX-License-Identifier: Apache-2.0
//! The cluster end to end: host agents (`vmm host run`) in the hosts of a test bed, each with a
//! CPU quota of its own, a private etcd, and the cluster commands (`vmm cluster|vm|host ...`)
//! run from the client's namespace, with our guest serving echo to clients that check every
//! line. See `vmm_tests::cluster`.
//!
//! Times (moves, downtimes, gaps, how long a dead host took to show as down) are printed, never
//! asserted: the machines these tests run on are small and shared (`vmm-bench --only cluster`
//! measures them).

use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_cluster::cli::watch::STAMP_PREFIX;
use vmm_tests::cluster::{ClusterBed, ClusterOptions};
use vmm_tests::echo_stream::EchoStream;
use vmm_tests::vm::{guest_kernel, kvm_or_skip, vmm_bin};

const WAIT: Duration = Duration::from_secs(60);

/// Creates VM `name` as guest `i` of the bed (its address), serving echo; waits until it runs.
fn create(c: &ClusterBed, name: &str, i: u8, extra: &[&str]) -> String {
    let cmdline = format!("console=ttyS0 {} vmm.workload=echo", c.bed.guest_ip_cmdline(i));
    c.create_vm(name, &cmdline, 64, extra).unwrap_or_else(|e| panic!("{e}{}", c.describe()))
}

/// A client in the client namespace streaming a line every 10 ms to guest `i`'s echo port.
fn stream_to(c: &ClusterBed, i: u8) -> EchoStream {
    c.echo_stream(i, WAIT).unwrap_or_else(|e| panic!("{e}{}", c.describe()))
}

fn owner(c: &ClusterBed, vm: &str) -> (String, u64, String) {
    let row = c.vm(vm).unwrap_or_else(|| panic!("no VM {vm} in the status{}", c.describe()));
    (row.owner, row.epoch, row.state)
}

/// The normal life of VMs: placement, a live move with a client streaming through it, two
/// concurrent moves of one VM (one happens, one is refused clearly), every kind of bad input,
/// a drain, and a stop.
#[test]
fn vms_are_placed_moved_drained_and_stopped() {
    if !kvm_or_skip("vms_are_placed_moved_drained_and_stopped") {
        return;
    }
    let c = ClusterBed::start(&["a", "b", "c"], ClusterOptions { mem_mib: 400, ..Default::default() });

    // Placement: each VM goes to the freest host, so three VMs land on three hosts.
    for (i, name) in ["v0", "v1", "v2"].iter().enumerate() {
        let out = create(&c, name, i as u8, &[]);
        assert!(out.contains("runs on host"), "{out}");
    }
    let s = c.status().unwrap();
    let mut owners: Vec<&str> = s.vms.iter().map(|v| v.owner.as_str()).collect();
    owners.sort();
    assert_eq!(owners, ["a", "b", "c"], "{s:?}");
    assert!(s.vms.iter().all(|v| v.state == "running" && v.epoch == 1), "{s:?}");

    // Bad input, each refused with a clear message and nothing changed.
    let kernel = guest_kernel();
    let k = kernel.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["vm", "move", "nope", "--to", "a"], "no VM named \"nope\""),
        (vec!["vm", "move", "v0", "--to", "zz"], "no host named \"zz\""),
        (vec!["vm", "stop", "nope"], "no VM named \"nope\""),
        (vec!["vm", "create", "--name", "v0", "--kernel", k, "--no-net"], "already exists"),
        (
            vec!["vm", "create", "--name", "big", "--kernel", k, "--mem-mib", "4096", "--no-net"],
            "no host has room for 4104 MiB",
        ),
        (vec!["vm", "create", "--name", "Bad_Name", "--kernel", k], "invalid VM name"),
        (vec!["vm", "create", "--name", "x", "--kernel", "/nonexistent"], "no such file"),
        (vec!["host", "drain", "zz"], "no host named \"zz\""),
    ];
    for (args, expected) in &cases {
        let err = c.cli_err(args);
        assert!(err.contains(expected), "`vmm {}`: expected {expected:?} in {err:?}", args.join(" "));
    }
    let owner_of_v0 = owner(&c, "v0").0;
    let here = c.cli_err(&["vm", "move", "v0", "--to", &owner_of_v0]);
    assert!(here.contains("already on host"), "{here}");

    // A live move with a client streaming through it.
    let (from, epoch, _) = owner(&c, "v0");
    let to = if from == "a" { "b" } else { "a" };
    let echo = stream_to(&c, 0);
    std::thread::sleep(Duration::from_millis(500));
    let out = c.cli_ok(&["vm", "move", "v0", "--to", to]);
    println!("{}", out.trim());
    let (now, now_epoch, state) = owner(&c, "v0");
    assert_eq!((now.as_str(), now_epoch), (to, epoch + 1), "{}", c.describe());
    c.wait_until("v0 to run on its new host", WAIT, |s| s.vms.iter().any(|v| v.name == "v0" && v.state == "running"));
    let _ = state;
    std::thread::sleep(Duration::from_millis(500));
    let stats = echo.finish();
    println!("v0 {from} → {to}: {} lines, largest gap {} ms", stats.sent, stats.largest_gap.as_millis());
    assert!(stats.intact(), "the client lost lines or saw errors: {stats:?}");

    // A drained host takes nothing.
    c.cli_ok(&["host", "drain", "c", "--no-wait"]);
    let err = c.cli_err(&["vm", "move", "v1", "--to", "c"]);
    assert!(err.contains("host c is drained"), "{err}");
    c.cli_ok(&["host", "undrain", "c"]);

    // Two moves of one VM at once: exactly one happens, the other is refused clearly.
    let (from, epoch, _) = owner(&c, "v1");
    let targets: Vec<&str> = ["a", "b", "c"].into_iter().filter(|h| *h != from).collect();
    let (t1, t2) = (targets[0].to_string(), targets[1].to_string());
    let results = std::thread::scope(|s| {
        let h1 = s.spawn(|| c.cli(&["vm", "move", "v1", "--to", &t1]));
        let h2 = s.spawn(|| c.cli(&["vm", "move", "v1", "--to", &t2]));
        [h1.join().unwrap(), h2.join().unwrap()]
    });
    let ok: Vec<&std::process::Output> = results.iter().filter(|o| o.status.success()).collect();
    let refused: Vec<&std::process::Output> = results.iter().filter(|o| !o.status.success()).collect();
    assert_eq!(
        (ok.len(), refused.len()),
        (1, 1),
        "{:?}{}",
        results.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect::<Vec<_>>(),
        c.describe()
    );
    let why = String::from_utf8_lossy(&refused[0].stderr);
    assert!(why.contains("another move of VM v1 is in flight"), "{why}");
    let (now, now_epoch, _) = owner(&c, "v1");
    assert!(now == t1 || now == t2, "{now}");
    assert_eq!(now_epoch, epoch + 1, "one move, one epoch more");

    // Drain the host holding v1 while a client streams to it.
    let drained = now;
    let echo = stream_to(&c, 1);
    std::thread::sleep(Duration::from_millis(300));
    let out = c.cli_ok(&["host", "drain", &drained]);
    println!("{}", out.trim());
    let s = c.status().unwrap();
    assert!(s.vms.iter().all(|v| v.owner != drained), "{s:?}");
    assert!(s.hosts.iter().any(|h| h.name == drained && h.drained && h.vms == 0), "{s:?}");
    let stats = echo.finish();
    println!("v1 during the drain: {} lines, largest gap {} ms", stats.sent, stats.largest_gap.as_millis());
    assert!(stats.intact(), "the client lost lines or saw errors during the drain: {stats:?}");

    // Stop removes the VM and its VMM.
    let out = c.cli_ok(&["vm", "stop", "v2"]);
    assert!(out.contains("stopped and removed"), "{out}");
    assert!(c.vm("v2").is_none());
    let listed = c.cli_ok(&["vm", "list"]);
    assert!(listed.contains("v0") && listed.contains("v1") && !listed.contains("v2"), "{listed}");
    println!("{}", c.cli_ok(&["cluster", "status"]));
}

/// The process id of VM `vm`'s VMM at `epoch` on `host`, from the agent's state directory.
fn vmm_pid(c: &ClusterBed, host: &str, vm: &str, epoch: u64) -> Option<u32> {
    let json = std::fs::read(c.state_dir(host).join(format!("vms/{vm}.{epoch}/local.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    v["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

/// Lines echoed so far keep growing: the guest answers.
fn still_echoing(echo: &EchoStream, what: &str) {
    let before = echo.stats().echoed;
    let deadline = Instant::now() + Duration::from_secs(10);
    while echo.stats().echoed < before + 20 {
        assert!(Instant::now() < deadline, "{what}: the guest stopped answering: {:?}", echo.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VM dirtying memory as fast as it can (pre-copy's "never converges" case) moves through
/// the agents by post-copy (`vmm vm move --mode postcopy`): the source agent asks its VMM for
/// post-copy with the move's route, the destination agent hands the later connections (the
/// fault connection) to the VMM it started for the move, and the guest arrives with its memory
/// intact and the client's echo stream whole.
#[test]
fn a_vm_that_never_converges_moves_by_postcopy_through_the_agents() {
    if !kvm_or_skip("a_vm_that_never_converges_moves_by_postcopy_through_the_agents") {
        return;
    }
    let c = ClusterBed::start(&["a", "b"], ClusterOptions::default());
    let cmdline =
        format!("console=ttyS0 {} vmm.workload=dirty vmm.dirty_mib=64 vmm.dirty_rate=0", c.bed.guest_ip_cmdline(0));
    c.create_vm("v0", &cmdline, 256, &["--host", "a"]).unwrap_or_else(|e| panic!("{e}{}", c.describe()));
    let before = vmm_tests::guest::status(&c.bed, WAIT).unwrap_or_else(|e| panic!("{e}{}", c.describe()));
    let echo = stream_to(&c, 0);

    let out = c.cli_ok(&["vm", "move", "v0", "--to", "b", "--mode", "postcopy"]);
    println!("{out}");
    assert_eq!(owner(&c, "v0"), ("b".to_string(), 2, "running".to_string()), "{}", c.describe());
    // It switched to post-copy (the source's figures, in its agent's log), on the connection the
    // destination's agent handed over to the VMM it started for the move.
    let source = c.agent_log("a");
    let moved = source.lines().find(|l| l.contains("moved away")).unwrap_or_else(|| panic!("{}", c.describe()));
    assert!(moved.contains("mode=Postcopy") && moved.contains("postcopy_pages=Some("), "{moved}{}", c.describe());
    assert!(!moved.contains("postcopy_pages=Some(0)"), "nothing was left for post-copy: {moved}");
    assert!(c.agent_log("b").contains("handed a later connection of the move to its VMM"), "{}", c.describe());

    let deadline = Instant::now() + WAIT;
    let after = loop {
        let st = vmm_tests::guest::status(&c.bed, WAIT).unwrap_or_else(|e| panic!("{e}{}", c.describe()));
        assert_eq!(st.num("dirty_mismatches"), 0, "the guest found bad pages: {st:?}{}", c.describe());
        if st.num("dirty_passes") > before.num("dirty_passes") + 1 {
            break st;
        }
        assert!(Instant::now() < deadline, "the dirty workload stopped: {st:?}{}", c.describe());
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("dirty passes {} before the move, {} after", before.num("dirty_passes"), after.num("dirty_passes"));
    still_echoing(&echo, "after the post-copy move");
    let stats = echo.finish();
    println!("v0 through a post-copy move: {} lines, largest gap {} ms", stats.sent, stats.largest_gap.as_millis());
    assert!(stats.intact(), "{stats:?}");
}

/// Killing an agent takes none of its VMs down: its lease expires and its host shows as down,
/// the VMs keep serving, nothing can be moved off or onto it meanwhile, and a restarted agent
/// adopts the same VMM processes (which can then be moved as usual).
#[test]
fn a_dead_agent_takes_no_vm_down_and_its_successor_adopts_them() {
    if !kvm_or_skip("a_dead_agent_takes_no_vm_down_and_its_successor_adopts_them") {
        return;
    }
    let mut c = ClusterBed::start(&["a", "b"], ClusterOptions::default());
    create(&c, "v0", 0, &["--host", "a"]);
    create(&c, "v1", 1, &["--host", "a"]);
    let pids: Vec<u32> = ["v0", "v1"].iter().map(|v| vmm_pid(&c, "a", v, 1).expect("the VMM's record")).collect();
    let echo = stream_to(&c, 0);

    c.kill_agent("a");
    let killed = Instant::now();
    let s = c.wait_until("host a to show as down", WAIT, |s| s.hosts.iter().any(|h| h.name == "a" && !h.up));
    println!("host a shown down {} ms after its agent was killed", killed.elapsed().as_millis());
    assert!(s.vms.iter().all(|v| v.state == "unknown (host down)"), "{s:?}");
    assert!(pids.iter().all(|p| alive(*p)), "a VMM died with its agent");
    still_echoing(&echo, "with host a's agent dead");
    let err = c.cli_err(&["vm", "move", "v0", "--to", "b"]);
    assert!(err.contains("host a is down"), "{err}");
    let kernel = guest_kernel();
    let err =
        c.cli_err(&["vm", "create", "--name", "x", "--kernel", kernel.to_str().unwrap(), "--host", "a", "--no-net"]);
    assert!(err.contains("host a is down"), "{err}");

    c.start_agent("a");
    c.wait_until("host a's VMs to be adopted", WAIT, |s| {
        s.hosts.iter().any(|h| h.name == "a" && h.up)
            && ["v0", "v1"].iter().all(|n| s.vms.iter().any(|v| v.name == *n && v.state == "running"))
    });
    let s = c.status().unwrap();
    let adopted: Vec<Option<u32>> =
        ["v0", "v1"].iter().map(|n| s.vms.iter().find(|v| v.name == *n).and_then(|v| v.pid)).collect();
    assert_eq!(adopted, pids.iter().map(|p| Some(*p)).collect::<Vec<_>>(), "the same VMMs, adopted");
    assert!(c.agent_log("a").contains("found a VMM of an earlier agent"), "{}", c.agent_log("a"));

    // The adopted VMM moves like any other.
    c.cli_ok(&["vm", "move", "v0", "--to", "b"]);
    assert_eq!(owner(&c, "v0").0, "b");
    let stats = echo.finish();
    println!(
        "v0 through the agent's death, adoption and a move: {} lines, largest gap {} ms",
        stats.sent,
        stats.largest_gap.as_millis()
    );
    assert!(stats.intact(), "{stats:?}");
}

/// etcd down: running VMs are unaffected, every command that needs the cluster fails with a
/// clear error (no hang), and when etcd is back the agents register again and moves work.
#[test]
fn without_etcd_vms_run_on_and_commands_fail_clearly() {
    if !kvm_or_skip("without_etcd_vms_run_on_and_commands_fail_clearly") {
        return;
    }
    let mut c = ClusterBed::start(&["a", "b"], ClusterOptions::default());
    create(&c, "v0", 0, &["--host", "a"]);
    let echo = stream_to(&c, 0);

    c.kill_etcd();
    let kernel = guest_kernel();
    let k = kernel.to_str().unwrap();
    for args in [
        vec!["cluster", "status"],
        vec!["vm", "create", "--name", "x", "--kernel", k, "--no-net"],
        vec!["vm", "move", "v0", "--to", "b"],
        vec!["host", "drain", "a"],
        vec!["vm", "stop", "v0"],
    ] {
        let t = Instant::now();
        let err = c.cli_err(&args);
        println!("`vmm {}` failed after {} ms: {}", args.join(" "), t.elapsed().as_millis(), err.trim());
        assert!(err.contains("etcd") && err.contains("unreachable"), "`vmm {}`: {err}", args.join(" "));
    }
    still_echoing(&echo, "with etcd down");
    // Down longer than the agents' leases last.
    std::thread::sleep(Duration::from_secs(4));
    still_echoing(&echo, "with etcd down for longer than a lease");

    c.restart_etcd();
    // Their old registrations come back with etcd for a moment, until their leases expire.
    let deadline = Instant::now() + WAIT;
    // ("info: registered again": the error that the lease was lost says "until registered again".)
    while !["a", "b"].iter().all(|h| c.agent_log(h).contains("info: registered again")) {
        assert!(Instant::now() < deadline, "the agents did not register again{}", c.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_until("v0 to run", WAIT, |s| s.vms.iter().any(|v| v.name == "v0" && v.state == "running"));
    c.cli_ok(&["vm", "move", "v0", "--to", "b"]);
    assert_eq!(owner(&c, "v0").0, "b");
    let stats = echo.finish();
    println!(
        "v0 through the etcd outage and a move: {} lines, largest gap {} ms",
        stats.sent,
        stats.largest_gap.as_millis()
    );
    assert!(stats.intact(), "{stats:?}");
}

/// A move whose destination VMM is killed leaves the VM running on its source with its owner
/// record unchanged; a move whose source agent is killed completes without it, and the source
/// VMM killed once the guest runs on the destination changes nothing: the destination runs it
/// and the record says so.
#[test]
fn a_move_survives_the_death_of_either_end() {
    if !kvm_or_skip("a_move_survives_the_death_of_either_end") {
        return;
    }
    let mut c = ClusterBed::start(&["a", "b"], ClusterOptions::default());
    let kernel = guest_kernel();
    // A guest dirtying 64 MiB as fast as it can: pre-copy takes a while.
    let cmdline = format!("console=ttyS0 {} vmm.workload=dirty vmm.dirty_mib=64", c.bed.guest_ip_cmdline(0));
    c.cli_ok(&[
        "vm",
        "create",
        "--name",
        "v0",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--mem-mib",
        "256",
        "--host",
        "a",
    ]);
    let echo = stream_to(&c, 0);

    // The destination VMM is killed as soon as it exists.
    let dest_dir = c.state_dir("b").join("vms/v0.2/local.json");
    let killer = {
        let dest_dir = dest_dir.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if let Ok(json) = std::fs::read(&dest_dir)
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
                    && let Some(pid) = v["pid"].as_i64()
                {
                    // SAFETY: plain kill(2) of the destination VMM the test bed's agent started.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    return true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        })
    };
    let err = c.cli_err(&["vm", "move", "v0", "--to", "b"]);
    assert!(killer.join().unwrap(), "the destination VMM never appeared");
    println!("with the destination killed: {}", err.trim());
    assert!(err.contains("moving VM v0 from a to b failed"), "{err}");
    let (host, epoch, _) = owner(&c, "v0");
    assert_eq!((host.as_str(), epoch), ("a", 1), "the owner record must be unchanged{}", c.describe());
    c.wait_until("v0 running on a", WAIT, |s| {
        s.vms.iter().any(|v| v.name == "v0" && v.state == "running" && v.owner == "a")
    });
    still_echoing(&echo, "after the destination died");

    // The source's agent is killed during the move: the move completes without it.
    let mover = {
        let (endpoints, etcd_tls) = (c.endpoints().to_string(), c.etcd_tls().to_path_buf());
        let client_ns = c.bed.client().netns().to_string();
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &client_ns])
                .arg(vmm_tests::vm::vmm_bin())
                .args(["vm", "move", "v0", "--to", "b"])
                .env("VMM_ETCD", endpoints)
                .env("VMM_ETCD_TLS_DIR", etcd_tls)
                .output()
                .expect("run vmm")
        })
    };
    let source = vmm_pid(&c, "a", "v0", 1).expect("the source VMM");
    // Once the source's agent has started the migration (the VM is migrating), kill it.
    // (Or once it is over already: the migration of a small guest is quick.)
    c.wait_until("v0 to migrate", WAIT, |s| {
        s.vms.iter().any(|v| v.name == "v0" && (v.state == "migrating" || v.owner == "b"))
    });
    c.kill_agent("a");
    let out = mover.join().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stderr), c.describe());
    c.wait_until("v0 running on b", WAIT, |s| {
        s.vms.iter().any(|v| v.name == "v0" && v.state == "running" && v.owner == "b")
    });
    // Now kill the source VMM too, if it still lingers: nothing changes.
    if alive(source) {
        // SAFETY: plain kill(2) of the source VMM.
        unsafe { libc::kill(source as libc::pid_t, libc::SIGKILL) };
    }
    c.start_agent("a");
    c.wait_until("host a back", WAIT, |s| s.hosts.iter().any(|h| h.name == "a" && h.up));
    let (host, epoch, state) = owner(&c, "v0");
    assert_eq!((host.as_str(), epoch, state.as_str()), ("b", 2, "running"));
    still_echoing(&echo, "after the source died");
    // The restarted source agent forgets the old VMM.
    let deadline = Instant::now() + WAIT;
    while c.state_dir("a").join("vms/v0.1").exists() {
        assert!(Instant::now() < deadline, "host a kept the moved VM's leftovers{}", c.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = echo.finish();
    println!("v0 through both failed ends: {} lines, largest gap {} ms", stats.sent, stats.largest_gap.as_millis());
    assert!(stats.intact(), "{stats:?}");
}

/// The complete frames of `vmm cluster status --watch` written into a pipe so far: each starts
/// with its time line and ends where the next one starts (the last, maybe unfinished, is left
/// out).
fn watch_frames(out: &str) -> Vec<&str> {
    let mut starts: Vec<usize> = out.match_indices(STAMP_PREFIX).map(|(i, _)| i).collect();
    starts.push(out.len());
    starts.windows(2).take(starts.len().saturating_sub(2)).map(|w| &out[w[0]..w[1]]).collect()
}

/// VM `vm`'s host and epoch in a frame's VMS table.
fn watched_owner(frame: &str, vm: &str) -> Option<(String, String)> {
    let row = frame.lines().find(|l| l.split_whitespace().next() == Some(vm))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    Some((cells.get(1)?.to_string(), cells.get(2)?.to_string()))
}

/// `vmm cluster status --watch`, its output into a pipe (not a terminal), draws the status
/// again and again, each frame after a line with its time; a move shows up in the frames as it
/// happens; SIGINT ends it cleanly.
#[test]
fn status_watch_redraws_until_interrupted() {
    if !kvm_or_skip("status_watch_redraws_until_interrupted") {
        return;
    }
    let c = ClusterBed::start(&["a", "b"], ClusterOptions::default());
    c.create_vm("w0", "console=ttyS0 vmm.workload=idle", 64, &["--no-net", "--host", "a"])
        .unwrap_or_else(|e| panic!("{e}{}", c.describe()));
    let mut cmd = c.bed.client().command(vmm_bin());
    c.etcd_env(cmd.args(["cluster", "status", "--watch", "--every", "0.2"]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let watch = c.bed.client().spawn(&mut cmd).expect("start the watch");
    let output = Arc::new(Mutex::new(String::new()));
    let reader = {
        let (mut stdout, output) = (watch.take_stdout().expect("piped"), output.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let wait_for_frame = |what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            if watch_frames(&output.lock().unwrap()).iter().any(|f| pred(f)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no frame of the watch shows {what}; its output:\n{}{}",
                output.lock().unwrap(),
                c.describe()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let on = |host: &'static str, epoch: &'static str| {
        move |f: &str| watched_owner(f, "w0") == Some((host.to_string(), epoch.to_string()))
    };
    wait_for_frame("w0 on a", &on("a", "1"));
    c.cli_ok(&["vm", "move", "w0", "--to", "b"]);
    wait_for_frame("w0 on b after its move", &on("b", "2"));

    watch.signal(libc::SIGINT).expect("signal the watch");
    let status = watch.wait_timeout(WAIT).expect("wait for the watch").expect("the watch ends at SIGINT");
    reader.join().expect("the reader thread");
    let mut stderr = String::new();
    if let Some(mut e) = watch.take_stderr() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "the watch ended with {status} at SIGINT: {stderr}");
    let out = output.lock().unwrap().clone();
    let frames = watch_frames(&out);
    println!("{} frames; the last complete one:\n{}", frames.len(), frames.last().unwrap_or(&""));
    assert!(!out.contains('\x1b'), "terminal escapes written into a pipe:\n{out}");
    assert!(out.starts_with(STAMP_PREFIX), "{out}");
    for f in &frames {
        let first = f.lines().next().unwrap_or_default();
        assert!(first.ends_with(" GMT ====="), "a frame's time line: {first:?}");
        assert!(
            f.contains("\nHOSTS\n") && f.contains("\nVMS\n") && f.contains("\nMIGRATIONS IN FLIGHT\n"),
            "an incomplete frame:\n{f}"
        );
    }
}
