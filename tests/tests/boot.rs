// SPDX-License-Identifier: Apache-2.0
//! Booting guests with `vmm run`: our own guest with 1, 2 and 4 vCPUs to its ready line with
//! every CPU online, and a clean poweroff, Linux as far as this host's KVM lets it go in CI time, and every kind of bad input
//! refused with one clear line and a non-zero exit, never a panic.

use std::process::Command;
use std::time::Duration;

use vmm_tests::vm::{LINUX_CMDLINE, Vm, guest_kernel, kvm_or_skip, linux_artifacts, vmm_bin};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Starts our guest with `vcpus` vCPUs and `cmdline`, in this process's namespace.
fn start_our_guest(vcpus: u8, cmdline: &str) -> Vm {
    let kernel = guest_kernel();
    let vcpus = vcpus.to_string();
    Vm::start(None, &s(&["run", "--kernel", kernel.to_str().unwrap(), "--vcpus", &vcpus, "--cmdline", cmdline]))
}

fn boot_our_guest(vcpus: u8) {
    let vm = start_our_guest(vcpus, "console=ttyS0 vmm.workload=idle vmm.poweroff_after_ms=100");
    let ready = vm.console.wait_line(Duration::from_secs(20), |l| l.starts_with("GUEST-READY"));
    assert!(ready.is_some(), "no ready line\n{}", vm.describe());
    let ready = ready.unwrap();
    assert!(ready.contains("workload=idle") && ready.contains("kernel=vmm-guest"), "{ready}");
    // The guest started every CPU of the MP table, and each ran its own code before the line.
    assert!(ready.split(' ').any(|f| f == format!("cpus={vcpus}")), "not every CPU came online: {ready}");
    println!("{vcpus} vCPU(s): {ready}");
    let status =
        vm.wait_timeout(Duration::from_secs(20)).unwrap_or_else(|| panic!("did not power off\n{}", vm.describe()));
    assert!(status.success(), "exit {status:?}\n{}", vm.describe());
    assert!(vm.console.text().contains("GUEST-POWEROFF"));
}

#[test]
fn our_guest_boots_and_powers_off_with_one_vcpu() {
    if kvm_or_skip("our_guest_boots_and_powers_off_with_one_vcpu") {
        boot_our_guest(1);
    }
}

/// `vmm` is a static PIE (`.cargo/config.toml`): a running VMM maps no shared library, not even
/// the C library, whose pages were about 1 MiB of its own memory; and nothing of the host's
/// file system is needed after the jail empties its root.
#[test]
fn a_running_vmm_maps_no_shared_library() {
    if !kvm_or_skip("a_running_vmm_maps_no_shared_library") {
        return;
    }
    let vm = start_our_guest(1, "console=ttyS0 vmm.workload=idle");
    let ready = vm.console.wait_line(Duration::from_secs(20), |l| l.starts_with("GUEST-READY"));
    assert!(ready.is_some(), "no ready line\n{}", vm.describe());
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid())).expect("the VMM's /proc/PID/maps");
    let files: Vec<&str> =
        maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.starts_with('/')).collect();
    let libraries: Vec<&&str> = files.iter().filter(|p| p.contains(".so")).collect();
    assert!(libraries.is_empty(), "shared libraries mapped: {libraries:?}\n{maps}");
    // The one file it maps is its own binary (the guest's memory and KVM's are anonymous).
    let own = vmm_bin().canonicalize().expect("the vmm binary");
    assert!(files.iter().all(|p| std::path::Path::new(p) == own), "{files:?}\n{maps}");
    assert!(!files.is_empty(), "the VMM's own binary is not mapped?\n{maps}");
}

/// The application processors start from their MP table entries, as under Linux: INIT and a
/// startup IPI from the boot CPU, real mode, then long mode and CPL 3.
#[test]
fn our_guest_boots_and_powers_off_with_two_vcpus() {
    if kvm_or_skip("our_guest_boots_and_powers_off_with_two_vcpus") {
        boot_our_guest(2);
    }
}

#[test]
fn our_guest_boots_and_powers_off_with_four_vcpus() {
    if kvm_or_skip("our_guest_boots_and_powers_off_with_four_vcpus") {
        boot_our_guest(4);
    }
}

#[test]
fn a_guest_panic_is_an_error_exit() {
    if !kvm_or_skip("a_guest_panic_is_an_error_exit") {
        return;
    }
    // The dirty workload cannot get 100 GiB out of 64 MiB: our guest reports it and panics
    // through pvpanic, which must not look like a clean poweroff.
    let kernel = guest_kernel();
    let vm = Vm::start(
        None,
        &s(&[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "64",
            "--cmdline",
            "vmm.workload=dirty vmm.dirty_mib=102400",
        ]),
    );
    let status = vm.wait_timeout(Duration::from_secs(20)).expect("exits");
    assert!(!status.success(), "a panicking guest must not exit 0\n{}", vm.describe());
    assert!(vm.log.text().contains("the guest panicked"), "{}", vm.describe());
}

/// A fault on an application processor is reported with that CPU's number, from its own fatal
/// stack, and ends the VM as a panic.
#[test]
fn a_fault_on_any_cpu_names_the_cpu() {
    if !kvm_or_skip("a_fault_on_any_cpu_names_the_cpu") {
        return;
    }
    for cpu in [2, 0] {
        let vm = start_our_guest(4, &format!("console=ttyS0 vmm.workload=burn vmm.duty=20 vmm.fault_cpu={cpu}"));
        let status = vm.wait_timeout(Duration::from_secs(20)).expect("exits");
        assert!(!status.success(), "a faulting guest must not exit 0\n{}", vm.describe());
        let panic = vm.console.lines(|l| l.starts_with("GUEST-PANIC"));
        assert!(
            panic
                .first()
                .is_some_and(|l| l.starts_with(&format!("GUEST-PANIC cpu={cpu} exception 6 (invalid opcode)"))),
            "{panic:?}\n{}",
            vm.describe()
        );
        assert!(vm.log.text().contains("the guest panicked"), "{}", vm.describe());
    }
}

/// Linux starts on this machine's own KVM (vmlinux through linux-loader, zero page, e820, MP
/// table, COM1). Where KVM emulates guest kernel code (kvm_pvm), Linux only gets through early
/// boot within CI time; this checks it gets there, with the cmdline and memory map we gave. The
/// whole boot to our init's ready line, and everything after, is in `linux.rs`, which runs in
/// the nested host where this KVM is too slow for Linux.
#[test]
fn linux_starts_booting() {
    if !kvm_or_skip("linux_starts_booting") {
        return;
    }
    let Some((kernel, initrd)) = linux_artifacts() else {
        panic!(
            "resources/build/vmlinux or initramfs.cpio is missing: run resources/build_kernel.sh and resources/build_initramfs.sh (the README's test command does)"
        );
    };
    let vm = start_linux(&kernel, &initrd, 1, "earlyprintk=ttyS0 vmm.workload=idle");
    let banner = vm.console.wait_line(Duration::from_secs(120), |l| l.contains("Linux version 6.12"));
    assert!(banner.is_some(), "no Linux banner\n{}", vm.describe());
    let e820 = vm.console.wait_line(Duration::from_secs(120), |l| l.contains("BIOS-e820") && l.contains("usable"));
    assert!(e820.is_some(), "no memory map\n{}", vm.describe());
    let mp = vm.console.wait_line(Duration::from_secs(180), |l| l.contains("MPTABLE: OEM ID: VMM"));
    assert!(mp.is_some(), "Linux did not find our MP table\n{}", vm.describe());
    assert!(vm.console.text().contains("vmm.workload=idle"), "the command line reached the kernel");
    assert!(vm.try_wait().is_none(), "the VMM is still running the guest\n{}", vm.describe());
}

/// Starts Linux with our initramfs, 256 MiB, `vcpus` vCPUs and `LINUX_CMDLINE` plus `extra`.
fn start_linux(kernel: &std::path::Path, initrd: &std::path::Path, vcpus: u32, extra: &str) -> Vm {
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let vcpus = vcpus.to_string();
    let cmdline = format!("{LINUX_CMDLINE} {extra}");
    let args =
        ["run", "--kernel", kernel, "--initrd", initrd, "--mem-mib", "256", "--vcpus", &vcpus, "--cmdline", &cmdline];
    Vm::start(None, &s(&args))
}

/// Runs `vmm` with `args` and expects a failure with exactly one line on stderr containing
/// `expected`.
fn refuses(args: &[&str], expected: &str) {
    refuses_cmd(Command::new(vmm_bin()).args(args), expected);
}

fn refuses_cmd(cmd: &mut Command, expected: &str) {
    let out = cmd.output().expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} should fail\n{stderr}");
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked\n{stderr}");
    assert!(stderr.contains(expected), "{cmd:?}: expected '{expected}' in\n{stderr}");
    // Our own errors are one line; clap's add its usage line and a hint after the first.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let short = lines.len() == 1 || (lines[0].starts_with("error:") && lines.len() <= 5);
    assert!(short, "{cmd:?}: expected a short message, got\n{stderr}");
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let kernel = guest_kernel();
    let k = kernel.to_str().unwrap();
    refuses(&["run", "--kernel", "/nonexistent/vmlinux"], "cannot open kernel /nonexistent/vmlinux");
    refuses(&["run", "--kernel", "/"], "is a directory");
    refuses(&["run", "--kernel", "/etc/hostname"], "is not a kernel");
    refuses(&["run", "--kernel", "/bin/true"], "is not a kernel");
    refuses(&["run", "--kernel", k, "--initrd", "/nonexistent/initrd"], "cannot open initrd");
    refuses(&["run", "--kernel", k, "--mem-mib", "1"], "too small");
    refuses(&["run", "--kernel", k, "--mem-mib", "100000000"], "more than this host");
    refuses(&["run", "--kernel", k, "--vcpus", "0"], "vcpus must be between 1 and 32");
    refuses(&["run", "--kernel", k, "--vcpus", "99"], "vcpus must be between 1 and 32");
    refuses(&["run", "--kernel", k, "--mem-mib", "lots"], "invalid value 'lots'");
    refuses(&["run", "--kernel", k, "--net", "mtu=9000"], "expected tap=NAME");
    refuses(&["run", "--kernel", k, "--net", "tap=t0,mac=zz:00:00:00:00:01"], "invalid MAC address");
    refuses(&["run", "--kernel", k, "--cmdline", &"x".repeat(5000)], "command line");
    refuses(&["run", "--kernel", k, "--bogus"], "unexpected argument '--bogus'");
    refuses(&["run"], "--kernel");
    refuses(&["fly"], "unrecognized subcommand");
}

#[test]
fn no_kvm_and_no_permission_are_explained() {
    let kernel = guest_kernel();
    let k = kernel.to_str().unwrap();
    // /dev/kvm hidden: a private mount namespace with an empty /dev.
    let script = format!("mount -t tmpfs none /dev && exec {} run --kernel {k}", vmm_bin().display());
    refuses_cmd(Command::new("unshare").args(["--mount", "sh", "-c", &script]), "/dev/kvm does not exist");
    if std::path::Path::new("/dev/kvm").exists() {
        // An unprivileged user (root can always open it).
        let bin = vmm_bin();
        refuses_cmd(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin)
                .args(["run", "--kernel", k]),
            "no permission to open /dev/kvm",
        );
    } else {
        eprintln!("\n*** SKIPPED the permission half of no_kvm_and_no_permission_are_explained: no /dev/kvm ***\n");
    }
}
