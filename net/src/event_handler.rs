// SPDX-License-Identifier: Apache-2.0
//! The device's part of the VMM event loop: TAP readable, and the three queue notifications.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::device::{CTRL_INDEX, Net, RX_INDEX, TX_INDEX};
use virtio::VirtioDevice;

const TAP: u32 = 100;

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let source = events.data();
        if source == TAP {
            self.process_rx();
            return;
        }
        let index = source as usize;
        let Some(evt) = self.queue_events().get(index) else {
            return;
        };
        // Always consume the notification, even before activation, so it does not stay pending.
        let _ = evt.read();
        match index {
            RX_INDEX => self.process_rx(),
            TX_INDEX => self.process_tx(),
            CTRL_INDEX => self.process_ctrl(),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events().iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio-net: cannot watch queue {i}: {e}");
            }
        }
        // Edge-triggered: process_rx reads until the TAP is empty or the guest has no buffers;
        // in the second case the RX queue notification resumes it.
        let tap = self.tap().as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(tap, TAP, EventSet::IN | EventSet::EDGE_TRIGGERED)) {
            log::error!("virtio-net: cannot watch the TAP: {e}");
        }
    }
}
