// SPDX-License-Identifier: Apache-2.0
//! Disk images for tests: files in the temporary directory, named after the test process and a
//! tag, and removed when dropped; sparse raw images, ext4 file systems made on them with the
//! host's `mkfs.ext4`, and `e2fsck`'s verdict on one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An image file, removed when dropped.
pub struct Image(pub PathBuf);

impl Image {
    /// A sparse image of `size` bytes.
    pub fn new(tag: &str, size: u64) -> Self {
        let p = Self::path(tag);
        std::fs::File::create(&p).expect("create image").set_len(size).expect("size image");
        Image(p)
    }

    /// A path for an image someone else creates (a migration's destination), removed when
    /// dropped too.
    pub fn future(tag: &str) -> Self {
        Image(Self::path(tag))
    }

    /// A sparse image of `size` bytes holding an empty ext4 file system (4 KiB blocks, few
    /// inodes). Its inode tables and journal are initialised now, so that the guest's kernel
    /// does not zero them in the background while a test watches its disk writes.
    pub fn ext4(tag: &str, size: u64) -> Self {
        let image = Self::new(tag, size);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-N", "256", "-m", "0", "-L", "vmm-data"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image.0)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mkfs.ext4 (package e2fsprogs): {e}"));
        assert!(
            out.status.success(),
            "mkfs.ext4 {} failed ({}): {}",
            image.0.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        image
    }

    fn path(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-test-{}-{tag}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// `--disk` for this image: `path=FILE` and `flags` (`""`, `",shared"`, ...).
    pub fn arg(&self, flags: &str) -> String {
        format!("path={}{flags}", self.0.display())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `e2fsck -fn` on the (unmounted) image at `path`: a full check that changes nothing. `Ok`
/// with its report if the file system is clean, `Err` with it if not.
pub fn fsck(path: &Path) -> Result<String, String> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run e2fsck (package e2fsprogs): {e}"))?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // 0: no errors; anything else (1 and 2 would mean corrected, which -n never does) is not clean.
    if out.status.success() {
        Ok(report)
    } else {
        Err(format!("e2fsck -fn {}: {}\n{report}", path.display(), out.status))
    }
}
