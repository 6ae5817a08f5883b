// SPDX-License-Identifier: Apache-2.0
//! The agent's and the command line's error type.

use crate::ownership::OwnershipError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Ownership(#[from] OwnershipError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Vmm(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Wait(#[from] crate::cli::WaitError),
}

impl ClusterError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
        let what = what.into();
        move |source| ClusterError::Io { what, source }
    }
}

impl From<crate::placement::PlacementError> for ClusterError {
    fn from(e: crate::placement::PlacementError) -> Self {
        ClusterError::Ownership(e.into())
    }
}
