// SPDX-License-Identifier: Apache-2.0
//! The guest's parameters on the kernel command line.
//!
//! - `vmm.workload=echo|dirty|compute|burn|disk|idle` (default `echo`)
//! - `vmm.dirty_mib=N` memory the dirty workload covers, split between the vCPUs (default 64)
//! - `vmm.dirty_rate=N` MiB/s it writes in all, 0 for as fast as it can (default 0)
//! - `vmm.work=N` units of the compute job (default 10000)
//! - `vmm.duty=P` percent of every 100 ms each vCPU burns, 0 to 100 (default 50)
//! - `vmm.disk_mib=N` disk space the disk workload covers (default 64), `vmm.disk_rate=N` MiB/s
//!   it writes (default 0: as fast as it can), `vmm.disk_passes=N` passes before it stops
//!   (default 0: never)
//! - `vmm.poweroff_after_ms=N` power off N ms after the ready line (default: run until asked)
//! - `vmm.fault_cpu=N` our guest's CPU N runs an invalid instruction once its workload is up:
//!   how tests see that a fault on any CPU is reported with that CPU's number (default: none)
//! - `ip=CLIENT:SERVER:GATEWAY:NETMASK:HOST:DEVICE:AUTOCONF` as Linux's IP_PNP reads it
//! - `virtio_mmio.device=SIZE@BASE:IRQ` as Linux's virtio-mmio driver reads it (repeatable)

/// What the guest runs once it is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// TCP echo server on [`crate::ECHO_PORT`] (with the discard and source services). Those
    /// also run under the other workloads whenever `ip=` gives the guest an address.
    Echo,
    /// Writes and verifies a pattern over `dirty_mib` MiB at `dirty_rate` MiB/s, every vCPU
    /// over a region of its own.
    Dirty,
    /// A deterministic CPU-bound job of `work_units` units shared by every vCPU (see
    /// [`crate::compute`]).
    Compute,
    /// Every vCPU busy `duty_pct` % of every 100 ms: a steady, known load.
    Burn,
    /// Writes and verifies a pattern over `disk_mib` MiB of the first disk at `disk_rate` MiB/s.
    Disk,
    /// Measures the first disk over `disk_mib` MiB (sequential and random, at queue depth 1
    /// and 32) and reports it on the console, once (our guest only; the benchmark's workload).
    DiskBench,
    /// Nothing; waits for a control request.
    Idle,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::Dirty => "dirty",
            Workload::Compute => "compute",
            Workload::Burn => "burn",
            Workload::Disk => "disk",
            Workload::DiskBench => "diskbench",
            Workload::Idle => "idle",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Workload::Echo,
            Workload::Dirty,
            Workload::Compute,
            Workload::Burn,
            Workload::Disk,
            Workload::DiskBench,
            Workload::Idle,
        ]
        .into_iter()
        .find(|w| w.name() == name)
    }
}

/// The compute job's size when `vmm.work=` is not given.
pub const DEFAULT_WORK_UNITS: u64 = 10_000;
/// The burn load when `vmm.duty=` is not given.
pub const DEFAULT_DUTY_PCT: u8 = 50;

/// Static IPv4 settings from `ip=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Config {
    pub address: [u8; 4],
    pub gateway: Option<[u8; 4]>,
    /// Prefix length derived from the netmask.
    pub prefix_len: u8,
}

/// A virtio-mmio device declared on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Most virtio-mmio devices the guest looks at.
pub const MAX_DEVICES: usize = 8;

/// Everything the guest reads from its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub workload: Workload,
    pub dirty_mib: u64,
    pub dirty_rate_mib_s: u64,
    /// Units of the compute job.
    pub work_units: u64,
    /// Percent of every 100 ms each vCPU is busy under the burn workload.
    pub duty_pct: u8,
    pub disk_mib: u64,
    pub disk_rate_mib_s: u64,
    pub disk_passes: u64,
    pub poweroff_after_ms: Option<u64>,
    /// The CPU (by start order, 0 = boot CPU) that faults on purpose.
    pub fault_cpu: Option<u32>,
    pub ipv4: Option<Ipv4Config>,
    pub devices: [Option<VirtioMmioDevice>; MAX_DEVICES],
}

impl Default for Params {
    fn default() -> Self {
        Self {
            workload: Workload::Echo,
            dirty_mib: 64,
            dirty_rate_mib_s: 0,
            work_units: DEFAULT_WORK_UNITS,
            duty_pct: DEFAULT_DUTY_PCT,
            disk_mib: 64,
            disk_rate_mib_s: 0,
            disk_passes: 0,
            poweroff_after_ms: None,
            fault_cpu: None,
            ipv4: None,
            devices: [None; MAX_DEVICES],
        }
    }
}

impl Params {
    /// Parses a command line; parameters it does not know are the kernel's or someone else's,
    /// and malformed values of its own keep their defaults (a guest has no one to complain to
    /// before its console works, so the ready line shows what was understood).
    pub fn parse(cmdline: &str) -> Self {
        let mut p = Params::default();
        let mut ndev = 0;
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "vmm.workload" => p.workload = Workload::from_name(value).unwrap_or(p.workload),
                "vmm.dirty_mib" => p.dirty_mib = value.parse().unwrap_or(p.dirty_mib),
                "vmm.dirty_rate" => p.dirty_rate_mib_s = value.parse().unwrap_or(p.dirty_rate_mib_s),
                "vmm.work" => p.work_units = value.parse().unwrap_or(p.work_units),
                "vmm.duty" => p.duty_pct = value.parse().ok().filter(|d| *d <= 100).unwrap_or(p.duty_pct),
                "vmm.disk_mib" => p.disk_mib = value.parse().unwrap_or(p.disk_mib),
                "vmm.disk_rate" => p.disk_rate_mib_s = value.parse().unwrap_or(p.disk_rate_mib_s),
                "vmm.disk_passes" => p.disk_passes = value.parse().unwrap_or(p.disk_passes),
                "vmm.poweroff_after_ms" => p.poweroff_after_ms = value.parse().ok(),
                "vmm.fault_cpu" => p.fault_cpu = value.parse().ok(),
                "ip" => p.ipv4 = parse_ip(value),
                "virtio_mmio.device" => {
                    if let Some(d) = parse_virtio_mmio(value)
                        && ndev < MAX_DEVICES
                    {
                        p.devices[ndev] = Some(d);
                        ndev += 1;
                    }
                }
                _ => {}
            }
        }
        p
    }

    /// The declared virtio-mmio devices.
    pub fn devices(&self) -> impl Iterator<Item = &VirtioMmioDevice> {
        self.devices.iter().flatten()
    }
}

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        *o = parts.next()?.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

fn parse_ip(value: &str) -> Option<Ipv4Config> {
    let mut f = value.split(':');
    let address = parse_ipv4(f.next()?)?;
    let _server = f.next();
    let gateway = f.next().and_then(parse_ipv4);
    let prefix_len = match f.next().and_then(parse_ipv4) {
        Some(mask) => {
            let m = u32::from_be_bytes(mask);
            // A netmask is ones then zeros.
            if m.leading_ones() + m.trailing_zeros() != 32 {
                return None;
            }
            m.leading_ones() as u8
        }
        None => 24,
    };
    Some(Ipv4Config { address, gateway, prefix_len })
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    parse_u64(num)?.checked_mul(mult)
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_virtio_mmio(value: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = value.split_once('@')?;
    let (base, irq) = rest.split_once(':')?;
    // Linux allows `:irq[:id]`; the id is not ours to care about.
    let irq = irq.split(':').next()?;
    Some(VirtioMmioDevice { base: parse_u64(base)?, size: parse_size(size)?, irq: irq.parse().ok()? })
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn defaults() {
        let p = Params::parse("console=ttyS0 reboot=k");
        assert_eq!(p, Params::default());
        assert_eq!(p.workload, Workload::Echo);
    }

    #[test]
    fn full_line() {
        let p = Params::parse(
            "console=ttyS0 vmm.workload=dirty vmm.dirty_mib=128 vmm.dirty_rate=32 vmm.poweroff_after_ms=500 \
             ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6:2",
        );
        assert_eq!(p.workload, Workload::Dirty);
        assert_eq!((p.dirty_mib, p.dirty_rate_mib_s, p.poweroff_after_ms), (128, 32, Some(500)));
        assert_eq!((p.work_units, p.duty_pct), (DEFAULT_WORK_UNITS, DEFAULT_DUTY_PCT));
        assert_eq!(p.fault_cpu, None);
        assert_eq!(Params::parse("vmm.fault_cpu=3").fault_cpu, Some(3));
        let d = Params::parse("vmm.workload=disk vmm.disk_mib=8 vmm.disk_rate=10 vmm.disk_passes=1");
        assert_eq!((d.workload, d.disk_mib, d.disk_rate_mib_s, d.disk_passes), (Workload::Disk, 8, 10, 1));
        assert_eq!(p.ipv4, Some(Ipv4Config { address: [10, 0, 0, 2], gateway: Some([10, 0, 0, 1]), prefix_len: 24 }));
        let d: [_; 2] = core::array::from_fn(|i| p.devices[i].unwrap());
        assert_eq!(d[0], VirtioMmioDevice { base: 0xd000_0000, size: 4096, irq: 5 });
        assert_eq!(d[1], VirtioMmioDevice { base: 0xd000_1000, size: 4096, irq: 6 });
        assert_eq!(p.devices().count(), 2);
    }

    #[test]
    fn workloads_and_their_parameters() {
        for w in [
            Workload::Echo,
            Workload::Dirty,
            Workload::Compute,
            Workload::Burn,
            Workload::Disk,
            Workload::DiskBench,
            Workload::Idle,
        ] {
            assert_eq!(Params::parse(&std::format!("vmm.workload={}", w.name())).workload, w);
        }
        let p = Params::parse("vmm.workload=compute vmm.work=1234");
        assert_eq!((p.workload, p.work_units), (Workload::Compute, 1234));
        let p = Params::parse("vmm.workload=burn vmm.duty=30");
        assert_eq!((p.workload, p.duty_pct), (Workload::Burn, 30));
        assert_eq!(Params::parse("vmm.duty=100").duty_pct, 100);
        assert_eq!(Params::parse("vmm.duty=0").duty_pct, 0);
    }

    #[test]
    fn malformed_values_are_ignored() {
        let p = Params::parse(
            "vmm.workload=bogus vmm.dirty_mib=lots ip=300.1.1.1 ip2=1 virtio_mmio.device=4K@nothex:5 \
             virtio_mmio.device=@: vmm.work=-1 vmm.duty=101 vmm.duty=x",
        );
        assert_eq!(p, Params::default());
        assert_eq!(Params::parse("ip=10.0.0.2::10.0.0.1:255.0.255.0").ipv4, None, "holes in the mask");
        assert_eq!(Params::parse("ip=10.1.2.3").ipv4.unwrap().prefix_len, 24);
    }
}
