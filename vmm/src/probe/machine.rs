// SPDX-License-Identifier: Apache-2.0
//! The probe machine: one vCPU in 64-bit mode, entered directly at CPL 0 or CPL 3, with a GDT
//! that has user segments, a TSS (for the stack switch on interrupts from CPL 3), an IDT pointing
//! at the probe runtime, and an identity map of the first 4 GiB that user mode may access
//! (RAM, the LAPIC and a device window alike).

use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use vm_device::device_manager::IoManager;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

use super::programs::{Program, runtime};
use crate::arch::cpuid::{CpuTemplate, normalize};
use crate::arch::gdt::{gdt_entry, kvm_segment_from_gdt};
use crate::arch::msr::{MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK};
use crate::vstate::memory::create_guest_memory;
use crate::vstate::vcpu::{Vcpu, VcpuShared, clear_kick_target, init_kick_signal, kick_signal, set_kick_target};
use crate::vstate::vm::Vm;

const MEM_SIZE: u64 = 16 << 20;
const GDT_ADDR: u64 = 0x1000;
const IDT_ADDR: u64 = 0x2000;
const TSS_ADDR: u64 = 0x3000;
/// The timer handler counts ticks here.
const TICKS_ADDR: u64 = 0x5000;
const KERNEL_STACK_TOP: u64 = 0x7ff0;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
pub const RUNTIME_ADDR: u64 = 0x10000;
pub const CODE_ADDR: u64 = 0x10_0000;
const USER_STACK_TOP: u64 = 0x1f_fff0;

/// Kernel code selector: GDT entry 1. Entries 2-5 are kernel data, user data, user code, TSS.
const SEL_KERNEL_CODE: u16 = 0x08;

/// MMIO addresses of the probe protocol, and the port and window whose exits are measured.
pub const REPORT_DONE: u64 = 0xd000_1000;
pub const REPORT_EXCEPTION: u64 = 0xd000_1008;
pub const PORT_MEASURED: u16 = 0x513;
pub const MMIO_MEASURED: u64 = 0xd000_0000;

/// What CPUID leaf 0x4000_0000 EBX is set to in the probe VM: if a guest reads it back, its
/// CPUID is answered by KVM; if it reads the host's, CPUID runs natively.
pub const CPUID_MARKER: u32 = 0x2156_4d4d; // "MMV!"

/// How a probe ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The program ran to its end; the value it reported last.
    Done { value: u32, elapsed: Duration, exits: u64 },
    /// The guest took an exception the runtime does not handle (e.g. #GP = 13).
    Exception(u32),
    /// KVM could not emulate an instruction.
    EmulationFailure(String),
    /// Still running at the deadline.
    Timeout,
    /// Any other failure.
    Error(String),
}

/// One probe run: a program at a privilege level with its arguments.
#[derive(Debug, Clone, Copy)]
pub struct ProbeRun {
    pub program: Program,
    pub cpl: u8,
    pub arg0: u64,
    pub arg1: u64,
    /// Start with interrupts enabled (IF = 1).
    pub interrupts: bool,
    pub timeout: Duration,
}

fn idt_gate(handler: u64, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&SEL_KERNEL_CODE.to_le_bytes());
    g[5] = 0x8e | (dpl << 5); // present, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

fn segment(entry: u64, index: u8, rpl: u16) -> kvm_segment {
    let mut s = kvm_segment_from_gdt(entry, index);
    s.selector |= rpl;
    s
}

/// Runs one probe in a fresh VM.
pub fn run(kvm: &Kvm, probe: ProbeRun) -> Outcome {
    match run_inner(kvm, probe) {
        Ok(o) => o,
        Err(e) => Outcome::Error(e),
    }
}

fn run_inner(kvm: &Kvm, probe: ProbeRun) -> Result<Outcome, String> {
    let mem = create_guest_memory(MEM_SIZE).map_err(|e| e.to_string())?;
    let vm = Vm::new(kvm, mem.clone()).map_err(|e| e.to_string())?;
    let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|e| e.to_string());

    // GDT: null, kernel code/data, user data/code (DPL 3), 16-byte TSS descriptor.
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0xc0f3, 0, 0xfffff),
        gdt_entry(0xa0fb, 0, 0xfffff),
        gdt_entry(0x0089, TSS_ADDR as u32, 103),
        0,
    ];
    for (i, e) in gdt.iter().enumerate() {
        w(mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64)))?;
    }
    // TSS: RSP0 for interrupts taken at CPL 3; no I/O bitmap (IOPL 3 allows user port I/O).
    w(mem.write_obj(KERNEL_STACK_TOP, GuestAddress(TSS_ADDR + 4)))?;
    w(mem.write_obj(104u16, GuestAddress(TSS_ADDR + 102)))?;

    // IDT: every exception to a reporting stub, then the handlers.
    let rt = runtime();
    w(mem.write_slice(rt.bytes, GuestAddress(RUNTIME_ADDR)))?;
    let mut gates: Vec<(u8, u64, u8)> = (0..32u8).map(|v| (v, RUNTIME_ADDR + 16 * u64::from(v), 0)).collect();
    let int3 = if probe.program == Program::Int3Halt { rt.int3_halt } else { rt.int3 };
    gates[3] = (3, RUNTIME_ADDR + int3 as u64, 3);
    gates[14] = (14, RUNTIME_ADDR + rt.page_fault as u64, 0);
    gates.push((0x20, RUNTIME_ADDR + rt.timer as u64, 0));
    gates.push((0x80, RUNTIME_ADDR + rt.int_gate as u64, 3));
    gates.push((0xff, RUNTIME_ADDR + rt.spurious as u64, 0));
    for (vector, handler, dpl) in gates {
        w(mem.write_slice(&idt_gate(handler, dpl), GuestAddress(IDT_ADDR + 16 * u64::from(vector))))?;
    }

    // Identity map of 4 GiB with 2 MiB pages, all user-accessible.
    w(mem.write_obj(PDPT_ADDR | 0x7, GuestAddress(PML4_ADDR)))?;
    for i in 0..4u64 {
        w(mem.write_obj((PD_ADDR + i * 0x1000) | 0x7, GuestAddress(PDPT_ADDR + i * 8)))?;
    }
    for i in 0..2048u64 {
        w(mem.write_obj((i << 21) | 0x87, GuestAddress(PD_ADDR + i * 8)))?;
    }
    w(mem.write_slice(probe.program.bytes(), GuestAddress(CODE_ADDR)))?;
    w(mem.write_obj(0u64, GuestAddress(TICKS_ADDR)))?;

    let mut vcpu = Vcpu::new(kvm, &vm, 0, Arc::new(IoManager::new()), Arc::new(VcpuShared::default()))
        .map_err(|e| e.to_string())?;
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| e.to_string())?;
    normalize(&mut cpuid, 0, 1, CpuTemplate::Host);
    let has_xsave =
        kvm.check_extension(Cap::Xsave) && cpuid.as_slice().iter().any(|e| e.function == 1 && e.ecx & (1 << 26) != 0);
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 0x4000_0000) {
        e.ebx = CPUID_MARKER;
    }
    let fd = vcpu.fd();
    fd.set_cpuid2(&cpuid).map_err(|e| e.to_string())?;

    let user = probe.cpl == 3;
    let (cs, ss) = if user {
        (segment(gdt[4], 4, 3), segment(gdt[3], 3, 3))
    } else {
        (segment(gdt[1], 1, 0), segment(gdt[2], 2, 0))
    };
    let mut tr = kvm_segment_from_gdt(gdt[5], 5);
    tr.type_ = 0xb; // busy 64-bit TSS, as after LTR
    let mut sregs: kvm_sregs = fd.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs = cs;
    sregs.ss = ss;
    sregs.ds = ss;
    sregs.es = ss;
    sregs.fs = ss;
    sregs.gs = ss;
    sregs.tr = tr;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    // PE | MP | ET | NE | WP | PG
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4_ADDR;
    // PAE | OSFXSR | OSXMMEXCPT (SSE usable), OSXSAVE where KVM offers XSAVE.
    sregs.cr4 = 0x20 | 0x200 | 0x400 | if has_xsave { 1 << 18 } else { 0 };
    sregs.efer = 0x501; // SCE | LME | LMA
    fd.set_sregs(&sregs).map_err(|e| e.to_string())?;
    if has_xsave {
        let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 3; // x87 | SSE
        fd.set_xcrs(&xcrs).map_err(|e| e.to_string())?;
    }
    let regs = kvm_regs {
        rip: CODE_ADDR,
        rsp: if user { USER_STACK_TOP } else { KERNEL_STACK_TOP },
        // Reserved bit 1, IOPL 3 (port I/O, CLI/STI from CPL 3), IF on request.
        rflags: 0x2 | 0x3000 | if probe.interrupts { 0x200 } else { 0 },
        rdi: probe.arg0,
        rsi: probe.arg1,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(|e| e.to_string())?;
    // SYSCALL: kernel CS/SS from STAR[47:32], user CS/SS from STAR[63:48] (+16 / +8), entry at
    // LSTAR, no RFLAGS bits masked.
    let lstar =
        RUNTIME_ADDR + if probe.program == Program::SyscallHalt { rt.syscall_halt } else { rt.syscall_ret } as u64;
    let msrs =
        [(MSR_STAR, (0x10u64 << 48) | (u64::from(SEL_KERNEL_CODE) << 32)), (MSR_LSTAR, lstar), (MSR_SYSCALL_MASK, 0)]
            .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() });
    let msrs = Msrs::from_entries(&msrs).map_err(|e| format!("{e:?}"))?;
    fd.set_msrs(&msrs).map_err(|e| e.to_string())?;

    // Run on a thread of its own so that a probe that never ends can be stopped by a kick.
    init_kick_signal().map_err(|e| e.to_string())?;
    let (tx, rx) = channel();
    let thread = std::thread::spawn(move || {
        set_kick_target(vcpu.fd_mut());
        let outcome = drive(&mut vcpu);
        clear_kick_target();
        let _ = tx.send(());
        outcome
    });
    if rx.recv_timeout(probe.timeout).is_err() {
        let _ = thread.kill(kick_signal());
    }
    let outcome = thread.join().map_err(|_| "probe thread panicked".to_string())?;
    drop(vm);
    Ok(outcome)
}

fn drive(vcpu: &mut Vcpu) -> Outcome {
    let start = Instant::now();
    let mut exits = 0u64;
    loop {
        let fd = vcpu.fd_mut();
        let exit = match fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Outcome::Timeout;
            }
            Err(e) => return Outcome::Error(format!("KVM_RUN: {e}")),
        };
        match exit {
            VcpuExit::MmioWrite(REPORT_DONE, data) => {
                return Outcome::Done { value: le32(data), elapsed: start.elapsed(), exits };
            }
            VcpuExit::MmioWrite(REPORT_EXCEPTION, data) => return Outcome::Exception(le32(data)),
            VcpuExit::IoOut(PORT_MEASURED, _) | VcpuExit::MmioWrite(MMIO_MEASURED, _) => exits += 1,
            VcpuExit::MmioRead(MMIO_MEASURED, data) => {
                data.fill(0);
                exits += 1;
            }
            VcpuExit::IoOut(port, _) => {
                return Outcome::Error(format!("unexpected port {port:#x}"));
            }
            VcpuExit::MmioWrite(addr, _) => {
                return Outcome::Error(format!("unexpected MMIO write at {addr:#x}"));
            }
            VcpuExit::InternalError => {
                return Outcome::EmulationFailure(vcpu.describe_internal_error());
            }
            VcpuExit::Shutdown => return Outcome::Error("triple fault".into()),
            other => return Outcome::Error(format!("unexpected exit {other:?}")),
        }
    }
}

fn le32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
