// SPDX-License-Identifier: Apache-2.0
//! Post-copy's destination: guest memory whose missing pages are on the migration source.
//!
//! At the switch the destination learns which pages it lacks (`PostcopyDirty`), drops its stale
//! copies of them ([`zap`]), and runs the guest. A fault on a page it lacks is asked for on the
//! fault connection and answered at once ([`Remote`], on the page handler thread); a fault on a
//! page the source never had data in (never touched, or all zero) is a zero page, without
//! asking. A receiver thread places what the source pushes in the background on the main
//! connection ([`start_receiver`]). When no page is missing any more the handler says
//! `PostcopyDone` and releases the memory.
//!
//! If either connection breaks, the handler pauses the guest (its vCPUs wait on the missing
//! pages anyway) and waits on the migration listener, which stays open for this, for the source
//! to come back with `PostcopyResume` and the migration's id. It tells the source which pages
//! it still lacks, takes the new fault connection, resumes the guest, and goes on.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration::memory::{BatchReader, PAGE_SIZE};
use migration::postcopy::{ChannelHello, PageBitmap, PostcopyDone, encode_request};
use migration::protocol::{self, Command};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{Ctx, GuestUffd, PageSource, Served, UffdError, UffdStats};
use crate::transport::{MigrationListener, MigrationStream, TransportError};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::VcpuSet;

/// How long an answer to a page request may take before the link counts as broken.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);
/// How long the first frame of a new connection may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts the next connection on `listener` whose first frame is `first` with this
/// migration's `id` (others are closed and logged), while `go_on` says so. Every connection
/// passes the transport's handshake first (mutual TLS unless plaintext was asked for).
pub fn accept_hello(
    listener: &MigrationListener,
    first: Command,
    id: u64,
    go_on: &dyn Fn() -> bool,
) -> Result<MigrationStream, TransportError> {
    loop {
        let mut s = listener.accept_while(go_on)?;
        s.tcp().set_read_timeout(Some(HELLO_TIMEOUT)).ok();
        let mut buf = Vec::new();
        let peer = s.describe_peer();
        match protocol::read_frame_into(&mut s, &mut buf) {
            Ok(c) if c == first => match protocol::parse_json::<ChannelHello>("hello", &buf) {
                Ok(h) if h.id == id => {
                    log::info!("post-copy: {first:?} from {peer}");
                    return Ok(s);
                }
                Ok(_) => log::warn!("post-copy: {peer} presented another migration's id; closed"),
                Err(e) => log::warn!("post-copy: {peer}: {e}"),
            },
            Ok(c) => log::warn!("post-copy: {peer} began with {c:?}, not {first:?}; closed"),
            Err(e) => log::warn!("post-copy: {peer}: {e}"),
        }
    }
}

fn src_err(e: impl std::fmt::Display) -> UffdError {
    UffdError::Source(e.to_string())
}

/// Drops this host's copies of the pages set in `needed` (stale: the guest wrote them after
/// they were sent), so that the guest's next touch faults.
pub fn zap(mem: &GuestMemoryMmap, needed: &PageBitmap) -> Result<(), UffdError> {
    for (start, pages, words) in &needed.regions {
        let host = mem.get_host_address(GuestAddress(*start)).map_err(|_| UffdError::Outside(*start))? as usize;
        let mut p = 0u64;
        while p < *pages {
            let set = |p: u64| words.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0);
            if !set(p) {
                p += 1;
                continue;
            }
            let first = p;
            while p < *pages && set(p) {
                p += 1;
            }
            let (addr, len) = (host + (first * PAGE_SIZE as u64) as usize, ((p - first) * PAGE_SIZE as u64) as usize);
            // SAFETY: a range of this VM's own anonymous guest memory; nothing runs the guest yet,
            // and dropping the pages only makes them read as missing (then faulted in by the
            // handler), never invalid.
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
                return Err(src_err(format!("madvise(DONTNEED): {}", std::io::Error::last_os_error())));
            }
        }
    }
    Ok(())
}

/// What the handler and the receiver share.
pub struct Shared {
    needed: PageBitmap,
    received: Vec<Vec<AtomicU64>>,
    /// Needed pages not placed yet.
    remaining: AtomicU64,
    pushed: AtomicU64,
    requested: AtomicU64,
    /// The main connection broke (the receiver ended on an error).
    broken: AtomicBool,
    /// Written by the receiver when the handler should look (all there, or broken).
    wake: EventFd,
    receiver: Mutex<Option<(JoinHandle<()>, std::net::TcpStream)>>,
    uffd: Arc<GuestUffd>,
}

impl Shared {
    fn is_received(&self, r: usize, page: usize) -> bool {
        self.received[r][page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// The pages still missing.
    fn missing(&self) -> PageBitmap {
        let regions = self
            .needed
            .regions
            .iter()
            .zip(&self.received)
            .map(|((start, pages, words), got)| {
                let w = words.iter().zip(got).map(|(n, g)| n & !g.load(Ordering::SeqCst)).collect();
                (*start, *pages, w)
            })
            .collect();
        PageBitmap { regions }
    }

    /// Places a `Memory` batch; `counter` counts the needed pages it brought.
    fn place(&self, batch: &[u8], counter: &AtomicU64) -> Result<(), UffdError> {
        for record in BatchReader::new(batch) {
            let rec = record.map_err(src_err)?;
            let len = u64::from(rec.pages) * PAGE_SIZE as u64;
            match rec.data {
                Some(data) => {
                    self.uffd.copy(rec.gpa, data)?;
                }
                None => self.uffd.zero(rec.gpa, len)?,
            }
            for p in 0..u64::from(rec.pages) {
                let gpa = rec.gpa + p * PAGE_SIZE as u64;
                let Some((r, page)) = self.needed.index(gpa) else { continue };
                let bit = 1u64 << (page % 64);
                if self.needed.regions[r].2[page / 64] & bit == 0 {
                    continue;
                }
                if self.received[r][page / 64].fetch_or(bit, Ordering::SeqCst) & bit == 0 {
                    counter.fetch_add(1, Ordering::Relaxed);
                    if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                        let _ = self.wake.write(1);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Pauses and resumes the destination's guest around a broken link.
#[derive(Default)]
pub struct GuestControl {
    vcpus: Mutex<Option<Arc<Mutex<VcpuSet>>>>,
}

impl GuestControl {
    /// The running VM's vCPUs (once it runs).
    pub fn attach(&self, vcpus: Arc<Mutex<VcpuSet>>) {
        *self.vcpus.lock().expect("Poisoned lock") = Some(vcpus);
    }

    fn with(&self, what: &str, f: impl FnOnce(&VcpuSet) -> Result<(), String>) {
        let v = self.vcpus.lock().expect("Poisoned lock").clone();
        if let Some(v) = v
            && let Err(e) = f(&v.lock().expect("Poisoned lock"))
        {
            log::warn!("post-copy: {what} the guest: {e}");
        }
    }
}

/// The missing pages' source: the migration source, over the fault connection.
pub struct Remote {
    shared: Arc<Shared>,
    fault: Option<MigrationStream>,
    listener: MigrationListener,
    id: u64,
    control: Arc<GuestControl>,
    stats: Arc<UffdStats>,
    buf: Vec<u8>,
    done_sent: bool,
    reconnects: u32,
    started: Instant,
    /// Faults on pages that had arrived meanwhile, on pages never needed, and requests made.
    tally: [u64; 3],
}

impl Remote {
    /// `needed`: the pages the destination lacks (already [`zap`]ped); `fault`: the fault
    /// connection; `listener`: the migration listener, kept for reconnections.
    pub fn new(
        uffd: Arc<GuestUffd>,
        needed: PageBitmap,
        fault: MigrationStream,
        listener: MigrationListener,
        id: u64,
        control: Arc<GuestControl>,
        stats: Arc<UffdStats>,
    ) -> Result<Remote, UffdError> {
        fault.tcp().set_read_timeout(Some(ANSWER_TIMEOUT)).ok();
        let received = needed.regions.iter().map(|(_, _, w)| w.iter().map(|_| AtomicU64::new(0)).collect()).collect();
        let shared = Arc::new(Shared {
            remaining: AtomicU64::new(needed.count()),
            needed,
            received,
            pushed: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(UffdError::EventFd)?,
            receiver: Mutex::new(None),
            uffd,
        });
        Ok(Remote {
            shared,
            fault: Some(fault),
            listener,
            id,
            control,
            stats,
            buf: Vec::new(),
            done_sent: false,
            reconnects: 0,
            started: Instant::now(),
            tally: [0; 3],
        })
    }

    /// What the receiver thread needs.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn request(&mut self, gpa: u64) -> Result<(), UffdError> {
        let fault = self.fault.as_mut().ok_or_else(|| src_err("no fault connection"))?;
        protocol::write_frame(fault, Command::PageRequest, &encode_request(gpa)).map_err(src_err)?;
        match protocol::read_frame_into_with(fault, fault.integrity(), &mut self.buf).map_err(src_err)? {
            Command::Memory => self.shared.place(&self.buf, &self.shared.requested),
            other => Err(src_err(format!("expected pages, got {other:?}"))),
        }
    }

    /// Waits for the source to come back after a break: pauses the guest, takes a new main
    /// connection (`PostcopyResume`), tells it what is still missing, takes a new fault
    /// connection, restarts the receiver and resumes the guest.
    fn recover(&mut self, ctx: &Ctx, why: &str) -> Result<(), UffdError> {
        log::warn!("post-copy: the link to the source broke ({why}); the guest waits for it to come back");
        self.control.with("pausing", VcpuSet::pause);
        self.fault = None;
        stop_receiver(&self.shared);
        let stop = ctx.stop;
        let go_on = || !stopped(stop);
        let main = loop {
            let mut main =
                accept_hello(&self.listener, Command::PostcopyResume, self.id, &go_on).map_err(|e| match e {
                    TransportError::Stopped => UffdError::Stopped,
                    e => src_err(e),
                })?;
            let missing = self.shared.missing();
            match protocol::write_frame(&mut main, Command::PostcopyDirty, &missing.encode()) {
                Ok(()) => break main,
                Err(e) => log::warn!("post-copy: the source's new connection failed: {e}"),
            }
        };
        let fault = accept_hello(&self.listener, Command::PostcopyChannel, self.id, &go_on).map_err(|e| match e {
            TransportError::Stopped => UffdError::Stopped,
            e => src_err(e),
        })?;
        fault.tcp().set_read_timeout(Some(ANSWER_TIMEOUT)).ok();
        self.fault = Some(fault);
        self.shared.broken.store(false, Ordering::SeqCst);
        start_receiver(self.shared.clone(), main)?;
        self.reconnects += 1;
        self.control.with("resuming", VcpuSet::resume);
        log::warn!(
            "post-copy: the source is back; {} page(s) still to come",
            self.shared.remaining.load(Ordering::SeqCst)
        );
        Ok(())
    }

    fn done_report(&self) -> PostcopyDone {
        let latency = self.stats.latency_us();
        PostcopyDone {
            faults: self.stats.faults.load(Ordering::Relaxed),
            fault_latency_median_us: latency.map(|l| l.0),
            fault_latency_p99_us: latency.map(|l| l.1),
            pages_pushed: self.shared.pushed.load(Ordering::Relaxed),
            pages_requested: self.shared.requested.load(Ordering::Relaxed),
            reconnects: self.reconnects,
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

impl PageSource for Remote {
    fn fault(&mut self, ctx: &Ctx, gpa: u64) -> Result<Served, UffdError> {
        let Some((r, page)) = self.shared.needed.index(gpa) else { return Err(UffdError::Outside(gpa)) };
        let needed = self.shared.needed.regions[r].2[page / 64] & (1 << (page % 64)) != 0;
        if !needed {
            // Never had data on the source (never touched, or all zero, and not written since).
            ctx.uffd.zero(gpa, PAGE_SIZE as u64)?;
            self.tally[1] += 1;
            return Ok(Served::Local);
        }
        loop {
            if self.shared.is_received(r, page) {
                ctx.uffd.wake(gpa, PAGE_SIZE as u64);
                self.tally[0] += 1;
                return Ok(Served::Local);
            }
            self.tally[2] += 1;
            match self.request(gpa) {
                Ok(()) if self.shared.is_received(r, page) => return Ok(Served::Now),
                Ok(()) => {}
                Err(e) => self.recover(ctx, &e.to_string())?,
            }
        }
    }

    fn idle(&mut self, ctx: &Ctx) -> Result<bool, UffdError> {
        let _ = self.shared.wake.read();
        if self.shared.remaining.load(Ordering::SeqCst) == 0 {
            if !self.done_sent {
                let report = self.done_report();
                let sent = match self.fault.as_mut() {
                    Some(f) => protocol::write_json(f, Command::PostcopyDone, &report).map_err(|e| e.to_string()),
                    None => Err("no fault connection".into()),
                };
                match sent {
                    Ok(()) => {
                        // The receiver ends by itself on `PostcopyEnd`.
                        let [arrived, zero, requests] = self.tally;
                        log::info!(
                            "post-copy: every page is here ({report:?}); faults on pages arrived meanwhile {arrived}, \
                             on zero pages {zero}, requests {requests}"
                        );
                        self.done_sent = true;
                    }
                    Err(e) => self.recover(ctx, &e)?,
                }
            }
            return Ok(false);
        }
        if self.shared.broken.load(Ordering::SeqCst) {
            self.recover(ctx, "the main connection failed")?;
        }
        Ok(false)
    }

    fn done(&self) -> bool {
        self.done_sent
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.shared.wake.as_raw_fd())
    }
}

/// Starts the thread that places the pages pushed on `main`.
pub fn start_receiver(shared: Arc<Shared>, main: MigrationStream) -> Result<(), UffdError> {
    // The source may pause between pushes (a bandwidth cap, faults first); the stall bound
    // still notices a dead link.
    main.tcp().set_read_timeout(None).ok();
    let ctl = main.tcp().try_clone().map_err(UffdError::Thread)?;
    let s2 = shared.clone();
    let thread = std::thread::Builder::new()
        .name("postcopy-recv".into())
        .spawn(move || receive_pushed(main, &s2))
        .map_err(UffdError::Thread)?;
    *shared.receiver.lock().expect("Poisoned lock") = Some((thread, ctl));
    Ok(())
}

/// The main connection is gone (it never started, say): the handler reconnects.
pub fn mark_broken(shared: &Shared) {
    shared.broken.store(true, Ordering::SeqCst);
    let _ = shared.wake.write(1);
}

/// Ends the receiver thread (its connection is shut down) and waits for it.
fn stop_receiver(shared: &Shared) {
    let r = shared.receiver.lock().expect("Poisoned lock").take();
    if let Some((thread, ctl)) = r {
        let _ = ctl.shutdown(std::net::Shutdown::Both);
        let _ = thread.join();
    }
}

fn receive_pushed(mut main: MigrationStream, shared: &Shared) {
    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::PostcopyReceiver) {
        log::error!("post-copy receiver: {e}");
        shared.broken.store(true, Ordering::SeqCst);
        let _ = shared.wake.write(1);
        return;
    }
    let mut buf = Vec::with_capacity(protocol::MAX_PAYLOAD as usize);
    let integrity = main.integrity();
    loop {
        let r = match protocol::read_frame_into_with(&mut main, integrity, &mut buf) {
            Ok(Command::Memory) => shared.place(&buf, &shared.pushed).map_err(|e| e.to_string()),
            Ok(Command::PostcopyEnd) => {
                log::debug!("post-copy: the source pushed every page");
                return;
            }
            Ok(other) => Err(format!("unexpected {other:?} on the main connection")),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            if shared.remaining.load(Ordering::SeqCst) > 0 {
                log::warn!("post-copy: the main connection: {e}");
                shared.broken.store(true, Ordering::SeqCst);
            }
            let _ = shared.wake.write(1);
            return;
        }
    }
}

/// Whether the handler's stop event fired (read without consuming it).
fn stopped(stop: &EventFd) -> bool {
    let mut fd = libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}
