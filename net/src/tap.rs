// SPDX-License-Identifier: Apache-2.0
//! A TAP device opened with a virtio-net header on every frame (IFF_VNET_HDR), so checksum and
//! segmentation offload metadata pass between the guest and the host kernel untouched.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `virtio_net_hdr_v1`, what a virtio 1.x driver puts before every frame.
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
// _IOW('T', n, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Offload flags for [`Tap::set_offload`] (TUN_F_*).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Errors of the TAP backend.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name '{0}': 1 to 15 characters, no '/', no whitespace")]
    InvalidName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to TAP device '{name}': {source}")]
    Attach { name: String, source: std::io::Error },
    #[error("cannot configure TAP device '{name}' ({what}): {source}")]
    Configure { name: String, what: &'static str, source: std::io::Error },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An open, non-blocking TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if it does not exist) the TAP device `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.bytes().any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::InvalidName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as; `file` is an
        // open tun fd.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach { name: name.into(), source: std::io::Error::last_os_error() });
        }
        // The kernel may have picked a name for a template; keep what it says.
        let actual =
            CStr::from_bytes_until_nul(&req.name).map(|c| c.to_string_lossy().into_owned()).unwrap_or(name.into());
        let tap = Tap { file, name: actual };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        tap.ioctl_int(TUNSETVNETHDRSZ, &hdr_len, "vnet header size")?;
        Ok(tap)
    }

    fn ioctl_int(&self, req: libc::c_ulong, arg: &libc::c_int, what: &'static str) -> Result<(), TapError> {
        // SAFETY: these TUN ioctls read one int through the pointer.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg as *const libc::c_int) } < 0 {
            return Err(TapError::Configure { name: self.name.clone(), what, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Tells the kernel which offloads the guest accepts on frames it receives (TUN_F_*).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "offloads",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio-net header first). `WouldBlock` when there is none.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "a/b", "has space", "0123456789abcdef"] {
            assert!(matches!(Tap::open(bad), Err(TapError::InvalidName(_))), "{bad:?}");
        }
    }
}
