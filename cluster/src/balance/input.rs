// SPDX-License-Identifier: Apache-2.0
//! The planner's input from a cluster view: hosts with their capacity, memory placed and load
//! figures (with the time they were taken, so stale ones can be ignored), VMs with their owner,
//! demand, memory, dirty rate when a migration measured it, and their moves. Pure: the time
//! is given.

use super::{BalanceInput, HostIn, InFlight, LastMove, VmIn};
use crate::model::{Desired, MovePhase, VmPhase};
use crate::placement;
use crate::view::ClusterView;

const PAGE: f64 = 4096.0;
const MIB: f64 = 1024.0 * 1024.0;

/// The input for a plan made at `now_ms` on `view`, `active` carried from the previous plan.
pub fn from_view(view: &ClusterView, now_ms: u64, active: bool) -> BalanceInput {
    let table = placement::hosts(view);
    let hosts = table
        .iter()
        .map(|h| {
            let load = view.loads.get(&h.name).map(|l| &l.value);
            let last_move_end_ms = view
                .moves
                .values()
                .map(|m| &m.value)
                .filter(|m| m.from == h.name || m.to == h.name)
                .filter_map(|m| m.times.ended_ms)
                .max();
            HostIn {
                name: h.name.clone(),
                up: h.up,
                drained: h.drained,
                cpu_millis: h.cpu_millis,
                mem_mib: h.mem_mib,
                used_mem_mib: h.used_mem_mib,
                load_at_ms: load.map(|l| l.at_ms),
                base_millis: load.map(|l| l.agent_cpu_millis.ema_10s),
                last_move_end_ms,
            }
        })
        .collect();
    let vms = view
        .vms
        .values()
        .map(|v| &v.value)
        .filter(|v| v.desired == Desired::Running)
        .map(|v| {
            let status = view.status.get(&v.name).map(|s| &s.value);
            let running =
                status.is_some_and(|s| s.host == v.owner && s.epoch == v.epoch && s.phase == VmPhase::Running);
            let load = view.loads.get(&v.owner).and_then(|l| l.value.vms.get(&v.name));
            let last = view.moves.get(&v.name).map(|m| &m.value);
            VmIn {
                name: v.name.clone(),
                host: v.owner.clone(),
                mem_mib: v.spec.mem_mib,
                vcpus: v.spec.vcpus,
                running,
                // A VM cannot ask for more than its vCPUs.
                demand_millis: load.map(|l| l.demand_millis.ema_10s.min(f64::from(v.spec.vcpus) * 1000.0)),
                rss_mib: load.map(|l| l.rss_mib),
                dirty_mib_s: last.and_then(|m| m.times.dirty_pages_s).map(|p| p as f64 * PAGE / MIB),
                in_flight: view
                    .move_in_flight(&v.name)
                    .map(|m| InFlight { from: m.value.from.clone(), to: m.value.to.clone() }),
                last_move: last.filter(|m| m.phase.is_final()).and_then(|m| {
                    Some(LastMove {
                        from: m.from.clone(),
                        to: m.to.clone(),
                        ended_ms: m.times.ended_ms?,
                        done: m.phase == MovePhase::Done,
                    })
                }),
            }
        })
        .collect();
    BalanceInput { now_ms, active, hosts, vms }
}
