// SPDX-License-Identifier: Apache-2.0
//! Layer 2 access for tests: attach to a TAP device the way a VMM does, open raw packet
//! sockets, and read frames with a timeout.
//!
//! The `open_*` functions act in the calling thread's network namespace; use them through
//! [`crate::Host::open_tap`] / [`crate::Netns::open_packet_socket`], or inside
//! [`crate::Netns::run_in`]. The returned files keep working from any thread.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::TestBedError;

/// `ifreq` as TUNSETIFF reads it: the name, the flags, and the rest of the 40-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A plain TAP without packet info headers: reads and writes are bare Ethernet frames.
/// (0x1002 fits a c_short; the kernel takes the flags as a short.)
const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;

/// The EtherType for frames a test makes up (IEEE 802 "local experimental" 1).
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

/// The Ethernet broadcast address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Attaches to the existing TAP device `name` of the calling thread's namespace, bringing its
/// carrier up (so the bridge forwards to it) until the file is closed.
pub fn open_tap(name: &str) -> Result<File, TestBedError> {
    let err = |source| TestBedError::Tap { name: name.to_string(), source };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "interface names have 1 to 15 bytes")));
    }
    let file =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun").map_err(err)?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: TAP_FLAGS, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun and `req` is a live, fully initialised ifreq that
    // TUNSETIFF reads and writes within its 40 bytes.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(file)
}

/// Opens a raw `AF_PACKET` socket bound to interface `ifname` of the calling thread's namespace,
/// receiving all EtherTypes. Writes send a complete Ethernet frame out of that interface.
pub fn open_packet_socket(ifname: &str) -> Result<File, TestBedError> {
    let err = |source| TestBedError::PacketSocket { ifname: ifname.to_string(), source };
    let c_name = CString::new(ifname).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the duration of the call.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let ifindex = libc::c_int::try_from(ifindex).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    // ETH_P_ALL is 3; the socket API wants it in network byte order.
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscall without pointers; the returned descriptor is checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::c_int::from(protocol)) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: protocol,
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    let addr_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    // SAFETY: `addr` is a valid sockaddr_ll and `addr_len` its size; bind() only reads it.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast::<libc::sockaddr>(), addr_len) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(File::from(fd))
}

/// Reads one frame into `buf`, waiting at most `timeout`; `None` if nothing arrived in time.
pub fn recv_frame(file: &mut File, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // Round up so that a sub-millisecond remainder still waits instead of spinning.
        let millis = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd, matching the count of 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, millis) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Ok(None);
        }
        return file.read(buf).map(Some);
    }
}

/// Reads frames until one satisfies `pred` and returns it, or `None` after `timeout`.
pub fn wait_for_frame(
    file: &mut File,
    timeout: Duration,
    mut pred: impl FnMut(&[u8]) -> bool,
) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        // Checked before reading so that a steady stream of other frames cannot keep us here.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match recv_frame(file, &mut buf, left)? {
            Some(len) if pred(&buf[..len]) => return Ok(Some(buf[..len].to_vec())),
            Some(_) => {}
            None => return Ok(None),
        }
    }
}

/// An Ethernet frame: destination, source, EtherType, payload (padded to the 60-byte minimum).
pub fn ethernet_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len().max(46));
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame.resize(frame.len().max(60), 0);
    frame
}
