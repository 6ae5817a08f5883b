// SPDX-License-Identifier: Apache-2.0
//! What every device does with its virtqueues besides moving buffers: checking a driver's
//! available ring before trusting it, deciding whether the driver wants an interrupt, and the
//! queue's state for migration.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// Checks the available ring before trusting it: an index that ran more than a queue ahead
/// means the driver is broken, not that there is work.
pub fn check_avail(q: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), virtio_queue::Error> {
    q.iter(mem).map(|_| ())
}

/// Whether the driver wants an interrupt for the used entries just added to `q`.
///
/// With EVENT_IDX, virtio-queue decides from `used_event`. Without it, the driver's only say
/// is VRING_AVAIL_F_NO_INTERRUPT in the available ring's flags, which virtio-queue does not
/// look at (its `needs_notification` always answers yes then). A driver that polls, as ours
/// does while it is busy, sets that flag; interrupting it anyway costs it a trip through its
/// interrupt path and two MMIO exits (status, ack) for nothing. QEMU honours the flag too.
pub fn driver_wants_interrupt(q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
    // Also the fence that orders our used-ring writes before the read of the flags below: the
    // driver clears the flag, fences, then looks at the used ring, so one of the two sides
    // sees the other's write and no wakeup is lost.
    let notify = q.needs_notification(mem)?;
    if q.event_idx_enabled() || !notify {
        return Ok(notify);
    }
    let flags: u16 =
        mem.load(GuestAddress(q.avail_ring()), Ordering::Acquire).map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// Asks the driver to notify us when it makes more buffers available than `seen` (the
/// available index we last looked at), for a device that found the buffers there too few (a
/// frame bigger than the mergeable RX buffers on offer).
///
/// virtio-queue's `enable_notification` cannot say this: with EVENT_IDX it sets `avail_event`
/// to its own `next_avail`, which is behind the buffers it did not take, so the driver, which
/// notifies only when its index crosses `avail_event`, never notifies again; and its answer
/// ("buffers are available") stays true however often one asks. QEMU sets `avail_event` to the
/// available index too (`virtio_queue_set_notification`). The fence orders the write before
/// the caller's next look at the ring (the driver orders its index write before its read of
/// `avail_event`), so a buffer added meanwhile is either seen there or notified.
pub fn notify_after(q: &mut Queue, mem: &GuestMemoryMmap, seen: u16) -> Result<(), virtio_queue::Error> {
    if q.event_idx_enabled() {
        // avail_event follows the used ring's entries (virtio 1.2, 2.7.8).
        let at = q.used_ring() + 4 + 8 * u64::from(q.size());
        mem.store(u16::to_le(seen), GuestAddress(at), Ordering::Relaxed).map_err(virtio_queue::Error::GuestMemory)?;
    } else {
        q.enable_notification(mem)?;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    Ok(())
}

/// virtio-queue's `QueueState`, made serialisable (the `virtio-queue-ser` crate pins an older
/// virtio-queue).
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// One queue's state: addresses, size, readiness and the device's ring positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot(#[serde(with = "QueueStateDef")] pub QueueState);

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        QueueSnapshot(q.state())
    }

    /// The queue this state describes; fails on a state no driver could have set up.
    pub fn restore(&self) -> Result<Queue, String> {
        Queue::try_from(self.0).map_err(|e| format!("queue: {e:?}"))
    }
}

/// Saves every queue of a device.
pub fn save_queues(queues: &[Queue]) -> Vec<QueueSnapshot> {
    queues.iter().map(QueueSnapshot::of).collect()
}

/// Restores `saved` into `queues` (same count required).
pub fn restore_queues(queues: &mut [Queue], saved: &[QueueSnapshot]) -> Result<(), String> {
    if saved.len() != queues.len() {
        return Err(format!("{} queues saved, the device has {}", saved.len(), queues.len()));
    }
    for (q, s) in queues.iter_mut().zip(saved) {
        *q = s.restore()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    #[test]
    fn queue_state_round_trips_through_json() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let q = mock.create_queue::<Queue>().unwrap();
        let snap = QueueSnapshot::of(&q);
        let json = serde_json::to_string(&snap).unwrap();
        let back: QueueSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        assert_eq!(back.restore().unwrap().state(), q.state());
        let mut queues = [Queue::new(16).unwrap()];
        assert!(restore_queues(&mut queues, &[snap.clone(), snap]).is_err(), "count must match");
    }

    #[test]
    fn an_avail_index_beyond_the_queue_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let mut q = mock.create_queue::<Queue>().unwrap();
        assert!(check_avail(&mut q, &mem).is_ok());
        mock.avail().idx().store(100);
        assert!(check_avail(&mut q, &mem).is_err());
    }
}
