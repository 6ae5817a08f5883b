// SPDX-License-Identifier: Apache-2.0
//! `GET /metrics`: the VMM's counters in the Prometheus text exposition format.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::api::{DiskInfo, MigrationInfo, MigrationPhase};
use crate::builder::Machine;

/// Reads one counter of a NIC.
type NetCounter = fn(&net::metrics::NetMetrics) -> u64;
/// Reads one number of a disk.
type DiskValue = fn(&DiskInfo) -> u64;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Help of the gauge that tells a waiting VMM from one that runs a guest.
const WAITING_HELP: &str =
    "1 while the VMM waits for a snapshot to run (vmm run --await-restore), 0 once a guest runs.";

/// What a VMM that waits for a snapshot (`vmm run --await-restore`) has to show: that it waits,
/// and for how long. No guest, no device, no migration yet.
pub fn render_waiting(waited: Duration) -> String {
    let mut out = String::new();
    family(&mut out, "vmm_waiting_for_snapshot", "gauge", WAITING_HELP);
    let _ = writeln!(out, "vmm_waiting_for_snapshot 1");
    family(&mut out, "vmm_waiting_seconds", "gauge", "Time since the VMM began to wait for a snapshot.");
    let _ = writeln!(out, "vmm_waiting_seconds {:.3}", waited.as_secs_f64());
    out
}

/// Renders every counter of `m` and the last migration.
pub fn render(m: &Machine, migration: &MigrationInfo, uptime: Duration) -> String {
    let mut out = String::new();
    family(&mut out, "vmm_waiting_for_snapshot", "gauge", WAITING_HELP);
    let _ = writeln!(out, "vmm_waiting_for_snapshot 0");
    family(&mut out, "vmm_uptime_seconds", "gauge", "Time since the VMM started the guest.");
    let _ = writeln!(out, "vmm_uptime_seconds {:.3}", uptime.as_secs_f64());

    family(&mut out, "vmm_vcpu_exits_total", "counter", "vCPU exits to the VMM, by reason.");
    for (reason, n) in m.vcpu_shared.exits.snapshot() {
        let _ = writeln!(out, "vmm_vcpu_exits_total{{reason=\"{reason}\"}} {n}");
    }

    let nets: Vec<_> =
        m.nets.iter().map(|d| (d.config.tap.clone(), d.net.lock().expect("Poisoned lock").metrics())).collect();
    let counters: [(&str, &str, NetCounter); 8] = [
        ("vmm_net_rx_packets_total", "Frames delivered to the guest.", |n| n.rx_packets.load(Ordering::Relaxed)),
        ("vmm_net_rx_bytes_total", "Bytes delivered to the guest.", |n| n.rx_bytes.load(Ordering::Relaxed)),
        ("vmm_net_rx_dropped_total", "Frames lost on the way to the guest.", |n| n.rx_dropped.load(Ordering::Relaxed)),
        ("vmm_net_rx_waits_total", "Times a frame waited for the driver's buffers.", |n| {
            n.rx_no_buffers.load(Ordering::Relaxed)
        }),
        ("vmm_net_tx_packets_total", "Frames sent by the guest.", |n| n.tx_packets.load(Ordering::Relaxed)),
        ("vmm_net_tx_bytes_total", "Bytes sent by the guest.", |n| n.tx_bytes.load(Ordering::Relaxed)),
        ("vmm_net_tx_dropped_total", "Guest frames dropped.", |n| n.tx_dropped.load(Ordering::Relaxed)),
        ("vmm_net_bad_descriptors_total", "Descriptor chains the device refused.", |n| {
            n.rx_bad_descriptors.load(Ordering::Relaxed) + n.tx_bad_descriptors.load(Ordering::Relaxed)
        }),
    ];
    for (name, help, get) in counters {
        family(&mut out, name, "counter", help);
        for (i, (tap, metrics)) in nets.iter().enumerate() {
            let _ = writeln!(out, "{name}{{nic=\"{i}\",tap=\"{tap}\"}} {}", get(metrics));
        }
    }

    disks(&mut out, m);

    let phase = |p: MigrationPhase| serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned));
    family(&mut out, "vmm_migration_phase", "gauge", "1 for the phase the last migration is in.");
    for p in [
        MigrationPhase::None,
        MigrationPhase::Setup,
        MigrationPhase::Precopy,
        MigrationPhase::StopAndCopy,
        MigrationPhase::Postcopy,
        MigrationPhase::PostcopyPaused,
        MigrationPhase::Completed,
        MigrationPhase::Failed,
    ] {
        let _ = writeln!(
            out,
            "vmm_migration_phase{{phase=\"{}\"}} {}",
            phase(p).unwrap_or_default(),
            u8::from(migration.phase == p)
        );
    }
    let gauges: [(&str, &str, u64); 9] = [
        ("vmm_migration_rounds", "Pre-copy rounds of the last migration.", u64::from(migration.round)),
        ("vmm_migration_bytes_sent", "Bytes sent by the last migration.", migration.bytes_sent),
        ("vmm_migration_pages_sent", "Pages sent by the last migration.", migration.pages_sent),
        ("vmm_migration_pages_skipped", "Untouched or zero pages not sent.", migration.pages_skipped),
        ("vmm_migration_disk_bytes_sent", "Disk data bytes sent by the last migration.", migration.disk_bytes_sent),
        ("vmm_migration_total_milliseconds", "Duration of the last migration.", migration.total_ms),
        ("vmm_migration_downtime_milliseconds", "Guest pause, measured here.", migration.downtime_ms.unwrap_or(0)),
        (
            "vmm_migration_destination_downtime_milliseconds",
            "Guest pause, measured by the destination.",
            migration.downtime_destination_ms.unwrap_or(0),
        ),
        (
            "vmm_migration_dirty_rate_pages_per_second",
            "Pages dirtied per second, last round.",
            migration.dirty_rate_pages_s,
        ),
    ];
    for (name, help, v) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    // Post-copy's figures, once the last migration switched to it (0 before, or without it).
    let pc = migration.postcopy.clone().unwrap_or_default();
    let postcopy: [(&str, &str, u64); 6] = [
        ("vmm_migration_postcopy_pages_pushed", "Pages sent in the background after the switch.", pc.pages_pushed),
        ("vmm_migration_postcopy_pages_requested", "Pages sent in answer to faults.", pc.pages_requested),
        ("vmm_migration_postcopy_faults", "Destination faults on missing pages.", pc.faults.unwrap_or(pc.requests)),
        (
            "vmm_migration_postcopy_fault_latency_median_microseconds",
            "Median fault latency at the destination.",
            pc.fault_latency_median_us.unwrap_or(0),
        ),
        (
            "vmm_migration_postcopy_fault_latency_p99_microseconds",
            "99th percentile fault latency at the destination.",
            pc.fault_latency_p99_us.unwrap_or(0),
        ),
        ("vmm_migration_postcopy_reconnects", "Times the link broke and was taken up again.", u64::from(pc.reconnects)),
    ];
    for (name, help, v) in postcopy {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    out
}

/// Every disk's request counters, its size and allocation, and its dirty blocks while a
/// migration copies it.
fn disks(out: &mut String, m: &Machine) {
    let infos = crate::storage::disk_infos(m);
    let families: [(&str, &str, &str, DiskValue); 14] = [
        ("vmm_disk_reads_total", "counter", "Read requests completed.", |d| d.io.reads),
        ("vmm_disk_read_bytes_total", "counter", "Bytes read by the guest.", |d| d.io.read_bytes),
        ("vmm_disk_writes_total", "counter", "Write requests completed.", |d| d.io.writes),
        ("vmm_disk_write_bytes_total", "counter", "Bytes written by the guest.", |d| d.io.write_bytes),
        ("vmm_disk_flushes_total", "counter", "Flush requests (fdatasync).", |d| d.io.flushes),
        ("vmm_disk_discards_total", "counter", "Discard and write-zeroes requests.", |d| d.io.discards),
        ("vmm_disk_errors_total", "counter", "Requests answered with an I/O error.", |d| d.io.io_errors),
        ("vmm_disk_unsupported_total", "counter", "Requests of an unknown type.", |d| d.io.unsupported),
        ("vmm_disk_bad_descriptors_total", "counter", "Descriptor chains refused.", |d| d.io.bad_descriptors),
        ("vmm_disk_size_bytes", "gauge", "Size of the disk.", |d| d.size_bytes),
        ("vmm_disk_allocated_bytes", "gauge", "Bytes the image takes on its file system.", |d| d.allocated_bytes),
        ("vmm_disk_read_only", "gauge", "1 if the guest may only read the disk.", |d| u64::from(d.read_only)),
        ("vmm_disk_shared", "gauge", "1 if the disk is on shared storage.", |d| u64::from(d.shared)),
        ("vmm_disk_dirty_blocks", "gauge", "4 KiB blocks a migration has yet to send.", |d| d.dirty_blocks),
    ];
    for (name, kind, help, get) in families {
        family(out, name, kind, help);
        for (i, d) in infos.iter().enumerate() {
            let path = label_value(&d.path.display().to_string());
            let _ = writeln!(out, "{name}{{disk=\"{i}\",path=\"{path}\"}} {}", get(d));
        }
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_vmm_says_it_waits_and_for_how_long() {
        let text = render_waiting(Duration::from_millis(1500));
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples, ["vmm_waiting_for_snapshot 1", "vmm_waiting_seconds 1.500"]);
        assert!(text.contains("# TYPE vmm_waiting_for_snapshot gauge\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("/var/a b.img"), "/var/a b.img");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
