// SPDX-License-Identifier: Apache-2.0
//! The parallel-jobs case of the cluster section, as the process-migration theses proved load
//! balancing: hosts a, b and c with equal CPU quotas, 12 `compute` jobs (one vCPU each, the same
//! number of units, so the same result hash), and the makespan (from the first job's creation to
//! the last `JOB-DONE` line) in three placements:
//!
//! - **ideal**: four jobs per host from the start;
//! - **no balancing**: all twelve on host a;
//! - **balancer**: all twelve on host a, with `vmm balancer` running.
//!
//! Every job's result hash is checked against the one computed here, and the moves counted
//! (owner changes of the VMs). Every job has a NIC and a client streaming to its echo service
//! (in all three placements, so that they carry the same load): with the balancer, the lines
//! lost and the largest gap a moved job's client saw. The balancer's run is plotted: each host's
//! load (CPU demand ÷ capacity, as the agents publish it) over time, every migration marked, and
//! below it the CPU each host used ÷ its capacity (`cluster-jobs.png`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmm_cluster::model::{MovePhase, now_ms};
use vmm_tests::cluster::{ClusterBed, ClusterOptions};
use vmm_tests::echo_stream::{EchoStream, StreamStats};

use crate::monitor::Monitor::Ours;
use crate::plot::{HostSeries, Mark};
use crate::results::{Better, Results};

pub const SECTION: &str = "cluster: parallel jobs";
pub const IDEAL: &str = "makespan, ideal placement (4 jobs per host)";
pub const NONE: &str = "makespan, no balancing (12 jobs on host a)";
pub const BALANCED: &str = "makespan, with the balancer (12 jobs on host a)";
pub const MOVES: &str = "migrations made by the balancer";
pub const WRONG: &str = "jobs with a wrong or missing result hash";

const HOSTS: [&str; 3] = ["a", "b", "c"];
/// Longest a run may take.
const TIMEOUT: Duration = Duration::from_secs(1200);

/// How the case is sized.
pub struct Jobs {
    pub jobs: usize,
    /// Units per job (about a millisecond of one CPU each).
    pub units: u64,
    /// Each host's CPU quota, thousandths of a CPU.
    pub cpu_millis: u64,
    pub runs: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ideal,
    Unbalanced,
    Balancer,
}

/// The `JOB-DONE` line of VM `vm`, if its console (on any host, any epoch) has one.
fn job_done(c: &ClusterBed, vm: &str) -> Option<String> {
    for h in HOSTS {
        let dir = c.state_dir(h).join("vms");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with(&format!("{vm}.")) {
                continue;
            }
            let text = std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default();
            // Only a whole line: the guest may be writing it while it is read.
            let whole = text.rfind('\n').map_or("", |end| &text[..end]);
            if let Some(l) = whole.lines().find(|l| l.starts_with("JOB-DONE ")) {
                return Some(l.to_string());
            }
        }
    }
    None
}

/// What one run saw.
struct Run {
    makespan: f64,
    /// Owner changes.
    moves: u64,
    wrong: usize,
    /// Each job's client, in job order.
    echo: Vec<StreamStats>,
    /// The jobs that moved.
    moved: BTreeSet<String>,
    loads: Vec<HostSeries>,
    marks: Vec<Mark>,
}

/// Per host, its load over time: (seconds since the start, demand ÷ capacity, used ÷ capacity).
type Loads = BTreeMap<String, Vec<(f64, f64, f64)>>;

/// Each job's `JOB-DONE` time (seconds since the start) and line.
type Done = Vec<(f64, String)>;

/// Each host's load, from `vmm cluster status` every quarter second until `stop`; and the most
/// owner changes seen (read while the VMs exist: their epochs count the moves).
fn sample(c: &ClusterBed, started: Instant, stop: &AtomicBool) -> (Loads, u64) {
    let mut loads = Loads::new();
    let mut moves = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Some(s) = c.status() {
            moves = moves.max(crate::steady::owner_changes(&s));
            let t = started.elapsed().as_secs_f64();
            for h in s.hosts.iter().filter(|h| h.cpu_capacity_millis > 0) {
                if let (Some(d), Some(u)) = (h.cpu_demand_millis, h.cpu_used_millis) {
                    let cap = h.cpu_capacity_millis as f64;
                    loads.entry(h.name.clone()).or_default().push((t, d / cap, u / cap));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    (loads, moves)
}

/// Creates the jobs, connects a client to each, and waits for every `JOB-DONE` line: (each
/// job's time and line, the clients).
fn jobs(c: &ClusterBed, j: &Jobs, mode: Mode, started: Instant) -> Result<(Done, Vec<EchoStream>), String> {
    for i in 0..j.jobs {
        let host = if mode == Mode::Ideal { HOSTS[i % 3] } else { "a" };
        let guest = u8::try_from(i).map_err(|_| "too many jobs")?;
        let cmdline =
            format!("console=ttyS0 {} vmm.workload=compute vmm.work={}", c.bed.guest_ip_cmdline(guest), j.units);
        c.create_vm(&format!("job{i:02}"), &cmdline, 64, &["--host", host])?;
    }
    let mut streams = Vec::new();
    for i in 0..j.jobs {
        streams.push(c.echo_stream(i as u8, Duration::from_secs(30))?);
    }
    let mut done: BTreeMap<String, (f64, String)> = BTreeMap::new();
    while done.len() < j.jobs {
        if started.elapsed() > TIMEOUT {
            return Err(format!("only {} of {} jobs done after {} s", done.len(), j.jobs, TIMEOUT.as_secs()));
        }
        for i in 0..j.jobs {
            let name = format!("job{i:02}");
            if !done.contains_key(&name)
                && let Some(line) = job_done(c, &name)
            {
                done.insert(name, (started.elapsed().as_secs_f64(), line));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok((done.into_values().collect(), streams))
}

/// One run in `mode`.
fn run(j: &Jobs, mode: Mode, want: &str) -> Result<Run, String> {
    let mut c = ClusterBed::start(
        &HOSTS,
        ClusterOptions { cpu_millis: Some(j.cpu_millis), mem_mib: 2048, ..Default::default() },
    );
    if mode == Mode::Balancer {
        c.start_balancer("bench", &["--every", "1"]);
    }
    let started = Instant::now();
    let started_ms = now_ms();
    let stop = AtomicBool::new(false);
    let (done, (loads, moves)) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(&c, started, &stop));
        let done = jobs(&c, j, mode, started);
        stop.store(true, Ordering::Relaxed);
        (done, sampler.join().unwrap_or_default())
    });
    let (done, streams) = done?;
    let makespan = done.iter().map(|(t, _)| *t).fold(0.0, f64::max);
    let wrong: Vec<&String> =
        done.iter().map(|(_, l)| l).filter(|l| !l.split(' ').any(|f| f == format!("result={want}"))).collect();
    for l in &wrong {
        eprintln!("vmm-bench: wrong result (want {want}): {l}");
    }
    let wrong = wrong.len();
    c.kill_balancer("bench");
    let echo: Vec<StreamStats> = streams.into_iter().map(EchoStream::finish).collect();
    // Each migration where the guest started running on its destination.
    let mut marks = Vec::new();
    let mut moved = BTreeSet::new();
    for m in crate::cluster::moves(&c)?.into_iter().filter(|m| m.phase == MovePhase::Done) {
        let at_ms = m.times.resumed_us.map_or(m.times.ended_ms.unwrap_or(started_ms), |us| us / 1000);
        let t = at_ms.saturating_sub(started_ms) as f64 / 1e3;
        marks.push(Mark { t, label: format!("{} {}→{}", m.vm, m.from, m.to) });
        moved.insert(m.vm);
    }
    marks.sort_by(|a, b| a.t.total_cmp(&b.t));
    let loads = loads
        .into_iter()
        .map(|(host, points)| HostSeries {
            host,
            demand: points.iter().map(|&(t, d, _)| (t, d)).collect(),
            used: points.iter().map(|&(t, _, u)| (t, u)).collect(),
        })
        .collect();
    Ok(Run { makespan, moves, wrong, echo, moved, loads, marks })
}

/// The case, `j.runs` times each way; the first run with the balancer is plotted into
/// `<out>/cluster-jobs.png`.
pub fn bench(results: &mut Results, j: &Jobs, out: &Path) -> Result<(), String> {
    let want = format!("{:016x}", guest_common::compute::job_result(j.units));
    let names: Vec<String> = (0..j.jobs).map(|i| format!("job{i:02}")).collect();
    for r in 0..j.runs {
        for (mode, metric) in [(Mode::Ideal, IDEAL), (Mode::Unbalanced, NONE), (Mode::Balancer, BALANCED)] {
            eprintln!("vmm-bench: {SECTION}: {metric}, run {}", r + 1);
            let run = run(j, mode, &want)?;
            eprintln!("vmm-bench:   {:.1} s, {} moves, {} wrong hashes", run.makespan, run.moves, run.wrong);
            results.add(SECTION, metric, "s", Better::Lower, Ours, run.makespan);
            if mode == Mode::Balancer {
                results.add(SECTION, MOVES, "", Better::Lower, Ours, run.moves as f64);
                crate::steady::echo_rows(results, SECTION, &names, &run.echo, &run.moved);
                if r == 0 {
                    let title = format!(
                        "{} jobs of {} units started on host a, hosts of {} m CPU each, with the balancer: \
                         makespan {:.0} s, {} migrations",
                        j.jobs, j.units, j.cpu_millis, run.makespan, run.moves
                    );
                    crate::plot::host_loads(&out.join(PLOT), &title, &run.loads, &run.marks)?;
                }
            }
            results.add(SECTION, WRONG, "", Better::Lower, Ours, run.wrong as f64);
        }
    }
    Ok(())
}

/// The plot of the balancer's run, in the output directory.
pub const PLOT: &str = "cluster-jobs.png";

/// The targets: makespan with the balancer ≤ 1.25 × ideal, at most 12 migrations, every
/// hash right.
pub fn targets(r: &Results, line: &mut dyn FnMut(bool, String)) {
    if let (Some(ideal), Some(bal)) = (r.median(SECTION, IDEAL, Ours), r.median(SECTION, BALANCED, Ours)) {
        let none = r.median(SECTION, NONE, Ours).map_or(String::new(), |n| format!(", no balancing {n:.1} s"));
        line(
            bal <= 1.25 * ideal,
            format!(
                "{SECTION}: makespan with the balancer ≤ 1.25 × ideal: {bal:.1} s = {:.2} × ideal {ideal:.1} s{none}",
                bal / ideal
            ),
        );
    }
    if let Some(m) = r.median(SECTION, MOVES, Ours) {
        line(m <= 12.0, format!("{SECTION}: at most 12 migrations: {m:.0}"));
    }
    if let Some(row) = r.rows.iter().find(|row| row.section == SECTION && row.metric == WRONG) {
        let max = row.vmm.iter().copied().fold(0.0, f64::max);
        line(max == 0.0, format!("{SECTION}: every job's result hash right: {max:.0} wrong in the worst run"));
    }
}
