// SPDX-License-Identifier: Apache-2.0
//! Placement: which host a VM goes to. Pure functions of a table of hosts, no I/O and no clock,
//! so that they can be checked against a deliberately naive oracle on many tables (see the
//! tests) and re-checked after planning ([`check`]).
//!
//! Memory is the hard constraint: a host takes a VM only if the guest memory of the VMs it owns
//! or receives, plus a fixed overhead per VMM, stays within its capacity. Among the hosts that
//! fit, the one with the most free capacity wins: the largest of min(free memory share, free
//! CPU share), CPU measured (the 10 s average of its load), since vCPUs are not reserved.
//! Ties go to the host with fewer VMs, then to the first name.

use crate::model::VmRecord;
use crate::view::ClusterView;

/// Host memory a VM costs besides its guest memory: the VMM's own (about 4 MiB) and slack.
pub const VMM_OVERHEAD_MIB: u64 = 8;

/// What placement knows of a host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostState {
    pub name: String,
    pub up: bool,
    pub drained: bool,
    pub mem_mib: u64,
    pub cpu_millis: u64,
    /// Memory taken by the VMs it owns and the VMs moving to it (with their overhead).
    pub used_mem_mib: u64,
    /// Measured CPU use, thousandths of a CPU.
    pub cpu_load_millis: f64,
    pub vms: usize,
}

impl HostState {
    fn fits(&self, mem_mib: u64) -> bool {
        self.used_mem_mib.saturating_add(cost(mem_mib)) <= self.mem_mib
    }

    fn free_mem_mib(&self) -> u64 {
        self.mem_mib.saturating_sub(self.used_mem_mib)
    }

    /// How free it would be with `mem_mib` more: min of the free memory and CPU shares.
    fn score(&self, mem_mib: u64) -> f64 {
        let mem = self.mem_mib.saturating_sub(self.used_mem_mib + cost(mem_mib)) as f64 / self.mem_mib.max(1) as f64;
        let cpu = (self.cpu_millis as f64 - self.cpu_load_millis).max(0.0) / self.cpu_millis.max(1) as f64;
        mem.min(cpu)
    }

    fn schedulable(&self) -> bool {
        self.up && !self.drained
    }
}

/// Memory a VM of `mem_mib` costs its host.
pub fn cost(mem_mib: u64) -> u64 {
    mem_mib.saturating_add(VMM_OVERHEAD_MIB)
}

/// Why a VM cannot go where asked, or anywhere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no host named {0:?} is known to the cluster")]
    UnknownHost(String),
    #[error("host {0} is down (no live agent)")]
    HostDown(String),
    #[error("host {0} is drained (unschedulable); `vmm host undrain {0}` first")]
    Drained(String),
    #[error("host {host} has no room for {need_mib} MiB ({free_mib} MiB free of {capacity_mib} MiB)")]
    NoRoomOn { host: String, need_mib: u64, free_mib: u64, capacity_mib: u64 },
    #[error("no host has room for {need_mib} MiB{}", .best.as_ref().map(|(h, f)| format!(" (most free: {h} with {f} MiB)")).unwrap_or_default())]
    NoRoom { need_mib: u64, best: Option<(String, u64)> },
    #[error("no host is up and schedulable")]
    NoHosts,
}

/// The table of hosts as placement sees them in `view`: every known host; the memory of a VM
/// with a move in flight counts on both ends until the move ends.
pub fn hosts(view: &ClusterView) -> Vec<HostState> {
    view.host_names()
        .into_iter()
        .map(|name| {
            let rec = view.hosts.get(&name).map(|h| &h.value);
            let load = view.loads.get(&name).map(|l| &l.value);
            let owned: Vec<&VmRecord> = view.vms_on(&name).map(|v| &v.value).collect();
            let incoming: Vec<&VmRecord> = view
                .moves
                .values()
                .filter(|m| !m.value.phase.is_final() && m.value.to == name)
                .filter_map(|m| view.vms.get(&m.value.vm).map(|v| &v.value))
                .filter(|v| v.owner != name)
                .collect();
            let used = owned.iter().chain(&incoming).map(|v| cost(v.spec.mem_mib)).sum();
            HostState {
                up: rec.is_some(),
                drained: view.is_drained(&name),
                mem_mib: rec.map_or(0, |h| h.capacity.mem_mib),
                cpu_millis: rec.map_or(0, |h| h.capacity.cpu_millis),
                used_mem_mib: used,
                cpu_load_millis: load.map_or(0.0, |l| l.cpu_millis.ema_10s),
                vms: owned.len() + incoming.len(),
                name,
            }
        })
        .collect()
}

/// Whether `host` can take a VM of `mem_mib` now.
pub fn check_target(hosts: &[HostState], host: &str, mem_mib: u64) -> Result<(), PlacementError> {
    let h = hosts.iter().find(|h| h.name == host).ok_or_else(|| PlacementError::UnknownHost(host.to_string()))?;
    if !h.up {
        return Err(PlacementError::HostDown(host.to_string()));
    }
    if h.drained {
        return Err(PlacementError::Drained(host.to_string()));
    }
    if !h.fits(mem_mib) {
        return Err(PlacementError::NoRoomOn {
            host: host.to_string(),
            need_mib: cost(mem_mib),
            free_mib: h.free_mem_mib(),
            capacity_mib: h.mem_mib,
        });
    }
    Ok(())
}

/// The host a VM of `mem_mib` should go to, among those not in `exclude`.
pub fn place(hosts: &[HostState], mem_mib: u64, exclude: &[&str]) -> Result<String, PlacementError> {
    let candidates: Vec<&HostState> =
        hosts.iter().filter(|h| h.schedulable() && !exclude.contains(&h.name.as_str())).collect();
    if candidates.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    let best = candidates.iter().filter(|h| h.fits(mem_mib)).max_by(|a, b| {
        a.score(mem_mib)
            .total_cmp(&b.score(mem_mib))
            .then(b.vms.cmp(&a.vms))
            // max_by keeps the last of equals: reverse the name order so the first name wins.
            .then(b.name.cmp(&a.name))
    });
    match best {
        Some(h) => Ok(h.name.clone()),
        None => {
            let most = candidates.iter().max_by_key(|h| (h.free_mem_mib(), std::cmp::Reverse(h.name.clone())));
            Err(PlacementError::NoRoom {
                need_mib: cost(mem_mib),
                best: most.map(|h| (h.name.clone(), h.free_mem_mib())),
            })
        }
    }
}

/// Plans moving every VM in `vms` (name, guest MiB) off `from`: each to the best host given the
/// ones planned before it, largest VMs first (they are the hardest to fit). Returns the moves
/// in the order to make them.
pub fn plan_drain(
    hosts: &[HostState],
    from: &str,
    vms: &[(String, u64)],
) -> Result<Vec<(String, String)>, PlacementError> {
    let mut table: Vec<HostState> = hosts.to_vec();
    let mut order: Vec<&(String, u64)> = vms.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut plan = Vec::new();
    for (vm, mem) in order {
        let to = place(&table, *mem, &[from])?;
        if let Some(h) = table.iter_mut().find(|h| h.name == to) {
            h.used_mem_mib += cost(*mem);
            h.vms += 1;
        }
        plan.push((vm.clone(), to));
    }
    Ok(plan)
}

/// Re-checks a plan against the table it was made from: every target is up, schedulable, not
/// the source, and no host ends over its memory.
pub fn check(hosts: &[HostState], from: &str, vms: &[(String, u64)], plan: &[(String, String)]) -> Result<(), String> {
    let mut used: Vec<(String, u64, u64)> = hosts.iter().map(|h| (h.name.clone(), h.used_mem_mib, h.mem_mib)).collect();
    if plan.len() != vms.len() {
        return Err(format!("{} moves planned for {} VMs", plan.len(), vms.len()));
    }
    for (vm, to) in plan {
        let mem = vms.iter().find(|(n, _)| n == vm).ok_or_else(|| format!("{vm} is not a VM to move"))?.1;
        let h = hosts.iter().find(|h| &h.name == to).ok_or_else(|| format!("{to} is not a host"))?;
        if to == from || !h.schedulable() {
            return Err(format!("{vm} planned onto {to}, which cannot take it"));
        }
        let u = used.iter_mut().find(|u| &u.0 == to).ok_or_else(|| format!("{to} is not a host"))?;
        u.1 += cost(mem);
        if u.1 > u.2 {
            return Err(format!("{to} would hold {} MiB of {} MiB", u.1, u.2));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, mem: u64, used: u64, load: f64) -> HostState {
        HostState {
            name: name.into(),
            up: true,
            drained: false,
            mem_mib: mem,
            cpu_millis: 1000,
            used_mem_mib: used,
            cpu_load_millis: load,
            vms: (used / 72) as usize,
        }
    }

    #[test]
    fn the_freest_host_that_fits_wins() {
        let hosts = [host("a", 1024, 512, 0.0), host("b", 1024, 128, 0.0), host("c", 256, 0, 0.0)];
        assert_eq!(place(&hosts, 64, &[]), Ok("b".into()));
        // c is the freest by share for a small VM, but cannot fit a big one.
        assert_eq!(place(&hosts, 512, &[]), Ok("b".into()));
        assert_eq!(place(&hosts, 64, &["b"]), Ok("c".into()));
        // A loaded CPU makes a host less free.
        let hosts = [host("a", 1024, 0, 900.0), host("b", 1024, 256, 0.0)];
        assert_eq!(place(&hosts, 64, &[]), Ok("b".into()));
    }

    #[test]
    fn nothing_fits_is_a_clear_error() {
        let hosts = [host("a", 256, 200, 0.0), host("b", 256, 100, 0.0)];
        let e = place(&hosts, 200, &[]).unwrap_err();
        assert_eq!(e, PlacementError::NoRoom { need_mib: 208, best: Some(("b".into(), 156)) });
        assert!(e.to_string().contains("no host has room for 208 MiB (most free: b with 156 MiB)"), "{e}");
        let mut down = host("a", 1024, 0, 0.0);
        down.up = false;
        let mut drained = host("b", 1024, 0, 0.0);
        drained.drained = true;
        assert_eq!(place(&[down.clone(), drained.clone()], 64, &[]), Err(PlacementError::NoHosts));
        assert_eq!(check_target(&[down], "a", 64), Err(PlacementError::HostDown("a".into())));
        assert_eq!(check_target(&[drained], "b", 64), Err(PlacementError::Drained("b".into())));
        assert_eq!(check_target(&hosts, "x", 64), Err(PlacementError::UnknownHost("x".into())));
        assert!(matches!(check_target(&hosts, "a", 64), Err(PlacementError::NoRoomOn { .. })));
        assert_eq!(check_target(&hosts, "b", 64), Ok(()));
    }

    #[test]
    fn ties_go_to_fewer_vms_then_the_first_name() {
        let hosts = [host("b", 1024, 0, 0.0), host("a", 1024, 0, 0.0)];
        assert_eq!(place(&hosts, 64, &[]), Ok("a".into()));
    }

    /// A deliberately naive oracle: try every host, compute its free share by hand.
    fn oracle(hosts: &[HostState], mem: u64, exclude: &[&str]) -> Option<String> {
        let mut best: Option<(f64, usize, String)> = None;
        for h in hosts {
            if !h.up || h.drained || exclude.contains(&h.name.as_str()) {
                continue;
            }
            if h.used_mem_mib + mem + VMM_OVERHEAD_MIB > h.mem_mib {
                continue;
            }
            let mem_share = (h.mem_mib - h.used_mem_mib - mem - VMM_OVERHEAD_MIB) as f64 / h.mem_mib as f64;
            let cpu_share = ((h.cpu_millis as f64 - h.cpu_load_millis).max(0.0)) / h.cpu_millis as f64;
            let s = if mem_share < cpu_share { mem_share } else { cpu_share };
            let better = match &best {
                None => true,
                Some((bs, bv, bn)) => s > *bs || (s == *bs && (h.vms < *bv || (h.vms == *bv && h.name < *bn))),
            };
            if better {
                best = Some((s, h.vms, h.name.clone()));
            }
        }
        best.map(|b| b.2)
    }

    #[test]
    fn placement_agrees_with_the_oracle_on_random_tables() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..5000 {
            let n = 1 + next(5) as usize;
            let hosts: Vec<HostState> = (0..n)
                .map(|i| {
                    let mem = 128 * (1 + next(8));
                    let mut h =
                        host(&format!("h{}", next(4) * 10 + i as u64), mem, next(mem + 1), (next(11) * 100) as f64);
                    h.up = next(6) != 0;
                    h.drained = next(6) == 0;
                    h.vms = next(4) as usize;
                    h
                })
                .collect();
            let mem = 16 * (1 + next(40));
            let exclude = if next(3) == 0 { vec![hosts[0].name.as_str()] } else { vec![] };
            assert_eq!(place(&hosts, mem, &exclude).ok(), oracle(&hosts, mem, &exclude), "{hosts:?} {mem}");
        }
    }

    #[test]
    fn a_drain_plan_fits_and_passes_its_check() {
        let hosts = [host("a", 1024, 600, 0.0), host("b", 512, 0, 0.0), host("c", 512, 200, 0.0)];
        let vms: Vec<(String, u64)> =
            [("v1", 256), ("v2", 64), ("v3", 200)].iter().map(|(n, m)| (n.to_string(), *m)).collect();
        let plan = plan_drain(&hosts, "a", &vms).unwrap();
        assert_eq!(plan.len(), 3);
        // Largest first.
        assert_eq!(plan[0].0, "v1");
        check(&hosts, "a", &vms, &plan).unwrap();
        assert!(plan.iter().all(|(_, to)| to != "a"));
        // Too much for the others: refused as a whole.
        let big: Vec<(String, u64)> = vec![("v".into(), 400), ("w".into(), 400)];
        assert!(matches!(plan_drain(&hosts, "a", &big), Err(PlacementError::NoRoom { .. })));
        // The check catches a bad plan.
        assert!(check(&hosts, "a", &vms, &[("v1".into(), "a".into())]).is_err());
        let over = vec![("v1".to_string(), "c".to_string()), ("v2".into(), "c".into()), ("v3".into(), "c".into())];
        assert!(check(&hosts, "a", &vms, &over).is_err());
    }
}
