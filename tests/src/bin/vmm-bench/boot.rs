// SPDX-License-Identifier: Apache-2.0
//! Boot: time from process start to the guest's ready line (with one vCPU, and with
//! [`SMP_VCPUS`], where the ready line comes once every CPU is online), and what the monitor
//! process itself costs in memory (its RSS minus the guest memory the guest touched).

use std::path::Path;
use std::time::Duration;

use crate::monitor::{GuestImage, GuestSpec, Monitor, Running};
use crate::results::{Better, Results};

const MEM_MIB: u64 = 256;
/// vCPUs of the SMP boot row.
pub const SMP_VCPUS: u8 = 4;
/// The SMP boot row.
pub const SMP_READY: &str = "our guest, 4 vCPUs: start → every CPU online (ready line)";

/// Our guest, idle, no NIC: `runs` boots of each monitor, alternating.
pub fn our_guest(results: &mut Results, runs: usize, kernel: &Path) -> Result<(), String> {
    let spec = GuestSpec {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0 vmm.workload=idle".into(),
        mem_mib: MEM_MIB,
        vcpus: 1,
        net: None,
        disk: None,
    };
    let image = image_size(kernel)?;
    results.add("boot", "our guest kernel: loaded image", "KiB", Better::Lower, Monitor::Ours, image.loaded_kib());
    results.add(
        "boot",
        "our guest kernel: file (with debug info)",
        "KiB",
        Better::Lower,
        Monitor::Ours,
        image.file_kib(),
    );
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
    // Our guest starts every CPU of the MP table (INIT and startup IPIs, as Linux does) before
    // its ready line, which says how many came online.
    let smp = GuestSpec { vcpus: SMP_VCPUS, cmdline: spec.cmdline.clone(), ..spec };
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let r = Running::start(m, None, &smp, None);
            let ready = r.wait_ready(Duration::from_secs(30))?;
            let line = r.vm.console.lines(|l| l.starts_with(guest_common::READY_PREFIX)).join("");
            if !line.split(' ').any(|f| f == format!("cpus={SMP_VCPUS}")) {
                return Err(format!("{}: not every CPU came online: {line}\n{}", m.name(), r.vm.describe()));
            }
            results.add("boot", SMP_READY, "ms", Better::Lower, m, ms(ready));
        }
    }
    Ok(())
}

/// Linux with our initramfs, idle, no NIC: time from process start to its ready line, on a KVM
/// that runs its kernel code (hardware, or the nested host's).
pub fn linux(results: &mut Results, runs: usize, guest: &GuestImage, ready_timeout: Duration) -> Result<(), String> {
    let initrd = guest.initrd.as_deref().ok_or("Linux needs its initramfs")?;
    let spec = GuestSpec {
        kernel: &guest.kernel,
        initrd: Some(initrd),
        cmdline: format!("{} vmm.workload=idle", guest.cmdline),
        mem_mib: MEM_MIB,
        vcpus: 1,
        net: None,
        disk: None,
    };
    let image = image_size(&guest.kernel)?;
    let initrd_kib = std::fs::metadata(initrd).map_err(|e| format!("{}: {e}", initrd.display()))?.len() as f64 / 1024.0;
    let section = guest.section("boot");
    results.add(&section, "vmlinux loaded image", "KiB", Better::Lower, Monitor::Ours, image.loaded_kib());
    results.add(&section, "initramfs", "KiB", Better::Lower, Monitor::Ours, initrd_kib);
    for run in 0..runs {
        for m in Monitor::alternating(run) {
            let r = Running::start(m, None, &spec, None);
            let t = r.wait_ready(ready_timeout)?;
            results.add(&section, "Linux 6.12 + initramfs: start → ready line", "ms", Better::Lower, m, ms(t));
        }
    }
    Ok(())
}

/// An ELF kernel's size on disk and the bytes its loadable segments put in guest memory.
#[derive(Debug)]
pub struct ImageSize {
    pub file: u64,
    pub loaded: u64,
}

impl ImageSize {
    fn file_kib(&self) -> f64 {
        self.file as f64 / 1024.0
    }

    fn loaded_kib(&self) -> f64 {
        self.loaded as f64 / 1024.0
    }
}

/// Reads an ELF64 kernel's program headers and sums the file bytes of its PT_LOAD segments.
pub fn image_size(path: &Path) -> Result<ImageSize, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = || format!("{}: not a 64-bit little-endian ELF file", path.display());
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| data.get(o..o + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let u64_at = |o: usize| data.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if data.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(bad());
    }
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?).map_err(|_| bad())?;
    let (phentsize, phnum) = (u16_at(0x36).ok_or_else(bad)?, u16_at(0x38).ok_or_else(bad)?);
    let mut loaded = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(bad)? == 1 {
            loaded += u64_at(ph + 0x20).ok_or_else(bad)?;
        }
    }
    Ok(ImageSize { file: data.len() as u64, loaded })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 header and two program headers: a PT_LOAD of 100 bytes and a PT_NOTE of 50.
    fn elf() -> Vec<u8> {
        let mut d = vec![0u8; 64 + 2 * 56];
        d[..6].copy_from_slice(b"\x7fELF\x02\x01");
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        for (i, (kind, size)) in [(1u32, 100u64), (4, 50)].into_iter().enumerate() {
            let ph = 64 + i * 56;
            d[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            d[ph + 0x20..ph + 0x28].copy_from_slice(&size.to_le_bytes());
        }
        d
    }

    #[test]
    fn image_size_counts_loadable_segments_only() {
        let dir = std::env::temp_dir().join(format!("vmm-bench-elf-{}", std::process::id()));
        std::fs::write(&dir, elf()).unwrap();
        let size = image_size(&dir).unwrap();
        assert_eq!((size.file, size.loaded), (64 + 2 * 56, 100));
        let mut truncated = elf();
        truncated.truncate(100);
        std::fs::write(&dir, truncated).unwrap();
        assert!(image_size(&dir).is_err());
        std::fs::write(&dir, b"not an elf").unwrap();
        assert!(image_size(&dir).unwrap_err().contains("not a 64-bit"));
        std::fs::remove_file(&dir).unwrap();
    }
}
