// SPDX-License-Identifier: Apache-2.0
//! vmm: a KVM micro-VM monitor built for live migration.
//!
//! The library holds everything host-side except the migration protocol (`migration` crate),
//! the virtio transport (`virtio`) and the devices on it (`net`, `block`); `main.rs` is the command line on top of it.

pub mod announce;
pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod disk_config;
pub mod fault;
pub mod fuzzing;
pub mod host;
pub mod jail;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod net_config;
pub mod probe;
pub mod seccomp;
pub mod storage;
pub mod transport;
pub mod vmm;
pub mod vstate;

pub use builder::{BuildError, build_vm_for_boot};
pub use config::VmConfig;
pub use vmm::{Vmm, VmmError};
pub use vstate::vcpu::ExitReason;
