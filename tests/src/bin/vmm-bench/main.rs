// SPDX-License-Identifier: Apache-2.0
//! vmm-bench: our VMM and QEMU (`-M microvm -enable-kvm`) side by side on this machine, same
//! guest kernel, memory and workload, runs alternating so drift hits both: boot, network,
//! migration, TCP continuity; and the same with Linux (`linux`), which runs inside the nested
//! host (`resources/l1.sh`) where this machine's KVM emulates guest kernel code; and our
//! migration transport alone, TLS against plaintext (`transport`); post-copy against QEMU's
//! pre-copy and `postcopy-ram` (`postcopy`); restore from a snapshot at two sizes (`restore`,
//! ours only, Firecracker's published figures quoted). Prints a markdown table
//! (ratio ours/QEMU in every row) and the targets met or not, and writes `results.md`,
//! `results.json` (every sample) and `migration.png` into the output directory.
//!
//! Usage: vmm-bench [--runs N] [--boot-runs N] [--out DIR] [--quick] [--only SECTIONS]
//! [--mem-sizes MIB,..] [--dirty-rates MIBS,..] [--smp-vcpus N] [--density-vms N]
//! [--drain-vms N] [--drain-mib N] [--cluster-cases density,drain,jobs,steady,skew] [--job-units N]
//! [--steady-s S] [--monitors ours,qemu] (as root, except for the transport
//! section alone; SECTIONS: a comma-separated subset of
//! boot,linux,network,migration,transport,disk,postcopy,restore,cluster; a dirty rate of 0 is the idle guest;
//! the SMP case migrates a 256 MiB guest whose N vCPUs all dirty memory, 0 leaves it out;
//! `--monitors ours` migrates only ours (migration and post-copy sections), e.g. to compare TLS
//! with plaintext in less time;
//! `--steady-s` is how long the balancer watches the balanced cluster of the `steady` case). A
//! migration case that fails is reported and the others still run; the bench then exits non-zero.
//! The cluster's parallel-jobs case plots its run with the balancer into `cluster-jobs.png`.

mod boot;
mod cluster;
mod disk;
mod jobs;
mod migrate;
mod monitor;
mod net;
mod passes;
mod plot;
mod postcopy;
mod qmp;
mod restore;
mod results;
mod steady;
mod targets;
mod transport;

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use migrate::{Case, Sample};
use monitor::{GuestImage, Monitor, QEMU};
use results::Results;
use serde_json::json;
use vmm_tests::place::{L1Options, Place};

const USAGE: &str = "usage: vmm-bench [--runs N] [--boot-runs N] [--out DIR] [--quick] \
                     [--only boot,linux,network,migration,transport,disk,postcopy,restore,cluster] [--mem-sizes 256,1024] \
                     [--dirty-rates 0,64,512] [--smp-vcpus 4] [--density-vms 50] [--drain-vms 6] [--drain-mib 256] \
                     [--cluster-cases density,drain,jobs,steady,skew] [--job-units 6000] [--steady-s 300] \
                     [--monitors ours,qemu]";

/// The cases of the cluster section, in the order they run.
const CLUSTER_CASES: [&str; 5] = ["density", "drain", "jobs", "steady", "skew"];

/// Every section, in the order they run.
const SECTIONS: [&str; 9] =
    ["boot", "linux", "network", "migration", "transport", "disk", "postcopy", "restore", "cluster"];

struct Options {
    runs: usize,
    boot_runs: usize,
    out: PathBuf,
    quick: bool,
    sections: Vec<String>,
    mem_sizes: Vec<u64>,
    dirty_rates: Vec<u64>,
    smp_vcpus: u8,
    density_vms: usize,
    drain_vms: u8,
    drain_mib: u64,
    cluster_cases: Vec<String>,
    job_units: u64,
    /// How long the balancer watches the balanced cluster (the `steady` case), seconds.
    steady_s: u64,
    /// The monitors whose migrations run.
    monitors: Vec<Monitor>,
}

fn numbers(name: &str, v: &str) -> Result<Vec<u64>, String> {
    v.split(',').map(|x| x.trim().parse().map_err(|_| format!("{name}: {x:?} is not a number\n{USAGE}"))).collect()
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 5,
        boot_runs: 20,
        out: vmm_tests::vm::build_dir().join("bench"),
        quick: false,
        sections: SECTIONS.map(String::from).to_vec(),
        mem_sizes: vec![256, 1024],
        dirty_rates: vec![0, 64, 512],
        smp_vcpus: 4,
        density_vms: 50,
        drain_vms: 6,
        drain_mib: 256,
        cluster_cases: CLUSTER_CASES.map(String::from).to_vec(),
        job_units: 6000,
        steady_s: 300,
        monitors: Monitor::BOTH.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--runs" => o.runs = value("--runs")?.parse().map_err(|_| "--runs: not a number")?,
            "--boot-runs" => o.boot_runs = value("--boot-runs")?.parse().map_err(|_| "--boot-runs: not a number")?,
            "--out" => o.out = PathBuf::from(value("--out")?),
            "--quick" => o.quick = true,
            "--cluster-cases" => {
                o.cluster_cases = value("--cluster-cases")?.split(',').map(|c| c.trim().to_string()).collect();
                if let Some(bad) = o.cluster_cases.iter().find(|c| !CLUSTER_CASES.contains(&c.as_str())) {
                    return Err(format!("--cluster-cases: unknown case {bad:?}\n{USAGE}"));
                }
            }
            "--job-units" => o.job_units = value("--job-units")?.parse().map_err(|_| "--job-units: not a number")?,
            "--steady-s" => {
                o.steady_s = value("--steady-s")?
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or(format!("--steady-s: a number of seconds, at least 1\n{USAGE}"))?
            }
            "--density-vms" => {
                o.density_vms = value("--density-vms")?.parse().map_err(|_| "--density-vms: not a number")?
            }
            "--drain-vms" => {
                o.drain_vms = value("--drain-vms")?.parse().map_err(|_| "--drain-vms: not a number (1 to 90)")?
            }
            "--drain-mib" => o.drain_mib = value("--drain-mib")?.parse().map_err(|_| "--drain-mib: not a number")?,
            "--monitors" => {
                o.monitors = Vec::new();
                for name in value("--monitors")?.split(',') {
                    let m = Monitor::BOTH
                        .into_iter()
                        .find(|m| m.name().eq_ignore_ascii_case(name) || (name == "ours" && *m == Monitor::Ours))
                        .ok_or(format!("--monitors: unknown monitor {name:?}\n{USAGE}"))?;
                    o.monitors.push(m);
                }
            }
            "--mem-sizes" => o.mem_sizes = numbers("--mem-sizes", &value("--mem-sizes")?)?,
            "--dirty-rates" => o.dirty_rates = numbers("--dirty-rates", &value("--dirty-rates")?)?,
            "--smp-vcpus" => {
                o.smp_vcpus = value("--smp-vcpus")?
                    .parse()
                    .ok()
                    .filter(|n| *n <= 32)
                    .ok_or(format!("--smp-vcpus: a number from 0 to 32\n{USAGE}"))?
            }
            "--only" => {
                o.sections = value("--only")?.split(',').map(str::to_string).collect();
                for s in &o.sections {
                    if !SECTIONS.contains(&s.as_str()) {
                        return Err(format!("--only: unknown section {s:?}\n{USAGE}"));
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    if o.quick {
        o.runs = o.runs.min(1);
        o.boot_runs = o.boot_runs.min(3);
        o.mem_sizes.retain(|&m| m <= 256);
        o.density_vms = o.density_vms.min(10);
        o.drain_vms = o.drain_vms.min(3);
        o.drain_mib = o.drain_mib.min(128);
        o.steady_s = o.steady_s.min(30);
    }
    if o.drain_vms == 0 || o.drain_vms > 90 || o.drain_mib < 64 {
        return Err("--drain-vms must be 1 to 90 and --drain-mib at least 64".into());
    }
    if o.mem_sizes.iter().any(|&m| m < 64) {
        return Err("--mem-sizes: at least 64 MiB (the dirty workload alone uses 64)".into());
    }
    if o.runs == 0 || o.boot_runs == 0 {
        return Err("--runs and --boot-runs must be at least 1".into());
    }
    Ok(o)
}

fn main() {
    // The raw-transfer reference's receiving process (see `migrate::raw_receive`).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--raw-receive") {
        let r = migrate::raw_receive(args.get(2).map_or("", String::as_str), args.get(3).map_or("", String::as_str));
        if let Err(e) = r {
            eprintln!("vmm-bench --raw-receive: {e}");
            std::process::exit(1);
        }
        return;
    }
    let result = parse_args().and_then(|o| run(&o));
    if let Err(e) = result {
        eprintln!("vmm-bench: error: {e}");
        std::process::exit(1);
    }
}

/// How long our guest may take to its ready line, and Linux (which may be emulated).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const LINUX_READY_TIMEOUT: Duration = Duration::from_secs(240);

fn run(o: &Options) -> Result<(), String> {
    // The transport section alone needs neither root, KVM nor QEMU.
    if o.sections.iter().any(|s| s != "transport") {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("run as root: the bench creates network namespaces and TAP devices".into());
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("/dev/kvm does not exist: both monitors need KVM".into());
        }
    }
    // Linux needs a KVM that runs its kernel code: where this one does not, the Linux section
    // runs in the nested host, after the others, with its own results in <out>/linux.
    let linux_nested =
        o.sections.iter().any(|s| s == "linux") && matches!(vmm_tests::place::place(), Place::NestedHost(_));
    if linux_nested && o.sections.len() == 1 {
        return linux_in_nested_host(o, &o.out);
    }
    let section = |s: &str| o.sections.iter().any(|x| x == s) && !(s == "linux" && linux_nested);
    if ["boot", "linux", "network", "migration", "disk", "postcopy"].iter().any(|s| section(s)) {
        ensure_qemu()?;
    }
    let ours = GuestImage {
        kernel: vmm_tests::vm::guest_kernel(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        section: "",
    };
    let machine = machine();
    eprintln!("vmm-bench: {}", machine["summary"].as_str().unwrap_or(""));
    let mut results = Results::default();
    let mut samples: Vec<Sample> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let cases = cases(&o.mem_sizes, &o.dirty_rates, o.smp_vcpus);

    if section("boot") {
        eprintln!("vmm-bench: boot, {} runs each", o.boot_runs);
        boot::our_guest(&mut results, o.boot_runs, &ours.kernel)?;
    }
    if section("network") {
        eprintln!("vmm-bench: network, {} runs each", o.runs);
        net::bench(&mut results, o.runs, &ours, READY_TIMEOUT)?;
    }
    if section("migration") {
        let mut bench = migrate::Bench::new(&ours, READY_TIMEOUT, &o.monitors)?;
        bench.bandwidth(&mut results)?;
        for case in &cases {
            eprintln!("vmm-bench: migration, {}, {} runs each", case.label(), o.runs);
            if let Err(e) = bench.case(&mut results, case, o.runs) {
                eprintln!("vmm-bench: migration, {}: {e} (the other cases go on)", case.label());
                failed.push(format!("migration, {}: {e}", case.label()));
            }
        }
        bench.bandwidth(&mut results)?;
        samples = std::mem::take(&mut bench.samples);
    }
    if section("linux") {
        let (kernel, initrd) = vmm_tests::vm::linux_artifacts()
            .ok_or("no Linux kernel built: run resources/setup.sh (resources/build/vmlinux, initramfs.cpio)")?;
        let linux = GuestImage {
            kernel,
            initrd: Some(initrd),
            cmdline: vmm_tests::vm::LINUX_NATIVE_CMDLINE.into(),
            section: "Linux ",
        };
        let runs = o.runs.min(3);
        eprintln!("vmm-bench: Linux boot to the ready line, {runs} runs each");
        boot::linux(&mut results, runs, &linux, LINUX_READY_TIMEOUT)?;
        eprintln!("vmm-bench: Linux network, {} runs each", o.runs);
        net::bench(&mut results, o.runs, &linux, LINUX_READY_TIMEOUT)?;
        let mut bench = migrate::Bench::new(&linux, LINUX_READY_TIMEOUT, &o.monitors)?;
        for case in &cases {
            eprintln!("vmm-bench: Linux migration, {}, {} runs each", case.label(), o.runs);
            bench.case(&mut results, case, o.runs)?;
        }
        samples.append(&mut bench.samples);
    }
    if section("transport") {
        eprintln!("vmm-bench: transport, {} runs each", o.runs);
        transport::bench(&mut results, o.runs)?;
    }

    if section("disk") {
        eprintln!("vmm-bench: disk throughput and IOPS, {} runs each", o.runs);
        disk::throughput(&mut results, o.runs, &ours.kernel)?;
        eprintln!("vmm-bench: disk migration, {} runs each", o.runs);
        disk::migration(&mut results, o.runs, &ours.kernel)?;
    }

    if section("postcopy") {
        eprintln!("vmm-bench: post-copy, {} runs each", o.runs);
        failed.extend(postcopy::bench(&mut results, o.runs, &ours.kernel, &o.monitors)?);
    }
    if section("restore") {
        eprintln!("vmm-bench: restore, {} runs each", o.runs);
        restore::bench(&mut results, o.runs, &ours.kernel)?;
    }

    let settings = cluster::Settings {
        density_vms: o.density_vms,
        drain_vms: o.drain_vms,
        drain_mib: o.drain_mib,
        runs: o.runs,
        idle_window: std::time::Duration::from_secs(if o.quick { 5 } else { 10 }),
    };
    let case = |c: &str| section("cluster") && o.cluster_cases.iter().any(|x| x == c);
    if case("density") {
        eprintln!("vmm-bench: cluster: density, up to {} VMs", o.density_vms);
        cluster::density(&mut results, &settings)?;
    }
    if case("drain") {
        for dirty in [false, true] {
            cluster::drain(&mut results, &settings, dirty)?;
        }
    }
    if case("jobs") {
        let j = jobs::Jobs {
            jobs: 12,
            units: if o.quick { o.job_units.min(600) } else { o.job_units },
            cpu_millis: 300,
            runs: o.runs,
        };
        std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
        jobs::bench(&mut results, &j, &o.out)?;
    }
    let steadiness = steady::Steadiness { steady: Duration::from_secs(o.steady_s), runs: o.runs };
    if case("steady") {
        steady::steady(&mut results, &steadiness)?;
    }
    if case("skew") {
        steady::skew(&mut results, o.runs)?;
    }

    let table = results.markdown();
    let mut targets = targets::check(&results, &cases);
    let mut line = |ok: bool, text: String| targets.push(format!("- {} {text}", if ok { "met:" } else { "NOT met:" }));
    if section("postcopy") {
        postcopy::targets(&results, &mut line);
    }
    if section("restore") {
        restore::targets(&results, &mut line);
    }
    if section("cluster") {
        cluster::targets(&results, &settings, &mut line);
        jobs::targets(&results, &mut line);
        steady::targets(&results, &steadiness, &mut line);
    }
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let emulated = if vmm_tests::place::inside_nested_host() {
        "All of it ran inside the nested host (resources/l1.sh: Linux 6.1 under QEMU's emulator, TCG, \
         with its own KVM): absolute times are emulated, many times slower than on hardware; compare \
         the ratios, both monitors ran there side by side.\n\n"
    } else {
        ""
    };
    let notes = if results.notes.is_empty() {
        String::new()
    } else {
        format!("\nNotes:\n{}\n", results.notes.iter().map(|n| format!("- {n}\n")).collect::<String>())
    };
    let mut md = format!(
        "Measured {} on {}.\n\n{emulated}{table}{notes}\nTargets:\n{}\n",
        machine["date"].as_str().unwrap_or("?"),
        machine["summary"].as_str().unwrap_or("?"),
        targets.join("\n")
    );
    if let Some(plotted) = plot_one(&o.out, &samples)? {
        md.push_str(&format!("\n![{plotted}](migration.png)\n"));
    }
    if case("jobs") {
        md.push_str(&format!("\n![{}: each host's load, every migration marked]({})\n", jobs::SECTION, jobs::PLOT));
    }
    write(&o.out.join("results.md"), &md)?;
    let all = json!({ "machine": machine, "rows": results.rows, "notes": results.notes, "migrations": samples,
                      "targets": targets });
    write(&o.out.join("results.json"), &serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?)?;
    println!("{md}");
    eprintln!("vmm-bench: wrote {}/results.md, results.json and migration.png", o.out.display());
    if linux_nested {
        linux_in_nested_host(o, &o.out.join("linux"))?;
    }
    if !failed.is_empty() {
        return Err(format!("{} case(s) failed: {}", failed.len(), failed.join("; ")));
    }
    Ok(())
}

/// Runs this benchmark's Linux section inside the nested host (`resources/l1.sh`), with its
/// output directory `out` shared writable.
fn linux_in_nested_host(o: &Options, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let out = out.canonicalize().map_err(|e| format!("{}: {e}", out.display()))?;
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut args: Vec<String> = vec![
        "--only".into(),
        "linux".into(),
        "--runs".into(),
        o.runs.to_string(),
        "--mem-sizes".into(),
        list(&o.mem_sizes),
        "--dirty-rates".into(),
        list(&o.dirty_rates),
        "--out".into(),
        out.display().to_string(),
    ];
    if o.quick {
        args.push("--quick".into());
    }
    eprintln!(
        "vmm-bench: the Linux section runs inside the nested host (resources/l1.sh); results in {}",
        out.display()
    );
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Two guests of the largest size at once (source and destination), and room for the rest.
    let largest = o.mem_sizes.iter().copied().max().unwrap_or(256);
    let opts = L1Options {
        mem_mib: u32::try_from(4096 + 2 * largest).map_err(|_| "--mem-sizes: too large")?,
        rw: vec![out],
        // Every case with 5 runs takes hours when everything is emulated.
        timeout: Duration::from_secs(6 * 3600),
        ..L1Options::default()
    };
    let status =
        vmm_tests::place::l1_command(&opts, &exe, &args).status().map_err(|e| format!("resources/l1.sh: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("the Linux section in the nested host failed ({status})")) }
}

/// The guests migrated: each size, idle (rate 0) or dirtying 64 MiB at each rate (by default a
/// moderate and a high one), with one vCPU; then, unless `smp_vcpus` is 0, a 256 MiB guest whose
/// `smp_vcpus` vCPUs all dirty their share of 64 MiB at 256 MiB/s in all.
fn cases(sizes: &[u64], rates: &[u64], smp_vcpus: u8) -> Vec<Case> {
    let mut v = Vec::new();
    for &mem_mib in sizes {
        for &rate in rates {
            v.push(Case { mem_mib, vcpus: 1, dirty: (rate > 0).then_some((64, rate)) });
        }
    }
    if smp_vcpus > 0 {
        v.push(Case { mem_mib: 256, vcpus: smp_vcpus, dirty: Some((64, 256)) });
    }
    v
}

/// Plots the first migration of each monitor for the busiest case; returns its title.
fn plot_one(out: &Path, samples: &[Sample]) -> Result<Option<String>, String> {
    let Some(case) = samples.iter().max_by_key(|s| s.result.rounds).map(|s| s.case.clone()) else {
        return Ok(None);
    };
    let pick: Vec<&Sample> =
        Monitor::BOTH.iter().filter_map(|&m| samples.iter().find(|s| s.case == case && s.monitor == m)).collect();
    let title = format!("One migration each: {case}");
    plot::migrations(&out.join("migration.png"), &title, &pick)?;
    Ok(Some(title))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Installs Debian's QEMU if it is not there.
fn ensure_qemu() -> Result<(), String> {
    if Command::new(QEMU).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("vmm-bench: installing qemu-system-x86 (apt-get)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if ok { Ok(()) } else { Err("could not install qemu-system-x86".into()) }
}

/// What machine this ran on.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0.0, |kib| kib as f64 / (1 << 20) as f64);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    // Built-in or loaded, a KVM flavour shows up in /sys/module.
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let kvm = if vmm_tests::place::inside_nested_host() {
        "KVM: kvm_amd in the nested host (Linux 6.1 under QEMU TCG; emulated)"
    } else if module("kvm_pvm") {
        "KVM: kvm_pvm (nested, paravirtual)"
    } else if module("kvm_intel") {
        "KVM: kvm_intel"
    } else if module("kvm_amd") {
        "KVM: kvm_amd"
    } else {
        "KVM"
    };
    let qemu = Command::new(QEMU)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let summary = format!("{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {kernel}, {kvm}, {qemu}");
    json!({ "cpu": cpu, "cores": cores, "mem_gib": mem_gib, "kernel": kernel, "kvm": kvm, "qemu": qemu,
            "date": date, "summary": summary })
}
