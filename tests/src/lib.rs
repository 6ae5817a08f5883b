// SPDX-License-Identifier: Apache-2.0
//! End-to-end test support for `vmm`: a multi-host network test bed built from network
//! namespaces on one L2 segment (see [`bed`]), plus the end-to-end tests in `tests/`.
//!
//! ```no_run
//! use vmm_tests::TestBed;
//!
//! let bed = TestBed::builder().host("a").host("b").client("client").build()?;
//! let mut vmm = bed.host("a").command("/path/to/vmm");
//! vmm.args(["run", "--kernel", "/path/to/kernel", "--net", &format!("tap={}", bed.host("a").tap())]);
//! vmm.args(["--cmdline", &format!("console=ttyS0 {}", bed.guest_ip_cmdline(0))]);
//! let _vmm = bed.host("a").spawn(&mut vmm)?; // killed when `bed` drops
//! bed.client().wait_for_tcp((bed.guest_ip(0), 22).into(), std::time::Duration::from_secs(10))?;
//! # Ok::<(), vmm_tests::TestBedError>(())
//! ```
//!
//! The test bed needs root (it runs `ip netns add` and opens `/dev/net/tun`) and iproute2.

pub mod bed;
pub mod cgroup;
pub mod checks;
pub mod client;
pub mod client_cli;
pub mod cluster;
pub mod echo_stream;
mod error;
pub mod guest;
pub mod images;
pub mod l2;
pub mod moves;
pub mod netns;
pub mod pki;
pub mod place;
mod process;
pub mod snapshots;
pub mod udp_stream;
pub mod vm;

pub use bed::{Client, Host, TestBed, TestBedBuilder};
pub use error::TestBedError;
pub use netns::{Netns, NsThread, list_netns, sweep_stale};
pub use process::Process;
