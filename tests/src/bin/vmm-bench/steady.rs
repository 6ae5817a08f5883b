// SPDX-License-Identifier: Apache-2.0
//! The steadiness cases of the cluster section (`--cluster-cases steady,skew`): hosts a, b and
//! c with 0.4 CPU each, guests running `burn` (a vCPU busy a fixed share of every 100 ms: a
//! steady, known load), the balancer with its default policy (`vmm balancer --every 1`).
//!
//! - **steady**: two guests per host, each at 10 % of a vCPU: every host asked for about half
//!   its capacity, the cluster balanced. Once every guest's load is measured a
//!   balancer runs for `--steady-s` seconds (300 by default): the migrations it makes (target 0).
//! - **skew**: three guests on host a, one on b and one on c, each at 10 % of a vCPU: a asked
//!   for three times what b and c are (about 0.8 of its capacity against 0.27), no host
//!   overcommitted, once balanced not even close (a starved guest would read as a whole vCPU and
//!   make the measured demand noisy). One move (a → b) brings the spread from about 0.25 to
//!   about 0.12, under the default start threshold (0.15) and by more than the least gain a move
//!   must bring (0.1): the guests' load is chosen so that both hold with some room for noise. Once the imbalance shows in `vmm cluster status` a
//!   balancer starts: the time until the spread in its plan is under its start threshold with no
//!   move in flight, and the migrations made (targets: within 30 s, at most 5). A client streams
//!   to every guest's echo service throughout: lines lost, and the largest gap a moved guest's
//!   client saw.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use vmm_cluster::balance::Policy;
use vmm_cluster::cli::StatusReport;
use vmm_tests::cluster::{ClusterBed, ClusterOptions};
use vmm_tests::echo_stream::{EchoStream, StreamStats};

use crate::monitor::Monitor::Ours;
use crate::results::{Better, Results};

pub const STEADY: &str = "cluster: steadiness, balanced burn load";
pub const SKEW: &str = "cluster: steadiness, one host at 3× the others' load";
pub const STEADY_MOVES: &str = "migrations made by the balancer";
pub const LARGEST_SPREAD: &str = "largest spread in the balancer's plans";
pub const TO_BALANCED: &str = "balancer start → spread under the start threshold";
pub const SKEW_MOVES: &str = "migrations made until then";
pub const AFTER_MOVES: &str = "migrations in the 10 s after";
pub const LOST: &str = "echo lines lost (a client per guest)";
pub const MOVED_GAP: &str = "largest echo gap of a moved guest";

const HOSTS: [&str; 3] = ["a", "b", "c"];
/// Each host's CPU quota, thousandths of a CPU.
const CPU_MILLIS: u64 = 400;
/// Longest wait for the cluster to get somewhere (loads measured, balanced).
const WAIT: Duration = Duration::from_secs(180);

/// How the cases are sized.
pub struct Steadiness {
    /// How long the balancer watches the balanced cluster.
    pub steady: Duration,
    pub runs: usize,
}

fn cluster() -> ClusterBed {
    ClusterBed::start(&HOSTS, ClusterOptions { cpu_millis: Some(CPU_MILLIS), mem_mib: 1024, ..Default::default() })
}

/// Sum over the VMs of their epoch − 1: how many times owners changed.
pub fn owner_changes(s: &StatusReport) -> u64 {
    s.vms.iter().map(|v| v.epoch.saturating_sub(1)).sum()
}

/// Whether every VM runs and has load figures, so that the plan in the status counts them all.
fn measured(s: &StatusReport) -> bool {
    s.vms.iter().all(|v| v.state == "running" && v.cpu_millis.is_some())
        && s.balancer.as_ref().is_some_and(|b| b.plan.spread.is_some() && b.plan.held.is_empty())
}

/// Guest `i` on `host`, burning `duty` % of its vCPU, with a NIC and an address if `net`.
fn burner(c: &ClusterBed, i: u8, host: &str, duty: u8, net: bool) -> Result<(), String> {
    let ip = if net { c.bed.guest_ip_cmdline(i) } else { String::new() };
    let cmdline = format!("console=ttyS0 {ip} vmm.workload=burn vmm.duty={duty}");
    let mut extra = vec!["--host", host];
    if !net {
        extra.push("--no-net");
    }
    c.create_vm(&format!("burn{i}"), &cmdline, 64, &extra).map(drop)
}

/// Waits until `pred` holds for the status, or `WAIT` passed (the error shows the last status
/// and the balancer's log).
fn wait(c: &ClusterBed, what: &str, pred: impl Fn(&StatusReport) -> bool) -> Result<StatusReport, String> {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        match c.status() {
            Some(s) if pred(&s) => return Ok(s),
            Some(s) => last = Some(s),
            None => {}
        }
        if Instant::now() > deadline {
            let log = c.balancer_log("bench");
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            return Err(format!(
                "gave up after {} s waiting for {what}; the last status:\n{}\nthe balancer's last lines:\n{}",
                WAIT.as_secs(),
                last.map(|s| vmm_cluster::cli::render_status(&s)).unwrap_or_default(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The steady case, once: migrations the balancer made, and the largest spread in its plans
/// (how near the noise of the measured load came to the start threshold).
fn steady_once(s: &Steadiness) -> Result<(u64, f64), String> {
    let mut c = cluster();
    for i in 0..6 {
        burner(&c, i, HOSTS[usize::from(i) % 3], 10, false)?;
    }
    let st = wait(&c, "every guest's load to be measured", measured)?;
    let spread = st.balancer.as_ref().and_then(|b| b.plan.spread).unwrap_or_default();
    eprintln!("vmm-bench:   spread {spread:.3} ({}); a balancer runs for {} s", utilisations(&st), s.steady.as_secs());
    c.start_balancer("bench", &["--every", "1"]);
    let started = Instant::now();
    let (mut moves, mut largest) = (0, spread);
    while started.elapsed() < s.steady {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(st) = c.status() {
            let plan = st.balancer.as_ref().filter(|b| b.plan_age_ms.is_some()).map(|b| &b.plan);
            largest = largest.max(plan.and_then(|p| p.spread).unwrap_or_default());
            let m = owner_changes(&st);
            if m > moves {
                let plan = st.balancer.as_ref().map(|b| b.plan.why.clone()).unwrap_or_default();
                eprintln!("vmm-bench:   a move after {:.0} s: {plan}", started.elapsed().as_secs_f64());
                moves = m;
            }
        }
    }
    c.kill_balancer("bench");
    Ok((moves, largest))
}

/// What one run of the skew case saw.
struct Skew {
    /// Seconds from the balancer's start to balanced.
    took: f64,
    /// Migrations until balanced, and in the 10 s after.
    moves: u64,
    after: u64,
    /// Every guest's client, in guest order.
    echo: Vec<StreamStats>,
    moved: BTreeSet<String>,
}

/// Each host's utilisation in the plan of a status, for the log.
fn utilisations(s: &StatusReport) -> String {
    let Some(b) = &s.balancer else { return String::new() };
    let host = |h: &vmm_cluster::balance::HostLine| format!("{} {:.2}", h.name, h.utilisation.unwrap_or(f64::NAN));
    b.plan.hosts.iter().map(host).collect::<Vec<_>>().join(", ")
}

/// The skew case, once.
fn skew_once() -> Result<Skew, String> {
    let mut c = cluster();
    for (i, host) in ["a", "a", "a", "b", "c"].into_iter().enumerate() {
        burner(&c, i as u8, host, 10, true)?;
    }
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(c.echo_stream(i, Duration::from_secs(30))?);
    }
    let start_spread = Policy::default().start_spread;
    let st = wait(&c, "every guest's load to be measured", measured)?;
    let spread = st.balancer.as_ref().and_then(|b| b.plan.spread).unwrap_or_default();
    eprintln!(
        "vmm-bench:   spread {spread:.3} ({}; start threshold {start_spread}); a balancer starts",
        utilisations(&st)
    );
    for s in &streams {
        s.reset_gap();
    }
    c.start_balancer("bench", &["--every", "1"]);
    let started = Instant::now();
    let balanced = wait(&c, "the spread to fall under the start threshold", |s| {
        s.migrations.is_empty()
            && s.balancer.as_ref().is_some_and(|b| {
                b.leader.as_deref() == Some("bench")
                    && b.plan_age_ms.is_some()
                    && b.plan.spread.is_some_and(|x| x < start_spread)
            })
    })?;
    let took = started.elapsed().as_secs_f64();
    let spread = balanced.balancer.as_ref().and_then(|b| b.plan.spread).unwrap_or_default();
    eprintln!("vmm-bench:   balanced: spread {spread:.3} ({})", utilisations(&balanced));
    // Whether it stays so.
    std::thread::sleep(Duration::from_secs(10));
    let end = c.status().ok_or("cannot read the cluster's status")?;
    c.kill_balancer("bench");
    let moved = end.vms.iter().filter(|v| v.epoch > 1).map(|v| v.name.clone()).collect();
    let echo = streams.into_iter().map(EchoStream::finish).collect();
    let moves = owner_changes(&balanced);
    Ok(Skew { took, moves, after: owner_changes(&end) - moves, echo, moved })
}

/// Echo figures of one run: lines lost by every client, and the largest gap among the clients
/// of guests named in `moved` (`names[i]` is client `i`'s guest).
pub fn echo_rows(
    results: &mut Results,
    section: &str,
    names: &[String],
    stats: &[StreamStats],
    moved: &BTreeSet<String>,
) {
    let lost: u64 = stats.iter().map(StreamStats::lost).sum();
    for (name, s) in names.iter().zip(stats) {
        if !s.errors.is_empty() {
            eprintln!("vmm-bench:   {name}'s client: {}", s.errors.join("; "));
        }
    }
    let errors = stats.iter().filter(|s| !s.errors.is_empty()).count();
    results.add(section, LOST, "", Better::Lower, Ours, (lost + errors as u64) as f64);
    let gap = names.iter().zip(stats).filter(|(n, _)| moved.contains(*n)).map(|(_, s)| s.largest_gap).max();
    if let Some(gap) = gap {
        results.add(section, MOVED_GAP, "ms", Better::Lower, Ours, gap.as_secs_f64() * 1e3);
    }
}

pub fn steady(results: &mut Results, s: &Steadiness) -> Result<(), String> {
    for run in 0..s.runs {
        eprintln!("vmm-bench: {STEADY}, run {}", run + 1);
        let (moves, largest) = steady_once(s)?;
        eprintln!("vmm-bench:   {moves} migrations in {} s, largest spread {largest:.3}", s.steady.as_secs());
        results.add(STEADY, &steady_metric(s), "", Better::Lower, Ours, moves as f64);
        results.add(STEADY, LARGEST_SPREAD, "", Better::Lower, Ours, largest);
    }
    Ok(())
}

fn steady_metric(s: &Steadiness) -> String {
    format!("{STEADY_MOVES} in {} s", s.steady.as_secs())
}

pub fn skew(results: &mut Results, runs: usize) -> Result<(), String> {
    for run in 0..runs {
        eprintln!("vmm-bench: {SKEW}, run {}", run + 1);
        let r = skew_once()?;
        eprintln!(
            "vmm-bench:   balanced after {:.1} s, {} migrations, {} in the 10 s after (moved: {:?})",
            r.took, r.moves, r.after, r.moved
        );
        results.add(SKEW, TO_BALANCED, "s", Better::Lower, Ours, r.took);
        results.add(SKEW, SKEW_MOVES, "", Better::Lower, Ours, r.moves as f64);
        results.add(SKEW, AFTER_MOVES, "", Better::Lower, Ours, r.after as f64);
        let names: Vec<String> = (0..r.echo.len()).map(|i| format!("burn{i}")).collect();
        echo_rows(results, SKEW, &names, &r.echo, &r.moved);
    }
    Ok(())
}

/// The largest sample of a row.
fn worst(r: &Results, section: &str, metric: &str) -> Option<f64> {
    let row = r.row(section, metric)?;
    row.vmm.iter().copied().reduce(f64::max)
}

/// The targets: 0 migrations in the steady case; in the skew case balanced within
/// 30 s with at most 5 migrations; no echo line lost. Judged on the worst run.
pub fn targets(r: &Results, s: &Steadiness, line: &mut dyn FnMut(bool, String)) {
    if let Some(m) = worst(r, STEADY, &steady_metric(s)) {
        line(m == 0.0, format!("{STEADY}: 0 migrations in {} s: {m:.0}", s.steady.as_secs()));
    }
    if let Some(t) = worst(r, SKEW, TO_BALANCED) {
        line(t <= 30.0, format!("{SKEW}: balanced within 30 s: {t:.1} s"));
    }
    if let Some(m) = worst(r, SKEW, SKEW_MOVES) {
        line(m <= 5.0, format!("{SKEW}: at most 5 migrations: {m:.0}"));
    }
    for section in [SKEW, crate::jobs::SECTION] {
        if let Some(lost) = worst(r, section, LOST) {
            let gap = worst(r, section, MOVED_GAP)
                .map_or(String::new(), |g| format!(", largest gap of a moved guest {g:.0} ms"));
            line(lost == 0.0, format!("{section}: no echo line lost: {lost:.0}{gap}"));
        }
    }
}
