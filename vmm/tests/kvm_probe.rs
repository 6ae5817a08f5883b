// SPDX-License-Identifier: Apache-2.0
//! Probes of this host's KVM (see `vmm::probe`). They assert what our own guest kernel relies on
//! and print the whole table, so that on another KVM one sees at a glance what differs.

use vmm::probe::{self, Outcome, Program, Row, TIMER_COUNT_1MS, TIMER_TICKS};

fn kvm() -> Option<kvm_ioctls::Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("\n*** SKIPPED: /dev/kvm does not exist on this host; KVM probes did not run ***\n");
        return None;
    }
    Some(vmm::builder::open_kvm().expect("/dev/kvm exists but cannot be opened"))
}

fn run(kvm: &kvm_ioctls::Kvm, program: Program, cpl: u8, iterations: u64) -> Outcome {
    let row = Row { label: "", program, iterations: [None, None], arg1: 0, interrupts: false };
    probe::run_row(kvm, &row, cpl, iterations)
}

fn run_timer(kvm: &kvm_ioctls::Kvm, program: Program, cpl: u8) -> Outcome {
    let row = Row { label: "", program, iterations: [None, None], arg1: TIMER_COUNT_1MS, interrupts: true };
    probe::run_row(kvm, &row, cpl, TIMER_TICKS)
}

fn assert_done(o: &Outcome, what: &str) -> (u32, u64) {
    match o {
        Outcome::Done { value, exits, .. } => (*value, *exits),
        other => panic!("{what}: expected the probe to run to its end, got {other:?}"),
    }
}

#[test]
fn user_mode_runs_plain_code_sse_and_string_ops() {
    let Some(kvm) = kvm() else { return };
    for p in [Program::IntLoop, Program::SseLoop, Program::Popcnt, Program::Rdtsc] {
        assert_done(&run(&kvm, p, 3, 100_000), &format!("{p:?} at CPL 3"));
    }
    let row = Row { label: "", program: Program::RepMovs, iterations: [None, None], arg1: 64 << 10, interrupts: false };
    assert_done(&probe::run_row(&kvm, &row, 3, 10), "rep movsb at CPL 3");
}

#[test]
fn user_mode_exceptions_reach_the_guest_idt_and_return() {
    let Some(kvm) = kvm() else { return };
    assert_done(&run(&kvm, Program::Int3, 3, 1000), "int3 round trip from CPL 3");
    assert_done(&run(&kvm, Program::PageFault, 3, 1000), "page fault round trip from CPL 3");
    // Privileged instructions must fault at CPL 3 on any KVM.
    assert_eq!(run(&kvm, Program::Hlt, 3, 1), Outcome::Exception(13), "hlt at CPL 3 must #GP");
    assert_eq!(run(&kvm, Program::Wrmsr, 3, 1), Outcome::Exception(13), "wrmsr at CPL 3 must #GP");
}

#[test]
fn user_mode_mmio_exits_reach_the_vmm() {
    let Some(kvm) = kvm() else { return };
    let (_, exits) = assert_done(&run(&kvm, Program::MmioWrite, 3, 500), "MMIO writes from CPL 3");
    assert_eq!(exits, 500, "every MMIO write from CPL 3 is an exit the VMM sees");
    let (value, exits) = assert_done(&run(&kvm, Program::MmioRead, 3, 500), "MMIO reads from CPL 3");
    assert_eq!(exits, 500);
    assert_eq!(value, 0, "the read returns what the VMM answered");
}

#[test]
fn user_mode_takes_timer_interrupts_and_can_idle_through_an_int3_gate() {
    let Some(kvm) = kvm() else { return };
    let (ticks, _) = assert_done(&run_timer(&kvm, Program::Timer, 3), "LAPIC timer at CPL 3");
    assert!(u64::from(ticks) >= TIMER_TICKS, "got {ticks} ticks");
    let (ticks, _) = assert_done(&run_timer(&kvm, Program::Int3Halt, 3), "int3 halt gate");
    assert!(u64::from(ticks) >= TIMER_TICKS, "got {ticks} ticks");
}

#[test]
fn kernel_mode_runs_what_the_guest_boot_stub_needs() {
    let Some(kvm) = kvm() else { return };
    assert_done(&run(&kvm, Program::IntLoop, 0, 1000), "integer loop at CPL 0");
    let (value, _) = assert_done(&run(&kvm, Program::Wrmsr, 0, 10), "wrmsr at CPL 0");
    assert_eq!(value, 0x1234, "rdmsr reads back what wrmsr wrote");
    let (_, exits) = assert_done(&run(&kvm, Program::PortOut, 0, 100), "port I/O at CPL 0");
    assert_eq!(exits, 100);
    let (ticks, _) = assert_done(&run_timer(&kvm, Program::HltWait, 0), "hlt at CPL 0");
    assert!(u64::from(ticks) >= TIMER_TICKS);
}

#[test]
fn print_the_whole_table() {
    let Some(kvm) = kvm() else { return };
    // Not an assertion: this KVM's answers, for the reader of the test log.
    println!("\n{}", probe::table(&kvm));
}
