// SPDX-License-Identifier: Apache-2.0
//! Live migration building blocks that do not depend on the VMM: the wire protocol, memory
//! batches and dirty-bitmap arithmetic, disk batches, the KVM state types and the snapshot format. The VMM drives them
//! (`vmm::migrate`).

pub mod disk;
pub mod memory;
pub mod postcopy;
pub mod protocol;
pub mod snapshot;
pub mod state;

pub use protocol::{Command, ProtocolError, Response, StartPayload};
pub use state::{STATE_VERSION, StateVersion, VcpuState, VmState};

/// Pseudo-random bytes for the decoders' "never panic" tests: xorshift64 from `x`, which goes on
/// from where the previous call left it.
#[cfg(test)]
pub(crate) fn random_bytes(x: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x as u8
        })
        .collect()
}
