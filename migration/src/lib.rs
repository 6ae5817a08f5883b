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
