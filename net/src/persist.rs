// SPDX-License-Identifier: Apache-2.0
//! virtio-net state for migration: features, link/announce status, the queues (addresses,
//! sizes and the device's ring positions) and a received frame that was still waiting for a
//! guest buffer. Descriptor chains are never in flight when the device is paused: each one is
//! processed to completion (added to the used ring) or not taken at all.

use serde::{Deserialize, Serialize};
use virtio::GuestMemoryMmap;
use virtio::queue::{QueueSnapshot, restore_queues, save_queues};

use crate::announce::AddressLearner;
use crate::device::{Net, NetError};
use crate::flows::FlowTracker;

/// The device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub acked_features: u64,
    pub config_status: u16,
    pub activated: bool,
    pub needs_reset: bool,
    pub queues: Vec<QueueSnapshot>,
    /// Frames read from the TAP that no guest buffer had taken yet, oldest first (each with its
    /// virtio-net header).
    pub pending_rx_frames: Vec<Vec<u8>>,
    /// The guest's IPv4 addresses, so the destination can announce them.
    #[serde(default)]
    pub addresses: AddressLearner,
    /// The guest's TCP flows, so the destination can restart them at once.
    #[serde(default)]
    pub flows: FlowTracker,
}

impl Net {
    /// Stops moving frames: the TAP is left alone and queues are not processed, so the device
    /// writes nothing more into guest memory until [`Net::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Moves frames again, catching up on whatever arrived meanwhile.
    pub fn resume(&mut self) {
        self.paused = false;
        self.process_rx();
        self.process_tx();
        self.process_ctrl();
    }

    pub fn save_state(&self) -> NetState {
        NetState {
            mac: self.mac,
            acked_features: self.acked_features,
            config_status: self.config_status,
            activated: self.mem.is_some(),
            needs_reset: self.needs_reset,
            queues: save_queues(&self.queues),
            pending_rx_frames: self
                .rx_frame_len
                .map(|n| self.rx_frame[..n].to_vec())
                .into_iter()
                .chain(self.backlog.iter().cloned())
                .collect(),
            addresses: self.addresses.clone(),
            flows: self.flows.clone(),
        }
    }

    /// Restores a saved device into this (freshly created, not activated) one. `mem` is the
    /// guest memory the restored queues live in.
    pub fn restore_state(&mut self, state: &NetState, mem: &GuestMemoryMmap) -> Result<(), NetError> {
        restore_queues(&mut self.queues, &state.queues).map_err(NetError::State)?;
        self.mac = state.mac;
        self.acked_features = state.acked_features & crate::device::offered_features();
        self.config_status = state.config_status;
        self.needs_reset = state.needs_reset;
        self.addresses = state.addresses.clone();
        self.flows = state.flows.clone();
        self.rx_frame_len = None;
        if let Some(f) = state.pending_rx_frames.iter().find(|f| f.len() > self.rx_frame.len()) {
            return Err(NetError::State(format!("pending frame of {} bytes is too large", f.len())));
        }
        self.backlog = state.pending_rx_frames.iter().cloned().collect();
        if state.activated {
            self.tap.set_offload(self.tap_offloads()).map_err(NetError::Tap)?;
            self.mem = Some(mem.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::device::{RX_INDEX, TX_INDEX};
    use crate::tap::VNET_HDR_LEN;
    use crate::test_utils::*;

    #[test]
    fn state_round_trips_and_a_restored_device_carries_on() {
        let mut rig = Rig::new();
        rig.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC), 16);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, 16);
        let txq = queue(&mem, TX_INDEX, 16);
        // A frame waits in the device (no RX buffers yet) when it is paused and saved.
        let frame = test_frame(b"in flight");
        rig.wire.send(&frame);
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx();
        rig.net.lock().unwrap().pause();
        let state = rig.net.lock().unwrap().save_state();
        assert_eq!(
            state.pending_rx_frames.iter().map(|f| f.len()).collect::<Vec<_>>(),
            vec![VNET_HDR_LEN + frame.len()]
        );
        let json = serde_json::to_string(&state).unwrap();
        let state: NetState = serde_json::from_str(&json).unwrap();

        // "Destination": a new device on the same TAP (the old one goes away first).
        let old = std::mem::replace(
            &mut rig.net,
            std::sync::Arc::new(std::sync::Mutex::new(
                Net::new("vmmtest1", GUEST_MAC, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap(),
            )),
        );
        drop(old);
        let mut dest = rig.net.lock().unwrap();
        dest.restore_state(&state, &rig.mem).unwrap();
        assert_eq!(dest.save_state(), state, "restore then save gives the same state");
        // The pending frame reaches the guest once it offers a buffer.
        rxq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(BUFFERS, 2048, VRING_DESC_F_WRITE as u16, 0))],
            0,
        )
        .unwrap();
        dest.process_rx();
        assert_eq!(rxq.used().idx().load(), 1);
        let mut got = vec![0u8; frame.len()];
        rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, frame);
        // And the restored TX queue works on the new TAP.
        drop(dest);
        link_up("vmmtest1");
        let wire = Wire::open("vmmtest1");
        let out = test_frame(b"after restore");
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(&out);
        rig.mem.write_slice(&buf, GuestAddress(BUFFERS + 0x4000)).unwrap();
        txq.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(BUFFERS + 0x4000, buf.len() as u32, 0, 0))], 0)
            .unwrap();
        rig.net.lock().unwrap().process_tx();
        assert!(wire.wait_for(&out, Duration::from_secs(2)));
    }

    #[test]
    fn frames_that_arrive_while_paused_travel_in_the_state() {
        let mut rig = Rig::new();
        rig.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC), 16);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, 16);
        rig.net.lock().unwrap().pause();
        let frames: Vec<_> = (0..3u8).map(|i| test_frame(&[i; 20])).collect();
        for f in &frames {
            rig.wire.send(f);
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut net = rig.net.lock().unwrap();
        net.drain_tap();
        let state = net.save_state();
        assert_eq!(state.pending_rx_frames.len(), 3, "read from the TAP while paused");
        // A device restored from it delivers them first, in order.
        net.restore_state(&state, &rig.mem).unwrap();
        let descs: Vec<_> = (0..3u64)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(BUFFERS + i * 0x1000, 2048, VRING_DESC_F_WRITE as u16, 0))
            })
            .collect();
        rxq.add_desc_chains(&descs, 0).unwrap();
        net.resume();
        assert_eq!(rxq.used().idx().load(), 3);
        for (i, f) in frames.iter().enumerate() {
            let mut got = vec![0u8; f.len()];
            rig.mem.read_slice(&mut got, GuestAddress(BUFFERS + i as u64 * 0x1000 + VNET_HDR_LEN as u64)).unwrap();
            assert_eq!(&got, f, "frame {i}");
        }
    }

    #[test]
    fn a_paused_device_leaves_guest_memory_alone() {
        let mut rig = Rig::new();
        rig.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC), 16);
        let mem = rig.mem.clone();
        let rxq = queue(&mem, RX_INDEX, 16);
        rxq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(BUFFERS, 2048, VRING_DESC_F_WRITE as u16, 0))],
            0,
        )
        .unwrap();
        rig.net.lock().unwrap().pause();
        rig.wire.send(&test_frame(b"while paused"));
        std::thread::sleep(Duration::from_millis(50));
        rig.net.lock().unwrap().process_rx();
        assert_eq!(rxq.used().idx().load(), 0, "nothing delivered while paused");
        rig.net.lock().unwrap().resume();
        assert_eq!(rxq.used().idx().load(), 1, "delivered on resume");
    }

    #[test]
    fn resuming_a_device_without_a_control_queue_is_fine() {
        let mut rig = Rig::new();
        // A driver that does not negotiate CTRL_VQ: queue 2 is never set up.
        rig.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC), 16);
        let mut net = rig.net.lock().unwrap();
        net.pause();
        net.resume();
        net.process_ctrl();
        assert!(!net.save_state().needs_reset, "an unused control queue is not a broken driver");
    }

    #[test]
    fn a_state_with_the_wrong_queue_count_is_refused() {
        let rig = Rig::new();
        let mut state = rig.net.lock().unwrap().save_state();
        state.queues.pop();
        assert!(rig.net.lock().unwrap().restore_state(&state, &rig.mem).is_err());
    }
}
