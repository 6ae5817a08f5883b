// SPDX-License-Identifier: Apache-2.0
//! The targets the issues set, checked against this run's medians: each line says met or NOT
//! met with the figures, so a miss is as visible as a win.

use crate::boot::SMP_READY;
use crate::migrate::{Case, DOWNTIME, UDP_LOST};
use crate::monitor::Monitor::{Ours, Qemu};
use crate::net::UDP_RATE;
use crate::results::Results;

pub fn check(r: &Results, cases: &[Case]) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = |ok: bool, text: String| out.push(format!("- {} {text}", if ok { "met:" } else { "NOT met:" }));
    let med = |s: &str, m: &str, who| r.median(s, m, who);

    if let (Some(a), Some(b)) =
        (med("boot", "our guest: start → ready line", Ours), med("boot", "our guest: start → ready line", Qemu))
    {
        line(a < 50.0, format!("boot to the ready line under 50 ms: {a:.1} ms"));
        line(a < b, format!("boot faster than QEMU microvm: {a:.1} ms vs {b:.1} ms"));
    }
    if let (Some(a), Some(b)) = (med("boot", SMP_READY, Ours), med("boot", SMP_READY, Qemu)) {
        line(a < b, format!("4 vCPUs online faster than under QEMU microvm: {a:.1} ms vs {b:.1} ms"));
    }
    if let Some(a) = med("boot", "monitor RSS overhead (RSS − guest memory RSS)", Ours) {
        line(a <= 5.0, format!("monitor overhead ≤ 5 MiB: {a:.2} MiB"));
    }
    for m in ["client → guest throughput", "guest → client throughput"] {
        if let (Some(a), Some(b)) = (med("network", m, Ours), med("network", m, Qemu)) {
            line(a >= b, format!("{m} ≥ 1.0 × QEMU: {:.2} × ({a:.0} vs {b:.0} MB/s)", a / b));
        }
    }
    if let (Some(a), Some(b)) = (
        med("network", "request/response latency, median", Ours),
        med("network", "request/response latency, median", Qemu),
    ) {
        line(a <= b, format!("request/response latency ≤ QEMU's: {a:.0} µs vs {b:.0} µs"));
    }
    if let (Some(a), Some(b)) = (med("network", UDP_RATE, Ours), med("network", UDP_RATE, Qemu)) {
        line(a >= b, format!("UDP echo rate ≥ 1.0 × QEMU: {:.2} × ({a:.0} vs {b:.0} datagrams/s)", a / b));
    }
    for (_, row, unit) in crate::disk::PHASES {
        if let (Some(a), Some(b)) = (med("disk", row, Ours), med("disk", row, Qemu)) {
            line(a >= b, format!("disk, {row} ≥ 1.0 × QEMU: {:.2} × ({a:.0} vs {b:.0} {unit})", a / b));
        }
    }
    if let Some(x) = med(crate::disk::MIGRATION, crate::disk::SENT_RATIO, Ours) {
        line(x <= 1.1, format!("disk migration: disk data sent ≤ 1.1 × (allocated + rewritten): {x:.2} ×"));
    }
    let loopback = med("reference", "TCP bandwidth, loopback", Ours);
    for case in cases {
        let s = format!("migration: {}", case.label());
        let l = case.label();
        if let (Some(a), Some(b)) = (med(&s, DOWNTIME, Ours), med(&s, DOWNTIME, Qemu)) {
            line(a <= 0.3 * b, format!("{l}: downtime ≤ 0.3 × QEMU's: {a:.1} ms vs {b:.1} ms"));
        }
        if let Some(x) = med(&s, "copy rate, TLS ÷ plaintext", Ours) {
            let q = med(&s, "copy rate, TLS ÷ plaintext", Qemu).map_or(String::new(), |q| format!(" (QEMU: {q:.2} ×)"));
            line(x >= 0.8, format!("{l}: copy rate over TLS ≥ 0.8 × plaintext: {x:.2} ×{q}"));
        }
        if case.dirty.is_none()
            && case.mem_mib >= 1024
            && let Some(sent) = med(&s, "sent", Ours)
        {
            let pct = sent / case.mem_mib as f64 * 100.0;
            line(pct < 5.0, format!("{l}: sends under 5% of its memory: {sent:.1} MiB = {pct:.2}%"));
        }
        if let (Some(total), Some(sent), Some(bw)) = (med(&s, "total time", Ours), med(&s, "sent", Ours), loopback) {
            let ideal = sent * (1 << 20) as f64 / (bw * 1e6) * 1e3;
            line(
                total <= 1.2 * ideal,
                format!(
                    "{l}: total time within 1.2 × bytes ÷ loopback bandwidth: {total:.1} ms vs {:.1} ms",
                    1.2 * ideal
                ),
            );
        }
        if let (Some(gap), Some(down), Some(qgap)) = (
            med(&s, "client's largest echo gap", Ours),
            med(&s, DOWNTIME, Ours),
            med(&s, "client's largest echo gap", Qemu),
        ) {
            line(
                gap <= down + 100.0,
                format!("{l}: largest client gap ≤ downtime + 100 ms: {gap:.0} ms vs {:.0} ms", down + 100.0),
            );
            line(gap < qgap, format!("{l}: largest client gap smaller than QEMU's: {gap:.0} ms vs {qgap:.0} ms"));
        }
        if let Some(lost) = med(&s, UDP_LOST, Ours) {
            let qemu = med(&s, UDP_LOST, Qemu).map_or(String::new(), |q| format!(" (QEMU: {q:.0})"));
            line(lost == 0.0, format!("{l}: no UDP datagram lost across the migration: {lost:.0}{qemu}"));
        }
    }
    out
}
