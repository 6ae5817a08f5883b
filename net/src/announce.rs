// SPDX-License-Identifier: Apache-2.0
//! Announcing a moved guest: after a migration the switches (here: Linux bridges) still send the
//! guest's frames to the port of the host it left, and peers' ARP caches are fine but their
//! traffic goes nowhere until the guest's MAC is seen from its new port. So the destination
//! writes, into the guest's TAP, a RARP for the MAC (what QEMU sends) and gratuitous ARP, both
//! request and reply forms, for each IPv4 address the guest uses, in rounds of growing spacing.
//!
//! The addresses come from the guest's own traffic ([`AddressLearner`]) and from `ip=` on its
//! command line.

use serde::{Deserialize, Serialize};

use crate::MacAddr;

use guest_common::arp::{self, ETH_P_ARP, ETH_P_IP};

/// Most addresses remembered per NIC.
const MAX_ADDRESSES: usize = 8;

/// When announce rounds go out after resume: `rounds` rounds, the first at once, the gaps
/// starting at `initial_ms` and growing by `step_ms` (QEMU's defaults: 5, 50, 100, which give
/// 0, 50, 200, 450 and 800 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceSchedule {
    pub rounds: u32,
    pub initial_ms: u64,
    pub step_ms: u64,
    /// With the first round, send duplicate ACKs on the guest's TCP flows (see
    /// [`crate::flows`]).
    pub kick_tcp: bool,
}

impl Default for AnnounceSchedule {
    fn default() -> Self {
        AnnounceSchedule { rounds: 5, initial_ms: 50, step_ms: 100, kick_tcp: true }
    }
}

impl AnnounceSchedule {
    /// Milliseconds after resume of each round.
    pub fn offsets_ms(&self) -> Vec<u64> {
        let mut t = 0;
        (0..self.rounds)
            .map(|i| {
                if i > 0 {
                    t += self.initial_ms + self.step_ms * u64::from(i - 1);
                }
                t
            })
            .collect()
    }
}

/// The IPv4 addresses a guest uses, learned from the frames it sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressLearner {
    pub ipv4: Vec<[u8; 4]>,
}

fn usable(ip: [u8; 4]) -> bool {
    // Not 0.0.0.0, not multicast or broadcast.
    ip != [0; 4] && ip[0] < 224 && ip != [255; 4]
}

impl AddressLearner {
    /// Adds an address (e.g. from `ip=`).
    pub fn add(&mut self, ip: [u8; 4]) {
        if usable(ip) && !self.ipv4.contains(&ip) && self.ipv4.len() < MAX_ADDRESSES {
            self.ipv4.push(ip);
        }
    }

    /// Looks at one Ethernet frame the guest with `mac` sent: the sender of its ARP packets and
    /// the source of its IPv4 packets are its addresses. A few byte compares per frame.
    pub fn observe(&mut self, mac: &MacAddr, frame: &[u8]) {
        if frame.len() < 14 || frame[6..12] != mac[..] {
            return;
        }
        let ip = match u16::from_be_bytes([frame[12], frame[13]]) {
            // ARP for IPv4 over Ethernet: sender hardware address at 22, sender IP at 28.
            ETH_P_ARP if frame.len() >= 42 && frame[22..28] == mac[..] => [frame[28], frame[29], frame[30], frame[31]],
            // IPv4 source address at 14 + 12.
            ETH_P_IP if frame.len() >= 34 && frame[14] >> 4 == 4 => [frame[26], frame[27], frame[28], frame[29]],
            _ => return,
        };
        if !self.ipv4.contains(&ip) {
            self.add(ip);
        }
    }
}

/// The frames of one announce round for a guest with `mac` and `addresses`: a RARP, then for
/// each address a gratuitous ARP request and a gratuitous ARP reply, all broadcast.
pub fn announce_frames(mac: MacAddr, addresses: &[[u8; 4]]) -> Vec<[u8; arp::FRAME_LEN]> {
    let mut frames = Vec::with_capacity(1 + 2 * addresses.len());
    frames.push(arp::rarp(mac));
    for &ip in addresses {
        frames.push(arp::garp_request(mac, ip));
        frames.push(arp::garp_reply(mac, ip));
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = [0x52, 0x54, 0, 1, 2, 3];

    #[test]
    fn default_schedule_is_qemus() {
        assert_eq!(AnnounceSchedule::default().offsets_ms(), vec![0, 50, 200, 450, 800]);
        let s = |rounds| AnnounceSchedule { rounds, initial_ms: 10, step_ms: 0, kick_tcp: false };
        assert_eq!(s(1).offsets_ms(), vec![0]);
        assert!(s(0).offsets_ms().is_empty());
    }

    #[test]
    fn frames_are_well_formed() {
        let frames = announce_frames(MAC, &[[10, 0, 0, 2]]);
        assert_eq!(frames.len(), 3);
        for f in &frames {
            assert_eq!(f.len(), 60);
            assert_eq!(&f[0..6], &[0xff; 6]);
            assert_eq!(&f[6..12], &MAC);
            assert_eq!(&f[22..28], &MAC, "sender hardware address");
        }
        assert_eq!(u16::from_be_bytes([frames[0][12], frames[0][13]]), arp::ETH_P_RARP);
        assert_eq!(u16::from_be_bytes([frames[0][20], frames[0][21]]), 3);
        assert_eq!(u16::from_be_bytes([frames[1][20], frames[1][21]]), 1, "request");
        assert_eq!(&frames[1][28..32], &[10, 0, 0, 2]);
        assert_eq!(&frames[1][38..42], &[10, 0, 0, 2], "gratuitous: target is itself");
        assert_eq!(u16::from_be_bytes([frames[2][20], frames[2][21]]), 2, "reply");
    }

    #[test]
    fn learns_from_the_guests_arp_and_ip_but_not_from_others() {
        let mut l = AddressLearner::default();
        // Our own ARP request: learn 10.0.0.2.
        l.observe(&MAC, &arp::garp_request(MAC, [10, 0, 0, 2]));
        // An IPv4 packet from 10.0.0.9.
        let mut ip = vec![1u8; 6];
        ip.extend_from_slice(&MAC);
        ip.extend_from_slice(&ETH_P_IP.to_be_bytes());
        ip.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 9, 10, 0, 0, 1]);
        l.observe(&MAC, &ip);
        // Someone else's frame and junk: ignored.
        l.observe(&MAC, &arp::garp_request([2; 6], [10, 0, 0, 7]));
        l.observe(&MAC, &[0; 10]);
        l.add([0, 0, 0, 0]);
        l.add([224, 0, 0, 1]);
        assert_eq!(l.ipv4, vec![[10, 0, 0, 2], [10, 0, 0, 9]]);
        for i in 0..20 {
            l.add([10, 1, 0, i]);
        }
        assert_eq!(l.ipv4.len(), MAX_ADDRESSES, "bounded");
    }
}
