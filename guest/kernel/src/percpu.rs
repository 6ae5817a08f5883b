// SPDX-License-Identifier: Apache-2.0
//! Per-CPU state: one [`PerCpu`] page per CPU, found through the GS base.
//!
//! Each CPU's boot path (in [`crate::boot`]) points the GS base MSR at its own `PerCpu`, whose
//! first word points at itself. So one `mov reg, gs:[0]`, which works at CPL 3 as well as at
//! CPL 0, finds this CPU's page: the interrupt stubs mark their vector in it, the exception
//! stubs take this CPU's fatal stack from it, and user-mode code reads its CPU index, its
//! kvmclock page and its pending interrupts there. CPUID cannot tell user mode which CPU it is
//! on this KVM (at CPL 3 it runs natively and answers for the host's CPU), so this is the way.
//!
//! Fields read by assembly have fixed offsets, checked at compile time below.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Most CPUs the guest runs on (the VMM's limit too).
pub const MAX_CPUS: usize = 32;
/// Size of each CPU's kernel stack (interrupt, exception and gate entries; they use little).
pub const KERNEL_STACK_SIZE: usize = 8 << 10;

/// kvmclock's per-vCPU time info (`pvclock_vcpu_time_info`), written by KVM.
#[repr(C, align(64))]
pub struct PvClock(pub [u32; 8]);

/// 64-bit TSS: RSP0 (offset 4) is the stack for interrupts taken at CPL 3.
#[repr(C, align(16))]
pub struct Tss(pub [u8; 104]);

/// One CPU's state. The layout up to `tss` is shared with the assembly in [`crate::boot`].
#[repr(C, align(4096))]
pub struct PerCpu {
    /// This structure's own address: what `gs:[0]` reads.
    self_ptr: u64,
    /// 0 for the boot CPU, then in the order the CPUs were started.
    index: u64,
    kernel_stack_top: u64,
    /// Where the CPU's user-mode code starts (application processors only).
    user_stack_top: u64,
    fatal_stack_top: u64,
    apic_id: u64,
    /// Set by the CPU itself once it runs Rust code with its local APIC set up.
    online: AtomicBool,
    _pad: [u8; 15],
    /// Byte `n` is set by the stub of vector `IRQ_VECTOR_BASE + n`; cleared by user mode.
    irq_pending: UnsafeCell<[u8; crate::boot::IRQ_VECTORS]>,
    pvclock: UnsafeCell<PvClock>,
    tss: UnsafeCell<Tss>,
}

/// Offsets of the fields the assembly uses.
pub const OFF_INDEX: usize = core::mem::offset_of!(PerCpu, index);
pub const OFF_KERNEL_STACK: usize = core::mem::offset_of!(PerCpu, kernel_stack_top);
pub const OFF_USER_STACK: usize = core::mem::offset_of!(PerCpu, user_stack_top);
pub const OFF_FATAL_STACK: usize = core::mem::offset_of!(PerCpu, fatal_stack_top);
pub const OFF_IRQ_PENDING: usize = core::mem::offset_of!(PerCpu, irq_pending);
pub const OFF_PVCLOCK: usize = core::mem::offset_of!(PerCpu, pvclock);
pub const OFF_TSS: usize = core::mem::offset_of!(PerCpu, tss);
const _: () = assert!(core::mem::offset_of!(PerCpu, self_ptr) == 0);

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            self_ptr: 0,
            index: 0,
            kernel_stack_top: 0,
            user_stack_top: 0,
            fatal_stack_top: 0,
            apic_id: 0,
            online: AtomicBool::new(false),
            _pad: [0; 15],
            irq_pending: UnsafeCell::new([0; crate::boot::IRQ_VECTORS]),
            pvclock: UnsafeCell::new(PvClock([0; 8])),
            tss: UnsafeCell::new(Tss([0; 104])),
        }
    }

    /// This CPU's index: 0 for the boot CPU, then in start order.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    pub fn apic_id(&self) -> u8 {
        self.apic_id as u8
    }

    /// kvmclock's page of this CPU (KVM writes it; read it volatile).
    pub fn pvclock(&self) -> *const u32 {
        self.pvclock.get().cast()
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Called by the CPU itself when it is ready to work.
    pub fn set_online(&self) {
        self.online.store(true, Ordering::Release);
    }

    /// Whether interrupt `n` (vector `IRQ_VECTOR_BASE + n`) fired on this CPU since the last
    /// call, and forgets it.
    pub fn take_irq(&self, n: usize) -> bool {
        if n >= crate::boot::IRQ_VECTORS {
            return false;
        }
        let p = self.irq_pending.get().cast::<u8>();
        // SAFETY: n is in bounds; only this CPU's stubs write this byte, and only while this
        // CPU's user mode sleeps in the halt gate, so there is no concurrent access.
        unsafe {
            let fired = core::ptr::read_volatile(p.add(n)) != 0;
            core::ptr::write_volatile(p.add(n), 0);
            fired
        }
    }
}

/// Every CPU's page, index 0 the boot CPU's (the assembly fills that one in).
#[repr(transparent)]
pub struct Table(UnsafeCell<[PerCpu; MAX_CPUS]>);

// SAFETY: a page's plain fields are written only by the boot CPU before that page's CPU runs
// (`prepare`, `boot_cpu_ready`); after that, other CPUs only read them or use its atomics, and
// the cells are touched by their own CPU (and KVM) alone.
unsafe impl Sync for Table {}

#[unsafe(no_mangle)]
pub static PERCPU: Table = Table(UnsafeCell::new([const { PerCpu::new() }; MAX_CPUS]));

/// CPU `index`'s page (`index` < MAX_CPUS).
fn slot(index: usize) -> *mut PerCpu {
    debug_assert!(index < MAX_CPUS);
    // SAFETY: in bounds of the array.
    unsafe { PERCPU.0.get().cast::<PerCpu>().add(index) }
}

/// Every CPU's kernel stack; the boot CPU's is the first.
#[repr(C, align(4096))]
pub struct KernelStack(pub [u8; KERNEL_STACK_SIZE]);

#[unsafe(no_mangle)]
pub static mut KERNEL_STACKS: [KernelStack; MAX_CPUS] = [const { KernelStack([0; KERNEL_STACK_SIZE]) }; MAX_CPUS];

/// The page of the CPU this runs on.
pub fn current() -> &'static PerCpu {
    let p: *const PerCpu;
    // SAFETY: the boot path of every CPU sets its GS base to its PerCpu, whose first word is its
    // own address, before any Rust code runs; the read has no side effects.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags));
        &*p
    }
}

/// The page of CPU `index`, if that index exists.
pub fn cpu(index: usize) -> Option<&'static PerCpu> {
    if index >= MAX_CPUS {
        return None;
    }
    // SAFETY: in bounds; see `Table` for who writes what.
    Some(unsafe { &*slot(index) })
}

/// Fills in CPU `index`'s page before it is started: its stacks and APIC id. Returns the page.
///
/// Only the boot CPU calls this, for a CPU that is not running.
pub fn prepare(index: usize, apic_id: u8, user_stack_top: u64, fatal_stack_top: u64) -> Option<&'static PerCpu> {
    if index == 0 || index >= MAX_CPUS {
        return None;
    }
    let kernel_stack_top = (&raw const KERNEL_STACKS) as u64 + ((index + 1) * KERNEL_STACK_SIZE) as u64;
    // SAFETY: CPU `index` is not running, so nothing else touches its page; in bounds.
    unsafe {
        let p = slot(index);
        (*p).index = index as u64;
        (*p).apic_id = u64::from(apic_id);
        (*p).kernel_stack_top = kernel_stack_top;
        (*p).user_stack_top = user_stack_top;
        (*p).fatal_stack_top = fatal_stack_top;
    }
    cpu(index)
}

/// Records the boot CPU's local APIC id and marks it online. Called once, by the boot CPU,
/// before any other CPU runs.
pub fn boot_cpu_ready(apic_id: u8) {
    // SAFETY: only the boot CPU runs, and it writes a plain field of its own page.
    unsafe { (*slot(0)).apic_id = u64::from(apic_id) };
    current().set_online();
}
