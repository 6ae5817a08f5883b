// SPDX-License-Identifier: Apache-2.0
//! virtio-net RX: frames from the TAP (or the backlog a migration brought) into the guest's RX
//! buffers, and draining the TAP into the backlog on a migration source.
//!
//! Buffers in the wrong direction or too small for a frame cost the guest that frame (counted
//! as a drop); a frame that finds no buffer waits in the device for the next one. Every write
//! into guest memory goes through the dirty-tracked `GuestMemoryMmap`, so live migration sees
//! it.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use virtio::GuestMemoryMmap;
use virtio::queue::notify_after;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::device::{MAX_FRAME, Net, RX_INDEX, has};
use crate::tap::VNET_HDR_LEN;

/// Most frames carried over from a migration source's TAP.
pub(crate) const MAX_BACKLOG: usize = 256;

impl Net {
    /// Moves frames from the TAP into the guest until either runs dry.
    pub fn process_rx(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queue_in_use(RX_INDEX) {
            return;
        }
        if !self.avail_ok(RX_INDEX, &mem) {
            return;
        }
        // The driver need not tell us about new RX buffers while we have some: only when a
        // frame waits for buffers (below) is its notification useful, and otherwise each
        // refill would cost it an MMIO exit. QEMU does the same.
        if let Err(e) = self.queues[RX_INDEX].disable_notification(&mem) {
            return self.broken(&format!("rx: {e:?}"));
        }
        let mut delivered = false;
        // The available index after which we asked the driver to notify us (see NoBuffers).
        let mut asked_after = None;
        loop {
            let len = match self.rx_frame_len {
                Some(len) => len,
                None if !self.backlog.is_empty() => {
                    let frame = self.backlog.pop_front().unwrap_or_default();
                    let n = frame.len().min(self.rx_frame.len());
                    self.rx_frame[..n].copy_from_slice(&frame[..n]);
                    n
                }
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: TAP read failed: {e}");
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                self.rx_frame_len = None;
                continue;
            }
            match self.deliver(len, &mem) {
                Deliver::Done => {
                    self.rx_frame_len = None;
                    delivered = true;
                }
                Deliver::Dropped => {
                    self.rx_frame_len = None;
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    delivered = true;
                }
                Deliver::NoBuffers => {
                    // Keep the frame; the driver's next RX notification brings us back. The
                    // buffers on offer may be none or too few (a 64 KiB frame spans many
                    // mergeable buffers): ask to hear of any buffer beyond those, then look
                    // once more, and stop once a look after asking found nothing new. (Asking
                    // virtio-queue instead answered "buffers available" forever while they
                    // were too few: this loop spun with the device lock held, the guest never
                    // got the interrupt for what was delivered and so never added buffers.)
                    self.rx_frame_len = Some(len);
                    self.metrics.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                    let seen = match self.queues[RX_INDEX].avail_idx(&mem, Ordering::Acquire) {
                        Ok(idx) => idx.0,
                        Err(e) => {
                            self.broken(&format!("rx: {e:?}"));
                            break;
                        }
                    };
                    if asked_after == Some(seen) {
                        break;
                    }
                    if let Err(e) = notify_after(&mut self.queues[RX_INDEX], &mem, seen) {
                        self.broken(&format!("rx: {e:?}"));
                        break;
                    }
                    asked_after = Some(seen);
                }
                Deliver::Broken(why) => {
                    self.broken(&why);
                    return;
                }
            }
        }
        if delivered {
            self.signal_used(RX_INDEX, &mem);
        }
    }

    /// Copies the frame in `rx_frame[..len]` into as many of the driver's buffers as it needs
    /// (several only with mergeable RX buffers).
    fn deliver(&mut self, len: usize, mem: &GuestMemoryMmap) -> Deliver {
        let mergeable = has(self.acked_features, VIRTIO_NET_F_MRG_RXBUF);
        self.rx_descs.clear();
        let mut capacity = 0usize;
        let mut chains = 0u16;
        let mut bad = false;
        // Take chains until the frame fits.
        while capacity < len {
            let Some(chain) = self.queues[RX_INDEX].pop_descriptor_chain(mem) else {
                for _ in 0..chains {
                    self.queues[RX_INDEX].go_to_previous_position();
                }
                return Deliver::NoBuffers;
            };
            let head = chain.head_index();
            chains += 1;
            let mut chain_capacity = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                chain_capacity += desc.len() as usize;
                self.rx_descs.push((desc.addr(), desc.len(), head));
            }
            // Remember the head even if it had no usable descriptor, so it is returned.
            if chain_capacity == 0 {
                self.rx_descs.push((GuestAddress(0), 0, head));
            }
            capacity += chain_capacity;
            if bad || !mergeable {
                break;
            }
        }
        if bad || capacity < len {
            // Wrong-direction buffers, or a frame too big for a non-mergeable buffer: the
            // frame is lost, the buffers go back to the driver empty.
            return self.return_empty(mem);
        }
        // num_buffers: how many chains this frame spans.
        self.rx_frame[10..12].copy_from_slice(&chains.to_le_bytes());
        let mut off = 0usize;
        let mut per_chain = std::mem::take(&mut self.rx_used);
        per_chain.clear();
        for &(addr, dlen, head) in &self.rx_descs {
            if per_chain.last().map(|c| c.0) != Some(head) {
                per_chain.push((head, 0));
            }
            let n = (dlen as usize).min(len - off);
            if n == 0 {
                continue;
            }
            if mem.write_slice(&self.rx_frame[off..off + n], addr).is_err() {
                self.rx_used = per_chain;
                return self.return_empty(mem);
            }
            off += n;
            if let Some(c) = per_chain.last_mut() {
                c.1 += n as u32;
            }
        }
        for &(head, written) in &per_chain {
            if let Err(e) = self.queues[RX_INDEX].add_used(mem, head, written) {
                return Deliver::Broken(format!("rx used ring: {e:?}"));
            }
        }
        self.rx_used = per_chain;
        self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.metrics.rx_bytes.fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Deliver::Done
    }

    fn return_empty(&mut self, mem: &GuestMemoryMmap) -> Deliver {
        self.metrics.rx_bad_descriptors.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.rx_descs.len() {
            let head = self.rx_descs[i].2;
            if last != Some(head) {
                last = Some(head);
                if let Err(e) = self.queues[RX_INDEX].add_used(mem, head, 0) {
                    return Deliver::Broken(format!("rx used ring: {e:?}"));
                }
            }
        }
        Deliver::Dropped
    }
    /// migration source, frames that arrived after the device was paused travel to the
    /// destination with the device state instead of being lost.
    pub fn drain_tap(&mut self) {
        let mut buf = vec![0u8; MAX_FRAME];
        while self.backlog.len() < MAX_BACKLOG {
            match self.tap.read_frame(&mut buf) {
                Ok(n) if n > VNET_HDR_LEN => self.backlog.push_back(buf[..n].to_vec()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

enum Deliver {
    Done,
    Dropped,
    NoBuffers,
    Broken(String),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::test_utils::*;

    #[test]
    fn rx_delivers_the_tap_frame_and_marks_guest_memory_dirty() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        // Reset the dirty bitmap so that only what the device writes from now on is set.
        let region = rig.mem.iter().next().unwrap();
        let bitmap = (**region).bitmap();
        bitmap.reset();
        let frame = test_frame(&[0xab; 100]);
        rig.wire.send(&frame);
        assert!(rx_until(&rig, &rxq, 1), "frame not delivered");
        let (id, len) = used(&rxq)[0];
        assert_eq!((id, len as usize), (0, VNET_HDR_LEN + frame.len()));
        let mut got = vec![0u8; len as usize];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert!(bitmap.is_addr_set(BUFFERS as usize), "RX buffer page dirty");
        assert!(bitmap.is_addr_set(rxq.used_addr().0 as usize), "used ring page dirty");
        assert!(rig.irq.read().is_ok(), "interrupt raised");
    }

    #[test]
    fn rx_buffer_notifications_are_wanted_only_while_a_frame_waits() {
        let mut rig = Rig::new();
        rig.init(features_without_event_idx(), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        let used_flags = |rig: &Rig| rig.mem.read_obj::<u16>(rxq.used_addr()).unwrap();
        let no_notify = VRING_USED_F_NO_NOTIFY as u16;
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        rig.wire.send(&test_frame(b"one"));
        assert!(rx_until(&rig, &rxq, 1));
        assert_eq!(used_flags(&rig) & no_notify, no_notify, "buffers left: the driver need not notify");
        // No buffer left for the next frame: now the driver must say when it adds one.
        rig.wire.send(&test_frame(b"two"));
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx();
        assert_eq!(used_flags(&rig) & no_notify, 0, "a frame waits: notify us of new buffers");
        rxq.add_desc_chains(&[desc(BUFFERS + 0x1000, 2048, WRITE, 0)], 1).unwrap();
        assert!(rx_until(&rig, &rxq, 2));
        assert_eq!(used_flags(&rig) & no_notify, no_notify);
    }

    #[test]
    fn rx_spreads_a_frame_over_mergeable_buffers() {
        let mut rig = Rig::new();
        rig.init(features(&[VIRTIO_NET_F_MRG_RXBUF]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        let descs: Vec<_> = (0..4).map(|i| desc(BUFFERS + i * 0x1000, 64, WRITE, 0)).collect();
        rxq.add_desc_chains(&descs, 0).unwrap();
        let frame = test_frame(&[7; 150]);
        rig.wire.send(&frame);
        assert!(rx_until(&rig, &rxq, 3));
        let total = VNET_HDR_LEN + frame.len();
        assert_eq!(used(&rxq), vec![(0, 64), (1, 64), (2, (total - 128) as u32)]);
        let mut got = vec![0u8; total];
        for i in 0..3u64 {
            let n = (total - 64 * i as usize).min(64);
            rig.mem.read_slice(&mut got[64 * i as usize..][..n], GuestAddress(BUFFERS + i * 0x1000)).unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
    }

    #[test]
    fn a_frame_bigger_than_the_buffers_on_offer_waits_for_more_without_spinning() {
        let mut rig = Rig::new();
        rig.init(features(&[VIRTIO_NET_F_MRG_RXBUF]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        // One 64-byte buffer on offer, and a frame that needs three.
        rxq.add_desc_chains(&[desc(BUFFERS, 64, WRITE, 0)], 0).unwrap();
        rig.wire.send(&test_frame(&[7; 150]));
        std::thread::sleep(Duration::from_millis(50));
        // This spun forever, holding the device lock, before the fix.
        let net = rig.net.clone();
        let (done, returned) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            net.lock().unwrap().process_rx();
            let _ = done.send(());
        });
        assert!(returned.recv_timeout(Duration::from_secs(5)).is_ok(), "process_rx did not return");
        assert!(used(&rxq).is_empty(), "nothing delivered into too few buffers");
        // The driver is asked to notify us of its next buffer: avail_event = its index now.
        let avail_event = GuestAddress(rxq.used_addr().0 + 4 + 8 * u64::from(SIZE));
        assert_eq!(rig.mem.read_obj::<u16>(avail_event).unwrap(), 1);
        // Two more buffers: the frame goes in, over all three.
        rxq.add_desc_chains(&[desc(BUFFERS + 0x1000, 64, WRITE, 0), desc(BUFFERS + 0x2000, 64, WRITE, 0)], 1).unwrap();
        assert!(rx_until(&rig, &rxq, 3));
        assert_eq!(used(&rxq).len(), 3);
    }

    #[test]
    fn rx_frame_waits_for_buffers_instead_of_being_lost() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        let frame = test_frame(b"early");
        rig.wire.send(&frame);
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx();
        assert!(used(&rxq).is_empty());
        rxq.add_desc_chains(&[desc(BUFFERS, 2048, WRITE, 0)], 0).unwrap();
        assert!(rx_until(&rig, &rxq, 1));
        let mut got = vec![0u8; frame.len()];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn rx_buffers_in_the_wrong_direction_or_too_small_lose_the_frame_not_the_device() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, SIZE);
        // Read-only RX buffer, then one too small without mergeable buffers, then a good one.
        rxq.add_desc_chains(
            &[desc(BUFFERS, 2048, 0, 0), desc(BUFFERS, 16, WRITE, 0), desc(BUFFERS + 0x1000, 2048, WRITE, 0)],
            0,
        )
        .unwrap();
        for payload in [b"one".as_slice(), b"two", b"three"] {
            rig.wire.send(&test_frame(payload));
        }
        assert!(rx_until(&rig, &rxq, 3));
        let u = used(&rxq);
        assert_eq!((u[0].1, u[1].1), (0, 0), "bad buffers returned empty");
        assert!(u[2].1 > 0);
        let mut got = vec![0u8; 5];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + 0x1000 + VNET_HDR_LEN as u64 + 14)).unwrap();
        assert_eq!(&got, b"three");
        assert!(!status_needs_reset(&mut rig));
    }
}
