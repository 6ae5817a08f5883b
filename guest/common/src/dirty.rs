// SPDX-License-Identifier: Apache-2.0
//! The `dirty` workload's memory pattern. Every 8-byte word holds a value derived from its index
//! and the pass number, so a page that a migration failed to carry (or carried from an older
//! pass) reads back wrong. The workload verifies each page holds the previous pass just before
//! it overwrites it with the next one, so every word is checked once per pass.

/// Words per 4 KiB page.
pub const WORDS_PER_PAGE: usize = 512;

/// The value word `index` holds after pass `pass` (pass 0 means never written: zero).
#[inline]
pub fn expected(pass: u64, index: u64) -> u64 {
    if pass == 0 { 0 } else { (pass << 44) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a }
}

/// Pages in a MiB.
pub const PAGES_PER_MIB: u64 = 256;

/// CPU `cpu`'s part of a `total_mib` MiB workload split between `cpus` CPUs, each over a region
/// of its own: (first page, pages), numbered as one region so that word indices (and so the
/// pattern) run on from one CPU's region into the next one's. The first CPUs take a page more
/// when the pages do not divide evenly.
pub fn share(total_mib: u64, cpus: usize, cpu: usize) -> (u64, u64) {
    let total = total_mib.saturating_mul(PAGES_PER_MIB);
    let (n, i) = (cpus.max(1) as u64, cpu as u64);
    let (base, extra) = (total / n, total % n);
    (i * base + i.min(extra), base + u64::from(i < extra))
}

/// A word that did not hold what it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Word index from the start of the region.
    pub index: u64,
    pub expected: u64,
    pub found: u64,
}

/// Checks that `page` (words `first..first + page.len()` of the region) holds pass `pass - 1`
/// and writes pass `pass` over it. Returns the first mismatch, if any; the page is written
/// either way so that one bad page is reported once, not on every pass.
pub fn verify_and_write(page: &mut [u64], first: u64, pass: u64) -> Option<Mismatch> {
    let mut bad = None;
    for (i, w) in page.iter_mut().enumerate() {
        let index = first + i as u64;
        let want = expected(pass.saturating_sub(1), index);
        // Volatile: the compiler must not assume it knows what memory holds across a migration.
        // SAFETY: `w` is a valid, aligned, exclusive reference.
        let found = unsafe { core::ptr::read_volatile(w) };
        if found != want && bad.is_none() {
            bad = Some(Mismatch { index, expected: want, found });
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(w, expected(pass, index)) };
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_verify_in_order() {
        let mut mem = [0u64; 2 * WORDS_PER_PAGE];
        for pass in 1..4 {
            for (p, page) in mem.chunks_mut(WORDS_PER_PAGE).enumerate() {
                assert_eq!(verify_and_write(page, (p * WORDS_PER_PAGE) as u64, pass), None, "pass {pass}");
            }
        }
    }

    #[test]
    fn a_stale_or_corrupt_word_is_reported() {
        let mut mem = [0u64; WORDS_PER_PAGE];
        assert_eq!(verify_and_write(&mut mem, 0, 1), None);
        let snapshot = mem;
        assert_eq!(verify_and_write(&mut mem, 0, 2), None);
        // Roll the page back one pass, as a migration that lost the last write would.
        mem = snapshot;
        let m = verify_and_write(&mut mem, 0, 3).unwrap();
        assert_eq!(m.index, 0);
        assert_eq!(m.expected, expected(2, 0));
        assert_eq!(m.found, expected(1, 0));
        mem[7] ^= 1;
        assert_eq!(verify_and_write(&mut mem, 0, 4).unwrap().index, 7);
    }

    #[test]
    fn shares_cover_the_region_once() {
        for (mib, cpus) in [(64, 1), (64, 3), (1, 4), (0, 2), (5, 32)] {
            let mut next = 0;
            for cpu in 0..cpus {
                let (first, pages) = share(mib, cpus, cpu);
                assert_eq!(first, next, "{mib} MiB on {cpus} CPUs, CPU {cpu}");
                next += pages;
            }
            assert_eq!(next, mib * PAGES_PER_MIB);
        }
        assert_eq!(share(64, 4, 3), (48 * 256, 16 * 256));
    }

    #[test]
    fn values_differ_between_passes_and_words() {
        assert_ne!(expected(1, 0), expected(2, 0));
        assert_ne!(expected(1, 0), expected(1, 1));
        assert_ne!(expected(1, 0), 0);
    }
}
