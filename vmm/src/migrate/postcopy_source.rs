// SPDX-License-Identifier: Apache-2.0
//! The source's part of post-copy once the guest runs on the destination: the pages it still
//! lacks go over two connections (see `migration::postcopy`).
//!
//! - This thread pushes every missing page in address order on the main connection, from where
//!   the destination last faulted (what is near a fault is likely needed next), then
//!   `PostcopyEnd`.
//! - A server thread answers the destination's faults on the fault connection at once: the
//!   page asked for and the missing pages after it, ahead of everything queued on the main
//!   connection.
//!
//! A page is sent by whichever gets to it first (an atomic bit per page); the destination
//! places whatever arrives with `UFFDIO_COPY`, which leaves a page already there alone.
//!
//! The guest's memory now lives on two hosts, so the source never gives up: if a connection
//! breaks (or stalls past its bound), both are closed, the phase is `postcopy_paused`, and it
//! reconnects every half second until the destination answers; the destination then says which
//! pages it still lacks and the transfer goes on. It ends when the destination says
//! `PostcopyDone`.

use std::net::Shutdown;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use migration::memory::{BatchWriter, PAGE_SIZE};
use migration::postcopy::{ChannelHello, PageBitmap, PostcopyDone, decode_request};
use migration::protocol::{self, Command};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::MigrateError;
use crate::api::{MigrationInfo, MigrationPhase};
use crate::transport::{self, LinkConfig, MigrationStream, Security};
use crate::vstate::memory::GuestMemoryMmap;

/// Pages pushed per frame: small enough that the destination places pages steadily.
const PUSH_BATCH: usize = 1 << 20;
/// Pages sent with a requested one (those after it that are still missing).
const AROUND_FAULT: u64 = 16;
/// Wait between reconnection attempts.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);
/// How long the answer to `PostcopyResume` may take.
const RESUME_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the destination is and how to reach it: the migration's own address and security.
#[derive(Clone)]
pub struct Peer {
    pub to: String,
    /// The migration's route, sent first on every connection: a host agent's shared port hands
    /// the later connections to the VMM that took the first.
    pub route: Option<String>,
    pub security: Security,
    pub link: LinkConfig,
}

/// Connects to the destination for a post-copy connection and sends its first frame.
pub fn open_channel(peer: &Peer, first: Command, id: u64) -> Result<MigrationStream, MigrateError> {
    let mut s = transport::connect_routed(&peer.to, peer.route.as_deref(), &peer.security, &peer.link)?;
    protocol::write_json(&mut s, first, &ChannelHello { id })?;
    Ok(s)
}

/// Which pages are missing on the destination, and which were sent over the current connections.
struct Pages {
    /// (region start, words): pages the destination lacks.
    needed: Vec<(u64, Vec<u64>)>,
    sent: Vec<Vec<AtomicU64>>,
    /// Where the destination last faulted (the pusher goes on from there), and a change count.
    fault_at: AtomicU64,
    fault_seq: AtomicU64,
    /// A connection broke: both threads stop.
    broken: AtomicBool,
}

impl Pages {
    fn new(needed: &PageBitmap) -> Pages {
        let needed: Vec<(u64, Vec<u64>)> = needed.regions.iter().map(|(s, _, w)| (*s, w.clone())).collect();
        let sent = needed.iter().map(|(_, w)| w.iter().map(|_| AtomicU64::new(0)).collect()).collect();
        Pages {
            needed,
            sent,
            fault_at: AtomicU64::new(0),
            fault_seq: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        }
    }

    /// Takes page `page` of region `r` for sending if it is missing there and nobody sent it.
    fn take(&self, r: usize, page: usize) -> bool {
        let bit = 1u64 << (page % 64);
        let Some(w) = self.needed.get(r).and_then(|(_, w)| w.get(page / 64)) else { return false };
        if w & bit == 0 {
            return false;
        }
        self.sent[r][page / 64].fetch_or(bit, Ordering::SeqCst) & bit == 0
    }

    /// (region, page) of `gpa`.
    fn index(&self, gpa: u64) -> Option<(usize, usize)> {
        self.needed.iter().enumerate().find_map(|(i, (start, w))| {
            let pages = w.len() as u64 * 64;
            (gpa >= *start && gpa < start + pages * PAGE_SIZE as u64)
                .then(|| (i, ((gpa - start) / PAGE_SIZE as u64) as usize))
        })
    }

    fn gpa(&self, r: usize, page: usize) -> u64 {
        self.needed[r].0 + (page * PAGE_SIZE) as u64
    }
}

/// Adds guest page `gpa` to `batch` (a zero record if it is all zero).
fn push_page(mem: &GuestMemoryMmap, batch: &mut BatchWriter, gpa: u64) -> Result<(), MigrateError> {
    let slice = mem
        .get_slice(GuestAddress(gpa), PAGE_SIZE)
        .map_err(|e| MigrateError::Memory(format!("reading guest page {gpa:#x}: {e}")))?;
    if super::send::page_is_zero(&slice) {
        batch.push_zero(gpa);
    } else {
        let _ = batch.push_page_with(gpa, |dst| {
            slice.copy_to(dst);
            Ok::<(), std::convert::Infallible>(())
        });
    }
    Ok(())
}

/// What the transfer counts, shown in `GET /vm/migration`.
#[derive(Default)]
struct Counts {
    pushed: AtomicU64,
    requested: AtomicU64,
    requests: AtomicU64,
}

/// The transfer after the switch: pushes and serves pages until the destination has them all.
pub struct Transfer<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub layout: Vec<(u64, u64)>,
    pub needed: PageBitmap,
    pub fault: MigrationStream,
    pub peer: Peer,
    pub id: u64,
    pub progress: &'a Mutex<MigrationInfo>,
    /// Cap on the push rate, bytes per second (answers to faults are never held back).
    pub max_bandwidth: Option<u64>,
}

impl Transfer<'_> {
    /// Serves faults at once, then calls `switch` (which sends the machine's state and
    /// `Complete`: the destination faults on missing pages while it restores, before it
    /// answers) and pushes on the main connection `switch` returns (`None`: it broke; the
    /// transfer reconnects). Then runs until the destination has every page, reconnecting as
    /// long as it takes. An error from `switch` ends it (the guest never ran there).
    pub fn run(
        self,
        switch: impl FnOnce() -> Result<Option<MigrationStream>, MigrateError>,
    ) -> Result<PostcopyDone, MigrateError> {
        let Transfer { mem, layout, mut needed, mut fault, peer, id, progress, max_bandwidth } = self;
        let counts = Counts::default();
        let mut reconnects = 0;
        let mut switch = Some(switch);
        let mut main: Option<MigrationStream> = None;
        loop {
            let pages = Pages::new(&needed);
            let result = std::thread::scope(|scope| -> Result<Result<PostcopyDone, MigrateError>, MigrateError> {
                let fault_ctl = fault.tcp().try_clone();
                let stop_server = || {
                    pages.broken.store(true, Ordering::SeqCst);
                    if let Ok(f) = &fault_ctl {
                        let _ = f.shutdown(Shutdown::Both);
                    }
                };
                let server = std::thread::Builder::new()
                    .name("postcopy-server".into())
                    .spawn_scoped(scope, || serve_faults(&mut fault, mem, &pages, &counts, progress))
                    .map_err(|e| MigrateError::Other(format!("cannot start the post-copy server thread: {e}")))?;
                if let Some(sw) = switch.take() {
                    match sw() {
                        Ok(m) => main = m,
                        Err(e) => {
                            stop_server();
                            let _ = server.join();
                            return Err(e);
                        }
                    }
                }
                let pushed = match main.as_mut() {
                    Some(m) => push_all(m, mem, &pages, &counts, progress, max_bandwidth),
                    None => Err(MigrateError::Other("no main connection".into())),
                };
                if let Err(e) = &pushed {
                    log::warn!("post-copy: the main connection broke: {e}");
                    stop_server();
                }
                let served =
                    server.join().unwrap_or_else(|_| Err(MigrateError::Other("the server thread died".into())));
                if served.is_err()
                    && let Some(m) = &main
                {
                    let _ = m.tcp().shutdown(Shutdown::Both);
                }
                Ok(served)
            })?;
            match result {
                Ok(mut done) => {
                    done.reconnects = reconnects;
                    log::info!("post-copy: the destination has every page ({done:?})");
                    return Ok(done);
                }
                Err(e) => log::warn!("post-copy: the link to the destination broke: {e}; reconnecting"),
            }
            reconnects += 1;
            update(progress, |p| {
                p.phase = MigrationPhase::PostcopyPaused;
                if let Some(pc) = p.postcopy.as_mut() {
                    pc.reconnects = reconnects;
                }
            });
            let (m, f, missing) = reconnect(&peer, id, &layout);
            (main, fault, needed) = (Some(m), f, missing);
            log::info!("post-copy: reconnected; {} page(s) still missing on the destination", needed.count());
            update(progress, |p| p.phase = MigrationPhase::Postcopy);
        }
    }
}

fn update(progress: &Mutex<MigrationInfo>, f: impl FnOnce(&mut MigrationInfo)) {
    f(&mut progress.lock().expect("Poisoned lock"));
}

/// Reconnects until the destination takes both connections again; returns them and the pages
/// it still lacks.
fn reconnect(peer: &Peer, id: u64, layout: &[(u64, u64)]) -> (MigrationStream, MigrationStream, PageBitmap) {
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match try_reconnect(peer, id, layout) {
            Ok(r) => return r,
            Err(e) => {
                if attempt == 1 || attempt % 20 == 0 {
                    log::warn!("post-copy: reconnecting to {} (attempt {attempt}): {e}", peer.to);
                }
                std::thread::sleep(RECONNECT_EVERY);
            }
        }
    }
}

fn try_reconnect(
    peer: &Peer,
    id: u64,
    layout: &[(u64, u64)],
) -> Result<(MigrationStream, MigrationStream, PageBitmap), MigrateError> {
    let mut main = open_channel(peer, Command::PostcopyResume, id)?;
    main.tcp().set_read_timeout(Some(RESUME_TIMEOUT)).ok();
    let mut buf = Vec::new();
    match protocol::read_frame_into(&mut main, &mut buf)? {
        Command::PostcopyDirty => {}
        Command::Response => {
            let r: protocol::Response = protocol::parse_json("response", &buf)?;
            return Err(MigrateError::Refused(r.error.unwrap_or_default()));
        }
        other => return Err(MigrateError::Other(format!("expected PostcopyDirty, got {other:?}"))),
    }
    let missing = PageBitmap::decode(&buf, layout).map_err(|e| MigrateError::Other(e.to_string()))?;
    let fault = open_channel(peer, Command::PostcopyChannel, id)?;
    Ok((main, fault, missing))
}

/// Pushes every page still missing, from where the destination last faulted, then
/// `PostcopyEnd`.
fn push_all(
    main: &mut MigrationStream,
    mem: &GuestMemoryMmap,
    pages: &Pages,
    counts: &Counts,
    progress: &Mutex<MigrationInfo>,
    max_bandwidth: Option<u64>,
) -> Result<(), MigrateError> {
    let started = std::time::Instant::now();
    let mut sent_bytes = 0u64;
    let mut batch = BatchWriter::with_capacity(PUSH_BATCH + PAGE_SIZE + 64);
    let mut seen_seq = 0;
    // The scan: region, word; it wraps once around and then it is done.
    let total_words: usize = pages.needed.iter().map(|(_, w)| w.len()).sum();
    let mut pos = 0usize;
    let mut scanned = 0usize;
    let flat = |pos: usize| -> (usize, usize) {
        let mut p = pos;
        for (r, (_, w)) in pages.needed.iter().enumerate() {
            if p < w.len() {
                return (r, p);
            }
            p -= w.len();
        }
        (0, 0)
    };
    while scanned < total_words {
        if pages.broken.load(Ordering::SeqCst) {
            return Err(MigrateError::Other("the fault connection broke".into()));
        }
        let seq = pages.fault_seq.load(Ordering::SeqCst);
        if seq != seen_seq {
            seen_seq = seq;
            // Go on from the last fault: the guest works there now.
            if let Some((r, page)) = pages.index(pages.fault_at.load(Ordering::SeqCst)) {
                pos = pages.needed[..r].iter().map(|(_, w)| w.len()).sum::<usize>() + page / 64;
                scanned = 0;
            }
        }
        let (r, word) = flat(pos % total_words.max(1));
        let want = pages.needed[r].1[word] & !pages.sent[r][word].load(Ordering::SeqCst);
        let mut bits = want;
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let page = word * 64 + b;
            if pages.take(r, page) {
                push_page(mem, &mut batch, pages.gpa(r, page))?;
            }
        }
        pos += 1;
        scanned += 1;
        if batch.len() >= PUSH_BATCH || (scanned >= total_words && !batch.is_empty()) {
            let n = batch.data_pages + batch.zero_pages;
            let bytes = (batch.len() + protocol::HEADER_LEN) as u64;
            protocol::write_frame_with(main, main.integrity(), Command::Memory, batch.as_bytes())?;
            batch.clear();
            sent_bytes += bytes;
            if let Some(limit) = max_bandwidth {
                let due = Duration::from_secs_f64(sent_bytes as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let pushed = counts.pushed.fetch_add(n, Ordering::Relaxed) + n;
            update(progress, |p| {
                if let Some(pc) = p.postcopy.as_mut() {
                    pc.pages_pushed = pushed;
                }
                p.bytes_sent += bytes;
                p.pages_sent += n;
            });
        }
    }
    protocol::write_frame(main, Command::PostcopyEnd, &[])?;
    log::debug!("post-copy: every page pushed");
    Ok(())
}

/// Answers the destination's faults until it says it has every page.
fn serve_faults(
    fault: &mut MigrationStream,
    mem: &GuestMemoryMmap,
    pages: &Pages,
    counts: &Counts,
    progress: &Mutex<MigrationInfo>,
) -> Result<PostcopyDone, MigrateError> {
    crate::seccomp::apply(crate::seccomp::ThreadKind::PostcopyServer)
        .map_err(|e| MigrateError::Other(e.to_string()))?;
    // Faults come when they come: an idle fault connection is no broken one (the stall bound
    // notices a dead link).
    fault.tcp().set_read_timeout(None).ok();
    let mut buf = Vec::new();
    let mut batch = BatchWriter::with_capacity((AROUND_FAULT as usize + 1) * (PAGE_SIZE + 16));
    loop {
        if pages.broken.load(Ordering::SeqCst) {
            return Err(MigrateError::Other("the main connection broke".into()));
        }
        match protocol::read_frame_into_with(fault, fault.integrity(), &mut buf)? {
            Command::PageRequest => {
                let gpa = decode_request(&buf).map_err(|e| MigrateError::Other(e.to_string()))?;
                let Some((r, page)) = pages.index(gpa) else {
                    return Err(MigrateError::Other(format!("the destination asked for {gpa:#x}, outside memory")));
                };
                pages.fault_at.store(gpa, Ordering::SeqCst);
                pages.fault_seq.fetch_add(1, Ordering::SeqCst);
                // The page itself, even if it was pushed (it may still be on its way), and the
                // missing pages after it.
                pages.take(r, page);
                batch.clear();
                push_page(mem, &mut batch, gpa)?;
                let words = pages.needed[r].1.len() * 64;
                for next in (page + 1..words).take(AROUND_FAULT as usize) {
                    if pages.take(r, next) {
                        push_page(mem, &mut batch, pages.gpa(r, next))?;
                    }
                }
                let n = batch.data_pages + batch.zero_pages;
                let bytes = (batch.len() + protocol::HEADER_LEN) as u64;
                protocol::write_frame_with(fault, fault.integrity(), Command::Memory, batch.as_bytes())?;
                let requests = counts.requests.fetch_add(1, Ordering::Relaxed) + 1;
                let requested = counts.requested.fetch_add(n, Ordering::Relaxed) + n;
                update(progress, |p| {
                    if let Some(pc) = p.postcopy.as_mut() {
                        pc.requests = requests;
                        pc.pages_requested = requested;
                    }
                    p.bytes_sent += bytes;
                    p.pages_sent += n;
                });
            }
            Command::PostcopyDone => return Ok(protocol::parse_json("PostcopyDone", &buf)?),
            other => return Err(MigrateError::Other(format!("unexpected {other:?} on the fault connection"))),
        }
    }
}
