// SPDX-License-Identifier: Apache-2.0
//! `vmm.cpu_check=1` on the command line: a thread that keeps known values in the CPU's
//! registers and checks them, so that a migration that loses vCPU state shows.
//!
//! - XMM0–XMM15 (and their upper YMM halves where AVX is on) hold values loaded once per round
//!   and are compared against memory again and again inside one `asm!` block, never leaving user
//!   mode: when the VMM pauses the vCPU, they are live in the registers, so they travel in the
//!   vCPU's XSAVE state, not in the kernel's copy of the task.
//! - MXCSR and the x87 control word hold non-default values (round toward zero).
//! - The TSC (`rdtsc`, on the one vCPU the thread is pinned to) and `CLOCK_MONOTONIC` never go
//!   back; the current clock source is reported (`kvm-clock` on our VMM).
//!
//! Every 2 s it prints `CPU-CHECK rounds=N mismatches=M tsc_backwards=T clock_backwards=C
//! clocksource=S avx=0|1 cpu=K`; the first time each register goes wrong it prints
//! `CPU-CHECK-MISMATCH ...`. The thread runs at nice 19, so it takes a small share of its CPU
//! (and still makes progress when the workload keeps that CPU busy).

use std::arch::asm;
use std::time::{Duration, Instant};

/// The command-line word that turns the check on.
const PARAM: &str = "vmm.cpu_check=1";
/// Register checks per `asm!` call: a few ms natively, about a tenth of a second emulated.
const ITERATIONS: u64 = 100_000;
const REPORT_EVERY: Duration = Duration::from_secs(2);
/// MXCSR: all exceptions masked, round toward zero, flush to zero.
const MXCSR: u32 = 0xff80;
/// x87 control word: all exceptions masked, 64-bit precision, round toward zero.
const FPU_CW: u16 = 0x0f7f;

/// Starts the check if the command line asks for it.
pub fn start(cmdline: &str) -> Result<(), String> {
    if !cmdline.split_ascii_whitespace().any(|w| w == PARAM) {
        return Ok(());
    }
    crate::spawn("cpu-check", run)
}

/// The value register `reg` (0–15), 64-bit lane `lane` (0–3) holds in round `round`.
fn value(round: u64, reg: usize, lane: usize) -> u64 {
    // splitmix64: distinct, non-zero-looking values for every register, lane and round.
    let mut z = round.wrapping_mul(64).wrapping_add((reg * 4 + lane) as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Default)]
struct Counts {
    rounds: u64,
    mismatches: u64,
    tsc_backwards: u64,
    clock_backwards: u64,
}

fn run() {
    set_low_priority();
    let cpu = pin_to_last_cpu();
    let avx = std::is_x86_feature_detected!("avx");
    // SAFETY: writes MXCSR and the x87 control word of this thread only; the values mask every
    // floating-point exception, so no code of this thread can trap on them.
    unsafe {
        let mxcsr = MXCSR;
        asm!("ldmxcsr [{}]", in(reg) &mxcsr, options(nostack, readonly));
        let cw = FPU_CW;
        asm!("fldcw [{}]", in(reg) &cw, options(nostack, readonly));
    }
    let mut counts = Counts::default();
    let mut reported = [false; 19];
    let mut last_tsc = 0u64;
    let mut last_clock = monotonic_ns();
    let mut next_report = Instant::now();
    let mut expected = [[0u64; 4]; 16];
    let mut found = [[0u64; 4]; 16];
    loop {
        counts.rounds += 1;
        let lanes = if avx { 4 } else { 2 };
        for (reg, v) in expected.iter_mut().enumerate() {
            for (lane, word) in v.iter_mut().enumerate().take(lanes) {
                *word = value(counts.rounds, reg, lane);
            }
        }
        let bad = if avx {
            // SAFETY: AVX is present and enabled by the OS (checked above); the buffers are
            // 16 × 32 bytes, as the asm reads and writes.
            unsafe { hold_ymm(&expected, &mut found, ITERATIONS) }
        } else {
            // SAFETY: SSE2 is part of x86-64; the buffers are large enough (16 × 32 bytes).
            unsafe { hold_xmm(&expected, &mut found, ITERATIONS) }
        };
        if let Some(reg) = bad {
            counts.mismatches += 1;
            if !std::mem::replace(&mut reported[reg], true) {
                let name = if avx { "ymm" } else { "xmm" };
                say!(
                    "CPU-CHECK-MISMATCH what={name}{reg} round={} expected={:x?} found={:x?}",
                    counts.rounds,
                    &expected[reg][..lanes],
                    &found[reg][..lanes]
                );
            }
        }
        let (mxcsr, cw) = control_words();
        for (i, (what, got, want)) in
            [("mxcsr", u64::from(mxcsr), u64::from(MXCSR)), ("fpu_cw", u64::from(cw), u64::from(FPU_CW))]
                .into_iter()
                .enumerate()
        {
            if got != want {
                counts.mismatches += 1;
                if !std::mem::replace(&mut reported[16 + i], true) {
                    say!("CPU-CHECK-MISMATCH what={what} round={} expected={want:#x} found={got:#x}", counts.rounds);
                }
            }
        }
        // SAFETY: rdtsc has no preconditions.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        if tsc < last_tsc {
            counts.tsc_backwards += 1;
            if !std::mem::replace(&mut reported[18], true) {
                say!("CPU-CHECK-MISMATCH what=tsc round={} before={last_tsc} after={tsc}", counts.rounds);
            }
        }
        last_tsc = tsc;
        let clock = monotonic_ns();
        if clock < last_clock {
            counts.clock_backwards += 1;
            say!("CPU-CHECK-MISMATCH what=clock_monotonic before={last_clock} after={clock}");
        }
        last_clock = clock;
        if Instant::now() >= next_report {
            next_report = Instant::now() + REPORT_EVERY;
            say!(
                "CPU-CHECK rounds={} mismatches={} tsc_backwards={} clock_backwards={} clocksource={} avx={} cpu={cpu}",
                counts.rounds,
                counts.mismatches,
                counts.tsc_backwards,
                counts.clock_backwards,
                clocksource(),
                u8::from(avx)
            );
        }
    }
}

/// Loads XMM0–15 from `expected` (the low 16 bytes of each entry), then `iterations` times
/// stores them to `found` and compares; returns the first register that differed.
///
/// # Safety
/// The CPU must have SSE2 (every x86-64 CPU has).
unsafe fn hold_xmm(expected: &[[u64; 4]; 16], found: &mut [[u64; 4]; 16], iterations: u64) -> Option<usize> {
    let bad: u64;
    // SAFETY: reads 16 × 16 bytes at a 32-byte stride from `expected` and writes the same to
    // `found`, both 16 × 32 bytes; clobbers only the registers declared.
    unsafe {
        asm!(
            "movdqu xmm0, [{e}]", "movdqu xmm1, [{e} + 32]", "movdqu xmm2, [{e} + 64]", "movdqu xmm3, [{e} + 96]",
            "movdqu xmm4, [{e} + 128]", "movdqu xmm5, [{e} + 160]", "movdqu xmm6, [{e} + 192]",
            "movdqu xmm7, [{e} + 224]", "movdqu xmm8, [{e} + 256]", "movdqu xmm9, [{e} + 288]",
            "movdqu xmm10, [{e} + 320]", "movdqu xmm11, [{e} + 352]", "movdqu xmm12, [{e} + 384]",
            "movdqu xmm13, [{e} + 416]", "movdqu xmm14, [{e} + 448]", "movdqu xmm15, [{e} + 480]",
            "2:",
            "movdqu [{f}], xmm0", "movdqu [{f} + 32], xmm1", "movdqu [{f} + 64], xmm2", "movdqu [{f} + 96], xmm3",
            "movdqu [{f} + 128], xmm4", "movdqu [{f} + 160], xmm5", "movdqu [{f} + 192], xmm6",
            "movdqu [{f} + 224], xmm7", "movdqu [{f} + 256], xmm8", "movdqu [{f} + 288], xmm9",
            "movdqu [{f} + 320], xmm10", "movdqu [{f} + 352], xmm11", "movdqu [{f} + 384], xmm12",
            "movdqu [{f} + 416], xmm13", "movdqu [{f} + 448], xmm14", "movdqu [{f} + 480], xmm15",
            // Compare the two low words of each 32-byte entry.
            "xor {i:e}, {i:e}",
            "3:",
            "mov {t}, [{f} + {i} * 8]",
            "cmp {t}, [{e} + {i} * 8]",
            "jne 4f",
            "mov {t}, [{f} + {i} * 8 + 8]",
            "cmp {t}, [{e} + {i} * 8 + 8]",
            "jne 4f",
            "add {i}, 4",
            "cmp {i}, 64",
            "jb 3b",
            "dec {n}",
            "jnz 2b",
            "xor {i:e}, {i:e}",
            "jmp 5f",
            "4:",
            // Register number + 1 (index is in words, 4 per register).
            "shr {i}, 2",
            "inc {i}",
            "5:",
            e = in(reg) expected.as_ptr(),
            f = in(reg) found.as_mut_ptr(),
            n = inout(reg) iterations.max(1) => _,
            i = out(reg) bad,
            t = out(reg) _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
    }
    bad.checked_sub(1).map(|r| r as usize)
}

/// [`hold_xmm`] with the whole 32 bytes of YMM0–15.
///
/// # Safety
/// The CPU must have AVX, enabled by the OS (`is_x86_feature_detected!("avx")`).
#[target_feature(enable = "avx")]
unsafe fn hold_ymm(expected: &[[u64; 4]; 16], found: &mut [[u64; 4]; 16], iterations: u64) -> Option<usize> {
    let bad: u64;
    // SAFETY: reads 16 × 32 bytes from `expected` and writes 16 × 32 bytes to `found`; clobbers
    // only the registers declared.
    unsafe {
        asm!(
            "vmovdqu ymm0, [{e}]", "vmovdqu ymm1, [{e} + 32]", "vmovdqu ymm2, [{e} + 64]",
            "vmovdqu ymm3, [{e} + 96]", "vmovdqu ymm4, [{e} + 128]", "vmovdqu ymm5, [{e} + 160]",
            "vmovdqu ymm6, [{e} + 192]", "vmovdqu ymm7, [{e} + 224]", "vmovdqu ymm8, [{e} + 256]",
            "vmovdqu ymm9, [{e} + 288]", "vmovdqu ymm10, [{e} + 320]", "vmovdqu ymm11, [{e} + 352]",
            "vmovdqu ymm12, [{e} + 384]", "vmovdqu ymm13, [{e} + 416]", "vmovdqu ymm14, [{e} + 448]",
            "vmovdqu ymm15, [{e} + 480]",
            "2:",
            "vmovdqu [{f}], ymm0", "vmovdqu [{f} + 32], ymm1", "vmovdqu [{f} + 64], ymm2",
            "vmovdqu [{f} + 96], ymm3", "vmovdqu [{f} + 128], ymm4", "vmovdqu [{f} + 160], ymm5",
            "vmovdqu [{f} + 192], ymm6", "vmovdqu [{f} + 224], ymm7", "vmovdqu [{f} + 256], ymm8",
            "vmovdqu [{f} + 288], ymm9", "vmovdqu [{f} + 320], ymm10", "vmovdqu [{f} + 352], ymm11",
            "vmovdqu [{f} + 384], ymm12", "vmovdqu [{f} + 416], ymm13", "vmovdqu [{f} + 448], ymm14",
            "vmovdqu [{f} + 480], ymm15",
            "xor {i:e}, {i:e}",
            "3:",
            "mov {t}, [{f} + {i} * 8]",
            "cmp {t}, [{e} + {i} * 8]",
            "jne 4f",
            "inc {i}",
            "cmp {i}, 64",
            "jb 3b",
            "dec {n}",
            "jnz 2b",
            "xor {i:e}, {i:e}",
            "jmp 5f",
            "4:",
            "shr {i}, 2",
            "inc {i}",
            "5:",
            "vzeroupper",
            e = in(reg) expected.as_ptr(),
            f = in(reg) found.as_mut_ptr(),
            n = inout(reg) iterations.max(1) => _,
            i = out(reg) bad,
            t = out(reg) _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
            out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        );
    }
    bad.checked_sub(1).map(|r| r as usize)
}

/// MXCSR and the x87 control word as they are now.
fn control_words() -> (u32, u16) {
    let (mut mxcsr, mut cw) = (0u32, 0u16);
    // SAFETY: stores 4 and 2 bytes into the locals whose addresses are passed.
    unsafe {
        asm!("stmxcsr [{}]", in(reg) &mut mxcsr, options(nostack));
        asm!("fnstcw [{}]", in(reg) &mut cw, options(nostack));
    }
    (mxcsr, cw)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

fn clocksource() -> String {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string())
}

/// A small share of its CPU: nice 19 (a weight of 15 against a normal thread's 1024, about
/// 1.5 %), so the check hardly slows the workload or the services, yet keeps going when the
/// workload saturates the CPU. (`SCHED_IDLE`, tried first, gets a fifth of that: right after
/// a move inside the emulated nested host, where the destination's first touches of memory
/// kept a dirtying vCPU busy for minutes, the check made no round in 6 minutes.)
fn set_low_priority() {
    // SAFETY: on Linux, PRIO_PROCESS with 0 changes the calling thread's nice value only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        say!("cpu-check: cannot lower its priority: {}", std::io::Error::last_os_error());
    }
}

/// Pins this thread to the last CPU (an application processor when there are several), so that
/// the TSC it reads is always the same vCPU's. Returns that CPU.
fn pin_to_last_cpu() -> usize {
    let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            say!("cpu-check: cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(round: u64) -> [[u64; 4]; 16] {
        let mut e = [[0u64; 4]; 16];
        for (reg, v) in e.iter_mut().enumerate() {
            for (lane, w) in v.iter_mut().enumerate() {
                *w = value(round, reg, lane);
            }
        }
        e
    }

    #[test]
    fn registers_hold_their_values() {
        let expected = filled(7);
        let mut found = [[0u64; 4]; 16];
        // SAFETY: x86-64 has SSE2.
        assert_eq!(unsafe { hold_xmm(&expected, &mut found, 1000) }, None);
        for reg in 0..16 {
            assert_eq!(found[reg][..2], expected[reg][..2]);
        }
        if std::is_x86_feature_detected!("avx") {
            let mut found = [[0u64; 4]; 16];
            // SAFETY: AVX checked just above.
            assert_eq!(unsafe { hold_ymm(&expected, &mut found, 1000) }, None);
            assert_eq!(found, expected);
        }
    }

    #[test]
    fn values_differ_between_registers_and_rounds() {
        let (a, b) = (filled(1), filled(2));
        let mut all: Vec<u64> = a.iter().chain(&b).flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 * 16 * 4);
    }

    #[test]
    fn control_words_read_back() {
        // Defaults of a fresh thread (Linux sets MXCSR 0x1f80 and FCW 0x037f).
        let (mxcsr, cw) = std::thread::spawn(control_words).join().unwrap();
        assert_eq!(mxcsr & 0xffc0, 0x1f80);
        assert_eq!(cw, 0x037f);
    }
}
