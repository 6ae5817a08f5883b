// SPDX-License-Identifier: Apache-2.0
//! A destination's `Memory` batches into guest memory: each run of data pages mapped in with one
//! call before it is copied, zero pages written only where data was written before (fresh
//! memory is zero). Also the fuzzing entry point for memory batches.

use migration::memory::{BatchReader, PAGE_SIZE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::MigrateError;

/// Which pages received data: a zero page need not be written unless it held something.
pub struct Written {
    bits: Vec<u64>,
}

impl Written {
    pub fn new(mem: &crate::vstate::memory::GuestMemoryMmap) -> Self {
        let pages = (mem.last_addr().raw_value() / PAGE_SIZE as u64 + 1) as usize;
        Written { bits: vec![0; pages.div_ceil(64)] }
    }

    /// Marks `page`; returns whether it was marked before.
    fn mark(&mut self, page: usize) -> bool {
        let (w, b) = (page / 64, 1u64 << (page % 64));
        let Some(word) = self.bits.get_mut(w) else { return false };
        let was = *word & b != 0;
        *word |= b;
        was
    }

    fn is_marked(&self, page: usize) -> bool {
        self.bits.get(page / 64).is_some_and(|w| w & (1u64 << (page % 64)) != 0)
    }

    fn clear(&mut self, page: usize) -> bool {
        let (w, b) = (page / 64, 1u64 << (page % 64));
        let Some(word) = self.bits.get_mut(w) else { return false };
        let was = *word & b != 0;
        *word &= !b;
        was
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Runs shorter than this are left to fault in: populating a lone page costs more than its fault.
const POPULATE_MIN_PAGES: u32 = 4;

/// Maps in the fresh pages a run of data is about to fill, in one call: here (a nested KVM)
/// the copy's first touch of each page is a fault, about 3 µs a page with the copy, where
/// `MADV_POPULATE_WRITE` over the run and the copy after it take 2.3–2.6 µs a page for runs
/// of 4 pages or more (3.6 µs for a lone page; measured on a 256 MiB buffer). Best effort: on a
/// kernel without it (before 5.14), or a run that crosses regions, the copy faults the pages
/// in as before.
fn populate(mem: &crate::vstate::memory::GuestMemoryMmap, gpa: u64, len: usize) {
    let Ok(slice) = mem.get_slice(GuestAddress(gpa), len) else { return };
    // SAFETY: the range is `len` bytes of this VM's guest memory mapping (checked by
    // `get_slice`); populating pages does not change what they hold.
    unsafe { libc::madvise(slice.ptr_guard_mut().as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
}

/// Writes one `Memory` batch from the source into guest memory (the fuzzing entry point for
/// memory batches, too).
pub fn apply_batch(
    mem: &crate::vstate::memory::GuestMemoryMmap,
    batch: &[u8],
    written: &mut Written,
) -> Result<(), MigrateError> {
    for record in BatchReader::new(batch) {
        let record = record.map_err(|e| MigrateError::Memory(e.to_string()))?;
        let bytes = u64::from(record.pages) * PAGE_SIZE as u64;
        if !mem.check_range(GuestAddress(record.gpa), bytes as usize) {
            return Err(MigrateError::Memory(format!(
                "pages at {:#x}..{:#x} are outside guest memory",
                record.gpa,
                record.gpa.saturating_add(bytes)
            )));
        }
        let first = (record.gpa / PAGE_SIZE as u64) as usize;
        match record.data {
            Some(data) => {
                if record.pages >= POPULATE_MIN_PAGES
                    && (0..record.pages as usize).any(|p| !written.is_marked(first + p))
                {
                    populate(mem, record.gpa, data.len());
                }
                mem.write_slice(data, GuestAddress(record.gpa)).map_err(|e| MigrateError::Memory(e.to_string()))?;
                for p in 0..record.pages as usize {
                    written.mark(first + p);
                }
            }
            None => {
                for p in 0..record.pages as usize {
                    // Fresh memory is zero: only a page that got data before needs clearing.
                    if written.clear(first + p) {
                        let gpa = GuestAddress(((first + p) * PAGE_SIZE) as u64);
                        mem.write_slice(&ZERO_PAGE, gpa).map_err(|e| MigrateError::Memory(e.to_string()))?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use migration::memory::BatchWriter;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::memory::GuestMemoryMmap;

    fn page_at(mem: &GuestMemoryMmap, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut out, GuestAddress(page * PAGE_SIZE as u64)).expect("read back");
        out
    }

    /// Runs of data land where they belong whether their pages are fresh (mapped in ahead),
    /// already written, or a mix; zero records clear only what was written.
    #[test]
    fn batches_land_in_fresh_and_written_pages_alike() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
        let mut written = Written::new(&mem);
        let mut first = BatchWriter::with_capacity(1 << 20);
        for p in 0..16u64 {
            first.push_page(p * PAGE_SIZE as u64, &[p as u8 + 1; PAGE_SIZE]);
        }
        apply_batch(&mem, first.as_bytes(), &mut written).expect("first batch");
        // Pages 8..24: half written before, half fresh; page 3 becomes zero.
        let mut second = BatchWriter::with_capacity(1 << 20);
        for p in 8..24u64 {
            second.push_page(p * PAGE_SIZE as u64, &[0xa0 + p as u8; PAGE_SIZE]);
        }
        second.push_zero(3 * PAGE_SIZE as u64);
        apply_batch(&mem, second.as_bytes(), &mut written).expect("second batch");
        for p in 0..32u64 {
            let want = match p {
                3 | 24.. => 0,
                0..8 => p as u8 + 1,
                _ => 0xa0 + p as u8,
            };
            assert!(page_at(&mem, p).iter().all(|&b| b == want), "page {p} should be all {want:#x}");
        }
    }
}
