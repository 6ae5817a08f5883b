// SPDX-License-Identifier: Apache-2.0
//! A client that sends numbered datagrams to a guest's UDP echo service at a steady pace and
//! accounts for every reply: which sequence numbers came back, which twice, which out of order,
//! and when each one was sent, so that a loss can be placed in time (during which migration).
//! What the UDP takeover test and the benchmark watch a migration through.
//!
//! A datagram is `vmm-udp <seq>`; a reply that is not one of ours is counted as foreign.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

const MAGIC: &str = "vmm-udp ";

/// How long [`UdpStream::finish`] waits for the last replies.
pub const DRAIN: Duration = Duration::from_secs(2);

/// A run of consecutive sequence numbers that never came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossRun {
    pub first: u64,
    pub count: u64,
    /// When the first of them was sent.
    pub sent_at: Instant,
    /// The same, on the wall clock (for another process to place it).
    pub sent_at_wall: SystemTime,
}

#[derive(Default)]
struct State {
    /// When each sequence number was sent (index = sequence number).
    sent_at: Vec<(Instant, SystemTime)>,
    /// Replies per sequence number.
    replies: Vec<u32>,
    received: u64,
    duplicated: u64,
    reordered: u64,
    foreign: u64,
    highest: Option<u64>,
    last_reply: Option<Instant>,
    largest_gap: Duration,
    errors: Vec<String>,
}

/// What the client saw.
#[derive(Clone, Debug, Default)]
pub struct UdpStats {
    pub sent: u64,
    /// Distinct sequence numbers that came back.
    pub received: u64,
    /// Replies for a sequence number that had come back already.
    pub duplicated: u64,
    /// Replies older than the newest one seen before them.
    pub reordered: u64,
    /// Replies that are not ours.
    pub foreign: u64,
    /// Largest time between two consecutive replies.
    pub largest_gap: Duration,
    pub errors: Vec<String>,
}

impl UdpStats {
    /// Sent and not (yet) come back.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// A running stream; [`UdpStream::finish`] stops it.
pub struct UdpStream {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpStream {
    /// Starts sending a datagram every `interval` from `socket` (bound in the client's
    /// namespace) to `to`, and reading the replies.
    pub fn start(socket: UdpSocket, to: SocketAddr, interval: Duration) -> std::io::Result<UdpStream> {
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let sender = socket.try_clone()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, stop1) = (state.clone(), stop.clone());
        let send = std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq = 0u64;
            while !stop1.load(Ordering::Relaxed) {
                let payload = format!("{MAGIC}{seq}");
                // Recorded before it goes, so that a fast reply finds it.
                s1.lock().expect("Poisoned lock").sent_at.push((Instant::now(), SystemTime::now()));
                if let Err(e) = sender.send_to(payload.as_bytes(), to) {
                    // A datagram that could not leave counts as lost; say why once.
                    let mut st = s1.lock().expect("Poisoned lock");
                    if st.errors.len() < 8 {
                        st.errors.push(format!("send {seq}: {e}"));
                    }
                }
                seq += 1;
                // A steady pace: the n-th datagram goes at start + n * interval.
                let due = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        });
        let (s2, stop2) = (state.clone(), stop.clone());
        let receive = std::thread::spawn(move || receive(&socket, &s2, &stop2));
        Ok(UdpStream { state, stop, threads: vec![send, receive] })
    }

    /// What it saw so far.
    pub fn stats(&self) -> UdpStats {
        stats(&self.state.lock().expect("Poisoned lock"))
    }

    /// Forgets the largest gap so far (to measure it over a window of interest only).
    pub fn reset_gap(&self) {
        self.state.lock().expect("Poisoned lock").largest_gap = Duration::ZERO;
    }

    /// Waits until a reply to a datagram sent after now came back; false after `timeout`.
    pub fn wait_reply_after_now(&self, timeout: Duration) -> bool {
        let from = self.state.lock().expect("Poisoned lock").sent_at.len();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.state.lock().expect("Poisoned lock").replies.iter().skip(from).any(|r| *r > 0) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stops sending, waits up to [`DRAIN`] for the last replies, and returns the totals and
    /// the runs of datagrams that never came back.
    pub fn finish(mut self) -> (UdpStats, Vec<LossRun>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let st = self.state.lock().expect("Poisoned lock");
        (stats(&st), loss_runs(&st))
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn stats(st: &State) -> UdpStats {
    UdpStats {
        sent: st.sent_at.len() as u64,
        received: st.received,
        duplicated: st.duplicated,
        reordered: st.reordered,
        foreign: st.foreign,
        largest_gap: st.largest_gap,
        errors: st.errors.clone(),
    }
}

fn loss_runs(st: &State) -> Vec<LossRun> {
    let mut runs: Vec<LossRun> = Vec::new();
    for (seq, (&(at, wall), replies)) in
        st.sent_at.iter().zip(st.replies.iter().chain(std::iter::repeat(&0))).enumerate()
    {
        if *replies > 0 {
            continue;
        }
        let seq = seq as u64;
        match runs.last_mut() {
            Some(r) if r.first + r.count == seq => r.count += 1,
            _ => runs.push(LossRun { first: seq, count: 1, sent_at: at, sent_at_wall: wall }),
        }
    }
    runs
}

fn receive(socket: &UdpSocket, state: &Mutex<State>, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    let mut drain_until = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let d = *drain_until.get_or_insert(Instant::now() + DRAIN);
            let st = state.lock().expect("Poisoned lock");
            if st.received == st.sent_at.len() as u64 || Instant::now() > d {
                return;
            }
        }
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                let now = Instant::now();
                let mut st = state.lock().expect("Poisoned lock");
                let seq = std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|t| t.strip_prefix(MAGIC))
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|&s| s < st.sent_at.len() as u64);
                let Some(seq) = seq else {
                    st.foreign += 1;
                    continue;
                };
                let i = seq as usize;
                if st.replies.len() <= i {
                    st.replies.resize(i + 1, 0);
                }
                st.replies[i] += 1;
                if st.replies[i] > 1 {
                    st.duplicated += 1;
                    continue;
                }
                st.received += 1;
                if st.highest.is_some_and(|h| seq < h) {
                    st.reordered += 1;
                }
                st.highest = Some(st.highest.map_or(seq, |h| h.max(seq)));
                if let Some(last) = st.last_reply {
                    st.largest_gap = st.largest_gap.max(now - last);
                }
                st.last_reply = Some(now);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // ICMP port unreachable while the guest is not listening yet (or the like): go on.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                let mut st = state.lock().expect("Poisoned lock");
                if st.errors.len() < 8 {
                    st.errors.push(format!("receive: {e}"));
                }
                drop(st);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback that drops, repeats and swaps datagrams on purpose: the
    /// client must count exactly that.
    #[test]
    fn counts_losses_duplicates_and_reordering() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 64];
            let mut held: Option<(Vec<u8>, SocketAddr)> = None;
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let text = std::str::from_utf8(&buf[..n]).unwrap().to_string();
                let seq: u64 = text.strip_prefix(MAGIC).unwrap().parse().unwrap();
                match seq {
                    // Lost: 3 and 4 (one run), 7.
                    3 | 4 | 7 => {}
                    // Duplicated.
                    5 => {
                        server.send_to(&buf[..n], from).unwrap();
                        server.send_to(&buf[..n], from).unwrap();
                    }
                    // Held back and sent after 9: reordered.
                    8 => held = Some((buf[..n].to_vec(), from)),
                    9 => {
                        server.send_to(&buf[..n], from).unwrap();
                        let (b, f) = held.take().unwrap();
                        server.send_to(&b, f).unwrap();
                    }
                    _ => {
                        server.send_to(&buf[..n], from).unwrap();
                    }
                }
                if seq == 12 {
                    server.send_to(b"not ours", from).unwrap();
                    return;
                }
            }
        });
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stream = UdpStream::start(client, addr, Duration::from_millis(5)).unwrap();
        while stream.stats().sent < 13 {
            std::thread::sleep(Duration::from_millis(1));
        }
        echo.join().unwrap();
        let (s, runs) = stream.finish();
        assert!(s.sent >= 13, "{s:?}");
        // Everything from 13 on was never answered: the server had stopped.
        let tail = s.sent - 13;
        assert_eq!(s.received, 13 - 3, "{s:?}");
        assert_eq!(s.lost(), 3 + tail, "{s:?}");
        assert_eq!((s.duplicated, s.reordered, s.foreign), (1, 1, 1), "{s:?}");
        let firsts: Vec<(u64, u64)> = runs.iter().map(|r| (r.first, r.count)).collect();
        assert_eq!(firsts[..2], [(3, 2), (7, 1)], "{runs:?}");
        if tail > 0 {
            assert_eq!(firsts[2], (13, tail));
        }
        assert!(runs[0].sent_at < runs[1].sent_at);
    }
}
