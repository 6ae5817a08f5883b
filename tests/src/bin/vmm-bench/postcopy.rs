// SPDX-License-Identifier: Apache-2.0
//! Post-copy: a 1 GiB guest dirtying 256 MiB (our guest's `dirty` workload), as fast as it goes
//! and at 512 MiB/s, moved from host A to host B over mutual TLS, in three pairings:
//!
//! - ours with `--postcopy` (the switch after the first round) against QEMU's `postcopy-ram`
//!   (the capability on both ends, `migrate-start-postcopy` once the first round is done; no
//!   bandwidth cap, as ours);
//! - the same with no pre-copy round at all (ours: `--precopy-rounds 0`; QEMU:
//!   `migrate-start-postcopy` as soon as the migration runs);
//! - ours with `--postcopy-auto` (the switch once pre-copy stops converging) against QEMU's
//!   pre-copy on its own defaults (300 ms downtime limit, 128 MiB/s), cancelled if it has not
//!   finished after [`PRECOPY_BOUND`] ("did not converge").
//!
//! Rows: total time, downtime, bytes sent, the guest's own work rate (dirty passes per second,
//! from its status, see [`crate::passes`]) during the move and during post-copy against its rate
//! before, faults fetched, and (ours only) the fault latency the destination measured.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::api::MigrationMode;
use vmm_tests::TestBed;

use crate::migrate::{DOWNTIME, source_and_destination};
use crate::monitor::{GuestSpec, MigrationResult, Monitor, Outcome, Plan, Wire};
use crate::passes::PassLog;
use crate::results::{Better, Results};

const MEM_MIB: u64 = 1024;
const DIRTY_MIB: u64 = 256;
/// The dirty rates, MiB/s (0: as fast as it goes).
const RATES: [u64; 2] = [0, 512];
/// How long QEMU's pre-copy may go on before it counts as not converging.
pub const PRECOPY_BOUND: Duration = Duration::from_secs(30);
/// The span before the move over which the guest's work rate is taken.
const BEFORE: Duration = Duration::from_secs(3);
const MAC: &str = "52:54:00:be:4c:19";

/// The rows the targets read.
pub const TOTAL: &str = "total time";
pub const WORK: &str = "guest's work rate during the move ÷ before";
pub const WORK_POSTCOPY: &str = "guest's work rate during post-copy ÷ before";
const BEFORE_ROW: &str = "guest's work rate before the move";
/// The measured A → B bandwidth (the migration section measures the same row).
pub const BANDWIDTH: (&str, &str) = ("reference", "TCP bandwidth, host A → host B");

/// One side-by-side pairing.
struct Pairing {
    name: &'static str,
    ours: MigrationMode,
    /// Ours and QEMU's, with post-copy.
    precopy_rounds: u32,
    qemu: Plan,
}

const POSTCOPY_BOUND: Duration = Duration::from_secs(120);

const PAIRINGS: [Pairing; 3] = [
    Pairing {
        name: "vmm --postcopy vs QEMU postcopy-ram",
        ours: MigrationMode::Postcopy,
        precopy_rounds: 1,
        qemu: Plan { mode: MigrationMode::Postcopy, tuned: true, bound: POSTCOPY_BOUND, precopy_rounds: 1 },
    },
    Pairing {
        name: "vmm --postcopy --precopy-rounds 0 vs QEMU postcopy-ram started at once",
        ours: MigrationMode::Postcopy,
        precopy_rounds: 0,
        qemu: Plan { mode: MigrationMode::Postcopy, tuned: true, bound: POSTCOPY_BOUND, precopy_rounds: 0 },
    },
    Pairing {
        name: "vmm --postcopy-auto vs QEMU pre-copy, its defaults",
        ours: MigrationMode::PostcopyAuto,
        precopy_rounds: 1,
        qemu: Plan { mode: MigrationMode::Precopy, tuned: false, bound: PRECOPY_BOUND, precopy_rounds: 1 },
    },
];

fn rate_label(rate: u64) -> String {
    if rate == 0 { "unthrottled".into() } else { format!("at {rate} MiB/s") }
}

/// Every section this bench fills.
pub fn sections() -> Vec<String> {
    RATES.iter().flat_map(|&r| PAIRINGS.iter().map(move |p| section(r, p))).collect()
}

fn section(rate: u64, p: &Pairing) -> String {
    format!("post-copy: 1 GiB, dirtying {DIRTY_MIB} MiB {}: {}", rate_label(rate), p.name)
}

/// `runs` moves of each case with each of `monitors`, alternating. A case that fails is
/// reported and the others go on; returns the failures.
pub fn bench(results: &mut Results, runs: usize, kernel: &Path, monitors: &[Monitor]) -> Result<Vec<String>, String> {
    let bed = TestBed::builder().host("a").host("b").client("client").host_ips().build().map_err(|e| e.to_string())?;
    let (a, b) = (bed.host("a"), bed.host("b"));
    let b_ip = b.ip().ok_or("host B has no address")?;
    let bw = crate::migrate::stream_rate(a, b, b_ip)?;
    results.add(BANDWIDTH.0, BANDWIDTH.1, "MB/s", Better::Higher, Monitor::Ours, bw);
    let mut failed = Vec::new();
    for run in 0..runs {
        for rate in RATES {
            for pairing in &PAIRINGS {
                let sec = section(rate, pairing);
                for m in Monitor::alternating(run).into_iter().filter(|m| monitors.contains(m)) {
                    let plan = match m {
                        Monitor::Ours => Plan {
                            mode: pairing.ours,
                            tuned: false,
                            bound: POSTCOPY_BOUND,
                            precopy_rounds: pairing.precopy_rounds,
                        },
                        Monitor::Qemu => pairing.qemu,
                    };
                    eprintln!("vmm-bench: {sec}: {} run {}", m.name(), run + 1);
                    match once(&bed, kernel, m, rate, &plan) {
                        Ok(c) => record(results, &sec, m, run, &plan, &c),
                        Err(e) => {
                            eprintln!("vmm-bench: {sec}, {}: {e} (the other cases go on)", m.name());
                            failed.push(format!("{sec}, {}: {e}", m.name()));
                        }
                    }
                }
            }
        }
    }
    Ok(failed)
}

/// One move and the guest's pace around it.
struct Measured {
    outcome: Outcome,
    /// Passes per second before the move.
    before: f64,
    /// During the move (or the attempt), and during post-copy, ÷ before.
    during: Option<f64>,
    during_postcopy: Option<f64>,
}

fn once(bed: &TestBed, kernel: &Path, m: Monitor, rate: u64, plan: &Plan) -> Result<Measured, String> {
    let (a, b) = (bed.host("a"), bed.host("b"));
    let ip = |h: Option<Ipv4Addr>| h.ok_or("hosts have no addresses".to_string());
    let tls = |h: Option<Ipv4Addr>| ip(h).map(|ip| Wire::Tls(vmm_tests::pki::pki().host_dir(ip)));
    let (wire_a, wire_b) = (tls(a.ip())?, tls(b.ip())?);
    let spec_a = GuestSpec {
        kernel,
        initrd: None,
        cmdline: format!(
            "console=ttyS0 {} vmm.workload=dirty vmm.dirty_mib={DIRTY_MIB} vmm.dirty_rate={rate}",
            bed.guest_ip_cmdline(0)
        ),
        mem_mib: MEM_MIB,
        vcpus: 1,
        net: Some((a.tap(), MAC)),
        disk: None,
    };
    let postcopy = m == Monitor::Qemu && plan.mode == MigrationMode::Postcopy;
    let (src, dst, to) = source_and_destination(bed, m, spec_a, [&wire_a, &wire_b], Duration::from_secs(30), postcopy)?;

    let log = PassLog::start(bed.client(), bed.guest_ip(0))?;
    // The workload at its steady pace, and samples for the span before the move.
    std::thread::sleep(BEFORE + Duration::from_millis(1500));
    let start = Instant::now();
    let outcome = src.migrate_plan(&to, &dst, plan)?;
    let end = start
        + Duration::from_secs_f64(
            match &outcome {
                Outcome::Done(r) => r.total_ms,
                Outcome::Unfinished { after_ms, .. } => *after_ms,
            } / 1e3,
        );
    if !log.wait_past(end, Duration::from_secs(20)) {
        return Err(format!("{}: the guest's pass count did not move after the migration", m.name()));
    }
    if let Some(line) = log.mismatch() {
        let console = if matches!(outcome, Outcome::Done(_)) { &dst } else { &src };
        return Err(format!("{}: the dirty workload found bad pages: {line}\n{}", m.name(), console.vm.describe()));
    }
    let before = start.checked_sub(BEFORE).and_then(|from| log.rate(from, start));
    let before = before.ok_or("too few status samples before the move")?;
    if before <= 0.0 {
        return Err(format!("{}: the dirty workload made no progress before the move", m.name()));
    }
    let during = log.rate(start, end).map(|r| r / before);
    let during_postcopy = match &outcome {
        Outcome::Done(MigrationResult { postcopy: Some(p), .. }) => {
            let from = start + Duration::from_secs_f64(p.switched_at_ms / 1e3);
            p.duration_ms.and_then(|d| log.rate(from, from + Duration::from_secs_f64(d / 1e3))).map(|r| r / before)
        }
        _ => None,
    };
    drop(log);
    if matches!(outcome, Outcome::Done(_)) && !src.wait_exit(Duration::from_secs(30)) {
        return Err(format!("{}: the source did not exit after the migration", m.name()));
    }
    if std::env::var_os("VMM_BENCH_DEBUG").is_some() {
        eprintln!("--- {} source ---\n{}--- destination ---\n{}", m.name(), src.vm.log.text(), dst.vm.log.text());
    }
    Ok(Measured { outcome, before, during, during_postcopy })
}

fn record(results: &mut Results, sec: &str, m: Monitor, run: usize, plan: &Plan, c: &Measured) {
    let pct = |x: f64| x * 100.0;
    results.add(sec, BEFORE_ROW, "dirty passes/s", Better::Higher, m, c.before);
    let r = match &c.outcome {
        Outcome::Done(r) => r,
        Outcome::Unfinished { after_ms, bytes_sent, rounds } => {
            let kept = c.during.map_or(String::new(), |d| {
                format!("; the guest kept {:.0} % of its work rate meanwhile (no throttling)", pct(d))
            });
            results.note(format!(
                "{sec}, {} run {}: did not converge in {:.0} s (cancelled after {rounds} rounds and {:.0} MiB sent; \
                 the guest runs on at the source){kept}",
                m.name(),
                run + 1,
                after_ms / 1e3,
                *bytes_sent as f64 / (1 << 20) as f64,
            ));
            return;
        }
    };
    results.add(sec, TOTAL, "ms", Better::Lower, m, r.total_ms);
    results.add(sec, DOWNTIME, "ms", Better::Lower, m, r.downtime_ms);
    results.add(sec, "sent", "MiB", Better::Lower, m, r.bytes_sent as f64 / (1 << 20) as f64);
    results.add(sec, "rounds (pre-copy, and the switch or the pause)", "", Better::Lower, m, f64::from(r.rounds));
    if let Some(d) = c.during {
        results.add(sec, WORK, "%", Better::Higher, m, pct(d));
    }
    let Some(p) = &r.postcopy else {
        if plan.mode != MigrationMode::Precopy {
            results.note(format!(
                "{sec}, {} run {}: pre-copy converged in {} rounds (the pause's included), no switch to post-copy",
                m.name(),
                run + 1,
                r.rounds
            ));
        }
        return;
    };
    if let Some(d) = c.during_postcopy {
        results.add(sec, WORK_POSTCOPY, "%", Better::Higher, m, pct(d));
    }
    results.add(sec, "switch to post-copy after", "ms", Better::Lower, m, p.switched_at_ms);
    if let Some(d) = p.duration_ms {
        results.add(sec, "post-copy: switch → last page", "ms", Better::Lower, m, d);
    }
    results.add(sec, "pages fetched on a fault", "", Better::Lower, m, p.requests as f64);
    if let Some(us) = p.fault_latency_median_us {
        results.add(sec, "fault latency, median", "µs", Better::Lower, m, us as f64);
    }
    if let Some(us) = p.fault_latency_p99_us {
        results.add(sec, "fault latency, 99th percentile", "µs", Better::Lower, m, us as f64);
    }
}

/// The targets for ours, with QEMU's figure beside each where it has one.
pub fn targets(r: &Results, line: &mut impl FnMut(bool, String)) {
    let bw = r.median(BANDWIDTH.0, BANDWIDTH.1, Monitor::Ours);
    for sec in sections() {
        let med = |metric: &str, m| r.median(&sec, metric, m);
        // Every QEMU run, finished or not, records the guest's rate before the move.
        let qemu_ran = med(BEFORE_ROW, Monitor::Qemu).is_some();
        let qemu = |metric: &str, unit: &str| match med(metric, Monitor::Qemu) {
            Some(q) => format!(" (QEMU: {q:.1}{unit})"),
            None if qemu_ran => " (QEMU: no finished run, see the notes)".to_string(),
            None => " (QEMU: not run)".to_string(),
        };
        if let Some(d) = med(DOWNTIME, Monitor::Ours) {
            line(d <= 5.0, format!("{sec}: downtime ≤ 5 ms: {d:.2} ms{}", qemu(DOWNTIME, " ms")));
        }
        if let (Some(t), Some(bw)) = (med(TOTAL, Monitor::Ours), bw) {
            let bound = 1.5 * (MEM_MIB << 20) as f64 / (bw * 1e6) * 1e3;
            line(
                t <= bound,
                format!(
                    "{sec}: total ≤ 1.5 × memory ÷ measured bandwidth ({bw:.0} MB/s): {t:.0} ms vs {bound:.0} ms{}",
                    qemu(TOTAL, " ms")
                ),
            );
        }
        if let Some(w) = med(WORK, Monitor::Ours) {
            line(w >= 50.0, format!("{sec}: the guest keeps ≥ 50 % of its work rate: {w:.0} %{}", qemu(WORK, " %")));
        }
    }
}
