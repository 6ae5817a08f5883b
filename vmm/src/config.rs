// SPDX-License-Identifier: Apache-2.0
//! What a VM is made of, as the user asked for it. Plain serde data: the API reports it and
//! migration sends it to the destination.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::cpuid::CpuTemplate;
use crate::disk_config::DiskConfig;
use crate::net_config::NetConfig;

/// The command line when the user gives none: console on COM1, reboot through the i8042 (which
/// ends the VMM), reboot at once on panic, no PCI probing.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Guest RAM when the user gives no size.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// A VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line before the VMM adds its device declarations.
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// virtio-net devices, in the order the guest sees them.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// virtio-blk devices, in the order the guest sees them (after the NICs).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
}
