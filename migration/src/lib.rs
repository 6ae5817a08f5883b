// SPDX-License-Identifier: Apache-2.0
//! Live migration building blocks that do not depend on the VMM: the wire protocol, memory
//! batches and dirty-bitmap arithmetic, disk batches, and the KVM state types. The VMM drives them
//! (`vmm::migrate`).

pub mod disk;
pub mod memory;
pub mod protocol;
pub mod state;

pub use protocol::{Command, ProtocolError, Response, StartPayload};
pub use state::{STATE_VERSION, StateVersion, VcpuState, VmState};
