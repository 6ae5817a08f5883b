// SPDX-License-Identifier: Apache-2.0
//! A running VM: vCPU threads plus the VMM thread's event loop, which feeds console input to the
//! UART and notices when the guest is done.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::BuiltVm;
use crate::devices::serial::SerialPort;
use crate::vstate::vcpu::{ExitNotifier, ExitReason, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vstate::vm::Vm;

/// Errors of a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("failed to create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(event_manager::Error),
    #[error("{0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("vCPU {0} did not answer {1}")]
    VcpuTimeout(u8, &'static str),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A VM whose vCPUs run.
pub struct Vmm {
    vm: Vm,
    vcpus: Vec<VcpuHandle>,
    events: EventManager<Subscriber>,
    exit: Arc<Mutex<ExitWatcher>>,
}

impl Vmm {
    /// Starts the vCPUs of `built` and wires up the event loop.
    pub fn start(built: BuiltVm) -> Result<Self, VmmError> {
        let exit_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?);
        let (exit_tx, exit_rx) = channel();
        let notifier = ExitNotifier::new(exit_tx, exit_evt.clone());
        let mut events = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        let exit = Arc::new(Mutex::new(ExitWatcher {
            exit_evt,
            reset_evt: built.reset_evt,
            panic_evt: built.panic_evt,
            exit_rx,
            reason: None,
        }));
        events.add_subscriber(exit.clone());
        for dev in &built.nets {
            events.add_subscriber(dev.net.clone());
        }
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
            serial: built.serial,
        })));

        let mut vcpus = Vec::with_capacity(built.vcpus.len());
        for vcpu in built.vcpus {
            vcpus.push(vcpu.start(notifier.clone(), false)?);
        }
        Ok(Self {
            vm: built.vm,
            vcpus,
            events,
            exit,
        })
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Runs the event loop until the guest is done, then stops the vCPUs.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        let reason = loop {
            if let Some(reason) = self.exit.lock().expect("Poisoned lock").reason.take() {
                break reason;
            }
            self.events.run().map_err(VmmError::EventLoop)?;
        };
        self.stop_vcpus();
        Ok(reason)
    }

    /// Pauses every vCPU and waits until each has stopped running guest code.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.broadcast(|| VcpuEvent::Pause, VcpuResponse::Paused, "pause")
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.broadcast(|| VcpuEvent::Resume, VcpuResponse::Resumed, "resume")
    }

    fn broadcast(
        &self,
        event: fn() -> VcpuEvent,
        want: VcpuResponse,
        what: &'static str,
    ) -> Result<(), VmmError> {
        for v in &self.vcpus {
            v.send(event());
        }
        for v in &self.vcpus {
            match v.recv(Duration::from_secs(5)) {
                Some(r) if r == want => {}
                _ => return Err(VmmError::VcpuTimeout(v.index(), what)),
            }
        }
        Ok(())
    }

    fn stop_vcpus(&mut self) {
        for v in self.vcpus.drain(..) {
            v.finish();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

/// Watches for the guest being done: a vCPU exit, an i8042 reset or a reported panic.
struct ExitWatcher {
    exit_evt: Arc<EventFd>,
    reset_evt: EventFd,
    panic_evt: EventFd,
    exit_rx: Receiver<(u8, ExitReason)>,
    reason: Option<ExitReason>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.reason.get_or_insert(ExitReason::Reset("i8042 reset"));
        } else if events.fd() == self.panic_evt.as_raw_fd() {
            let _ = self.panic_evt.read();
            self.reason
                .get_or_insert(ExitReason::Error("the guest panicked".into()));
        } else {
            let _ = self.exit_evt.read();
            // The first exit decides; a second vCPU's exit while stopping changes nothing.
            while let Ok((index, reason)) = self.exit_rx.try_recv() {
                if let ExitReason::Error(e) = &reason {
                    log::error!("{e}");
                } else {
                    log::debug!("vCPU {index}: {reason:?}");
                }
                self.reason.get_or_insert(reason);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.exit_evt.as_raw_fd(),
            self.reset_evt.as_raw_fd(),
            self.panic_evt.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                log::error!("failed to watch exit event: {e}");
            }
        }
    }
}

/// Console input: the VMM's stdin into the UART.
struct ConsoleInput {
    serial: Arc<Mutex<SerialPort>>,
}

const STDIN: RawFd = libc::STDIN_FILENO;

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a local buffer of the given length from fd 0.
        let n = unsafe { libc::read(STDIN, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            self.serial
                .lock()
                .expect("Poisoned lock")
                .enqueue_input(&buf[..n as usize]);
        } else if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
            // End of input: stop watching, the guest keeps running.
            let _ = ops.remove(Events::empty_raw(STDIN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // /dev/null and regular files cannot be polled; then there is simply no console input.
        if let Err(e) = ops.add(Events::new_raw(STDIN, EventSet::IN)) {
            log::debug!("console input disabled: {e}");
        }
    }
}
