// SPDX-License-Identifier: Apache-2.0
//! Memory batches: the payload of `Memory` frames. A batch is a list of records, each a run of
//! contiguous guest pages that are either sent (their bytes follow) or all zero (nothing
//! follows: the destination makes them zero), so zero pages cost 16 bytes a run, not 4 KiB each.
//!
//! Record: `gpa: u64 | pages: u32 | kind: u32` (little endian), then `pages * 4096` bytes if
//! `kind` is [`KIND_DATA`].

/// Guest page size for migration purposes (KVM's dirty log granule).
pub const PAGE_SIZE: usize = 4096;
const RECORD_LEN: usize = 16;
pub const KIND_DATA: u32 = 0;
pub const KIND_ZERO: u32 = 1;

/// Whether a page is all zero.
pub fn is_zero(page: &[u8]) -> bool {
    // Eight bytes at a time; the compiler vectorises this.
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words is valid for any bit pattern;
        // align_to only yields correctly aligned words.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().fold(0, |acc, w| acc | w) == 0 && tail.iter().all(|b| *b == 0)
}

/// Builds a batch, merging adjacent pages of the same kind into one record.
#[derive(Default)]
pub struct BatchWriter {
    /// Initialised once and then overwritten batch after batch: the batch is its first `used`
    /// bytes. (Growing a vector for each page would zero every page before copying it.)
    buf: Vec<u8>,
    used: usize,
    /// (offset of the open record, gpa just past it, kind)
    open: Option<(usize, u64, u32)>,
    pub data_pages: u64,
    pub zero_pages: u64,
}

impl BatchWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        BatchWriter { buf: vec![0; bytes], ..Default::default() }
    }

    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.open = None;
        self.data_pages = 0;
        self.zero_pages = 0;
    }

    /// The next `n` bytes of the batch, to be written (the batch grows by `n`).
    fn append(&mut self, n: usize) -> &mut [u8] {
        let at = self.used;
        if self.buf.len() < at + n {
            self.buf.resize((at + n).max(self.buf.len() * 2), 0);
        }
        self.used += n;
        &mut self.buf[at..at + n]
    }

    fn extend_or_open(&mut self, gpa: u64, kind: u32) {
        if let Some((off, end, k)) = self.open
            && end == gpa
            && k == kind
        {
            let pages =
                u32::from_le_bytes([self.buf[off + 8], self.buf[off + 9], self.buf[off + 10], self.buf[off + 11]]);
            // A record holds at most u32::MAX pages; start a new one beyond that.
            if pages < u32::MAX {
                self.buf[off + 8..off + 12].copy_from_slice(&(pages + 1).to_le_bytes());
                self.open = Some((off, end + PAGE_SIZE as u64, k));
                return;
            }
        }
        let off = self.used;
        let record = self.append(RECORD_LEN);
        record[..8].copy_from_slice(&gpa.to_le_bytes());
        record[8..12].copy_from_slice(&1u32.to_le_bytes());
        record[12..].copy_from_slice(&kind.to_le_bytes());
        self.open = Some((off, gpa + PAGE_SIZE as u64, kind));
    }

    /// Adds the page at `gpa`, copied from `src`. A page that turns out all zero becomes a zero
    /// record.
    pub fn push_page(&mut self, gpa: u64, src: &[u8]) {
        debug_assert_eq!(src.len(), PAGE_SIZE);
        let _ = self.push_page_with(gpa, |dst| {
            dst.copy_from_slice(src);
            Ok::<(), ()>(())
        });
    }

    /// Adds the page at `gpa`, letting `fill` copy it straight into the batch (from guest
    /// memory that may be changing under us: what is copied is what is sent). A page that
    /// turns out all zero becomes a zero record.
    pub fn push_page_with<E>(&mut self, gpa: u64, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<(), E> {
        let (saved_len, saved_open) = (self.used, self.open);
        self.extend_or_open(gpa, KIND_DATA);
        let page = self.append(PAGE_SIZE);
        let filled = fill(page);
        if filled.is_ok() && !is_zero(page) {
            self.data_pages += 1;
            return Ok(());
        }
        // All zero (or not copied): take the page back out. Either a new record was opened
        // (the truncate removes it) or the open data record grew by one page (shrink it back).
        self.used = saved_len;
        if let Some((off, _, _)) = saved_open
            && self.open.map(|o| o.0) == Some(off)
        {
            let pages =
                u32::from_le_bytes([self.buf[off + 8], self.buf[off + 9], self.buf[off + 10], self.buf[off + 11]]);
            self.buf[off + 8..off + 12].copy_from_slice(&(pages - 1).to_le_bytes());
        }
        self.open = saved_open;
        filled?;
        self.push_zero(gpa);
        Ok(())
    }

    /// Adds a zero page at `gpa`.
    pub fn push_zero(&mut self, gpa: u64) {
        self.extend_or_open(gpa, KIND_ZERO);
        self.zero_pages += 1;
    }
}

/// One record of a batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub gpa: u64,
    pub pages: u32,
    /// The pages' bytes, or `None` for zero pages.
    pub data: Option<&'a [u8]>,
}

/// Errors in a received batch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("memory batch record truncated at byte {0}")]
    Truncated(usize),
    #[error("memory batch record of unknown kind {0}")]
    Kind(u32),
    #[error("memory batch record at {0:#x} is not page aligned or overflows")]
    Address(u64),
}

/// Iterates over the records of a received batch, validating each.
pub struct BatchReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BatchReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        BatchReader { buf, pos: 0 }
    }
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<Record<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos == self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.pos..];
        if rest.len() < RECORD_LEN {
            self.pos = self.buf.len();
            return Some(Err(BatchError::Truncated(self.pos)));
        }
        let mut gpa8 = [0u8; 8];
        gpa8.copy_from_slice(&rest[0..8]);
        let gpa = u64::from_le_bytes(gpa8);
        let pages = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let kind = u32::from_le_bytes([rest[12], rest[13], rest[14], rest[15]]);
        let bytes = u64::from(pages) * PAGE_SIZE as u64;
        if gpa % PAGE_SIZE as u64 != 0 || gpa.checked_add(bytes).is_none() {
            self.pos = self.buf.len();
            return Some(Err(BatchError::Address(gpa)));
        }
        let start = self.pos + RECORD_LEN;
        match kind {
            KIND_ZERO => {
                self.pos = start;
                Some(Ok(Record { gpa, pages, data: None }))
            }
            KIND_DATA => {
                let end = start.checked_add(bytes as usize).filter(|e| *e <= self.buf.len());
                let Some(end) = end else {
                    self.pos = self.buf.len();
                    return Some(Err(BatchError::Truncated(start)));
                };
                self.pos = end;
                Some(Ok(Record { gpa, pages, data: Some(&self.buf[start..end]) }))
            }
            k => {
                self.pos = self.buf.len();
                Some(Err(BatchError::Kind(k)))
            }
        }
    }
}

/// The indices of the set bits of a dirty bitmap (bit i of word w is page 64 * w + i).
pub fn set_bits(bitmap: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(w * 64 + b)
        })
    })
}

/// ORs `other` into `into` (they describe the same pages).
pub fn or_into(into: &mut [u64], other: &[u64]) {
    for (a, b) in into.iter_mut().zip(other) {
        *a |= *b;
    }
}

/// Number of set bits.
pub fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    #[test]
    fn runs_merge_and_zero_pages_cost_nothing() {
        let mut w = BatchWriter::default();
        w.push_page(0x1000, &page(1));
        w.push_page(0x2000, &page(2));
        w.push_page(0x3000, &page(0)); // zero: becomes a zero record
        w.push_page(0x4000, &page(0));
        w.push_page(0x5000, &page(5));
        w.push_page(0x9000, &page(9)); // not adjacent: new record
        assert_eq!((w.data_pages, w.zero_pages), (4, 2));
        assert_eq!(w.len(), 4 * RECORD_LEN + 4 * PAGE_SIZE);
        let recs: Vec<_> = BatchReader::new(w.as_bytes()).map(Result::unwrap).collect();
        assert_eq!(recs.len(), 4);
        assert_eq!((recs[0].gpa, recs[0].pages), (0x1000, 2));
        assert_eq!(&recs[0].data.unwrap()[PAGE_SIZE..PAGE_SIZE + 2], &[2, 2]);
        assert_eq!((recs[1].gpa, recs[1].pages, recs[1].data), (0x3000, 2, None));
        assert_eq!((recs[2].gpa, recs[2].pages), (0x5000, 1));
        assert_eq!((recs[3].gpa, recs[3].pages), (0x9000, 1));
    }

    #[test]
    fn a_zero_page_right_after_data_does_not_corrupt_the_data_record() {
        let mut w = BatchWriter::default();
        w.push_page(0, &page(7));
        w.push_page(0x1000, &page(0));
        w.push_page(0x2000, &page(8));
        let recs: Vec<_> = BatchReader::new(w.as_bytes()).map(Result::unwrap).collect();
        assert_eq!(recs.len(), 3);
        assert_eq!((recs[0].pages, recs[0].data.unwrap().len()), (1, PAGE_SIZE));
        assert_eq!(recs[1].data, None);
        assert_eq!(recs[2].data.unwrap()[0], 8);
    }

    #[test]
    fn bad_batches_are_errors() {
        let mut w = BatchWriter::default();
        w.push_page(0x1000, &page(3));
        let good = w.as_bytes().to_vec();
        assert!(matches!(BatchReader::new(&good[..good.len() - 1]).next(), Some(Err(BatchError::Truncated(_)))));
        assert!(matches!(BatchReader::new(&good[..10]).next(), Some(Err(BatchError::Truncated(_)))));
        let mut kind = good.clone();
        kind[12] = 9;
        assert_eq!(BatchReader::new(&kind).next(), Some(Err(BatchError::Kind(9))));
        let mut addr = good.clone();
        addr[0] = 1;
        assert!(matches!(BatchReader::new(&addr).next(), Some(Err(BatchError::Address(_)))));
        let mut big = good.clone();
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(BatchReader::new(&big).next(), Some(Err(BatchError::Truncated(_)))));
    }

    #[test]
    fn bitmap_helpers() {
        let mut a = vec![0b1010u64, 0, 1 << 63];
        assert_eq!(set_bits(&a).collect::<Vec<_>>(), vec![1, 3, 191]);
        or_into(&mut a, &[1, 2, 0]);
        assert_eq!(set_bits(&a).collect::<Vec<_>>(), vec![0, 1, 3, 65, 191]);
        assert_eq!(count(&a), 5);
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
