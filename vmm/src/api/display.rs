// SPDX-License-Identifier: Apache-2.0
//! What `vmm status` and `vmm migrate` print for people: plain text made from API answers, kept
//! out of `main.rs` so it can be tested.

use std::fmt::Write;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::types::{MigrationInfo, MigrationPhase, VmInfo, VmState};
use crate::arch::cpuid::CpuTemplate;

/// `vmm status`: one `label: value` line per fact.
pub fn vm_summary(info: &VmInfo) -> String {
    let c = &info.config;
    let mut rows = vec![
        ("state", state_name(info.state).to_string()),
        ("uptime", duration(info.uptime_ms)),
        ("vCPUs", c.vcpus.to_string()),
        ("memory", format!("{} MiB", c.mem_mib)),
        ("CPU template", template_name(c.cpu_template).to_string()),
        ("kernel", c.kernel.display().to_string()),
    ];
    if let Some(initrd) = &c.initrd {
        rows.push(("initrd", initrd.display().to_string()));
    }
    rows.push(("cmdline", c.cmdline.clone()));
    if c.nets.is_empty() {
        rows.push(("NICs", "none".to_string()));
    }
    for (i, net) in c.nets.iter().enumerate() {
        let label = if i == 0 { "NICs" } else { "" };
        rows.push((label, format!("{}  {}", net.tap, net.mac)));
    }
    if info.disks.is_empty() {
        rows.push(("disks", "none".to_string()));
    }
    for (i, d) in info.disks.iter().enumerate() {
        let label = if i == 0 { "disks" } else { "" };
        let mut flags = Vec::new();
        if d.read_only {
            flags.push("read-only");
        }
        if d.shared {
            flags.push("shared");
        }
        let flags = if flags.is_empty() { String::new() } else { format!(" ({})", flags.join(", ")) };
        rows.push((
            label,
            format!("{}  {}, {} allocated{flags}", d.path.display(), bytes(d.size_bytes), bytes(d.allocated_bytes)),
        ));
        let io = &d.io;
        rows.push((
            "",
            format!(
                "  read {} in {} requests, wrote {} in {}, {} flushes, {} errors",
                bytes(io.read_bytes),
                io.reads,
                bytes(io.write_bytes),
                io.writes,
                io.flushes,
                io.io_errors
            ),
        ));
    }
    table(&rows, "")
}

/// The table `vmm migrate` prints when the migration is over.
pub fn migration_summary(info: &MigrationInfo) -> String {
    let to = info.destination.as_deref().unwrap_or("?");
    let mut out = format!("migration to {to}: {}\n", phase_name(info.phase));
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), duration);
    let rows = [
        ("connection", if info.encrypted { "mutual TLS" } else { "plaintext" }.to_string()),
        ("total time", duration(info.total_ms)),
        ("downtime (source)", ms(info.downtime_ms)),
        ("downtime (destination)", ms(info.downtime_destination_ms)),
        ("rounds", info.round.to_string()),
        ("bytes sent", bytes(info.bytes_sent)),
        ("pages sent", info.pages_sent.to_string()),
        ("pages skipped", info.pages_skipped.to_string()),
        ("disk data sent", bytes(info.disk_bytes_sent)),
    ];
    out.push_str(&table(&rows, "  "));
    out
}

/// The progress bar's message while a migration runs.
pub fn migration_progress(info: &MigrationInfo) -> String {
    let mut out = phase_name(info.phase).to_string();
    if info.round > 0 {
        let _ = write!(out, ", round {}", info.round);
    }
    if info.bandwidth_bytes_s > 0 {
        let _ = write!(out, ", {}/s", bytes(info.bandwidth_bytes_s));
    }
    if info.phase == MigrationPhase::Precopy && info.eta_ms > 0 {
        let _ = write!(out, ", ETA {}", duration(info.eta_ms));
    }
    out
}

/// The progress bar of `vmm migrate`, on stderr and only if that is a terminal (scripts and logs
/// get just the final summary).
pub struct MigrationBar {
    bar: ProgressBar,
    /// Guest RAM: what round 1 copies, so the bar means something before there is an ETA.
    guest_bytes: u64,
}

impl MigrationBar {
    pub fn new(guest_bytes: Option<u64>) -> MigrationBar {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(guest_bytes.unwrap_or(0))
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:25}] {bytes:>10} sent  {wide_msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        MigrationBar { bar, guest_bytes: guest_bytes.unwrap_or(0) }
    }

    pub fn update(&self, info: &MigrationInfo) {
        // What is left is roughly what the last round's bandwidth moves in the ETA.
        let left = info.bandwidth_bytes_s.saturating_mul(info.eta_ms) / 1000;
        let total = info.bytes_sent.saturating_add(left).max(self.guest_bytes).max(info.bytes_sent);
        self.bar.set_length(total);
        self.bar.set_position(info.bytes_sent);
        self.bar.set_message(migration_progress(info));
    }

    /// Removes the bar, so that the summary that follows stands alone.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

pub fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Migrating => "migrating",
        VmState::Migrated => "migrated",
        VmState::ShuttingDown => "shutting down",
    }
}

pub fn phase_name(phase: MigrationPhase) -> &'static str {
    match phase {
        MigrationPhase::None => "none",
        MigrationPhase::Setup => "setup",
        MigrationPhase::Precopy => "pre-copy",
        MigrationPhase::StopAndCopy => "stop-and-copy",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Failed => "failed",
    }
}

fn template_name(template: CpuTemplate) -> &'static str {
    match template {
        CpuTemplate::Host => "host",
        CpuTemplate::Baseline => "baseline",
    }
}

/// `1023 B`, `1.5 KiB`, `130.2 MiB`, ...
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Display only: the precision f64 loses above 2^53 bytes does not show in one decimal.
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `850 ms`, `1.234 s`, `2m 03s`, `1h 02m 03s`.
pub fn duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms} ms");
    }
    if ms < 60_000 {
        return format!("{}.{:03} s", ms / 1000, ms % 1000);
    }
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 { format!("{h}h {m:02}m {s:02}s") } else { format!("{m}m {s:02}s") }
}

/// Aligns `label: value` rows; an empty label continues the row above.
fn table(rows: &[(&str, String)], indent: &str) -> String {
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (label, value) in rows {
        let label = if label.is_empty() { String::new() } else { format!("{label}:") };
        let _ = writeln!(out, "{indent}{label:<width$} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(128 << 20), "128.0 MiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(1234), "1.234 s");
        assert_eq!(duration(123_000), "2m 03s");
        assert_eq!(duration(3_723_000), "1h 02m 03s");
    }

    #[test]
    fn migration_table_has_every_row() {
        let info = MigrationInfo {
            phase: MigrationPhase::Completed,
            destination: Some("10.0.0.2:4000".to_string()),
            round: 4,
            bytes_sent: 3 << 20,
            pages_sent: 768,
            pages_skipped: 12,
            total_ms: 1500,
            downtime_ms: Some(12),
            downtime_destination_ms: None,
            ..MigrationInfo::default()
        };
        let t = migration_summary(&info);
        assert!(t.starts_with("migration to 10.0.0.2:4000: completed\n"), "{t}");
        for needle in [
            "total time",
            "1.500 s",
            "downtime (source)",
            "12 ms",
            "downtime (destination)",
            "rounds",
            "3.0 MiB",
            "768",
            "pages skipped",
        ] {
            assert!(t.contains(needle), "{needle} missing from\n{t}");
        }
    }
}
