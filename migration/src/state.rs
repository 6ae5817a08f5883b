// SPDX-License-Identifier: Apache-2.0
//! The KVM-level state that migrates: one vCPU's registers and MSRs, and the VM-wide interrupt
//! controllers, PIT and clock. Plain serde structs; kvm-bindings serialises the KVM structures
//! as size-tolerant byte blobs.
//!
//! Versioning: a major/minor pair. A destination accepts state of its own major version and
//! any minor version up to its own (fields added in a minor version have `#[serde(default)]`);
//! renaming or removing a field bumps the major version.

use kvm_bindings::{
    CpuId, Msrs, kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// Version of the state types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateVersion {
    pub major: u16,
    pub minor: u16,
}

/// The version this build writes.
pub const STATE_VERSION: StateVersion = StateVersion { major: 1, minor: 0 };

impl StateVersion {
    /// Whether state written by `self` can be read by this build.
    // While our minor version is 0 the second comparison is `minor <= 0`; it is written for
    // the versions to come.
    #[allow(clippy::absurd_extreme_comparisons)]
    pub fn compatible(self) -> bool {
        self.major == STATE_VERSION.major && self.minor <= STATE_VERSION.minor
    }
}

/// One vCPU. Restored in the order of the fields (see `vmm`'s `restore_vcpu`).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: CpuId,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable, TSC and kvmclock ones included.
    pub msrs: Msrs,
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz the vCPU ran at, if KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The VM-wide KVM state: 8259 PICs, IOAPIC, PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(STATE_VERSION.compatible());
        assert!(StateVersion { major: 1, minor: 0 }.compatible());
        assert!(!StateVersion { major: 2, minor: 0 }.compatible());
        assert!(!StateVersion { major: 1, minor: STATE_VERSION.minor + 1 }.compatible());
    }

    #[test]
    fn kvm_state_round_trips_through_json() {
        let regs = kvm_regs { rip: 0x1234_5678, rflags: 0x202, ..Default::default() };
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        let state = VcpuState {
            cpuid: CpuId::new(2).unwrap(),
            mp_state: kvm_mp_state { mp_state: 3 },
            regs,
            sregs: kvm_sregs::default(),
            xsave: None,
            xcrs: Some(kvm_xcrs::default()),
            debug_regs: kvm_debugregs::default(),
            lapic,
            msrs: Msrs::new(3).unwrap(),
            vcpu_events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_250_000),
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, 0x1234_5678);
        assert_eq!(back.lapic.regs[0x20], 7);
        assert_eq!(back.mp_state.mp_state, 3);
        assert_eq!(back.msrs.as_slice().len(), 3);
        assert_eq!(back.tsc_khz, Some(2_250_000));
        let vm = VmState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip { chip_id: 2, ..Default::default() },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data { clock: 42, ..Default::default() },
        };
        let back: VmState = serde_json::from_str(&serde_json::to_string(&vm).unwrap()).unwrap();
        assert_eq!((back.ioapic.chip_id, back.clock.clock), (2, 42));
    }
}
