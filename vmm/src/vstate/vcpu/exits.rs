// SPDX-License-Identifier: Apache-2.0
//! What vCPUs report: how often each kind of exit happened (`/metrics`), what they share with
//! the VMM, and the channel on which the end of the guest is reported.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How often each kind of exit happened, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub shutdown: AtomicU64,
    pub internal_error: AtomicU64,
    /// KVM_RUN interrupted by a kick (pause, state save, throttling).
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    /// (reason, count) pairs.
    pub fn snapshot(&self) -> [(&'static str, u64); 9] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io_in", l(&self.io_in)),
            ("io_out", l(&self.io_out)),
            ("mmio_read", l(&self.mmio_read)),
            ("mmio_write", l(&self.mmio_write)),
            ("hlt", l(&self.hlt)),
            ("shutdown", l(&self.shutdown)),
            ("internal_error", l(&self.internal_error)),
            ("interrupted", l(&self.interrupted)),
            ("other", l(&self.other)),
        ]
    }
}

/// What all vCPUs of a VM share with the VMM.
#[derive(Debug, Default)]
pub struct VcpuShared {
    pub exits: ExitCounters,
    /// Percentage of time vCPUs sleep instead of running (migration auto-converge).
    pub throttle_pct: AtomicU32,
    /// Why the first vCPU that stopped for good stopped (a triple fault, an internal error):
    /// an outgoing migration must not hand such a guest over as if it ran.
    pub stopped: std::sync::Mutex<Option<String>>,
    /// When the guest first ran: the first vCPU started running about to enter KVM_RUN (a
    /// restore reports it; vCPUs started paused, as on a migration destination, do not mark it).
    pub first_run: FirstRun,
}

/// When the guest first ran (a restore reports it).
#[derive(Debug, Default)]
pub struct FirstRun {
    state: Mutex<RunState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct RunState {
    at: Option<Instant>,
    /// A vCPU thread ended before it ran.
    failed: bool,
}

impl FirstRun {
    /// Called by each vCPU thread started running, just before it first enters KVM_RUN; the
    /// first call counts.
    pub fn mark(&self) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.at.get_or_insert_with(Instant::now);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread that ends before it ran (its end is reported on the exit
    /// channel): nobody waits for the guest to run any more.
    pub fn give_up(&self) {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).failed = true;
        self.changed.notify_all();
    }

    /// When the guest first ran, waiting up to `timeout` for it; `None` if it did not run by
    /// then or a vCPU thread ended before it ran.
    pub fn wait(&self, timeout: Duration) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.at.is_none() && !s.failed)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.at
    }
}

/// The reset reason of a vCPU that triple-faulted (KVM_EXIT_SHUTDOWN).
pub const TRIPLE_FAULT: &str = "triple fault";

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, triple fault, or a KVM system event): for a micro-VM
    /// that means it is done, as after poweroff.
    Reset(&'static str),
    /// The guest now runs on a migration destination.
    Migrated,
    /// Something went wrong that the VM cannot go on from.
    Error(String),
}

/// Where vCPU threads report guest exits: a channel plus an eventfd for the event loop.
#[derive(Clone)]
pub struct ExitNotifier {
    sender: Sender<(u8, ExitReason)>,
    evt: Arc<EventFd>,
}

impl ExitNotifier {
    pub fn new(sender: Sender<(u8, ExitReason)>, evt: Arc<EventFd>) -> Self {
        Self { sender, evt }
    }

    pub fn notify(&self, index: u8, reason: ExitReason) {
        // The receiver only goes away when the VMM is shutting down anyway.
        let _ = self.sender.send((index, reason));
        if let Err(e) = self.evt.write(1) {
            log::error!("vCPU {index}: failed to signal exit: {e}");
        }
    }
}

/// Where a VM's exits are reported and read: made with the VM, before its vCPUs run, so that
/// anything started early (a page handler of on-demand memory) can end the VM too.
pub struct ExitChannel {
    pub notifier: ExitNotifier,
    pub evt: Arc<EventFd>,
    pub rx: Receiver<(u8, ExitReason)>,
}

impl ExitChannel {
    pub fn new() -> std::io::Result<Self> {
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (tx, rx) = channel();
        Ok(ExitChannel { notifier: ExitNotifier::new(tx, evt.clone()), evt, rx })
    }
}
