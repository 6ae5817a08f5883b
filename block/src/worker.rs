// SPDX-License-Identifier: Apache-2.0
//! The disk's I/O thread: it waits for the driver's notifications (the request queue's
//! ioeventfd, which KVM signals without a vCPU ever leaving the guest) and carries out the
//! requests under the device lock, so the vCPUs and the VMM's event loop never wait for the
//! disk. A pause for migration takes the same lock, so once it has it no request is in flight.
//!
//! Plain blocking I/O on one thread per disk: the kernel here has io_uring, but a thread keeps
//! the set of system calls small and fixed (`poll`, `read` on eventfds, the disk's
//! `preadv`/`pwritev`/`fdatasync`/`fallocate`, `write` on the irqfd) for the seccomp filter
//! that comes later, and on a page-cached image it is bounded by memory copies, not by waiting.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Block, BlockError, REQUEST_QUEUE};

/// The running I/O thread of one disk; dropping it stops the thread.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the I/O thread of `device`; the thread calls `first` before anything else (the
    /// VMM installs the thread's seccomp filter there).
    pub fn spawn(
        device: Arc<Mutex<Block>>,
        name: String,
        first: impl FnOnce() + Send + 'static,
    ) -> Result<Self, BlockError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let stop2 = stop.try_clone().map_err(BlockError::EventFd)?;
        let notify = device.lock().expect("Poisoned lock").queue_events()[REQUEST_QUEUE]
            .try_clone()
            .map_err(BlockError::EventFd)?;
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                first();
                run(&device, &notify, &stop2)
            })
            .map_err(BlockError::EventFd)?;
        Ok(Worker { stop, handle: Some(handle) })
    }
}

fn run(device: &Mutex<Block>, notify: &EventFd, stop: &EventFd) {
    let mut fds = [
        libc::pollfd { fd: notify.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: polling two descriptors we own, with an array of their size.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("virtio-blk: the I/O thread cannot wait for requests: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = notify.read();
            device.lock().expect("Poisoned lock").process_queue();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
