// SPDX-License-Identifier: Apache-2.0
//! Live migration, VMM side: what a machine's state is made of, saving and restoring it, and
//! the two ends of a migration ([`send`] on the source, [`receive`] on the destination). The
//! wire protocol and the state types of KVM objects are the `migration` crate's.

pub mod apply;
pub mod dirty;
pub mod disks;
pub mod hook;
pub mod params;
pub mod postcopy_source;
pub mod receive;
pub mod send;

use block::persist::BlockState;
use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2,
    kvm_irqchip,
};
use kvm_ioctls::{Kvm, VcpuFd};
use migration::{StateVersion, VcpuState, VmState};
use net::persist::NetState;
use serde::{Deserialize, Serialize};
use virtio::MmioTransportState;
use vm_memory::GuestMemoryBackend;

use crate::builder::{BuiltVm, Machine};
use crate::devices::serial::SerialPortState;
use crate::vstate::vm::Vm;

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Protocol(#[from] migration::ProtocolError),
    #[error("{0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("{0}")]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("vCPUs: {0}")]
    Vcpus(String),
    #[error("the guest stopped on this host during the migration, so it is not sent: {0}")]
    GuestStopped(String),
    #[error("device state: {0}")]
    Device(String),
    #[error("memory: {0}")]
    Memory(String),
    #[error("incompatible: {0}")]
    Incompatible(String),
    #[error("{0}")]
    Build(#[from] crate::builder::BuildError),
    #[error("{0}")]
    Other(String),
}

/// Everything besides memory that makes up a running machine.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub version: StateVersion,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialPortState,
    pub nets: Vec<NetDeviceState>,
    /// The disks (state 2.1; none before).
    #[serde(default)]
    pub disks: Vec<BlockDeviceState>,
}

/// One disk: the transport's registers and the device's state.
#[derive(Serialize, Deserialize)]
pub struct BlockDeviceState {
    pub transport: MmioTransportState,
    pub device: BlockState,
}

/// One NIC: the transport's registers and the device's state.
#[derive(Serialize, Deserialize)]
pub struct NetDeviceState {
    pub transport: MmioTransportState,
    pub device: NetState,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MigrateError {
    move |source| MigrateError::Kvm { what, source }
}

/// Reads the interrupt controllers, PIT and clock. vCPUs must be paused.
pub fn save_vm_state(vm: &Vm) -> Result<VmState, MigrateError> {
    let fd = vm.fd();
    let chip = |id| -> Result<kvm_irqchip, MigrateError> {
        let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
        fd.get_irqchip(&mut c).map_err(kvm_err("get irqchip"))?;
        Ok(c)
    };
    let mut clock = fd.get_clock().map_err(kvm_err("get clock"))?;
    // KVM reports flags (TSC stable, host TSC) that KVM_SET_CLOCK refuses; the value is what
    // matters. The guest's clock then simply stands still while it is paused.
    clock.flags = 0;
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(kvm_err("get PIT"))?,
        clock,
    })
}

/// Restores what [`save_vm_state`] read, before any vCPU runs.
pub fn restore_vm_state(vm: &Vm, state: &VmState) -> Result<(), MigrateError> {
    let fd = vm.fd();
    fd.set_pit2(&state.pit).map_err(kvm_err("set PIT"))?;
    fd.set_clock(&state.clock).map_err(kvm_err("set clock"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(chip).map_err(kvm_err("set irqchip"))?;
    }
    Ok(())
}

/// Saves the disks. They must be paused (see [`pause_devices`]).
pub fn save_disks(m: &Machine) -> Vec<BlockDeviceState> {
    m.disks
        .iter()
        .map(|d| {
            let transport = d.transport.lock().expect("Poisoned lock").save_state();
            BlockDeviceState { transport, device: d.block.lock().expect("Poisoned lock").save_state() }
        })
        .collect()
}

/// Saves the devices. They must be paused (see [`pause_devices`]).
pub fn save_devices(m: &Machine) -> (SerialPortState, Vec<NetDeviceState>) {
    let serial = m.serial.lock().expect("Poisoned lock").save_state();
    let nets = m
        .nets
        .iter()
        .map(|d| {
            // The transport locks the device itself: ask it first, not while holding the device.
            let transport = d.transport.lock().expect("Poisoned lock").save_state();
            let mut net = d.net.lock().expect("Poisoned lock");
            // Frames that reached this host's TAP since the device paused go along.
            net.drain_tap();
            NetDeviceState { transport, device: net.save_state() }
        })
        .collect();
    (serial, nets)
}

/// Stops the NICs and disks from touching guest memory (and the disks their images). A disk
/// is drained: pausing it waits for the request it is carrying out, and none is left in flight.
pub fn pause_devices(m: &Machine) {
    for d in &m.nets {
        d.net.lock().expect("Poisoned lock").pause();
    }
    for d in &m.disks {
        d.block.lock().expect("Poisoned lock").pause();
    }
}

/// Lets the NICs move frames and the disks carry out requests again.
pub fn resume_devices(m: &Machine) {
    for d in &m.nets {
        d.net.lock().expect("Poisoned lock").resume();
    }
    for d in &m.disks {
        d.block.lock().expect("Poisoned lock").resume();
    }
}

/// Writes one announce round (RARP and gratuitous ARP) into every NIC's TAP.
pub fn announce_now(m: &Machine) {
    for d in &m.nets {
        d.net.lock().expect("Poisoned lock").announce();
    }
}

/// Restores the devices of a freshly built machine.
pub fn restore_devices(m: &Machine, serial: &SerialPortState, nets: &[NetDeviceState]) -> Result<(), MigrateError> {
    m.serial.lock().expect("Poisoned lock").restore_state(serial).map_err(|e| MigrateError::Device(e.to_string()))?;
    if nets.len() != m.nets.len() {
        return Err(MigrateError::Device(format!("{} NICs saved, {} here", nets.len(), m.nets.len())));
    }
    for (d, s) in m.nets.iter().zip(nets) {
        d.net
            .lock()
            .expect("Poisoned lock")
            .restore_state(&s.device, m.vm.memory())
            .map_err(|e| MigrateError::Device(format!("NIC on {}: {e}", d.config.tap)))?;
        d.transport.lock().expect("Poisoned lock").restore_state(&s.transport);
    }
    Ok(())
}

/// Restores the disks of a freshly built machine.
pub fn restore_disks(m: &Machine, disks: &[BlockDeviceState]) -> Result<(), MigrateError> {
    if disks.len() != m.disks.len() {
        return Err(MigrateError::Device(format!("{} disks saved, {} here", disks.len(), m.disks.len())));
    }
    for (d, s) in m.disks.iter().zip(disks) {
        d.block
            .lock()
            .expect("Poisoned lock")
            .restore_state(&s.device, m.vm.memory())
            .map_err(|e| MigrateError::Device(format!("disk {}: {e}", d.config.path.display())))?;
        d.transport.lock().expect("Poisoned lock").restore_state(&s.transport);
    }
    Ok(())
}

/// Puts the machine's state into a freshly built machine (an incoming migration's, a restored
/// snapshot's), before its vCPUs run. Guest memory must be registered with KVM.
pub fn restore_machine(built: &BuiltVm, state: &MachineState) -> Result<(), MigrateError> {
    let m = &built.machine;
    if state.vcpus.len() != built.vcpus.len() {
        return Err(MigrateError::Incompatible(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            built.vcpus.len()
        )));
    }
    restore_vm_state(&m.vm, &state.vm)?;
    for (vcpu, s) in built.vcpus.iter().zip(&state.vcpus) {
        vcpu.restore_state(s).map_err(|e| MigrateError::Vcpus(e.to_string()))?;
    }
    restore_devices(m, &state.serial, &state.nets)?;
    restore_disks(m, &state.disks)?;
    if let Some(v0) = state.vcpus.first() {
        *m.cpuid.lock().expect("Poisoned lock") = v0.cpuid.as_slice().to_vec();
    }
    // The VMM's own dirty bitmap recorded every page this side wrote; nobody needs that.
    for region in m.vm.memory().iter() {
        (**region).bitmap().reset();
    }
    Ok(())
}

/// Feature bits the VMM sets in CPUID itself, so they need no support check.
fn vmm_owned_bits(function: u32, reg: usize) -> u32 {
    match (function, reg) {
        // ECX: hypervisor, TSC deadline (in-kernel LAPIC), OSXSAVE (follows CR4).
        (0x1, 2) => (1 << 31) | (1 << 24) | (1 << 27),
        // EDX: HTT (set with more than one vCPU).
        (0x1, 3) => 1 << 28,
        // ECX: OSPKE (follows CR4.PKE, which a guest such as Linux sets on a CPU with PKU: the
        // CPUID read back from its vCPU after a first migration has it).
        (0x7, 2) => 1 << 4,
        _ => 0,
    }
}

/// The CPUID a guest on this host can be given: what a vCPU reports after being given KVM's
/// supported set, i.e. that set as KVM itself adjusts it on a vCPU. An incoming guest's
/// features are checked against this rather than the raw supported list. (Code at CPL 3 on
/// paravirtual nested KVM sees the host's CPUID natively; this is what KVM answers at CPL 0.)
/// `vcpu` is one that has not run yet (its CPUID is set again before it does), with KVM's
/// supported CPUID as the build asked it; without one, a probe VM is made for the question,
/// which costs about a millisecond here.
fn effective_cpuid(kvm: &Kvm, vcpu: Option<(&VcpuFd, &CpuId)>) -> Result<Vec<kvm_cpuid_entry2>, String> {
    let asked;
    let supported = match vcpu {
        Some((_, supported)) => supported,
        None => {
            asked = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("supported CPUID: {e}"))?;
            &asked
        }
    };
    let probe;
    let vcpu = match vcpu {
        Some((v, _)) => v,
        None => {
            let vm = kvm.create_vm().map_err(|e| format!("probe VM: {e}"))?;
            probe = vm.create_vcpu(0).map_err(|e| format!("probe vCPU: {e}"))?;
            &probe
        }
    };
    vcpu.set_cpuid2(supported).map_err(|e| format!("CPUID: {e}"))?;
    let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("CPUID: {e}"))?;
    Ok(got.as_slice().to_vec())
}

/// Checks that this host's KVM can give the guest every feature in `wanted` (the CPUID it ran
/// with on the source), so it will not crash on an instruction this host lacks. `vcpu`: a vCPU
/// of the VM being built that has not run yet, if there is one already, with KVM's supported
/// CPUID as already asked (see `effective_cpuid`).
pub fn check_cpuid(
    kvm: &Kvm,
    vcpu: Option<(&VcpuFd, &CpuId)>,
    wanted: &[kvm_cpuid_entry2],
) -> Result<(), MigrateError> {
    let have_all = effective_cpuid(kvm, vcpu)
        .map_err(|e| MigrateError::Incompatible(format!("cannot read this host's CPUID: {e}")))?;
    // (leaf, subleaf, registers holding feature bits: 0 = eax .. 3 = edx)
    let feature_regs: [(u32, u32, &[usize]); 3] = [(0x1, 0, &[2, 3]), (0x7, 0, &[1, 2, 3]), (0x8000_0001, 0, &[2, 3])];
    let mut missing = Vec::new();
    for (function, index, regs) in feature_regs {
        let Some(w) = wanted.iter().find(|e| e.function == function && e.index == index) else { continue };
        let h = have_all.iter().find(|e| e.function == function && e.index == index);
        let have = h.map(|e| [e.eax, e.ebx, e.ecx, e.edx]).unwrap_or([0; 4]);
        let want = [w.eax, w.ebx, w.ecx, w.edx];
        for &reg in regs {
            let lacking = want[reg] & !have[reg] & !vmm_owned_bits(function, reg);
            if lacking != 0 {
                let name = ["eax", "ebx", "ecx", "edx"][reg];
                missing.push(format!("leaf {function:#x}.{index} {name} bits {lacking:#x}"));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::Incompatible(format!(
            "this host's CPU lacks features the guest uses: {}",
            missing.join(", ")
        )))
    }
}
