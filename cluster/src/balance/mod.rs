// SPDX-License-Identifier: Apache-2.0
//! The balancer's decision: a pure function from the cluster's state ([`BalanceInput`], built
//! from a view by [`input::from_view`]) and a [`Policy`] to a [`Plan`] of moves. No I/O, no
//! clock (the time is part of the input), so it is unit-tested on recorded cluster snapshots
//! (`snapshots/`), and every plan is re-checked against the rules ([`check`]) before anything
//! acts on it.
//!
//! - **Load relative to capacity.** A host's utilisation is what its VMs and its agent ask for
//!   (their CPU demand: running plus waiting to run, so a starved VM counts fully) divided by
//!   its CPU capacity. The **spread** is the standard deviation of the utilisations of the hosts
//!   being balanced (vSphere DRS's imbalance), divided by their mean once that is above 1
//!   (an overcommitted cluster is then judged by the coefficient of variation, so 12 jobs on
//!   one of 3 hosts and 24 on one of 3 look alike).
//! - **A move pays for itself.** Moving a VM costs its expected migration time (memory to copy
//!   over the bandwidth left after its dirty rate) and its expected pause; a move is planned only
//!   if the spread it removes exceeds that cost plus a minimum gain. A VM that dirties memory
//!   near the copy bandwidth is never moved (its pre-copy would not converge).
//! - **Hysteresis**: balancing starts when the spread is above `start_spread` and goes on until
//!   it is below `stop_spread` (the caller carries `active` from one plan to the next).
//! - **Small steps.** At most one outgoing and one incoming migration per host at a time (moves
//!   in flight count), a cooldown per VM after it moved, a settling time in which a host that
//!   just ended a move receives nothing (a VM that arrived has no figures yet), and a VM never
//!   goes back to the host it just left.
//! - **Only what is known.** Hosts that are down, drained, or whose load figures are stale are
//!   left out of the balance altogether (neither source nor destination); VMs that are not
//!   running or have no figures yet stay where they are. Memory must fit, as placement says.

pub mod input;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::placement;

/// The balancer's tunables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Balancing starts when the spread is above this.
    pub start_spread: f64,
    /// ... and stops once it is below this.
    pub stop_spread: f64,
    /// The least a move must lower the spread beyond its cost: above the noise of measured
    /// figures, so that a balanced cluster is not reshuffled after it.
    pub min_gain: f64,
    /// Spread a second of migration costs.
    pub cost_per_s: f64,
    /// Spread a second of guest pause costs.
    pub cost_per_pause_s: f64,
    /// Copy bandwidth assumed for a migration, MiB/s.
    pub bandwidth_mib_s: f64,
    /// A VM whose dirty rate is above this share of the bandwidth is not moved.
    pub max_dirty_share: f64,
    /// A VM that moved is left where it is for this long.
    pub cooldown_ms: u64,
    /// A VM does not go back to the host it left for this long.
    pub no_return_ms: u64,
    /// A host receives nothing for this long after one of its moves ended.
    pub settle_ms: u64,
    /// Load figures older than this are ignored.
    pub stale_ms: u64,
    /// Most moves in one plan.
    pub max_moves: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            start_spread: 0.15,
            stop_spread: 0.08,
            min_gain: 0.1,
            cost_per_s: 0.02,
            cost_per_pause_s: 1.0,
            bandwidth_mib_s: 400.0,
            max_dirty_share: 0.5,
            cooldown_ms: 30_000,
            no_return_ms: 300_000,
            settle_ms: 3_000,
            stale_ms: 5_000,
            max_moves: 8,
        }
    }
}

/// A host as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostIn {
    pub name: String,
    /// It has a live agent.
    pub up: bool,
    pub drained: bool,
    /// CPU capacity, thousandths of a CPU.
    pub cpu_millis: u64,
    pub mem_mib: u64,
    /// Memory of the VMs it owns or receives, with the per-VMM overhead (as placement counts).
    pub used_mem_mib: u64,
    /// When its load record was taken (ms since the Unix epoch); `None` if it has none.
    pub load_at_ms: Option<u64>,
    /// What it asks for besides its VMs (its agent), thousandths of a CPU.
    pub base_millis: Option<f64>,
    /// When a move from or to it last ended.
    pub last_move_end_ms: Option<u64>,
}

/// A move that has not ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub from: String,
    pub to: String,
}

/// The last move of a VM that ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastMove {
    pub from: String,
    pub to: String,
    pub ended_ms: u64,
    pub done: bool,
}

/// A VM as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmIn {
    pub name: String,
    /// Its owner.
    pub host: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Running at its current epoch, as its owner reports.
    pub running: bool,
    /// CPU demand (10 s average), thousandths of a CPU; `None` until its owner measured it.
    pub demand_millis: Option<f64>,
    /// Resident memory: what a migration copies (untouched pages are skipped).
    pub rss_mib: Option<f64>,
    /// Dirty rate, MiB/s, when known (measured by its last migration).
    pub dirty_mib_s: Option<f64>,
    pub in_flight: Option<InFlight>,
    pub last_move: Option<LastMove>,
}

/// Everything a plan is made from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalanceInput {
    /// The planner's clock, ms since the Unix epoch.
    pub now_ms: u64,
    /// Whether the previous plan was balancing (hysteresis).
    pub active: bool,
    pub hosts: Vec<HostIn>,
    pub vms: Vec<VmIn>,
}

/// One planned move and its accounts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub demand_millis: f64,
    /// The spread before and after this move (earlier moves of the plan applied).
    pub spread_before: f64,
    pub spread_after: f64,
    /// What it costs, in spread, and why.
    pub cost: f64,
    pub expected_s: f64,
    pub expected_pause_ms: f64,
}

/// A host's utilisation now and once the plan is carried out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostLine {
    pub name: String,
    /// Demand ÷ capacity; `None` if the host is left out.
    pub utilisation: Option<f64>,
    pub after: Option<f64>,
    /// Why it is left out, or busy.
    pub note: Option<String>,
}

/// What the balancer would do, and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The spread of the hosts being balanced (`None`: fewer than two of them).
    pub spread: Option<f64>,
    pub spread_after: Option<f64>,
    /// Balancing (between the start and the stop threshold): carry to the next plan.
    pub active: bool,
    pub moves: Vec<PlannedMove>,
    pub hosts: Vec<HostLine>,
    /// VMs that may not move now, and why.
    pub held: Vec<(String, String)>,
    /// One sentence: what and why.
    pub why: String,
}

/// What the leading balancer publishes after each round, under its lease (`balancer/plan`):
/// `vmm cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The balancer that made it.
    pub leader: String,
    pub at_ms: u64,
    pub policy: Policy,
    pub plan: Plan,
    /// Moves it asked for, and moves the cluster refused (VM and why).
    #[serde(default)]
    pub requested: Vec<String>,
    #[serde(default)]
    pub refused: Vec<(String, String)>,
}

/// The spread of utilisations: σ, divided by the mean once the mean is above 1.
pub fn spread(utils: &[f64]) -> f64 {
    if utils.len() < 2 {
        return 0.0;
    }
    let n = utils.len() as f64;
    let mean = utils.iter().sum::<f64>() / n;
    let var = utils.iter().map(|u| (u - mean) * (u - mean)).sum::<f64>() / n;
    var.sqrt() / mean.max(1.0)
}

/// Expected migration time (s) and guest pause (ms) of a VM, or why it would not converge.
pub fn migration_cost(vm: &VmIn, policy: &Policy) -> Result<(f64, f64), String> {
    let bw = policy.bandwidth_mib_s.max(1.0);
    let dirty = vm.dirty_mib_s.unwrap_or(0.0).max(0.0);
    if dirty > policy.max_dirty_share * bw {
        return Err(format!(
            "dirties {dirty:.0} MiB/s, more than {:.0} % of the {bw:.0} MiB/s a migration copies: it would hardly converge",
            policy.max_dirty_share * 100.0
        ));
    }
    let copy = vm.rss_mib.unwrap_or(vm.mem_mib as f64).min(vm.mem_mib as f64).max(1.0);
    // Pre-copy rounds shrink by dirty ÷ bandwidth each: the whole is copy ÷ (bw − dirty).
    let seconds = copy / (bw - dirty);
    // The pause sends what was dirtied during the last round (about 50 ms), plus a fixed
    // millisecond of state and switch-over.
    let pause_ms = 1.0 + dirty * 0.05 / bw * 1000.0;
    Ok((seconds, pause_ms))
}

/// The working state of a plan: demand per host, memory, busy ends.
struct Work {
    /// Hosts being balanced: name → (capacity, demand).
    hosts: BTreeMap<String, (f64, f64)>,
    mem: BTreeMap<String, (u64, u64)>,
    busy_out: BTreeSet<String>,
    busy_in: BTreeSet<String>,
}

impl Work {
    fn utils(&self) -> Vec<f64> {
        self.hosts.values().map(|(cap, d)| d / cap).collect()
    }

    fn spread(&self) -> f64 {
        spread(&self.utils())
    }

    fn spread_with(&self, from: &str, to: &str, demand: f64) -> f64 {
        let utils: Vec<f64> = self
            .hosts
            .iter()
            .map(|(h, (cap, d))| {
                let d = if h == from {
                    d - demand
                } else if h == to {
                    d + demand
                } else {
                    *d
                };
                d / cap
            })
            .collect();
        spread(&utils)
    }

    fn fits(&self, host: &str, mem_mib: u64) -> bool {
        self.mem.get(host).is_some_and(|(cap, used)| used + placement::cost(mem_mib) <= *cap)
    }
}

/// Plans moves for `input` under `policy`.
pub fn plan(input: &BalanceInput, policy: &Policy) -> Plan {
    let now = input.now_ms;
    let mut notes: BTreeMap<String, String> = BTreeMap::new();
    let mut work =
        Work { hosts: BTreeMap::new(), mem: BTreeMap::new(), busy_out: BTreeSet::new(), busy_in: BTreeSet::new() };
    for h in &input.hosts {
        let fresh = h.load_at_ms.is_some_and(|at| at + policy.stale_ms >= now);
        let left_out = if !h.up {
            Some("down".to_string())
        } else if h.drained {
            Some("drained".to_string())
        } else if h.cpu_millis == 0 {
            Some("no CPU capacity".to_string())
        } else if h.load_at_ms.is_none() || h.base_millis.is_none() {
            Some("no load figures yet".to_string())
        } else if !fresh {
            Some(format!("load figures {} s old", now.saturating_sub(h.load_at_ms.unwrap_or(0)) / 1000))
        } else {
            None
        };
        if let Some(why) = left_out {
            notes.insert(h.name.clone(), why);
            continue;
        }
        // Its VMs are added from the VM table below, where a move in flight already counts at
        // its destination.
        let base = h.base_millis.unwrap_or(0.0).max(0.0);
        work.hosts.insert(h.name.clone(), (h.cpu_millis as f64, base));
        work.mem.insert(h.name.clone(), (h.mem_mib, h.used_mem_mib));
        // A VM that just arrived has no figures yet, so the host looks lighter than it is: it
        // receives nothing until they are in. (Its own VMs' figures are sound: it may send.)
        if h.last_move_end_ms.is_some_and(|end| end + policy.settle_ms > now) {
            notes.insert(h.name.clone(), "settling after a move".into());
            work.busy_in.insert(h.name.clone());
        }
    }
    // Every VM's demand where it is (or will be, once its move in flight ends).
    for v in &input.vms {
        let at = v.in_flight.as_ref().map_or(&v.host, |m| &m.to);
        if let Some(m) = &v.in_flight {
            work.busy_out.insert(m.from.clone());
            work.busy_in.insert(m.to.clone());
            for (h, what) in [(&m.from, "sending"), (&m.to, "receiving")] {
                if work.hosts.contains_key(h) {
                    notes.insert(h.clone(), format!("{what} {}", v.name));
                }
            }
        }
        if let (Some(d), Some((_, demand))) = (v.demand_millis, work.hosts.get_mut(at)) {
            *demand += d;
        }
    }
    let before: BTreeMap<String, f64> = work.hosts.iter().map(|(h, (cap, d))| (h.clone(), d / cap)).collect();

    // Who may move, and why not.
    let mut held = Vec::new();
    let mut candidates: Vec<(&VmIn, f64, f64, f64)> = Vec::new();
    for v in &input.vms {
        let why_not = if v.in_flight.is_some() {
            Some("moving".to_string())
        } else if !work.hosts.contains_key(&v.host) {
            None // its host is left out: said once, per host
        } else if !v.running {
            Some("not running".to_string())
        } else if v.demand_millis.is_none() {
            Some("no load figures yet".to_string())
        } else if let Some(m) = v.last_move.as_ref().filter(|m| m.ended_ms + policy.cooldown_ms > now) {
            Some(format!("cooling down (moved {} s ago)", now.saturating_sub(m.ended_ms) / 1000))
        } else {
            match migration_cost(v, policy) {
                Ok((s, pause)) => {
                    let cost = policy.cost_per_s * s + policy.cost_per_pause_s * pause / 1000.0;
                    candidates.push((v, cost, s, pause));
                    None
                }
                Err(e) => Some(e),
            }
        };
        if let Some(why) = why_not {
            held.push((v.name.clone(), why));
        }
    }

    let spread_now = work.spread();
    let counted = work.hosts.len();
    let mut p = Plan { held, ..Default::default() };
    if counted < 2 {
        p.why = format!("{counted} host(s) can be balanced: nothing to even out");
        p.hosts = host_lines(input, &before, &before, &notes);
        return p;
    }
    p.spread = Some(spread_now);
    let active = if input.active { spread_now >= policy.stop_spread } else { spread_now > policy.start_spread };
    p.active = active;
    if !active {
        p.spread_after = Some(spread_now);
        p.why = if input.active {
            format!("spread {spread_now:.3} fell below the stop threshold {:.3}: balanced", policy.stop_spread)
        } else {
            format!("spread {spread_now:.3} is within the start threshold {:.3}: balanced", policy.start_spread)
        };
        p.hosts = host_lines(input, &before, &before, &notes);
        return p;
    }

    let mut moved: BTreeSet<&str> = BTreeSet::new();
    while p.moves.len() < policy.max_moves {
        let current = work.spread();
        if current < policy.stop_spread {
            break;
        }
        let mut best: Option<(f64, PlannedMove)> = None;
        for (v, cost, s, pause) in &candidates {
            if moved.contains(v.name.as_str()) || work.busy_out.contains(&v.host) {
                continue;
            }
            let demand = v.demand_millis.unwrap_or(0.0);
            for to in work.hosts.keys() {
                if *to == v.host || work.busy_in.contains(to) || !work.fits(to, v.mem_mib) {
                    continue;
                }
                let returning = v
                    .last_move
                    .as_ref()
                    .is_some_and(|m| m.done && m.from == *to && m.ended_ms + policy.no_return_ms > now);
                if returning {
                    continue;
                }
                let after = work.spread_with(&v.host, to, demand);
                let net = current - after - cost;
                if net <= policy.min_gain {
                    continue;
                }
                // Best net gain; ties to the first VM and host by name (deterministic plans).
                if best.as_ref().is_none_or(|(b, _)| net > *b + 1e-12) {
                    let mv = PlannedMove {
                        vm: v.name.clone(),
                        from: v.host.clone(),
                        to: to.clone(),
                        demand_millis: demand,
                        spread_before: current,
                        spread_after: after,
                        cost: *cost,
                        expected_s: *s,
                        expected_pause_ms: *pause,
                    };
                    best = Some((net, mv));
                }
            }
        }
        let Some((_, mv)) = best else { break };
        let cost_mem = placement::cost(input.vms.iter().find(|v| v.name == mv.vm).map_or(0, |v| v.mem_mib));
        if let Some((_, d)) = work.hosts.get_mut(&mv.from) {
            *d -= mv.demand_millis;
        }
        if let Some((_, d)) = work.hosts.get_mut(&mv.to) {
            *d += mv.demand_millis;
        }
        if let Some((_, used)) = work.mem.get_mut(&mv.to) {
            *used += cost_mem;
        }
        work.busy_out.insert(mv.from.clone());
        work.busy_in.insert(mv.to.clone());
        moved.insert(candidates.iter().find(|c| c.0.name == mv.vm).map_or("", |c| c.0.name.as_str()));
        p.moves.push(mv);
    }
    let after_utils: BTreeMap<String, f64> = work.hosts.iter().map(|(h, (cap, d))| (h.clone(), d / cap)).collect();
    p.spread_after = Some(work.spread());
    p.hosts = host_lines(input, &before, &after_utils, &notes);
    p.why = if p.moves.is_empty() {
        let busy = work.busy_out.len() + work.busy_in.len();
        if busy > 0 {
            format!(
                "spread {spread_now:.3} is above the stop threshold {:.3}, but no move is possible or worth its cost now (hosts busy with moves or settling)",
                policy.stop_spread
            )
        } else {
            format!(
                "spread {spread_now:.3} is above the stop threshold {:.3}, but no move gains more than it costs",
                policy.stop_spread
            )
        }
    } else {
        format!(
            "spread {spread_now:.3} is above the {} threshold {:.3}: {} move(s) bring it to {:.3}",
            if input.active { "stop" } else { "start" },
            if input.active { policy.stop_spread } else { policy.start_spread },
            p.moves.len(),
            work.spread()
        )
    };
    p
}

fn host_lines(
    input: &BalanceInput,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    notes: &BTreeMap<String, String>,
) -> Vec<HostLine> {
    input
        .hosts
        .iter()
        .map(|h| HostLine {
            name: h.name.clone(),
            utilisation: before.get(&h.name).copied(),
            after: after.get(&h.name).copied(),
            note: notes.get(&h.name).cloned(),
        })
        .collect()
}

/// Re-checks a plan against the rules, on its input: every move goes from a VM's owner to
/// another host that is up, not drained, has fresh figures and room; no VM twice; no host sends
/// or receives twice, moves in flight included; no VM cooling down or going back; the plan
/// lowers the spread.
pub fn check(input: &BalanceInput, policy: &Policy, plan: &Plan) -> Result<(), String> {
    let now = input.now_ms;
    let host = |n: &str| input.hosts.iter().find(|h| h.name == n);
    let mut out: BTreeSet<&str> = BTreeSet::new();
    let mut inc: BTreeSet<&str> = BTreeSet::new();
    for v in &input.vms {
        if let Some(m) = &v.in_flight {
            out.insert(&m.from);
            inc.insert(&m.to);
        }
    }
    let mut mem: BTreeMap<&str, u64> = input.hosts.iter().map(|h| (h.name.as_str(), h.used_mem_mib)).collect();
    let mut vms = BTreeSet::new();
    for m in &plan.moves {
        let v = input.vms.iter().find(|v| v.name == m.vm).ok_or(format!("{}: no such VM", m.vm))?;
        let fail = |why: &str| Err(format!("move of {} from {} to {}: {why}", m.vm, m.from, m.to));
        if v.host != m.from {
            return fail("the VM is not on the source");
        }
        if m.from == m.to {
            return fail("source and destination are one host");
        }
        if !vms.insert(&m.vm) {
            return fail("the VM moves twice");
        }
        if v.in_flight.is_some() || !v.running {
            return fail("the VM is moving or not running");
        }
        if v.last_move.as_ref().is_some_and(|l| l.ended_ms + policy.cooldown_ms > now) {
            return fail("the VM is cooling down");
        }
        if v.last_move.as_ref().is_some_and(|l| l.done && l.from == m.to && l.ended_ms + policy.no_return_ms > now) {
            return fail("the VM would go back to the host it left");
        }
        for (name, set, what) in [(&m.from, &mut out, "sends"), (&m.to, &mut inc, "receives")] {
            let h = host(name).ok_or(format!("{name}: no such host"))?;
            if !h.up || h.drained || h.load_at_ms.is_none_or(|at| at + policy.stale_ms < now) {
                return fail(&format!("host {name} is down, drained or without fresh figures"));
            }
            if !set.insert(name) {
                return fail(&format!("host {name} {what} twice"));
            }
        }
        let dest = host(&m.to).ok_or("no destination")?;
        let used = mem.entry(&dest.name).or_default();
        *used += placement::cost(v.mem_mib);
        if *used > dest.mem_mib {
            return fail("the destination's memory would overflow");
        }
    }
    if let (Some(before), Some(after)) = (plan.spread, plan.spread_after)
        && !plan.moves.is_empty()
        && after >= before
    {
        return Err(format!("the plan does not lower the spread ({before:.3} → {after:.3})"));
    }
    Ok(())
}

/// The plan as text: the hosts' utilisation now and after, the moves, and what is held.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let pct = |u: Option<f64>| u.map_or("-".to_string(), |u| format!("{:.0} %", u * 100.0));
    let _ = writeln!(out, "{}", plan.why);
    for h in &plan.hosts {
        let _ = writeln!(
            out,
            "  host {:<12} load/capacity {:>7} → {:>7}{}",
            h.name,
            pct(h.utilisation),
            pct(h.after),
            h.note.as_ref().map(|n| format!("  ({n})")).unwrap_or_default()
        );
    }
    for m in &plan.moves {
        let _ = writeln!(
            out,
            "  move {} {} → {} ({:.0} m CPU): spread {:.3} → {:.3}, cost {:.3} (about {:.2} s, pause {:.1} ms)",
            m.vm,
            m.from,
            m.to,
            m.demand_millis,
            m.spread_before,
            m.spread_after,
            m.cost,
            m.expected_s,
            m.expected_pause_ms
        );
    }
    for (vm, why) in &plan.held {
        let _ = writeln!(out, "  held {vm}: {why}");
    }
    out
}
