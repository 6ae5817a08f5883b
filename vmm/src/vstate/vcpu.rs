// SPDX-License-Identifier: Apache-2.0
//! vCPUs: configuration for boot and the per-vCPU thread that runs `KVM_RUN` and dispatches
//! port and MMIO exits to the device bus.
//!
//! The thread is controlled over a channel. To make a running vCPU look at its channel, the VMM
//! sends a signal to its thread ("kick"): the handler sets `immediate_exit` in the vCPU's
//! `kvm_run`, so `KVM_RUN` returns at once even if the signal arrived just before it was entered.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, register_signal_handler};

use super::memory::GuestMemoryMmap;
use super::vm::Vm;
use crate::arch::cpuid::{CpuTemplate, normalize};
use crate::arch::{msr, regs};

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("failed to create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("failed to get KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("failed to set {what} of vCPU {index}: {source}")]
    Set {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("failed to get {what} of vCPU {index}: {source}")]
    Get {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("failed to write vCPU {0}'s boot state: {1}")]
    BootState(u8, regs::RegsError),
    #[error("failed to register the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("failed to spawn the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Stop running guest code until `Resume`.
    Pause,
    /// Run guest code again.
    Resume,
    /// Leave the thread.
    Finish,
}

/// A vCPU thread's answer to a [`VcpuEvent`].
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
}

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, triple fault, or a KVM system event): for a micro-VM
    /// that means it is done, as after poweroff.
    Reset(&'static str),
    /// The vCPU hit an error it cannot go on from.
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

/// A configured vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io: Arc<IoManager>,
    memory: GuestMemoryMmap,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`; its port and MMIO exits go to `io`.
    pub fn new(vm: &Vm, index: u8, io: Arc<IoManager>) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Self {
            index,
            fd,
            io,
            memory: vm.memory().clone(),
        })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Sets CPUID, MSRs, registers, FPU and local APIC for the 64-bit boot protocol. Only the
    /// boot vCPU starts at `entry`; the others wait in the LAPIC for INIT/SIPI as on hardware.
    pub fn configure_for_boot(
        &self,
        kvm: &Kvm,
        entry: u64,
        count: u8,
        template: CpuTemplate,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| {
            move |source| VcpuError::Set {
                index,
                what,
                source,
            }
        };
        let get = |what| {
            move |source| VcpuError::Get {
                index,
                what,
                source,
            }
        };

        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::SupportedCpuid)?;
        normalize(&mut cpuid, index, count, template);
        self.fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        self.fd.set_msrs(&msr::boot_msrs()).map_err(set("MSRs"))?;
        self.set_lint()?;
        if index == 0 {
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(set("registers"))?;
            let sregs = self.fd.get_sregs().map_err(get("special registers"))?;
            let sregs = regs::boot_sregs(&self.memory, sregs)
                .map_err(|e| VcpuError::BootState(index, e))?;
            self.fd
                .set_sregs(&sregs)
                .map_err(set("special registers"))?;
            self.fd.set_fpu(&regs::boot_fpu()).map_err(set("FPU"))?;
        }
        Ok(())
    }

    /// LINT0 delivers ExtINT (the PIC) and LINT1 NMI, as the MP table says.
    fn set_lint(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const APIC_MODE_NMI: u32 = 0x4;
        const APIC_MODE_EXTINT: u32 = 0x7;
        let index = self.index;
        let mut lapic = self.fd.get_lapic().map_err(|source| VcpuError::Get {
            index,
            what: "LAPIC",
            source,
        })?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: &mut [u8] = bytemuck_regs(&mut lapic.regs[reg..reg + 4]);
            let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let v = (v & !0x700) | (mode << 8);
            bytes.copy_from_slice(&v.to_le_bytes());
        }
        self.fd.set_lapic(&lapic).map_err(|source| VcpuError::Set {
            index,
            what: "LAPIC",
            source,
        })
    }

    /// Starts the vCPU's thread; it runs guest code at once unless `paused`.
    pub fn start(self, exits: ExitNotifier, paused: bool) -> Result<VcpuHandle, VcpuError> {
        init_kick_signal()?;
        let index = self.index;
        let (event_tx, event_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.thread_main(event_rx, resp_tx, exits, paused))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            events: event_tx,
            responses: resp_rx,
        })
    }

    fn thread_main(
        mut self,
        events: Receiver<VcpuEvent>,
        responses: Sender<VcpuResponse>,
        exits: ExitNotifier,
        mut paused: bool,
    ) {
        set_kick_target(&mut self.fd);
        loop {
            if paused {
                match events.recv() {
                    Ok(VcpuEvent::Resume) => {
                        paused = false;
                        let _ = responses.send(VcpuResponse::Resumed);
                    }
                    Ok(VcpuEvent::Pause) => {
                        let _ = responses.send(VcpuResponse::Paused);
                    }
                    Ok(VcpuEvent::Finish) | Err(_) => break,
                }
                continue;
            }
            match self.run_once() {
                RunResult::Continue => {}
                RunResult::Interrupted => {
                    // Handle everything that was asked while we ran.
                    loop {
                        match events.try_recv() {
                            Ok(VcpuEvent::Pause) => {
                                paused = true;
                                // Tell KVM the guest was stopped on purpose, so that its
                                // watchdogs do not count the pause as a soft lockup.
                                let _ = self.fd.kvmclock_ctrl();
                                let _ = responses.send(VcpuResponse::Paused);
                            }
                            Ok(VcpuEvent::Resume) => {
                                paused = false;
                                let _ = responses.send(VcpuResponse::Resumed);
                            }
                            Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                                clear_kick_target();
                                return;
                            }
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                }
                RunResult::Exit(reason) => {
                    exits.notify(self.index, reason);
                    // Stay parked until the VMM lets us go, answering what it asks.
                    paused = true;
                }
            }
        }
        clear_kick_target();
    }

    fn run_once(&mut self) -> RunResult {
        let index = self.index;
        // For string port I/O (`rep outsb`) KVM hands over `count` accesses of `size` bytes in
        // one exit; the exit's data slice does not say the size, kvm_run does.
        let run = self.fd.get_kvm_run() as *const kvm_run;
        let io_size = || {
            // SAFETY: `run` is this vCPU's mapped kvm_run; after an I/O exit its `io` member is
            // valid, and `size` lies outside the data area the exit's slice borrows.
            usize::from(unsafe { (*run).__bindgen_anon_1.io.size }).max(1)
        };
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    for chunk in data.chunks_mut(io_size()) {
                        if self.io.pio_read(PioAddress(port), chunk).is_err() {
                            // Nothing there: a floating ISA bus reads as all ones.
                            chunk.fill(0xff);
                        }
                    }
                    RunResult::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    for chunk in data.chunks(io_size()) {
                        let _ = self.io.pio_write(PioAddress(port), chunk);
                    }
                    RunResult::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if self.io.mmio_read(MmioAddress(addr), data).is_err() {
                        data.fill(0xff);
                    }
                    RunResult::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let _ = self.io.mmio_write(MmioAddress(addr), data);
                    RunResult::Continue
                }
                VcpuExit::Shutdown => RunResult::Exit(ExitReason::Reset("triple fault")),
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET, _) => {
                    RunResult::Exit(ExitReason::Reset("system event"))
                }
                VcpuExit::Hlt => RunResult::Continue,
                VcpuExit::InternalError => {
                    RunResult::Exit(ExitReason::Error(self.describe_internal_error()))
                }
                VcpuExit::FailEntry(reason, cpu) => RunResult::Exit(ExitReason::Error(format!(
                    "vCPU {index}: KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                ))),
                other => RunResult::Exit(ExitReason::Error(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                RunResult::Interrupted
            }
            Err(e) => RunResult::Exit(ExitReason::Error(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        }
    }

    /// A one-line account of an internal error: suberror, where the guest was and the bytes of
    /// the instruction there, which is what one needs to see which instruction KVM could not
    /// emulate.
    pub(crate) fn describe_internal_error(&mut self) -> String {
        // SAFETY: KVM_EXIT_INTERNAL_ERROR filled the `internal` member of the exit union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            _ => "unknown",
        };
        let mut msg = format!(
            "vCPU {}: KVM internal error (suberror {}: {what})",
            self.index, internal.suberror
        );
        if let Ok(regs) = self.fd.get_regs() {
            let cpl = self.fd.get_sregs().map(|s| s.cs.dpl).unwrap_or(0);
            msg += &format!(" at rip {:#x} (CPL {cpl})", regs.rip);
            if let Ok(t) = self.fd.translate_gva(regs.rip)
                && t.valid != 0
            {
                let mut insn = [0u8; 15];
                if self
                    .memory
                    .read_slice(&mut insn, GuestAddress(t.physical_address))
                    .is_ok()
                {
                    let hex: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
                    msg += &format!(", instruction bytes {}", hex.join(" "));
                }
            }
        }
        msg
    }
}

fn bytemuck_regs(regs: &mut [std::os::raw::c_char]) -> &mut [u8] {
    // SAFETY: c_char and u8 have the same size and alignment; the slice stays borrowed.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

enum RunResult {
    Continue,
    Interrupted,
    Exit(ExitReason),
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
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
    pub fn recv(&self, timeout: std::time::Duration) -> Option<VcpuResponse> {
        self.responses.recv_timeout(timeout).ok()
    }

    fn kick(&self) {
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

thread_local! {
    /// This thread's vCPU `kvm_run`, for the kick signal handler. `const`-initialised, so that
    /// reading it from a signal handler never allocates.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Makes the kick signal interrupt `KVM_RUN` of `fd` when it arrives on this thread.
pub(crate) fn set_kick_target(fd: &mut VcpuFd) {
    KVM_RUN_PTR.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
}

/// Must be called on the same thread before the `VcpuFd` given to [`set_kick_target`] is dropped.
pub(crate) fn clear_kick_target() {
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}

pub(crate) fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mapped kvm_run, set by the vCPU thread
            // before it first runs and cleared before the VcpuFd is dropped.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

pub(crate) fn init_kick_signal() -> Result<(), VcpuError> {
    static INIT: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    INIT.get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
        .clone()
        .map_err(VcpuError::Signal)
}
