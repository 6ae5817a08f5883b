// SPDX-License-Identifier: Apache-2.0
//! The guest's parameters on the kernel command line.
//!
//! - `vmm.workload=echo|dirty|disk|idle` (default `echo`)
//! - `vmm.dirty_mib=N` memory the dirty workload covers (default 64)
//! - `vmm.dirty_rate=N` MiB/s it writes, 0 for as fast as it can (default 0)
//! - `vmm.disk_mib=N` disk space the disk workload covers (default 64), `vmm.disk_rate=N` MiB/s
//!   it writes (default 0: as fast as it can), `vmm.disk_passes=N` passes before it stops
//!   (default 0: never)
//! - `vmm.poweroff_after_ms=N` power off N ms after the ready line (default: run until asked)
//! - `ip=CLIENT:SERVER:GATEWAY:NETMASK:HOST:DEVICE:AUTOCONF` as Linux's IP_PNP reads it
//! - `virtio_mmio.device=SIZE@BASE:IRQ` as Linux's virtio-mmio driver reads it (repeatable)

/// What the guest runs once it is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// TCP echo server on [`crate::ECHO_PORT`] (with the discard and source services). Those
    /// also run under the other workloads whenever `ip=` gives the guest an address.
    Echo,
    /// Writes and verifies a pattern over `dirty_mib` MiB at `dirty_rate` MiB/s.
    Dirty,
    /// Writes and verifies a pattern over `disk_mib` MiB of the first disk at `disk_rate` MiB/s.
    Disk,
    /// Nothing; waits for a control request.
    Idle,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::Dirty => "dirty",
            Workload::Disk => "disk",
            Workload::Idle => "idle",
        }
    }
}

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
    pub disk_mib: u64,
    pub disk_rate_mib_s: u64,
    pub disk_passes: u64,
    pub poweroff_after_ms: Option<u64>,
    pub ipv4: Option<Ipv4Config>,
    pub devices: [Option<VirtioMmioDevice>; MAX_DEVICES],
}

impl Default for Params {
    fn default() -> Self {
        Self {
            workload: Workload::Echo,
            dirty_mib: 64,
            dirty_rate_mib_s: 0,
            disk_mib: 64,
            disk_rate_mib_s: 0,
            disk_passes: 0,
            poweroff_after_ms: None,
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
                "vmm.workload" => {
                    p.workload = match value {
                        "echo" => Workload::Echo,
                        "dirty" => Workload::Dirty,
                        "disk" => Workload::Disk,
                        "idle" => Workload::Idle,
                        _ => p.workload,
                    }
                }
                "vmm.dirty_mib" => p.dirty_mib = value.parse().unwrap_or(p.dirty_mib),
                "vmm.dirty_rate" => p.dirty_rate_mib_s = value.parse().unwrap_or(p.dirty_rate_mib_s),
                "vmm.disk_mib" => p.disk_mib = value.parse().unwrap_or(p.disk_mib),
                "vmm.disk_rate" => p.disk_rate_mib_s = value.parse().unwrap_or(p.disk_rate_mib_s),
                "vmm.disk_passes" => p.disk_passes = value.parse().unwrap_or(p.disk_passes),
                "vmm.poweroff_after_ms" => p.poweroff_after_ms = value.parse().ok(),
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
        let d = Params::parse("vmm.workload=disk vmm.disk_mib=8 vmm.disk_rate=10 vmm.disk_passes=1");
        assert_eq!((d.workload, d.disk_mib, d.disk_rate_mib_s, d.disk_passes), (Workload::Disk, 8, 10, 1));
        assert_eq!(p.ipv4, Some(Ipv4Config { address: [10, 0, 0, 2], gateway: Some([10, 0, 0, 1]), prefix_len: 24 }));
        let d: [_; 2] = core::array::from_fn(|i| p.devices[i].unwrap());
        assert_eq!(d[0], VirtioMmioDevice { base: 0xd000_0000, size: 4096, irq: 5 });
        assert_eq!(d[1], VirtioMmioDevice { base: 0xd000_1000, size: 4096, irq: 6 });
        assert_eq!(p.devices().count(), 2);
    }

    #[test]
    fn malformed_values_are_ignored() {
        let p = Params::parse(
            "vmm.workload=bogus vmm.dirty_mib=lots ip=300.1.1.1 ip2=1 virtio_mmio.device=4K@nothex:5 \
             virtio_mmio.device=@:",
        );
        assert_eq!(p, Params::default());
        assert_eq!(Params::parse("ip=10.0.0.2::10.0.0.1:255.0.255.0").ipv4, None, "holes in the mask");
        assert_eq!(Params::parse("ip=10.1.2.3").ipv4.unwrap().prefix_len, 24);
    }
}
