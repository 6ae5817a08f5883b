// SPDX-License-Identifier: Apache-2.0
//! The `echo` workload: a TCP server on [`ECHO_PORT`] that sends every byte back, a UDP server on
//! the same port that sends every datagram back, plus the one-way discard ([`DISCARD_PORT`]) and
//! source ([`SOURCE_PORT`]) services that benchmarks measure throughput with. One thread per
//! connection, so a connection that stalls or resets never holds up the others.

use std::io::{self, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use guest_common::{DISCARD_PORT, ECHO_PORT, SOURCE_PATTERN, SOURCE_PORT};

/// Starts listening; connections are served from then on.
pub fn start() -> Result<(), String> {
    serve("echo", ECHO_PORT, echo)?;
    serve_udp_echo()?;
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

/// Sends every datagram that arrives on UDP [`ECHO_PORT`] back to its sender, one thread per
/// socket.
fn serve_udp_echo() -> Result<(), String> {
    let sockets = crate::net::bind_udp(ECHO_PORT).map_err(|e| format!("udp echo: cannot bind {ECHO_PORT}: {e}"))?;
    for socket in sockets {
        crate::spawn("udp-echo", move || udp_echo(&socket))?;
    }
    Ok(())
}

fn udp_echo(socket: &UdpSocket) {
    // The largest UDP payload over IPv4.
    let mut buf = vec![0u8; 65_507];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                // A datagram that cannot go back now is lost, as UDP allows.
                let _ = socket.send_to(&buf[..n], peer);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // An ICMP error for an earlier reply, or no memory: nothing to do but go on.
                say!("udp echo: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
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
