// SPDX-License-Identifier: Apache-2.0
//! The `dirty` workload: one thread per CPU, each rewriting a memory region of its own page by
//! page, pass after pass, at its share of the rate, verifying before each write that the page
//! still holds the previous pass (see [`guest_common::dirty`]). Under live migration this is
//! both the load that keeps dirtying pages on every vCPU and the check that every page arrived.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use guest_common::dirty::{PAGES_PER_MIB, WORDS_PER_PAGE, share, verify_and_write};

/// Passes completed, per CPU.
static PASSES: OnceLock<Vec<AtomicU64>> = OnceLock::new();
/// Pages found not holding the previous pass, over all passes and CPUs.
pub static MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// Mismatch lines printed per pass and CPU; the rest are only counted (see `status`), so a
/// region that came back wholesale wrong does not flood a slow serial console.
const MAX_REPORTED_PER_PASS: u64 = 8;
/// Pages written between two looks at the clock when the rate is capped.
const CHUNK_PAGES: usize = 256;

/// Passes every CPU has completed (the least of them).
pub fn passes() -> u64 {
    PASSES.get().and_then(|p| p.iter().map(|p| p.load(Ordering::Relaxed)).min()).unwrap_or(0)
}

/// Allocates every CPU's region (so that a lack of memory shows before the ready line) and
/// starts the passes, one thread per CPU.
pub fn start(mib: u64, rate_mib_s: u64) -> Result<(), String> {
    if mib == 0 {
        say!("dirty: vmm.dirty_mib=0, nothing to do");
        return Ok(());
    }
    let cpus = crate::cpus::all().len();
    let mut regions = Vec::with_capacity(cpus);
    for cpu in 0..cpus {
        let (first_page, pages) = share(mib, cpus, cpu);
        let words = pages
            .checked_mul(WORDS_PER_PAGE as u64)
            .and_then(|w| usize::try_from(w).ok())
            .ok_or_else(|| format!("dirty: {mib} MiB is too large"))?;
        let mut region: Vec<u64> = Vec::new();
        region.try_reserve_exact(words).map_err(|e| format!("dirty: cannot allocate {mib} MiB: {e}"))?;
        // Zero is what pass 0 means (never written), so pass 1 verifies the allocation too.
        region.resize(words, 0);
        // Each CPU its share of the rate, in proportion to its share of the memory.
        let rate = rate_mib_s as f64 * pages as f64 / (mib * PAGES_PER_MIB) as f64;
        regions.push((region, first_page * WORDS_PER_PAGE as u64, rate));
    }
    let _ = PASSES.set((0..cpus).map(|_| AtomicU64::new(0)).collect());
    for (cpu, (mut region, first_word, rate)) in regions.into_iter().enumerate() {
        crate::cpus::spawn_on(cpu, "dirty", move || run(cpu, &mut region, first_word, rate))?;
    }
    Ok(())
}

fn run(cpu: usize, region: &mut [u64], first_word: u64, rate_mib_s: f64) {
    let mib = region.len() / (PAGES_PER_MIB as usize * WORDS_PER_PAGE);
    // 0 MiB/s means unthrottled; otherwise each chunk gets its share of a second.
    let chunk_bytes = (CHUNK_PAGES * WORDS_PER_PAGE * 8) as f64;
    let per_chunk = (rate_mib_s > 0.0).then(|| Duration::from_secs_f64(chunk_bytes / (rate_mib_s * (1 << 20) as f64)));
    let mut pass = 0u64;
    loop {
        pass += 1;
        let start = Instant::now();
        let mut next = start;
        let mut found = 0;
        for (chunk_no, chunk) in region.chunks_mut(CHUNK_PAGES * WORDS_PER_PAGE).enumerate() {
            for (page_no, page) in chunk.chunks_mut(WORDS_PER_PAGE).enumerate() {
                let first = first_word + ((chunk_no * CHUNK_PAGES + page_no) * WORDS_PER_PAGE) as u64;
                if let Some(m) = verify_and_write(page, first, pass) {
                    MISMATCHES.fetch_add(1, Ordering::Relaxed);
                    found += 1;
                    if found <= MAX_REPORTED_PER_PASS {
                        say!(
                            "DIRTY-MISMATCH pass={pass} index={} expected={:#018x} found={:#018x} cpu={cpu}",
                            m.index,
                            m.expected,
                            m.found
                        );
                    }
                }
            }
            if let Some(per_chunk) = per_chunk {
                // Sleep until this chunk is due. Time lost elsewhere (the VM paused for a
                // migration) is not made up with a burst: when behind, restart the schedule.
                next += per_chunk;
                let now = Instant::now();
                match next.checked_duration_since(now) {
                    Some(wait) => thread::sleep(wait),
                    None => next = now,
                }
            }
        }
        if let Some(p) = PASSES.get().and_then(|p| p.get(cpu)) {
            p.store(pass, Ordering::Relaxed);
        }
        say!("DIRTY pass={pass} mib={mib} ms={} cpu={cpu} mismatches={found}", start.elapsed().as_millis());
    }
}
