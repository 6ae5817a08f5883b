// SPDX-License-Identifier: Apache-2.0
//! Live migration, VMM side: what a machine's state is made of, saving and restoring it, and
//! the two ends of a migration ([`send`] on the source, [`receive`] on the destination). The
//! wire protocol and the state types of KVM objects are the `migration` crate's.

pub mod apply;
pub mod cpu;
pub mod dirty;
pub mod disks;
pub mod hook;
pub mod params;
pub mod postcopy_source;
pub mod receive;
pub mod send;

pub use cpu::check_cpuid;

use block::persist::BlockState;
use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip};
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
