// SPDX-License-Identifier: Apache-2.0
//! The virtio-net control queue: the only command we act on is the driver's acknowledgement of
//! an announce request (VIRTIO_NET_F_GUEST_ANNOUNCE), which a migration destination makes so
//! that the guest announces its own addresses; everything else is refused.

use virtio::INT_CONFIG;
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use crate::device::{CTRL_INDEX, Net, has};

impl Net {
    /// Answers the driver's control commands. Only the announce acknowledgement is ours to
    /// act on; everything else is refused.
    pub fn process_ctrl(&mut self) {
        let Some(mem) = self.ready() else { return };
        if !self.queue_in_use(CTRL_INDEX) {
            return;
        }
        if !self.avail_ok(CTRL_INDEX, &mem) {
            return;
        }
        let mut any = false;
        while let Some(chain) = self.queues[CTRL_INDEX].pop_descriptor_chain(&mem) {
            any = true;
            let head = chain.head_index();
            let mut header = [0u8; 2];
            let mut got = 0usize;
            let mut ack_at = None;
            for desc in chain {
                if desc.is_write_only() {
                    ack_at = Some(desc.addr());
                } else if got < 2 {
                    let n = (desc.len() as usize).min(2 - got);
                    if mem.read_slice(&mut header[got..got + n], desc.addr()).is_err() {
                        break;
                    }
                    got += n;
                }
            }
            let ok = got == 2 && header == [VIRTIO_NET_CTRL_ANNOUNCE as u8, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8];
            if ok {
                self.config_status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
            }
            let status = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
            let written = match ack_at {
                Some(addr) if mem.write_obj(status, addr).is_ok() => 1,
                _ => 0,
            };
            if let Err(e) = self.queues[CTRL_INDEX].add_used(&mem, head, written) {
                return self.broken(&format!("ctrl used ring: {e:?}"));
            }
        }
        if any {
            self.signal_used(CTRL_INDEX, &mem);
        }
    }

    /// Reads what waits in the TAP into the backlog, without touching guest memory: on a
    /// Asks the guest to announce itself (VIRTIO_NET_S_ANNOUNCE plus a config interrupt), if
    /// its driver accepted GUEST_ANNOUNCE. Returns whether it did.
    pub fn request_guest_announce(&mut self) -> bool {
        if self.mem.is_none() || !has(self.acked_features, VIRTIO_NET_F_GUEST_ANNOUNCE) {
            return false;
        }
        self.config_status |= VIRTIO_NET_S_ANNOUNCE as u16;
        self.interrupt.trigger(INT_CONFIG).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::*;

    #[test]
    fn guest_announce_is_requested_and_acknowledged_on_the_control_queue() {
        let mut rig = Rig::new();
        rig.init(features(&[VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE]), SIZE);
        let mem = rig.mem.clone();
        let ctrlq = queue(&mem, CTRL_INDEX, SIZE);
        rig.irq.read().ok();
        assert!(rig.net.lock().unwrap().request_guest_announce());
        let mut status = [0u8; 2];
        rig.transport.mmio_read_config(6, &mut status);
        assert_ne!(u16::from_le_bytes(status) & VIRTIO_NET_S_ANNOUNCE as u16, 0);
        assert_ne!(rig.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & virtio::INT_CONFIG, 0);
        assert!(rig.irq.read().is_ok());
        // The driver acknowledges; then sends a command we do not support.
        rig.mem
            .write_slice(&[VIRTIO_NET_CTRL_ANNOUNCE as u8, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8], GuestAddress(BUFFERS))
            .unwrap();
        rig.mem.write_slice(&[0xee, 0x00], GuestAddress(BUFFERS + 0x100)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(BUFFERS + 0x10)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(BUFFERS + 0x110)).unwrap();
        ctrlq
            .add_desc_chains(
                &[
                    desc(BUFFERS, 2, NEXT, 1),
                    desc(BUFFERS + 0x10, 1, WRITE, 0),
                    desc(BUFFERS + 0x100, 2, NEXT, 3),
                    desc(BUFFERS + 0x110, 1, WRITE, 0),
                ],
                0,
            )
            .unwrap();
        rig.net.lock().unwrap().process_ctrl();
        let ack: u8 = rig.mem.read_obj(GuestAddress(BUFFERS + 0x10)).unwrap();
        let nak: u8 = rig.mem.read_obj(GuestAddress(BUFFERS + 0x110)).unwrap();
        assert_eq!((ack, nak), (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8));
        rig.transport.mmio_read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status) & VIRTIO_NET_S_ANNOUNCE as u16, 0, "cleared by the ack");
    }

    #[test]
    fn no_announce_without_the_feature() {
        let mut rig = Rig::new();
        rig.init(features(&[]), SIZE);
        assert!(!rig.net.lock().unwrap().request_guest_announce());
    }
}
