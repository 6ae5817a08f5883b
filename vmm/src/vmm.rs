// SPDX-License-Identifier: Apache-2.0
//! A running VM: vCPU threads plus the VMM thread's event loop, which serves the devices, feeds
//! console input to the UART, answers API requests and notices when the guest is done. A
//! migration runs on a worker thread of its own, so none of that stops while memory is copied.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{
    ApiError, ApiMessage, ApiRequest, ApiResponse, MigrateRequest, MigrationInfo, MigrationPhase, SnapshotInfo,
    SnapshotPhase, SnapshotRequest, VmInfo, VmState,
};
use crate::builder::{BuiltVm, Machine};
use crate::devices::serial::SerialPort;
use crate::metrics;
use crate::migrate::params::{MigrateParams, MigrationDefaults};
use crate::migrate::send::{self, Outcome};
use crate::snapshot;
use crate::snapshot::save::{After, SnapshotParams};
use crate::vstate::vcpu::{ExitChannel, ExitNotifier, ExitReason, VcpuSet, VcpuShared};

/// Errors of a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("failed to create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(event_manager::Error),
    #[error("{0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("{0}")]
    Vm(#[from] crate::vstate::vm::VmError),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a guest asked to power off may take before it is stopped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// After a completed migration the source answers API requests until whoever started the
/// migration has read how it ended, but at most this much longer. Generous, because the reader
/// may be a process that a loaded host runs late; it costs nothing when the outcome is read.
const MIGRATED_LINGER: Duration = Duration::from_secs(10);
/// "Not a vCPU" index for exits reported by the migration worker.
const MIGRATION: u8 = u8::MAX;

/// What the VMM thread and a migration worker share.
#[derive(Default)]
pub struct Status {
    pub state: Mutex<Option<VmState>>,
    pub migration: Mutex<MigrationInfo>,
    /// The last migration ended in doubt: its NICs stay paused until the user resumes the VM.
    pub in_doubt: std::sync::atomic::AtomicBool,
    /// The devices are paused with the vCPUs (after a snapshot, or a migration in doubt): a
    /// resume resumes them too.
    pub devices_paused: std::sync::atomic::AtomicBool,
    pub snapshot: Mutex<SnapshotInfo>,
}

/// A VM whose vCPUs run.
pub struct Vmm {
    machine: Arc<Machine>,
    vcpus: Arc<Mutex<VcpuSet>>,
    events: EventManager<Subscriber>,
    exit: Arc<Mutex<ExitWatcher>>,
    notifier: ExitNotifier,
    status: Arc<Status>,
    api: Option<Receiver<ApiMessage>>,
    started: Instant,
    shutdown_deadline: Option<Instant>,
    /// The migration's or snapshot's worker thread (one at a time).
    worker: Option<JoinHandle<()>>,
    /// Someone read the completed migration's status (the source may go).
    outcome_read: bool,
    /// Where snapshots are written (without one, a thread of its own per snapshot).
    snapshot_writer: Option<snapshot::save::Writer>,
    /// TLS identity and stall bound for migrations started through the API.
    migration_defaults: MigrationDefaults,
}

impl Vmm {
    /// Starts the vCPUs of `built` and wires up the event loop.
    pub fn start(built: BuiltVm) -> Result<Self, VmmError> {
        let ExitChannel { notifier, evt: exit_evt, rx: exit_rx } = built.exits;
        let mut events = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        let exit = Arc::new(Mutex::new(ExitWatcher {
            exit_evt,
            reset_evt: built.reset_evt,
            panic_evt: built.panic_evt,
            exit_rx,
            reason: None,
            shared: built.machine.vcpu_shared.clone(),
        }));
        events.add_subscriber(exit.clone());
        let machine = Arc::new(built.machine);
        for dev in &machine.nets {
            events.add_subscriber(dev.net.clone());
        }
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput { serial: machine.serial.clone() })));

        // The guest runs next: no thread started by `seccomp::spawn` is still without its filter
        // by then (a restore's VMM thread installs its own right after: see `vmm run`).
        crate::seccomp::wait_for_filters();
        let mut handles = Vec::with_capacity(built.vcpus.len());
        for vcpu in built.vcpus {
            handles.push(vcpu.start(notifier.clone(), false)?);
        }
        let status = Arc::new(Status::default());
        *status.state.lock().expect("Poisoned lock") = Some(VmState::Running);
        Ok(Self {
            machine,
            vcpus: Arc::new(Mutex::new(VcpuSet::new(handles))),
            events,
            exit,
            notifier,
            status,
            api: None,
            started: Instant::now(),
            shutdown_deadline: None,
            worker: None,
            outcome_read: false,
            snapshot_writer: None,
            migration_defaults: MigrationDefaults::default(),
        })
    }

    /// Serves API requests that arrive on `requests`; `wake` is written for each one.
    pub fn attach_api(&mut self, requests: Receiver<ApiMessage>, wake: Arc<EventFd>) {
        self.events.add_subscriber(Arc::new(Mutex::new(Wakeup { evt: wake })));
        self.api = Some(requests);
    }

    /// Writes snapshots on `writer` (started before the VMM was sandboxed; see
    /// [`snapshot::save::Writer`]).
    pub fn attach_snapshot_writer(&mut self, writer: snapshot::save::Writer) {
        self.snapshot_writer = Some(writer);
    }

    /// The vCPUs, for what must pause and resume them from elsewhere (post-copy's page handler).
    pub fn vcpus(&self) -> Arc<Mutex<VcpuSet>> {
        self.vcpus.clone()
    }

    /// What migrations started through the API use unless their request says otherwise.
    pub fn set_migration_defaults(&mut self, defaults: MigrationDefaults) {
        self.migration_defaults = defaults;
    }

    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// Announces the guest's new location on every NIC (after an incoming migration).
    pub fn announce(&mut self, schedule: net::announce::AnnounceSchedule) {
        let nets = self.machine.nets.iter().map(|d| d.net.clone()).collect();
        match crate::announce::Announcer::new(nets, schedule) {
            Ok(a) => {
                self.events.add_subscriber(Arc::new(Mutex::new(a)));
            }
            Err(e) => log::warn!("cannot announce the guest: {e}"),
        }
    }

    fn state(&self) -> VmState {
        self.status.state.lock().expect("Poisoned lock").unwrap_or(VmState::Running)
    }

    fn set_state(&self, s: VmState) {
        *self.status.state.lock().expect("Poisoned lock") = Some(s);
    }

    /// Runs the event loop until the guest is done, then stops the vCPUs.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        let reason = loop {
            if let Some(reason) = self.exit.lock().expect("Poisoned lock").reason.take() {
                break reason;
            }
            if self.shutdown_deadline.is_some_and(|d| Instant::now() >= d) {
                log::warn!("the guest did not power off within {} s; stopping it", SHUTDOWN_GRACE.as_secs());
                break ExitReason::Reset("stopped after the shutdown grace period");
            }
            // Wake up now and then only when a deadline is pending.
            let timeout = if self.shutdown_deadline.is_some() { 100 } else { -1 };
            self.events.run_with_timeout(timeout).map_err(VmmError::EventLoop)?;
            self.serve_api();
        };
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
        if reason == ExitReason::Migrated && self.api.is_some() {
            // The guest stays paused here; only the API keeps answering, briefly.
            let until = Instant::now() + MIGRATED_LINGER;
            while !self.outcome_read && Instant::now() < until {
                self.events.run_with_timeout(50).map_err(VmmError::EventLoop)?;
                self.serve_api();
            }
        }
        self.vcpus.lock().expect("Poisoned lock").finish();
        // Whatever the guest wrote, durable in the image it leaves here (after a migration:
        // the source's copy, which the destination no longer needs but an operator may).
        crate::storage::final_flush(&self.machine);
        Ok(reason)
    }

    fn serve_api(&mut self) {
        let Some(rx) = self.api.take() else { return };
        while let Ok((request, reply)) = rx.try_recv() {
            let answer = self.handle(request);
            // The client may have gone; nothing to do about it.
            let _ = reply.send(answer);
        }
        self.api = Some(rx);
    }

    fn handle(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        match request {
            ApiRequest::GetVm => Ok(ApiResponse::Vm(VmInfo {
                state: self.state(),
                config: self.machine.config.clone(),
                uptime_ms: self.started.elapsed().as_millis() as u64,
                disks: crate::storage::disk_infos(&self.machine),
            })),
            ApiRequest::Pause => match self.state() {
                VmState::Running => {
                    self.vcpus.lock().expect("Poisoned lock").pause().map_err(ApiError::Internal)?;
                    self.set_state(VmState::Paused);
                    Ok(ApiResponse::Done)
                }
                s => Err(ApiError::Conflict(format!("cannot pause a VM that is {}", state_word(s)))),
            },
            ApiRequest::Resume => match self.state() {
                VmState::Paused => {
                    self.vcpus.lock().expect("Poisoned lock").resume().map_err(ApiError::Internal)?;
                    if self.status.devices_paused.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        crate::migrate::resume_devices(&self.machine);
                    }
                    if self.status.in_doubt.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        // The user says the destination does not run the guest: its NICs
                        // work again here (above), and the network learns that it is here (the
                        // destination announced it when the guest paused).
                        crate::migrate::announce_now(&self.machine);
                    }
                    self.set_state(VmState::Running);
                    Ok(ApiResponse::Done)
                }
                s => Err(ApiError::Conflict(format!("cannot resume a VM that is {}", state_word(s)))),
            },
            ApiRequest::Shutdown => match self.state() {
                VmState::Running | VmState::Paused => {
                    if self.state() == VmState::Paused {
                        self.vcpus.lock().expect("Poisoned lock").resume().map_err(ApiError::Internal)?;
                    }
                    // Our guests (Linux init and our own kernel) power off on a `poweroff` line
                    // on their console; whatever does not is stopped after the grace period.
                    self.machine.serial.lock().expect("Poisoned lock").enqueue_input(b"poweroff\n");
                    self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                    self.set_state(VmState::ShuttingDown);
                    Ok(ApiResponse::Done)
                }
                s => Err(ApiError::Conflict(format!("cannot shut down a VM that is {}", state_word(s)))),
            },
            ApiRequest::Migrate(req) => self.start_migration(&req),
            ApiRequest::GetMigration => {
                let info = self.status.migration.lock().expect("Poisoned lock").clone();
                self.outcome_read |= info.phase == MigrationPhase::Completed;
                Ok(ApiResponse::Migration(info))
            }
            ApiRequest::Snapshot(req) => self.start_snapshot(&req),
            ApiRequest::GetSnapshot => {
                Ok(ApiResponse::Snapshot(self.status.snapshot.lock().expect("Poisoned lock").clone()))
            }
            ApiRequest::Metrics => Ok(ApiResponse::Metrics(metrics::render(
                &self.machine,
                &self.status.migration.lock().expect("Poisoned lock"),
                self.started.elapsed(),
            ))),
            ApiRequest::Restore(_) => Err(ApiError::Conflict(
                "this VMM runs a VM already: a snapshot is restored by a VMM started with `vmm run \
                 --await-restore` (or by `vmm run --restore DIR`)"
                    .to_string(),
            )),
        }
    }

    fn start_migration(&mut self, req: &MigrateRequest) -> Result<ApiResponse, ApiError> {
        match self.state() {
            VmState::Running => {}
            s => return Err(ApiError::Conflict(format!("cannot migrate a VM that is {}", state_word(s)))),
        }
        let params = MigrateParams::from_request(req, &self.migration_defaults).map_err(ApiError::BadRequest)?;
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
        self.set_state(VmState::Migrating);
        {
            let mut p = self.status.migration.lock().expect("Poisoned lock");
            *p = MigrationInfo {
                phase: MigrationPhase::Setup,
                destination: Some(params.to.clone()),
                encrypted: matches!(params.security, crate::transport::Security::Tls(_)),
                ..Default::default()
            };
        }
        let (machine, vcpus, status, notifier) =
            (self.machine.clone(), self.vcpus.clone(), self.status.clone(), self.notifier.clone());
        let worker = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                let outcome = send::migrate(&machine, &vcpus, params, &status.migration);
                match outcome {
                    Outcome::Completed => {
                        *status.state.lock().expect("Poisoned lock") = Some(VmState::Migrated);
                        notifier.notify(MIGRATION, ExitReason::Migrated);
                    }
                    Outcome::Failed(_) => *status.state.lock().expect("Poisoned lock") = Some(VmState::Running),
                    Outcome::InDoubt(_) => {
                        status.in_doubt.store(true, std::sync::atomic::Ordering::SeqCst);
                        status.devices_paused.store(true, std::sync::atomic::Ordering::SeqCst);
                        *status.state.lock().expect("Poisoned lock") = Some(VmState::Paused);
                    }
                }
            })
            .map_err(|e| ApiError::Internal(format!("cannot start the migration thread: {e}")))?;
        self.worker = Some(worker);
        Ok(ApiResponse::Accepted)
    }

    fn start_snapshot(&mut self, req: &SnapshotRequest) -> Result<ApiResponse, ApiError> {
        let was_running = match self.state() {
            VmState::Running => true,
            VmState::Paused => false,
            s => return Err(ApiError::Conflict(format!("cannot take a snapshot of a VM that is {}", state_word(s)))),
        };
        let params = SnapshotParams::from(req);
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
        self.set_state(VmState::Snapshotting);
        *self.status.snapshot.lock().expect("Poisoned lock") = SnapshotInfo {
            phase: SnapshotPhase::Saving,
            dir: Some(params.dir.display().to_string()),
            ..Default::default()
        };
        let (machine, vcpus, status) = (self.machine.clone(), self.vcpus.clone(), self.status.clone());
        let job = move || {
            let started = Instant::now();
            let r = snapshot::save::take(&machine, &vcpus, &params, was_running, &status.snapshot);
            let state = match &r {
                Ok(After::Resumed) => VmState::Running,
                Ok(After::Paused) => {
                    status.devices_paused.store(true, std::sync::atomic::Ordering::SeqCst);
                    VmState::Paused
                }
                Err(_) if was_running => VmState::Running,
                Err(_) => VmState::Paused,
            };
            {
                let mut p = status.snapshot.lock().expect("Poisoned lock");
                match r {
                    Ok(_) => p.phase = SnapshotPhase::Completed,
                    Err(e) => {
                        log::error!("snapshot {}: {e}", params.dir.display());
                        p.phase = SnapshotPhase::Failed;
                        p.error = Some(e.to_string());
                    }
                }
                p.total_ms = started.elapsed().as_millis() as u64;
            }
            *status.state.lock().expect("Poisoned lock") = Some(state);
        };
        let started = match &self.snapshot_writer {
            Some(w) => w.run(Box::new(job)),
            None => std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(job)
                .map(|t| self.worker = Some(t))
                .map_err(|e| format!("cannot start the snapshot thread: {e}")),
        };
        if let Err(e) = started {
            self.set_state(if was_running { VmState::Running } else { VmState::Paused });
            return Err(ApiError::Internal(e));
        }
        Ok(ApiResponse::Accepted)
    }
}

fn state_word(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Migrating => "migrating",
        VmState::Migrated => "migrated",
        VmState::ShuttingDown => "shutting down",
        VmState::Snapshotting => "taking a snapshot",
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.vcpus.lock().expect("Poisoned lock").finish();
    }
}

/// Logged (as a warning) when a vCPU of the guest triple-faulted; tests look for it.
pub const TRIPLE_FAULT_LOG: &str = "the guest triple-faulted";

/// Watches for the guest being done: a vCPU exit, an i8042 reset or a reported panic.
struct ExitWatcher {
    exit_evt: Arc<EventFd>,
    reset_evt: EventFd,
    panic_evt: EventFd,
    exit_rx: Receiver<(u8, ExitReason)>,
    reason: Option<ExitReason>,
    /// Where a migration looks for a guest that is done (see [`Machine::guest_stopped`]).
    shared: Arc<VcpuShared>,
}

impl ExitWatcher {
    /// Marks the guest done for a migration in progress; before the signal is read, so that
    /// the migration sees either the signal or the mark.
    fn mark(&self, why: &str) {
        self.shared.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(why.to_string());
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            self.mark(crate::builder::GUEST_RESET);
            let _ = self.reset_evt.read();
            self.reason.get_or_insert(ExitReason::Reset("i8042 reset"));
        } else if events.fd() == self.panic_evt.as_raw_fd() {
            self.mark(crate::builder::GUEST_PANICKED);
            let _ = self.panic_evt.read();
            self.reason.get_or_insert(ExitReason::Error("the guest panicked".into()));
        } else {
            let _ = self.exit_evt.read();
            // The first exit decides; a second vCPU's exit while stopping changes nothing.
            while let Ok((index, reason)) = self.exit_rx.try_recv() {
                if let ExitReason::Error(e) = &reason {
                    log::error!("{e}");
                } else if reason == ExitReason::Reset(crate::vstate::vcpu::TRIPLE_FAULT) {
                    // KVM has reset the vCPU already (on AMD); the guest cannot go on.
                    log::warn!("vCPU {index}: {TRIPLE_FAULT_LOG}; stopping it");
                } else {
                    log::debug!("exit from {index}: {reason:?}");
                }
                self.reason.get_or_insert(reason);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit_evt.as_raw_fd(), self.reset_evt.as_raw_fd(), self.panic_evt.as_raw_fd()] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                log::error!("failed to watch exit event: {e}");
            }
        }
    }
}

/// Wakes the event loop for API requests; the loop serves them after `run` returns.
struct Wakeup {
    evt: Arc<EventFd>,
}

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.evt, EventSet::IN)) {
            log::error!("failed to watch API requests: {e}");
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
            self.serial.lock().expect("Poisoned lock").enqueue_input(&buf[..n as usize]);
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
