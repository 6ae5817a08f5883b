// SPDX-License-Identifier: Apache-2.0
//! What this host's KVM runs natively, what it emulates and what it cannot run: tiny guests of a
//! few instructions each, run at CPL 3 and at CPL 0 and timed. On a paravirtual nested KVM
//! (kvm_pvm) guest kernel-mode code goes through KVM's instruction emulator; our own guest is
//! designed from this table (`vmm probe` prints it; `vmm/tests/kvm_probe.rs` checks what the
//! guest relies on).

pub mod machine;
pub mod programs;

use std::time::Duration;

use kvm_ioctls::Kvm;

pub use machine::{CPUID_MARKER, Outcome, ProbeRun};
pub use programs::Program;

/// One row of the table: a program measured at both privilege levels.
pub struct Row {
    pub label: &'static str,
    pub program: Program,
    /// Iterations at CPL 3 and CPL 0 (`None`: not run at that level).
    pub iterations: [Option<u64>; 2],
    pub arg1: u64,
    pub interrupts: bool,
}

/// LAPIC timer period used by the timer rows: 1 ms at KVM's 1 GHz APIC bus.
pub const TIMER_COUNT_1MS: u64 = 1_000_000;
/// Ticks the timer rows wait for.
pub const TIMER_TICKS: u64 = 20;

/// The probes, in table order.
pub fn rows() -> Vec<Row> {
    let row = |label, program, cpl3, cpl0| Row { label, program, iterations: [cpl3, cpl0], arg1: 0, interrupts: false };
    vec![
        row("integer loop (`dec; jnz`)", Program::IntLoop, Some(10_000_000), Some(100_000)),
        row("SSE loop (`xorps`)", Program::SseLoop, Some(10_000_000), Some(10_000)),
        row("`popcnt`", Program::Popcnt, Some(10_000_000), Some(10_000)),
        Row { arg1: 64 << 10, ..row("`rep movsb` of 64 KiB", Program::RepMovs, Some(1000), Some(2)) },
        row("`rdtsc`", Program::Rdtsc, Some(1_000_000), Some(10_000)),
        row("`cpuid` (leaf 0x40000000)", Program::Cpuid, Some(10_000), Some(1000)),
        row("`wrmsr` (KERNEL_GS_BASE)", Program::Wrmsr, Some(1000), Some(1000)),
        row("`xsave`", Program::Xsave, Some(100_000), Some(1000)),
        row("`int3` round trip (IDT gate to CPL 0, `iretq`)", Program::Int3, Some(100_000), Some(1000)),
        row("page fault round trip (#PF handler, `iretq`)", Program::PageFault, Some(100_000), Some(1000)),
        row("port I/O exit (`out` to the VMM)", Program::PortOut, Some(100_000), Some(10_000)),
        row("MMIO write exit (to the VMM)", Program::MmioWrite, Some(100_000), Some(10_000)),
        row("MMIO read exit (from the VMM)", Program::MmioRead, Some(100_000), Some(10_000)),
        row("`int 0x80` round trip (IDT gate to CPL 0, `iretq`)", Program::IntGate, Some(100_000), Some(1000)),
        row("`syscall` round trip (`sysretq`)", Program::Syscall, Some(100_000), Some(1000)),
        row("`hlt`", Program::Hlt, Some(1), None),
        Row {
            arg1: TIMER_COUNT_1MS,
            interrupts: true,
            ..row(
                "LAPIC timer interrupts, 1 ms periodic, LAPIC programmed by MMIO",
                Program::Timer,
                Some(TIMER_TICKS),
                Some(TIMER_TICKS),
            )
        },
        Row {
            arg1: TIMER_COUNT_1MS,
            interrupts: true,
            ..row("`hlt` until the timer fires", Program::HltWait, None, Some(TIMER_TICKS))
        },
        Row {
            arg1: TIMER_COUNT_1MS,
            interrupts: true,
            ..row(
                "`int3` as a halt gate (`sti; hlt; iretq`), woken by the timer",
                Program::Int3Halt,
                Some(TIMER_TICKS),
                None,
            )
        },
        Row {
            arg1: TIMER_COUNT_1MS,
            interrupts: true,
            ..row(
                "`syscall` to a `hlt; sysretq` entry, woken by the timer",
                Program::SyscallHalt,
                Some(TIMER_TICKS),
                Some(TIMER_TICKS),
            )
        },
    ]
}

/// Runs `program` at `cpl` with `iterations` and the row's other arguments.
pub fn run_row(kvm: &Kvm, row: &Row, cpl: u8, iterations: u64) -> Outcome {
    machine::run(
        kvm,
        ProbeRun {
            program: row.program,
            cpl,
            arg0: iterations,
            arg1: row.arg1,
            interrupts: row.interrupts,
            timeout: Duration::from_secs(30),
        },
    )
}

/// Words for one cell of the table.
pub fn describe(program: Program, outcome: &Outcome, iterations: u64) -> String {
    match outcome {
        Outcome::Done { value, elapsed, .. } => {
            let per = elapsed.as_secs_f64() * 1e9 / iterations.max(1) as f64;
            let cost = if per >= 1e6 {
                format!("{:.1} ms", per / 1e6)
            } else if per >= 1e3 {
                format!("{:.1} µs", per / 1e3)
            } else {
                format!("{per:.1} ns")
            };
            match program {
                Program::Cpuid if *value == CPUID_MARKER => {
                    format!("ok, answered by KVM; {cost} each")
                }
                Program::Cpuid => format!("ok, **host's values** (runs natively); {cost} each"),
                Program::Timer | Program::HltWait | Program::Int3Halt | Program::SyscallHalt => {
                    format!("ok, {value} ticks in {:.0} ms", elapsed.as_secs_f64() * 1e3)
                }
                Program::Hlt => "ok (returned)".into(),
                _ => format!("ok, {cost} each ({iterations} in {:.0} ms)", elapsed.as_secs_f64() * 1e3),
            }
        }
        Outcome::Exception(13) => "#GP".into(),
        Outcome::Exception(6) => "#UD".into(),
        Outcome::Exception(v) => format!("exception {v}"),
        Outcome::EmulationFailure(_) => "**KVM internal error** (emulation failure)".into(),
        Outcome::Timeout => "no result within 30 s".into(),
        Outcome::Error(e) => format!("error: {e}"),
    }
}

/// Runs every probe and returns the markdown table.
pub fn table(kvm: &Kvm) -> String {
    let mut out = String::from("| guest code | CPL 3 (user mode) | CPL 0 (kernel mode) |\n|---|---|---|\n");
    for row in rows() {
        let cells: Vec<String> = [3u8, 0]
            .iter()
            .zip(row.iterations)
            .map(|(&cpl, it)| match it {
                Some(n) => describe(row.program, &run_row(kvm, &row, cpl, n), n),
                None => "not run (would halt with nothing to wake it)".into(),
            })
            .collect();
        out += &format!("| {} | {} | {} |\n", row.label, cells[0], cells[1]);
    }
    out
}
