// SPDX-License-Identifier: Apache-2.0
//! Disk batches: the payload of `Disk` frames, which carry a copied disk's blocks. A batch is a
//! list of records, each a byte range of one disk that is either sent (its bytes follow) or
//! reads as zero (nothing follows: the destination leaves or makes a hole there).
//!
//! Record: `disk: u32 | kind: u32 | offset: u64 | len: u64` (little endian), then `len` bytes if
//! `kind` is [`KIND_DATA`]. `disk` is the disk's index in the guest's configuration.

pub use crate::memory::{KIND_DATA, KIND_ZERO};

/// Bytes of a record header.
pub const DISK_RECORD_LEN: usize = 24;

/// Builds a batch.
#[derive(Default)]
pub struct DiskBatchWriter {
    buf: Vec<u8>,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

impl DiskBatchWriter {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.data_bytes = 0;
        self.zero_bytes = 0;
    }

    fn header(&mut self, disk: u32, kind: u32, offset: u64, len: u64) {
        self.buf.extend_from_slice(&disk.to_le_bytes());
        self.buf.extend_from_slice(&kind.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
    }

    /// Adds `data`, the bytes of `disk` at `offset`.
    pub fn push_data(&mut self, disk: u32, offset: u64, data: &[u8]) {
        self.header(disk, KIND_DATA, offset, data.len() as u64);
        self.buf.extend_from_slice(data);
        self.data_bytes += data.len() as u64;
    }

    /// Adds a range of `disk` that reads as zero.
    pub fn push_zero(&mut self, disk: u32, offset: u64, len: u64) {
        self.header(disk, KIND_ZERO, offset, len);
        self.zero_bytes += len;
    }
}

/// One record of a received batch.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskRecord<'a> {
    pub disk: u32,
    pub offset: u64,
    pub len: u64,
    /// The bytes, or `None` for a range that reads as zero.
    pub data: Option<&'a [u8]>,
}

/// Reads the records of a batch, refusing anything malformed.
pub struct DiskBatchReader<'a> {
    rest: &'a [u8],
}

impl<'a> DiskBatchReader<'a> {
    pub fn new(batch: &'a [u8]) -> Self {
        DiskBatchReader { rest: batch }
    }
}

impl<'a> Iterator for DiskBatchReader<'a> {
    type Item = Result<DiskRecord<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < DISK_RECORD_LEN {
            self.rest = &[];
            return Some(Err("a disk record header is cut short".into()));
        }
        let (h, rest) = self.rest.split_at(DISK_RECORD_LEN);
        let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let long = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
        let (disk, kind, offset, len) = (word(0), word(4), long(8), long(16));
        if offset.checked_add(len).is_none() {
            self.rest = &[];
            return Some(Err(format!("disk record at {offset} of {len} bytes overflows")));
        }
        let data = match kind {
            KIND_DATA => {
                let Some(n) = usize::try_from(len).ok().filter(|n| *n <= rest.len()) else {
                    self.rest = &[];
                    return Some(Err(format!("a disk record of {len} bytes is cut short")));
                };
                let (d, r) = rest.split_at(n);
                self.rest = r;
                Some(d)
            }
            KIND_ZERO => {
                self.rest = rest;
                None
            }
            other => {
                self.rest = &[];
                return Some(Err(format!("unknown disk record kind {other}")));
            }
        };
        Some(Ok(DiskRecord { disk, offset, len, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut w = DiskBatchWriter::default();
        w.push_data(0, 4096, b"abcd");
        w.push_zero(1, 1 << 30, 1 << 20);
        w.push_data(1, 0, &[]);
        assert_eq!((w.data_bytes, w.zero_bytes), (4, 1 << 20));
        let got: Vec<_> = DiskBatchReader::new(w.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                DiskRecord { disk: 0, offset: 4096, len: 4, data: Some(b"abcd".as_slice()) },
                DiskRecord { disk: 1, offset: 1 << 30, len: 1 << 20, data: None },
                DiskRecord { disk: 1, offset: 0, len: 0, data: Some(&[]) },
            ]
        );
    }

    #[test]
    fn malformed_batches_are_refused_never_a_panic() {
        let mut w = DiskBatchWriter::default();
        w.push_data(0, 0, &[1; 100]);
        let b = w.as_bytes();
        assert!(DiskBatchReader::new(&b[..b.len() - 1]).any(|r| r.is_err()), "data cut short");
        assert!(DiskBatchReader::new(&b[..10]).any(|r| r.is_err()), "header cut short");
        let mut bad = b.to_vec();
        bad[4] = 7;
        assert!(DiskBatchReader::new(&bad).any(|r| r.is_err()), "unknown kind");
        let mut huge = b.to_vec();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(DiskBatchReader::new(&huge).any(|r| r.is_err()), "length beyond the batch");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..500usize {
            let bytes: Vec<u8> = crate::random_bytes(&mut x, len);
            for r in DiskBatchReader::new(&bytes) {
                let _ = r;
            }
        }
    }
}
