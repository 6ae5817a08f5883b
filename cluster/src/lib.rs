// SPDX-License-Identifier: Apache-2.0
//! vmm-cluster: hosts and a cluster for `vmm` — the host agent (`vmm host run`), the cluster's
//! state in etcd, placement, moves and drains, and the cluster's command line.
//!
//! The binary `vmm-cluster` serves `vmm host|cluster|vm ...`: the `vmm` binary runs it for those
//! commands, so this crate builds on `vmm` without `vmm` depending on it.

pub mod agent;
pub mod balance;
pub mod balancer;
pub mod cli;
pub mod election;
pub mod error;
pub mod etcd_server;
pub mod incoming;
pub mod keys;
pub mod lease;
pub mod load;
pub mod local;
pub mod model;
pub mod outgoing;
pub mod ownership;
pub mod placement;
pub mod procfs;
pub mod reconcile;
pub mod store;
pub mod view;
pub mod vmm_client;
