// SPDX-License-Identifier: Apache-2.0
//! What PID 1 does to the system: mounts, the console, the loopback interface, uptime and
//! poweroff.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Mode;

/// Mounts the pseudo file systems and a data disk (`/dev/vda`, ext4, at `/data`) if there is
/// one, makes sure fds 0-2 are the console and sets `lo` up. Each
/// step that fails is logged and skipped: a guest without sysfs can still run its workload.
pub fn setup() {
    mount(c"proc", c"/proc", c"proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
    mount(c"sysfs", c"/sys", c"sysfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
    mount(c"devtmpfs", c"/dev", c"devtmpfs", libc::MS_NOSUID);
    reopen_console();
    // A data disk (the first virtio-blk device, formatted ext4 by whoever made it) at /data,
    // only when init runs from its initramfs, as in a guest: run as PID 1 on a host (the init
    // tests), /dev/vda is the host's own disk.
    if std::path::Path::new("/dev/vda").exists() && root_is_initramfs() {
        mount(c"/dev/vda", c"/data", c"ext4", libc::MS_NOSUID | libc::MS_NODEV);
    }
    // eth0 needs nothing: the kernel's `ip=` (IP_PNP) configured it before running us.
    if let Err(e) = set_up(c"lo") {
        say!("init: cannot set lo up: {e}");
    }
}

/// Whether `/` is the kernel's initramfs (ramfs or tmpfs), as in our guest.
fn root_is_initramfs() -> bool {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes only into the struct it is given.
    if unsafe { libc::statfs(c"/".as_ptr(), &mut st) } != 0 {
        return false;
    }
    // statfs(2): RAMFS_MAGIC and TMPFS_MAGIC.
    const RAMFS: i64 = 0x8584_58f6;
    const TMPFS: i64 = 0x0102_1994;
    matches!(st.f_type, RAMFS | TMPFS)
}

fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong) {
    let dir = target.to_string_lossy();
    if let Err(e) = std::fs::create_dir_all(&*dir) {
        say!("init: cannot create {dir}: {e}");
        return;
    }
    // SAFETY: all strings are NUL-terminated and outlive the call; no data argument.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, std::ptr::null()) };
    let err = io::Error::last_os_error();
    // EBUSY: already mounted (the kernel may automount devtmpfs), which is what we want.
    if rc != 0 && err.raw_os_error() != Some(libc::EBUSY) {
        say!("init: cannot mount {fstype:?} on {dir}: {err}");
    }
}

/// The kernel opens `/dev/console` as fds 0-2 of init, but only if the initramfs has that node;
/// if it had not, open it now that devtmpfs is there, or nothing we print is seen.
fn reopen_console() {
    // SAFETY: F_GETFD only queries whether fd 1 is open.
    if unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0 {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console") else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: `console` is an open fd; dup2 onto 0-2, which are not open (or are ours).
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
    // `console` itself is closed on drop; the duplicates stay.
}

/// Sets interface `name` up (SIOCSIFFLAGS), keeping its other flags.
fn set_up(name: &CStr) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data for which all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming an interface; the kernel writes its flags into it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as for SIOCGIFFLAGS; the kernel only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Milliseconds since boot as `/proc/uptime` tells them (0 if it cannot be read).
pub fn uptime_ms() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/uptime") else {
        return 0;
    };
    let secs = text.split_ascii_whitespace().next().unwrap_or("");
    // "12345.67": parse the parts rather than go through f64 and its rounding.
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    let frac_ms: u64 = format!("{frac:0<3}").get(..3).and_then(|f| f.parse().ok()).unwrap_or(0);
    whole.parse::<u64>().unwrap_or(0).saturating_mul(1000).saturating_add(frac_ms)
}

/// Set by the first caller of [`poweroff`].
static POWERING_OFF: AtomicBool = AtomicBool::new(false);

/// Prints `GUEST-POWEROFF`, syncs and powers off; in test mode, exits with 0 instead. If several
/// threads ask at once, the first one does it and the others wait for the end.
pub fn poweroff(mode: Mode) -> ! {
    if POWERING_OFF.swap(true, Ordering::SeqCst) {
        crate::idle_forever();
    }
    say!("GUEST-POWEROFF");
    // The disk workload's file closed, so that /data can be unmounted below.
    crate::records::stop();
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if mode == Mode::Test {
        std::process::exit(0);
    }
    // Unmounted, the data disk's file system is clean (only this mount goes: the superblock
    // stays if anything else mounts it, as on a test host).
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c"/data".as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: nothing mounted there (no data disk); ENOENT: not even the directory (init
        // run as PID 1 on a host without /data, as the init tests do).
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            say!("init: cannot unmount /data: {e}");
        }
    }
    // A restart, not RB_POWER_OFF: the guest has no ACPI, so Linux cannot power it off. With
    // `reboot=k` a restart resets the machine through the i8042 keyboard controller, and our
    // VMM treats that reset as the guest's end and exits with code 0.
    // SAFETY: reboot with RB_AUTOBOOT does not return on success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    say!("init: reboot failed: {}", io::Error::last_os_error());
    crate::idle_forever()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_plausible() {
        // The host's /proc/uptime: anything but the error value 0.
        assert!(uptime_ms() > 0);
    }
}
