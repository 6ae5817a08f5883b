// SPDX-License-Identifier: Apache-2.0
//! The API: HTTP/1.1 with JSON bodies on a unix socket, served by threads of its own (one accepts,
//! one per connection); requests reach the VMM thread over a channel plus an eventfd, so API
//! clients never block vCPUs.

pub mod client;
mod dispatch;
pub mod display;
mod http;
pub mod routes;
pub mod server;
pub mod types;

pub use types::*;
