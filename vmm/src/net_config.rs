// SPDX-License-Identifier: Apache-2.0
//! `--net tap=NAME[,mac=MAC]`: one virtio-net device on a TAP.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A NIC as the user described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Mac,
}

/// A MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid MAC address '{s}': expected six hex bytes like 52:54:00:12:34:56");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!("invalid MAC address '{s}': a multicast address cannot be a NIC's"));
        }
        Ok(Mac(mac))
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl Mac {
    /// A locally administered unicast address derived from the TAP name and the process, so
    /// that NICs differ without the user having to choose.
    pub fn generate(seed: &str) -> Mac {
        // FNV-1a over the seed, the pid and the time: different VMs, different MACs.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        for b in seed.bytes().chain(std::process::id().to_le_bytes()).chain(now.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let b = h.to_le_bytes();
        Mac([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl FromStr for NetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(v.parse()?),
                _ => {
                    return Err(format!("invalid --net '{s}': expected tap=NAME[,mac=MAC], got '{part}'"));
                }
            }
        }
        let tap = tap.ok_or_else(|| format!("invalid --net '{s}': tap=NAME is required"))?;
        let mac = mac.unwrap_or_else(|| Mac::generate(&tap));
        Ok(NetConfig { tap, mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_and_mac() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.to_string(), "52:54:00:ab:cd:01");
        let n: NetConfig = "tap=tap1".parse().unwrap();
        assert_eq!(n.mac.0[0], 0x02, "generated MACs are locally administered unicast");
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "tap=",
            "mac=52:54:00:00:00:01",
            "tap=a,mtu=9000",
            "tap=a,mac=52:54:00:00:00",
            "tap=a,mac=zz:54:00:00:00:01",
            "tap=a,mac=01:00:5e:00:00:01",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_round_trips_through_json() {
        let m: Mac = "52:54:00:00:00:07".parse().unwrap();
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:54:00:00:00:07\"");
        assert_eq!(serde_json::from_str::<Mac>(&j).unwrap(), m);
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
    }
}
