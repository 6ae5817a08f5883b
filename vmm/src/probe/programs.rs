// SPDX-License-Identifier: Apache-2.0
//! The probe programs: a few instructions each, assembled into the VMM binary with `global_asm!`
//! and copied into a probe VM's memory. They are position independent (relative jumps only) and
//! use fixed guest addresses from [`super::machine`] for everything else.
//!
//! Conventions: the harness passes arguments in RDI and RSI. Results go out through MMIO, which
//! works at any privilege level (port I/O from CPL 3 needs IOPL 3, which a paravirtual KVM may
//! not grant): a 32-bit write to `REPORT_DONE` reports EAX and ends the probe, one to
//! `REPORT_EXCEPTION` reports an exception vector. `out 0x513` and writes to 0xd000_0000 are the
//! exits being measured.

use std::arch::global_asm;

/// Defines the snippet `vmm_probe_<name>_start .. vmm_probe_<name>_end`.
macro_rules! snippet {
    ($name:literal, $body:expr) => {
        global_asm!(concat!(
            ".pushsection .text.vmm_probe,\"ax\"\n",
            ".balign 16\n",
            ".globl vmm_probe_",
            $name,
            "_start\n",
            "vmm_probe_",
            $name,
            "_start:\n",
            $body,
            "\n.globl vmm_probe_",
            $name,
            "_end\n",
            "vmm_probe_",
            $name,
            "_end:\n",
            ".popsection\n"
        ));
    };
}

/// Returns the bytes of a snippet by its start and end symbols.
macro_rules! snippet_bytes {
    ($start:ident, $end:ident) => {{
        unsafe extern "C" {
            static $start: u8;
            static $end: u8;
        }
        let start = &raw const $start;
        let end = &raw const $end;
        // SAFETY: both symbols bound one snippet in the read-only text of this binary, start
        // before end, so the range is valid, initialised and immutable for the program's life.
        unsafe { std::slice::from_raw_parts(start, end as usize - start as usize) }
    }};
}

/// Reports EAX and ends the probe.
macro_rules! done {
    () => {
        "mov rdx, 0xd0001000\nmov dword ptr [rdx], eax\n"
    };
}

// The runtime: exception stubs (vector pushed, then reported), and handlers for int3, page
// faults, the LAPIC timer and a halt gate. Copied to `machine::RUNTIME_ADDR`.
global_asm!(
    ".pushsection .text.vmm_probe,\"ax\"",
    ".balign 16",
    ".globl vmm_probe_rt_start",
    "vmm_probe_rt_start:",
    ".set vmm_probe_vec, 0",
    ".rept 32",
    ".balign 16",
    ".byte 0x6a, vmm_probe_vec", // push imm8
    "jmp vmm_probe_rt_exc_common",
    ".set vmm_probe_vec, vmm_probe_vec + 1",
    ".endr",
    "vmm_probe_rt_exc_common:",
    "pop rax",
    "mov rdx, 0xd0001008",
    "mov dword ptr [rdx], eax",
    "2: hlt",
    "jmp 2b",
    ".globl vmm_probe_rt_int3",
    "vmm_probe_rt_int3:",
    "iretq",
    ".globl vmm_probe_rt_pf",
    "vmm_probe_rt_pf:",
    // Drop the error code and skip the 3-byte `mov rax, [rbx]` that faulted.
    "add rsp, 8",
    "add qword ptr [rsp], 3",
    "iretq",
    ".globl vmm_probe_rt_timer",
    "vmm_probe_rt_timer:",
    "push rax",
    "mov rax, 0x5000",
    "inc qword ptr [rax]",
    "mov rax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    // INT3 as a halt gate, the way our guest idles: with IF off (interrupt gate), enable
    // interrupts and halt; STI's one-instruction shadow makes the pair atomic.
    ".globl vmm_probe_rt_int3_halt",
    "vmm_probe_rt_int3_halt:",
    "sti",
    "hlt",
    "iretq",
    ".globl vmm_probe_rt_int_gate",
    "vmm_probe_rt_int_gate:",
    "iretq",
    // SYSCALL entry points (LSTAR): a bare return, and a halt until the next interrupt. SFMASK
    // is 0, so IF stays as user mode had it and the interrupt that ends HLT is taken here.
    ".globl vmm_probe_rt_syscall_ret",
    "vmm_probe_rt_syscall_ret:",
    "sysretq",
    ".globl vmm_probe_rt_syscall_halt",
    "vmm_probe_rt_syscall_halt:",
    "hlt",
    "sysretq",
    ".globl vmm_probe_rt_spurious",
    "vmm_probe_rt_spurious:",
    "iretq",
    ".globl vmm_probe_rt_end",
    "vmm_probe_rt_end:",
    ".popsection",
);

snippet!("int_loop", concat!("mov rcx, rdi\n2: dec rcx\njnz 2b\n", done!()));
snippet!("sse_loop", concat!("mov rcx, rdi\n2: xorps xmm0, xmm1\ndec rcx\njnz 2b\n", done!()));
snippet!("popcnt", concat!("mov rcx, rdi\n2: popcnt rax, rcx\ndec rcx\njnz 2b\n", done!()));
snippet!(
    "rep_movs",
    concat!(
        "mov r8, rdi\nmov r9, rsi\n",
        "2: mov rsi, 0x400000\nmov rdi, 0x800000\nmov rcx, r9\nrep movsb\ndec r8\njnz 2b\n",
        done!()
    )
);
snippet!("rdtsc", concat!("mov rcx, rdi\n2: rdtsc\ndec rcx\njnz 2b\n", done!()));
snippet!(
    "cpuid",
    concat!("mov r8, rdi\n2: mov eax, 0x40000000\nxor ecx, ecx\ncpuid\ndec r8\njnz 2b\nmov eax, ebx\n", done!())
);
snippet!(
    "wrmsr",
    concat!(
        "mov r8, rdi\n2: mov ecx, 0xc0000102\nmov eax, r8d\nxor edx, edx\nwrmsr\ndec r8\njnz 2b\n",
        "mov ecx, 0xc0000102\nmov eax, 0x1234\nxor edx, edx\nwrmsr\nxor eax, eax\nrdmsr\n",
        done!()
    )
);
snippet!(
    "xsave",
    concat!("mov r8, rdi\nmov rbx, 0x600000\n2: mov eax, 3\nxor edx, edx\nxsave [rbx]\ndec r8\njnz 2b\n", done!())
);
snippet!("int3", concat!("mov rcx, rdi\n2: int3\ndec rcx\njnz 2b\n", done!()));
snippet!("page_fault", concat!("mov rcx, rdi\nmov rbx, 0x8000000000\n2: mov rax, [rbx]\ndec rcx\njnz 2b\n", done!()));
snippet!("port_out", concat!("mov rcx, rdi\nmov dx, 0x513\n2: out dx, al\ndec rcx\njnz 2b\n", done!()));
snippet!(
    "mmio_write",
    concat!("mov rcx, rdi\nmov rbx, 0xd0000000\n2: mov dword ptr [rbx], ecx\ndec rcx\njnz 2b\n", done!())
);
snippet!("hlt", concat!("hlt\n", done!()));
// Program the LAPIC timer (periodic, vector 0x20, initial count RSI) through its MMIO window,
// then either spin (`timer`) or sleep in the halt gate (`halt_gate`) until RDI ticks arrived.
macro_rules! lapic_timer_setup {
    () => {
        concat!(
            "mov rbx, 0xfee00000\n",
            "mov dword ptr [rbx + 0xf0], 0x1ff\n",
            "mov dword ptr [rbx + 0x3e0], 0xb\n",
            "mov dword ptr [rbx + 0x320], 0x20020\n",
            "mov dword ptr [rbx + 0x380], esi\n",
            "mov rax, 0x5000\n",
        )
    };
}
macro_rules! lapic_timer_report {
    () => {
        concat!("mov dword ptr [rbx + 0x320], 0x10000\n", "mov rax, 0x5000\nmov eax, dword ptr [rax]\n", done!())
    };
}
// Interrupts are enabled by the harness (RFLAGS.IF at entry): CPL 3 cannot use STI/CLI
// unless the KVM honours IOPL 3.
snippet!("timer", concat!(lapic_timer_setup!(), "2: cmp qword ptr [rax], rdi\njb 2b\n", lapic_timer_report!()));
snippet!("hlt_wait", concat!(lapic_timer_setup!(), "2: hlt\ncmp qword ptr [rax], rdi\njb 2b\n", lapic_timer_report!()));
snippet!(
    "syscall_halt",
    concat!(
        lapic_timer_setup!(),
        "2: syscall\nmov rax, 0x5000\ncmp qword ptr [rax], rdi\njb 2b\n",
        lapic_timer_report!()
    )
);
snippet!(
    "int3_halt",
    concat!(lapic_timer_setup!(), "2: int3\nmov rax, 0x5000\ncmp qword ptr [rax], rdi\njb 2b\n", lapic_timer_report!())
);
snippet!("syscall", concat!("mov r8, rdi\n2: syscall\ndec r8\njnz 2b\n", done!()));
snippet!("int_gate", concat!("mov rcx, rdi\n2: int 0x80\ndec rcx\njnz 2b\n", done!()));
snippet!(
    "mmio_read",
    concat!("mov rcx, rdi\nmov rbx, 0xd0000000\n2: mov eax, dword ptr [rbx]\ndec rcx\njnz 2b\n", done!())
);

/// The runtime's bytes and the offsets of its handlers within them.
pub struct Runtime {
    pub bytes: &'static [u8],
    pub int3: usize,
    pub page_fault: usize,
    pub timer: usize,
    pub int3_halt: usize,
    pub int_gate: usize,
    pub syscall_ret: usize,
    pub syscall_halt: usize,
    pub spurious: usize,
}

pub fn runtime() -> Runtime {
    unsafe extern "C" {
        static vmm_probe_rt_int3: u8;
        static vmm_probe_rt_pf: u8;
        static vmm_probe_rt_timer: u8;
        static vmm_probe_rt_int3_halt: u8;
        static vmm_probe_rt_int_gate: u8;
        static vmm_probe_rt_syscall_ret: u8;
        static vmm_probe_rt_syscall_halt: u8;
        static vmm_probe_rt_spurious: u8;
    }
    let bytes = snippet_bytes!(vmm_probe_rt_start, vmm_probe_rt_end);
    let base = bytes.as_ptr() as usize;
    let off = |p: *const u8| p as usize - base;
    Runtime {
        bytes,
        int3: off(&raw const vmm_probe_rt_int3),
        page_fault: off(&raw const vmm_probe_rt_pf),
        timer: off(&raw const vmm_probe_rt_timer),
        int3_halt: off(&raw const vmm_probe_rt_int3_halt),
        int_gate: off(&raw const vmm_probe_rt_int_gate),
        syscall_ret: off(&raw const vmm_probe_rt_syscall_ret),
        syscall_halt: off(&raw const vmm_probe_rt_syscall_halt),
        spurious: off(&raw const vmm_probe_rt_spurious),
    }
}

/// A probe program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    IntLoop,
    SseLoop,
    Popcnt,
    RepMovs,
    Rdtsc,
    Cpuid,
    Wrmsr,
    Xsave,
    Int3,
    PageFault,
    PortOut,
    MmioWrite,
    MmioRead,
    Hlt,
    Timer,
    HltWait,
    IntGate,
    Int3Halt,
    Syscall,
    SyscallHalt,
}

impl Program {
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Program::IntLoop => snippet_bytes!(vmm_probe_int_loop_start, vmm_probe_int_loop_end),
            Program::SseLoop => snippet_bytes!(vmm_probe_sse_loop_start, vmm_probe_sse_loop_end),
            Program::Popcnt => snippet_bytes!(vmm_probe_popcnt_start, vmm_probe_popcnt_end),
            Program::RepMovs => snippet_bytes!(vmm_probe_rep_movs_start, vmm_probe_rep_movs_end),
            Program::Rdtsc => snippet_bytes!(vmm_probe_rdtsc_start, vmm_probe_rdtsc_end),
            Program::Cpuid => snippet_bytes!(vmm_probe_cpuid_start, vmm_probe_cpuid_end),
            Program::Wrmsr => snippet_bytes!(vmm_probe_wrmsr_start, vmm_probe_wrmsr_end),
            Program::Xsave => snippet_bytes!(vmm_probe_xsave_start, vmm_probe_xsave_end),
            Program::Int3 => snippet_bytes!(vmm_probe_int3_start, vmm_probe_int3_end),
            Program::PageFault => {
                snippet_bytes!(vmm_probe_page_fault_start, vmm_probe_page_fault_end)
            }
            Program::PortOut => snippet_bytes!(vmm_probe_port_out_start, vmm_probe_port_out_end),
            Program::MmioWrite => {
                snippet_bytes!(vmm_probe_mmio_write_start, vmm_probe_mmio_write_end)
            }
            Program::Hlt => snippet_bytes!(vmm_probe_hlt_start, vmm_probe_hlt_end),
            Program::MmioRead => snippet_bytes!(vmm_probe_mmio_read_start, vmm_probe_mmio_read_end),
            Program::Timer => snippet_bytes!(vmm_probe_timer_start, vmm_probe_timer_end),
            Program::HltWait => snippet_bytes!(vmm_probe_hlt_wait_start, vmm_probe_hlt_wait_end),
            Program::IntGate => snippet_bytes!(vmm_probe_int_gate_start, vmm_probe_int_gate_end),
            Program::Int3Halt => snippet_bytes!(vmm_probe_int3_halt_start, vmm_probe_int3_halt_end),
            Program::Syscall => snippet_bytes!(vmm_probe_syscall_start, vmm_probe_syscall_end),
            Program::SyscallHalt => {
                snippet_bytes!(vmm_probe_syscall_halt_start, vmm_probe_syscall_halt_end)
            }
        }
    }
}
