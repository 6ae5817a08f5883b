// SPDX-License-Identifier: Apache-2.0
//! The source side of a live migration, run on a thread of its own while the VMM thread keeps
//! serving devices and the API.
//!
//! Pre-copy: round 1 sends every page the guest ever touched; each later round sends the pages
//! dirtied meanwhile (KVM's log ORed with the VMM's own writes; round 1 skips the pages dirtied
//! again before their turn, see [`dirty::Peeked`]) until what is left could be sent
//! within the downtime target at the bandwidth just measured, or the round limit is reached.
//! When rounds stop shrinking, vCPUs are throttled (QEMU's auto-converge) so the guest dirties
//! memory more slowly than it is copied; a migration that may switch to post-copy switches
//! instead (`switch.rs`), after `precopy_rounds` or once the rounds stall. Then the guest and
//! its devices are paused, the last pages and all state go over, and `Complete` hands the guest
//! to the destination.
//!
//! Failure is safe: any error before `Complete` resumes the guest here. After `Complete`, only
//! an explicit refusal from the destination does; if the answer never comes the guest stays
//! paused here, because it may already be running there (never two live copies). When the
//! destination committed the migration with its cluster at `Prepare`, the commit point is that
//! answer: from then on no failure resumes the guest here; the cluster hands it back (and the
//! host agent resumes it through the API) if the destination never ran it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::STATE_VERSION;
use migration::memory::{BatchWriter, PAGE_SIZE, count, or_into, set_bits};
use migration::protocol::{self, Command, RegionLayout, StartPayload};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice};

use super::dirty::{self, Bitmap};
use super::disks::{self, DiskCopier};
use super::params::MigrateParams;
use super::postcopy_source;
use super::{MachineState, MigrateError, pause_devices, save_devices, save_disks, save_vm_state};
use crate::api::{MigrationInfo, MigrationMode, MigrationPhase, RoundInfo};
use crate::builder::Machine;
use crate::transport::{self, MigrationStream, Security};
use crate::vstate::vcpu::{THROTTLE_TICK, VcpuSet};

mod fail;
mod switch;

/// A memory frame is sent once its batch is this large. Small enough that the batch is still in
/// the CPU's cache when it is encrypted or sent (and, at the destination, when it is applied):
/// 1 MiB batches cost about a fifth less CPU per byte than 8 MiB ones, with TLS and without
/// (`vmm-bench --only transport`).
const BATCH_BYTES: usize = 1 << 20;
/// How many pages a round visits between two reads of the dirty log (32 MiB): often enough
/// that a guest rewriting its working set is caught before most of it is sent twice, rarely
/// enough that the reads (and the write faults each costs the guest) stay few.
const PEEK_PAGES: usize = 8192;
/// Time the stop-and-copy phase needs besides pages (state, restore, acknowledgement).
const FIXED_DOWNTIME: Duration = Duration::from_millis(5);
/// Under the downtime limit, pre-copy goes on while each round still shrinks the dirty set by
/// at least a quarter and what is left would take longer than this to send with the guest
/// paused: the limit is what a user tolerates, not a target to fill. (Requiring the set to
/// halve stopped too early for guests dirtying at about half the copy bandwidth: 15-20 ms
/// downtime where two or three more short rounds bring it to 1-2 ms.)
const WORTH_ANOTHER_ROUND: Duration = Duration::from_millis(1);
/// Throttle steps, as QEMU's auto-converge (initial 20 %, +10 % per stalled round).
const THROTTLE_INITIAL: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 90;

/// How a migration ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the guest.
    Completed,
    /// It failed before the commit point; the guest runs on here.
    Failed(String),
    /// It failed after the commit point without an answer: the guest may be running on the
    /// destination, so it stays paused here.
    InDoubt(String),
}

struct Source<'a> {
    m: &'a Machine,
    vcpus: &'a Mutex<VcpuSet>,
    progress: &'a Mutex<MigrationInfo>,
    params: MigrateParams,
    stream: Option<MigrationStream>,
    batch: BatchWriter,
    started: Instant,
    bytes_sent: u64,
    paused: bool,
    /// The vCPUs' states are being read and must be collected before anything else is asked.
    states_pending: bool,
    complete_sent: bool,
    /// The destination's cluster recorded it as the owner (its answer to `Prepare`).
    committed: bool,
    throttling: Arc<AtomicBool>,
    /// The copied disks (see [`super::disks`]).
    disks: DiskCopier,
    /// This migration's id, if it may switch to post-copy, and its fault connection (opened
    /// at set-up, so that its handshake is not part of the pause).
    postcopy_id: Option<u64>,
    fault: Option<MigrationStream>,
    /// The dirty log read during the current round (see [`dirty::Peeked`]).
    peeked: dirty::Peeked,
}

/// Whether a round reads the dirty log as it goes (see [`dirty::Peeked`]). Only round 1 does:
/// it is by far the longest (every page ever touched), so a working set is rewritten during it
/// many times over, while a later round is short. Each read write-protects the pages again, so
/// a page rewritten throughout a round faults once per read instead of once per round; on a slow
/// link (a nested, emulated host) that would multiply the guest's faults in every round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peek {
    Yes,
    No,
}

/// How pre-copy ended.
enum Switch {
    /// Stop and copy what is left (the dirty set the last round left).
    StopAndCopy(Vec<Bitmap>),
    /// Move the guest now; the dirty set follows by post-copy.
    Postcopy(Vec<Bitmap>),
}

/// Migrates `m` to `params.to`, reporting progress as it goes.
pub fn migrate(m: &Machine, vcpus: &Mutex<VcpuSet>, params: MigrateParams, progress: &Mutex<MigrationInfo>) -> Outcome {
    {
        let mut p = progress.lock().expect("Poisoned lock");
        *p = MigrationInfo {
            phase: MigrationPhase::Setup,
            destination: Some(params.to.clone()),
            mode: params.mode,
            encrypted: matches!(params.security, Security::Tls(_)),
            ..Default::default()
        };
    }
    let mut src = Source {
        m,
        vcpus,
        progress,
        params,
        stream: None,
        batch: BatchWriter::with_capacity(BATCH_BYTES + PAGE_SIZE + 64),
        started: Instant::now(),
        bytes_sent: 0,
        paused: false,
        states_pending: false,
        complete_sent: false,
        committed: false,
        throttling: Arc::new(AtomicBool::new(false)),
        disks: DiskCopier::new(m),
        postcopy_id: None,
        fault: None,
        peeked: dirty::Peeked::default(),
    };
    let result = std::thread::scope(|scope| {
        // The auto-converge ticker: while throttling, kick the vCPUs every tick so each sleeps
        // its share (see the vCPU loop).
        let ticking = src.throttling.clone();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let ticker = scope.spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::MigrationTicker);
            while !done2.load(Ordering::Relaxed) {
                // Parked rather than asleep, so the end of the migration wakes it at once
                // instead of waiting out a tick before the scope can end.
                std::thread::park_timeout(THROTTLE_TICK);
                if ticking.load(Ordering::Relaxed) {
                    vcpus.lock().expect("Poisoned lock").kick_all();
                }
            }
        });
        let r = src.run();
        src.set_throttle(0);
        done.store(true, Ordering::Relaxed);
        ticker.thread().unpark();
        r
    });
    let outcome = match result {
        Ok(downtime_dest) => {
            src.update(|p| {
                p.phase = MigrationPhase::Completed;
                p.downtime_destination_ms = downtime_dest.map(|us| us / 1000);
            });
            Outcome::Completed
        }
        Err(e) => src.fail(e),
    };
    let total = src.started.elapsed();
    src.update(|p| {
        p.total_ms = total.as_millis() as u64;
        p.total_us = total.as_micros() as u64;
    });
    outcome
}

impl Source<'_> {
    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.progress.lock().expect("Poisoned lock"));
    }

    fn stream(&mut self) -> Result<&mut MigrationStream, MigrateError> {
        self.stream.as_mut().ok_or_else(|| MigrateError::Other("not connected".into()))
    }

    fn set_throttle(&self, pct: u32) {
        self.m.vcpu_shared.throttle_pct.store(pct, Ordering::Relaxed);
        self.throttling.store(pct > 0, Ordering::Relaxed);
    }

    /// The whole migration; returns the destination's downtime in µs.
    fn run(&mut self) -> Result<Option<u64>, MigrateError> {
        self.setup()?;
        match self.precopy()? {
            Switch::StopAndCopy(carried) => self.stop_and_copy(carried),
            Switch::Postcopy(carried) => self.postcopy(carried),
        }
    }

    fn setup(&mut self) -> Result<(), MigrateError> {
        let stream = transport::connect_routed(
            &self.params.to,
            self.params.route.as_deref(),
            &self.params.security,
            &self.params.link,
        )?;
        log::info!("migration: connected to {}", stream.describe_peer());
        self.stream = Some(stream);
        if self.params.mode != MigrationMode::Precopy {
            // The id proves a later connection belongs to this migration: unguessable.
            let mut id = [0u8; 8];
            // SAFETY: getrandom writes at most `id.len()` bytes into the local buffer.
            let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
            if n != id.len() as isize {
                let e = std::io::Error::last_os_error();
                return Err(MigrateError::Other(format!("no random id for post-copy: {e}")));
            }
            self.postcopy_id = Some(u64::from_le_bytes(id));
        }

        let vm = &self.m.vm;
        let memory =
            vm.memory().iter().map(|r| RegionLayout { start: r.start_addr().raw_value(), size: r.len() }).collect();
        let start = StartPayload {
            state_version: STATE_VERSION,
            config: serde_json::to_value(&self.m.config).map_err(|e| MigrateError::Other(e.to_string()))?,
            memory,
            cpuid: self.m.cpuid.lock().expect("Poisoned lock").clone(),
            tsc_khz: None,
            disks: disks::layouts(self.m),
            postcopy_id: self.postcopy_id,
        };
        log::debug!("migration: connected, sending Start");
        protocol::write_json(self.stream()?, Command::Start, &start)?;
        let answer = protocol::read_response(self.stream()?)?;
        log::debug!("migration: Start accepted");
        if !answer.ok {
            return Err(MigrateError::Refused(answer.error.unwrap_or_else(|| "no reason given".into())));
        }
        if let Some(id) = self.postcopy_id {
            self.fault = Some(postcopy_source::open_channel(&self.peer(), Command::PostcopyChannel, id)?);
        }
        Ok(())
    }

    /// The destination, for post-copy's later connections.
    fn peer(&self) -> postcopy_source::Peer {
        postcopy_source::Peer {
            to: self.params.to.clone(),
            route: self.params.route.clone(),
            security: self.params.security.clone(),
            link: self.params.link,
        }
    }

    /// Pre-copy rounds; returns how they ended, with the dirty set the last round left unsent.
    fn precopy(&mut self) -> Result<Switch, MigrateError> {
        let vm = &self.m.vm;
        dirty::start(vm)?;
        self.disks.start_tracking();
        log::debug!("migration: dirty logging on");
        self.update(|p| {
            p.phase = MigrationPhase::Precopy;
            p.round = 1;
        });
        // Round 1: everything ever touched. Read residency only now that logging is on, so a
        // page first touched after this is in the next dirty set.
        let touched = dirty::touched(vm);
        log::debug!("migration: residency read");
        let total_pages: u64 = vm.memory().iter().map(|r| r.len() / PAGE_SIZE as u64).sum();
        let untouched = total_pages - count_all(&touched);
        self.update(|p| p.pages_skipped += untouched);
        let mut round_start = Instant::now();
        let mut round_bytes = self.bytes_sent;
        let postcopy = self.params.mode == MigrationMode::Postcopy;
        if postcopy && self.params.precopy_rounds == 0 {
            // Post-copy at once: every page ever touched is left for after the switch. Copied
            // disks still send their allocated extents first, with the guest running here: only
            // the blocks dirtied meanwhile go in the pause.
            self.disk_round(true)?;
            // The switch is the first round.
            self.update(|p| p.round = 0);
            return Ok(Switch::Postcopy(touched));
        }
        self.record_round(1, count_all(&touched), false);
        // The disks' allocated extents first, then memory.
        self.disk_round(true)?;
        self.send_bitmaps(&touched, Peek::Yes)?;
        let mut prev_dirty = count_all(&touched);
        let mut round = 1;
        loop {
            let elapsed = round_start.elapsed().max(Duration::from_micros(100));
            let sent = self.bytes_sent - round_bytes;
            // At least 100 MB/s assumed: a round of nothing measures nothing.
            let bandwidth = (sent as f64 / elapsed.as_secs_f64()).max(100e6);
            log::debug!("migration: round {round} sent");
            let dirty = self.peeked.collect(vm)?;
            // Dirty disk blocks converge together with pages (a block is a page's size).
            let n = count_all(&dirty) + self.disks.dirty_blocks();
            log::debug!("migration: round {round} left {n} dirty pages");
            let pages_time = Duration::from_secs_f64(n as f64 * PAGE_SIZE as f64 / bandwidth);
            let estimate = pages_time + FIXED_DOWNTIME;
            self.update(|p| {
                p.dirty_rate_pages_s = (n as f64 / elapsed.as_secs_f64()) as u64;
                p.bandwidth_bytes_s = bandwidth as u64;
                p.estimated_downtime_ms = estimate.as_millis() as u64;
                p.eta_ms = estimate.as_millis() as u64;
            });
            let converging = n * 4 <= prev_dirty * 3 && pages_time > WORTH_ANOTHER_ROUND;
            if postcopy && round >= self.params.precopy_rounds {
                // Post-copy after the rounds asked for, whatever is left.
                return Ok(Switch::Postcopy(dirty));
            }
            if (estimate <= self.params.downtime && !converging) || round >= self.params.max_rounds {
                return Ok(Switch::StopAndCopy(dirty));
            }
            // Not shrinking by at least a tenth: the guest dirties as fast as we copy.
            if round >= 2 && n * 10 >= prev_dirty * 9 && self.params.mode == MigrationMode::PostcopyAuto {
                log::info!("migration: round {round} left {n} dirty pages; switching to post-copy");
                return Ok(Switch::Postcopy(dirty));
            }
            // Post-copy's guest is not slowed down: it moves after the rounds asked for.
            if round >= 2 && n * 10 >= prev_dirty * 9 && !postcopy {
                let pct = match self.m.vcpu_shared.throttle_pct.load(Ordering::Relaxed) {
                    0 => THROTTLE_INITIAL,
                    p => (p + THROTTLE_STEP).min(THROTTLE_MAX),
                };
                log::info!("migration: round {round} left {n} dirty pages; throttling vCPUs to {pct}%");
                self.set_throttle(pct);
            }
            self.guest_still_runs()?;
            prev_dirty = n;
            round += 1;
            self.update(|p| p.round = round);
            round_start = Instant::now();
            round_bytes = self.bytes_sent;
            self.record_round(round, n, false);
            self.disk_round(false)?;
            self.send_bitmaps(&dirty, Peek::No)?;
        }
    }

    /// `Prepare`: the destination finishes setting up (and, under a host agent, commits the
    /// move) before the guest pauses here. From a committed answer on, the guest is not ours.
    fn prepare(&mut self) -> Result<(), MigrateError> {
        protocol::write_frame(self.stream()?, Command::Prepare, &[])?;
        let answer = protocol::read_response(self.stream()?)?;
        if !answer.ok {
            return Err(MigrateError::Refused(answer.error.unwrap_or_else(|| "no reason given".into())));
        }
        if answer.committed {
            log::info!("migration: the destination's cluster committed the move; the guest is no longer ours");
            self.committed = true;
        }
        Ok(())
    }

    /// Fails the migration if the guest is done meanwhile (it powered off or panicked, or a
    /// vCPU stopped for good: a triple fault, which KVM on AMD answers by resetting the vCPU):
    /// sent anyway, its state would run on the destination as if nothing happened, or start the
    /// guest over, while this host ends it.
    fn guest_still_runs(&self) -> Result<(), MigrateError> {
        match self.m.guest_stopped() {
            Some(why) => Err(MigrateError::GuestStopped(why)),
            None => Ok(()),
        }
    }

    fn stop_and_copy(&mut self, carried: Vec<Bitmap>) -> Result<Option<u64>, MigrateError> {
        let vm = &self.m.vm;
        // The destination finishes setting up before the guest pauses, not after.
        self.prepare()?;
        let paused_at = Instant::now();
        log::debug!("stop-and-copy: pausing");
        let step =
            |what: &str| log::debug!("stop-and-copy: {what} ({} µs after pausing)", paused_at.elapsed().as_micros());
        // The vCPUs read their state while this thread collects and sends the last pages.
        self.vcpus.lock().expect("Poisoned lock").pause_and_save().map_err(MigrateError::Vcpus)?;
        self.paused = true;
        self.states_pending = true;
        let paused_at_us = protocol::unix_now_us();
        self.update(|p| p.paused_at_us = Some(paused_at_us));
        step("vCPUs paused");
        self.update(|p| p.phase = MigrationPhase::StopAndCopy);
        protocol::write_frame(self.stream()?, Command::Paused, &[])?;
        crate::fault::point("source:paused");
        pause_devices(self.m);
        self.set_throttle(0);
        // What the last round left, and what changed since (including the devices' last writes).
        let mut last = carried;
        for (a, b) in last.iter_mut().zip(self.peeked.collect(vm)?) {
            or_into(a, &b);
        }
        step("dirty log collected");
        let round = self.progress.lock().expect("Poisoned lock").round + 1;
        self.record_round(round, count_all(&last), true);
        self.send_bitmaps(&last, Peek::No)?;
        // The disks are drained (paused): their last blocks, and shared ones made durable.
        self.disk_round(false)?;
        disks::flush_shared(self.m)?;
        step("last pages and blocks sent");
        self.states_pending = false;
        let vcpus = self.vcpus.lock().expect("Poisoned lock").saved_states().map_err(MigrateError::Vcpus)?;
        // Paused now, so no vCPU can stop after this look.
        self.guest_still_runs()?;
        step("vCPUs saved");
        let (serial, nets) = save_devices(self.m);
        let disks = save_disks(self.m);
        let state = MachineState { version: STATE_VERSION, vm: save_vm_state(vm)?, vcpus, serial, nets, disks };
        step("devices saved");
        protocol::write_json(self.stream()?, Command::State, &state)?;
        protocol::write_frame(self.stream()?, Command::Complete, &[])?;
        self.complete_sent = true;
        step("state sent");
        crate::fault::point("source:complete");
        let answer = protocol::read_response(self.stream()?)?;
        step("acknowledged");
        if !answer.ok {
            return Err(MigrateError::Refused(answer.error.unwrap_or_else(|| "no reason given".into())));
        }
        let downtime = paused_at.elapsed();
        self.update(|p| {
            p.downtime_ms = Some(downtime.as_millis() as u64);
            p.downtime_us = Some(downtime.as_micros() as u64);
            p.resumed_at_us = answer.resumed_at_us;
        });
        log::info!(
            "migration: completed in {} ms, {} bytes, downtime {} ms (destination: {:?} µs)",
            self.started.elapsed().as_millis(),
            self.bytes_sent,
            downtime.as_millis(),
            answer.downtime_us
        );
        Ok(answer.downtime_us)
    }

    /// Notes the start of a copy round in the progress report.
    fn record_round(&mut self, round: u32, pages: u64, stop_and_copy: bool) {
        let info = RoundInfo {
            round,
            started_us: self.started.elapsed().as_micros() as u64,
            pages,
            bytes_before: self.bytes_sent,
            cpu_us: thread_cpu_us(),
            stop_and_copy,
        };
        self.update(|p| p.rounds.push(info));
    }

    /// Sends the copied disks' allocated extents (`first`) or the blocks written since the
    /// last round, as `Disk` frames.
    fn disk_round(&mut self, first: bool) -> Result<(), MigrateError> {
        let mut copier = std::mem::take(&mut self.disks);
        let mut send = |payload: &[u8]| self.send_frame(Command::Disk, payload);
        let r = if first { copier.send_extents(&mut send) } else { copier.send_dirty(&mut send) };
        let bytes = copier.bytes;
        self.disks = copier;
        self.update(|p| p.disk_bytes_sent = bytes);
        r
    }

    /// Sends one frame of copied data, counting it and keeping to the bandwidth limit.
    fn send_frame(&mut self, command: Command, payload: &[u8]) -> Result<(), MigrateError> {
        let stream = self.stream.as_mut().ok_or_else(|| MigrateError::Other("not connected".into()))?;
        protocol::write_frame_with(stream, stream.integrity(), command, payload)?;
        self.bytes_sent += (payload.len() + protocol::HEADER_LEN) as u64;
        let bytes = self.bytes_sent;
        self.update(|p| p.bytes_sent = bytes);
        self.keep_to_bandwidth();
        Ok(())
    }

    fn keep_to_bandwidth(&self) {
        if let Some(limit) = self.params.max_bandwidth {
            let due = Duration::from_secs_f64(self.bytes_sent as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Sends the pages set in `maps` (one bitmap per memory region). With [`Peek::Yes`], while
    /// the guest runs, the dirty log is read every [`PEEK_PAGES`] pages and the pages dirtied
    /// again meanwhile are left for the next round; once it is paused, every page goes.
    fn send_bitmaps(&mut self, maps: &[Bitmap], peek: Peek) -> Result<(), MigrateError> {
        let mem = self.m.vm.memory().clone();
        let peeking = peek == Peek::Yes && !self.paused;
        let (mut since_peek, mut skipped) = (0usize, 0u64);
        for (index, (region, map)) in mem.iter().zip(maps).enumerate() {
            let base = region.start_addr().raw_value();
            for page in set_bits(map) {
                if peeking {
                    since_peek += 1;
                    if since_peek >= PEEK_PAGES {
                        self.peeked.peek(&self.m.vm)?;
                        since_peek = 0;
                    }
                    if self.peeked.contains(index, page) {
                        skipped += 1;
                        continue;
                    }
                }
                let offset = (page * PAGE_SIZE) as u64;
                let gpa = base + offset;
                let slice = region
                    .get_slice(MemoryRegionAddress(offset), PAGE_SIZE)
                    .map_err(|e| MigrateError::Memory(format!("reading guest page {gpa:#x}: {e}")))?;
                // Touched pages are often still zero (guests zero what they allocate): those
                // are looked at in place and never copied.
                if page_is_zero(&slice) {
                    self.batch.push_zero(gpa);
                } else {
                    let _ = self.batch.push_page_with(gpa, |dst| {
                        slice.copy_to(dst);
                        Ok::<(), std::convert::Infallible>(())
                    });
                }
                if self.batch.len() >= BATCH_BYTES {
                    self.flush()?;
                }
            }
        }
        if skipped > 0 {
            log::debug!("migration: {skipped} pages dirtied again before their turn, left for the next round");
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), MigrateError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let (data, zero) = (self.batch.data_pages, self.batch.zero_pages);
        let len = self.batch.len() as u64;
        let stream = self.stream.as_mut().ok_or_else(|| MigrateError::Other("not connected".into()))?;
        protocol::write_frame_with(stream, stream.integrity(), Command::Memory, self.batch.as_bytes())?;
        log::trace!("sent Memory {} bytes", self.batch.len());
        self.batch.clear();
        self.bytes_sent += len + protocol::HEADER_LEN as u64;
        let bytes = self.bytes_sent;
        self.update(|p| {
            p.bytes_sent = bytes;
            p.pages_sent += data;
            p.pages_skipped += zero;
        });
        self.keep_to_bandwidth();
        Ok(())
    }
}

/// Whether a guest page is all zero, read in place a cache line at a time (raw copies, the way
/// vm-memory reads guest memory the guest may be writing), stopping at the first non-zero line.
pub(super) fn page_is_zero<B: vm_memory::bitmap::BitmapSlice>(page: &VolatileSlice<'_, B>) -> bool {
    const LINE: usize = 64;
    if page.len() != PAGE_SIZE {
        return false;
    }
    let guard = page.ptr_guard();
    let base = guard.as_ptr();
    (0..PAGE_SIZE / LINE).all(|i| {
        let mut line = [0u64; LINE / 8];
        // SAFETY: `base` points at PAGE_SIZE bytes of mapped guest memory (checked above), kept
        // mapped by `guard`; the destination is a local array of LINE bytes.
        unsafe { std::ptr::copy_nonoverlapping(base.add(i * LINE), line.as_mut_ptr().cast::<u8>(), LINE) };
        line.iter().fold(0, |acc, w| acc | w) == 0
    })
}

fn count_all(maps: &[Bitmap]) -> u64 {
    maps.iter().map(|m| count(m)).sum()
}

/// CPU time (user and system) the calling thread has used, in µs; 0 if the clock cannot be read.
fn thread_cpu_us() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests;
