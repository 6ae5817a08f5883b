// SPDX-License-Identifier: Apache-2.0
//! Load information: every second (`--load-every`) the agent measures each of its VMs (CPU of
//! the VMM process and of its vCPU threads, what its vCPUs asked for — running plus waiting to
//! run, so a VM starved by its host's quota shows its real demand —, resident memory) and
//! itself, smooths the figures (moving averages over about 10 s and 60 s, seeded by the first
//! period), and publishes them for the whole host in one record under its lease, so that
//! figures of a dead agent vanish with it, stamped with the time they were taken, so that a
//! reader can ignore stale ones. One put per host per period keeps the store's load independent
//! of the number of VMs. The balancer (`balance/`) plans from these.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::agent::Agent;
use crate::keys;
use crate::model::{Ema, HostLoad, VmLoad, now_ms};
use crate::procfs;
use crate::store::Store;
use crate::view::json;

/// The previous sample of one process.
struct Sample {
    at: Instant,
    ticks: u64,
    vcpu_ticks: u64,
    /// vCPU threads' ns running plus ns waiting to run.
    vcpu_demand_ns: u64,
}

/// One VMM's figures between periods.
struct VmState {
    sample: Sample,
    load: VmLoad,
    /// A full period has been measured (its first one seeds the averages).
    measured: bool,
}

/// Smoothed figures carried from one period to the next.
#[derive(Default)]
struct State {
    vms: BTreeMap<(String, u64), VmState>,
    agent: Option<(Sample, Ema)>,
    host: Ema,
    demand: Ema,
    throttled: Ema,
    periods: Option<(u64, u64)>,
    first: bool,
}

/// Publishes the host's load until cancelled.
pub async fn publish<S: Store>(agent: Arc<Agent<S>>) {
    let mut cancel = agent.cancel.clone();
    let mut state = State { first: true, ..Default::default() };
    let cgroup = procfs::own_cpu_cgroup();
    loop {
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => return,
            _ = tokio::time::sleep(agent.cfg.load_every) => {}
        }
        let load = measure(&agent, &mut state, cgroup.as_deref());
        let Some(lease) = agent.live_lease() else { continue };
        if let Err(e) = agent.store.put(&keys::load(agent.me()), json(&load), lease.id()).await {
            tracing::debug!(error = %e, "cannot publish the load");
        }
    }
}

fn millis(ticks: u64, dt_s: f64) -> f64 {
    if dt_s <= 0.0 { 0.0 } else { ticks as f64 / procfs::ticks_per_s() / dt_s * 1000.0 }
}

fn measure<S: Store>(agent: &Agent<S>, state: &mut State, cgroup: Option<&std::path::Path>) -> HostLoad {
    let now = Instant::now();
    let mut vms = BTreeMap::new();
    let mut total = 0.0;
    let mut seen = Vec::new();
    let mut demand = 0.0;
    for l in agent.locals() {
        if !agent.runner.alive(&l) {
            continue;
        }
        let (Some(ticks), Some(vcpu), Some((run_ns, wait_ns))) =
            (procfs::cpu_ticks(l.pid), procfs::vcpu_ticks(l.pid), procfs::vcpu_sched_ns(l.pid))
        else {
            continue;
        };
        let sample = Sample { at: now, ticks, vcpu_ticks: vcpu, vcpu_demand_ns: run_ns + wait_ns };
        let key = (l.vm.clone(), l.epoch);
        let Some(prev) = state.vms.remove(&key) else {
            // A VMM seen for the first time: nothing to compare with yet, so nothing published
            // (a figure of 0 would be wrong, not unknown).
            seen.push((key, VmState { sample, load: VmLoad::default(), measured: false }));
            continue;
        };
        let mut load = prev.load;
        let dt = now.duration_since(prev.sample.at).as_secs_f64();
        let first = !prev.measured;
        load.cpu_millis.update(millis(ticks.saturating_sub(prev.sample.ticks), dt), dt, first);
        load.vcpu_millis.update(millis(vcpu.saturating_sub(prev.sample.vcpu_ticks), dt), dt, first);
        let asked_ns = sample.vcpu_demand_ns.saturating_sub(prev.sample.vcpu_demand_ns);
        let asked = if dt <= 0.0 { 0.0 } else { asked_ns as f64 / 1e6 / dt };
        load.demand_millis.update(asked, dt, first);
        load.rss_mib = procfs::rss_kib(l.pid).unwrap_or(0) as f64 / 1024.0;
        total += load.cpu_millis.now;
        demand += load.demand_millis.now;
        vms.insert(l.vm.clone(), load.clone());
        seen.push((key, VmState { sample, load, measured: true }));
    }
    // VMMs gone since the last period are dropped with it.
    state.vms = seen.into_iter().collect();

    let me = std::process::id();
    let mut agent_cpu = state.agent.as_ref().map(|(_, e)| *e).unwrap_or_default();
    if let Some(ticks) = procfs::cpu_ticks(me) {
        if let Some((prev, _)) = &state.agent {
            let dt = now.duration_since(prev.at).as_secs_f64();
            agent_cpu.update(millis(ticks.saturating_sub(prev.ticks), dt), dt, false);
        }
        state.agent = Some((Sample { at: now, ticks, vcpu_ticks: 0, vcpu_demand_ns: 0 }, agent_cpu));
    }
    total += agent_cpu.now;
    let dt = agent.cfg.load_every.as_secs_f64();
    state.host.update(total, dt, state.first);
    // What the host is asked for: its VMs' demand and the agent's own use.
    state.demand.update(demand + agent_cpu.now, dt, state.first);
    if let Some((periods, throttled)) = cgroup.and_then(procfs::throttling) {
        if let Some((p0, t0)) = state.periods {
            let dp = periods.saturating_sub(p0);
            let share = if dp == 0 { 0.0 } else { throttled.saturating_sub(t0) as f64 / dp as f64 };
            state.throttled.update(share, dt, state.first);
        }
        state.periods = Some((periods, throttled));
    }
    state.first = false;
    HostLoad {
        host: agent.me().to_string(),
        at_ms: now_ms(),
        capacity: agent.cfg.capacity,
        cpu_millis: state.host,
        throttled: state.throttled,
        demand_millis: state.demand,
        every_s: dt,
        agent_cpu_millis: agent_cpu,
        agent_rss_mib: procfs::rss_kib(me).unwrap_or(0) as f64 / 1024.0,
        vms,
    }
}
