// SPDX-License-Identifier: Apache-2.0
//! The KVM VM: memory slots, the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::thread::JoinHandle;

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
    #[error("cannot register guest memory on a thread of its own: {0}")]
    MemslotThread(std::io::Error),
    #[error("the thread registering guest memory died")]
    MemslotThreadDied,
}

/// Capabilities without which a VM cannot run here.
const REQUIRED_CAPS: [Cap; 7] =
    [Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory, Cap::SetTssAddr, Cap::Pit2, Cap::ImmediateExit];

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
    /// The first registration of guest memory, still running on a thread of its own: KVM
    /// allocates its per-page tracking for the whole slot then, which takes milliseconds that
    /// loading a kernel or receiving a migration's first pages (neither needs the slots) can
    /// overlap. [`Vm::memslots_ready`] waits for it; anything that runs the guest or makes KVM
    /// touch guest memory must call that first.
    pending_memslots: Mutex<Option<JoinHandle<Result<(), VmError>>>>,
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
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        // The PC speaker port is emulated as a dummy so that guests probing it do not exit.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        // A second handle on the same VM for the registering thread, which owns it, so that it
        // stays valid whatever happens to this one.
        // SAFETY: dup of a valid descriptor; the result is checked.
        let dup = unsafe { libc::dup(fd.as_raw_fd()) };
        if dup < 0 {
            return Err(VmError::MemslotThread(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh descriptor of this KVM VM, owned by the new VmFd from here on.
        let slot_fd = unsafe { kvm.create_vmfd_from_rawfd(dup) }.map_err(VmError::Create)?;
        let regions = memslot_regions(&memory, false)?;
        // The thread holds a handle on the memory, so the mapping outlives the registration.
        let mem = memory.clone();
        let pending = std::thread::Builder::new()
            .name("memslots".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Memslots);
                let _mem = mem;
                for r in regions {
                    // SAFETY: the region is a live mapping of `memory`, which the Vm (and this
                    // thread) hold a handle to, so the host range stays valid while KVM uses it.
                    unsafe { slot_fd.set_user_memory_region(r) }.map_err(VmError::Memslot)?;
                }
                Ok(())
            })
            .map_err(VmError::MemslotThread)?;
        Ok(Self { fd, memory, pending_memslots: Mutex::new(Some(pending)) })
    }

    /// Waits until guest memory is registered with KVM (see `pending_memslots`).
    pub fn memslots_ready(&self) -> Result<(), VmError> {
        let pending = self.pending_memslots.lock().expect("Poisoned lock").take();
        match pending {
            Some(t) => t.join().map_err(|_| VmError::MemslotThreadDied)?,
            None => Ok(()),
        }
    }

    /// (Re)registers every memory region, with or without KVM dirty-page logging.
    pub fn set_memslots(&self, log_dirty: bool) -> Result<(), VmError> {
        self.memslots_ready()?;
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

impl Drop for Vm {
    fn drop(&mut self) {
        // Not while KVM may still be registering memory of ours.
        let _ = self.memslots_ready();
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
