// SPDX-License-Identifier: Apache-2.0
//! x86_64 specifics: the guest address map and the boot state of vCPUs and memory.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
