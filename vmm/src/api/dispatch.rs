// SPDX-License-Identifier: Apache-2.0
//! How the API server's connection threads pass requests on to the VMM thread and wait for its
//! answers, and which requests are in flight (see `ApiServer::drain`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use super::server::{ApiServerOptions, RESTORE_REPLY_TIMEOUT};
use super::types::{ApiError, ApiMessage, ApiRequest, ApiResponse};

/// What the server needs to pass a request on, shared by all its threads.
pub(super) struct Dispatcher {
    /// `None` once the server stopped, so that connections still open cannot keep the VMM's
    /// channel alive (its receiver would never see it close) or reach the VMM after `stop`.
    pub(super) to_vmm: Mutex<Option<Sender<ApiMessage>>>,
    pub(super) wake: Arc<EventFd>,
    pub(super) options: ApiServerOptions,
    /// Connections being served now.
    pub(super) connections: AtomicUsize,
    /// Requests handed to the VMM thread whose answers are not written yet (see
    /// [`ApiServer::drain`]).
    pub(super) in_flight: AtomicUsize,
}

/// A request handed to the VMM thread, until its answer is written (or the connection gave up).
pub(super) struct InFlight<'a>(&'a Dispatcher);

impl<'a> InFlight<'a> {
    pub(super) fn new(dispatcher: &'a Dispatcher) -> InFlight<'a> {
        dispatcher.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(dispatcher)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why the VMM thread gave no answer.
#[derive(Clone, Copy, Debug)]
pub(super) enum Unavailable {
    Gone,
    Timeout,
}

impl Unavailable {
    pub(super) fn message(self) -> &'static str {
        match self {
            Unavailable::Gone => "the VMM is not taking API requests",
            Unavailable::Timeout => "the VMM did not answer in time",
        }
    }
}

impl Dispatcher {
    /// Sends `request` to the VMM thread, wakes it and waits for its answer.
    pub(super) fn call(&self, request: ApiRequest) -> Result<Result<ApiResponse, ApiError>, Unavailable> {
        // A restore is answered once the guest runs, after any copied disk is copied into place.
        let timeout = match request {
            ApiRequest::Restore(_) => self.options.reply_timeout.max(RESTORE_REPLY_TIMEOUT),
            _ => self.options.reply_timeout,
        };
        let (reply_tx, reply_rx) = channel();
        {
            // Sending never blocks (the channel is unbounded), so neither does this lock for long.
            let to_vmm = self.to_vmm.lock().unwrap_or_else(PoisonError::into_inner);
            let to_vmm = to_vmm.as_ref().ok_or(Unavailable::Gone)?;
            to_vmm.send((request, reply_tx)).map_err(|_| Unavailable::Gone)?;
        }
        if let Err(e) = self.wake.write(1) {
            // The request is queued; the VMM thread sees it at its next wake-up, or we time out.
            log::warn!("failed to wake the VMM thread for an API request: {e}");
        }
        match reply_rx.recv_timeout(timeout) {
            Ok(result) => Ok(result),
            Err(RecvTimeoutError::Timeout) => Err(Unavailable::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Unavailable::Gone),
        }
    }

    /// Drops the server's way to the VMM thread; requests from now on get 503s.
    pub(super) fn disconnect(&self) {
        self.to_vmm.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}
