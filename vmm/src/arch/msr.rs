// SPDX-License-Identifier: Apache-2.0
//! Model-specific registers at boot.

use kvm_bindings::{Msrs, kvm_msr_entry};

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs a vCPU starts with.
pub fn boot_msrs() -> Msrs {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() });
    // Eleven fixed entries fit the FAM wrapper's limit, so this cannot fail.
    Msrs::from_entries(&entries).expect("boot MSR list is within KVM_MAX_MSR_ENTRIES")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_mtrrs_and_fast_strings() {
        let msrs = boot_msrs();
        let get = |i| msrs.as_slice().iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(MTRR_ENABLE_WB));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(msrs.as_slice().len(), 11);
    }
}
