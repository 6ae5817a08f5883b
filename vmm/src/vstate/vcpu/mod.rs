// SPDX-License-Identifier: Apache-2.0
//! vCPUs: configuration for boot, state save/restore for migration, and the per-vCPU thread that
//! runs `KVM_RUN` and dispatches port and MMIO exits to the device bus.
//!
//! The thread is controlled over a channel. To make a running vCPU look at its channel, the VMM
//! sends a signal to its thread ("kick"): the handler sets `immediate_exit` in the vCPU's
//! `kvm_run`, so `KVM_RUN` returns at once even if the signal arrived just before it was entered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_msr_entry, kvm_run,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use migration::VcpuState;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMemoryMmap;
use super::vm::Vm;
use crate::arch::cpuid::{CpuTemplate, normalize};
use crate::arch::{msr, regs};

mod exits;
mod kick;
mod set;

pub use exits::{ExitChannel, ExitCounters, ExitNotifier, ExitReason, FirstRun, TRIPLE_FAULT, VcpuShared};
pub(crate) use kick::{clear_kick_target, init_kick_signal, kick_signal, set_kick_target};
pub use set::{VcpuHandle, VcpuSet};

/// The migration throttle's time slice: a throttled vCPU is kicked this often.
pub const THROTTLE_TICK: Duration = Duration::from_millis(10);

/// Errors while creating, configuring or saving a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("failed to create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("failed to get KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("failed to set {what} of vCPU {index}: {source}")]
    Set { index: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("failed to get {what} of vCPU {index}: {source}")]
    Get { index: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("failed to write vCPU {0}'s boot state: {1}")]
    BootState(u8, regs::RegsError),
    #[error("failed to register the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("failed to spawn the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("vCPU {0} MSRs: {1}")]
    Msrs(u8, String),
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Stop running guest code until `Resume`.
    Pause,
    /// Run guest code again.
    Resume,
    /// Save the vCPU's state (only while paused).
    SaveState,
    /// `Pause`, answered as soon as the guest stopped, then `SaveState` (a second answer): the
    /// state is read while the VMM does other work of the stop-and-copy.
    PauseAndSave,
    /// Leave the thread.
    Finish,
}

/// A vCPU thread's answer to a [`VcpuEvent`].
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<VcpuState>),
    Error(String),
}

impl std::fmt::Debug for VcpuResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuResponse::Paused => write!(f, "Paused"),
            VcpuResponse::Resumed => write!(f, "Resumed"),
            VcpuResponse::State(_) => write!(f, "State(..)"),
            VcpuResponse::Error(e) => write!(f, "Error({e})"),
        }
    }
}

fn msr_entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect()
}

/// A vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io: Arc<IoManager>,
    memory: GuestMemoryMmap,
    shared: Arc<VcpuShared>,
    /// MSRs to save and restore (the saveable ones KVM lists and this vCPU can read).
    msrs: Vec<u32>,
    has_xsave: bool,
    has_xcrs: bool,
    /// A summary of the state this vCPU was given by a migration or snapshot, for the report
    /// of an internal error (was the state already wrong when it came, or did it go wrong here?).
    restored: std::sync::OnceLock<String>,
}

/// Where a saved vCPU state says the vCPU is: MP state, RIP, CS, EFER, APIC base and the
/// pending INIT/SIPI KVM carries in its events.
fn state_summary(s: &VcpuState) -> String {
    let e = &s.vcpu_events;
    format!(
        "mp_state {}, rip {:#x}, cs {:#x} base {:#x}, efer {:#x}, apic_base {:#x}, latched_init {}, sipi_vector {}, events flags {:#x}",
        s.mp_state.mp_state,
        s.regs.rip,
        s.sregs.cs.selector,
        s.sregs.cs.base,
        s.sregs.efer,
        s.sregs.apic_base,
        e.smi.latched_init,
        e.sipi_vector,
        e.flags
    )
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`; its port and MMIO exits go to `io`.
    pub fn new(kvm: &Kvm, vm: &Vm, index: u8, io: Arc<IoManager>, shared: Arc<VcpuShared>) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(index)).map_err(|e| VcpuError::Create(index, e))?;
        let mut vcpu = Self {
            index,
            fd,
            io,
            memory: vm.memory().clone(),
            shared,
            msrs: Vec::new(),
            has_xsave: kvm.check_extension(Cap::Xsave),
            has_xcrs: kvm.check_extension(Cap::Xcrs),
            restored: std::sync::OnceLock::new(),
        };
        vcpu.msrs = vcpu.saveable_msrs(kvm)?;
        Ok(vcpu)
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

    /// The MSRs KVM lists as saveable that this vCPU actually reads: KVM_GET_MSRS stops at the
    /// first one it cannot read, so drop that one and try again.
    fn saveable_msrs(&self, kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
        let index = self.index;
        let list = kvm.get_msr_index_list().map_err(|source| VcpuError::Get { index, what: "MSR list", source })?;
        let mut msrs: Vec<u32> = list.as_slice().to_vec();
        loop {
            let mut req =
                Msrs::from_entries(&msr_entries(&msrs)).map_err(|e| VcpuError::Msrs(index, format!("{e:?}")))?;
            let n = self.fd.get_msrs(&mut req).map_err(|source| VcpuError::Get { index, what: "MSRs", source })?;
            if n >= msrs.len() {
                return Ok(msrs);
            }
            log::debug!("vCPU {index}: MSR {:#x} is listed but not readable; it is not migrated", msrs[n]);
            msrs.remove(n);
        }
    }

    /// Sets CPUID, MSRs, registers, FPU and local APIC for the 64-bit boot protocol. Only the
    /// boot vCPU starts at `entry`; the others wait in the LAPIC for INIT/SIPI as on hardware.
    /// `supported`: KVM's supported CPUID, which `template` trims for the guest.
    pub fn configure_for_boot(
        &self,
        supported: &CpuId,
        entry: u64,
        count: u8,
        template: CpuTemplate,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| move |source| VcpuError::Set { index, what, source };
        let get = |what| move |source| VcpuError::Get { index, what, source };

        let mut cpuid = supported.clone();
        normalize(&mut cpuid, index, count, template);
        self.fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        self.fd.set_msrs(&msr::boot_msrs()).map_err(set("MSRs"))?;
        self.set_lint()?;
        if index == 0 {
            self.fd.set_regs(&regs::boot_regs(entry)).map_err(set("registers"))?;
            let sregs = self.fd.get_sregs().map_err(get("special registers"))?;
            let sregs = regs::boot_sregs(&self.memory, sregs).map_err(|e| VcpuError::BootState(index, e))?;
            self.fd.set_sregs(&sregs).map_err(set("special registers"))?;
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
        let mut lapic = self.fd.get_lapic().map_err(|source| VcpuError::Get { index, what: "LAPIC", source })?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: &mut [u8] = bytemuck_regs(&mut lapic.regs[reg..reg + 4]);
            let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let v = (v & !0x700) | (mode << 8);
            bytes.copy_from_slice(&v.to_le_bytes());
        }
        self.fd.set_lapic(&lapic).map_err(|source| VcpuError::Set { index, what: "LAPIC", source })
    }

    /// Reads everything that makes up this vCPU. It must not be running.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        let get = |what| move |source| VcpuError::Get { index, what, source };
        let fd = &self.fd;
        let mut msrs =
            Msrs::from_entries(&msr_entries(&self.msrs)).map_err(|e| VcpuError::Msrs(index, format!("{e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(get("MSRs"))?;
        if n != self.msrs.len() {
            return Err(VcpuError::Msrs(index, format!("read {n} of {} MSRs", self.msrs.len())));
        }
        Ok(VcpuState {
            cpuid: fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(get("CPUID"))?,
            mp_state: fd.get_mp_state().map_err(get("MP state"))?,
            regs: fd.get_regs().map_err(get("registers"))?,
            sregs: fd.get_sregs().map_err(get("special registers"))?,
            xsave: if self.has_xsave { Some(fd.get_xsave().map_err(get("XSAVE"))?) } else { None },
            xcrs: if self.has_xcrs { Some(fd.get_xcrs().map_err(get("XCRs"))?) } else { None },
            debug_regs: fd.get_debug_regs().map_err(get("debug registers"))?,
            lapic: fd.get_lapic().map_err(get("LAPIC"))?,
            msrs,
            vcpu_events: fd.get_vcpu_events().map_err(get("events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Puts a saved state into this (not running) vCPU, in the order KVM needs: CPUID first
    /// (several setters consult it), MP state, registers before special registers, SET_REGS
    /// before SET_VCPU_EVENTS (it clears pending exceptions that the events restore), SREGS
    /// before the LAPIC (SREGS restores the APIC base), the LAPIC before MSRs (the TSC deadline
    /// MSR needs a configured LAPIC). This is Firecracker's documented order.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| move |source| VcpuError::Set { index, what, source };
        let fd = &self.fd;
        fd.set_cpuid2(&state.cpuid).map_err(set("CPUID"))?;
        fd.set_mp_state(state.mp_state).map_err(set("MP state"))?;
        fd.set_regs(&state.regs).map_err(set("registers"))?;
        fd.set_sregs(&state.sregs).map_err(set("special registers"))?;
        if let Some(xsave) = &state.xsave {
            // SAFETY: the buffer is a whole kvm_xsave saved from a vCPU of the same KVM API.
            unsafe { fd.set_xsave(xsave) }.map_err(set("XSAVE"))?;
        }
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs).map_err(set("XCRs"))?;
        }
        fd.set_debug_regs(&state.debug_regs).map_err(set("debug registers"))?;
        fd.set_lapic(&state.lapic).map_err(set("LAPIC"))?;
        let want = state.msrs.as_slice().len();
        let n = fd.set_msrs(&state.msrs).map_err(set("MSRs"))?;
        if n != want {
            let bad = state.msrs.as_slice().get(n).map(|e| e.index).unwrap_or(0);
            return Err(VcpuError::Msrs(index, format!("KVM refused MSR {bad:#x} ({n} of {want} restored)")));
        }
        fd.set_vcpu_events(&state.vcpu_events).map_err(set("events"))?;
        let _ = self.restored.set(state_summary(state));
        Ok(())
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
        Ok(VcpuHandle { index, thread: Some(thread), events: event_tx, responses: resp_rx })
    }

    fn thread_main(
        mut self,
        events: Receiver<VcpuEvent>,
        responses: Sender<VcpuResponse>,
        exits: ExitNotifier,
        mut paused: bool,
    ) {
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
            exits.notify(self.index, ExitReason::Error(e.to_string()));
            self.shared.first_run.give_up();
            return;
        }
        set_kick_target(&mut self.fd);
        if !paused {
            self.shared.first_run.mark();
        }
        loop {
            if paused {
                match events.recv() {
                    Ok(event) => {
                        if !self.handle_event(event, &mut paused, &responses) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
                continue;
            }
            match self.run_once() {
                RunResult::Continue => {}
                RunResult::Interrupted => {
                    // Handle everything that was asked while we ran.
                    let mut asked = false;
                    loop {
                        match events.try_recv() {
                            Ok(event) => {
                                asked = true;
                                if !self.handle_event(event, &mut paused, &responses) {
                                    clear_kick_target();
                                    return;
                                }
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                clear_kick_target();
                                return;
                            }
                        }
                    }
                    // A kick that asked nothing comes from the migration throttle: give up the
                    // CPU for the throttled share of each tick.
                    let pct = self.shared.throttle_pct.load(Ordering::Relaxed).min(99);
                    if !asked && !paused && pct > 0 {
                        std::thread::sleep(THROTTLE_TICK * pct / (100 - pct));
                    }
                }
                RunResult::Exit(reason) => {
                    let why = match &reason {
                        ExitReason::Error(e) => e.clone(),
                        ExitReason::Reset(how) => format!("vCPU {}: the guest reset ({how})", self.index),
                        ExitReason::Migrated => format!("vCPU {}: migrated", self.index),
                    };
                    self.shared.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(why);
                    exits.notify(self.index, reason);
                    // Stay parked until the VMM lets us go, answering what it asks.
                    paused = true;
                }
            }
        }
        clear_kick_target();
    }

    /// Acts on one event; returns false when the thread must end.
    fn handle_event(&mut self, event: VcpuEvent, paused: &mut bool, responses: &Sender<VcpuResponse>) -> bool {
        let reply = match event {
            VcpuEvent::Pause => {
                self.pause(paused);
                VcpuResponse::Paused
            }
            VcpuEvent::PauseAndSave => {
                self.pause(paused);
                let _ = responses.send(VcpuResponse::Paused);
                match self.save_state() {
                    Ok(s) => VcpuResponse::State(Box::new(s)),
                    Err(e) => VcpuResponse::Error(e.to_string()),
                }
            }
            VcpuEvent::Resume => {
                *paused = false;
                VcpuResponse::Resumed
            }
            VcpuEvent::SaveState if *paused => match self.save_state() {
                Ok(s) => VcpuResponse::State(Box::new(s)),
                Err(e) => VcpuResponse::Error(e.to_string()),
            },
            VcpuEvent::SaveState => VcpuResponse::Error("a running vCPU cannot be saved".into()),
            VcpuEvent::Finish => return false,
        };
        let _ = responses.send(reply);
        true
    }

    fn pause(&mut self, paused: &mut bool) {
        if !*paused {
            *paused = true;
            // Tell KVM the guest was stopped on purpose, so that its watchdogs do not count the
            // pause as a soft lockup.
            let _ = self.fd.kvmclock_ctrl();
        }
    }

    fn run_once(&mut self) -> RunResult {
        let index = self.index;
        let exits = &self.shared.exits;
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
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
                    count(&exits.io_in);
                    for chunk in data.chunks_mut(io_size()) {
                        if self.io.pio_read(PioAddress(port), chunk).is_err() {
                            // Nothing there: a floating ISA bus reads as all ones.
                            chunk.fill(0xff);
                        }
                    }
                    RunResult::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    count(&exits.io_out);
                    for chunk in data.chunks(io_size()) {
                        let _ = self.io.pio_write(PioAddress(port), chunk);
                    }
                    RunResult::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    count(&exits.mmio_read);
                    if self.io.mmio_read(MmioAddress(addr), data).is_err() {
                        data.fill(0xff);
                    }
                    RunResult::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    count(&exits.mmio_write);
                    let _ = self.io.mmio_write(MmioAddress(addr), data);
                    RunResult::Continue
                }
                VcpuExit::Shutdown => {
                    count(&exits.shutdown);
                    RunResult::Exit(ExitReason::Reset(TRIPLE_FAULT))
                }
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET, _) => {
                    count(&exits.shutdown);
                    RunResult::Exit(ExitReason::Reset("system event"))
                }
                VcpuExit::Hlt => {
                    count(&exits.hlt);
                    RunResult::Continue
                }
                VcpuExit::InternalError => {
                    count(&exits.internal_error);
                    RunResult::Exit(ExitReason::Error(self.describe_internal_error()))
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    count(&exits.other);
                    RunResult::Exit(ExitReason::Error(format!(
                        "vCPU {index}: KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                    )))
                }
                other => {
                    count(&exits.other);
                    RunResult::Exit(ExitReason::Error(format!("vCPU {index}: unexpected exit {other:?}")))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&exits.interrupted);
                self.fd.set_kvm_immediate_exit(0);
                RunResult::Interrupted
            }
            Err(e) => RunResult::Exit(ExitReason::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
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
        let mut msg = format!("vCPU {}: KVM internal error (suberror {}: {what})", self.index, internal.suberror);
        if let Ok(regs) = self.fd.get_regs() {
            msg += &format!(" at rip {:#x}", regs.rip);
            if let Ok(sregs) = self.fd.get_sregs() {
                msg += &format!(
                    " (CPL {}), cs {:#x} base {:#x}, efer {:#x}",
                    sregs.cs.dpl, sregs.cs.selector, sregs.cs.base, sregs.efer
                );
            }
            if let Ok(mp) = self.fd.get_mp_state() {
                msg += &format!(", mp_state {}", mp.mp_state);
            }
            if let Some(restored) = self.restored.get() {
                msg += &format!("; its state as restored here: {restored}");
            }
            if let Ok(t) = self.fd.translate_gva(regs.rip)
                && t.valid != 0
            {
                let mut insn = [0u8; 15];
                if self.memory.read_slice(&mut insn, GuestAddress(t.physical_address)).is_ok() {
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
