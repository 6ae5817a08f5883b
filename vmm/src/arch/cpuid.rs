// SPDX-License-Identifier: Apache-2.0
//! The CPUID a vCPU sees: KVM's supported set, normalised for this vCPU's place in the VM
//! (APIC ids, topology, hypervisor bit, no PMU) and filtered by a CPU template.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
use serde::{Deserialize, Serialize};

/// Which CPU features the guest is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// Everything KVM supports on this host: the right choice on hardware KVM.
    #[default]
    Host,
    /// The x86-64 baseline (SSE2, no XSAVE/AVX, no POPCNT/CX16/MOVBE/BMI, no SMEP/SMAP/FSGSBASE,
    /// no RDTSCP/RDRAND): only what KVM's instruction emulator can run when a guest kernel's code
    /// is emulated, as on paravirtual nested KVM (kvm_pvm). Guests see fewer features, but a Linux
    /// kernel's alternatives then pick code paths that the emulator understands.
    Baseline,
}

// CPUID.1:ECX
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_X2APIC: u32 = 1 << 21;
// CPUID.1:EDX
const EDX_HTT: u32 = 1 << 28;
// CPUID.0x80000001:ECX / EDX
const EXT_ECX_LAHF: u32 = 1 << 0;
const EXT_EDX_SYSCALL: u32 = 1 << 11;
const EXT_EDX_NX: u32 = 1 << 20;
const EXT_EDX_PDPE1GB: u32 = 1 << 26;
const EXT_EDX_LM: u32 = 1 << 29;

/// Bits of the x86-64 baseline in CPUID.1:EDX (fpu .. sse2, htt handled separately).
const BASELINE_1_EDX: u32 = 0x07ff_fbff & !EDX_HTT;

fn topology_shift(n: u8) -> u32 {
    // Number of APIC-id bits needed to number `n` cores.
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8, template: CpuTemplate) {
    let apic_id = u32::from(index);
    let shift = topology_shift(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        normalize_entry(e, apic_id, count, shift);
        if template == CpuTemplate::Baseline {
            baseline_entry(e);
        }
    }
}

fn normalize_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u8, shift: u32) {
    match e.function {
        0x1 => {
            // EBX: initial APIC id, logical processor count, CLFLUSH size (8 x 8 bytes).
            e.ebx = (apic_id << 24) | (u32::from(count) << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: cores per package - 1 in EAX[31:26]; one
            // logical processor shares each cache level below L3.
            e.eax &= 0x3ff;
            e.eax |= (u32::from(count).saturating_sub(1) & 0x3f) << 26;
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { u32::from(count) } else { 1 };
            e.eax |= (sharing.saturating_sub(1) & 0xfff) << 14;
        }
        0x6 => {
            // No thermal/power management for guests.
            e.eax = 0;
            e.ecx = 0;
        }
        0xa => {
            // No virtual PMU: the guest must not program performance counters.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: every vCPU is a core of one package, no SMT.
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = shift;
                    e.ebx = u32::from(count);
                    e.ecx = (2 << 8) | 1;
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i;
                }
            }
        }
        0x8000_0008 => {
            // AMD: number of cores - 1 and the APIC id size.
            e.ecx = (shift << 12) | u32::from(count).saturating_sub(1);
        }
        0x8000_001e => {
            // AMD extended APIC id, core id, node id.
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

fn baseline_entry(e: &mut kvm_cpuid_entry2) {
    match e.function {
        0x1 => {
            e.ecx &= ECX_HYPERVISOR | ECX_TSC_DEADLINE | ECX_X2APIC;
            e.edx &= BASELINE_1_EDX | EDX_HTT;
        }
        // Structured extended features (FSGSBASE, SMEP, SMAP, BMI, AVX2, ERMS, ...), XSAVE
        // state, processor trace, SGX: all off.
        0x7 | 0xd | 0x12 | 0x14 => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0x8000_0001 => {
            e.ecx &= EXT_ECX_LAHF;
            e.edx &= EXT_EDX_SYSCALL | EXT_EDX_NX | EXT_EDX_PDPE1GB | EXT_EDX_LM;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0, 0x00a2_0f12, 0x0004_0800, 0xfef8_3203 | (1 << 23) | (1 << 26), 0x178b_fbff),
            entry(0x7, 0, 0, 0x219c_97a9, 0x0040_069c, 0x10),
            entry(0xa, 0, 0x0760_3002, 0, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xd, 0, 0x7, 0x340, 0x340, 0),
            entry(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let mut c = sample();
        normalize(&mut c, 3, 4, CpuTemplate::Host);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
        assert_eq!(find(&c, 0xa, 0).eax, 0, "no PMU");
    }

    #[test]
    fn host_template_keeps_features() {
        let mut c = sample();
        normalize(&mut c, 0, 1, CpuTemplate::Host);
        let l1 = find(&c, 1, 0);
        assert_ne!(l1.ecx & (1 << 23), 0, "POPCNT stays");
        assert_ne!(l1.ecx & (1 << 26), 0, "XSAVE stays");
        assert_eq!(l1.edx & EDX_HTT, 0, "one vCPU, no HTT");
        assert_eq!(find(&c, 7, 0).ebx, 0x219c_97a9);
    }

    #[test]
    fn baseline_template_hides_what_the_emulator_cannot_run() {
        let mut c = sample();
        normalize(&mut c, 0, 2, CpuTemplate::Baseline);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ecx & (1 << 23), 0, "POPCNT hidden");
        assert_eq!(l1.ecx & (1 << 26), 0, "XSAVE hidden");
        assert_eq!(l1.ecx & (1 << 13), 0, "CMPXCHG16B hidden");
        assert_ne!(l1.ecx & ECX_X2APIC, 0);
        assert_ne!(l1.edx & (1 << 26), 0, "SSE2 stays");
        assert_eq!(find(&c, 7, 0).ebx, 0);
        assert_eq!(find(&c, 0xd, 0).eax, 0);
        let ext = find(&c, 0x8000_0001, 0);
        assert_eq!(ext.edx & (1 << 27), 0, "RDTSCP hidden");
        assert_ne!(ext.edx & EXT_EDX_LM, 0, "long mode stays");
    }
}
