// SPDX-License-Identifier: Apache-2.0
//! Announcing a guest that just arrived by migration (see `net::announce`): rounds of RARP and
//! gratuitous ARP written into each NIC's TAP from the VMM's event loop, paced by a timerfd, and
//! on the first round a request to the guest to announce itself (VIRTIO_NET_S_ANNOUNCE), which
//! our guests answer with their own gratuitous ARP.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use net::Net;
use net::announce::AnnounceSchedule;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Sends the announce rounds of one migration.
pub struct Announcer {
    nets: Vec<Arc<Mutex<Net>>>,
    kick_tcp: bool,
    offsets: Vec<Duration>,
    next: usize,
    start: Instant,
    timer: TimerFd,
}

impl Announcer {
    /// Starts now: the first round goes out as soon as the event loop runs.
    pub fn new(nets: Vec<Arc<Mutex<Net>>>, schedule: AnnounceSchedule) -> std::io::Result<Self> {
        let offsets = schedule.offsets_ms().into_iter().map(Duration::from_millis).collect();
        let mut timer = TimerFd::new().map_err(std::io::Error::other)?;
        // A zero duration would disarm the timer: fire as soon as possible instead.
        timer.reset(Duration::from_nanos(1), None).map_err(std::io::Error::other)?;
        Ok(Self { nets, kick_tcp: schedule.kick_tcp, offsets, next: 0, start: Instant::now(), timer })
    }

    fn round(&mut self) {
        for (i, net) in self.nets.iter().enumerate() {
            let mut net = net.lock().expect("Poisoned lock");
            let frames = net.announce();
            // The guest's own announce covers what we do not know (e.g. IPv6).
            let guest = self.next == 0 && net.request_guest_announce();
            // Right after the first announce, so the peers' retransmissions find the guest.
            let acks = if self.next == 0 && self.kick_tcp { net.kick_tcp_flows() } else { 0 };
            log::debug!(
                "announce round {} NIC {i}: {frames} frame(s) for {:?}, {acks} duplicate ACK(s){}",
                self.next + 1,
                net.addresses(),
                if guest { ", guest asked to announce" } else { "" }
            );
        }
        self.next += 1;
    }
}

impl MutEventSubscriber for Announcer {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        if self.next < self.offsets.len() {
            self.round();
        }
        match self.offsets.get(self.next) {
            Some(&at) => {
                let wait = at.saturating_sub(self.start.elapsed()).max(Duration::from_micros(1));
                if let Err(e) = self.timer.reset(wait, None) {
                    log::warn!("announce timer: {e}");
                }
            }
            None => {
                let _ = ops.remove(Events::new(&self.timer, EventSet::IN));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            log::error!("cannot schedule the announce: {e}");
        }
    }
}
