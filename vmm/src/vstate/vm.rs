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
    #[error("failed to map guest memory: {0}")]
    Memory(#[source] super::memory::MemoryError),
}

/// Capabilities without which a VM cannot run here.
const REQUIRED_CAPS: [Cap; 7] =
    [Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory, Cap::SetTssAddr, Cap::Pit2, Cap::ImmediateExit];

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

/// A KVM VM created ahead of its guest, by a VMM waiting for a snapshot (`vmm run
/// --await-restore`): the VM, its TSS, interrupt controllers and PIT, none of which depend on
/// the guest, and, if it was told the guest's size, guest memory of that size mapped and
/// registered with KVM (under shadow paging KVM's per-page tracking makes that about 0.5 ms per
/// GiB here: done ahead, a restore's time does not grow with memory size). See
/// [`Vm::on_shell`].
pub struct VmShell {
    fd: VmFd,
    /// Memory mapped and registered ahead, never touched.
    memory: Option<GuestMemoryMmap>,
}

impl VmShell {
    /// Creates the VM with its interrupt controllers and PIT, and with `mem_bytes` of guest
    /// memory registered if given. Creating the controllers leaves KVM a grace period to
    /// finish in the background, which the next change of memory slots waits for (see
    /// [`Vm::new`]): a VMM that waits for its guest has let it pass by the time it registers
    /// the guest's memory.
    pub fn create(kvm: &Kvm, mem_bytes: Option<u64>) -> Result<VmShell, VmError> {
        // The fields drop in order: on any failure the VM goes before the memory it may have
        // registered.
        let mut shell = VmShell { fd: create_vm(kvm)?, memory: None };
        if let Some(size) = mem_bytes {
            let memory = shell.memory.insert(super::memory::create_guest_memory(size).map_err(VmError::Memory)?);
            register(&shell.fd, memory, false)?;
        }
        add_interrupt_controllers(&shell.fd)?;
        Ok(shell)
    }

    /// The memory registered ahead, if it has the layout of `size` bytes of guest memory.
    pub fn memory_of_size(&self, size: u64) -> Option<GuestMemoryMmap> {
        let memory = self.memory.as_ref()?;
        let got: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
        (got == crate::arch::layout::ram_regions(size)).then(|| memory.clone())
    }
}

/// Registers every region of `memory` with the VM `fd`.
fn register(fd: &VmFd, memory: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
    for r in memslot_regions(memory, log_dirty)? {
        // SAFETY: the region is a live mapping of `memory`, which whoever registers it keeps
        // (in the `Vm` or `VmShell` that owns `fd`) for as long as the VM lives, so the host
        // range stays valid while KVM uses it.
        unsafe { fd.set_user_memory_region(r) }.map_err(VmError::Memslot)?;
    }
    Ok(())
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    for cap in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    let fd = kvm.create_vm().map_err(VmError::Create)?;
    fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(VmError::Tss)?;
    Ok(fd)
}

fn add_interrupt_controllers(fd: &VmFd) -> Result<(), VmError> {
    fd.create_irq_chip().map_err(VmError::Irqchip)?;
    // The PC speaker port is emulated as a dummy so that guests probing it do not exit.
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    fd.create_pit2(pit).map_err(VmError::Pit)
}

impl Vm {
    /// Creates the VM, its interrupt controllers and PIT, and registers `memory` with KVM.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = create_vm(kvm)?;
        // Memory before the interrupt controllers: creating those leaves KVM a grace period to
        // finish in the background, and the next change of memory slots waits for it. Here
        // that wait was 5 to 7 ms whatever the memory size, on every boot, restore and
        // incoming migration; registering first costs nothing but KVM's per-page tracking (about
        // 0.5 ms per GiB).
        register(&fd, &memory, false)?;
        add_interrupt_controllers(&fd)?;
        Ok(Self { fd, memory })
    }

    /// The VM of `shell` with `memory` registered: at once if it is the memory the shell
    /// registered ahead ([`VmShell::memory_of_size`]), or in its place.
    pub fn on_shell(shell: VmShell, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let VmShell { fd, memory: ahead } = shell;
        let same = ahead.as_ref().is_some_and(|a| same_mapping(a, &memory));
        if let (Some(ahead), false) = (&ahead, same) {
            // Another size than the one prepared: the prepared slots go first.
            for mut r in memslot_regions(ahead, false)? {
                r.memory_size = 0;
                // SAFETY: deleting a slot; KVM stops using its host range.
                unsafe { fd.set_user_memory_region(r) }.map_err(VmError::Memslot)?;
            }
        }
        if !same {
            register(&fd, &memory, false)?;
        }
        Ok(Self { fd, memory })
    }

    /// (Re)registers every memory region, with or without KVM dirty-page logging.
    pub fn set_memslots(&self, log_dirty: bool) -> Result<(), VmError> {
        register(&self.fd, &self.memory, log_dirty)
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// Whether `a` and `b` are the same mappings (clones of one guest memory).
fn same_mapping(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    let host = |m: &GuestMemoryMmap| -> Vec<(Option<usize>, usize)> {
        m.iter().map(|r| (m.get_host_address(r.start_addr()).ok().map(|p| p as usize), r.len() as usize)).collect()
    };
    host(a) == host(b)
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
