// SPDX-License-Identifier: Apache-2.0
//! Migrating a guest with either monitor, as a [`Plan`] says: pre-copy tuned the way the
//! migration section runs it, a monitor's own defaults, or post-copy (ours: the request's mode;
//! QEMU: the `postcopy-ram` capability and `migrate-start-postcopy` after the first round).
//! Follows the migration to its end, or gives up at the plan's bound, and returns what it cost
//! as the monitor reports it.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use vmm::api::{MigrateRequest, MigrationMode, MigrationPhase};

use super::{DOWNTIME_LIMIT_MS, Monitor, QEMU_MAX_BANDWIDTH, Running, Wire};

/// How a migration is asked for.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Ours: the request's mode. QEMU: pre-copy, or `postcopy-ram` switched on after the first
    /// round or `precopy_rounds` (it has no automatic switch).
    pub mode: MigrationMode,
    /// A 50 ms downtime limit and no bandwidth cap (QEMU: 100 GiB/s, never the limit here);
    /// else the monitor's own defaults (QEMU's: 300 ms and 128 MiB/s).
    pub tuned: bool,
    /// The longest wait for the end. Past it a QEMU migration is cancelled (the guest runs on
    /// at the source) and reported [`Outcome::Unfinished`]; for ours it is an error.
    pub bound: Duration,
    /// With post-copy: the pre-copy rounds before the switch (ours: `precopy_rounds`; QEMU:
    /// `migrate-start-postcopy` once that many full passes are done, 0 as soon as it runs).
    pub precopy_rounds: u32,
}

impl Plan {
    /// What the migration section runs: pre-copy, tuned, within 120 s.
    pub const TUNED_PRECOPY: Plan =
        Plan { mode: MigrationMode::Precopy, tuned: true, bound: Duration::from_secs(120), precopy_rounds: 1 };
}

/// How a migration ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    Done(MigrationResult),
    /// Not finished within the plan's bound (pre-copy that never converges), then cancelled.
    Unfinished {
        after_ms: f64,
        bytes_sent: u64,
        rounds: u32,
    },
}

/// One pre-copy round as the monitor reported it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundPoint {
    /// Since the migration started.
    pub t_ms: f64,
    pub round: u32,
    /// Pages the round had to send (dirty since the last round; all touched pages in round 1).
    pub dirty_pages: u64,
    /// Bytes sent since the migration started.
    pub bytes_sent: u64,
    /// CPU time the source's migration thread had used, in ms (ours only).
    pub sender_cpu_ms: Option<f64>,
}

/// The post-copy part of a migration that switched to it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PostcopyFigures {
    /// When the guest moved, in ms since the migration started.
    pub switched_at_ms: f64,
    /// From the switch to the last page on the destination, in ms (ours: the destination's
    /// figure; QEMU: from `migrate-start-postcopy` to `completed`, as the bench saw them).
    pub duration_ms: Option<f64>,
    /// Pages the destination asked for on a fault (ours: its requests; QEMU's
    /// `postcopy-requests`).
    pub requests: u64,
    /// From a fault to its page in place (ours only: QEMU reports no such figure).
    pub fault_latency_median_us: Option<u64>,
    pub fault_latency_p99_us: Option<u64>,
}

/// What a finished migration cost, as the source monitor reports it.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationResult {
    pub total_ms: f64,
    /// From the guest's vCPUs stopping on the source to them starting on the destination, on
    /// the host clock, as each monitor stamps those moments: ours in its migration report
    /// (`paused_at_us`, `resumed_at_us`), QEMU's in its STOP and RESUME events.
    pub downtime_ms: f64,
    /// The downtime the source reports: ours from asking the vCPUs to stop until the
    /// destination's acknowledgement (sent once the guest runs there), QEMU's from stopping
    /// until its last byte was sent.
    pub reported_downtime_ms: f64,
    pub bytes_sent: u64,
    /// Disk data sent (copied disks; part of `bytes_sent`), if the monitor says.
    pub disk_bytes_sent: Option<u64>,
    /// Copy rounds, the last one (with the guest paused, or post-copy's switch) included.
    pub rounds: u32,
    pub timeline: Vec<RoundPoint>,
    /// Set when the migration switched to post-copy.
    pub postcopy: Option<PostcopyFigures>,
}

impl MigrationResult {
    /// The pre-copy copy rate in MB/s: bytes sent from the first round's start to the last
    /// round's (set-up and the pause left out), or over the whole migration if it had one
    /// round only.
    pub fn copy_rate_mb_s(&self) -> f64 {
        if let (Some(first), Some(last)) = (self.timeline.first(), self.timeline.last())
            && last.t_ms > first.t_ms
            && last.bytes_sent > first.bytes_sent
        {
            return (last.bytes_sent - first.bytes_sent) as f64 / (last.t_ms - first.t_ms) / 1e3;
        }
        if self.total_ms > 0.0 { self.bytes_sent as f64 / self.total_ms / 1e3 } else { 0.0 }
    }

    /// CPU time the source's migration thread spent per GiB sent, over the same span as
    /// [`Self::copy_rate_mb_s`] (ours only, and only with more than one round).
    pub fn sender_cpu_ms_per_gib(&self) -> Option<f64> {
        let (first, last) = (self.timeline.first()?, self.timeline.last()?);
        let cpu = last.sender_cpu_ms? - first.sender_cpu_ms?;
        let bytes = last.bytes_sent.checked_sub(first.bytes_sent).filter(|b| *b > 0)?;
        Some(cpu / (bytes as f64 / (1u64 << 30) as f64))
    }
}

impl Running {
    /// Migrates the guest to `dst`, listening at `to` (`host:port`), with a 50 ms downtime
    /// limit and no bandwidth limit; waits for the end and returns what it cost.
    pub fn migrate(&self, to: &str, dst: &Running) -> Result<MigrationResult, String> {
        match self.migrate_plan(to, dst, &Plan::TUNED_PRECOPY)? {
            Outcome::Done(r) => Ok(r),
            Outcome::Unfinished { after_ms, .. } => {
                Err(format!("the {} migration did not finish within {:.0} s", self.monitor.name(), after_ms / 1e3))
            }
        }
    }

    /// Migrates the guest to `dst`, listening at `to`, as `plan` says.
    pub fn migrate_plan(&self, to: &str, dst: &Running, plan: &Plan) -> Result<Outcome, String> {
        match self.monitor {
            Monitor::Ours => self.migrate_ours(to, plan).map(Outcome::Done),
            Monitor::Qemu => self.migrate_qemu(to, dst, plan),
        }
    }

    fn migrate_ours(&self, to: &str, plan: &Plan) -> Result<MigrationResult, String> {
        let api = self.vm.api();
        let request = MigrateRequest {
            to: to.into(),
            downtime_ms: plan.tuned.then_some(DOWNTIME_LIMIT_MS),
            mode: Some(plan.mode),
            precopy_rounds: (plan.mode == MigrationMode::Postcopy && plan.precopy_rounds != 1)
                .then_some(plan.precopy_rounds),
            ..Default::default()
        };
        let want_tls = self.wire.as_ref().is_some_and(Wire::is_tls);
        api.migrate(&request).map_err(|e| format!("starting the migration: {e}"))?;
        let deadline = Instant::now() + plan.bound;
        while Instant::now() < deadline {
            let info = api.migration().map_err(|e| format!("following the migration: {e}"))?;
            match info.phase {
                MigrationPhase::Completed => {
                    if info.encrypted != want_tls {
                        return Err(format!("the migration's encryption was {}, not as asked", info.encrypted));
                    }
                    let timeline = info
                        .rounds
                        .iter()
                        .map(|r| RoundPoint {
                            t_ms: r.started_us as f64 / 1e3,
                            round: r.round,
                            dirty_pages: r.pages,
                            bytes_sent: r.bytes_before,
                            sender_cpu_ms: Some(r.cpu_us as f64 / 1e3),
                        })
                        .collect();
                    let postcopy = info.postcopy.as_ref().map(|p| PostcopyFigures {
                        switched_at_ms: p.switched_at_ms as f64,
                        duration_ms: p.duration_ms.map(|d| d as f64),
                        requests: p.requests,
                        fault_latency_median_us: p.fault_latency_median_us,
                        fault_latency_p99_us: p.fault_latency_p99_us,
                    });
                    return Ok(MigrationResult {
                        total_ms: info.total_us as f64 / 1e3,
                        downtime_ms: match (info.paused_at_us, info.resumed_at_us) {
                            (Some(p), Some(r)) => r.saturating_sub(p) as f64 / 1e3,
                            _ => return Err("the migration report lacks the pause and resume times".into()),
                        },
                        reported_downtime_ms: info.downtime_us.unwrap_or(0) as f64 / 1e3,
                        bytes_sent: info.bytes_sent,
                        disk_bytes_sent: Some(info.disk_bytes_sent),
                        // Every copy round, the pause's (or post-copy's switch) included, as
                        // QEMU's bitmap syncs count them.
                        rounds: info.rounds.len() as u32,
                        timeline,
                        postcopy,
                    });
                }
                MigrationPhase::Failed => {
                    return Err(format!("migration failed: {}", info.error.unwrap_or_default()));
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        Err(format!("the migration did not finish within {} s", plan.bound.as_secs()))
    }

    fn migrate_qemu(&self, to: &str, dst: &Running, plan: &Plan) -> Result<Outcome, String> {
        let mut qmp = self.qmp(Duration::from_secs(10))?;
        if plan.tuned {
            qmp.execute(
                "migrate-set-parameters",
                json!({ "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": QEMU_MAX_BANDWIDTH }),
            )?;
        }
        if self.wire.as_ref().is_some_and(Wire::is_tls) {
            // The destination's certificate must name the address dialled, as ours checks.
            let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
            qmp.execute("migrate-set-parameters", json!({ "tls-creds": "tls0", "tls-hostname": host }))?;
        }
        let mut capabilities = Vec::new();
        if self.copy_disks {
            // QEMU's block migration: the disks' contents go in the migration stream.
            capabilities.push(json!({ "capability": "block", "state": true }));
        }
        let postcopy = match plan.mode {
            MigrationMode::Precopy => false,
            // The destination got the capability before it listened (`wait_incoming_for`).
            MigrationMode::Postcopy => {
                capabilities.push(json!({ "capability": "postcopy-ram", "state": true }));
                true
            }
            MigrationMode::PostcopyAuto => return Err("QEMU has no automatic switch to post-copy".into()),
        };
        if !capabilities.is_empty() {
            qmp.execute("migrate-set-capabilities", json!({ "capabilities": capabilities }))?;
        }
        qmp.execute("migrate", json!({ "uri": format!("tcp:{to}") }))?;
        let start = Instant::now();
        let mut timeline: Vec<RoundPoint> = Vec::new();
        // Block migration's progress shows only while it is active: the last figure seen.
        let mut disk_sent: Option<u64> = None;
        let mut switched_at_ms: Option<f64> = None;
        let deadline = start + plan.bound;
        let (mut transferred, mut syncs) = (0, 0);
        while Instant::now() < deadline {
            let q = qmp.execute("query-migrate", json!({}))?;
            if let Some(d) = q["disk"]["transferred"].as_u64() {
                disk_sent = Some(disk_sent.unwrap_or(0).max(d));
            }
            let t_ms = start.elapsed().as_secs_f64() * 1e3;
            let ram = &q["ram"];
            let page = ram["page-size"].as_u64().unwrap_or(4096).max(1);
            syncs = ram["dirty-sync-count"].as_u64().unwrap_or(0) as u32;
            transferred = ram["transferred"].as_u64().unwrap_or(transferred);
            // A new bitmap sync starts a new round: what remains then is that round's dirty set.
            if syncs > 0 && timeline.last().is_none_or(|p| p.round < syncs) {
                let remaining = ram["remaining"].as_u64().unwrap_or(0);
                timeline.push(RoundPoint {
                    t_ms,
                    round: syncs,
                    dirty_pages: remaining / page,
                    bytes_sent: transferred,
                    sender_cpu_ms: None,
                });
            }
            let status = q["status"].as_str().unwrap_or("");
            // Each full pass ends with a bitmap sync; the first sync comes at the start.
            if postcopy && switched_at_ms.is_none() && syncs > plan.precopy_rounds && status == "active" {
                qmp.execute("migrate-start-postcopy", json!({}))?;
                switched_at_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            }
            match status {
                "completed" => {
                    let stopped = qmp.event_time("STOP", Duration::from_secs(5))?;
                    let _ = qmp.execute("quit", json!({}));
                    let mut events = dst.events.borrow_mut();
                    let resumed = events
                        .as_mut()
                        .ok_or("the destination's QMP is not open")?
                        .event_time("RESUME", Duration::from_secs(10))?;
                    let total_ms = q["total-time"].as_f64().unwrap_or(t_ms);
                    return Ok(Outcome::Done(MigrationResult {
                        total_ms,
                        downtime_ms: resumed.saturating_sub(stopped) as f64 / 1e3,
                        reported_downtime_ms: q["downtime"].as_f64().unwrap_or(0.0),
                        // With block migration, the disk's part of the stream comes on top.
                        bytes_sent: transferred + disk_sent.unwrap_or(0),
                        disk_bytes_sent: disk_sent,
                        rounds: syncs,
                        timeline,
                        postcopy: switched_at_ms.map(|at| PostcopyFigures {
                            switched_at_ms: at,
                            duration_ms: Some((total_ms - at).max(0.0)),
                            requests: ram["postcopy-requests"].as_u64().unwrap_or(0),
                            ..Default::default()
                        }),
                    }));
                }
                "failed" | "cancelled" => return Err(format!("QEMU migration failed: {q}")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        if switched_at_ms.is_some() {
            // The guest runs on the destination now: there is nothing to cancel back to.
            return Err(format!("QEMU's post-copy did not finish within {} s", plan.bound.as_secs()));
        }
        let _ = qmp.execute("migrate_cancel", json!({}));
        Ok(Outcome::Unfinished {
            after_ms: start.elapsed().as_secs_f64() * 1e3,
            bytes_sent: transferred,
            rounds: syncs,
        })
    }
}
