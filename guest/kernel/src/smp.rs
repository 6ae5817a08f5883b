// SPDX-License-Identifier: Apache-2.0
//! Starting the application processors: every CPU the MP table lists, the standard way (INIT
//! and a startup IPI through the local APIC, as Linux does), one after the other.
//!
//! Each one gets its own [`PerCpu`] page, kernel stack, user and fatal stacks, TSS, kvmclock page
//! and local APIC timer, then runs [`ap_main`] at CPL 3: it halts in the gate like the boot CPU
//! and runs its share of the workload ([`crate::work`]). Devices stay with the boot CPU.
//!
//! On paravirtual nested KVM the application processor's first instructions (real mode, then
//! CPL 0 until `iretq`) are emulated: a few dozen instructions, well under a millisecond.

use alloc::vec;
use core::sync::atomic::Ordering;

use crate::boot::{AP_BOOT_PERCPU, AP_TRAMPOLINE_ADDR, ap_trampoline};
use crate::percpu::{self, MAX_CPUS, PerCpu};
use crate::{apic, clock, gate, mptable, println};

/// Each application processor's user-mode stack (the workloads need little).
const AP_USER_STACK: usize = 256 << 10;
/// Each application processor's stack for reporting a fatal exception.
const AP_FATAL_STACK: usize = 32 << 10;
/// A CPU normally checks in within a millisecond; after this it gets a second startup IPI, as
/// the MP specification's start-up sequence sends two.
const SECOND_SIPI_AFTER_NS: u64 = 100_000_000;
/// After this a CPU is given up on (a host too loaded to run the vCPU's thread at all).
const GIVE_UP_AFTER_NS: u64 = 10_000_000_000;
/// Longest halt while waiting for another CPU, in case its wake-up IPI was missed.
pub const WAIT_POLL_NS: u64 = 10_000_000;

/// Halts until `done()` holds: woken by the other CPU's IPI ([`apic::wake`]), or every
/// [`WAIT_POLL_NS`] and at `until` at the latest. Halting rather than spinning leaves the host's
/// CPUs to the vCPUs being waited for: a guest can have more vCPUs than its host has cores.
pub fn wait_until(done: impl Fn() -> bool, until: u64) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = clock::now_ns();
        if now >= until {
            return false;
        }
        gate::halt(clock::tsc_at(until.min(now + WAIT_POLL_NS)));
        // Forget the wake-up: it did its job.
        percpu::current().take_irq(usize::from(apic::WAKEUP_VECTOR - crate::boot::IRQ_VECTOR_BASE));
    }
}

/// Wakes the boot CPU (see [`wait_until`]).
pub fn wake_boot_cpu() {
    if let Some(boot) = percpu::cpu(0) {
        apic::wake(boot.apic_id());
    }
}

/// Starts every CPU the MP table lists besides this one. Returns how many CPUs are online,
/// this one included. A CPU that does not start is reported on the console and left out.
pub fn start_all() -> usize {
    let me = apic::lapic_id();
    percpu::boot_cpu_ready(me);
    let Some(processors) = mptable::processors() else {
        println!("GUEST-NOTE no MP table: the boot CPU runs alone");
        return 1;
    };
    let mut online = 1;
    let mut trampoline_copied = false;
    for p in processors.iter().filter(|p| p.apic_id != me) {
        if online == MAX_CPUS {
            println!("GUEST-ERROR the MP table lists more than {MAX_CPUS} CPUs; the others stay off");
            break;
        }
        if !trampoline_copied {
            let code = ap_trampoline();
            // SAFETY: a page below 1 MiB that the identity map covers and nothing uses after
            // boot (see AP_TRAMPOLINE_ADDR); the trampoline is far smaller than a page.
            unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), AP_TRAMPOLINE_ADDR as *mut u8, code.len()) };
            trampoline_copied = true;
        }
        match start(online, p.apic_id) {
            Ok(()) => online += 1,
            Err(e) => println!("GUEST-ERROR CPU with local APIC id {}: {e}", p.apic_id),
        }
    }
    online
}

/// Starts the CPU with `apic_id` as CPU `index` and waits until it is online.
fn start(index: usize, apic_id: u8) -> Result<(), &'static str> {
    let top = |stack: &'static mut [u8]| (stack.as_ptr() as u64 + stack.len() as u64) & !15;
    let user = top(vec![0u8; AP_USER_STACK].leak());
    let fatal = top(vec![0u8; AP_FATAL_STACK].leak());
    let cpu = percpu::prepare(index, apic_id, user, fatal).ok_or("no per-CPU page for it")?;
    AP_BOOT_PERCPU.store(core::ptr::from_ref(cpu) as u64, Ordering::SeqCst);
    apic::send_init(apic_id);
    let page = (AP_TRAMPOLINE_ADDR >> 12) as u8;
    apic::send_startup(apic_id, page);
    let sent = clock::now_ns();
    let online = || cpu.is_online();
    let result = if wait_until(online, sent + SECOND_SIPI_AFTER_NS) || {
        // Ignored by a CPU that already started.
        apic::send_startup(apic_id, page);
        wait_until(online, sent + GIVE_UP_AFTER_NS)
    } {
        Ok(())
    } else {
        Err("did not start within 10 s of its startup IPI")
    };
    // A CPU given up on that starts after all finds 0 here and parks itself.
    AP_BOOT_PERCPU.store(0, Ordering::SeqCst);
    result
}

/// Where an application processor's user mode begins, on its own stack, interrupts off.
#[unsafe(no_mangle)]
extern "C" fn ap_main(cpu: &'static PerCpu) -> ! {
    apic::init_lapic();
    cpu.set_online();
    wake_boot_cpu();
    crate::work::run_ap(cpu.index())
}
