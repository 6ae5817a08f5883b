// SPDX-License-Identifier: Apache-2.0
//! The planner on made-up tables and on snapshots recorded from a running cluster
//! (`snapshots/*.json`: the input `vmm balancer --dry-run --once --json` printed), and a
//! simulation that carries plans out round after round until the balancer stops.

use super::*;

const NOW: u64 = 1_000_000_000;

fn host(name: &str, cpu: u64) -> HostIn {
    HostIn {
        name: name.into(),
        up: true,
        drained: false,
        cpu_millis: cpu,
        mem_mib: 2048,
        used_mem_mib: 0,
        load_at_ms: Some(NOW - 500),
        base_millis: Some(10.0),
        last_move_end_ms: None,
    }
}

fn vm(name: &str, host: &str, demand: f64) -> VmIn {
    VmIn {
        name: name.into(),
        host: host.into(),
        mem_mib: 64,
        vcpus: 1,
        running: true,
        demand_millis: Some(demand),
        rss_mib: Some(20.0),
        dirty_mib_s: None,
        in_flight: None,
        last_move: None,
    }
}

/// Hosts `names` of `cpu` each, and VMs (name, host, demand), with memory accounted.
fn cluster(names: &[&str], cpu: u64, vms: &[(&str, &str, f64)]) -> BalanceInput {
    let mut input = BalanceInput {
        now_ms: NOW,
        active: false,
        hosts: names.iter().map(|n| host(n, cpu)).collect(),
        vms: vms.iter().map(|(n, h, d)| vm(n, h, *d)).collect(),
    };
    recount_memory(&mut input);
    input
}

fn recount_memory(input: &mut BalanceInput) {
    for h in &mut input.hosts {
        h.used_mem_mib = input
            .vms
            .iter()
            .filter(|v| v.host == h.name || v.in_flight.as_ref().is_some_and(|m| m.to == h.name))
            .map(|v| placement::cost(v.mem_mib))
            .sum();
    }
}

fn plan_checked(input: &BalanceInput, policy: &Policy) -> Plan {
    let p = plan(input, policy);
    if let Err(e) = check(input, policy, &p) {
        panic!("a plan broke the rules: {e}\n{}", render(&p));
    }
    p
}

fn count(input: &BalanceInput, host: &str) -> usize {
    input.vms.iter().filter(|v| v.host == host).count()
}

/// Carries plans out (each move ends a second after it was planned) until a plan has no move
/// and no host is settling, for at most `rounds` rounds of `every_ms`; returns every move made.
fn settle(input: &mut BalanceInput, policy: &Policy, every_ms: u64, rounds: usize) -> Vec<PlannedMove> {
    let mut all = Vec::new();
    let mut quiet = 0;
    for _ in 0..rounds {
        let p = plan_checked(input, policy);
        input.active = p.active;
        if p.moves.is_empty() {
            quiet += 1;
            // Quiet for longer than any settling or cooldown: done.
            if quiet as u64 * every_ms > policy.cooldown_ms + policy.settle_ms {
                break;
            }
        } else {
            quiet = 0;
        }
        let ended = input.now_ms + 1000;
        for m in &p.moves {
            let v = input.vms.iter_mut().find(|v| v.name == m.vm).unwrap();
            v.host = m.to.clone();
            v.last_move = Some(LastMove { from: m.from.clone(), to: m.to.clone(), ended_ms: ended, done: true });
            for h in input.hosts.iter_mut().filter(|h| h.name == m.from || h.name == m.to) {
                h.last_move_end_ms = Some(ended);
            }
        }
        all.extend(p.moves);
        input.now_ms += every_ms;
        for h in &mut input.hosts {
            h.load_at_ms = Some(input.now_ms - 500);
        }
        recount_memory(input);
    }
    all
}

#[test]
fn a_balanced_cluster_is_left_alone() {
    let input = cluster(&["a", "b", "c"], 600, &[("v0", "a", 500.0), ("v1", "b", 520.0), ("v2", "c", 480.0)]);
    let p = plan_checked(&input, &Policy::default());
    assert!(p.moves.is_empty() && !p.active, "{}", render(&p));
    assert!(p.why.contains("within the start threshold"), "{}", p.why);
    assert!(p.spread.unwrap() < 0.05);
}

#[test]
fn twelve_jobs_on_one_host_spread_to_four_each_without_moving_any_twice() {
    let vms: Vec<(String, &str, f64)> = (0..12).map(|i| (format!("job{i:02}"), "a", 1000.0)).collect();
    let vms: Vec<(&str, &str, f64)> = vms.iter().map(|(n, h, d)| (n.as_str(), *h, *d)).collect();
    let mut input = cluster(&["a", "b", "c"], 600, &vms);
    let policy = Policy::default();
    let first = plan_checked(&input, &policy);
    // One outgoing migration per host at a time: the first plan moves one VM off a.
    assert_eq!(first.moves.len(), 1, "{}", render(&first));
    assert!(first.spread.unwrap() > 1.0, "{}", render(&first));
    let moves = settle(&mut input, &policy, 2000, 200);
    assert_eq!((count(&input, "a"), count(&input, "b"), count(&input, "c")), (4, 4, 4), "{moves:?}");
    assert_eq!(moves.len(), 8, "the fewest moves that even it out: {moves:?}");
    let mut names: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), moves.len(), "a VM moved twice: {moves:?}");
}

#[test]
fn equal_vms_end_within_one_of_each_other_from_any_start() {
    // The oracle: with equal VMs and capacities the best placement differs by at most one VM
    // between hosts. Start from many pseudo-random placements.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let hosts = ["a", "b", "c", "d"];
    for case in 0..100 {
        let n = 2 + (next() % 14) as usize;
        let names: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
        let vms: Vec<(&str, &str, f64)> =
            names.iter().map(|name| (name.as_str(), hosts[(next() % 4) as usize], 800.0)).collect();
        let mut input = cluster(&hosts, 1000, &vms);
        let moves = settle(&mut input, &Policy::default(), 2000, 400);
        let counts: Vec<usize> = hosts.iter().map(|h| count(&input, h)).collect();
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // Spread thresholds allow a difference of one VM, or two when the total is large.
        assert!(hi - lo <= 1 || (hi - lo == 2 && n >= 12), "case {case}: {counts:?} after {moves:?}");
        let mut names: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "case {case}: a VM moved twice: {moves:?}");
    }
}

#[test]
fn hysteresis_starts_above_one_threshold_and_stops_below_another() {
    let policy = Policy { start_spread: 0.3, stop_spread: 0.1, min_gain: 0.01, ..Policy::default() };
    // Utilisations 0.6 and 0.2: σ = 0.2, between the thresholds.
    let mut input = cluster(&["a", "b"], 1000, &[("v0", "a", 300.0), ("v1", "a", 300.0), ("v2", "b", 200.0)]);
    for h in &mut input.hosts {
        h.base_millis = Some(0.0);
    }
    let idle = plan_checked(&input, &policy);
    assert!(idle.moves.is_empty() && !idle.active, "{}", render(&idle));
    input.active = true;
    let busy = plan_checked(&input, &policy);
    assert!(busy.active, "{}", render(&busy));
    assert_eq!(busy.moves.len(), 1, "{}", render(&busy));
    assert_eq!(busy.moves[0].from, "a");
}

#[test]
fn drained_down_and_stale_hosts_are_left_out() {
    let mut input =
        cluster(&["a", "b", "c", "d"], 600, &[("v0", "a", 1000.0), ("v1", "a", 1000.0), ("v2", "a", 1000.0)]);
    input.hosts[1].drained = true;
    input.hosts[2].up = false;
    input.hosts[3].load_at_ms = Some(NOW - 60_000);
    let p = plan_checked(&input, &Policy::default());
    assert!(p.moves.is_empty(), "{}", render(&p));
    assert!(p.why.contains("1 host(s) can be balanced"), "{}", p.why);
    let notes: Vec<Option<&str>> = p.hosts.iter().map(|h| h.note.as_deref()).collect();
    assert_eq!(notes, [None, Some("drained"), Some("down"), Some("load figures 60 s old")]);
    // With d fresh again, the moves go to d only.
    input.hosts[3].load_at_ms = Some(NOW);
    let p = plan_checked(&input, &Policy::default());
    assert_eq!(p.moves.len(), 1, "{}", render(&p));
    assert_eq!(p.moves[0].to, "d");
}

#[test]
fn memory_must_fit() {
    let mut input = cluster(&["a", "b", "c"], 600, &[("v0", "a", 1000.0), ("v1", "a", 1000.0), ("big", "b", 10.0)]);
    input.vms[2].mem_mib = 2000;
    recount_memory(&mut input);
    let p = plan_checked(&input, &Policy::default());
    assert_eq!(p.moves.len(), 1, "{}", render(&p));
    assert_eq!(p.moves[0].to, "c", "b is full: {}", render(&p));
    input.hosts[2].mem_mib = 70;
    let p = plan_checked(&input, &Policy::default());
    assert!(p.moves.is_empty(), "{}", render(&p));
}

#[test]
fn one_migration_out_and_one_in_per_host_counting_those_in_flight() {
    let mut input = cluster(
        &["a", "b", "c", "d"],
        600,
        &[
            ("v0", "a", 1000.0),
            ("v1", "a", 1000.0),
            ("v2", "a", 1000.0),
            ("w0", "b", 1000.0),
            ("w1", "b", 1000.0),
            ("w2", "b", 1000.0),
        ],
    );
    let p = plan_checked(&input, &Policy::default());
    assert_eq!(p.moves.len(), 2, "a → one of c, d and b → the other: {}", render(&p));
    let mut to: Vec<&str> = p.moves.iter().map(|m| m.to.as_str()).collect();
    to.sort();
    assert_eq!(to, ["c", "d"]);
    // a is sending already: only b sends.
    input.vms[0].in_flight = Some(InFlight { from: "a".into(), to: "c".into() });
    recount_memory(&mut input);
    let p = plan_checked(&input, &Policy::default());
    assert_eq!(p.moves.len(), 1, "{}", render(&p));
    assert_eq!((p.moves[0].from.as_str(), p.moves[0].to.as_str()), ("b", "d"), "{}", render(&p));
    assert!(p.held.iter().any(|(v, why)| v == "v0" && why == "moving"), "{:?}", p.held);
}

#[test]
fn a_move_must_gain_more_than_it_costs() {
    // A small imbalance: moving the only VM of a to b gains little.
    let mut input = cluster(&["a", "b"], 1000, &[("v0", "a", 300.0), ("v1", "b", 100.0)]);
    input.active = true;
    let cheap = plan_checked(&input, &Policy::default());
    assert_eq!(cheap.moves.len(), 0, "moving v0 only swaps the imbalance: {}", render(&cheap));
    // Two VMs on a: moving one evens it out, unless copying it takes too long.
    let mut input = cluster(&["a", "b"], 1000, &[("v0", "a", 300.0), ("v1", "a", 300.0)]);
    let p = plan_checked(&input, &Policy::default());
    assert_eq!(p.moves.len(), 1, "{}", render(&p));
    assert!(p.moves[0].cost > 0.0 && p.moves[0].expected_s > 0.0);
    for v in &mut input.vms {
        v.mem_mib = 1_000_000;
        v.rss_mib = Some(1_000_000.0);
    }
    for h in &mut input.hosts {
        h.mem_mib = 10_000_000;
    }
    let p = plan_checked(&input, &Policy::default());
    assert!(p.moves.is_empty(), "a terabyte for a spread of 0.3: {}", render(&p));
    // A VM dirtying memory near the copy rate is held.
    let mut input = cluster(&["a", "b"], 1000, &[("v0", "a", 300.0), ("v1", "a", 300.0)]);
    for v in &mut input.vms {
        v.dirty_mib_s = Some(350.0);
    }
    let p = plan_checked(&input, &Policy::default());
    assert!(p.moves.is_empty(), "{}", render(&p));
    assert!(p.held.iter().all(|(_, why)| why.contains("converge")), "{:?}", p.held);
}

#[test]
fn cooldown_settling_and_no_return() {
    let policy = Policy::default();
    let mut input = cluster(&["a", "b"], 1000, &[("v0", "a", 600.0), ("v1", "a", 600.0), ("v2", "a", 600.0)]);
    for v in &mut input.vms {
        v.last_move = Some(LastMove { from: "b".into(), to: "a".into(), ended_ms: NOW - 10_000, done: true });
    }
    let p = plan_checked(&input, &policy);
    assert!(p.moves.is_empty(), "{}", render(&p));
    assert!(p.held.iter().all(|(_, why)| why.starts_with("cooling down (moved 10 s ago)")), "{:?}", p.held);
    // Cooled down but not past the no-return time: b is where they came from.
    input.now_ms = NOW + policy.cooldown_ms;
    for h in &mut input.hosts {
        h.load_at_ms = Some(input.now_ms);
    }
    let p = plan_checked(&input, &policy);
    assert!(p.moves.is_empty(), "{}", render(&p));
    // A host that ended a move a moment ago is settling.
    input.vms[0].last_move = None;
    input.hosts[1].last_move_end_ms = Some(input.now_ms - 1000);
    let p = plan_checked(&input, &policy);
    assert!(p.moves.is_empty(), "{}", render(&p));
    assert_eq!(p.hosts[1].note.as_deref(), Some("settling after a move"));
    input.hosts[1].last_move_end_ms = None;
    let p = plan_checked(&input, &policy);
    assert_eq!(p.moves.len(), 1, "{}", render(&p));
    assert_eq!(p.moves[0].vm, "v0");
}

#[test]
fn steady_noise_makes_no_moves() {
    // Three hosts, two VMs each, demand wobbling ±10 % every round for 10 minutes.
    let mut input = cluster(
        &["a", "b", "c"],
        1000,
        &[
            ("v0", "a", 400.0),
            ("v1", "a", 400.0),
            ("v2", "b", 400.0),
            ("v3", "b", 400.0),
            ("v4", "c", 400.0),
            ("v5", "c", 400.0),
        ],
    );
    let mut seed = 7u64;
    for round in 0..300 {
        for v in &mut input.vms {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let wobble = ((seed >> 33) % 81) as f64 - 40.0;
            v.demand_millis = Some(400.0 + wobble);
        }
        let p = plan_checked(&input, &Policy::default());
        assert!(p.moves.is_empty(), "round {round}: {}", render(&p));
        input.active = p.active;
        input.now_ms += 2000;
        for h in &mut input.hosts {
            h.load_at_ms = Some(input.now_ms);
        }
    }
}

/// The benchmark's skew case (`vmm-bench --cluster-cases skew`): three guests asking for a
/// quarter of a host each on a, one on b, one on c. Its loads are chosen so that one move
/// balances it under the start threshold, and the move is worth it, even with every guest's
/// measured demand 10 % below or 25 % above what it asks for (a busy machine makes guests wait
/// to run, which counts as demand). At 15 % below the move is no longer worth its cost.
#[test]
fn one_host_at_three_times_the_others_load_is_balanced_by_one_move() {
    for scale in [0.9, 1.0, 1.25] {
        let d = 100.0 * scale;
        let mut input = cluster(
            &["a", "b", "c"],
            400,
            &[("v0", "a", d), ("v1", "a", d), ("v2", "a", d), ("v3", "b", d), ("v4", "c", d)],
        );
        let policy = Policy::default();
        let first = plan_checked(&input, &policy);
        assert!(first.spread.unwrap() > policy.start_spread, "{}", render(&first));
        let moves = settle(&mut input, &policy, 1000, 200);
        assert_eq!(moves.len(), 1, "demand {d}: {moves:?}");
        let last = plan_checked(&input, &policy);
        assert!(last.spread.unwrap() < policy.start_spread, "demand {d}: {}", render(&last));
    }
}

#[test]
fn unknown_figures_and_vms_not_running_stay() {
    let mut input = cluster(&["a", "b"], 1000, &[("v0", "a", 900.0), ("v1", "a", 900.0), ("v2", "a", 900.0)]);
    input.vms[0].running = false;
    input.vms[1].demand_millis = None;
    let p = plan_checked(&input, &Policy::default());
    assert_eq!(p.moves.len(), 1, "{}", render(&p));
    assert_eq!(p.moves[0].vm, "v2");
    assert_eq!(
        p.held,
        [("v0".to_string(), "not running".to_string()), ("v1".to_string(), "no load figures yet".to_string())]
    );
}

#[test]
fn check_refuses_plans_that_break_the_rules() {
    let input = cluster(&["a", "b", "c"], 600, &[("v0", "a", 1000.0), ("v1", "a", 1000.0)]);
    let policy = Policy::default();
    let good = plan_checked(&input, &policy);
    let mv = good.moves[0].clone();
    let with = |moves: Vec<PlannedMove>| Plan { moves, ..good.clone() };
    let bad = [
        (vec![mv.clone(), PlannedMove { vm: "v1".into(), ..mv.clone() }], "sends twice"),
        (vec![mv.clone(), mv.clone()], "moves twice"),
        (vec![PlannedMove { from: "b".into(), ..mv.clone() }], "not on the source"),
        (vec![PlannedMove { to: "a".into(), ..mv.clone() }], "one host"),
        (vec![PlannedMove { to: "zz".into(), ..mv.clone() }], "no such host"),
    ];
    for (moves, want) in bad {
        let e = check(&input, &policy, &with(moves)).unwrap_err();
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    let mut drained = input.clone();
    drained.hosts.iter_mut().for_each(|h| h.drained = h.name == mv.to);
    assert!(check(&drained, &policy, &good).unwrap_err().contains("drained"));
}

/// Snapshots recorded from the cluster test bed (`vmm balancer --dry-run --once --json`).
fn snapshot(name: &str) -> BalanceInput {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/balance/snapshots").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["input"].clone()).unwrap()
}

#[test]
fn recorded_snapshots() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/balance/snapshots");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let input = snapshot(&name);
        let p = plan_checked(&input, &Policy::default());
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // What the file says the plan should be: its moves (vm → to), as the planner made them
        // when it was recorded, checked by hand.
        let want: Vec<(String, String)> = serde_json::from_value(v["expect_moves"].clone()).unwrap();
        let got: Vec<(String, String)> = p.moves.iter().map(|m| (m.vm.clone(), m.to.clone())).collect();
        assert_eq!(got, want, "{name}:\n{}", render(&p));
        seen += 1;
    }
    assert!(seen > 0, "no snapshots in {}", dir.display());
}
