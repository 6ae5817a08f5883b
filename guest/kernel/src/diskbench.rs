// SPDX-License-Identifier: Apache-2.0
//! The `diskbench` workload: measures the first virtio-blk disk as this guest sees it, for the
//! benchmark that runs the same guest under our VMM and under QEMU. Over the first
//! `vmm.disk_mib` MiB: sequential 1 MiB writes (then a flush), sequential 1 MiB reads, then 4 KiB
//! random reads and writes at queue depth 1 and 32. One line per phase:
//!
//! `DISKBENCH phase=NAME ops=N bytes=N ns=N errors=N`
//!
//! then `DISKBENCH-DONE`; the guest then idles. Requests are polled, never interrupt-driven, as
//! the driver always does; a phase's time runs from its first request to its last completion on
//! kvmclock.

use alloc::vec::Vec;

use crate::clock;
use crate::virtio_blk::{S_OK, SECTOR, T_FLUSH, T_IN, T_OUT, VirtioBlk};

const SEQ_BYTES: u32 = 1 << 20;
const RAND_BYTES: u32 = 4096;
/// Random requests per phase at queue depth 1 and at 32.
const RAND_OPS_QD1: u64 = 8_000;
const RAND_OPS_QD32: u64 = 32_000;

struct Phase {
    name: &'static str,
    kind: u32,
    bytes: u32,
    depth: usize,
    /// `None`: sequential over the region once.
    random_ops: Option<u64>,
}

const PHASES: [Phase; 6] = [
    Phase { name: "seq_write", kind: T_OUT, bytes: SEQ_BYTES, depth: 1, random_ops: None },
    Phase { name: "seq_read", kind: T_IN, bytes: SEQ_BYTES, depth: 1, random_ops: None },
    Phase { name: "rand_read_qd1", kind: T_IN, bytes: RAND_BYTES, depth: 1, random_ops: Some(RAND_OPS_QD1) },
    Phase { name: "rand_write_qd1", kind: T_OUT, bytes: RAND_BYTES, depth: 1, random_ops: Some(RAND_OPS_QD1) },
    Phase { name: "rand_read_qd32", kind: T_IN, bytes: RAND_BYTES, depth: 32, random_ops: Some(RAND_OPS_QD32) },
    Phase { name: "rand_write_qd32", kind: T_OUT, bytes: RAND_BYTES, depth: 32, random_ops: Some(RAND_OPS_QD32) },
];

/// Runs every phase over the first `mib` MiB of `dev` (at most the disk) and reports each.
pub fn run(mut dev: VirtioBlk, mib: u64) {
    let region = (mib << 20).min(dev.capacity * SECTOR) / u64::from(SEQ_BYTES) * u64::from(SEQ_BYTES);
    if region == 0 {
        crate::println!("GUEST-ERROR diskbench: the disk is smaller than 1 MiB");
        return;
    }
    // One buffer per request in flight, sized for the largest request; filled with a pattern so
    // that writes are not all zero.
    let depth = PHASES.iter().map(|p| p.depth).max().unwrap_or(1).min(dev.slots());
    let mut bufs: Vec<Vec<u8>> =
        (0..depth).map(|i| (0..SEQ_BYTES as usize).map(|b| (b as u8) ^ (i as u8) ^ 0x5a).collect()).collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for p in &PHASES {
        let ops = p.random_ops.unwrap_or(region / u64::from(p.bytes));
        let depth = p.depth.min(depth);
        let blocks = region / u64::from(p.bytes);
        let mut free: Vec<usize> = (0..depth).collect();
        let (mut submitted, mut completed, mut errors) = (0u64, 0u64, 0u64);
        let start = clock::now_ns();
        while completed < ops {
            let mut pushed = false;
            while submitted < ops {
                let Some(slot) = free.pop() else { break };
                let block = match p.random_ops {
                    Some(_) => next(&mut rng) % blocks,
                    None => submitted,
                };
                let sector = block * u64::from(p.bytes) / SECTOR;
                dev.submit(slot, p.kind, sector, bufs[slot].as_mut_ptr() as u64, p.bytes);
                submitted += 1;
                pushed = true;
            }
            if pushed {
                dev.kick();
            }
            while let Some((slot, status)) = dev.poll() {
                completed += 1;
                errors += u64::from(status != S_OK);
                free.push(slot);
            }
            core::hint::spin_loop();
        }
        if p.kind == T_OUT && p.random_ops.is_none() {
            // The written data reaches the image (the host's page cache) before the reads.
            let mut none = [0u8; 0];
            errors += u64::from(dev.run(T_FLUSH, 0, &mut none) != S_OK);
        }
        let ns = clock::now_ns() - start;
        crate::println!(
            "DISKBENCH phase={} ops={ops} bytes={} ns={ns} errors={errors}",
            p.name,
            ops * u64::from(p.bytes)
        );
    }
    crate::println!("DISKBENCH-DONE");
}

/// xorshift64: a fixed, cheap sequence, the same under every monitor.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}
