// SPDX-License-Identifier: Apache-2.0
//! The migration transport alone, TLS against plaintext: the same stream of memory frames (1 MiB
//! batches of non-zero pages, built from a "guest memory" the way a source builds them) over
//! loopback between two threads of this process, through `vmm::transport` and the frame
//! functions the VMM uses, each run once with mutual TLS and once in plaintext, alternating which
//! goes first. The receiver applies every batch to a second, already touched memory (so the
//! first-touch cost of a real destination, the same with and without TLS, is left out) and the
//! result is checked against the source.
//!
//! Besides the wall-clock rate it reports the CPU time both threads used per GiB: on a machine
//! whose cores the sender, the receiver and the guest share (this project's 2-core bench), the
//! copy rate follows the CPU spent per byte, and CPU time is what stays meaningful when other
//! work shares the machine (wall-clock rates then depend on who else runs).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use migration::memory::{BatchReader, BatchWriter, PAGE_SIZE};
use migration::protocol::{self, Command, Response};
use vmm::transport::{self, LinkConfig, MigrationListener, MigrationStream, Security};

use crate::monitor::Monitor;
use crate::results::{Better, Results};

/// The section's name in the table.
pub const SECTION: &str = "transport: 1 GiB of 1 MiB memory frames over loopback, two threads";
/// Bytes of pages sent per run.
const BYTES: usize = 1 << 30;
/// The memory the pages come from and go to.
const MEMORY: usize = 64 << 20;
/// A frame is sent once its batch is this large (as the VMM's source does).
const BATCH: usize = 1 << 20;

/// This thread's CPU time (user and system).
fn thread_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// One run's figures.
struct Run {
    mb_s: f64,
    /// From the source's `connect` to a connection ready to carry frames.
    setup: Duration,
    sender_cpu: Duration,
    receiver_cpu: Duration,
}

/// Pseudo-random, never-zero pages.
fn source_memory() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut mem = vec![0u8; MEMORY];
    for w in mem.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&(x | 1).to_le_bytes());
    }
    mem
}

/// `runs` runs of each wire, alternating; rows in `results` under [`SECTION`].
pub fn bench(results: &mut Results, runs: usize) -> Result<(), String> {
    let pki = vmm_tests::pki::pki();
    let tls = pki.security(Ipv4Addr::LOCALHOST);
    let source = source_memory();
    for run in 0..runs {
        let mut by_wire: [Option<Run>; 2] = [None, None];
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let security = if i == 0 { tls.clone() } else { Security::InsecurePlaintext };
            by_wire[i] = Some(once(&security, &source)?);
        }
        let [Some(t), Some(p)] = by_wire else { unreachable!("both wires ran") };
        let gib = BYTES as f64 / (1u64 << 30) as f64;
        let cpu = |r: &Run| (r.sender_cpu + r.receiver_cpu).as_secs_f64() * 1e3 / gib;
        for (label, r) in [("TLS", &t), ("plaintext", &p)] {
            let add = |results: &mut Results, metric: &str, unit: &str, better: Better, v: f64| {
                results.add(SECTION, &format!("{label}: {metric}"), unit, better, Monitor::Ours, v);
            };
            add(results, "rate", "MB/s", Better::Higher, r.mb_s);
            add(
                results,
                "connection set-up (TCP, and the TLS handshake)",
                "ms",
                Better::Lower,
                r.setup.as_secs_f64() * 1e3,
            );
            add(results, "CPU per GiB, both ends", "ms", Better::Lower, cpu(r));
            add(results, "CPU per GiB, sender", "ms", Better::Lower, r.sender_cpu.as_secs_f64() * 1e3 / gib);
            add(results, "CPU per GiB, receiver", "ms", Better::Lower, r.receiver_cpu.as_secs_f64() * 1e3 / gib);
        }
        results.add(SECTION, "rate, TLS ÷ plaintext", "", Better::Higher, Monitor::Ours, t.mb_s / p.mb_s);
        results.add(SECTION, "CPU per byte, plaintext ÷ TLS", "", Better::Higher, Monitor::Ours, cpu(&p) / cpu(&t));
        eprintln!(
            "vmm-bench: transport run {}: TLS {:.0} MB/s, {:.0} ms CPU/GiB, set-up {:.1} ms; plaintext {:.0} MB/s, {:.0} \
             ms CPU/GiB, set-up {:.1} ms",
            run + 1,
            t.mb_s,
            cpu(&t),
            t.setup.as_secs_f64() * 1e3,
            p.mb_s,
            cpu(&p),
            p.setup.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// One transfer of [`BYTES`] over a new connection of `security`.
fn once(security: &Security, source: &[u8]) -> Result<Run, String> {
    let link = LinkConfig::default();
    let listener = MigrationListener::bind("127.0.0.1:0", security.clone(), link).map_err(|e| e.to_string())?;
    let to = format!("127.0.0.1:{}", listener.local_addr().map_err(|e| e.to_string())?.port());
    let receiver = std::thread::Builder::new()
        .name("bench-receiver".into())
        .spawn(move || -> Result<(Duration, Vec<u8>), String> {
            let mut stream = listener.accept().map_err(|e| e.to_string())?;
            // Touched up front, as guest memory a destination already wrote once.
            let mut memory = vec![1u8; MEMORY];
            let cpu = thread_cpu();
            receive(&mut stream, &mut memory)?;
            Ok((thread_cpu() - cpu, memory))
        })
        .map_err(|e| e.to_string())?;
    let sent = (|| -> Result<(Duration, Duration, Duration), String> {
        let setup = Instant::now();
        let mut stream = transport::connect(&to, security, &link).map_err(|e| e.to_string())?;
        let setup = setup.elapsed();
        let (cpu, wall) = (thread_cpu(), Instant::now());
        send(&mut stream, source)?;
        Ok((thread_cpu() - cpu, wall.elapsed(), setup))
    })();
    let received = receiver.join().map_err(|_| "the bench's receiver panicked".to_string())?;
    let (sender_cpu, wall, setup) = sent?;
    let (receiver_cpu, memory) = received?;
    if memory != source {
        return Err(format!("transport bench ({}): the received memory differs from the source", security.describe()));
    }
    Ok(Run { mb_s: BYTES as f64 / wall.as_secs_f64() / 1e6, setup, sender_cpu, receiver_cpu })
}

/// The source's side: batches of pages copied from `source`, round and round, then `Complete`,
/// and the answer.
fn send(stream: &mut MigrationStream, source: &[u8]) -> Result<(), String> {
    let mut batch = BatchWriter::with_capacity(BATCH + PAGE_SIZE + 64);
    let pages = source.len() / PAGE_SIZE;
    for n in 0..BYTES / PAGE_SIZE {
        let page = n % pages;
        batch.push_page((page * PAGE_SIZE) as u64, &source[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]);
        if batch.len() >= BATCH || n + 1 == BYTES / PAGE_SIZE {
            protocol::write_frame_with(stream, stream.integrity(), Command::Memory, batch.as_bytes())
                .map_err(|e| e.to_string())?;
            batch.clear();
        }
    }
    protocol::write_frame(stream, Command::Complete, &[]).map_err(|e| e.to_string())?;
    let answer = protocol::read_response(stream).map_err(|e| e.to_string())?;
    if answer.ok { Ok(()) } else { Err(format!("the bench's receiver refused: {:?}", answer.error)) }
}

/// The destination's side: every batch applied to `memory` until `Complete`.
fn receive(stream: &mut MigrationStream, memory: &mut [u8]) -> Result<(), String> {
    let mut buf = Vec::with_capacity(protocol::MAX_PAYLOAD as usize);
    loop {
        match protocol::read_frame_into_with(stream, stream.integrity(), &mut buf).map_err(|e| e.to_string())? {
            Command::Memory => {
                for record in BatchReader::new(&buf) {
                    let record = record.map_err(|e| e.to_string())?;
                    let at = record.gpa as usize;
                    let data = record.data.ok_or("the bench sends no zero pages")?;
                    memory
                        .get_mut(at..at + data.len())
                        .ok_or("a record outside the bench's memory")?
                        .copy_from_slice(data);
                }
            }
            Command::Complete => break,
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    protocol::write_json(stream, Command::Response, &Response::ok()).map_err(|e| e.to_string())
}
