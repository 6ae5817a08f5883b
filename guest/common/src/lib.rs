// SPDX-License-Identifier: Apache-2.0
//! What the Linux guest init and our own guest kernel share, so that tests and users see one
//! guest interface whichever kernel runs: the parameters read from the kernel command line, the
//! ready line and status line, the `dirty` workload's verifiable memory pattern and the
//! `compute` workload's job.
//!
//! `no_std` and allocation-free: our guest kernel uses it before it has a heap.
#![no_std]

pub mod arp;
pub mod cmdline;
pub mod compute;
pub mod dirty;
pub mod status;

pub use cmdline::{Ipv4Config, Params, VirtioMmioDevice, Workload};
pub use status::{JobDone, JobProgress, RateWindow, Status};

/// TCP and UDP port of the echo service: every byte of a connection, every datagram, goes back
/// to where it came from.
pub const ECHO_PORT: u16 = 7000;
/// TCP port of the control service: a line `poweroff` powers the guest off, `status` answers one
/// status line.
pub const CONTROL_PORT: u16 = 7001;
/// TCP port of the discard service (echo workload): reads and drops everything, for measuring
/// client-to-guest throughput.
pub const DISCARD_PORT: u16 = 7002;
/// TCP port of the source service (echo workload): sends [`SOURCE_PATTERN`] over and over until
/// the client closes, for measuring guest-to-client throughput.
pub const SOURCE_PORT: u16 = 7003;
/// What the source service repeats: 64 bytes, so a client can check any stretch of the stream.
pub const SOURCE_PATTERN: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+\n";
/// First word of the line a guest prints on its console when its workload is up.
pub const READY_PREFIX: &str = "GUEST-READY";
