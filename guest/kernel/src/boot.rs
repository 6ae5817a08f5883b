// SPDX-License-Identifier: Apache-2.0
//! Everything that runs at CPL 0, in assembly: the boot stub, the one gate from user mode, and
//! the interrupt and exception entry points.
//!
//! Why so little, and why assembly: on a paravirtual nested KVM (kvm_pvm) every guest
//! kernel-mode instruction goes through KVM's instruction emulator (about 2 µs each, and SSE,
//! POPCNT, XSAVE or INT n there are emulation failures; see `vmm probe`). So CPL 0 code here is a
//! few plain integer instructions per path, and all Rust code runs at CPL 3, natively.
//!
//! - `_start`: entered by the VMM like a Linux vmlinux (64-bit mode, CPL 0, RSI = zero page,
//!   interrupts off). Loads our GDT, TSS, IDT and page tables, enables SSE and kvmclock, masks
//!   the 8259 PICs, and `iretq`s to `rust_main` at CPL 3 with IF = 0.
//! - The gate: user mode cannot `sti`, `hlt` or do port I/O (IOPL 3 is not honoured), and
//!   `int n` / `syscall` fault there; `int3` does reach our IDT. So `int3` (vector 3, DPL 3) is
//!   the system call: RDI selects halt, string output, byte input or byte output.
//! - User mode runs with IF = 0. Interrupts are taken only inside the halt gate's `sti; hlt`,
//!   so a busy guest pays nothing for them and a wakeup cannot be lost between "nothing to do"
//!   and `hlt`: whatever arrived meanwhile is pending in the LAPIC and ends `hlt` at once.
//! - Interrupt handlers mark their vector in [`IRQ_PENDING`] and send the LAPIC EOI.
//! - Exceptions `iretq` to [`crate::fatal::guest_fatal`] at CPL 3 on a stack of its own.

use core::arch::global_asm;

/// Selectors of our GDT.
pub const KERNEL_CS: u16 = 0x08;
/// First vector of the IRQ stubs; vector `IRQ_VECTOR_BASE + n` marks `IRQ_PENDING[n]`.
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
    // GDT: null, kernel code/data, user data/code (DPL 3, in the order SYSRET would want), TSS.
    ".balign 16",
    ".globl GDT",
    "GDT:",
    ".quad 0",
    ".quad 0x00af9b000000ffff", // 0x08 kernel code, 64-bit
    ".quad 0x00cf93000000ffff", // 0x10 kernel data
    ".quad 0x00cff3000000ffff", // 0x18 user data, DPL 3
    ".quad 0x00affb000000ffff", // 0x20 user code, 64-bit, DPL 3
    ".quad 0, 0",               // 0x28 TSS, filled in by _start
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
    "lea rsp, [rip + KERNEL_STACK_TOP]",
    // TSS descriptor: limit 103, base = TSS, type 0x89 (available 64-bit TSS).
    "lea rax, [rip + TSS]",
    "mov ecx, eax",
    "shl ecx, 16",
    "or ecx, 103",
    "mov dword ptr [rip + GDT + 0x28], ecx",
    "mov rcx, rax",
    "shr rcx, 16",
    "and ecx, 0xff",
    "or ecx, 0x8900",
    "mov rdx, rax",
    "shr rdx, 24",
    "shl edx, 24",
    "or ecx, edx",
    "mov dword ptr [rip + GDT + 0x2c], ecx",
    "shr rax, 32",
    "mov dword ptr [rip + GDT + 0x30], eax",
    "lea rax, [rip + KERNEL_STACK_TOP]",
    "mov qword ptr [rip + TSS + 4], rax",
    "mov ax, 0x28",
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
    // kvmclock: KVM keeps PVCLOCK up to date, also across migration.
    "mov ecx, 0x4b564d01",
    "lea rax, [rip + PVCLOCK]",
    "or rax, 1",
    "mov rdx, rax",
    "shr rdx, 32",
    "wrmsr",
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
    "lea rax, [rip + FATAL_STACK_TOP - 8]",
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
    "mov byte ptr [rip + IRQ_PENDING + vmm_guest_irq], 1",
    "mov rax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".set vmm_guest_irq, vmm_guest_irq + 1",
    ".endr",
    ".globl SPURIOUS_STUB",
    "SPURIOUS_STUB:",
    "iretq",
);

unsafe extern "C" {
    static EXC_STUBS: u8;
    static IRQ_STUBS: u8;
    static SPURIOUS_STUB: u8;
    fn gate_entry();
}

/// One page-aligned 16-byte-per-entry IDT, written from user mode before anything can fire.
#[repr(C, align(4096))]
pub struct Idt(pub [[u64; 2]; 256]);

#[unsafe(no_mangle)]
pub static mut IDT: Idt = Idt([[0; 2]; 256]);

/// 64-bit TSS: RSP0 (offset 4) is the stack for interrupts taken at CPL 3.
#[repr(C, align(16))]
pub struct Tss(pub [u8; 104]);

#[unsafe(no_mangle)]
pub static mut TSS: Tss = Tss([0; 104]);

/// Set to 1 by the interrupt stub of vector `IRQ_VECTOR_BASE + n`; cleared by user mode.
#[unsafe(no_mangle)]
pub static mut IRQ_PENDING: [u8; IRQ_VECTORS] = [0; IRQ_VECTORS];

/// kvmclock's per-vCPU time info (`pvclock_vcpu_time_info`), written by KVM.
#[repr(C, align(64))]
pub struct PvClock(pub [u32; 8]);

#[unsafe(no_mangle)]
pub static mut PVCLOCK: PvClock = PvClock([0; 8]);

macro_rules! stack {
    ($name:ident, $top:ident, $size:expr) => {
        #[repr(C, align(4096))]
        pub struct $name(pub [u8; $size]);
        #[unsafe(no_mangle)]
        pub static mut $top: $name = $name([0; $size]);
    };
}
stack!(KernelStack, KERNEL_STACK, 16 << 10);
stack!(UserStack, USER_STACK, 1 << 20);
stack!(FatalStack, FATAL_STACK, 64 << 10);

// Stack tops as symbols for the assembly above.
global_asm!(
    ".set KERNEL_STACK_TOP, KERNEL_STACK + 16 * 1024",
    ".set USER_STACK_TOP, USER_STACK + 1024 * 1024",
    ".set FATAL_STACK_TOP, FATAL_STACK + 64 * 1024",
    ".globl KERNEL_STACK_TOP",
    ".globl USER_STACK_TOP",
    ".globl FATAL_STACK_TOP",
);

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
        // SAFETY: single-threaded boot, before interrupts can be taken; `v` < 256.
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

/// Whether the interrupt of `vector` fired since the last call (and forgets it).
pub fn take_irq(vector: u8) -> bool {
    let Some(n) = vector.checked_sub(IRQ_VECTOR_BASE).map(usize::from).filter(|n| *n < IRQ_VECTORS) else {
        return false;
    };
    let p = (&raw mut IRQ_PENDING).cast::<u8>();
    // SAFETY: n < IRQ_VECTORS; stubs only write this while user mode sleeps in the gate.
    unsafe {
        let fired = core::ptr::read_volatile(p.add(n)) != 0;
        core::ptr::write_volatile(p.add(n), 0);
        fired
    }
}
