// SPDX-License-Identifier: Apache-2.0
//! Boot: time from process start to the guest's ready line, and what the monitor process
//! itself costs in memory (its RSS minus the guest memory the guest touched).

use std::path::Path;
use std::time::Duration;

use crate::monitor::{GuestSpec, Monitor, Running};
use crate::results::{Better, Results};

const MEM_MIB: u64 = 256;

/// Our guest, idle, no NIC: `runs` boots of each monitor, alternating.
pub fn our_guest(results: &mut Results, runs: usize, kernel: &Path) -> Result<(), String> {
    let spec = GuestSpec {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0 vmm.workload=idle".into(),
        mem_mib: MEM_MIB,
        net: None,
    };
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let r = Running::start(m, None, &spec, None);
            let ready = r.wait_ready(Duration::from_secs(30))?;
            // Let start-up work that races the guest (threads, lazy allocations) settle.
            std::thread::sleep(Duration::from_millis(200));
            let mem = memory(r.pid(), MEM_MIB)?;
            results.add("boot", "our guest: start → ready line", "ms", Better::Lower, m, ms(ready));
            results.add(
                "boot",
                "monitor RSS overhead (RSS − guest memory RSS)",
                "MiB",
                Better::Lower,
                m,
                mem.overhead_kib() as f64 / 1024.0,
            );
            results.add("boot", "whole process RSS", "MiB", Better::Lower, m, mem.rss_kib as f64 / 1024.0);
        }
    }
    Ok(())
}

/// The Linux kernel and initramfs: time to the kernel's first console line. A full Linux boot
/// takes minutes on a KVM that emulates guest kernel code (see the README), so the bench stops
/// at the banner, which is loading plus the kernel's first steps under each monitor.
pub fn linux(results: &mut Results, runs: usize, kernel: &Path, initrd: &Path, cmdline: &str) -> Result<(), String> {
    let spec = GuestSpec {
        kernel,
        initrd: Some(initrd),
        cmdline: format!("{cmdline} earlyprintk=ttyS0 vmm.workload=idle"),
        mem_mib: MEM_MIB,
        net: None,
    };
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let r = Running::start(m, None, &spec, None);
            let t = r.wait_console(Duration::from_secs(120), |l| l.contains("Linux version"))?;
            results.add("boot", "Linux 6.12 + initramfs: start → kernel banner", "ms", Better::Lower, m, ms(t));
        }
    }
    Ok(())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A process's resident memory, and how much of it is guest memory.
pub struct Memory {
    pub rss_kib: u64,
    pub guest_kib: u64,
}

impl Memory {
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_kib)
    }
}

/// Reads `/proc/PID/smaps`. Guest memory is the mapping of the guest's size (both monitors
/// map it in one piece, QEMU sometimes with up to 2 MiB of alignment).
pub fn memory(pid: u32, guest_mib: u64) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let guest_kib = guest_mib * 1024;
    let (mut rss, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let v: u64 = v.parse().unwrap_or(0);
                rss += v;
                if (guest_kib..=guest_kib + 2048).contains(&size) {
                    guest += v;
                }
            }
            _ => {}
        }
    }
    if rss == 0 {
        return Err(format!("{path}: no resident memory found"));
    }
    Ok(Memory { rss_kib: rss, guest_kib: guest })
}
