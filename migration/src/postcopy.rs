// SPDX-License-Identifier: Apache-2.0
//! Post-copy's messages: which pages the destination still lacks, a page request, and the
//! handshakes of the second connection and of a reconnection.
//!
//! After the switch the guest runs on the destination while part of its memory is still on the
//! source. Two connections carry it, each used one way at a time by one thread at each end, so
//! that either can be a TLS stream:
//!
//! - the main connection: the source pushes the pages in the background (`Memory` frames), then
//!   `PostcopyEnd`;
//! - the fault connection, opened by the source right after `PostcopyDirty`: the destination
//!   asks for the page a thread faulted on (`PageRequest`) and the source answers at once with a
//!   `Memory` frame holding it (and the pages after it that are still missing), ahead of
//!   everything queued on the main connection; at the end the destination says `PostcopyDone`.
//!
//! If the link breaks, the destination pauses the guest and waits; the source keeps its memory
//! and reconnects: `PostcopyResume` on a new main connection, answered with a `PostcopyDirty` of
//! the pages still missing, then a new fault connection, and the transfer goes on.

use serde::{Deserialize, Serialize};

use crate::memory::PAGE_SIZE;

/// Errors decoding post-copy messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PostcopyError {
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

fn invalid(what: &'static str, why: impl Into<String>) -> PostcopyError {
    PostcopyError::Invalid { what, why: why.into() }
}

/// Most regions a page bitmap may describe (guest memory has at most two).
const MAX_REGIONS: u32 = 16;

/// One bit per guest page, per memory region: the pages the destination must still get from
/// the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    /// (region start, pages, words): bit `i % 64` of word `i / 64` for page `i`.
    pub regions: Vec<(u64, u64, Vec<u64>)>,
}

impl PageBitmap {
    /// Pages set.
    pub fn count(&self) -> u64 {
        self.regions.iter().map(|(_, _, w)| crate::memory::count(w)).sum()
    }

    /// Whether the page at `gpa` is set.
    pub fn get(&self, gpa: u64) -> bool {
        self.index(gpa).is_some_and(|(r, p)| self.regions[r].2[p / 64] & (1 << (p % 64)) != 0)
    }

    /// (region, page) of `gpa`.
    pub fn index(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, (start, pages, _))| {
            let end = start.checked_add(pages.checked_mul(PAGE_SIZE as u64)?)?;
            (gpa >= *start && gpa < end).then(|| (i, ((gpa - start) / PAGE_SIZE as u64) as usize))
        })
    }

    /// The pages set here and not in `other` (a bitmap of the same regions; where the regions
    /// differ, all of this one's).
    pub fn without(&self, other: &PageBitmap) -> PageBitmap {
        let regions = self
            .regions
            .iter()
            .map(|(start, pages, words)| {
                let theirs = other.regions.iter().find(|(s, p, _)| s == start && p == pages);
                let w = match theirs {
                    Some((_, _, o)) => words.iter().zip(o).map(|(a, b)| a & !b).collect(),
                    None => words.clone(),
                };
                (*start, *pages, w)
            })
            .collect();
        PageBitmap { regions }
    }

    /// `u32` region count, then per region `u64` start, `u64` pages and the words, little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (start, pages, words) in &self.regions {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
            for w in words {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Decodes and checks a bitmap: it must describe exactly the regions `layout` (start, bytes)
    /// lists, with no bit past a region's last page.
    pub fn decode(bytes: &[u8], layout: &[(u64, u64)]) -> Result<PageBitmap, PostcopyError> {
        let what = "page bitmap";
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], PostcopyError> {
            let end = at.checked_add(n).filter(|&e| e <= bytes.len()).ok_or_else(|| invalid(what, "cut short"))?;
            let s = &bytes[at..end];
            at = end;
            Ok(s)
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
        let n = u32::from_le_bytes(take(4)?.try_into().unwrap_or_default());
        if n > MAX_REGIONS || n as usize != layout.len() {
            return Err(invalid(what, format!("{n} regions, guest memory has {}", layout.len())));
        }
        let mut regions = Vec::with_capacity(n as usize);
        for &(want_start, want_bytes) in layout {
            let start = u64_of(take(8)?);
            let pages = u64_of(take(8)?);
            if start != want_start || pages.checked_mul(PAGE_SIZE as u64) != Some(want_bytes) {
                return Err(invalid(what, format!("region {start:#x}+{pages} pages is not guest memory's")));
            }
            let words = pages.div_ceil(64) as usize;
            let raw = take(words.checked_mul(8).ok_or_else(|| invalid(what, "too large"))?)?;
            let w: Vec<u64> = raw.chunks_exact(8).map(u64_of).collect();
            if pages % 64 != 0 && w.last().is_some_and(|l| l >> (pages % 64) != 0) {
                return Err(invalid(what, "a bit past the region's end"));
            }
            regions.push((start, pages, w));
        }
        if at != bytes.len() {
            return Err(invalid(what, format!("{} bytes after the last region", bytes.len() - at)));
        }
        Ok(PageBitmap { regions })
    }
}

/// `PageRequest`: the page a destination thread faulted on.
pub fn encode_request(gpa: u64) -> [u8; 8] {
    gpa.to_le_bytes()
}

pub fn decode_request(bytes: &[u8]) -> Result<u64, PostcopyError> {
    let b: [u8; 8] = bytes.try_into().map_err(|_| invalid("page request", format!("{} bytes", bytes.len())))?;
    let gpa = u64::from_le_bytes(b);
    if gpa % PAGE_SIZE as u64 != 0 {
        return Err(invalid("page request", format!("{gpa:#x} is not page aligned")));
    }
    Ok(gpa)
}

/// The first frame on a post-copy connection: the fault connection (`PostcopyChannel`) or a
/// new main connection after a break (`PostcopyResume`). `id` is the migration's, from
/// `Start`: a connection without it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelHello {
    pub id: u64,
}

/// `PostcopyDone`: the destination has every page; its figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyDone {
    /// Faults on pages still on the source, asked for on the fault connection.
    pub faults: u64,
    /// Their latency, from the fault to the page in place: median and 99th percentile, µs.
    pub fault_latency_median_us: Option<u64>,
    pub fault_latency_p99_us: Option<u64>,
    /// Pages placed from what the source pushed.
    pub pages_pushed: u64,
    /// Pages placed from answers to faults.
    pub pages_requested: u64,
    /// Times the link broke and was taken up again.
    pub reconnects: u32,
    /// From the switch (the guest running here) to the last page, ms.
    pub duration_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trip_and_checks() {
        let layout = [(0u64, 130 * 4096u64), (1 << 32, 64 * 4096)];
        let mut b = PageBitmap { regions: vec![(0, 130, vec![0; 3]), (1 << 32, 64, vec![0; 1])] };
        b.regions[0].2[0] = 0b101;
        b.regions[0].2[2] = 0b11;
        b.regions[1].2[0] = 1 << 63;
        let bytes = b.encode();
        let back = PageBitmap::decode(&bytes, &layout).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.count(), 5);
        assert!(back.get(0) && !back.get(4096) && back.get(2 * 4096) && back.get(129 * 4096));
        assert!(back.get((1 << 32) + 63 * 4096) && !back.get(130 * 4096), "the gap is no page");

        assert!(PageBitmap::decode(&bytes[..bytes.len() - 1], &layout).is_err(), "cut short");
        assert!(PageBitmap::decode(&[bytes.clone(), vec![0]].concat(), &layout).is_err(), "trailing");
        assert!(PageBitmap::decode(&bytes, &layout[..1]).is_err(), "other layout");
        let mut past = b.clone();
        past.regions[0].2[2] = 0b100;
        assert!(PageBitmap::decode(&past.encode(), &layout).is_err(), "a bit past the end");
        let mut huge = bytes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(PageBitmap::decode(&huge, &layout).is_err());
    }

    #[test]
    fn without() {
        let a = PageBitmap { regions: vec![(0, 130, vec![0b1111, 0, 0b1]), (1 << 32, 64, vec![1 << 63])] };
        let b = PageBitmap { regions: vec![(0, 130, vec![0b0110, 0, 0]), (1 << 32, 64, vec![0])] };
        let rest = a.without(&b);
        assert_eq!(rest.regions[0].2, vec![0b1001, 0, 0b1]);
        assert_eq!(rest.regions[1].2, vec![1 << 63]);
        assert_eq!(rest.count(), 4);
        assert_eq!(b.without(&a).count(), 0, "every page of b is in a");
        let other = PageBitmap { regions: vec![(0, 64, vec![u64::MAX])] };
        assert_eq!(a.without(&other), a, "another layout takes nothing away");
    }

    #[test]
    fn requests() {
        assert_eq!(decode_request(&encode_request(0x5000)), Ok(0x5000));
        assert!(decode_request(&encode_request(0x5001)).is_err());
        assert!(decode_request(&[1, 2, 3]).is_err());
    }

    #[test]
    fn random_bitmaps_never_panic() {
        let layout = [(0u64, 1u64 << 20)];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for len in 0..300usize {
            let bytes: Vec<u8> = crate::random_bytes(&mut x, len);
            let _ = PageBitmap::decode(&bytes, &layout);
        }
    }
}
