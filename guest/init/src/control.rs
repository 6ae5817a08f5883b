// SPDX-License-Identifier: Apache-2.0
//! The control service: line commands over TCP on [`CONTROL_PORT`] and on the console.
//!
//! - `status` answers the status line both guests share (`guest_common::Status`):
//!   `STATUS workload=<w> cpus=<n> uptime_ms=<ms> dirty_passes=<n> dirty_mismatches=<m> ...`
//! - `records` reads the disk workload's records back from the disk and answers
//!   `RECORDS acked=N found=G bad=B` (`records::verify`), or `ERR ...`
//! - `poweroff` answers `OK` (over TCP) and powers the guest off
//!
//! Anything else answers `ERR unknown command`; empty lines are ignored.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use guest_common::{CONTROL_PORT, Params};

use crate::{Mode, records, status, system};

/// Longest command line read at once; a longer one is answered in pieces, as unknown commands,
/// instead of growing a buffer for a client that never sends a newline.
const MAX_LINE: u64 = 256;
/// How long a `poweroff` over TCP waits for the client to see `OK` before it goes ahead.
const OK_LINGER: Duration = Duration::from_millis(500);

enum Answer {
    None,
    Line(String),
    PowerOff,
}

fn answer(line: &[u8], params: &Params) -> Answer {
    match line.trim_ascii() {
        b"" => Answer::None,
        b"status" => Answer::Line(status::now(params).to_string()),
        b"records" => Answer::Line(records::verify().map_or_else(|e| format!("ERR {e}"), |v| v.to_string())),
        b"poweroff" => Answer::PowerOff,
        _ => Answer::Line("ERR unknown command".to_string()),
    }
}

/// Starts listening on [`CONTROL_PORT`]; connections are served from then on.
pub fn start(params: Params, mode: Mode) -> Result<(), String> {
    let listeners =
        crate::net::listen(CONTROL_PORT).map_err(|e| format!("control: cannot listen on {CONTROL_PORT}: {e}"))?;
    crate::net::serve("control", listeners, move |stream| {
        if let Err(e) = serve_client(stream, &params, mode) {
            say!("control: {e}");
        }
    })
}

fn serve_client(stream: TcpStream, params: &Params, mode: Mode) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        match answer(&line, params) {
            Answer::None => {}
            Answer::Line(mut text) => {
                text.push('\n');
                writer.write_all(text.as_bytes())?;
            }
            Answer::PowerOff => {
                // Asked is asked: power off even if the client is gone by now.
                if let Err(e) = writer.write_all(b"OK\n") {
                    say!("control: cannot answer poweroff: {e}");
                }
                linger(&mut writer);
                system::poweroff(mode);
            }
        }
    }
}

/// Gives `OK` a chance to reach the client before the guest is gone: a reset of the VM
/// discards whatever still sits in the guest's socket or device queues. Closing our side and
/// waiting for the client to close its own (it has read everything by then) proves delivery; a
/// client that keeps its side open costs [`OK_LINGER`].
fn linger(stream: &mut TcpStream) {
    let deadline = Instant::now() + OK_LINGER;
    let _ = stream.shutdown(Shutdown::Write);
    let mut buf = [0u8; 256];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads commands from the console (our stdin) until it ends; answers go to the console.
pub fn serve_console(params: Params, mode: Mode) {
    let mut stdin = io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut stdin).take(MAX_LINE).read_until(b'\n', &mut line) {
            // No console input (a test's /dev/null, or no console at all): nothing to serve.
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                say!("console: cannot read: {e}");
                return;
            }
        }
        match answer(&line, &params) {
            Answer::None => {}
            Answer::Line(text) => say!("{text}"),
            Answer::PowerOff => system::poweroff(mode),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let idle = Params::parse("vmm.workload=idle");
        assert!(matches!(answer(b"poweroff\r\n", &idle), Answer::PowerOff));
        assert!(matches!(answer(b"  \n", &idle), Answer::None));
        let Answer::Line(status) = answer(b"status\n", &Params::parse("vmm.workload=dirty")) else { panic!() };
        let cpus = format!("STATUS workload=dirty cpus={} uptime_ms=", crate::cpus::all().len());
        assert!(status.starts_with(&cpus), "{status}");
        assert!(
            status.contains(" dirty_passes=0 dirty_mismatches=0 disk_passes=0 disk_mismatches=0 job_units=0 "),
            "{status}"
        );
        let Answer::Line(err) = answer(b"reboot\n", &Params::default()) else { panic!() };
        assert_eq!(err, "ERR unknown command");
    }
}
