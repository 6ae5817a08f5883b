// SPDX-License-Identifier: Apache-2.0
//! Taking the guest's addresses over after a migration: the announce frames
//! ([`crate::announce`]) and duplicate ACKs ([`crate::flows`]) written into the destination's
//! TAP as if the guest had sent them.

use crate::announce::announce_frames;
use crate::device::Net;
use crate::flows::DUP_ACKS;
use crate::tap::VNET_HDR_LEN;

impl Net {
    /// Adds an address the guest uses (e.g. from `ip=` on its command line).
    pub fn add_address(&mut self, ip: [u8; 4]) {
        self.addresses.add(ip);
    }

    /// The guest's IPv4 addresses known so far.
    pub fn addresses(&self) -> &[[u8; 4]] {
        &self.addresses.ipv4
    }

    /// Writes one announce round (RARP and gratuitous ARP, see [`crate::announce`]) into the
    /// TAP, as if the guest had sent it. Returns the number of frames written.
    pub fn announce(&mut self) -> usize {
        let mut n = 0;
        for frame in announce_frames(self.mac, &self.addresses.ipv4) {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&frame);
            match self.tap.write_frame(&f) {
                Ok(_) => n += 1,
                Err(e) => log::debug!("virtio-net: announce on {}: {e}", self.tap.name()),
            }
        }
        n
    }

    /// Sends, for each TCP flow of the guest, [`DUP_ACKS`] duplicate ACKs (see [`crate::flows`]): peers
    /// whose segments were lost during the move retransmit them at once instead of waiting for
    /// their retransmission timer. Returns the number of frames written.
    pub fn kick_tcp_flows(&mut self) -> usize {
        let mut n = 0;
        for ack in self.flows.dup_acks() {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&ack);
            for _ in 0..DUP_ACKS {
                if self.tap.write_frame(&f).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::device::TX_INDEX;
    use crate::test_utils::*;

    #[test]
    fn addresses_are_learned_from_tx_and_announced_on_the_tap() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        // The guest ARPs for its gateway: that tells us its own address.
        let arp = guest_common::arp::garp_request(GUEST_MAC, [10, 7, 0, 2]);
        let len = put_tx_frame(&rig, BUFFERS, &arp);
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert_eq!(rig.net.lock().unwrap().addresses(), &[[10, 7, 0, 2]]);
        assert_eq!(rig.net.lock().unwrap().announce(), 3, "RARP, ARP request, ARP reply");
        let ethertype = |f: &[u8]| u16::from_be_bytes([f[12], f[13]]);
        let rarp = rig.wire.recv_matching(Duration::from_secs(2), |f| f.len() >= 14 && ethertype(f) == 0x8035);
        assert_eq!(rarp.map(|f| f[6..12].to_vec()), Some(GUEST_MAC.to_vec()));
        let garp = rig.wire.recv_matching(Duration::from_secs(2), |f| {
            f.len() >= 42 && ethertype(f) == 0x0806 && f[21] == 2 && f[28..32] == [10, 7, 0, 2]
        });
        assert!(garp.is_some(), "gratuitous ARP reply for 10.7.0.2 on the wire");
    }
}
