// SPDX-License-Identifier: Apache-2.0
//! The `echo` workload: a TCP server on [`ECHO_PORT`] that sends every byte back, plus the
//! one-way discard ([`DISCARD_PORT`]) and source ([`SOURCE_PORT`]) services that benchmarks
//! measure throughput with. One thread per connection, so a connection that stalls or resets
//! never holds up the others.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use guest_common::{DISCARD_PORT, ECHO_PORT, SOURCE_PATTERN, SOURCE_PORT};

/// Starts listening; connections are served from then on.
pub fn start() -> Result<(), String> {
    serve("echo", ECHO_PORT, echo)?;
    serve("discard", DISCARD_PORT, discard)?;
    serve("source", SOURCE_PORT, source)
}

fn serve(name: &'static str, port: u16, f: fn(TcpStream) -> io::Result<()>) -> Result<(), String> {
    let listeners = crate::net::listen(port).map_err(|e| format!("{name}: cannot listen on {port}: {e}"))?;
    crate::net::serve(name, listeners, move |stream| {
        let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
        if let Err(e) = f(stream) {
            say!("{name}: {peer}: {e}");
        }
    })
}

/// Echoes until the peer closes its side, then closes ours.
fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
    }
}

/// Reads and drops everything until the peer closes.
fn discard(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends the pattern until the peer goes away (its close shows up as a failed write).
fn source(mut stream: TcpStream) -> io::Result<()> {
    let buf: Vec<u8> = SOURCE_PATTERN.iter().copied().cycle().take(1024 * SOURCE_PATTERN.len()).collect();
    loop {
        match stream.write_all(&buf) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
