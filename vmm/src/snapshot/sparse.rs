// SPDX-License-Identifier: Apache-2.0
//! Sparse files with a chunk table: written chunk by chunk (pages that read as zero stay holes;
//! each chunk with data gets its CRC-64 in the table), and copied back out chunk by chunk with
//! every chunk checked. The memory file and copied disks are both made this way.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use migration::memory::is_zero;
use migration::snapshot::{ChunkTable, crc64};

use super::SnapshotError;

/// Granule of holes: a page.
const PAGE: usize = 4096;

/// Writes a new sparse file chunk by chunk.
pub struct SparseWriter {
    file: File,
    path: PathBuf,
    table: ChunkTable,
    /// Bytes written as data.
    pub data_bytes: u64,
}

impl SparseWriter {
    /// Creates `path` (which must not exist) with `len` bytes, all holes.
    pub fn create(path: &Path, len: u64, chunk_size: u64) -> Result<Self, SnapshotError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(SnapshotError::io("create", path))?;
        file.set_len(len).map_err(SnapshotError::io("size", path))?;
        Ok(SparseWriter { file, path: path.to_path_buf(), table: ChunkTable::new(chunk_size, len), data_bytes: 0 })
    }

    /// Chunk `index`'s content (its whole length): pages that read as zero are left as holes,
    /// the others written, and the chunk's CRC recorded if it holds any data. Chunks must come
    /// in order; a chunk never given stays a hole without data.
    pub fn put(&mut self, index: u64, content: &[u8]) -> Result<(), SnapshotError> {
        let base = index * self.table.chunk_size;
        let mut any = false;
        let mut run: Option<usize> = None;
        let pages = content.len().div_ceil(PAGE);
        for p in 0..=pages {
            let data = p < pages && !is_zero(&content[p * PAGE..((p + 1) * PAGE).min(content.len())]);
            match (data, run) {
                (true, None) => run = Some(p),
                (false, Some(start)) => {
                    let (a, b) = (start * PAGE, (p * PAGE).min(content.len()));
                    self.file
                        .write_all_at(&content[a..b], base + a as u64)
                        .map_err(SnapshotError::io("write", &self.path))?;
                    self.data_bytes += (b - a) as u64;
                    any = true;
                    run = None;
                }
                _ => {}
            }
        }
        if any {
            self.table.push_data(index, crc64(content));
        }
        Ok(())
    }

    /// Makes the file durable and returns its table.
    pub fn finish(self) -> Result<ChunkTable, SnapshotError> {
        self.file.sync_data().map_err(SnapshotError::io("sync", &self.path))?;
        Ok(self.table)
    }
}

/// Reads chunk `index` of `file` and checks it against `table`.
pub fn read_checked(
    file: &File,
    path: &Path,
    table: &ChunkTable,
    index: u64,
    buf: &mut Vec<u8>,
) -> Result<(), SnapshotError> {
    let len = table.chunk_len(index) as usize;
    buf.resize(len, 0);
    let off = index * table.chunk_size;
    file.read_exact_at(buf, off).map_err(SnapshotError::io("read", path))?;
    let got = crc64(buf);
    match table.crc(index) {
        Some(want) if want == got => Ok(()),
        want => Err(SnapshotError::Damaged(format!(
            "chunk {index} of {} (bytes {off:#x}..{:#x}) has CRC-64 {got:#018x}, the snapshot recorded {:#018x}",
            path.display(),
            off + len as u64,
            want.unwrap_or(0)
        ))),
    }
}

/// Copies every data chunk of `src` (described by `table`), checked, through `write(offset,
/// bytes)`, leaving out pages that read as zero. Returns the data bytes written.
pub fn copy_checked(
    src: &Path,
    table: &ChunkTable,
    mut write: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, SnapshotError> {
    let file = super::restore::open_regular(src)?;
    let len = file.metadata().map_err(SnapshotError::io("stat", src))?.len();
    if len != table.len {
        return Err(SnapshotError::Damaged(format!("{} has {len} bytes, {} were written", src.display(), table.len)));
    }
    let mut buf = Vec::new();
    let mut written = 0;
    for index in (0..table.chunks()).filter(|&i| table.has_data(i)) {
        read_checked(&file, src, table, index, &mut buf)?;
        let base = index * table.chunk_size;
        for (p, page) in buf.chunks(PAGE).enumerate() {
            if !is_zero(page) {
                write(base + (p * PAGE) as u64, page).map_err(SnapshotError::io("write", src))?;
                written += page.len() as u64;
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip_and_damage() {
        let dir = std::env::temp_dir().join(format!("vmm-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("f");
        let chunk = 4 * PAGE as u64;
        let mut w = SparseWriter::create(&path, 10 * chunk, chunk).unwrap();
        let mut c = vec![0u8; chunk as usize];
        c[PAGE + 5] = 1;
        c[3 * PAGE] = 2;
        w.put(1, &c).unwrap();
        w.put(2, &vec![0u8; chunk as usize]).unwrap();
        w.put(9, &vec![7u8; chunk as usize]).unwrap();
        assert_eq!(w.data_bytes, 2 * PAGE as u64 + chunk);
        let table = w.finish().unwrap();
        assert_eq!(table.data_chunks(), 2);
        assert!(table.has_data(1) && !table.has_data(2) && table.has_data(9));
        assert!(SparseWriter::create(&path, 1, chunk).is_err(), "never overwrites");

        let mut copy = vec![0u8; (10 * chunk) as usize];
        let n = copy_checked(&path, &table, |off, bytes| {
            copy[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2 * PAGE as u64 + chunk);
        assert_eq!(&copy[chunk as usize..2 * chunk as usize], &c[..]);
        assert!(copy[9 * chunk as usize..].iter().all(|b| *b == 7));

        // A flipped byte in a data chunk is found; one in a hole chunk is never read.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[9], 5 * chunk).unwrap();
        copy_checked(&path, &table, |_, _| Ok(())).unwrap();
        f.write_all_at(&[9], chunk + 7).unwrap();
        let e = copy_checked(&path, &table, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("chunk 1"), "{e}");
        f.set_len(9 * chunk).unwrap();
        assert!(copy_checked(&path, &table, |_, _| Ok(())).is_err(), "a short file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
