// SPDX-License-Identifier: Apache-2.0
//! A raw disk image file: positioned vectored I/O straight between the file and guest memory,
//! `fdatasync` for flushes, hole punching for discard and write-zeroes, the allocated extents
//! (SEEK_DATA/SEEK_HOLE) and the dirty-block bitmap a migration or a snapshot copies from.
//!
//! System calls: `open`, `flock`, `fstat`, `preadv`, `pwritev`, `pread64`, `pwrite64`,
//! `fdatasync`, `fallocate` (PUNCH_HOLE | KEEP_SIZE), `lseek` (SEEK_DATA, SEEK_HOLE), `close`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyBlocks;

/// Sector size of the virtio-blk interface.
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path} is in use by another process (locked)")]
    Locked { path: PathBuf },
    #[error("disk image {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is empty or not a whole number of 512-byte sectors ({size} bytes)")]
    BadSize { path: PathBuf, size: u64 },
    #[error("cannot {what} disk image {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

/// How a disk is used, as the user gave it and as a migration or a snapshot records it: the
/// disk's state besides its blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// On storage the destination of a migration reaches at the same path: never copied.
    pub shared: bool,
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    state: DiskState,
    dirty: DirtyBlocks,
}

impl Disk {
    /// Opens an existing image. A writable disk that is not shared is locked exclusively (a
    /// read-only one shared), so two VMMs never write one image; a shared disk is not locked,
    /// because during a migration both ends hold it.
    pub fn open(path: &Path, read_only: bool, shared: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?;
        Self::from_file(file, path, read_only, shared)
    }

    /// Creates a new sparse image of `size` bytes (the file must not exist), for a migration
    /// destination that receives a copied disk.
    pub fn create(path: &Path, size: u64, read_only: bool) -> Result<Self, DiskError> {
        // The guest's own view stays as the source had it: a read-only disk is still
        // written here, by the migration, through this handle.
        Self::create_in(Self::create_empty(path)?, path, size, read_only)
    }

    /// Creates a new, empty file for [`Disk::create_in`] (the file must not exist): a sandboxed
    /// destination creates its copied disks' files before it drops its privileges and gives them
    /// their size once the migration says it.
    pub fn create_empty(path: &Path) -> Result<File, DiskError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| DiskError::Open { path: path.to_path_buf(), source })
    }

    /// [`Disk::create`] on a file made by [`Disk::create_empty`].
    pub fn create_in(file: File, path: &Path, size: u64, read_only: bool) -> Result<Self, DiskError> {
        file.set_len(size).map_err(|source| DiskError::Io { what: "size", path: path.to_path_buf(), source })?;
        let mut disk = Self::from_file(file, path, false, false)?;
        disk.state.read_only = read_only;
        Ok(disk)
    }

    /// A second handle on the same open image (the same lock), with its own view of it: e.g.
    /// the device's, next to a migration's writer.
    pub fn try_clone(&self, read_only: bool, shared: bool) -> Result<Self, DiskError> {
        let path = self.state.path.clone();
        let file = self.file.try_clone().map_err(|source| DiskError::Open { path: path.clone(), source })?;
        let mut disk = Self::from_file(file, &path, false, true)?;
        disk.state.read_only = read_only;
        disk.state.shared = shared;
        Ok(disk)
    }

    fn from_file(file: File, path: &Path, read_only: bool, shared: bool) -> Result<Self, DiskError> {
        let meta = file.metadata().map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile { path: path.to_path_buf() });
        }
        let size = meta.len();
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(DiskError::BadSize { path: path.to_path_buf(), size });
        }
        if !shared {
            let op = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
                return Err(DiskError::Locked { path: path.to_path_buf() });
            }
        }
        let state = DiskState { path: path.to_path_buf(), size, read_only, shared };
        Ok(Disk { file, dirty: DirtyBlocks::new(size), state })
    }

    pub fn state(&self) -> &DiskState {
        &self.state
    }

    pub fn size(&self) -> u64 {
        self.state.size
    }

    pub fn read_only(&self) -> bool {
        self.state.read_only
    }

    pub fn dirty(&self) -> &DirtyBlocks {
        &self.dirty
    }

    /// Reads `offset..` into the buffers `iov` describes, all of them.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes for the whole call.
    pub unsafe fn read_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        // SAFETY: the caller vouches for the buffers.
        unsafe { self.transfer(iov, offset, false) }
    }

    /// Writes the buffers `iov` describes at `offset`, all of them, and marks them dirty.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads for the whole call.
    pub unsafe fn write_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        // SAFETY: the caller vouches for the buffers.
        let r = unsafe { self.transfer(iov, offset, true) };
        // Marked after the write, also a failed one (it may have written part).
        self.dirty.mark(offset, total);
        r
    }

    /// preadv/pwritev until every buffer is done: a short transfer goes on where it stopped.
    unsafe fn transfer(&self, mut iov: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        while !iov.is_empty() {
            let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: the iovecs are valid per the caller; the count is within the slice.
            let done = unsafe {
                if write {
                    libc::pwritev(fd, iov.as_ptr(), n, offset as libc::off_t)
                } else {
                    libc::preadv(fd, iov.as_ptr(), n, offset as libc::off_t)
                }
            };
            if done < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if done == 0 {
                // The image shrank under us (someone truncated it).
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the disk image ended early"));
            }
            let mut left = done as usize;
            offset += done as u64;
            while let Some(first) = iov.first_mut() {
                if left < first.iov_len {
                    first.iov_base = first.iov_base.cast::<u8>().wrapping_add(left).cast();
                    first.iov_len -= left;
                    break;
                }
                left -= first.iov_len;
                iov = &mut iov[1..];
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (the guest's FLUSH, and a migration's last act
    /// on a shared disk).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `offset..offset + len`; it reads as zero afterwards (discard and
    /// write-zeroes).
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own descriptor; no memory involved.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        let r = if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
        self.dirty.mark(offset, len);
        r
    }

    /// Reads `buf.len()` bytes at `offset` (migration and snapshot copies).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset` (a migration destination applying what it receives).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// The allocated extents, `(offset, length)` in order: what a copy must send. Holes read
    /// as zero and are never sent. On a file system without SEEK_DATA the whole disk is one
    /// extent.
    pub fn allocated_extents(&self) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let size = self.state.size as libc::off_t;
        let mut extents = Vec::new();
        let mut pos: libc::off_t = 0;
        while pos < size {
            // SAFETY: lseek on our own descriptor.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    // No data after `pos`.
                    Some(libc::ENXIO) => Ok(extents),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if extents.is_empty() && pos == 0 => {
                        Ok(vec![(0, self.state.size)])
                    }
                    _ => Err(e),
                };
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            let end = hole.min(size);
            if end > data {
                extents.push((data as u64, (end - data) as u64));
            }
            pos = end.max(data + 1);
        }
        Ok(extents)
    }

    /// Bytes the image takes on its file system (allocated blocks).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-block-{}-{name}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn extents_skip_holes_and_punching_makes_holes() {
        let p = temp_image("extents", 64 << 20);
        let disk = Disk::open(&p, false, false).unwrap();
        assert_eq!(disk.allocated_extents().unwrap(), vec![], "a new sparse image is all hole");
        disk.write_at(&[1u8; 8192], 1 << 20).unwrap();
        disk.write_at(&[2u8; 4096], 40 << 20).unwrap();
        let ext = disk.allocated_extents().unwrap();
        let total: u64 = ext.iter().map(|e| e.1).sum();
        assert!(ext.iter().any(|&(o, l)| o <= 1 << 20 && o + l >= (1 << 20) + 8192), "{ext:?}");
        assert!(ext.iter().any(|&(o, l)| o <= 40 << 20 && o + l >= (40 << 20) + 4096), "{ext:?}");
        assert!(total < 4 << 20, "only what was written, give or take the file system's block: {total}");
        disk.punch_hole(1 << 20, 8192).unwrap();
        let mut buf = [9u8; 8192];
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "a punched range reads as zero");
        assert_eq!(disk.allocated_extents().unwrap().len(), 1);
        drop(disk);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn bad_images_are_refused_with_clear_errors() {
        let missing = std::env::temp_dir().join("vmm-block-does-not-exist.img");
        let e = Disk::open(&missing, false, false).unwrap_err();
        assert!(e.to_string().contains("cannot open disk image"), "{e}");
        let odd = temp_image("odd", 1000);
        assert!(matches!(Disk::open(&odd, false, false), Err(DiskError::BadSize { .. })));
        std::fs::remove_file(&odd).unwrap();
        assert!(matches!(Disk::open(Path::new("/tmp"), true, false), Err(DiskError::NotAFile { .. })));
    }

    #[test]
    fn a_writable_disk_is_locked_against_a_second_user_but_a_shared_one_is_not() {
        let p = temp_image("lock", 1 << 20);
        let first = Disk::open(&p, false, false).unwrap();
        assert!(matches!(Disk::open(&p, false, false), Err(DiskError::Locked { .. })));
        assert!(Disk::open(&p, false, true).is_ok(), "shared disks are not locked");
        drop(first);
        assert!(Disk::open(&p, false, false).is_ok());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let p = temp_image("create", 1 << 20);
        assert!(Disk::create(&p, 1 << 20, false).is_err(), "never overwrite a file");
        std::fs::remove_file(&p).unwrap();
        let d = Disk::create(&p, 2 << 20, true).unwrap();
        assert_eq!(d.size(), 2 << 20);
        assert!(d.read_only());
        d.write_at(&[5; 512], 0).unwrap();
        drop(d);
        std::fs::remove_file(&p).unwrap();
    }
}
