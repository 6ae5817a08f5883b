// SPDX-License-Identifier: Apache-2.0
//! Networking for the VMM: a TAP backend and the virtio-net device (on the `virtio` crate's
//! transport), its migration state, and taking the guest's addresses over after a migration.
//!
//! Modules by job: [`device`] (features, config, queues, what the transport asks), [`tx`] and
//! [`rx`] (frames between the queues and the TAP), [`ctrl`] (control queue), [`tap`], [`announce`]
//! and [`flows`] (what a moved guest's peers are told), [`takeover`] (writing that into the TAP),
//! [`persist`] (migration state), [`event_handler`] (the event loop's part).

pub mod announce;
pub mod ctrl;
pub mod device;
pub mod event_handler;
pub mod flows;
pub mod metrics;
pub mod persist;
pub mod rx;
pub mod takeover;
pub mod tap;
pub mod tx;

pub use device::{Net, NetError};

/// A MAC address.
pub type MacAddr = [u8; 6];

#[cfg(test)]
pub(crate) mod test_utils;
