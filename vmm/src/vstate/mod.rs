// SPDX-License-Identifier: Apache-2.0
//! KVM state: guest memory, the VM and its vCPUs.

pub mod memory;
pub mod supported_cpuid;
pub mod vcpu;
pub mod vm;
