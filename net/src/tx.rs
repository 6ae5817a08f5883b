// SPDX-License-Identifier: Apache-2.0
//! virtio-net TX: the guest's frames from the TX queue into the TAP.
//!
//! Descriptor chains pointing outside guest memory, looping, empty, too long or with buffers in
//! the wrong direction cost the guest that frame (counted as a drop), never the device.

use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::Bytes;

use crate::device::{MAX_FRAME, Net, TX_INDEX};
use crate::tap::VNET_HDR_LEN;

/// While sending a burst of the guest's frames, look at the TAP after this many: see
/// [`Net::process_tx`].
pub(crate) const TX_FRAMES_PER_RX_POLL: usize = 32;

impl Net {
    /// Sends every frame the driver queued.
    ///
    /// Every `TX_FRAMES_PER_RX_POLL` frames of a burst it also moves what the TAP received
    /// into the guest (see below), so one direction's burst does not hold up the other's.
    pub fn process_tx(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queue_in_use(TX_INDEX) {
            return;
        }
        loop {
            if !self.avail_ok(TX_INDEX, &mem) {
                return;
            }
            if let Err(e) = self.queues[TX_INDEX].disable_notification(&mem) {
                return self.broken(&format!("tx: {e:?}"));
            }
            let mut sent_any = false;
            let mut burst = 0usize;
            while let Some(chain) = self.queues[TX_INDEX].pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let mut len = 0usize;
                let mut ok = true;
                for desc in chain {
                    let n = desc.len() as usize;
                    if desc.is_write_only() || len + n > MAX_FRAME {
                        ok = false;
                        break;
                    }
                    if mem.read_slice(&mut self.tx_frame[len..len + n], desc.addr()).is_err() {
                        ok = false;
                        break;
                    }
                    len += n;
                }
                if ok && len > VNET_HDR_LEN {
                    self.addresses.observe(&self.mac, &self.tx_frame[VNET_HDR_LEN..len]);
                    self.flows.observe(&self.tx_frame[VNET_HDR_LEN..len]);
                    match self.tap.write_frame(&self.tx_frame[..len]) {
                        Ok(_) => {
                            self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                            self.metrics.tx_bytes.fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            log::debug!("virtio-net: TAP write failed: {e}");
                            self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.metrics.tx_bad_descriptors.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = self.queues[TX_INDEX].add_used(&mem, head, 0) {
                    return self.broken(&format!("tx used ring: {e:?}"));
                }
                sent_any = true;
                burst += 1;
                if burst % TX_FRAMES_PER_RX_POLL == 0 {
                    // A long burst is usually a TCP stream, and what the TAP receives meanwhile
                    // is mostly its ACKs (the peer's stack runs inside our TAP writes). Handed
                    // over only after the burst, they reach a guest that has long filled its
                    // send window and stopped; then we wait for it to wake and send again, and
                    // the stream goes in stop-and-go rounds of one window each. Handed over
                    // now, they let the guest queue more while we are still sending. Every 32
                    // frames (a sixth of a 256 KiB window) measured best: more often, the
                    // guest wakes up more than it needs; less often, the queue runs dry.
                    // A driver that wants TX interrupts gets this part of the burst first.
                    self.signal_used(TX_INDEX, &mem);
                    self.process_rx();
                    if self.needs_reset {
                        return;
                    }
                }
            }
            if sent_any {
                self.signal_used(TX_INDEX, &mem);
            }
            match self.queues[TX_INDEX].enable_notification(&mem) {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => return,
                Err(e) => return self.broken(&format!("tx: {e:?}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::device::RX_INDEX;
    use crate::test_utils::*;

    #[test]
    fn tx_sends_the_guest_frame_to_the_tap() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"hello from the guest");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        // Header and frame in two descriptors, as Linux sends them.
        txq.add_desc_chains(&[desc(BUFFERS, 12, NEXT, 1), desc(BUFFERS + 12, len - 12, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert!(rig.wire.wait_for(&frame, Duration::from_secs(2)));
        assert_eq!(used(&txq), vec![(0, 0)]);
        let m = rig.net.lock().unwrap().metrics();
        assert_eq!(m.tx_packets.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mut rig = Rig::new();
        rig.init(features_without_event_idx(), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"polled");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        rig.irq.read().ok();
        // The driver polls: VRING_AVAIL_F_NO_INTERRUPT.
        rig.mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, txq.avail_addr()).unwrap();
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 0).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert_eq!(used(&txq).len(), 1);
        assert!(rig.irq.read().is_err(), "no interrupt for a driver that asked for none");
        // The driver goes to sleep and wants to hear about used buffers again.
        rig.mem.write_obj(0u16, txq.avail_addr()).unwrap();
        txq.add_desc_chains(&[desc(BUFFERS, len, 0, 0)], 1).unwrap();
        rig.net.lock().unwrap().process_tx();
        assert_eq!(used(&txq).len(), 2);
        assert!(rig.irq.read().is_ok(), "interrupt once the driver asks for it");
    }

    #[test]
    fn a_long_tx_burst_also_delivers_what_the_tap_received() {
        const BIG: u16 = 64;
        let mut rig = Rig::new();
        rig.init(features(&[]), BIG);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, BIG);
        let txq = queue(&mem, TX_INDEX, BIG);
        rxq.add_desc_chains(&[desc(BUFFERS + 0x10_0000, 2048, WRITE, 0)], 0).unwrap();
        // An ACK, say, waits in the TAP while the guest has a burst queued.
        let incoming = test_frame(b"ack");
        rig.wire.send(&incoming);
        std::thread::sleep(Duration::from_millis(50));
        let len = put_tx_frame(&rig, BUFFERS, &test_frame(b"segment"));
        let chains: Vec<_> = (0..TX_FRAMES_PER_RX_POLL as u16 + 1).map(|_| desc(BUFFERS, len, 0, 0)).collect();
        txq.add_desc_chains(&chains, 0).unwrap();
        // Only TX is processed, as when the event loop is busy with the guest's burst.
        rig.net.lock().unwrap().process_tx();
        assert_eq!(used(&txq).len(), chains.len());
        assert_eq!(used(&rxq).len(), 1, "the waiting frame went in during the burst");
        let mut got = vec![0u8; incoming.len()];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + 0x10_0000 + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, incoming);
    }

    #[test]
    fn hostile_tx_chains_are_dropped_and_the_device_goes_on() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        let mem = rig.mem.clone();
        let txq = queue(&mem, TX_INDEX, SIZE);
        let frame = test_frame(b"still alive");
        let len = put_tx_frame(&rig, BUFFERS, &frame);
        // Descriptor indices are absolute: each chain starts where the previous one ended.
        let chains = [
            // 0: outside guest memory.
            vec![desc(0x1_0000_0000, 100, 0, 0)],
            // 1, 2: a loop, 1 -> 2 -> 1 -> ... (virtio-queue stops it after a queue's worth).
            vec![desc(BUFFERS, 20, NEXT, 2), desc(BUFFERS, 20, NEXT, 1)],
            // 3: zero length.
            vec![desc(BUFFERS, 0, 0, 0)],
            // 4, 5: longer than any frame.
            vec![desc(BUFFERS, 40_000, NEXT, 5), desc(BUFFERS, 40_000, 0, 0)],
            // 6: a device-writable buffer on the TX queue.
            vec![desc(BUFFERS, len, WRITE, 0)],
            // 7: finally a good one.
            vec![desc(BUFFERS, len, 0, 0)],
        ];
        let mut offset = 0;
        for c in &chains {
            txq.add_desc_chains(c, offset).unwrap();
            offset += c.len() as u16;
        }
        rig.net.lock().unwrap().process_tx();
        assert!(rig.wire.wait_for(&frame, Duration::from_secs(2)), "the good frame got through");
        assert_eq!(used(&txq).len(), chains.len(), "every chain is returned");
        assert!(!status_needs_reset(&mut rig));
        let m = rig.net.lock().unwrap().metrics();
        // The loop is bounded by the queue size and goes out as one meaningless frame of
        // 16 x 20 bytes (the guest asked for it); the four others are dropped.
        assert_eq!(m.tx_dropped.load(Ordering::Relaxed), 4);
    }
}
