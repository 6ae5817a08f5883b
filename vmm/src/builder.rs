// SPDX-License-Identifier: Apache-2.0
//! Builds a VM ready to boot from a [`VmConfig`]: KVM, memory, kernel, boot structures, devices
//! and vCPUs, in that order (the in-kernel irqchip must exist before vCPUs, the memory before the
//! kernel is loaded into it).

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot_params::{BootInfo, BootParamsError, write_boot_params};
use crate::arch::layout::{CMDLINE_START, SERIAL_IRQ};
use crate::arch::mptable::{MptableError, setup_mptable};
use crate::config::VmConfig;
use crate::devices::EventFdTrigger;
use crate::devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_SIZE};
use crate::devices::pvpanic::{PVPANIC_PORT, PvPanic};
use crate::devices::serial::{SERIAL_PORT_BASE, SERIAL_PORT_SIZE, SerialPort};
use crate::loader::{self, LoaderError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use vm_memory::GuestAddress;

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Kvm(#[from] KvmOpenError),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Loader(#[from] LoaderError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("failed to write the MP table: {0}")]
    Mptable(#[from] MptableError),
    #[error("failed to write the boot parameters: {0}")]
    BootParams(#[from] BootParamsError),
    #[error("vcpus must be between 1 and {max}, got {got}")]
    VcpuCount { got: u8, max: u8 },
    #[error("failed to create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("failed to set up device {0}: {1}")]
    Device(&'static str, String),
}

/// Why /dev/kvm could not be used, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum KvmOpenError {
    #[error(
        "/dev/kvm does not exist: this host has no KVM (enable virtualization, or load kvm_intel/kvm_amd)"
    )]
    Missing,
    #[error("no permission to open /dev/kvm: run as root or add your user to the 'kvm' group")]
    Permission,
    #[error("failed to open /dev/kvm: {0}")]
    Other(kvm_ioctls::Error),
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, KvmOpenError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmOpenError::Missing,
        libc::EACCES | libc::EPERM => KvmOpenError::Permission,
        _ => KvmOpenError::Other(e),
    })
}

/// Everything a built VM is made of, before its vCPUs run.
pub struct BuiltVm {
    pub kvm: Kvm,
    pub vm: Vm,
    pub io: Arc<IoManager>,
    pub serial: Arc<Mutex<SerialPort>>,
    /// Fires when the guest resets through the i8042.
    pub reset_evt: EventFd,
    /// Fires when the guest reports a panic.
    pub panic_evt: EventFd,
    pub vcpus: Vec<Vcpu>,
}

/// Builds a VM that boots `config.kernel`, with the serial console writing to `console`.
pub fn build_vm_for_boot(
    config: &VmConfig,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    let max = crate::arch::mptable::MAX_VCPUS;
    if config.vcpus == 0 || config.vcpus > max {
        return Err(BuildError::VcpuCount {
            got: config.vcpus,
            max,
        });
    }
    memory::check_mem_size(config.mem_mib)?;
    // Check the files before touching KVM, so bad input gets the error about the input.
    let mut kernel_file = loader::open_kernel(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        std::fs::File::open(initrd).map_err(|source| LoaderError::Open {
            kind: "initrd",
            path: initrd.clone(),
            source,
        })?;
    }

    let kvm = open_kvm()?;
    let mem = memory::create_guest_memory(config.mem_mib << 20)?;
    let vm = Vm::new(&kvm, mem.clone())?;

    let kernel = loader::load_kernel(&mem, &mut kernel_file, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(&mem, path, &kernel)?),
        None => None,
    };
    let cmdline_size = loader::load_cmdline(&mem, &[&config.cmdline])?;
    write_boot_params(
        &mem,
        &BootInfo {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size,
            initrd,
            setup_header: kernel.setup_header,
        },
    )?;
    setup_mptable(&mem, config.vcpus)?;

    let LegacyDevices {
        io,
        serial,
        reset_evt,
        panic_evt,
    } = attach_legacy_devices(&vm, console)?;
    let io = Arc::new(io);

    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, index, io.clone())?;
        vcpu.configure_for_boot(&kvm, kernel.entry, config.vcpus, config.cpu_template)?;
        vcpus.push(vcpu);
    }
    Ok(BuiltVm {
        kvm,
        vm,
        io,
        serial,
        reset_evt,
        panic_evt,
        vcpus,
    })
}

struct LegacyDevices {
    io: IoManager,
    serial: Arc<Mutex<SerialPort>>,
    reset_evt: EventFd,
    panic_evt: EventFd,
}

/// COM1 on IRQ 4, the i8042 reset line and pvpanic.
fn attach_legacy_devices(
    vm: &Vm,
    console: Box<dyn Write + Send>,
) -> Result<LegacyDevices, BuildError> {
    let mut io = IoManager::new();
    let serial_irq = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_irq.0, SERIAL_IRQ)
        .map_err(|e| BuildError::Device("serial", format!("irqfd: {e}")))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, console)));
    let range = PioRange::new(PioAddress(SERIAL_PORT_BASE), SERIAL_PORT_SIZE)
        .map_err(|e| BuildError::Device("serial", format!("{e:?}")))?;
    io.register_pio(range, serial.clone())
        .map_err(|e| BuildError::Device("serial", format!("{e:?}")))?;

    let reset = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    let reset_evt = reset.0.try_clone().map_err(BuildError::EventFd)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(reset)));
    let range = PioRange::new(PioAddress(I8042_PORT_BASE), I8042_PORT_SIZE)
        .map_err(|e| BuildError::Device("i8042", format!("{e:?}")))?;
    io.register_pio(range, i8042)
        .map_err(|e| BuildError::Device("i8042", format!("{e:?}")))?;

    let panic = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    let panic_evt = panic.0.try_clone().map_err(BuildError::EventFd)?;
    let pvpanic = Arc::new(Mutex::new(PvPanic::new(panic)));
    io.register_pio(PioRange::unit(PioAddress(PVPANIC_PORT)), pvpanic)
        .map_err(|e| BuildError::Device("pvpanic", format!("{e:?}")))?;
    Ok(LegacyDevices {
        io,
        serial,
        reset_evt,
        panic_evt,
    })
}
