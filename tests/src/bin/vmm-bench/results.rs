// SPDX-License-Identifier: Apache-2.0
//! Samples as they are taken, and the markdown table made of them: median and min–max per
//! monitor, and the ratio ours/QEMU in every row.

use serde::Serialize;

use crate::monitor::Monitor;

/// Which way is better for a metric (for the reader; the table prints the plain ratio).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One row of the table: every sample of one metric for both monitors.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub section: String,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub vmm: Vec<f64>,
    pub qemu: Vec<f64>,
}

impl Row {
    pub fn samples(&self, m: Monitor) -> &[f64] {
        match m {
            Monitor::Ours => &self.vmm,
            Monitor::Qemu => &self.qemu,
        }
    }

    /// Ours / QEMU, of the medians.
    pub fn ratio(&self) -> Option<f64> {
        let (a, b) = (median(&self.vmm)?, median(&self.qemu)?);
        (b != 0.0).then_some(a / b)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub rows: Vec<Row>,
    /// What a row cannot say: a case that never finished, a case skipped and why, a published
    /// figure quoted beside ours (printed under the table).
    pub notes: Vec<String>,
}

impl Results {
    /// Records one sample (rows appear in the order their first sample came).
    pub fn add(&mut self, section: &str, metric: &str, unit: &str, better: Better, m: Monitor, value: f64) {
        let pos = match self.rows.iter().position(|r| r.section == section && r.metric == metric) {
            Some(p) => p,
            None => {
                self.rows.push(Row {
                    section: section.into(),
                    metric: metric.into(),
                    unit: unit.into(),
                    better,
                    vmm: Vec::new(),
                    qemu: Vec::new(),
                });
                self.rows.len() - 1
            }
        };
        match m {
            Monitor::Ours => self.rows[pos].vmm.push(value),
            Monitor::Qemu => self.rows[pos].qemu.push(value),
        }
    }

    /// Adds a note (also printed at once, so a long run shows it as it happens).
    pub fn note(&mut self, text: String) {
        eprintln!("vmm-bench: note: {text}");
        self.notes.push(text);
    }

    pub fn row(&self, section: &str, metric: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.section == section && r.metric == metric)
    }

    /// Median of a row's samples for one monitor.
    pub fn median(&self, section: &str, metric: &str, m: Monitor) -> Option<f64> {
        median(self.row(section, metric)?.samples(m))
    }

    /// The table: one block per section.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| | metric | vmm: median (min–max) | QEMU: median (min–max) | vmm/QEMU |\n|---|---|---|---|---|\n",
        );
        let mut section = "";
        for r in &self.rows {
            let sec = if r.section != section { r.section.as_str() } else { "" };
            section = &r.section;
            let ratio = r.ratio().map_or("—".to_string(), |x| format!("{x:.2}"));
            let better = match r.better {
                Better::Lower => "lower is better",
                Better::Higher => "higher is better",
            };
            let unit = if r.unit.is_empty() { better.to_string() } else { format!("{}, {better}", r.unit) };
            out.push_str(&format!(
                "| {sec} | {} ({unit}) | {} | {} | {ratio} |\n",
                r.metric,
                summary(&r.vmm),
                summary(&r.qemu),
            ));
        }
        out
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

fn summary(v: &[f64]) -> String {
    let Some(m) = median(v) else { return "—".into() };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 { fmt(m) } else { format!("{} ({}–{})", fmt(m), fmt(min), fmt(max)) }
}

/// Three significant digits or so, without scientific notation.
fn fmt(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratio() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let mut r = Results::default();
        for (m, v) in [(Monitor::Ours, 10.0), (Monitor::Qemu, 40.0), (Monitor::Ours, 20.0), (Monitor::Qemu, 20.0)] {
            r.add("boot", "ready", "ms", Better::Lower, m, v);
        }
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0].ratio(), Some(0.5));
        let table = r.markdown();
        assert!(
            table.contains("| boot | ready (ms, lower is better) | 15.0 (10.0–20.0) | 30.0 (20.0–40.0) | 0.50 |"),
            "{table}"
        );
    }
}
