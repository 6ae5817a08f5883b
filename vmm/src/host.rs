// SPDX-License-Identifier: Apache-2.0
//! What a VM uses of the host (/dev/kvm, its TAPs, its disk images, the kernel and the initrd),
//! opened up front, before the VMM drops its privileges (`--jail`) and installs its seccomp
//! filters. Once [`HostResources::seal`]ed, nothing is opened any more: whatever was not opened
//! up front is an error that names it, never a system call the filter would stop.
//!
//! A sandboxed migration destination therefore opens only what its own command line names:
//! its TAPs (`--net`), its shared disks and the new files of its copied disks (`--disk`). The
//! source's names for them are never used, so a source cannot make it open anything else.

use std::fs::File;
use std::path::Path;

use block::{Disk, DiskError};
use kvm_ioctls::Kvm;
use net::tap::{Tap, TapError};

use crate::builder::{KvmOpenError, open_kvm};
use crate::config::VmConfig;
use crate::disk_config::DiskConfig;
use crate::loader::{self, LoaderError};
use crate::net_config::NetConfig;
use crate::vstate::supported_cpuid::SupportedCpuid;

/// Errors opening what a VM needs.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Kvm(#[from] KvmOpenError),
    #[error("{0}")]
    Tap(#[from] TapError),
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("{0}")]
    Loader(#[from] LoaderError),
    #[error("{what} was not opened before the VMM was sandboxed (seccomp or --jail): {hint}")]
    NotOpened { what: String, hint: &'static str },
    #[error("{0} (a restore loads the guest's memory through one: check /dev/userfaultfd)")]
    Uffd(#[from] crate::uffd::UffdError),
    #[error("{0}")]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("{0}")]
    Memory(#[from] crate::vstate::memory::MemoryError),
    #[error("{0}")]
    Cpu(String),
}

/// A disk of a migration destination, as its `--disk` says.
pub enum LocalDisk {
    /// `,shared`: the same image the source uses, opened here.
    Shared(Disk),
    /// A copied disk: the new, empty file it arrives into.
    New { file: File, config: DiskConfig },
}

/// Host resources opened up front; see the module documentation.
#[derive(Default)]
pub struct HostResources {
    kvm: Option<Kvm>,
    /// KVM's supported CPUID, asked in the background once the VMM is set up
    /// ([`HostResources::ask_supported_cpuid`]).
    supported_cpuid: SupportedCpuid,
    taps: Vec<Tap>,
    /// The VM's disks for its devices, by index.
    disks: Vec<Option<Disk>>,
    /// A destination's `--disk`s, by index.
    incoming_disks: Vec<Option<LocalDisk>>,
    kernel: Option<File>,
    initrd: Option<File>,
    /// A destination's userfaultfd, for a migration that switches to post-copy; a waiting
    /// VMM's, for its restore.
    uffd: Option<crate::uffd::NewUffd>,
    /// A waiting VMM's VM, created ahead of its guest.
    vm_shell: Option<crate::vstate::vm::VmShell>,
    /// What this host's CPU can give a guest, asked ahead by a waiting VMM (a probe VM costs
    /// about a millisecond, better spent before the snapshot is named).
    host_cpuid: Option<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    sealed: bool,
}

const NET_HINT: &str = "give this VMM --net tap=NAME for each NIC";
const DISK_HINT: &str = "give this VMM --disk path=FILE[,shared] for each disk";

impl HostResources {
    /// Nothing opened yet; everything is opened when it is first needed (an unsandboxed VMM).
    pub fn on_demand() -> Self {
        Self::default()
    }

    /// Opens what booting `config` needs.
    pub fn open_for_boot(config: &VmConfig) -> Result<Self, HostError> {
        // The files the user named first: bad input gets the error about the input.
        let kernel = loader::open_kernel(&config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => Some(loader::open_initrd(p)?),
            None => None,
        };
        let disks = config
            .disks
            .iter()
            .map(|d| Disk::open(&d.path, d.read_only, d.shared).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        let taps = config.nets.iter().map(|n| Tap::open(&n.tap)).collect::<Result<Vec<_>, _>>()?;
        let kvm = Some(open_kvm()?);
        Ok(HostResources {
            vm_shell: None,
            supported_cpuid: SupportedCpuid::default(),
            kvm,
            taps,
            disks,
            incoming_disks: Vec::new(),
            kernel: Some(kernel),
            initrd,
            uffd: None,
            host_cpuid: None,
            sealed: false,
        })
    }

    /// Opens what restoring a snapshot of `config` needs (its TAPs and disks as this host names
    /// them; no kernel: the guest's memory has it).
    pub fn open_for_restore(config: &VmConfig) -> Result<Self, HostError> {
        let disks = config
            .disks
            .iter()
            .map(|d| Disk::open(&d.path, d.read_only, d.shared).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        let taps = config.nets.iter().map(|n| Tap::open(&n.tap)).collect::<Result<Vec<_>, _>>()?;
        let mut res = HostResources::default();
        (res.disks, res.taps, res.kvm) = (disks, taps, Some(open_kvm()?));
        Ok(res)
    }

    /// Opens what a migration destination with these `--net` and `--disk` options needs: a
    /// shared disk is opened, a copied disk's file is created (empty; it must not exist).
    pub fn open_for_incoming(nets: &[NetConfig], disks: &[DiskConfig]) -> Result<Self, HostError> {
        let mut res = HostResources::default();
        for d in disks {
            let local = if d.shared {
                LocalDisk::Shared(Disk::open(&d.path, d.read_only, true)?)
            } else {
                LocalDisk::New { file: Disk::create_empty(&d.path)?, config: d.clone() }
            };
            res.incoming_disks.push(Some(local));
        }
        res.taps = nets.iter().map(|n| Tap::open(&n.tap)).collect::<Result<Vec<_>, _>>()?;
        res.kvm = Some(open_kvm()?);
        // Only a migration that switches to post-copy needs it; one that does not must not fail
        // for want of it.
        match crate::uffd::NewUffd::create() {
            Ok(u) => res.uffd = Some(u),
            Err(e) => log::warn!("no userfaultfd, so no incoming post-copy: {e}"),
        }
        Ok(res)
    }

    /// Opens what a VMM waiting for a snapshot (`vmm run --await-restore`) needs before it
    /// knows which: /dev/kvm, its TAPs and a userfaultfd for the memory; and creates the VM,
    /// which does not depend on the guest but for its memory, and with `mem_mib` that memory
    /// too (a snapshot of another size gets its own). The snapshot's files and disks are opened
    /// by its snapshot thread when the snapshot is named.
    pub fn open_for_standby(nets: &[NetConfig], mem_mib: Option<u64>) -> Result<Self, HostError> {
        if let Some(mib) = mem_mib {
            crate::vstate::memory::check_mem_size(mib)?;
        }
        let mut res = HostResources::default();
        res.taps = nets.iter().map(|n| Tap::open(&n.tap)).collect::<Result<Vec<_>, _>>()?;
        let kvm = open_kvm()?;
        res.host_cpuid = Some(crate::migrate::cpu::host_cpuid(&kvm).map_err(HostError::Cpu)?);
        res.vm_shell = Some(crate::vstate::vm::VmShell::create(&kvm, mem_mib.map(|m| m << 20))?);
        res.kvm = Some(kvm);
        res.uffd = Some(crate::uffd::NewUffd::create()?);
        Ok(res)
    }

    /// Guest memory of `size` bytes mapped and registered with KVM ahead (a waiting VMM's with
    /// `--await-mem-mib`), if there is.
    pub fn ready_memory(&self, size: u64) -> Option<crate::vstate::memory::GuestMemoryMmap> {
        self.vm_shell.as_ref()?.memory_of_size(size)
    }

    /// What this host's CPU can give a guest, if asked ahead (a waiting VMM's).
    pub fn host_cpuid(&self) -> Option<&[kvm_bindings::kvm_cpuid_entry2]> {
        self.host_cpuid.as_deref()
    }

    /// The VM created ahead, if this is a waiting VMM's.
    pub fn take_vm_shell(&mut self) -> Option<crate::vstate::vm::VmShell> {
        self.vm_shell.take()
    }

    /// How many TAPs were opened up front and not yet taken.
    pub fn tap_count(&self) -> usize {
        self.taps.len()
    }

    /// From now on nothing is opened.
    pub fn seal(&mut self) {
        self.sealed = true;
    }

    pub fn sealed(&self) -> bool {
        self.sealed
    }

    fn not_opened(what: impl Into<String>, hint: &'static str) -> HostError {
        HostError::NotOpened { what: what.into(), hint }
    }

    /// /dev/kvm, kept here.
    pub fn kvm(&mut self) -> Result<&Kvm, HostError> {
        if self.kvm.is_none() {
            if self.sealed {
                return Err(Self::not_opened("/dev/kvm", "open it before sealing"));
            }
            self.kvm = Some(open_kvm()?);
        }
        self.kvm.as_ref().ok_or_else(|| Self::not_opened("/dev/kvm", "open it before sealing"))
    }

    /// /dev/kvm, for the machine to own.
    pub fn take_kvm(&mut self) -> Result<Kvm, HostError> {
        self.kvm()?;
        self.kvm.take().ok_or_else(|| Self::not_opened("/dev/kvm", "open it before sealing"))
    }

    /// Starts asking KVM for its supported CPUID in the background (see [`SupportedCpuid`]), if
    /// /dev/kvm is open. Not before `--jail`, which needs the process single-threaded, nor
    /// before seccomp is set up, since the thread installs a filter first.
    pub fn ask_supported_cpuid(&mut self) {
        if let Some(kvm) = &self.kvm {
            self.supported_cpuid = SupportedCpuid::ask(kvm);
        }
    }

    /// KVM's supported CPUID: the background question's answer, or asked of `kvm` now.
    pub fn take_supported_cpuid(&mut self, kvm: &Kvm) -> Result<kvm_bindings::CpuId, kvm_ioctls::Error> {
        std::mem::take(&mut self.supported_cpuid).answer(kvm)
    }

    /// The TAP named `name`.
    pub fn take_tap(&mut self, name: &str) -> Result<Tap, HostError> {
        if let Some(i) = self.taps.iter().position(|t| t.name() == name) {
            return Ok(self.taps.remove(i));
        }
        if self.sealed {
            return Err(Self::not_opened(format!("TAP '{name}'"), NET_HINT));
        }
        Ok(Tap::open(name)?)
    }

    /// The image of disk `index`, as `config` describes it.
    pub fn take_disk(&mut self, index: usize, config: &DiskConfig) -> Result<Disk, HostError> {
        if let Some(d) = self.disks.get_mut(index).and_then(Option::take) {
            return Ok(d);
        }
        if self.sealed {
            return Err(Self::not_opened(format!("disk {index} ({})", config.path.display()), DISK_HINT));
        }
        Ok(Disk::open(&config.path, config.read_only, config.shared)?)
    }

    /// Hands the image of disk `index` to the device built next (a destination's disks).
    pub fn put_disk(&mut self, index: usize, disk: Disk) {
        if self.disks.len() <= index {
            self.disks.resize_with(index + 1, || None);
        }
        self.disks[index] = Some(disk);
    }

    /// A destination's `--disk` number `index`, opened up front; `None` if it was not (then the
    /// caller opens it, unless sealed).
    pub fn take_incoming_disk(&mut self, index: usize) -> Option<LocalDisk> {
        self.incoming_disks.get_mut(index).and_then(Option::take)
    }

    /// The destination's disks have to be named on its command line.
    pub fn missing_disk(&self, index: usize) -> HostError {
        Self::not_opened(format!("disk {index}"), DISK_HINT)
    }

    /// The destination's TAPs have to be named on its command line.
    pub fn missing_nets(&self, count: usize) -> HostError {
        Self::not_opened(format!("the guest's {count} TAP(s)"), NET_HINT)
    }

    /// The userfaultfd for an incoming post-copy.
    pub fn take_uffd(&mut self) -> Result<crate::uffd::NewUffd, HostError> {
        match self.uffd.take() {
            Some(u) => Ok(u),
            None if self.sealed => Err(Self::not_opened("/dev/userfaultfd", "it is opened at set-up")),
            None => crate::uffd::NewUffd::create()
                .map_err(|e| Self::not_opened(format!("a userfaultfd ({e})"), "check /dev/userfaultfd")),
        }
    }

    /// The kernel image at `path`.
    pub fn take_kernel(&mut self, path: &Path) -> Result<File, HostError> {
        match self.kernel.take() {
            Some(f) => Ok(f),
            None if self.sealed => {
                Err(Self::not_opened(format!("kernel {}", path.display()), "open it before sealing"))
            }
            None => Ok(loader::open_kernel(path)?),
        }
    }

    /// The initrd at `path`.
    pub fn take_initrd(&mut self, path: &Path) -> Result<File, HostError> {
        match self.initrd.take() {
            Some(f) => Ok(f),
            None if self.sealed => {
                Err(Self::not_opened(format!("initrd {}", path.display()), "open it before sealing"))
            }
            None => Ok(loader::open_initrd(path)?),
        }
    }
}

/// Reads now, while the host's file system is there, what the VMM later wants to know about the
/// host: its RAM (the size check of an incoming guest) and whether swap is on (what a migration
/// must read).
pub fn read_host_facts() {
    crate::vstate::memory::host_mem_mib();
    crate::migrate::dirty::swap_active();
}

impl Drop for HostResources {
    /// A destination's copied disks whose migration never began: their new, empty files go.
    fn drop(&mut self) {
        for local in self.incoming_disks.iter_mut().filter_map(Option::take) {
            if let LocalDisk::New { file, config } = local {
                drop(file);
                if let Err(e) = std::fs::remove_file(&config.path) {
                    log::warn!("cannot remove the unused new disk {}: {e}", config.path.display());
                }
            }
        }
    }
}
