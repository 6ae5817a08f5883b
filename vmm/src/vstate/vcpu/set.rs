// SPDX-License-Identifier: Apache-2.0
//! The VMM's side of running vCPU threads: a handle on each, and all of a VM's driven together
//! (pause, resume, state save), each answer awaited with a bound.

use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use migration::VcpuState;
use vmm_sys_util::signal::Killable;

use super::kick::kick_signal;
use super::{VcpuEvent, VcpuResponse};

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    pub(super) index: u8,
    pub(super) thread: Option<JoinHandle<()>>,
    pub(super) events: Sender<VcpuEvent>,
    pub(super) responses: Receiver<VcpuResponse>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends `event` and makes the thread notice it.
    pub fn send(&self, event: VcpuEvent) -> bool {
        if self.events.send(event).is_err() {
            return false;
        }
        self.kick();
        true
    }

    /// Waits for the thread's answer.
    pub fn recv(&self, timeout: Duration) -> Option<VcpuResponse> {
        self.responses.recv_timeout(timeout).ok()
    }

    /// Interrupts `KVM_RUN` without asking anything (the throttle's tick).
    pub fn kick(&self) {
        if let Some(t) = &self.thread
            && let Err(e) = t.kill(kick_signal())
        {
            log::debug!("vCPU {}: kick failed: {e}", self.index);
        }
    }

    /// Stops the thread and waits for it.
    pub fn finish(mut self) {
        let _ = self.events.send(VcpuEvent::Finish);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// All vCPU threads of a VM, driven together.
#[derive(Default)]
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
}

/// How long a vCPU may take to answer.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuSet {
    pub fn new(handles: Vec<VcpuHandle>) -> Self {
        Self { handles }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    fn broadcast(&self, event: fn() -> VcpuEvent) -> Result<Vec<VcpuResponse>, String> {
        for v in &self.handles {
            if !v.send(event()) {
                return Err(format!("vCPU {} is gone", v.index()));
            }
        }
        self.handles
            .iter()
            .map(|v| v.recv(VCPU_ANSWER_TIMEOUT).ok_or_else(|| format!("vCPU {} did not answer", v.index())))
            .collect()
    }

    /// Stops every vCPU and waits until none runs guest code.
    pub fn pause(&self) -> Result<(), String> {
        for r in self.broadcast(|| VcpuEvent::Pause)? {
            if !matches!(r, VcpuResponse::Paused) {
                return Err(format!("unexpected answer to pause: {r:?}"));
            }
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), String> {
        for r in self.broadcast(|| VcpuEvent::Resume)? {
            if !matches!(r, VcpuResponse::Resumed) {
                return Err(format!("unexpected answer to resume: {r:?}"));
            }
        }
        Ok(())
    }

    /// The state of every (paused) vCPU, in index order.
    pub fn save(&self) -> Result<Vec<VcpuState>, String> {
        self.broadcast(|| VcpuEvent::SaveState)?.into_iter().map(into_state).collect()
    }

    /// Stops every vCPU and waits until none runs guest code, like [`VcpuSet::pause`]; each
    /// then reads its state, which [`VcpuSet::saved_states`] collects. Until it has, the
    /// vCPUs must not be asked anything else.
    pub fn pause_and_save(&self) -> Result<(), String> {
        for r in self.broadcast(|| VcpuEvent::PauseAndSave)? {
            if !matches!(r, VcpuResponse::Paused) {
                return Err(format!("unexpected answer to pause: {r:?}"));
            }
        }
        Ok(())
    }

    /// The states the vCPUs read after [`VcpuSet::pause_and_save`], in index order.
    pub fn saved_states(&self) -> Result<Vec<VcpuState>, String> {
        self.handles
            .iter()
            .map(|v| v.recv(VCPU_ANSWER_TIMEOUT).ok_or_else(|| format!("vCPU {} did not answer", v.index())))
            .map(|r| r.and_then(into_state))
            .collect()
    }

    /// Kicks every vCPU once (see [`VcpuHandle::kick`]).
    pub fn kick_all(&self) {
        for v in &self.handles {
            v.kick();
        }
    }

    /// Ends every vCPU thread.
    pub fn finish(&mut self) {
        for v in self.handles.drain(..) {
            v.finish();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.finish();
    }
}

fn into_state(r: VcpuResponse) -> Result<VcpuState, String> {
    match r {
        VcpuResponse::State(s) => Ok(*s),
        VcpuResponse::Error(e) => Err(e),
        other => Err(format!("unexpected answer to save: {other:?}")),
    }
}
