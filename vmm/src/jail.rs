// SPDX-License-Identifier: Apache-2.0
//! `vmm run --jail UID:GID`: once everything the VM needs from the host is open (see
//! [`crate::host`]), the VMM gives up the host: it moves into a mount namespace of its own whose
//! root is an empty, read-only tmpfs (`pivot_root`, then the old root is detached: not a
//! `chroot`, which a process with privileges can leave), drops every capability (bounding,
//! ambient, inheritable, permitted, effective), becomes UID:GID with no supplementary groups,
//! and sets no-new-privileges. The order follows Firecracker's jailer (`src/jailer/src/env.rs`):
//! namespaces and the file system first, while the privileges they need are still there, then
//! the credentials, then no-new-privileges; the seccomp filters come after, as each thread
//! starts.
//!
//! It must run while the process has one thread: mount namespaces, capabilities and
//! no-new-privileges belong to a thread, and a thread started before would keep the host's.
//!
//! `--jail-dir DIR[,rw]` shows a host directory inside the jail at the same path, read-only
//! unless `rw`: where a jailed VMM's snapshots are read (`--await-restore`) or written. Each is
//! opened without following symbolic links (`openat2`, `RESOLVE_NO_SYMLINKS`; procfs and sysfs
//! refused) and cloned (`open_tree`, that directory only) while the host's file system is still
//! there, and attached (`move_mount`) into the new root once it is in place, with `nosuid`,
//! `nodev` and `noexec`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, PathBuf};
use std::str::FromStr;

/// Who the VMM becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JailUser {
    pub uid: u32,
    pub gid: u32,
}

impl FromStr for JailUser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected UID:GID (numbers, not 0), got '{s}'");
        let (u, g) = s.split_once(':').ok_or_else(bad)?;
        let uid: u32 = u.parse().map_err(|_| bad())?;
        let gid: u32 = g.parse().map_err(|_| bad())?;
        // Root keeps what matters even without capabilities (files owned by root, /dev nodes).
        if uid == 0 || gid == 0 {
            return Err(bad());
        }
        Ok(JailUser { uid, gid })
    }
}

/// A host directory the jail shows at the same path (`--jail-dir DIR[,rw]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailDir {
    /// Absolute, without `.` or `..` (the path the jailed VMM uses for it too).
    pub path: PathBuf,
    /// Writable in the jail (by the jail's user, as the directory's permissions allow).
    pub writable: bool,
}

impl FromStr for JailDir {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (path, writable) = match s.rsplit_once(',') {
            Some((p, "rw")) => (p, true),
            Some((p, "ro")) => (p, false),
            Some((_, other)) => {
                return Err(format!(
                    "expected DIR[,rw] or DIR,ro (a DIR with a comma in it needs one of the two), got the option \
                     '{other}'"
                ));
            }
            None => (s, false),
        };
        // `components` also drops the `.`s inside a path.
        let path: PathBuf = std::path::Path::new(path).components().collect();
        let plain = path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !path.is_absolute() || !plain || path.parent().is_none() {
            return Err(format!("expected an absolute directory path other than / without . or .., got '{path:?}'"));
        }
        Ok(JailDir { path, writable })
    }
}

/// A step of entering the jail that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs a single-threaded process, but it has {0} threads")]
    Threads(usize),
    #[error("--jail needs root (CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID): {0}")]
    NotRoot(std::io::Error),
    #[error("jail: cannot make a mount namespace: {0}")]
    Unshare(std::io::Error),
    #[error("jail: cannot make the mounts private: {0}")]
    Private(std::io::Error),
    #[error("jail: none of {0} exists to mount the new root on")]
    NoMountPoint(&'static str),
    #[error("jail: cannot mount the new root: {0}")]
    MountRoot(std::io::Error),
    #[error("jail: cannot pivot into the new root: {0}")]
    PivotRoot(std::io::Error),
    #[error("jail: cannot detach the host's file system: {0}")]
    Detach(std::io::Error),
    #[error("jail: cannot make the new root read-only: {0}")]
    ReadOnly(std::io::Error),
    #[error("jail: cannot drop capability {0} from the bounding set: {1}")]
    Bounding(u32, std::io::Error),
    #[error("jail: cannot clear the ambient capabilities: {0}")]
    Ambient(std::io::Error),
    #[error("jail: cannot drop the supplementary groups: {0}")]
    Groups(std::io::Error),
    #[error("jail: cannot become group {0}: {1}")]
    Gid(u32, std::io::Error),
    #[error("jail: cannot become user {0}: {1}")]
    Uid(u32, std::io::Error),
    #[error("jail: cannot clear the capability sets: {0}")]
    Capset(std::io::Error),
    #[error("jail: cannot set no-new-privileges: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("jail: after dropping privileges the process still has {0}")]
    Check(String),
    #[error("jail: cannot take {0} into the jail: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("jail: {0} has a symbolic link in it: give the path it leads to")]
    DirSymlink(PathBuf),
    #[error("jail: {0} is on {1}, which a jail does not show")]
    DirKind(PathBuf, &'static str),
}

fn check(rc: libc::c_int, e: impl FnOnce(std::io::Error) -> JailError) -> Result<(), JailError> {
    if rc < 0 { Err(e(std::io::Error::last_os_error())) } else { Ok(()) }
}

/// Directories one of which the new root's tmpfs is mounted on (in the private namespace: the
/// host never sees it).
const MOUNT_POINTS: [&CStr; 3] = [c"/tmp", c"/mnt", c"/run"];
const MOUNT_POINT_NAMES: &str = "/tmp, /mnt, /run";

/// Threads of this process, from /proc (read before the host's file system goes).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Enters the jail, with `dirs` shown in it; see the module documentation.
pub fn enter(user: JailUser, dirs: &[JailDir]) -> Result<(), JailError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot(std::io::ErrorKind::PermissionDenied.into()));
    }
    enter_mount_namespace(dirs)?;
    drop_privileges(user)?;
    verify(user)
}

/// `open_tree(2)`'s flag for a detached copy of the mount.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount(2)`'s flag: the source is the file descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// procfs's and sysfs's `statfs` magic numbers: the host's processes and devices.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
const SYSFS_MAGIC: i64 = 0x6265_6572;

/// A detached copy of the directory `dir` (taken while the host's file system is there). Only
/// that directory, not the mounts below it.
fn clone_dir(dir: &JailDir) -> Result<OwnedFd, JailError> {
    let err = |e| JailError::Dir(dir.path.clone(), e);
    let path =
        CString::new(dir.path.as_os_str().as_bytes()).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    // No symbolic link is followed on the way: one that someone else put in the path would show
    // another directory in the jail than the one named.
    // SAFETY: all zeroes is a valid `open_how`.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: openat2 on a NUL-terminated path with a valid `open_how` of its size; checked.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, path.as_ptr(), &how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ELOOP) {
            JailError::DirSymlink(dir.path.clone())
        } else {
            err(e)
        });
    }
    // SAFETY: a new descriptor that nothing else owns.
    let at = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: all zeroes is a valid `statfs`; fstatfs fills it from our descriptor.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::fstatfs(at.as_raw_fd(), &mut fs) }, err)?;
    match fs.f_type as i64 {
        PROC_SUPER_MAGIC => return Err(JailError::DirKind(dir.path.clone(), "procfs")),
        SYSFS_MAGIC => return Err(JailError::DirKind(dir.path.clone(), "sysfs")),
        _ => {}
    }
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: open_tree of our descriptor itself (empty path); the result is checked.
    let tree = unsafe { libc::syscall(libc::SYS_open_tree, at.as_raw_fd(), c"".as_ptr(), flags) };
    if tree < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as RawFd) })
}

/// Attaches `tree` (from [`clone_dir`]) at `dir`'s path in the new root.
fn attach_dir(dir: &JailDir, tree: OwnedFd) -> Result<(), JailError> {
    let err = |e| JailError::Dir(dir.path.clone(), e);
    std::fs::create_dir_all(&dir.path).map_err(err)?;
    let path =
        CString::new(dir.path.as_os_str().as_bytes()).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: move_mount of a descriptor we own onto a NUL-terminated path; checked.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            path.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check(rc as libc::c_int, err)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if !dir.writable {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: remounting the bind mount just attached; checked.
    let rc = unsafe { libc::mount(std::ptr::null(), path.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    check(rc, err)
}

/// A mount namespace whose root is an empty, read-only tmpfs, with `dirs` in it.
fn enter_mount_namespace(dirs: &[JailDir]) -> Result<(), JailError> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: plain system calls on constant, NUL-terminated strings; each result is checked.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), JailError::Unshare)?;
        // Nothing mounted or unmounted here may reach the host's namespace.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            JailError::Private,
        )?;
    }
    // Before the tmpfs goes on: it may hide them (it is mounted on /tmp if there is one).
    let trees = dirs.iter().map(|d| clone_dir(d).map(|t| (d, t))).collect::<Result<Vec<_>, _>>()?;
    // SAFETY: as above.
    unsafe {
        let dir = MOUNT_POINTS
            .iter()
            .find(|d| std::path::Path::new(d.to_str().unwrap_or("")).is_dir())
            .ok_or(JailError::NoMountPoint(MOUNT_POINT_NAMES))?;
        check(
            libc::mount(
                c"vmm-jail".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"size=4k,mode=0555".as_ptr().cast(),
            ),
            JailError::MountRoot,
        )?;
        check(libc::chdir(dir.as_ptr()), JailError::PivotRoot)?;
        // pivot_root(".", "."): the old root ends up on top of the new one, at "/"; detaching it
        // then leaves the new root alone (pivot_root(2), "new_root and put_old may be the same").
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int, JailError::PivotRoot)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), JailError::Detach)?;
        check(libc::chdir(c"/".as_ptr()), JailError::Detach)?;
    }
    for (dir, tree) in trees {
        attach_dir(dir, tree)?;
    }
    // SAFETY: as above.
    unsafe {
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                std::ptr::null(),
            ),
            JailError::ReadOnly,
        )?;
    }
    Ok(())
}

/// Highest capability number the kernel knows; dropping stops at the first it does not.
const CAP_MAX: u32 = 63;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn drop_privileges(user: JailUser) -> Result<(), JailError> {
    // The bounding set needs CAP_SETPCAP: before the user changes.
    for cap in 0..=CAP_MAX {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // Past the last capability.
            }
            return Err(JailError::Bounding(cap, e));
        }
    }
    // SAFETY: prctl with integer arguments; setgroups with an empty list; set*id with plain ids.
    unsafe {
        check(
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0),
            JailError::Ambient,
        )?;
        check(libc::setgroups(0, std::ptr::null()), JailError::Groups)?;
        check(libc::setresgid(user.gid, user.gid, user.gid), |e| JailError::Gid(user.gid, e))?;
        // From root to a user: the kernel clears the permitted and effective sets.
        check(libc::setresuid(user.uid, user.uid, user.uid), |e| JailError::Uid(user.uid, e))?;
    }
    // The inheritable set survives a user change: clear everything explicitly.
    let header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a version 3 header and its two data words.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as libc::c_int, JailError::Capset)?;
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, JailError::NoNewPrivs)?;
    Ok(())
}

/// Checks the result from the kernel's side.
fn verify(user: JailUser) -> Result<(), JailError> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a version 3 header and room for its two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    check(rc as libc::c_int, JailError::Capset)?;
    if data.iter().any(|d| d.effective | d.permitted | d.inheritable != 0) {
        return Err(JailError::Check("capabilities".into()));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three ids.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [user.uid; 3] {
        return Err(JailError::Check(format!("user ids {r}/{e}/{s}")));
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return Err(JailError::Check("no-new-privileges off".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs() {
        let d = |p: &str, writable| Ok(JailDir { path: PathBuf::from(p), writable });
        assert_eq!("/srv/snaps".parse(), d("/srv/snaps", false));
        assert_eq!("/srv/snaps,ro".parse(), d("/srv/snaps", false));
        assert_eq!("/srv/snaps,rw".parse(), d("/srv/snaps", true));
        assert_eq!("/srv/./snaps/,rw".parse(), d("/srv/snaps", true));
        for bad in ["", "/", "snaps", "./snaps", "/srv/../etc", "/srv,rx", ",rw"] {
            assert!(bad.parse::<JailDir>().is_err(), "{bad}");
        }
    }

    #[test]
    fn users() {
        assert_eq!("1000:100".parse(), Ok(JailUser { uid: 1000, gid: 100 }));
        for bad in ["", "1000", "0:100", "100:0", "a:b", "1:2:3", "-1:5", "1000:"] {
            assert!(bad.parse::<JailUser>().is_err(), "{bad}");
        }
    }

    /// The whole jail, in a child process: its file system is empty, it cannot get root back,
    /// and it has no capabilities.
    #[test]
    fn a_jailed_child_sees_nothing_and_cannot_regain_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("*** SKIPPED a_jailed_child_sees_nothing_and_cannot_regain_root: needs root ***");
            return;
        }
        // The test harness has threads: fork a single-threaded child to jail.
        // SAFETY: the child only makes system calls (and the jail's, which allocate; the
        // child is single-threaded, so no lock can be held by another thread of it).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match enter(JailUser { uid: 65534, gid: 65534 }, &[]) {
                Err(_) => 10,
                Ok(()) => {
                    let empty = std::fs::read_dir("/").map(|d| d.count() == 0).unwrap_or(false);
                    let no_write = std::fs::write("/x", b"x").is_err();
                    // SAFETY: trying to get root back; must fail.
                    let stuck = unsafe { libc::setuid(0) } != 0;
                    let no_etc = !std::path::Path::new("/etc/passwd").exists();
                    if !empty {
                        11
                    } else if !no_write {
                        12
                    } else if !stuck {
                        13
                    } else if !no_etc {
                        14
                    } else {
                        0
                    }
                }
            };
            // SAFETY: ending the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "1x = a check failed (see the child's code)");
    }
}
