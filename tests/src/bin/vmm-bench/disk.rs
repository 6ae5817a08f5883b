// SPDX-License-Identifier: Apache-2.0
//! Disks: our guest's `diskbench` workload on the same raw image under both monitors (sequential
//! 1 MiB writes and reads, 4 KiB random reads and writes at queue depth 1 and 32, as the guest
//! measures them), and the migration of a guest whose 1 GiB disk has 200 MiB allocated while it
//! writes 10 MiB/s to it: ours copies the disk (allocated extents, then dirty blocks), QEMU uses
//! its block migration (the `block` capability) into an image of the same size.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use vmm_tests::TestBed;

use crate::monitor::{GuestSpec, Monitor, Running, Wire};
use crate::results::{Better, Results};

/// The throughput rows, by the guest's phase name.
pub const PHASES: [(&str, &str, &str); 6] = [
    ("seq_write", "sequential 1 MiB writes (queue depth 1)", "MB/s"),
    ("seq_read", "sequential 1 MiB reads (queue depth 1)", "MB/s"),
    ("rand_read_qd1", "4 KiB random reads, queue depth 1", "IOPS"),
    ("rand_write_qd1", "4 KiB random writes, queue depth 1", "IOPS"),
    ("rand_read_qd32", "4 KiB random reads, queue depth 32", "IOPS"),
    ("rand_write_qd32", "4 KiB random writes, queue depth 32", "IOPS"),
];
/// The disk migration's section and its rows.
pub const MIGRATION: &str = "disk migration: 1 GiB disk, 200 MiB allocated, guest writing 10 MiB/s";
pub const SENT_RATIO: &str = "disk data sent ÷ (allocated + written during the move)";
/// Disk space the throughput phases cover.
const BENCH_MIB: u64 = 256;
const MIGRATION_DISK: u64 = 1 << 30;
const ALLOCATED: u64 = 200 << 20;
/// The guest rewrites its first 32 MiB at this rate during the move.
const WRITE_MIB_S: u64 = 10;
static PORT: AtomicU16 = AtomicU16::new(7600);

/// A disk image in the temporary directory, removed when dropped.
struct Image(PathBuf);

impl Image {
    fn path(tag: &str) -> Image {
        let p = std::env::temp_dir().join(format!("vmm-bench-disk-{}-{tag}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Image(p)
    }

    /// A sparse image of `size` bytes.
    fn sparse(tag: &str, size: u64) -> Result<Image, String> {
        let img = Image::path(tag);
        let f = std::fs::File::create(&img.0).map_err(|e| format!("{}: {e}", img.0.display()))?;
        f.set_len(size).map_err(|e| format!("{}: {e}", img.0.display()))?;
        Ok(img)
    }

    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.0).map_or(0, |m| m.blocks() * 512)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Throughput and IOPS, `runs` times per monitor, alternating; each run on a fresh image.
pub fn throughput(results: &mut Results, runs: usize, kernel: &Path) -> Result<(), String> {
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let image = Image::sparse(&format!("bench-{run}-{}", m.name()), 2 * (BENCH_MIB << 20))?;
            let spec = GuestSpec {
                kernel,
                initrd: None,
                cmdline: format!("console=ttyS0 vmm.workload=diskbench vmm.disk_mib={BENCH_MIB}"),
                mem_mib: 256,
                vcpus: 1,
                net: None,
                disk: Some(&image.0),
            };
            let r = Running::start(m, None, &spec, None);
            r.wait_ready(Duration::from_secs(30))?;
            r.wait_console(Duration::from_secs(300), |l| l.starts_with("DISKBENCH-DONE"))?;
            for line in r.vm.console.lines(|l| l.starts_with("DISKBENCH phase=")) {
                let field = |name: &str| -> Option<u64> {
                    line.split_whitespace().find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                };
                let phase = line.split_whitespace().find_map(|f| f.strip_prefix("phase=")).unwrap_or("");
                let (Some(ops), Some(bytes), Some(ns), Some(errors)) =
                    (field("ops"), field("bytes"), field("ns"), field("errors"))
                else {
                    return Err(format!("{}: a malformed line: {line}", m.name()));
                };
                if errors > 0 {
                    return Err(format!("{}: {errors} requests failed: {line}\n{}", m.name(), r.vm.describe()));
                }
                let Some(&(_, row, unit)) = PHASES.iter().find(|p| p.0 == phase) else { continue };
                let secs = ns.max(1) as f64 / 1e9;
                let value = if unit == "IOPS" { ops as f64 / secs } else { bytes as f64 / secs / 1e6 };
                results.add("disk", row, unit, Better::Higher, m, value);
            }
            drop(r);
        }
    }
    Ok(())
}

/// The disk migration, `runs` times per monitor over mutual TLS.
pub fn migration(results: &mut Results, runs: usize, kernel: &Path) -> Result<(), String> {
    let bed = TestBed::builder().host("a").host("b").host_ips().build().map_err(|e| e.to_string())?;
    let (a, b) = (bed.host("a"), bed.host("b"));
    let (a_ip, b_ip) = (a.ip().ok_or("host A has no address")?, b.ip().ok_or("host B has no address")?);
    let (wire_a, wire_b) =
        (Wire::Tls(vmm_tests::pki::pki().host_dir(a_ip)), Wire::Tls(vmm_tests::pki::pki().host_dir(b_ip)));
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let on_a = Image::sparse(&format!("mig-a-{run}-{}", m.name()), MIGRATION_DISK)?;
            // 200 MiB of data well past the region the guest rewrites (its first 32 MiB).
            let f = std::fs::OpenOptions::new().write(true).open(&on_a.0).map_err(|e| e.to_string())?;
            let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + 1) as u8).collect();
            for i in 0..ALLOCATED >> 20 {
                f.write_all_at(&chunk, (512 << 20) + (i << 20)).map_err(|e| e.to_string())?;
            }
            drop(f);
            let on_b = match m {
                Monitor::Ours => Image::path(&format!("mig-b-{run}-ours")),
                Monitor::Qemu => Image::sparse(&format!("mig-b-{run}-qemu"), MIGRATION_DISK)?,
            };
            let spec_a = GuestSpec {
                kernel,
                initrd: None,
                cmdline: format!("console=ttyS0 vmm.workload=disk vmm.disk_mib=32 vmm.disk_rate={WRITE_MIB_S}"),
                mem_mib: 128,
                vcpus: 1,
                net: None,
                disk: Some(&on_a.0),
            };
            let src = Running::start_wire(m, Some(a), &spec_a, None, Some(&wire_a));
            src.wait_ready(Duration::from_secs(30))?;
            let port = PORT.fetch_add(1, Ordering::Relaxed);
            let spec_b = GuestSpec { disk: Some(&on_b.0), ..spec_a };
            let dst = Running::start_wire(m, Some(b), &spec_b, Some(&format!("0.0.0.0:{port}")), Some(&wire_b));
            dst.wait_incoming(Duration::from_secs(10))?;
            // The workload at its steady rate.
            std::thread::sleep(Duration::from_millis(1500));
            let allocated = on_a.allocated();
            let result = src.migrate(&format!("{b_ip}:{port}"), &dst)?;
            if !src.wait_exit(Duration::from_secs(10)) {
                return Err(format!("{}: the source did not exit after the migration", m.name()));
            }
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let written = WRITE_MIB_S as f64 * result.total_ms / 1e3;
            results.add(MIGRATION, "total time", "ms", Better::Lower, m, result.total_ms);
            results.add(MIGRATION, crate::migrate::DOWNTIME, "ms", Better::Lower, m, result.downtime_ms);
            results.add(MIGRATION, "sent (memory and disk)", "MiB", Better::Lower, m, mib(result.bytes_sent));
            results.add(
                MIGRATION,
                "allocated on the source's disk at the start",
                "MiB",
                Better::Lower,
                m,
                mib(allocated),
            );
            if let Some(disk) = result.disk_bytes_sent {
                results.add(MIGRATION, "disk data sent", "MiB", Better::Lower, m, mib(disk));
                results.add(MIGRATION, SENT_RATIO, "×", Better::Lower, m, mib(disk) / (mib(allocated) + written));
            }
            if std::env::var_os("VMM_BENCH_DEBUG").is_some() {
                eprintln!(
                    "--- {} source ---\n{}--- destination ---\n{}",
                    m.name(),
                    src.vm.log.text(),
                    dst.vm.log.text()
                );
            }
            drop(dst);
        }
    }
    Ok(())
}
