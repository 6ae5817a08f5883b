// SPDX-License-Identifier: Apache-2.0
//! Announce frames: RARP for a MAC (what QEMU sends after a migration) and gratuitous ARP, in
//! request and reply form, for an IPv4 address. The VMM writes them into a moved guest's TAP
//! and our guest kernel sends them itself when its NIC asks it to announce.

/// A MAC address.
pub type Mac = [u8; 6];

/// Frames are padded to the 60-byte Ethernet minimum.
pub const FRAME_LEN: usize = 60;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_RARP: u16 = 0x8035;
const BROADCAST: Mac = [0xff; 6];

fn frame(ethertype: u16, op: u16, sha: Mac, spa: [u8; 4], tha: Mac, tpa: [u8; 4]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa);
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa);
    f
}

/// RARP "reverse request" from `mac` (sender and target both `mac`, addresses unknown).
pub fn rarp(mac: Mac) -> [u8; FRAME_LEN] {
    frame(ETH_P_RARP, 3, mac, [0; 4], mac, [0; 4])
}

/// Gratuitous ARP request: "who has `ip`? tell `ip`" from `mac`.
pub fn garp_request(mac: Mac, ip: [u8; 4]) -> [u8; FRAME_LEN] {
    frame(ETH_P_ARP, 1, mac, ip, [0; 6], ip)
}

/// Gratuitous ARP reply: "`ip` is at `mac`", to everyone.
pub fn garp_reply(mac: Mac, ip: [u8; 4]) -> [u8; FRAME_LEN] {
    frame(ETH_P_ARP, 2, mac, ip, BROADCAST, ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let r = rarp(mac);
        assert_eq!(u16::from_be_bytes([r[12], r[13]]), ETH_P_RARP);
        assert_eq!(u16::from_be_bytes([r[20], r[21]]), 3);
        let q = garp_request(mac, [10, 0, 0, 2]);
        assert_eq!(&q[0..6], &[0xff; 6]);
        assert_eq!(&q[22..28], &mac);
        assert_eq!((&q[28..32], &q[38..42]), (&[10, 0, 0, 2][..], &[10, 0, 0, 2][..]));
        assert_eq!(u16::from_be_bytes([q[20], q[21]]), 1);
        let p = garp_reply(mac, [10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 2);
        assert_eq!(&p[32..38], &[0xff; 6], "addressed to everyone");
    }
}
