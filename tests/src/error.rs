// SPDX-License-Identifier: Apache-2.0
//! The one error type of the test bed library.
//!
//! A single enum rather than one per module: the modules are small and tests only ever
//! `.expect()` these, so what matters is that the message names the failing command or file.

use std::io;
use std::process::ExitStatus;
use std::time::Duration;

/// Errors of the test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestBedError {
    #[error("failed to run `{cmdline}`: {source}")]
    Spawn {
        cmdline: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Command { cmdline: String, status: ExitStatus, stderr: String },
    #[error("failed to list network namespaces: {0}")]
    ListNetns(#[source] io::Error),
    #[error("failed to enter network namespace {netns}: {source}")]
    EnterNetns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to start a thread: {0}")]
    Thread(#[source] io::Error),
    #[error("failed to set {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid node name {0:?}: use 1 to 32 characters from [A-Za-z0-9_-]")]
    InvalidName(String),
    #[error("node name {0:?} is used twice in one test bed")]
    DuplicateName(String),
    #[error("too many hosts: a test bed has at most {max}")]
    TooManyHosts { max: usize },
    #[error("no host named {0:?} in this test bed")]
    UnknownHost(String),
    #[error("failed to open TAP device {name}: {source}")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to open a packet socket on {ifname}: {source}")]
    PacketSocket {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
}
