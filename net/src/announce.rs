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

use crate::device::MacAddr;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_RARP: u16 = 0x8035;
const BROADCAST: MacAddr = [0xff; 6];
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
}

impl Default for AnnounceSchedule {
    fn default() -> Self {
        AnnounceSchedule { rounds: 5, initial_ms: 50, step_ms: 100 }
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

fn ethernet(dst: MacAddr, src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn arp_body(f: &mut Vec<u8>, op: u16, sha: MacAddr, spa: [u8; 4], tha: MacAddr, tpa: [u8; 4]) {
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    // Pad to the 60-byte Ethernet minimum.
    f.resize(60, 0);
}

/// The frames of one announce round for a guest with `mac` and `addresses`: a RARP, then for
/// each address a gratuitous ARP request and a gratuitous ARP reply, all broadcast.
pub fn announce_frames(mac: MacAddr, addresses: &[[u8; 4]]) -> Vec<Vec<u8>> {
    let mut frames = Vec::with_capacity(1 + 2 * addresses.len());
    // RARP "reverse request": sender and target both the guest's MAC, addresses unknown.
    let mut rarp = ethernet(BROADCAST, mac, ETH_P_RARP);
    arp_body(&mut rarp, 3, mac, [0; 4], mac, [0; 4]);
    frames.push(rarp);
    for &ip in addresses {
        let mut req = ethernet(BROADCAST, mac, ETH_P_ARP);
        arp_body(&mut req, 1, mac, ip, [0; 6], ip);
        frames.push(req);
        let mut reply = ethernet(BROADCAST, mac, ETH_P_ARP);
        arp_body(&mut reply, 2, mac, ip, BROADCAST, ip);
        frames.push(reply);
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
        assert_eq!(AnnounceSchedule { rounds: 1, initial_ms: 10, step_ms: 0 }.offsets_ms(), vec![0]);
        assert!(AnnounceSchedule { rounds: 0, initial_ms: 10, step_ms: 0 }.offsets_ms().is_empty());
    }

    #[test]
    fn frames_are_well_formed() {
        let frames = announce_frames(MAC, &[[10, 0, 0, 2]]);
        assert_eq!(frames.len(), 3);
        for f in &frames {
            assert_eq!(f.len(), 60);
            assert_eq!(&f[0..6], &BROADCAST);
            assert_eq!(&f[6..12], &MAC);
            assert_eq!(&f[22..28], &MAC, "sender hardware address");
        }
        assert_eq!(u16::from_be_bytes([frames[0][12], frames[0][13]]), ETH_P_RARP);
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
        let arp = announce_frames(MAC, &[[10, 0, 0, 2]]).remove(1);
        l.observe(&MAC, &arp);
        // An IPv4 packet from 10.0.0.9.
        let mut ip = ethernet([1; 6], MAC, ETH_P_IP);
        ip.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 9, 10, 0, 0, 1]);
        l.observe(&MAC, &ip);
        // Someone else's frame and junk: ignored.
        let other = announce_frames([2; 6], &[[10, 0, 0, 7]]).remove(1);
        l.observe(&MAC, &other);
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
