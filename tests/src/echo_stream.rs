// SPDX-License-Identifier: Apache-2.0
//! A client that streams numbered lines to a guest's echo server at a steady pace and checks
//! every echo: what the demo and the benchmark watch a migration through. It records how many
//! lines went out and came back in order, the largest gap between two echoes, and any error.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the client saw.
#[derive(Clone, Debug, Default)]
pub struct StreamStats {
    pub sent: u64,
    pub echoed: u64,
    /// Largest time between two consecutive echoes.
    pub largest_gap: Duration,
    pub errors: Vec<String>,
}

impl StreamStats {
    /// Lines sent and never echoed.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.echoed)
    }

    /// Whether every line came back, in order, with no error.
    pub fn intact(&self) -> bool {
        self.lost() == 0 && self.errors.is_empty()
    }
}

/// A running stream; [`EchoStream::finish`] stops it and returns what it saw.
pub struct EchoStream {
    stats: Arc<Mutex<StreamStats>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoStream {
    /// Starts writing a line every `interval` on `stream` (already connected to an echo
    /// server) and reading the echoes.
    pub fn start(stream: TcpStream, interval: Duration) -> std::io::Result<EchoStream> {
        let mut w = stream.try_clone()?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stats = Arc::new(Mutex::new(StreamStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, stop1) = (stats.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop1.load(Ordering::Relaxed) {
                if let Err(e) = w.write_all(format!("msg {n:08}\n").as_bytes()) {
                    s1.lock().expect("Poisoned lock").errors.push(format!("write: {e}"));
                    return;
                }
                n += 1;
                s1.lock().expect("Poisoned lock").sent = n;
                std::thread::sleep(interval);
            }
        });
        let (s2, stop2) = (stats.clone(), stop.clone());
        let reader = std::thread::spawn(move || read_echoes(stream, &s2, &stop2));
        Ok(EchoStream { stats, stop, threads: vec![writer, reader] })
    }

    /// What it saw so far.
    pub fn stats(&self) -> StreamStats {
        self.stats.lock().expect("Poisoned lock").clone()
    }

    /// Forgets the largest gap so far (to measure it over a window of interest only).
    pub fn reset_gap(&self) {
        self.stats.lock().expect("Poisoned lock").largest_gap = Duration::ZERO;
    }

    /// Stops writing, gives the last echoes up to 2 s to arrive, and returns the totals.
    pub fn finish(mut self) -> StreamStats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stats()
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_echoes(stream: TcpStream, stats: &Mutex<StreamStats>, stop: &AtomicBool) {
    let mut r = BufReader::new(stream);
    let mut expect = 0u64;
    let mut last = Instant::now();
    let mut line = String::new();
    let mut drain_until = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let d = *drain_until.get_or_insert(Instant::now() + Duration::from_secs(2));
            let done = stats.lock().expect("Poisoned lock").sent == expect;
            if done || Instant::now() > d {
                return;
            }
        }
        // A read that times out keeps what it got in `line`; the next one completes it.
        match r.read_line(&mut line) {
            Ok(0) => {
                stats.lock().expect("Poisoned lock").errors.push("the guest closed the connection".into());
                return;
            }
            Ok(_) if !line.ends_with('\n') => {
                stats
                    .lock()
                    .expect("Poisoned lock")
                    .errors
                    .push(format!("the guest closed the connection after {line:?}"));
                return;
            }
            Ok(_) => {
                let now = Instant::now();
                let mut s = stats.lock().expect("Poisoned lock");
                if line != format!("msg {expect:08}\n") {
                    s.errors.push(format!("expected msg {expect:08}, got {line:?}"));
                    return;
                }
                line.clear();
                expect += 1;
                s.echoed = expect;
                s.largest_gap = s.largest_gap.max(now - last);
                last = now;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => {
                stats.lock().expect("Poisoned lock").errors.push(format!("read: {e}"));
                return;
            }
        }
    }
}
