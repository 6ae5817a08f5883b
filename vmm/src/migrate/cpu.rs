// SPDX-License-Identifier: Apache-2.0
//! Whether this host's CPU can run a guest that ran elsewhere (an incoming migration, a
//! snapshot): every feature bit in the guest's CPUID must be one this host's KVM can give, or
//! the guest would crash on an instruction this host lacks.
//!
//! The decision ([`missing_features`]) is a pure function of the two CPUID lists; what this
//! host can give ([`host_cpuid`], or [`check_cpuid`] on a vCPU of the VM being built) asks KVM.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Kvm, VcpuFd};

use super::MigrateError;

/// (leaf, subleaf, registers holding feature bits: 0 = eax .. 3 = edx)
const FEATURE_REGS: [(u32, u32, &[usize]); 3] = [(0x1, 0, &[2, 3]), (0x7, 0, &[1, 2, 3]), (0x8000_0001, 0, &[2, 3])];

/// Feature bits the VMM sets in CPUID itself, so they need no support check.
fn vmm_owned_bits(function: u32, reg: usize) -> u32 {
    match (function, reg) {
        // ECX: hypervisor, TSC deadline (in-kernel LAPIC), OSXSAVE (follows CR4).
        (0x1, 2) => (1 << 31) | (1 << 24) | (1 << 27),
        // EDX: HTT (set with more than one vCPU).
        (0x1, 3) => 1 << 28,
        // ECX: OSPKE (follows CR4.PKE, which a guest such as Linux sets on a CPU with PKU: the
        // CPUID read back from its vCPU after a first migration has it).
        (0x7, 2) => 1 << 4,
        _ => 0,
    }
}

/// The CPUID a guest on this host can be given: what a vCPU reports after being given KVM's
/// supported set, i.e. that set as KVM itself adjusts it on a vCPU. An incoming guest's
/// features are checked against this rather than the raw supported list. (Code at CPL 3 on
/// paravirtual nested KVM sees the host's CPUID natively; this is what KVM answers at CPL 0.)
/// `vcpu` is one that has not run yet (its CPUID is set again before it does), with KVM's
/// supported CPUID as the build asked it; without one, a probe VM is made for the question,
/// which costs about a millisecond here.
fn effective_cpuid(kvm: &Kvm, vcpu: Option<(&VcpuFd, &CpuId)>) -> Result<Vec<kvm_cpuid_entry2>, String> {
    let asked;
    let supported = match vcpu {
        Some((_, supported)) => supported,
        None => {
            asked = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("supported CPUID: {e}"))?;
            &asked
        }
    };
    let probe;
    let vcpu = match vcpu {
        Some((v, _)) => v,
        None => {
            let vm = kvm.create_vm().map_err(|e| format!("probe VM: {e}"))?;
            probe = vm.create_vcpu(0).map_err(|e| format!("probe vCPU: {e}"))?;
            &probe
        }
    };
    vcpu.set_cpuid2(supported).map_err(|e| format!("CPUID: {e}"))?;
    let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("CPUID: {e}"))?;
    Ok(got.as_slice().to_vec())
}

/// What this host can give a guest (see `effective_cpuid`), asked of a probe VM: for a VMM
/// that asks ahead of time, before it knows the guest (`vmm run --await-restore`).
pub fn host_cpuid(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, String> {
    effective_cpuid(kvm, None).map_err(|e| format!("cannot ask KVM which CPU features it can give a guest: {e}"))
}

/// The feature bits of `wanted` (the CPUID the guest ran with) that `have` (what this host can
/// give) lacks, one line per register, e.g. `leaf 0x7.0 ebx bits 0x10000`; empty if none.
pub fn missing_features(have: &[kvm_cpuid_entry2], wanted: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for (function, index, regs) in FEATURE_REGS {
        let Some(w) = wanted.iter().find(|e| e.function == function && e.index == index) else { continue };
        let h = have.iter().find(|e| e.function == function && e.index == index);
        let have = h.map(|e| [e.eax, e.ebx, e.ecx, e.edx]).unwrap_or([0; 4]);
        let want = [w.eax, w.ebx, w.ecx, w.edx];
        for &reg in regs {
            let lacking = want[reg] & !have[reg] & !vmm_owned_bits(function, reg);
            if lacking != 0 {
                let name = ["eax", "ebx", "ecx", "edx"][reg];
                missing.push(format!("leaf {function:#x}.{index} {name} bits {lacking:#x}"));
            }
        }
    }
    missing
}

/// [`missing_features`] as a verdict: an error naming them, if any.
pub fn check_against(have: &[kvm_cpuid_entry2], wanted: &[kvm_cpuid_entry2]) -> Result<(), MigrateError> {
    let missing = missing_features(have, wanted);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::Incompatible(format!(
            "this host's CPU lacks features the guest uses: {}",
            missing.join(", ")
        )))
    }
}

/// Checks that this host's KVM can give the guest every feature in `wanted` (the CPUID it ran
/// with on the source), so it will not crash on an instruction this host lacks. `vcpu`: a vCPU
/// of the VM being built that has not run yet, if there is one already, with KVM's supported
/// CPUID as already asked (see `effective_cpuid`).
pub fn check_cpuid(
    kvm: &Kvm,
    vcpu: Option<(&VcpuFd, &CpuId)>,
    wanted: &[kvm_cpuid_entry2],
) -> Result<(), MigrateError> {
    let have = effective_cpuid(kvm, vcpu)
        .map_err(|e| MigrateError::Incompatible(format!("cannot read this host's CPUID: {e}")))?;
    check_against(&have, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    #[test]
    fn a_guest_that_wants_what_the_host_has_fits() {
        let have = [leaf(0x1, 0, [0, 0, 0x00ff_00ff, 0x0fff_ffff]), leaf(0x7, 0, [0, 0xffff, 0xff, 0xff])];
        let wanted = [leaf(0x1, 0, [0, 0, 0x0000_00f0, 0x0000_ffff]), leaf(0x7, 0, [0, 0x0f0f, 0x01, 0])];
        assert!(missing_features(&have, &wanted).is_empty());
        assert!(check_against(&have, &wanted).is_ok());
        // Leaves the guest did not have are not checked; eax and ebx of leaf 1 are no features.
        let wanted = [leaf(0x1, 0, [u32::MAX, u32::MAX, 0, 0])];
        assert!(missing_features(&have, &wanted).is_empty());
    }

    #[test]
    fn every_lacking_register_is_named_with_its_bits() {
        let have = [leaf(0x1, 0, [0, 0, 0x1, 0]), leaf(0x7, 0, [0, 0x1, 0, 0])];
        let wanted =
            [leaf(0x1, 0, [0, 0, 0x3, 0]), leaf(0x7, 0, [0, 0x11, 0, 0x4]), leaf(0x8000_0001, 0, [0, 0, 0, 1])];
        assert_eq!(
            missing_features(&have, &wanted),
            [
                "leaf 0x1.0 ecx bits 0x2",
                "leaf 0x7.0 ebx bits 0x10",
                "leaf 0x7.0 edx bits 0x4",
                "leaf 0x80000001.0 edx bits 0x1"
            ]
        );
        let err = check_against(&have, &wanted).expect_err("features lack");
        assert!(err.to_string().contains("lacks features the guest uses: leaf 0x1.0 ecx bits 0x2"), "{err}");
    }

    #[test]
    fn bits_the_vmm_sets_itself_need_no_support() {
        // Hypervisor, TSC deadline, OSXSAVE, HTT, OSPKE.
        let wanted =
            [leaf(0x1, 0, [0, 0, (1 << 31) | (1 << 24) | (1 << 27), 1 << 28]), leaf(0x7, 0, [0, 0, 1 << 4, 0])];
        assert!(missing_features(&[], &wanted).is_empty());
        // Another bit of the same register does.
        let wanted = [leaf(0x7, 0, [0, 0, (1 << 4) | (1 << 5), 0])];
        assert_eq!(missing_features(&[], &wanted), ["leaf 0x7.0 ecx bits 0x20"]);
    }
}
