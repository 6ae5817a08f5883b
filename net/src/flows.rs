// SPDX-License-Identifier: Apache-2.0
//! Getting TCP moving again right after a migration.
//!
//! Segments a peer sends while the guest is paused, or before the network has learned the
//! guest's new port, are lost; the peer resends them only when its retransmission timer fires
//! (at least 200 ms on Linux, doubling each time), so that timer, not the migration's downtime,
//! decides how long the connection stalls. Three duplicate ACKs make a TCP sender retransmit at
//! once ("fast retransmit", RFC 5681). So the device remembers, per TCP flow, the headers of the
//! last segment the guest sent; after a migration the destination turns each into a pure ACK
//! (the guest's next sequence number, the same acknowledgement number and window) and sends it
//! [`DUP_ACKS`] times. For a peer with nothing outstanding they are harmless duplicates.

use serde::{Deserialize, Serialize};

const ETH_HDR: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Flows remembered per NIC; the least recently seen goes first.
const MAX_FLOWS: usize = 64;
/// Copies of each ACK: the duplicate-ACK threshold of fast retransmit is 3, and when the
/// guest's last segment carried data, the peer takes the first copy (whose sequence number is
/// past what it last saw) for a window update rather than a duplicate (Linux's
/// `tcp_may_update_window`), so one more.
pub const DUP_ACKS: usize = 4;

/// The last segment the guest sent on one flow: Ethernet, IPv4 and TCP headers (options
/// included, payload not), and how many payload bytes followed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub headers: Vec<u8>,
    pub payload_len: u32,
}

impl Flow {
    fn key(&self) -> [u8; 12] {
        key(&self.headers).unwrap_or([0; 12])
    }
}

/// (source IP, destination IP, source port, destination port) of a frame's TCP segment.
fn key(frame: &[u8]) -> Option<[u8; 12]> {
    let ihl = usize::from(frame.get(ETH_HDR)? & 0xf) * 4;
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(frame.get(ETH_HDR + 12..ETH_HDR + 20)?);
    k[8..].copy_from_slice(frame.get(ETH_HDR + ihl..ETH_HDR + ihl + 4)?);
    Some(k)
}

/// The TCP flows of a guest, as seen on its transmit path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTracker {
    pub flows: Vec<Flow>,
}

impl FlowTracker {
    /// Looks at one frame the guest sent (a few header reads when it is not TCP over IPv4).
    pub fn observe(&mut self, frame: &[u8]) {
        if frame.len() < ETH_HDR + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
            return;
        }
        let ip = &frame[ETH_HDR..];
        let ihl = usize::from(ip[0] & 0xf) * 4;
        // IPv4, TCP, not a fragment.
        if ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP || ihl < 20 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return;
        }
        let Some(tcp) = ip.get(ihl..) else { return };
        if tcp.len() < 20 {
            return;
        }
        let doff = usize::from(tcp[12] >> 4) * 4;
        let flags = tcp[13];
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let Some(k) = key(frame) else { return };
        let pos = self.flows.iter().position(|f| f.key() == k);
        if flags & (TCP_FIN | TCP_RST) != 0 {
            // The flow ends: nothing to revive.
            if let Some(p) = pos {
                self.flows.remove(p);
            }
            return;
        }
        if flags & TCP_SYN != 0 || flags & TCP_ACK == 0 || doff < 20 || ETH_HDR + ihl + doff > frame.len() {
            return;
        }
        // TSO frames carry the payload of many segments; the header says how much in total.
        let payload_len = total.saturating_sub(ihl + doff) as u32;
        let flow = Flow { headers: frame[..ETH_HDR + ihl + doff].to_vec(), payload_len };
        if let Some(p) = pos {
            self.flows.remove(p);
        } else if self.flows.len() == MAX_FLOWS {
            self.flows.remove(0);
        }
        self.flows.push(flow);
    }

    /// For each flow, a pure ACK as the guest would send it next.
    pub fn dup_acks(&self) -> Vec<Vec<u8>> {
        self.flows.iter().filter_map(pure_ack).collect()
    }
}

fn pure_ack(flow: &Flow) -> Option<Vec<u8>> {
    let mut f = flow.headers.clone();
    let ihl = usize::from(f.get(ETH_HDR)? & 0xf) * 4;
    let t = ETH_HDR + ihl;
    let tcp_len = f.len().checked_sub(t)?;
    // IPv4: total length without payload, checksum recomputed.
    f[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&((ihl + tcp_len) as u16).to_be_bytes());
    f[ETH_HDR + 10..ETH_HDR + 12].fill(0);
    let ip_sum = checksum(0, &f[ETH_HDR..t]);
    f[ETH_HDR + 10..ETH_HDR + 12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP: the next sequence number, ACK only, checksum over the pseudo-header.
    let seq = u32::from_be_bytes([f[t + 4], f[t + 5], f[t + 6], f[t + 7]]).wrapping_add(flow.payload_len);
    f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    f[t + 13] = TCP_ACK;
    f[t + 16..t + 18].fill(0);
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&f[ETH_HDR + 12..ETH_HDR + 20]);
    pseudo[9] = IPPROTO_TCP;
    pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let sum = checksum(sum_words(0, &pseudo), &f[t..]);
    f[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
    // Pad to the Ethernet minimum.
    if f.len() < 60 {
        f.resize(60, 0);
    }
    Some(f)
}

fn sum_words(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = sum_words(initial, data);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with `payload` and `flags`.
    fn segment(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HDR];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, IPPROTO_TCP, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let s = checksum(0, &ip);
        ip[10..12].copy_from_slice(&s.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&7000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&4096u16.to_be_bytes());
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_ack_follows_the_last_segment_and_checksums_verify() {
        let mut t = FlowTracker::default();
        t.observe(&segment(40000, 1000, 5000, TCP_ACK | 0x08, b"hello"));
        t.observe(&segment(40000, 1005, 6000, TCP_ACK, b"abc"));
        let acks = t.dup_acks();
        assert_eq!(acks.len(), 1);
        let a = &acks[0];
        assert_eq!(a.len(), 60, "padded");
        let tcp = &a[ETH_HDR + 20..];
        assert_eq!(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), 1008, "next sequence number");
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 6000, "latest acknowledgement");
        assert_eq!(tcp[13], TCP_ACK);
        assert_eq!(u16::from_be_bytes([a[ETH_HDR + 2], a[ETH_HDR + 3]]), 40, "no payload");
        // A valid checksum sums to zero (all ones before the final complement).
        assert_eq!(checksum(0, &a[ETH_HDR..ETH_HDR + 20]), 0, "IP checksum");
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&a[ETH_HDR + 12..ETH_HDR + 20]);
        pseudo[9] = IPPROTO_TCP;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(sum_words(0, &pseudo), &a[ETH_HDR + 20..ETH_HDR + 40]), 0, "TCP checksum");
    }

    #[test]
    fn flows_end_with_fin_or_rst_and_handshakes_are_ignored() {
        let mut t = FlowTracker::default();
        t.observe(&segment(1, 0, 0, TCP_SYN, b""));
        assert!(t.flows.is_empty());
        t.observe(&segment(1, 1, 1, TCP_ACK, b""));
        t.observe(&segment(2, 1, 1, TCP_ACK, b""));
        assert_eq!(t.flows.len(), 2);
        t.observe(&segment(1, 1, 1, TCP_ACK | TCP_FIN, b""));
        t.observe(&segment(2, 1, 1, TCP_RST, b""));
        assert!(t.flows.is_empty());
        // Not TCP, truncated, junk: nothing happens.
        t.observe(&[0u8; 10]);
        let mut udp = segment(3, 1, 1, TCP_ACK, b"x");
        udp[ETH_HDR + 9] = 17;
        t.observe(&udp);
        assert!(t.flows.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = FlowTracker::default();
        for p in 0..(MAX_FLOWS as u16 + 10) {
            t.observe(&segment(1000 + p, 1, 1, TCP_ACK, b""));
        }
        assert_eq!(t.flows.len(), MAX_FLOWS);
        assert_eq!(t.flows[0].key()[8..10], (1010u16).to_be_bytes(), "oldest went first");
    }
}
