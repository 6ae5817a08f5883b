// SPDX-License-Identifier: Apache-2.0
//! The `vmm` binary's API commands.

use super::*;

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
fn cli_snapshot() {
    let h = Harness::new();
    let sock = h.sock();
    let sock = sock.to_str().unwrap();
    let (code, out, err) = vmm_cli(&["snapshot", "--api-sock", sock, "--to", "/var/snap"]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.starts_with("snapshot /var/snap: completed\n"), "{out}");
    for needle in ["total time", "42 ms", "guest paused", "until resumed", "memory written", "3.0 MiB"] {
        assert!(out.contains(needle), "{needle} missing from\n{out}");
    }
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Paused);

    // A relative directory is sent as an absolute path; --json prints the API's answer.
    let (code, out, _) = vmm_cli(&["snapshot", "--api-sock", sock, "--to", "rel", "--resume", "--json"]);
    assert_eq!(code, 0, "{out}");
    let info: SnapshotInfo = serde_json::from_str(&out).unwrap();
    let dir = info.dir.unwrap();
    assert!(dir.starts_with('/') && dir.ends_with("/rel"), "{dir}");
    assert_eq!(info.downtime_ms, Some(40));

    let (code, _, err) = vmm_cli(&["snapshot", "--api-sock", sock, "--to", "/nonexistent/x"]);
    assert_ne!(code, 0);
    assert_eq!(
        err.trim_end(),
        "vmm: error: snapshot /nonexistent/x failed: cannot create directory: No such file or directory"
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
    // Handed later connections go with a connection handed over (--incoming-fd) only.
    let (code, _, err) = vmm_cli(&["run", "--incoming", "127.0.0.1:1", "--incoming-conns-fd", "5"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with '--incoming-conns-fd"), "{err}");
    let (code, _, err) = vmm_cli(&["run", "--kernel", "/k", "--incoming-conns-fd", "5"]);
    assert_eq!(code, 2);
    assert!(err.contains("--incoming-fd"), "{err}");
    let (code, _, err) = vmm_cli(&["migrate", "--api-sock", "/x", "--to", "nohost"]);
    assert_eq!(code, 2);
    assert!(err.contains("HOST:PORT"), "{err}");
    let (code, _, _) = vmm_cli(&["migrate", "--api-sock", "/x", "--to", "h:1", "--downtime-ms", "0"]);
    assert_eq!(code, 2);
}

#[test]
fn cli_restore() {
    // A VMM running a VM refuses, and the command says why in one line.
    let h = Harness::new();
    let sock = h.sock();
    let (code, out, err) = vmm_cli(&["restore", "--api-sock", sock.to_str().unwrap(), "--from", "snap"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(err.trim_end(), "vmm: error: this VMM runs a VM already");

    // Waiting needs the API socket it waits on; a jail directory needs a jail and an absolute
    // path. (Nothing here may parse: it would start a VMM that waits.)
    let (code, _, err) = vmm_cli(&["run", "--await-restore"]);
    assert_eq!(code, 2);
    assert!(err.contains("--api-sock"), "{err}");
    let (code, _, err) = vmm_cli(&["run", "--await-restore", "--api-sock", "/x", "--jail-dir", "/srv"]);
    assert_eq!(code, 2);
    assert!(err.contains("--jail"), "{err}");
    let relative = ["run", "--await-restore", "--api-sock", "/x", "--jail", "1000:1000", "--jail-dir", "srv"];
    let (code, _, err) = vmm_cli(&relative);
    assert_eq!(code, 2);
    assert!(err.contains("absolute"), "{err}");
    let (code, _, err) = vmm_cli(&["run", "--await-restore", "--api-sock", "/x", "--kernel", "/k"]);
    assert_eq!(code, 2);
    assert!(err.contains("--kernel"), "{err}");
}
