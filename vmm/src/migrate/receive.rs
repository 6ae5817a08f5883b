// SPDX-License-Identifier: Apache-2.0
//! The destination side of a live migration: `vmm run --incoming ADDR:PORT`, or
//! `vmm run --incoming-fd N` on a socket a host agent hands over (then usually with a commit
//! hook: see [`super::hook`]).
//!
//! One connection is accepted, and only one: the listener closes as soon as it is taken, unless
//! the source offers post-copy (then later connections of the same migration, and only those,
//! are taken on it: see [`crate::uffd::remote`]). The
//! source's `Start` is checked (versions, memory, CPU features, NICs) before anything else
//! happens, so an incompatible source hears "no" while its guest still runs undisturbed. Memory
//! batches are applied as they come, each run of data pages mapped in with one call before it
//! is copied (see [`super::apply`]). Pages the source sends as zero are not written (fresh memory
//! is zero), so they take no memory here until the guest touches them: populating them ahead
//! cost more CPU than the page faults it saved. `Prepare` is answered once everything
//! here is set up. On `Complete` the machine is restored, its vCPUs start, and the answer
//! carries the pause as measured here. Anything unexpected ends the process with a clear error;
//! the source then resumes its guest.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use migration::protocol::{self, Command, Response, StartPayload};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

pub use super::apply::{Written, apply_batch};
use super::disks::DiskSink;
use super::hook::CommitHook;
use super::{MachineState, MigrateError, check_cpuid};
use crate::arch::layout::ram_regions;
use crate::builder::{BuiltVm, build_vm_for_incoming};
use crate::config::VmConfig;
use crate::disk_config::DiskConfig;
use crate::host::HostResources;
use crate::net_config::NetConfig;
use crate::transport::{self, IncomingSocket, LinkConfig, MigrationListener, MigrationStream, Security};
use crate::uffd::remote;
use migration::postcopy::PageBitmap;
use std::sync::Arc;

/// Where a destination's migration comes from.
#[derive(Debug)]
pub enum IncomingFrom {
    /// `--incoming ADDR:PORT`, bound before the VMM was sandboxed (see [`listen`]).
    Listener(TcpListener),
    /// Listen on this ADDR:PORT now.
    Addr(String),
    /// `--incoming-fd N`: an inherited socket, listening or already connected; with a
    /// connection, `conns` (`--incoming-conns-fd M`) is an inherited unix socket on which the
    /// host agent that accepted it hands over the migration's later connections (post-copy's).
    Fd { fd: RawFd, conns: Option<RawFd> },
}

/// How a destination takes its migration.
#[derive(Debug)]
pub struct IncomingConfig {
    pub from: IncomingFrom,
    pub security: Security,
    pub link: LinkConfig,
    /// Who must commit the migration before `Prepare` is answered (`--commit-hook-fd`).
    pub hook: Option<CommitHook>,
}

/// A received, restored machine whose vCPUs are ready to start, and the connection on which
/// the source waits for the answer.
pub struct Incoming {
    pub built: BuiltVm,
    pub answer: Acknowledger,
    /// The copied disks' new files: removed unless committed once the guest runs here.
    pub disks: DiskSink,
    /// The receive buffer: freeing megabytes of touched memory takes a while, so it is dropped
    /// only once the guest runs and the source knows.
    pub scratch: Vec<u8>,
    /// The commit hook, told when the guest is about to run and when it runs.
    pub hook: Option<CommitHook>,
    /// A migration that switched to post-copy: the pages still to come, and the guest's
    /// control for when the link breaks.
    pub postcopy: Option<Postcopy>,
}

/// Post-copy's destination once the guest may run: the pages still to come, and the guest's
/// control for when the link breaks.
pub type Postcopy = (Arc<remote::Shared>, Arc<remote::GuestControl>);

/// What a post-copy switch set up before `Complete`.
struct Switched {
    needed: PageBitmap,
    fault: MigrationStream,
    id: u64,
}

/// Tells the source how the migration ended.
pub struct Acknowledger {
    stream: MigrationStream,
    /// When the source said it paused the guest.
    paused_at: Option<Instant>,
}

impl Acknowledger {
    /// The guest runs here now (call once the vCPUs run; `resumed_at_us` is when they started,
    /// see [`protocol::unix_now_us`]); returns the pause measured here, and the connection
    /// (post-copy's pages come on it).
    pub fn acknowledge(mut self, resumed_at_us: u64) -> Result<(Option<Duration>, MigrationStream), MigrateError> {
        let downtime = self.paused_at.map(|t| t.elapsed());
        let downtime_us = downtime.map(|d| d.as_micros() as u64);
        let answer = Response { downtime_us, resumed_at_us: Some(resumed_at_us), ..Response::ok() };
        protocol::write_json(&mut self.stream, Command::Response, &answer)?;
        Ok((downtime, self.stream))
    }

    /// Starting the restored guest failed: the source must take it back.
    pub fn refuse(mut self, why: &str) {
        let _ = protocol::write_json(&mut self.stream, Command::Response, &Response::error(why));
    }
}

/// Listens on `listen` (ADDR:PORT) for a migration: done before the VMM is sandboxed.
pub fn listen(listen: &str) -> Result<TcpListener, MigrateError> {
    let addr: SocketAddr =
        listen.parse().map_err(|e| MigrateError::Other(format!("--incoming '{listen}': not an ADDR:PORT ({e})")))?;
    TcpListener::bind(addr).map_err(|e| MigrateError::Other(format!("cannot listen on {listen}: {e}")))
}

/// Waits for the source's connection: the first peer that passes the handshake. Returns the
/// listener too (kept in case the migration switches to post-copy), unless the connection came
/// from an inherited connected socket without a channel for later ones.
fn accept(
    mut cfg: IncomingConfig,
) -> Result<(MigrationStream, Option<MigrationListener>, Option<CommitHook>), MigrateError> {
    let hook = cfg.hook.take();
    let (stream, listener) = accept_stream(cfg)?;
    Ok((stream, listener, hook))
}

fn accept_stream(cfg: IncomingConfig) -> Result<(MigrationStream, Option<MigrationListener>), MigrateError> {
    // No peer's byte is read while a thread of this VMM runs without its filter.
    crate::seccomp::wait_for_filters();
    let mode = cfg.security.describe();
    let listener = match cfg.from {
        IncomingFrom::Listener(l) => {
            let at = l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            // On stderr whatever the log level: scripts wait for this line before they migrate.
            eprintln!("vmm: waiting for an incoming migration on {at} ({mode})");
            MigrationListener::from_listener(l, cfg.security, cfg.link)
        }
        IncomingFrom::Addr(listen) => {
            let l = MigrationListener::bind(&listen, cfg.security, cfg.link)?;
            // On stderr whatever the log level: scripts wait for this line before they migrate.
            eprintln!("vmm: waiting for an incoming migration on {listen} ({mode})");
            l
        }
        IncomingFrom::Fd { fd, conns } => match transport::socket_from_fd(fd)? {
            IncomingSocket::Listener(_) if conns.is_some() => {
                return Err(MigrateError::Other(format!(
                    "--incoming-conns-fd goes with a connection handed over on --incoming-fd, and fd {fd} listens \
                     (it takes the later connections itself)"
                )));
            }
            IncomingSocket::Listener(l) => {
                let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                eprintln!("vmm: waiting for an incoming migration on fd {fd} ({at}, {mode})");
                MigrationListener::from_listener(l, cfg.security.clone(), cfg.link)
            }
            IncomingSocket::Connection(c) => {
                eprintln!("vmm: waiting for an incoming migration on fd {fd} (a connection, {mode})");
                let later = match conns {
                    Some(conns) => {
                        let channel = transport::channel_from_fd(conns)?;
                        Some(MigrationListener::from_handed(channel, cfg.security.clone(), cfg.link))
                    }
                    None => None,
                };
                return Ok((transport::accept_connection(c, &cfg.security, &cfg.link)?, later));
            }
        },
    };
    // Nobody else gets in while this migration runs: the listener is closed once `Start` says
    // the migration cannot switch to post-copy, and until then nobody is accepted on it.
    let stream = listener.accept_while(&|| true)?;
    Ok((stream, Some(listener)))
}

/// Waits for a migration as `cfg` says and receives it into a new machine built from `res`.
/// `nets` (from the destination's command line) replaces the source's TAP names, NIC by NIC;
/// if empty, the source's names are used (not by a sealed, i.e. sandboxed, destination: it
/// opened its TAPs and disks before and needs them named). Console output of the guest goes
/// to `console`. With a commit hook, `Prepare` is answered only once the hook committed the
/// migration (see [`super::hook`]).
pub fn receive(
    cfg: IncomingConfig,
    nets: &[NetConfig],
    disks: &[DiskConfig],
    res: &mut HostResources,
    console: Box<dyn std::io::Write + Send>,
    announce: bool,
) -> Result<Incoming, MigrateError> {
    let (mut stream, mut listener, mut hook) = accept(cfg)?;
    log::info!("incoming migration from {}", stream.describe_peer());

    // Allocated once, up front, for the largest frame.
    let mut scratch = Vec::with_capacity(protocol::MAX_PAYLOAD as usize);
    let result =
        receive_on(&mut stream, &mut listener, nets, disks, res, console, &mut scratch, announce, hook.as_mut());
    match result {
        Ok((built, paused_at, disks, postcopy)) => {
            Ok(Incoming { built, answer: Acknowledger { stream, paused_at }, disks, scratch, hook, postcopy })
        }
        Err(e) => {
            // Tell the source why, if it still listens; it resumes its guest.
            let _ = protocol::write_json(&mut stream, Command::Response, &Response::error(e.to_string()));
            Err(e)
        }
    }
}

type Received = (BuiltVm, Option<Instant>, DiskSink, Option<Postcopy>);

#[allow(clippy::too_many_arguments)]
fn receive_on(
    stream: &mut MigrationStream,
    listener: &mut Option<MigrationListener>,
    nets: &[NetConfig],
    disks: &[DiskConfig],
    res: &mut HostResources,
    console: Box<dyn std::io::Write + Send>,
    buf: &mut Vec<u8>,
    announce: bool,
    mut hook: Option<&mut CommitHook>,
) -> Result<Received, MigrateError> {
    let first = protocol::read_frame(stream)?;
    if first.command != Command::Start {
        return Err(MigrateError::Other(format!("expected a migration Start, got {:?}", first.command)));
    }
    let start: StartPayload = protocol::parse_json("Start", &first.payload)?;
    log::debug!("incoming: Start");
    crate::fault::point("destination:start");
    match (start.postcopy_id, &listener) {
        // Nobody else gets in while (and after) this migration runs.
        (None, _) => *listener = None,
        (Some(_), Some(_)) => {}
        (Some(_), None) => {
            return Err(MigrateError::Incompatible(
                "post-copy needs a destination that can take a second connection: one that listens \
                 (--incoming, or --incoming-fd with a listening socket), or one handed a connection with \
                 --incoming-conns-fd for the later ones"
                    .into(),
            ));
        }
    }
    let mut config = check_start(&start, nets, res)?;
    log::debug!("incoming: Start checked");
    // Dropped (removing the new files) on any failure before the guest runs here.
    let mut sink = DiskSink::prepare(&start.disks, disks, &mut config, res)?;
    let built = build_vm_for_incoming(&config, res, console)?;
    // Registering guest memory with KVM takes milliseconds and goes on on its own thread while
    // the pages arrive; `Prepare` waits for it, before the guest pauses on the source.
    log::debug!("incoming: machine built");
    protocol::write_json(stream, Command::Response, &Response::ok())?;
    // A migration that may switch to post-copy opens its fault connection now, so that its
    // handshake is not part of the pause.
    let mut fault = match (start.postcopy_id, listener.as_ref()) {
        (Some(id), Some(l)) => Some(accept_channel(l, id)?),
        _ => None,
    };

    let mem = built.machine.vm.memory().clone();
    let mut written = Written::new(&mem);
    let mut paused_at = None;
    let mut state: Option<MachineState> = None;
    let mut switched: Option<Switched> = None;
    // Pages `PostcopyDrop` dropped ahead of the switch.
    let mut dropped: Option<PageBitmap> = None;
    let layout: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
    loop {
        let r = protocol::read_frame_into_with(stream, stream.integrity(), buf)?;
        log::trace!("incoming: frame {r:?} {} bytes", buf.len());
        match r {
            Command::Memory if dropped.is_some() => {
                // It could fill a dropped page, which would then never be asked for.
                return Err(MigrateError::Other("Memory after PostcopyDrop".into()));
            }
            Command::Memory => {
                apply_batch(&mem, buf, &mut written)?;
            }
            Command::Disk => sink.apply(buf)?,
            Command::PostcopyDrop if dropped.is_none() && switched.is_none() && paused_at.is_none() => {
                if start.postcopy_id.is_none() {
                    return Err(MigrateError::Other("PostcopyDrop in a migration that did not offer post-copy".into()));
                }
                let early = PageBitmap::decode(buf, &layout).map_err(|e| MigrateError::Other(e.to_string()))?;
                // The guest still runs on the source: this is not downtime yet.
                remote::zap(&mem, &early).map_err(|e| MigrateError::Memory(e.to_string()))?;
                log::debug!("incoming: post-copy: {} pages dropped ahead of the switch", early.count());
                dropped = Some(early);
            }
            Command::PostcopyDirty if switched.is_none() => {
                let (Some(id), Some(fault)) = (start.postcopy_id, fault.take()) else {
                    return Err(MigrateError::Other(
                        "PostcopyDirty in a migration that did not offer post-copy".into(),
                    ));
                };
                log::debug!(
                    "incoming: PostcopyDirty at {} µs",
                    paused_at.map_or(0, |t: Instant| t.elapsed().as_micros())
                );
                let needed = PageBitmap::decode(buf, &layout).map_err(|e| MigrateError::Other(e.to_string()))?;
                // The stale copies go now, while the source saves the machine: those not dropped
                // ahead of the switch already. A page dropped then must be in the list, or the
                // guest would find it empty here and the source would never send it.
                let zapped = match &dropped {
                    Some(d) => match d.without(&needed).count() {
                        0 => remote::zap(&mem, &needed.without(d)),
                        left_out => {
                            return Err(MigrateError::Other(format!(
                                "PostcopyDirty leaves out {left_out} pages PostcopyDrop dropped"
                            )));
                        }
                    },
                    None => remote::zap(&mem, &needed),
                };
                zapped.map_err(|e| MigrateError::Memory(e.to_string()))?;
                log::debug!(
                    "incoming: post-copy: {} pages to come, dropped here at {} µs",
                    needed.count(),
                    paused_at.map_or(0, |t: Instant| t.elapsed().as_micros())
                );
                switched = Some(Switched { needed, fault, id });
            }
            Command::Prepare => {
                // The guest is about to pause on the source. The commit, if a hook must make
                // it, comes now: a refusal from here on costs nothing, after the commit the
                // guest is this host's.
                let ready = match hook.as_deref_mut() {
                    Some(h) => h
                        .commit()
                        .map(|()| true)
                        .map_err(|why| MigrateError::Other(format!("the commit hook refused the migration: {why}"))),
                    None => Ok(false),
                };
                let answer = match &ready {
                    Ok(committed) => Response { committed: *committed, ..Response::ok() },
                    Err(e) => Response::error(e.to_string()),
                };
                protocol::write_json(stream, Command::Response, &answer)?;
                ready?;
            }
            Command::Paused => {
                paused_at = Some(Instant::now());
                // The guest stopped on the source: from now on its peers' frames should come
                // here, where the TAP keeps them until the guest runs, instead of reaching the
                // old host, where they would be lost.
                if announce {
                    super::announce_now(&built.machine);
                }
            }
            Command::State => {
                log::debug!(
                    "incoming: State ({} bytes) at {} µs",
                    buf.len(),
                    paused_at.map_or(0, |t: Instant| t.elapsed().as_micros())
                );
                let s: MachineState = protocol::parse_json("State", buf)?;
                log::debug!(
                    "incoming: State parsed at {} µs",
                    paused_at.map_or(0, |t: Instant| t.elapsed().as_micros())
                );
                if !s.version.compatible() {
                    return Err(MigrateError::Incompatible(format!("state version {:?}", s.version)));
                }
                state = Some(s);
            }
            Command::Complete => {
                log::debug!("incoming: Complete at {} µs", paused_at.map_or(0, |t: Instant| t.elapsed().as_micros()));
                break;
            }
            Command::Abandon => return Err(MigrateError::Other("the source abandoned the migration".into())),
            other => return Err(MigrateError::Other(format!("unexpected {other:?} during a migration"))),
        }
    }
    crate::fault::point("destination:complete");
    let state = state.ok_or_else(|| MigrateError::Other("Complete came before the machine's State".into()))?;
    // Restoring kvmclock and other MSRs makes KVM touch guest memory: with post-copy, the
    // pages that are still on the source must come when touched.
    let postcopy = match switched {
        Some(s) => {
            let l = listener.take().ok_or_else(|| MigrateError::Other("no listener for post-copy".into()))?;
            Some(start_postcopy(&built, res, s, l)?)
        }
        None => None,
    };
    super::restore_machine(&built, &state)?;
    log::debug!("incoming: restored at {} µs", paused_at.map_or(0, |t| t.elapsed().as_micros()));
    Ok((built, paused_at, sink, postcopy))
}

/// How long the source may take to open the fault connection.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts post-copy's fault connection: the first connection that presents this migration's
/// id (others are closed).
fn accept_channel(listener: &MigrationListener, id: u64) -> Result<MigrationStream, MigrateError> {
    let deadline = Instant::now() + CHANNEL_TIMEOUT;
    remote::accept_hello(listener, Command::PostcopyChannel, id, &|| Instant::now() < deadline)
        .map_err(|e| MigrateError::Other(format!("waiting for the post-copy fault connection: {e}")))
}

/// Registers guest memory with a userfaultfd and starts the page handler that fetches the
/// missing pages over the fault connection.
fn start_postcopy(
    built: &BuiltVm,
    res: &mut HostResources,
    s: Switched,
    listener: MigrationListener,
) -> Result<(Arc<remote::Shared>, Arc<remote::GuestControl>), MigrateError> {
    let uffd = res.take_uffd().map_err(|e| MigrateError::Memory(e.to_string()))?;
    let uffd = Arc::new(
        crate::uffd::GuestUffd::register(uffd, built.machine.vm.memory())
            .map_err(|e| MigrateError::Memory(e.to_string()))?,
    );
    let control = Arc::new(remote::GuestControl::default());
    let stats = Arc::new(crate::uffd::UffdStats::default());
    let source = remote::Remote::new(uffd.clone(), s.needed, s.fault, listener, s.id, control.clone(), stats.clone())
        .map_err(|e| MigrateError::Memory(e.to_string()))?;
    let shared = source.shared();
    let notifier = built.exits.notifier.clone();
    let handler = crate::uffd::Handler::start(
        "postcopy-faults",
        crate::seccomp::ThreadKind::PostcopyFaults,
        uffd,
        Box::new(source),
        stats,
        Box::new(move |msg| notifier.notify(u8::MAX - 1, crate::vstate::vcpu::ExitReason::Error(msg))),
    )
    .map_err(|e| MigrateError::Memory(e.to_string()))?;
    *built.machine.lazy_memory.lock().expect("Poisoned lock") = Some(Arc::new(handler));
    Ok((shared, control))
}

/// Whether this host can take the VM described by `start`; returns its config with this host's
/// TAP names.
fn check_start(start: &StartPayload, nets: &[NetConfig], res: &mut HostResources) -> Result<VmConfig, MigrateError> {
    let config = check_start_config(start, nets, res.sealed())?;
    let kvm = res.kvm().map_err(|e| MigrateError::Incompatible(e.to_string()))?;
    check_cpuid(kvm, None, &start.cpuid)?;
    Ok(config)
}

/// The checks of a `Start` that need no KVM: versions, memory layout and size, NICs. `sealed`:
/// the destination opened its TAPs up front, so the source's TAP names are never used.
pub fn check_start_config(start: &StartPayload, nets: &[NetConfig], sealed: bool) -> Result<VmConfig, MigrateError> {
    if !start.state_version.compatible() {
        return Err(MigrateError::Incompatible(format!(
            "state version {}.{} (this VMM reads {}.x up to {}.{})",
            start.state_version.major,
            start.state_version.minor,
            migration::STATE_VERSION.major,
            migration::STATE_VERSION.major,
            migration::STATE_VERSION.minor
        )));
    }
    let mut config: VmConfig = serde_json::from_value(start.config.clone())
        .map_err(|e| MigrateError::Incompatible(format!("VM config: {e}")))?;
    let expected: Vec<(u64, u64)> = ram_regions(config.mem_mib << 20);
    let got: Vec<(u64, u64)> = start.memory.iter().map(|r| (r.start, r.size)).collect();
    if expected != got {
        return Err(MigrateError::Incompatible(format!(
            "memory layout {got:x?} is not what this VMM lays out ({expected:x?})"
        )));
    }
    crate::vstate::memory::check_mem_size(config.mem_mib).map_err(|e| MigrateError::Incompatible(e.to_string()))?;
    if !nets.is_empty() {
        if nets.len() != config.nets.len() {
            return Err(MigrateError::Incompatible(format!(
                "the guest has {} NIC(s), this destination was given {}",
                config.nets.len(),
                nets.len()
            )));
        }
        // The TAPs are this host's; the MACs stay the guest's.
        for (n, local) in config.nets.iter_mut().zip(nets) {
            n.tap = local.tap.clone();
        }
    } else if sealed && !config.nets.is_empty() {
        return Err(MigrateError::Incompatible(format!(
            "the guest has {} NIC(s) and this destination, sandboxed, opens only the TAPs its --net options name",
            config.nets.len()
        )));
    }
    Ok(config)
}

/// `vmm run --incoming`: receives a migration and runs the guest here. Returns the running VMM
/// and the guest's pause as measured here.
pub fn start_incoming(
    cfg: IncomingConfig,
    nets: &[NetConfig],
    disks: &[DiskConfig],
    res: &mut HostResources,
    announce: Option<net::announce::AnnounceSchedule>,
    console: Box<dyn std::io::Write + Send>,
) -> Result<(crate::Vmm, Option<Duration>), MigrateError> {
    let Incoming { built, answer, disks, scratch, mut hook, postcopy } =
        receive(cfg, nets, disks, res, console, announce.is_some())?;
    if let Some(h) = hook.as_mut() {
        // From here on the guest may run here: the hook must not hand it back any more.
        h.complete();
    }
    log::debug!("incoming: starting the vCPUs");
    let mut vmm = match crate::Vmm::start(built) {
        Ok(v) => v,
        Err(e) => {
            answer.refuse(&e.to_string());
            // `disks` goes out of scope here: the source keeps its guest, and its disks.
            return Err(MigrateError::Other(format!("starting the received guest: {e}")));
        }
    };
    // From `Complete` on the guest is this host's, and so are its disks.
    disks.commit();
    let resumed_at_us = protocol::unix_now_us();
    log::debug!("incoming: vCPUs started");
    // The NICs pick up whatever the source left queued (TX descriptors, a waiting RX frame).
    super::resume_devices(vmm.machine());
    // From `Complete` on, the guest is ours: even if the source cannot hear this answer any
    // more, the guest runs here (the source then keeps its copy paused).
    if let Some((_, control)) = &postcopy {
        control.attach(vmm.vcpus());
    }
    let downtime = match answer.acknowledge(resumed_at_us) {
        Ok((d, stream)) => {
            log::debug!("incoming: acknowledged");
            if let Some((shared, _)) = &postcopy
                && let Err(e) = remote::start_receiver(shared.clone(), stream)
            {
                log::warn!("post-copy: cannot start the receiver: {e}");
                remote::mark_broken(shared);
            }
            d
        }
        Err(e) => {
            log::warn!("could not tell the source the migration completed: {e}");
            if let Some((shared, _)) = &postcopy {
                // The source reconnects; the page handler takes it from there.
                remote::mark_broken(shared);
            }
            None
        }
    };
    if let Some(h) = hook.as_mut() {
        h.running(resumed_at_us, downtime.map(|d| d.as_micros() as u64));
    }
    // What arrived for the copied disks went through the page cache: now that the guest's
    // pause is over, make it durable, on the side.
    crate::storage::sync_received(vmm.machine());
    // Announced once already when the guest paused; the timed rounds start now.
    if let Some(schedule) = announce {
        vmm.announce(schedule);
    }
    drop(scratch);
    Ok((vmm, downtime))
}
