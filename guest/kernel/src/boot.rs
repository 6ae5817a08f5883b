// SPDX-License-Identifier: Apache-2.0
//! Everything that runs at CPL 0, in assembly: the boot stub, the application processors'
//! start-up trampoline, the one gate from user mode, and the interrupt and exception entry
//! points.
//!
//! Why so little, and why assembly: on a paravirtual nested KVM (kvm_pvm) every guest
//! kernel-mode instruction goes through KVM's instruction emulator (about 2 µs each, and SSE,
//! POPCNT, XSAVE or INT n there are emulation failures; see `vmm probe`). So CPL 0 code here is a
//! few plain integer instructions per path, and all Rust code runs at CPL 3, natively.
//!
//! - `_start`: entered by the VMM like a Linux vmlinux (64-bit mode, CPL 0, RSI = zero page,
//!   interrupts off). Sets up the boot CPU (`cpu_setup`: GS base at its [`PerCpu`], its TSS,
//!   the IDT, our page tables, SSE and its kvmclock page), masks the 8259 PICs, and `iretq`s to
//!   `rust_main` at CPL 3 with IF = 0.
//! - `AP_TRAMPOLINE`: what an application processor runs after the startup IPI, copied below
//!   1 MiB by [`crate::smp`]. From real mode it enables PAE, our page tables, long mode and
//!   paging in one step and far-jumps into 64-bit code (`ap_long`), which runs `cpu_setup` for
//!   the [`PerCpu`] in [`AP_BOOT_PERCPU`] and `iretq`s to `ap_main` at CPL 3 on that CPU's
//!   stack. Real mode is emulated on paravirtual KVM too, so the trampoline is a dozen
//!   instructions.
//! - The gate: user mode cannot `sti`, `hlt` or do port I/O (IOPL 3 is not honoured), and
//!   `int n` / `syscall` fault there; `int3` does reach our IDT. So `int3` (vector 3, DPL 3) is
//!   the system call: RDI selects halt, string output, byte input or byte output.
//! - User mode runs with IF = 0. Interrupts are taken only inside the halt gate's `sti; hlt`,
//!   so a busy guest pays nothing for them and a wakeup cannot be lost between "nothing to do"
//!   and `hlt`: whatever arrived meanwhile is pending in the LAPIC and ends `hlt` at once.
//! - Interrupt handlers mark their vector in this CPU's [`PerCpu`] (through GS) and send the
//!   LAPIC EOI.
//! - Exceptions `iretq` to `fatal::guest_fatal` at CPL 3 on this CPU's fatal stack.
//!
//! [`PerCpu`]: crate::percpu::PerCpu

use core::arch::global_asm;

use crate::percpu::{
    KERNEL_STACK_SIZE, MAX_CPUS, OFF_FATAL_STACK, OFF_INDEX, OFF_IRQ_PENDING, OFF_KERNEL_STACK, OFF_PVCLOCK, OFF_TSS,
    OFF_USER_STACK,
};

/// Selectors of our GDT.
pub const KERNEL_CS: u16 = 0x08;
/// First vector of the IRQ stubs; vector `IRQ_VECTOR_BASE + n` marks pending interrupt `n` of
/// the CPU it fired on.
pub const IRQ_VECTOR_BASE: u8 = 0x20;
/// Number of IRQ stubs.
pub const IRQ_VECTORS: usize = 64;
/// Spacing of the exception and IRQ stubs.
pub const EXC_STUB_SIZE: usize = 16;
pub const IRQ_STUB_SIZE: usize = 32;

/// Gate functions (RDI).
pub const GATE_HALT: u64 = 0;
pub const GATE_OUTS: u64 = 1;
pub const GATE_INB: u64 = 2;
pub const GATE_OUTB: u64 = 3;

/// Where [`crate::smp`] copies the trampoline: a page below 1 MiB (the startup IPI's vector is
/// its page number) that nothing uses once the boot CPU runs Rust code.
pub const AP_TRAMPOLINE_ADDR: u64 = 0x8000;

global_asm!(
    // ---- data the boot stub needs at fixed link-time addresses ----
    ".section .data.boot, \"aw\"",
    ".balign 4096",
    ".globl BOOT_PML4",
    "BOOT_PML4:",
    ".quad BOOT_PDPT + 0x7",
    ".fill 511, 8, 0",
    "BOOT_PDPT:",
    ".quad BOOT_PD + 0x7",
    ".quad BOOT_PD + 0x1007",
    ".quad BOOT_PD + 0x2007",
    ".quad BOOT_PD + 0x3007",
    ".fill 508, 8, 0",
    // Identity map of the first 4 GiB in 2 MiB pages, present | writable | user | large: RAM,
    // the virtio-mmio windows, IOAPIC and LAPIC are all reachable from CPL 3.
    "BOOT_PD:",
    ".set vmm_guest_pde, 0",
    ".rept 2048",
    ".quad (vmm_guest_pde << 21) | 0x87",
    ".set vmm_guest_pde, vmm_guest_pde + 1",
    ".endr",
    // GDT: null, kernel code/data, user data/code (DPL 3, in the order SYSRET would want), then
    // one TSS descriptor per CPU (16 bytes each), filled in by each CPU's cpu_setup.
    ".balign 16",
    ".globl GDT",
    "GDT:",
    ".quad 0",
    ".quad 0x00af9b000000ffff", // 0x08 kernel code, 64-bit
    ".quad 0x00cf93000000ffff", // 0x10 kernel data
    ".quad 0x00cff3000000ffff", // 0x18 user data, DPL 3
    ".quad 0x00affb000000ffff", // 0x20 user code, 64-bit, DPL 3
    ".fill {tss_quads}, 8, 0",  // 0x28 + 16 * n: TSS of CPU n
    "GDT_END:",
    "GDT_PTR:",
    ".word GDT_END - GDT - 1",
    ".quad GDT",
    "IDT_PTR:",
    ".word 256 * 16 - 1",
    ".quad IDT",
    // ---- PVH entry: how QEMU (and Xen) boot an ELF kernel ----
    // The note tells the loader where the 32-bit entry is; it enters with paging off, flat
    // 32-bit segments and EBX = the hvm_start_info. We switch to long mode with our own page
    // tables and join the 64-bit entry with R14 = 1 ("RSI is an hvm_start_info").
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",  // name size
    ".long 4",  // descriptor size
    ".long 18", // XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".long pvh_entry",
    ".popsection",
    ".section .text.boot, \"ax\"",
    ".code32",
    "pvh_entry:",
    "mov esi, ebx",
    "mov eax, cr4",
    "or eax, 0x20", // PAE
    "mov cr4, eax",
    "mov eax, offset BOOT_PML4",
    "mov cr3, eax",
    "mov ecx, 0xc0000080", // EFER
    "rdmsr",
    "or eax, 0x100", // LME
    "wrmsr",
    "mov eax, cr0",
    "or eax, 0x80000001", // PG | PE
    "mov cr0, eax",
    "lgdt [GDT_PTR]",
    ".byte 0xea", // ljmp 0x08:pvh_long
    ".long pvh_long",
    ".word 0x08",
    ".code64",
    "pvh_long:",
    "mov r14d, 1",
    "jmp boot_common",
    // ---- 64-bit entry (the Linux boot protocol: RSI = zero page); our VMM enters here ----
    ".globl _start",
    "_start:",
    "xor r14d, r14d",
    "boot_common:",
    "mov r15, rsi",
    "lgdt [rip + GDT_PTR]",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    // The boot CPU is PERCPU[0], on the first kernel stack and the static fatal stack.
    "lea rbx, [rip + PERCPU]",
    "lea rsp, [rip + KERNEL_STACKS + {kstack_size}]",
    "mov [rbx + {off_kstack}], rsp",
    "lea rax, [rip + FATAL_STACK_TOP]",
    "mov [rbx + {off_fatal}], rax",
    "call cpu_setup",
    // Mask both 8259 PICs: interrupts come through the IOAPIC and LAPIC only.
    "mov al, 0xff",
    "out 0x21, al",
    "out 0xa1, al",
    // To CPL 3, interrupts off. RSP is 8 below a 16-byte boundary, as after a `call`, which
    // is what compiled code expects at a function's entry (SSE spills use aligned stores).
    "push 0x1b",
    "lea rax, [rip + USER_STACK_TOP - 8]",
    "push rax",
    "push 0x2",
    "push 0x23",
    "lea rax, [rip + rust_main]",
    "push rax",
    "mov rdi, r15",
    "mov rsi, r14",
    "iretq",
    // ---- cpu_setup: RBX = this CPU's PerCpu (index and stack tops filled in), RSP on its
    // kernel stack, long mode with flat data segments. Clobbers RAX, RCX, RDX, RSI, RDI. ----
    "cpu_setup:",
    "mov [rbx], rbx",      // self pointer: what gs:[0] reads
    "mov ecx, 0xc0000101", // GS base
    "mov eax, ebx",
    "mov rdx, rbx",
    "shr rdx, 32",
    "wrmsr",
    // TSS descriptor at GDT + 0x28 + 16 * index: limit 103, base = this CPU's TSS, type 0x89
    // (available 64-bit TSS).
    "lea rax, [rbx + {off_tss}]",
    "mov rsi, [rbx + {off_index}]",
    "shl rsi, 4",
    "add rsi, 0x28",
    "lea rdi, [rip + GDT]",
    "add rdi, rsi",
    "mov ecx, eax",
    "shl ecx, 16",
    "or ecx, 103",
    "mov dword ptr [rdi], ecx",
    "mov rcx, rax",
    "shr rcx, 16",
    "and ecx, 0xff",
    "or ecx, 0x8900",
    "mov rdx, rax",
    "shr rdx, 24",
    "shl edx, 24",
    "or ecx, edx",
    "mov dword ptr [rdi + 4], ecx",
    "shr rax, 32",
    "mov dword ptr [rdi + 8], eax",
    "mov rax, [rbx + {off_kstack}]",
    "mov [rbx + {off_tss} + 4], rax", // RSP0
    "mov eax, esi",
    "ltr ax",
    "lidt [rip + IDT_PTR]",
    "lea rax, [rip + BOOT_PML4]",
    "mov cr3, rax",
    // SSE for user mode: CR0.EM off, CR0.MP on; CR4.OSFXSR | OSXMMEXCPT.
    "mov rax, cr0",
    "and rax, -5",
    "or rax, 2",
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, 0x600",
    "mov cr4, rax",
    // kvmclock: KVM keeps this CPU's page up to date, also across migration.
    "mov ecx, 0x4b564d01",
    "lea rax, [rbx + {off_pvclock}]",
    "or rax, 1",
    "mov rdx, rax",
    "shr rdx, 32",
    "wrmsr",
    "ret",
    // ---- the application processors' trampoline, copied to AP_TRAMPOLINE_ADDR: entered in
    // real mode at CS:0, CS = AP_TRAMPOLINE_ADDR / 16 ----
    ".code16",
    ".globl AP_TRAMPOLINE",
    "AP_TRAMPOLINE:",
    "cli",
    "mov ax, cs",
    "mov ds, ax",
    // lgdt [ap_gdtr] (DS-relative, 16-bit displacement) with a 32-bit operand size, so the
    // whole GDT base is loaded: 66 0f 01 /2, ModRM 0x16 = [disp16].
    ".byte 0x66, 0x0f, 0x01, 0x16",
    ".word ap_gdtr - AP_TRAMPOLINE",
    "mov eax, offset BOOT_PML4",
    "mov cr3, eax",
    "mov eax, cr4",
    "or eax, 0x20", // PAE
    "mov cr4, eax",
    "mov ecx, 0xc0000080", // EFER
    "rdmsr",
    "or eax, 0x100", // LME
    "wrmsr",
    "mov eax, cr0",
    "or eax, 0x80000001", // PG | PE: straight into long mode (compatibility mode, 16-bit CS)
    "mov cr0, eax",
    ".byte 0x66, 0xea", // ljmp 0x08:ap_long with a 32-bit offset: into 64-bit code
    ".long ap_long",
    ".word 0x08",
    ".balign 4",
    "ap_gdtr:",
    ".word GDT_END - GDT - 1",
    ".long GDT",
    ".globl AP_TRAMPOLINE_END",
    "AP_TRAMPOLINE_END:",
    ".code64",
    "ap_long:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    // The CPU being started; 0 if the boot CPU gave up on this one: then stay out of the way.
    "mov rbx, [rip + AP_BOOT_PERCPU]",
    "test rbx, rbx",
    "jz 2f",
    "mov rsp, [rbx + {off_kstack}]",
    "call cpu_setup",
    "push 0x1b",
    "mov rax, [rbx + {off_ustack}]",
    "sub rax, 8",
    "push rax",
    "push 0x2",
    "push 0x23",
    "lea rax, [rip + ap_main]",
    "push rax",
    "mov rdi, rbx",
    "iretq",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    // ---- the gate: int3 from CPL 3 ----
    ".section .text.gate, \"ax\"",
    ".globl gate_entry",
    "gate_entry:",
    "test rdi, rdi",
    "jnz 3f",
    // HALT: RSI = TSC deadline, 0 for none.
    "test rsi, rsi",
    "jz 2f",
    "mov ecx, 0x6e0",
    "mov eax, esi",
    "mov rdx, rsi",
    "shr rdx, 32",
    "wrmsr",
    "2:",
    "sti",
    "hlt",
    "iretq",
    "3:",
    "cmp rdi, 1",
    "jne 4f",
    // OUTS: RSI = port, RDX = buffer, RCX = length.
    "xchg rsi, rdx",
    "rep outsb",
    "iretq",
    "4:",
    "cmp rdi, 2",
    "jne 5f",
    // INB: RSI = port; byte in RAX.
    "mov edx, esi",
    "xor eax, eax",
    "in al, dx",
    "iretq",
    "5:",
    // OUTB: RSI = port, RDX = value.
    "mov eax, edx",
    "mov edx, esi",
    "out dx, al",
    "iretq",
    // ---- exceptions: normalise to (vector, error code) and leave for user mode ----
    ".balign 16",
    ".globl EXC_STUBS",
    "EXC_STUBS:",
    ".set vmm_guest_vec, 0",
    ".rept 32",
    ".balign 16",
    // Vectors 8, 10-14, 17, 21, 29 and 30 push an error code; give the others a zero one.
    ".if (vmm_guest_vec != 8) && ((vmm_guest_vec < 10) || (vmm_guest_vec > 14)) && (vmm_guest_vec != 17) && (vmm_guest_vec != 21) && (vmm_guest_vec != 29) && (vmm_guest_vec != 30)",
    ".byte 0x6a, 0", // push 0
    ".endif",
    ".byte 0x6a, vmm_guest_vec", // push vector
    "jmp exc_common",
    ".set vmm_guest_vec, vmm_guest_vec + 1",
    ".endr",
    "exc_common:",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "mov rcx, cr2",
    "push 0x1b",
    "mov rax, gs:[{off_fatal}]",
    "sub rax, 8",
    "push rax",
    "push 0x2",
    "push 0x23",
    "lea rax, [rip + guest_fatal]",
    "push rax",
    "iretq",
    // ---- interrupts: mark, EOI, return (always into the halt gate) ----
    ".balign 32",
    ".globl IRQ_STUBS",
    "IRQ_STUBS:",
    ".set vmm_guest_irq, 0",
    ".rept 64",
    ".balign 32",
    "push rax",
    "mov byte ptr gs:[{off_irq} + vmm_guest_irq], 1",
    "mov rax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".set vmm_guest_irq, vmm_guest_irq + 1",
    ".endr",
    ".globl SPURIOUS_STUB",
    "SPURIOUS_STUB:",
    "iretq",
    tss_quads = const 2 * MAX_CPUS,
    kstack_size = const KERNEL_STACK_SIZE,
    off_index = const OFF_INDEX,
    off_kstack = const OFF_KERNEL_STACK,
    off_ustack = const OFF_USER_STACK,
    off_fatal = const OFF_FATAL_STACK,
    off_irq = const OFF_IRQ_PENDING,
    off_pvclock = const OFF_PVCLOCK,
    off_tss = const OFF_TSS,
);

unsafe extern "C" {
    static EXC_STUBS: u8;
    static IRQ_STUBS: u8;
    static SPURIOUS_STUB: u8;
    static AP_TRAMPOLINE: u8;
    static AP_TRAMPOLINE_END: u8;
    fn gate_entry();
}

/// One page-aligned 16-byte-per-entry IDT, written from user mode before anything can fire.
#[repr(C, align(4096))]
pub struct Idt(pub [[u64; 2]; 256]);

#[unsafe(no_mangle)]
pub static mut IDT: Idt = Idt([[0; 2]; 256]);

macro_rules! stack {
    ($name:ident, $top:ident, $size:expr) => {
        #[repr(C, align(4096))]
        pub struct $name(pub [u8; $size]);
        #[unsafe(no_mangle)]
        pub static mut $top: $name = $name([0; $size]);
    };
}
// The boot CPU's user-mode stacks; the other CPUs get theirs from the heap (see crate::smp).
stack!(UserStack, USER_STACK, 1 << 20);
stack!(FatalStack, FATAL_STACK, 64 << 10);

// Stack tops as symbols for the assembly above.
global_asm!(
    ".set USER_STACK_TOP, USER_STACK + 1024 * 1024",
    ".set FATAL_STACK_TOP, FATAL_STACK + 64 * 1024",
    ".globl USER_STACK_TOP",
    ".globl FATAL_STACK_TOP",
);

/// The [`crate::percpu::PerCpu`] of the application processor being started (0: none).
#[unsafe(no_mangle)]
pub static AP_BOOT_PERCPU: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The trampoline's bytes, to be copied to [`AP_TRAMPOLINE_ADDR`].
pub fn ap_trampoline() -> &'static [u8] {
    let start = &raw const AP_TRAMPOLINE;
    let end = &raw const AP_TRAMPOLINE_END;
    // SAFETY: both symbols delimit the trampoline's bytes in our read-only text.
    unsafe { core::slice::from_raw_parts(start, end as usize - start as usize) }
}

fn gate_descriptor(handler: u64, dpl: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Fills the IDT: exceptions to their stubs, vector 3 to the gate (callable from CPL 3),
/// interrupts to their stubs, 0xff (LAPIC spurious) to a bare `iretq`.
pub fn init_idt() {
    let exc = &raw const EXC_STUBS as u64;
    let irq = &raw const IRQ_STUBS as u64;
    let idt = &raw mut IDT;
    let set = |v: usize, g: [u64; 2]| {
        // SAFETY: the boot CPU alone, before interrupts can be taken or other CPUs run; `v` < 256.
        unsafe { (*idt).0[v] = g };
    };
    for v in 0..32 {
        set(v, gate_descriptor(exc + (v * EXC_STUB_SIZE) as u64, 0));
    }
    set(3, gate_descriptor(gate_entry as *const () as u64, 3));
    for n in 0..IRQ_VECTORS {
        set(usize::from(IRQ_VECTOR_BASE) + n, gate_descriptor(irq + (n * IRQ_STUB_SIZE) as u64, 0));
    }
    set(0xff, gate_descriptor(&raw const SPURIOUS_STUB as u64, 0));
}

/// Whether the interrupt of `vector` fired on this CPU since the last call (and forgets it).
pub fn take_irq(vector: u8) -> bool {
    vector.checked_sub(IRQ_VECTOR_BASE).is_some_and(|n| crate::percpu::current().take_irq(usize::from(n)))
}
