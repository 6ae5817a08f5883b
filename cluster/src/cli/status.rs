// SPDX-License-Identifier: Apache-2.0
//! `vmm cluster status` and `vmm vm list`: the cluster as tables, or as JSON.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::balance::{self, Plan, Policy};
use crate::model::{MovePhase, now_ms};
use crate::placement;
use crate::view::ClusterView;

/// One host, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRow {
    pub name: String,
    pub up: bool,
    pub drained: bool,
    pub migration_addr: Option<String>,
    pub cpu_capacity_millis: u64,
    /// Measured (10 s average), agent and VMMs.
    pub cpu_used_millis: Option<f64>,
    /// What its VMs ask for (running plus waiting to run) and its agent uses (10 s average):
    /// the load the balancer evens out.
    #[serde(default)]
    pub cpu_demand_millis: Option<f64>,
    /// Share of CFS periods throttled (10 s average).
    pub throttled: Option<f64>,
    pub mem_capacity_mib: u64,
    /// Guest memory placed there (with the per-VMM overhead), moves in flight counted.
    pub mem_placed_mib: u64,
    pub vms: usize,
    pub agent_cpu_millis: Option<f64>,
    pub agent_rss_mib: Option<f64>,
}

/// One VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRow {
    pub name: String,
    pub owner: String,
    pub epoch: u64,
    /// `running`, `starting`, ... as its owner reports it; `unknown` when the owner is down.
    pub state: String,
    pub detail: Option<String>,
    pub mem_mib: u64,
    pub cpu_millis: Option<f64>,
    pub rss_mib: Option<f64>,
    pub pid: Option<u32>,
}

/// A move that has not ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveRow {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub phase: MovePhase,
    pub age_ms: u64,
    pub requested_by: String,
}

/// The balancer: who leads, and its plan with the imbalance and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalancerRow {
    /// The elected balancer, if one leads.
    pub leader: Option<String>,
    pub leader_since_ms: Option<u64>,
    /// `leader`: the leader's last round; `computed here`: no balancer leads, this is what one
    /// would plan now (with the default policy).
    pub source: String,
    pub plan_age_ms: Option<u64>,
    pub plan: Plan,
    /// Moves the leader asked for in that round, and those the cluster refused (VM, why).
    pub requested: Vec<String>,
    pub refused: Vec<(String, String)>,
}

/// What `vmm cluster status --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub revision: i64,
    pub hosts: Vec<HostRow>,
    pub vms: Vec<VmRow>,
    pub migrations: Vec<MoveRow>,
    #[serde(default)]
    pub balancer: Option<BalancerRow>,
}

/// The balancer's part of the status.
fn balancer_row(view: &ClusterView, now: u64) -> BalancerRow {
    let leader = view.balancer_leader.as_ref().map(|l| &l.value);
    match view.balancer_plan.as_ref().map(|p| &p.value) {
        Some(r) => BalancerRow {
            leader: leader.map(|l| l.id.clone()),
            leader_since_ms: leader.map(|l| l.since_ms),
            source: "leader".into(),
            plan_age_ms: Some(now.saturating_sub(r.at_ms)),
            plan: r.plan.clone(),
            requested: r.requested.clone(),
            refused: r.refused.clone(),
        },
        None => {
            let input = balance::input::from_view(view, now, false);
            BalancerRow {
                leader: leader.map(|l| l.id.clone()),
                leader_since_ms: leader.map(|l| l.since_ms),
                source: "computed here".into(),
                plan_age_ms: None,
                plan: balance::plan(&input, &Policy::default()),
                requested: Vec::new(),
                refused: Vec::new(),
            }
        }
    }
}

/// The report for `view`.
pub fn status_report(view: &ClusterView) -> StatusReport {
    let table = placement::hosts(view);
    let hosts = table
        .iter()
        .map(|h| {
            let load = view.loads.get(&h.name).map(|l| &l.value);
            let rec = view.hosts.get(&h.name).map(|r| &r.value);
            HostRow {
                name: h.name.clone(),
                up: h.up,
                drained: h.drained,
                migration_addr: rec.map(|r| r.migration_addr.clone()),
                cpu_capacity_millis: h.cpu_millis,
                cpu_used_millis: load.map(|l| l.cpu_millis.ema_10s),
                cpu_demand_millis: load.map(|l| l.demand_millis.ema_10s),
                throttled: load.map(|l| l.throttled.ema_10s),
                mem_capacity_mib: h.mem_mib,
                mem_placed_mib: h.used_mem_mib,
                vms: view.vms_on(&h.name).count(),
                agent_cpu_millis: load.map(|l| l.agent_cpu_millis.ema_10s),
                agent_rss_mib: load.map(|l| l.agent_rss_mib),
            }
        })
        .collect();
    let vms = view
        .vms
        .values()
        .map(|v| {
            let r = &v.value;
            let status = view.status.get(&r.name).map(|s| &s.value).filter(|s| s.host == r.owner);
            let load = view.loads.get(&r.owner).and_then(|l| l.value.vms.get(&r.name));
            let state = if !view.is_up(&r.owner) {
                "unknown (host down)".to_string()
            } else {
                match status {
                    Some(s) if s.epoch == r.epoch => serde_json::to_value(s.phase)
                        .ok()
                        .and_then(|p| p.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    _ if r.desired == crate::model::Desired::Stopped => "stopping".into(),
                    _ => "unknown".into(),
                }
            };
            VmRow {
                name: r.name.clone(),
                owner: r.owner.clone(),
                epoch: r.epoch,
                state,
                detail: status.and_then(|s| s.detail.clone()),
                mem_mib: r.spec.mem_mib,
                cpu_millis: load.map(|l| l.cpu_millis.ema_10s),
                rss_mib: load.map(|l| l.rss_mib),
                pid: status.and_then(|s| s.pid),
            }
        })
        .collect();
    let now = now_ms();
    let migrations = view
        .moves
        .values()
        .filter(|m| !m.value.phase.is_final())
        .map(|m| MoveRow {
            vm: m.value.vm.clone(),
            from: m.value.from.clone(),
            to: m.value.to.clone(),
            phase: m.value.phase,
            age_ms: now.saturating_sub(m.value.times.requested_ms),
            requested_by: m.value.requested_by.clone(),
        })
        .collect();
    StatusReport { revision: view.revision, hosts, vms, migrations, balancer: Some(balancer_row(view, now)) }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

/// The VMs table.
pub fn vms_table(report: &StatusReport) -> String {
    if report.vms.is_empty() {
        return "no VMs\n".into();
    }
    let rows: Vec<Vec<String>> = report
        .vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.owner.clone(),
                v.epoch.to_string(),
                v.state.clone(),
                v.mem_mib.to_string(),
                opt(v.cpu_millis, 0),
                opt(v.rss_mib, 1),
                v.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(&["VM", "HOST", "EPOCH", "STATE", "MEM MiB", "CPU m", "RSS MiB", "DETAIL"], &rows)
}

/// The whole status as text.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::from("HOSTS\n");
    if report.hosts.is_empty() {
        out.push_str("no hosts\n");
    } else {
        let rows: Vec<Vec<String>> = report
            .hosts
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    if h.up { "up".into() } else { "down".into() },
                    if h.drained { "yes".into() } else { "no".into() },
                    h.migration_addr.clone().unwrap_or_else(|| "-".into()),
                    format!("{}/{}", opt(h.cpu_used_millis, 0), h.cpu_capacity_millis),
                    opt(h.cpu_demand_millis, 0),
                    opt(h.throttled.map(|t| t * 100.0), 0),
                    format!("{}/{}", h.mem_placed_mib, h.mem_capacity_mib),
                    h.vms.to_string(),
                    format!("{} m, {} MiB", opt(h.agent_cpu_millis, 1), opt(h.agent_rss_mib, 1)),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "HOST",
                "STATE",
                "DRAINED",
                "MIGRATION PORT",
                "CPU m used/cap",
                "DEMAND m",
                "THROTTLED %",
                "MEM MiB placed/cap",
                "VMS",
                "AGENT",
            ],
            &rows,
        ));
    }
    out.push_str("\nVMS\n");
    out.push_str(&vms_table(report));
    out.push_str("\nMIGRATIONS IN FLIGHT\n");
    if report.migrations.is_empty() {
        out.push_str("none\n");
    } else {
        let rows: Vec<Vec<String>> = report
            .migrations
            .iter()
            .map(|m| {
                vec![
                    m.vm.clone(),
                    m.from.clone(),
                    m.to.clone(),
                    format!("{:?}", m.phase).to_lowercase(),
                    format!("{:.1} s", m.age_ms as f64 / 1000.0),
                    m.requested_by.clone(),
                ]
            })
            .collect();
        out.push_str(&table(&["VM", "FROM", "TO", "PHASE", "AGE", "ASKED BY"], &rows));
    }
    if let Some(b) = &report.balancer {
        out.push_str("\nBALANCER\n");
        match (&b.leader, b.plan_age_ms) {
            (Some(l), Some(age)) => {
                let _ = writeln!(out, "leader {l}; its plan of {:.1} s ago:", age as f64 / 1000.0);
            }
            (Some(l), None) => {
                let _ = writeln!(out, "leader {l} (no plan yet); what a balancer would plan now:");
            }
            (None, _) => out.push_str("no balancer leads (`vmm balancer`); what one would plan now:\n"),
        }
        if let Some(s) = b.plan.spread {
            let _ = writeln!(
                out,
                "imbalance: spread {s:.3}{}",
                b.plan.spread_after.map(|a| format!(", {a:.3} after the plan")).unwrap_or_default()
            );
        }
        out.push_str(&balance::render(&b.plan));
        for vm in &b.requested {
            let _ = writeln!(out, "  asked to move {vm}");
        }
        for (vm, why) in &b.refused {
            let _ = writeln!(out, "  refused {vm}: {why}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\nq    22\n");
        let empty = StatusReport { revision: 1, hosts: vec![], vms: vec![], migrations: vec![], balancer: None };
        let text = render(&empty);
        assert!(text.contains("no hosts") && text.contains("no VMs") && text.contains("none"), "{text}");
    }
}
