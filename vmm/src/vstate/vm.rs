// SPDX-License-Identifier: Apache-2.0
//! The KVM VM: memory slots, the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemoryMmap;
use crate::arch::layout::KVM_TSS_ADDRESS;

/// Errors while creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM lacks a capability this VMM needs: {0:?}")]
    MissingCap(Cap),
    #[error("failed to create the KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("failed to set the TSS address: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("failed to create the in-kernel interrupt controllers: {0}")]
    Irqchip(kvm_ioctls::Error),
    #[error("failed to create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("failed to register guest memory with KVM: {0}")]
    Memslot(kvm_ioctls::Error),
    #[error("failed to get host address of guest memory")]
    HostAddress,
}

/// Capabilities without which a VM cannot run here.
const REQUIRED_CAPS: [Cap; 7] =
    [Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory, Cap::SetTssAddr, Cap::Pit2, Cap::ImmediateExit];

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM, its interrupt controllers and PIT, and registers `memory` with KVM.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(VmError::Tss)?;
        // Memory before the interrupt controllers: creating those leaves KVM a grace period to
        // finish in the background, and the next change of memory slots waits for it. Here
        // that wait was 5 to 7 ms whatever the memory size, on every boot, restore and
        // incoming migration; registering first costs nothing but KVM's per-page tracking (about
        // 0.5 ms per GiB).
        for r in memslot_regions(&memory, false)? {
            // SAFETY: the region is a live mapping of `memory`, which this Vm owns a handle to
            // for its whole life, so the host range stays valid while KVM uses it.
            unsafe { fd.set_user_memory_region(r) }.map_err(VmError::Memslot)?;
        }
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        // The PC speaker port is emulated as a dummy so that guests probing it do not exit.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(Self { fd, memory })
    }

    /// (Re)registers every memory region, with or without KVM dirty-page logging.
    pub fn set_memslots(&self, log_dirty: bool) -> Result<(), VmError> {
        for r in memslot_regions(&self.memory, log_dirty)? {
            // SAFETY: the region is a live mapping of `memory`, which this Vm owns a handle to
            // for its whole life, so the host range stays valid while KVM uses it.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(VmError::Memslot)?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// KVM's view of every region of `memory`, one slot each.
fn memslot_regions(memory: &GuestMemoryMmap, log_dirty: bool) -> Result<Vec<kvm_userspace_memory_region>, VmError> {
    memory
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let host = memory.get_host_address(region.start_addr()).map_err(|_| VmError::HostAddress)?;
            Ok(kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            })
        })
        .collect()
}
