// SPDX-License-Identifier: Apache-2.0
//! Guest memory filled on demand with userfaultfd: for a restored snapshot (pages come from the
//! snapshot's memory file, [`file::FileSource`]) and for a post-copy migration's destination
//! (pages come from the source over the migration connection).
//!
//! Guest RAM is ordinary anonymous memory registered with a userfaultfd in MISSING mode. The
//! first touch of a page that is not there yet, by the guest (through KVM) or by the VMM itself,
//! stops the touching thread and queues a fault event. A [`Handler`] thread polls the
//! userfaultfd and a stop eventfd, hands each fault to its [`PageSource`], and in between lets
//! the source load ahead (pages copied ahead never fault, and copying ahead costs about 1.6 µs a
//! page here against 40 to 80 µs for a demand fault). `UFFDIO_COPY` onto a page that is already
//! there fails with `EEXIST` and leaves it alone: that page is simply there already. When the
//! source has nothing left to give, the handler unregisters the memory, which from then on is
//! plain anonymous memory, and ends.
//!
//! A handler that fails (a damaged chunk, a read error, a lost link it cannot recover) never
//! leaves the guest hung or lets it run on wrong memory: the faulting threads stay stopped, the
//! VMM is told to end the VM, and if it has not done so within [`FATAL_GRACE`] (a VMM thread
//! may itself be stopped on the missing page) the handler ends the process with the error.
//!
//! System calls: `userfaultfd` (or `open("/dev/userfaultfd")` and `USERFAULTFD_IOC_NEW`),
//! `ioctl` (`UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_UNREGISTER`, `UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`), `read`, `poll`, `pread64` (file source).

pub mod file;
pub mod remote;

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, IoctlFlags, Uffd, UffdBuilder};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::ThreadKind;
use crate::vstate::memory::GuestMemoryMmap;

/// Host page size (and the guest's), the unit userfaultfd works in.
pub const PAGE: u64 = 4096;
/// How long a failed handler waits for the VMM to end the VM before it ends the process.
pub const FATAL_GRACE: Duration = Duration::from_secs(5);
/// Most fault latencies kept for the median and the 99th percentile.
const MAX_SAMPLES: usize = 1 << 20;

/// Errors of on-demand guest memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0}")]
    Create(userfaultfd::Error),
    #[error("cannot register guest memory at {gpa:#x} with the userfaultfd: {source}")]
    Register { gpa: u64, source: userfaultfd::Error },
    #[error("this kernel's userfaultfd lacks {0}")]
    Missing(&'static str),
    #[error("userfaultfd: {what} at guest address {gpa:#x}: {source}")]
    Ioctl { what: &'static str, gpa: u64, source: userfaultfd::Error },
    #[error("userfaultfd: reading fault events: {0}")]
    Read(userfaultfd::Error),
    #[error("a fault at host address {0:#x}, outside guest memory")]
    Outside(u64),
    #[error("cannot start the page handler thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("poll: {0}")]
    Poll(std::io::Error),
    /// What the source could not give (a damaged snapshot chunk, a read error, a lost source).
    #[error("{0}")]
    Source(String),
    /// The handler was told to stop while the source waited.
    #[error("stopped")]
    Stopped,
}

/// One region of guest memory: where it is for the guest and in this process.
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    host: u64,
    len: u64,
}

/// Guest memory registered with a userfaultfd, and the ioctls that fill it.
pub struct GuestUffd {
    uffd: Uffd,
    regions: Vec<Region>,
    /// Unregistered (done, or given up).
    released: AtomicBool,
}

// SAFETY: `Uffd` is a file descriptor; every method used here is an ioctl or read on it, which
// the kernel serialises. The regions are plain numbers.
unsafe impl Sync for GuestUffd {}

/// A userfaultfd not yet given any memory: made while the VMM may still open files (it opens
/// `/dev/userfaultfd`), used once the guest's memory exists.
pub struct NewUffd(Uffd);

impl NewUffd {
    /// Creates a userfaultfd (through `/dev/userfaultfd` if it exists, else the system call)
    /// that also catches KVM's and the kernel's accesses (not user mode only).
    pub fn create() -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        Ok(NewUffd(uffd))
    }
}

impl GuestUffd {
    /// Registers every region of `mem`, which must not have been touched yet, with `uffd` in
    /// MISSING mode.
    pub fn register(uffd: NewUffd, mem: &GuestMemoryMmap) -> Result<Self, UffdError> {
        let uffd = uffd.0;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let gpa = r.start_addr().raw_value();
            let host = mem.get_host_address(GuestAddress(gpa)).map_err(|_| UffdError::Outside(gpa))? as u64;
            let ioctls = uffd
                .register(host as *mut libc::c_void, r.len() as usize)
                .map_err(|source| UffdError::Register { gpa, source })?;
            for (flag, name) in [
                (IoctlFlags::COPY, "UFFDIO_COPY"),
                (IoctlFlags::ZEROPAGE, "UFFDIO_ZEROPAGE"),
                (IoctlFlags::WAKE, "UFFDIO_WAKE"),
            ] {
                if !ioctls.contains(flag) {
                    return Err(UffdError::Missing(name));
                }
            }
            regions.push(Region { gpa, host, len: r.len() });
        }
        Ok(GuestUffd { uffd, regions, released: AtomicBool::new(false) })
    }

    /// The host address of `gpa..gpa + len`, if it lies within one region.
    fn host(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|end| end <= r.gpa + r.len))
            .map(|r| r.host + (gpa - r.gpa))
    }

    /// The guest address of host address `host`.
    fn gpa(&self, host: u64) -> Option<u64> {
        self.regions.iter().find(|r| host >= r.host && host < r.host + r.len).map(|r| r.gpa + (host - r.host))
    }

    /// Total guest memory.
    pub fn len(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `data` (whole pages) at `gpa` and wakes the threads waiting for it. Pages already
    /// there are left as they are (`EEXIST`): returns how many pages were placed.
    pub fn copy(&self, gpa: u64, data: &[u8]) -> Result<u64, UffdError> {
        let len = data.len() as u64;
        let host = self.host(gpa, len).ok_or(UffdError::Outside(gpa))?;
        let mut done = 0u64;
        let mut placed = 0u64;
        while done < len {
            // SAFETY: the source is `data`, valid for `len - done` bytes from `done`; the
            // destination is registered guest memory of this process inside one region
            // (checked above). The kernel copies; nothing here aliases the pages.
            let r = unsafe {
                self.uffd.copy(
                    data.as_ptr().add(done as usize).cast(),
                    (host + done) as *mut libc::c_void,
                    (len - done) as usize,
                    true,
                )
            };
            match r {
                Ok(n) => {
                    done += n as u64;
                    placed += n as u64 / PAGE;
                }
                // Interrupted part way (the address space changed): go on from there.
                Err(userfaultfd::Error::PartiallyCopied(n)) => {
                    done += n as u64;
                    placed += n as u64 / PAGE;
                }
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    // A page of the range is there already; the copy stopped before it. Place
                    // the rest one page at a time, skipping those that exist.
                    placed += self.copy_pages(gpa + done, &data[done as usize..])?;
                    done = len;
                }
                Err(source) => return Err(UffdError::Ioctl { what: "UFFDIO_COPY", gpa: gpa + done, source }),
            }
        }
        Ok(placed)
    }

    fn copy_pages(&self, gpa: u64, data: &[u8]) -> Result<u64, UffdError> {
        let mut placed = 0;
        for (i, page) in data.chunks(PAGE as usize).enumerate() {
            let at = gpa + i as u64 * PAGE;
            let host = self.host(at, PAGE).ok_or(UffdError::Outside(at))?;
            // SAFETY: as in `copy`, for one page.
            let r = unsafe { self.uffd.copy(page.as_ptr().cast(), host as *mut libc::c_void, page.len(), true) };
            match r {
                Ok(_) => placed += 1,
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => self.wake(at, PAGE),
                Err(source) => return Err(UffdError::Ioctl { what: "UFFDIO_COPY", gpa: at, source }),
            }
        }
        Ok(placed)
    }

    /// Maps zero pages at `gpa..gpa + len` (pages already there stay) and wakes the waiters.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), UffdError> {
        let host = self.host(gpa, len).ok_or(UffdError::Outside(gpa))?;
        // SAFETY: registered guest memory of this process inside one region (checked above).
        match unsafe { self.uffd.zeropage(host as *mut libc::c_void, len as usize, true) } {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                // Some pages are there: zero the others one by one.
                for p in 0..len / PAGE {
                    let at = host + p * PAGE;
                    // SAFETY: as above, for one page.
                    match unsafe { self.uffd.zeropage(at as *mut libc::c_void, PAGE as usize, true) } {
                        Ok(_) => {}
                        Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                            self.wake(gpa + p * PAGE, PAGE)
                        }
                        Err(source) => {
                            return Err(UffdError::Ioctl { what: "UFFDIO_ZEROPAGE", gpa: gpa + p * PAGE, source });
                        }
                    }
                }
                Ok(())
            }
            Err(source) => Err(UffdError::Ioctl { what: "UFFDIO_ZEROPAGE", gpa, source }),
        }
    }

    /// Wakes threads waiting on `gpa..gpa + len` (whose pages are there already).
    pub fn wake(&self, gpa: u64, len: u64) {
        if let Some(host) = self.host(gpa, len)
            && let Err(e) = self.uffd.wake(host as *mut libc::c_void, len as usize)
        {
            log::debug!("UFFDIO_WAKE at {gpa:#x}: {e}");
        }
    }

    /// Unregisters all guest memory: missing pages are then ordinary zero-filled anonymous memory,
    /// and any thread still waiting is woken to find that.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host as *mut libc::c_void, r.len as usize) {
                log::warn!("unregistering guest memory at {:#x} from the userfaultfd: {e}", r.gpa);
            }
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.uffd.as_fd().as_raw_fd()
    }
}

/// How a fault was dealt with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The page is there now, loaded from the source (a fault counted, with its latency).
    Now,
    /// The page is there now without the source: it never held data (a zero page).
    Local,
}

/// What a source works with: the memory and the handler's stop event (a source that waits,
/// for a reconnection say, must give up when it fires: return [`UffdError::Stopped`]).
pub struct Ctx<'a> {
    pub uffd: &'a GuestUffd,
    pub stop: &'a EventFd,
}

/// Where missing pages come from.
pub trait PageSource: Send {
    /// The guest (or the VMM) touched missing page `gpa`: make it present, or ask for it.
    fn fault(&mut self, ctx: &Ctx, gpa: u64) -> Result<Served, UffdError>;
    /// No fault is waiting: load ahead a little. Returns whether there is more to load ahead.
    fn idle(&mut self, ctx: &Ctx) -> Result<bool, UffdError>;
    /// Whether every page that must come from the source is there: the handler then releases
    /// the memory and ends.
    fn done(&self) -> bool;
    /// A descriptor that becomes readable when the source has news for [`PageSource::idle`] or
    /// [`PageSource::done`] without a fault (post-copy's arrivals), if it has one.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
}

/// What the handler counts, for the API and `/metrics`.
#[derive(Debug, Default)]
pub struct UffdStats {
    /// Faults taken (demand loads).
    pub faults: AtomicU64,
    /// Pages placed by the source ahead of any fault or for a fault.
    pub pages_loaded: AtomicU64,
    /// Fault latencies in µs (the first [`MAX_SAMPLES`]).
    samples: Mutex<Vec<u32>>,
}

impl UffdStats {
    /// Records a fault's latency.
    pub fn record(&self, latency: Duration) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().expect("Poisoned lock");
        if s.len() < MAX_SAMPLES {
            s.push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }

    /// (median, 99th percentile) of the fault latencies in µs, if any fault was served.
    pub fn latency_us(&self) -> Option<(u64, u64)> {
        let mut s = self.samples.lock().expect("Poisoned lock").clone();
        percentiles(&mut s)
    }
}

/// Median and 99th percentile of `samples` (nearest rank).
pub fn percentiles(samples: &mut [u32]) -> Option<(u64, u64)> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let at = |p: f64| {
        let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        u64::from(samples[rank - 1])
    };
    Some((at(0.5), at(0.99)))
}

/// How the handler ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerEnd {
    /// Every page is there; the memory is plain anonymous memory now.
    Done,
    /// Stopped before that (the VM ended).
    Stopped,
    /// Failed: the message.
    Failed(String),
}

/// Called once when the handler fails, to end the VM.
pub type OnFatal = Box<dyn FnOnce(String) + Send>;

/// The handler thread and what it shares.
pub struct Handler {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<UffdStats>,
    end: Arc<(Mutex<Option<HandlerEnd>>, Condvar)>,
    started: Instant,
    /// When it ended, measured from its start.
    finished_after: Arc<Mutex<Option<Duration>>>,
}

impl Handler {
    /// Starts serving `uffd`'s faults from `source` on a thread named `name`.
    pub fn start(
        name: &str,
        kind: ThreadKind,
        uffd: Arc<GuestUffd>,
        source: Box<dyn PageSource>,
        stats: Arc<UffdStats>,
        on_fatal: OnFatal,
    ) -> Result<Handler, UffdError> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(UffdError::EventFd)?);
        let end = Arc::new((Mutex::new(None), Condvar::new()));
        let finished_after = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let (stop2, end2, stats2, fin2) = (stop.clone(), end.clone(), stats.clone(), finished_after.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let r = match crate::seccomp::apply(kind) {
                    Ok(()) => serve(&uffd, source, &stop2, &stats2),
                    Err(e) => Err(UffdError::Source(e.to_string())),
                };
                *fin2.lock().expect("Poisoned lock") = Some(started.elapsed());
                let outcome = match r {
                    Ok(true) => {
                        uffd.release();
                        HandlerEnd::Done
                    }
                    Ok(false) | Err(UffdError::Stopped) => HandlerEnd::Stopped,
                    Err(e) => HandlerEnd::Failed(e.to_string()),
                };
                {
                    let (lock, cv) = &*end2;
                    *lock.lock().expect("Poisoned lock") = Some(outcome.clone());
                    cv.notify_all();
                }
                if let HandlerEnd::Failed(msg) = outcome {
                    // The VMM reports it as the reason the VM ended.
                    on_fatal(msg.clone());
                    // The threads waiting for the missing pages stay stopped: the guest never
                    // runs on memory it should not see. If one of them is a VMM thread the VM
                    // cannot end cleanly, so end the process after a grace period.
                    let mut pfd = libc::pollfd { fd: stop2.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    let n = unsafe { libc::poll(&mut pfd, 1, FATAL_GRACE.as_millis() as i32) };
                    if n <= 0 {
                        eprintln!("vmm: error: {msg}");
                        // SAFETY: ends the process at once; nothing of it runs on.
                        unsafe { libc::_exit(1) };
                    }
                }
            })
            .map_err(UffdError::Thread)?;
        Ok(Handler { stop, thread: Some(thread), stats, end, started, finished_after })
    }

    /// How it ended, if it did.
    pub fn end(&self) -> Option<HandlerEnd> {
        self.end.0.lock().expect("Poisoned lock").clone()
    }

    /// Waits until it ends (every page there, stopped or failed), at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<HandlerEnd> {
        let (lock, cv) = &*self.end;
        let guard = lock.lock().expect("Poisoned lock");
        let (guard, _) = cv.wait_timeout_while(guard, timeout, |e| e.is_none()).expect("Poisoned lock");
        guard.clone()
    }

    /// Time from its start to its end, if it ended.
    pub fn finished_after(&self) -> Option<Duration> {
        *self.finished_after.lock().expect("Poisoned lock")
    }

    /// Time since it started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The handler's loop; `Ok(true)` when every page is there, `Ok(false)` when stopped.
fn serve(
    uffd: &GuestUffd,
    mut source: Box<dyn PageSource>,
    stop: &EventFd,
    stats: &UffdStats,
) -> Result<bool, UffdError> {
    let mut ahead = true;
    let ctx = Ctx { uffd, stop };
    loop {
        if source.done() {
            return Ok(true);
        }
        let mut fds = vec![
            libc::pollfd { fd: uffd.raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if let Some(fd) = source.wake_fd() {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        let timeout = if ahead { 0 } else { -1 };
        // SAFETY: `fds` is a valid array of pollfds of its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(UffdError::Poll(e));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            while let Some(event) = uffd.uffd.read_event().map_err(UffdError::Read)? {
                if let Event::Pagefault { addr, .. } = event {
                    let t = Instant::now();
                    let host = addr as u64 & !(PAGE - 1);
                    let gpa = uffd.gpa(host).ok_or(UffdError::Outside(host))?;
                    if source.fault(&ctx, gpa)? == Served::Now {
                        stats.record(t.elapsed());
                    }
                }
            }
            // Faults may have made the source want to load ahead again.
            ahead = true;
            continue;
        }
        if fds.get(2).is_some_and(|f| f.revents != 0) {
            ahead = true;
        }
        if ahead {
            ahead = source.idle(&ctx)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentiles(&mut []), None);
        assert_eq!(percentiles(&mut [7]), Some((7, 7)));
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), Some((50, 99)));
        let mut v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentiles(&mut v), Some((500, 990)));
    }
}
