// SPDX-License-Identifier: Apache-2.0
//! Builds a VM ready to boot from a [`VmConfig`]: KVM, memory, kernel, boot structures, devices
//! and vCPUs, in that order (the in-kernel irqchip must exist before vCPUs, the memory before the
//! kernel is loaded into it).

use std::io::Write;
use std::sync::{Arc, Mutex};

use block::{Block, Disk};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::Kvm;
use net::Net;
use net::tap::Tap;
use virtio::MmioTransport;
use virtio::{NOTIFY_OFFSET, VirtioDevice};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot_params::{BootInfo, BootParamsError, write_boot_params};
use crate::arch::layout::{CMDLINE_START, IRQ_BASE, IRQ_MAX, SERIAL_IRQ, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::arch::mptable::{MptableError, setup_mptable};
use crate::config::VmConfig;
use crate::devices::EventFdTrigger;
use crate::devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_SIZE};
use crate::devices::pvpanic::{PVPANIC_PORT, PvPanic};
use crate::devices::serial::{SERIAL_PORT_BASE, SERIAL_PORT_SIZE, SerialPort};
use crate::disk_config::DiskConfig;
use crate::host::HostResources;
use crate::loader::{self, LoaderError};
use crate::net_config::NetConfig;
use crate::vstate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::vstate::vcpu::{ExitChannel, Vcpu, VcpuError, VcpuShared};
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
    #[error("failed to set up NIC on TAP '{tap}': {source}")]
    Net { tap: String, source: net::NetError },
    #[error("too many virtio devices (NICs and disks): at most {0}")]
    TooManyDevices(usize),
    #[error("failed to set up disk {path}: {source}")]
    Block { path: String, source: block::BlockError },
    #[error("{0}")]
    Host(#[from] crate::host::HostError),
}

/// Why /dev/kvm could not be used, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum KvmOpenError {
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualization, or load kvm_intel/kvm_amd)")]
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

/// The parts of a VM that live as long as it does and that the VMM thread, the API and a
/// migration share.
pub struct Machine {
    pub config: VmConfig,
    pub kvm: Kvm,
    pub vm: Vm,
    pub io: Arc<IoManager>,
    pub serial: Arc<Mutex<SerialPort>>,
    pub nets: Vec<NetDevice>,
    pub disks: Vec<BlockDevice>,
    pub vcpu_shared: Arc<VcpuShared>,
    /// The i8042 reset and pvpanic signals (copies of [`BuiltVm`]'s), with what each means: a
    /// migration looks at them, besides [`VcpuShared::stopped`], before handing the guest over.
    pub end_signals: Vec<(EventFd, &'static str)>,
    /// KVM's supported CPUID on this host, asked once when the machine is built.
    pub supported_cpuid: CpuId,
    /// The CPUID the guest runs with (vCPU 0's), which a migration destination must support.
    pub cpuid: Mutex<Vec<kvm_cpuid_entry2>>,
    /// Guest memory still being filled on demand (a restored snapshot, an incoming post-copy),
    /// with the handler that fills it.
    pub lazy_memory: Mutex<Option<Arc<crate::uffd::Handler>>>,
}

impl Machine {
    /// Why the guest is done, if it is: a vCPU stopped for good (a triple fault, an internal
    /// error), or the guest reset, powered off or panicked. The VMM thread marks the last
    /// three in [`VcpuShared::stopped`] before it consumes their signal, so one of the two
    /// looks below sees them however the threads interleave.
    pub fn guest_stopped(&self) -> Option<String> {
        if let Some(why) = self.vcpu_shared.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            return Some(why);
        }
        self.end_signals.iter().find(|(evt, _)| readable(evt)).map(|(_, why)| why.to_string())
    }

    /// Waits until guest memory is all there (see [`Machine::lazy_memory`]): whatever reads all
    /// of it (a migration, a snapshot) must not take a page that is still missing for a page
    /// that was never touched. Fails if the memory could not be filled.
    pub fn memory_complete(&self) -> Result<(), String> {
        // Not under the lock: the API reads the handler's figures meanwhile.
        let Some(handler) = self.lazy_memory.lock().expect("Poisoned lock").clone() else { return Ok(()) };
        loop {
            match handler.wait(std::time::Duration::from_secs(1)) {
                Some(crate::uffd::HandlerEnd::Done) => return Ok(()),
                Some(crate::uffd::HandlerEnd::Stopped) => return Err("guest memory was never filled in".into()),
                Some(crate::uffd::HandlerEnd::Failed(e)) => return Err(e),
                None => log::debug!("waiting for guest memory to be filled in"),
            }
        }
    }
}

/// What the i8042 reset signal means, for a migration that finds it (see [`Machine::end_signals`]).
pub const GUEST_RESET: &str = "the guest reset or powered off (i8042)";
/// What the pvpanic signal means.
pub const GUEST_PANICKED: &str = "the guest panicked";

/// A built VM whose vCPUs do not run yet.
pub struct BuiltVm {
    pub machine: Machine,
    /// Fires when the guest resets through the i8042.
    pub reset_evt: EventFd,
    /// Fires when the guest reports a panic.
    pub panic_evt: EventFd,
    pub vcpus: Vec<Vcpu>,
    /// Where the vCPUs (and whatever else can end the VM) report its end.
    pub exits: ExitChannel,
}

fn check_config(config: &VmConfig) -> Result<(), BuildError> {
    let max = crate::arch::mptable::MAX_VCPUS;
    if config.vcpus == 0 || config.vcpus > max {
        return Err(BuildError::VcpuCount { got: config.vcpus, max });
    }
    memory::check_mem_size(config.mem_mib)?;
    Ok(())
}

/// What a VM is built on before KVM knows of it: its guest memory, and the channel its end is
/// reported on. A restore starts its memory loader on these before it builds the VM, so that
/// the pages KVM writes first are in place by the time the machine is restored.
pub struct Foundation {
    pub memory: GuestMemoryMmap,
    pub exits: ExitChannel,
}

impl Foundation {
    /// Checks `config`'s shape and maps its guest memory, or takes the memory `res` prepared
    /// for a guest of its size (a waiting VMM's, see [`HostResources::ready_memory`]).
    pub fn new(config: &VmConfig, res: &HostResources) -> Result<Self, BuildError> {
        check_config(config)?;
        let memory = match res.ready_memory(config.mem_mib << 20) {
            Some(memory) => memory,
            None => memory::create_guest_memory(config.mem_mib << 20)?,
        };
        Ok(Foundation { memory, exits: ExitChannel::new().map_err(BuildError::EventFd)? })
    }
}

/// KVM, devices and (unconfigured) vCPUs on `foundation`: what booting, receiving a migration
/// and restoring a snapshot share.
fn build_machine(
    foundation: Foundation,
    config: &VmConfig,
    res: &mut HostResources,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    let Foundation { memory: mem, exits } = foundation;
    let kvm = res.take_kvm()?;
    let vm = match res.take_vm_shell() {
        Some(shell) => Vm::on_shell(shell, mem)?,
        None => Vm::new(&kvm, mem)?,
    };
    // Asked once for every vCPU and check (see `SupportedCpuid`).
    let supported_cpuid = res.take_supported_cpuid(&kvm).map_err(VcpuError::SupportedCpuid)?;
    let LegacyDevices { mut io, serial, reset_evt, panic_evt } = attach_legacy_devices(&vm, console)?;
    let mut nets = Vec::with_capacity(config.nets.len());
    for (i, nc) in config.nets.iter().enumerate() {
        let tap = res.take_tap(&nc.tap)?;
        nets.push(attach_net_device(&vm, &mut io, i, nc, tap)?);
    }
    let mut disks = Vec::with_capacity(config.disks.len());
    for (i, dc) in config.disks.iter().enumerate() {
        let disk = res.take_disk(i, dc)?;
        disks.push(attach_block_device(&vm, &mut io, nets.len() + i, i, dc, disk)?);
    }
    // `ip=` names the first NIC's address: seed it for announcing the guest after a migration
    // (the device also learns addresses from the guest's traffic).
    if let (Some(ip), Some(first)) = (guest_common::Params::parse(&config.cmdline).ipv4, nets.first()) {
        first.net.lock().expect("Poisoned lock").add_address(ip.address);
    }
    let io = Arc::new(io);
    let vcpu_shared = Arc::new(VcpuShared::default());
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        vcpus.push(Vcpu::new(&kvm, &vm, index, io.clone(), vcpu_shared.clone())?);
    }
    let end_signals = vec![
        (reset_evt.try_clone().map_err(BuildError::EventFd)?, GUEST_RESET),
        (panic_evt.try_clone().map_err(BuildError::EventFd)?, GUEST_PANICKED),
    ];
    let machine = Machine {
        config: config.clone(),
        kvm,
        vm,
        io,
        serial,
        nets,
        disks,
        vcpu_shared,
        end_signals,
        supported_cpuid,
        cpuid: Mutex::new(Vec::new()),
        lazy_memory: Mutex::new(None),
    };
    Ok(BuiltVm { machine, reset_evt, panic_evt, vcpus, exits })
}

/// Builds a VM that boots `config.kernel`, with the serial console writing to `console`, from
/// the host resources in `res` (see [`HostResources::open_for_boot`]).
pub fn build_vm_for_boot(
    config: &VmConfig,
    res: &mut HostResources,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    let foundation = Foundation::new(config, res)?;
    // Check the files before touching KVM, so bad input gets the error about the input.
    let mut kernel_file = res.take_kernel(&config.kernel)?;
    let mut initrd_file = match &config.initrd {
        Some(path) => Some(res.take_initrd(path)?),
        None => None,
    };
    let built = build_machine(foundation, config, res, console)?;
    let m = &built.machine;
    let mem = m.vm.memory();
    let kernel = loader::load_kernel(mem, &mut kernel_file, &config.kernel)?;
    let initrd = match (&config.initrd, initrd_file.as_mut()) {
        (Some(path), Some(file)) => Some(loader::load_initrd(mem, file, path, &kernel)?),
        _ => None,
    };
    let device_args: Vec<String> = m
        .nets
        .iter()
        .map(|d| virtio_mmio_arg(d.mmio_base, d.irq))
        .chain(m.disks.iter().map(|d| virtio_mmio_arg(d.mmio_base, d.irq)))
        .collect();
    let mut parts: Vec<&str> = vec![&config.cmdline];
    parts.extend(device_args.iter().map(String::as_str));
    let cmdline_size = loader::load_cmdline(mem, &parts)?;
    write_boot_params(
        mem,
        &BootInfo {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size,
            initrd,
            setup_header: kernel.setup_header,
        },
    )?;
    setup_mptable(mem, config.vcpus)?;
    for vcpu in &built.vcpus {
        vcpu.configure_for_boot(&m.supported_cpuid, kernel.entry, config.vcpus, config.cpu_template)?;
    }
    if let Some(v0) = built.vcpus.first() {
        let cpuid = v0.fd().get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(|source| VcpuError::Get {
            index: 0,
            what: "CPUID",
            source,
        })?;
        *m.cpuid.lock().expect("Poisoned lock") = cpuid.as_slice().to_vec();
    }
    Ok(built)
}

/// Builds an empty VM of `config`'s shape for an incoming migration: memory, devices and vCPUs
/// exist; their contents come from the source.
pub fn build_vm_for_incoming(
    config: &VmConfig,
    res: &mut HostResources,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    build_machine(Foundation::new(config, res)?, config, res, console)
}

/// [`build_vm_for_incoming`] on a `foundation` made already (see [`Foundation`]).
pub fn build_vm_on(
    foundation: Foundation,
    config: &VmConfig,
    res: &mut HostResources,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    build_machine(foundation, config, res, console)
}

/// A virtio-net device and its virtio-mmio transport.
pub struct NetDevice {
    pub config: NetConfig,
    pub net: Arc<Mutex<Net>>,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub mmio_base: u64,
    pub irq: u32,
}

/// How the guest kernel learns about a virtio-mmio device (Linux's
/// VIRTIO_MMIO_CMDLINE_DEVICES).
pub fn virtio_mmio_arg(mmio_base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{mmio_base:#x}:{irq}")
}

/// A virtio-blk device, its virtio-mmio transport and its I/O thread (stopped when dropped).
pub struct BlockDevice {
    pub config: DiskConfig,
    pub block: Arc<Mutex<Block>>,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub mmio_base: u64,
    pub irq: u32,
    pub worker: block::Worker,
    /// The image and the device's counters, for the API and the final flush without the
    /// device lock (which the I/O thread holds while it works).
    pub disk: Arc<Disk>,
    pub metrics: Arc<block::metrics::BlockMetrics>,
}

/// The MMIO window and interrupt line of the `slot`-th virtio device (NICs first, then disks).
fn virtio_slot(slot: usize) -> Result<(u64, u32), BuildError> {
    let max = (IRQ_MAX - IRQ_BASE + 1) as usize;
    if slot >= max {
        return Err(BuildError::TooManyDevices(max));
    }
    Ok((VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_SIZE, IRQ_BASE + slot as u32))
}

/// Wires a virtio device into the VM: its irqfd on `irq`, one ioeventfd per queue (matched on
/// the queue index written to QueueNotify), and its transport on the MMIO bus.
fn wire_virtio_device(
    vm: &Vm,
    io: &mut IoManager,
    what: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mmio_base: u64,
) -> Result<Arc<Mutex<MmioTransport>>, BuildError> {
    for (q, evt) in device.lock().expect("Poisoned lock").queue_events().iter().enumerate() {
        vm.fd()
            .register_ioevent(evt, &IoEventAddress::Mmio(mmio_base + NOTIFY_OFFSET), q as u32)
            .map_err(|e| BuildError::Device(what, format!("ioeventfd: {e}")))?;
    }
    let transport = Arc::new(Mutex::new(MmioTransport::new(vm.memory().clone(), device)));
    let range = MmioRange::new(MmioAddress(mmio_base), VIRTIO_MMIO_SIZE)
        .map_err(|e| BuildError::Device(what, format!("{e:?}")))?;
    io.register_mmio(range, transport.clone()).map_err(|e| BuildError::Device(what, format!("{e:?}")))?;
    Ok(transport)
}

fn irqfd_for(vm: &Vm, what: &'static str, irq: u32) -> Result<EventFd, BuildError> {
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.fd().register_irqfd(&irqfd, irq).map_err(|e| BuildError::Device(what, format!("irqfd: {e}")))?;
    Ok(irqfd)
}

/// The NIC in virtio slot `slot`.
fn attach_net_device(
    vm: &Vm,
    io: &mut IoManager,
    slot: usize,
    config: &NetConfig,
    tap: Tap,
) -> Result<NetDevice, BuildError> {
    let (mmio_base, irq) = virtio_slot(slot)?;
    let net_err = |source| BuildError::Net { tap: config.tap.clone(), source };
    let net = Net::with_tap(tap, config.mac.0, irqfd_for(vm, "virtio-net", irq)?).map_err(net_err)?;
    let net = Arc::new(Mutex::new(net));
    let transport = wire_virtio_device(vm, io, "virtio-net", net.clone(), mmio_base)?;
    Ok(NetDevice { config: config.clone(), net, transport, mmio_base, irq })
}

/// The `index`-th disk, in virtio slot `slot`, with its I/O thread.
fn attach_block_device(
    vm: &Vm,
    io: &mut IoManager,
    slot: usize,
    index: usize,
    config: &DiskConfig,
    disk: Disk,
) -> Result<BlockDevice, BuildError> {
    let (mmio_base, irq) = virtio_slot(slot)?;
    let path = config.path.display().to_string();
    let block_err = |source| BuildError::Block { path: path.clone(), source };
    let block = Block::new(disk, &format!("vmm-disk-{index}"), irqfd_for(vm, "virtio-blk", irq)?).map_err(block_err)?;
    let (disk, metrics) = (block.disk().clone(), block.metrics());
    let block = Arc::new(Mutex::new(block));
    let transport = wire_virtio_device(vm, io, "virtio-blk", block.clone(), mmio_base)?;
    let worker = block::Worker::spawn(block.clone(), format!("disk{index}"), || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::BlockIo)
    })
    .map_err(block_err)?;
    Ok(BlockDevice { config: config.clone(), block, transport, mmio_base, irq, worker, disk, metrics })
}

struct LegacyDevices {
    io: IoManager,
    serial: Arc<Mutex<SerialPort>>,
    reset_evt: EventFd,
    panic_evt: EventFd,
}

/// COM1 on IRQ 4, the i8042 reset line and pvpanic.
fn attach_legacy_devices(vm: &Vm, console: Box<dyn Write + Send>) -> Result<LegacyDevices, BuildError> {
    let mut io = IoManager::new();
    let serial_irq = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_irq.0, SERIAL_IRQ)
        .map_err(|e| BuildError::Device("serial", format!("irqfd: {e}")))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, console)));
    let range = PioRange::new(PioAddress(SERIAL_PORT_BASE), SERIAL_PORT_SIZE)
        .map_err(|e| BuildError::Device("serial", format!("{e:?}")))?;
    io.register_pio(range, serial.clone()).map_err(|e| BuildError::Device("serial", format!("{e:?}")))?;

    let reset = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    let reset_evt = reset.0.try_clone().map_err(BuildError::EventFd)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(reset)));
    let range = PioRange::new(PioAddress(I8042_PORT_BASE), I8042_PORT_SIZE)
        .map_err(|e| BuildError::Device("i8042", format!("{e:?}")))?;
    io.register_pio(range, i8042).map_err(|e| BuildError::Device("i8042", format!("{e:?}")))?;

    let panic = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    let panic_evt = panic.0.try_clone().map_err(BuildError::EventFd)?;
    let pvpanic = Arc::new(Mutex::new(PvPanic::new(panic)));
    io.register_pio(PioRange::unit(PioAddress(PVPANIC_PORT)), pvpanic)
        .map_err(|e| BuildError::Device("pvpanic", format!("{e:?}")))?;
    Ok(LegacyDevices { io, serial, reset_evt, panic_evt })
}

/// Whether `evt` has been written and not read yet (without reading it).
fn readable(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(evt), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}
