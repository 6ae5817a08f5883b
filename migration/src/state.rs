// SPDX-License-Identifier: Apache-2.0
//! The KVM-level state that migrates: one vCPU's registers and MSRs, and the VM-wide interrupt
//! controllers, PIT and clock. Plain serde structs; kvm-bindings serialises the KVM structures
//! as size-tolerant byte blobs, which go into the JSON as one base64 string each (see
//! [`compact`]).
//!
//! Versioning: a major/minor pair. A destination accepts state of its own major version and
//! any minor version up to its own (fields added in a minor version have `#[serde(default)]`);
//! renaming or removing a field, or changing its encoding, bumps the major version.

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
pub const STATE_VERSION: StateVersion = StateVersion { major: 2, minor: 1 };

impl StateVersion {
    /// Whether state written by `self` can be read by this build.
    pub fn compatible(self) -> bool {
        self.major == STATE_VERSION.major && self.minor <= STATE_VERSION.minor
    }
}

/// One vCPU. Restored in the order `vmm`'s `Vcpu::restore_state` documents.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(with = "compact")]
    pub cpuid: CpuId,
    pub mp_state: kvm_mp_state,
    #[serde(with = "compact")]
    pub regs: kvm_regs,
    #[serde(with = "compact")]
    pub sregs: kvm_sregs,
    #[serde(with = "compact")]
    pub xsave: Option<kvm_xsave>,
    #[serde(with = "compact")]
    pub xcrs: Option<kvm_xcrs>,
    #[serde(with = "compact")]
    pub debug_regs: kvm_debugregs,
    #[serde(with = "compact")]
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable, TSC and kvmclock ones included.
    #[serde(with = "compact")]
    pub msrs: Msrs,
    #[serde(with = "compact")]
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz the vCPU ran at, if KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The VM-wide KVM state: 8259 PICs, IOAPIC, PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "compact")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "compact")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "compact")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "compact")]
    pub pit: kvm_pit_state2,
    #[serde(with = "compact")]
    pub clock: kvm_clock_data,
}

/// A serde adapter (`#[serde(with = "compact")]`) that writes a value as one base64 string of
/// its postcard encoding. kvm-bindings serialises its structures as byte blobs, which JSON
/// spells as arrays of numbers: the vCPU state alone is thousands of them, and parsing them
/// was the largest single cost of the destination's work while the guest is paused. A string
/// is read at memory speed. The JSON around keeps its field names, so versioning still works.
pub mod compact {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use serde::de::{DeserializeOwned, Error as _};
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let bytes = postcard::to_stdvec(value).map_err(S::Error::custom)?;
        s.serialize_str(&STANDARD_NO_PAD.encode(bytes))
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = STANDARD_NO_PAD.decode(text.as_bytes()).map_err(D::Error::custom)?;
        postcard::from_bytes(&bytes).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(STATE_VERSION.compatible());
        assert!(StateVersion { major: STATE_VERSION.major, minor: 0 }.compatible());
        assert!(!StateVersion { major: STATE_VERSION.major + 1, minor: 0 }.compatible());
        assert!(!StateVersion { major: STATE_VERSION.major - 1, minor: 0 }.compatible());
        assert!(!StateVersion { major: STATE_VERSION.major, minor: STATE_VERSION.minor + 1 }.compatible());
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

    #[test]
    fn kvm_blobs_are_strings_and_bad_ones_are_errors() {
        let vm = VmState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data { clock: 42, ..Default::default() },
        };
        let mut json: serde_json::Value = serde_json::to_value(&vm).unwrap();
        assert!(json["clock"].is_string(), "{json}");
        // Not base64, a truncated postcard length (0x80), and a number where a string belongs.
        for bad in [serde_json::json!("!!"), serde_json::json!("gA"), serde_json::json!(7)] {
            json["clock"] = bad;
            assert!(serde_json::from_value::<VmState>(json.clone()).is_err());
        }
    }
}
