// SPDX-License-Identifier: Apache-2.0
//! The `dirty` workload: rewrites a memory region page by page, pass after pass, at a bounded
//! rate, verifying before each write that the page still holds the previous pass (see
//! [`guest_common::dirty`]). Under live migration this is both the load that keeps dirtying
//! pages and the check that every page arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use guest_common::dirty::{WORDS_PER_PAGE, verify_and_write};

/// Passes completed so far.
pub static PASSES: AtomicU64 = AtomicU64::new(0);
/// Pages found not holding the previous pass, over all passes.
pub static MISMATCHES: AtomicU64 = AtomicU64::new(0);

const PAGES_PER_MIB: usize = (1 << 20) / (WORDS_PER_PAGE * 8);
/// Mismatch lines printed per pass; the rest are only counted (see `status`), so a region that
/// came back wholesale wrong does not flood a slow serial console.
const MAX_REPORTED_PER_PASS: u64 = 8;

/// Allocates the region and starts the passes on a thread of their own.
pub fn start(mib: u64, rate_mib_s: u64) -> Result<(), String> {
    if mib == 0 {
        say!("dirty: vmm.dirty_mib=0, nothing to do");
        return Ok(());
    }
    let words = mib
        .checked_mul(1 << 17)
        .and_then(|w| usize::try_from(w).ok())
        .ok_or_else(|| format!("dirty: {mib} MiB is too large"))?;
    let mut region: Vec<u64> = Vec::new();
    region.try_reserve_exact(words).map_err(|e| format!("dirty: cannot allocate {mib} MiB: {e}"))?;
    // Zero is what pass 0 means (never written), so pass 1 verifies the allocation too.
    region.resize(words, 0);
    crate::spawn("dirty", move || run(&mut region, mib, rate_mib_s))
}

fn run(region: &mut [u64], mib: u64, rate_mib_s: u64) -> ! {
    // 0 MiB/s means unthrottled. Otherwise each MiB gets 1/rate seconds.
    let per_mib = (rate_mib_s > 0).then(|| Duration::from_nanos(1_000_000_000 / rate_mib_s));
    let mut pass = 0u64;
    loop {
        pass += 1;
        let start = Instant::now();
        let mut next = start;
        let mut reported = 0;
        for (mib_no, chunk) in region.chunks_mut(PAGES_PER_MIB * WORDS_PER_PAGE).enumerate() {
            for (page_no, page) in chunk.chunks_mut(WORDS_PER_PAGE).enumerate() {
                let first = ((mib_no * PAGES_PER_MIB + page_no) * WORDS_PER_PAGE) as u64;
                if let Some(m) = verify_and_write(page, first, pass) {
                    MISMATCHES.fetch_add(1, Ordering::Relaxed);
                    if reported < MAX_REPORTED_PER_PASS {
                        reported += 1;
                        say!(
                            "DIRTY-MISMATCH pass={pass} index={} expected={:#018x} found={:#018x}",
                            m.index,
                            m.expected,
                            m.found
                        );
                    }
                }
            }
            if let Some(per_mib) = per_mib {
                // Sleep until this MiB is due. Time lost elsewhere (the VM paused for a
                // migration) is not made up with a burst: when behind, restart the schedule.
                next += per_mib;
                let now = Instant::now();
                match next.checked_duration_since(now) {
                    Some(wait) => thread::sleep(wait),
                    None => next = now,
                }
            }
        }
        PASSES.store(pass, Ordering::Relaxed);
        say!("DIRTY pass={pass} mib={mib} ms={}", start.elapsed().as_millis());
    }
}
