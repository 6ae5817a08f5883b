// SPDX-License-Identifier: Apache-2.0
//! TCP listeners and UDP sockets on all addresses, IPv4 and IPv6, and the TCP accept loops.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

/// Listens on `port` on every IPv4 and IPv6 address.
///
/// `[::]` first: if the system makes it dual-stack (`bindv6only=0`, Linux's default), it
/// already covers IPv4 and binding `0.0.0.0` then fails with `EADDRINUSE`, which is fine. If
/// IPv6 is missing or v6-only, `0.0.0.0` is bound as well. Only no IPv4 at all is an error.
pub fn listen(port: u16) -> io::Result<Vec<TcpListener>> {
    let v6 = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).ok();
    match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(v4) => Ok(v6.into_iter().chain([v4]).collect()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && v6.is_some() => Ok(v6.into_iter().collect()),
        Err(e) => Err(e),
    }
}

/// Binds UDP `port` on every IPv4 and IPv6 address, the same way as [`listen`].
pub fn bind_udp(port: u16) -> io::Result<Vec<UdpSocket>> {
    let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).ok();
    match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(v4) => Ok(v6.into_iter().chain([v4]).collect()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && v6.is_some() => Ok(v6.into_iter().collect()),
        Err(e) => Err(e),
    }
}

/// Accepts connections on `listeners` forever, one thread per listener, and hands each
/// connection to `handle` on a thread of its own named `name`.
pub fn serve(
    name: &'static str,
    listeners: Vec<TcpListener>,
    handle: impl Fn(TcpStream) + Clone + Send + 'static,
) -> Result<(), String> {
    for listener in listeners {
        let handle = handle.clone();
        crate::spawn(name, move || accept_loop(name, &listener, handle))?;
    }
    Ok(())
}

fn accept_loop(name: &'static str, listener: &TcpListener, handle: impl Fn(TcpStream) + Clone + Send + 'static) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let handle = handle.clone();
                if let Err(e) = crate::spawn(name, move || handle(stream)) {
                    say!("{name}: {e}");
                }
            }
            Err(e) => {
                // Out of fds or memory, or a connection that died in the backlog: none of
                // them is the listener's fault, so wait a little and accept again.
                say!("{name}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
