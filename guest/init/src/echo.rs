// SPDX-License-Identifier: Apache-2.0
//! The `echo` workload: a TCP server on [`ECHO_PORT`] that sends every byte back, one thread per
//! connection, so a connection that stalls or resets never holds up the others.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use guest_common::ECHO_PORT;

/// Starts listening; connections are served from then on.
pub fn start() -> Result<(), String> {
    let listeners = crate::net::listen(ECHO_PORT).map_err(|e| format!("echo: cannot listen on {ECHO_PORT}: {e}"))?;
    crate::net::serve("echo", listeners, |stream| {
        let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
        if let Err(e) = echo(stream) {
            say!("echo: {peer}: {e}");
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
