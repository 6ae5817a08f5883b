// SPDX-License-Identifier: Apache-2.0
//! vmm-guest: our own minimal guest kernel.
//!
//! It exists because on paravirtual nested KVM (the machines this project is developed and
//! tested on) guest kernel-mode code is emulated instruction by instruction, so Linux cannot boot
//! in useful time there. This kernel keeps CPL 0 to a few assembly paths ([`boot`]) and runs
//! everything else, network stack and workload included, at CPL 3, natively. It boots like a
//! Linux vmlinux, reads the same command line, prints the same ready line and runs the same
//! workloads as the Linux guest's init, on every CPU the MP table lists ([`smp`], [`work`]). All
//! its state lives in its memory and vCPU registers, so the VMM migrates it like any other
//! guest.
#![no_std]
#![no_main]

extern crate alloc;

mod apic;
mod boot;
mod bootinfo;
mod clock;
mod console;
mod console_input;
mod disk;
mod diskbench;
mod fatal;
mod gate;
mod heap;
mod mem;
mod mptable;
mod netstack;
mod percpu;
mod power;
mod smp;
mod virtio_blk;
mod virtio_net;
mod virtqueue;
mod work;

use alloc::string::ToString;

use guest_common::{Params, READY_PREFIX, Workload};

/// Longest sleep: the loop wakes at least this often even with nothing scheduled.
const MAX_SLEEP_NS: u64 = 1_000_000_000;

/// Entered from `_start` at CPL 3 on the boot CPU with the zero page address.
#[unsafe(no_mangle)]
extern "C" fn rust_main(boot_info: u64, pvh: u64) -> ! {
    boot::init_idt();
    // SAFETY: the VMM entered us with a zero page (Linux 64-bit boot protocol) or, through the
    // PVH note, an hvm_start_info, as the respective protocol promises.
    let info =
        unsafe { if pvh == 0 { bootinfo::BootInfo::read(boot_info) } else { bootinfo::BootInfo::read_pvh(boot_info) } };
    let params = Params::parse(info.cmdline());
    heap::init(info.ram());
    apic::init_lapic();
    let cpus = smp::start_all();
    let mut job = work::start(&params, cpus);
    let mut monitor = work::Monitor::new(&params, cpus);

    let mut disk = match params.workload {
        Workload::Disk => match virtio_blk::find(&params) {
            Some(dev) => {
                Some(disk::DiskWorkload::new(dev, params.disk_mib, params.disk_rate_mib_s, params.disk_passes))
            }
            None => {
                println!("GUEST-ERROR the disk workload needs a virtio-blk device");
                power::panicked();
            }
        },
        _ => None,
    };

    let mut net = bring_up_network(&params);
    if net.is_none() && params.workload == Workload::Echo {
        println!("GUEST-ERROR the echo workload needs a virtio-net device and ip= on the command line");
    }

    let ready_ns = clock::now_ns();
    println!(
        "{READY_PREFIX} uptime_ms={} workload={} cpus={cpus} kernel=vmm-guest",
        ready_ns / 1_000_000,
        params.workload.name()
    );
    let poweroff_at = params.poweroff_after_ms.map(|ms| ready_ns + ms * 1_000_000);
    work::fault_if_asked(&params, 0);
    if params.workload == Workload::DiskBench {
        // Once, before the main loop: the benchmark's guest has nothing else to do.
        match virtio_blk::find(&params) {
            Some(dev) => diskbench::run(dev, params.disk_mib),
            None => println!("GUEST-ERROR the diskbench workload needs a virtio-blk device"),
        }
    }
    let mut console = console_input::ConsoleInput::new();
    loop {
        let now = clock::now_ns();
        if poweroff_at.is_some_and(|t| now >= t) {
            power::poweroff();
        }
        monitor.sample(now);
        let (disk_passes, disk_mismatches) = disk.as_ref().map_or((0, 0), |d| (d.passes_done, d.mismatches));
        let status_line = || {
            let mut status = monitor.status(clock::now_ns());
            (status.disk_passes, status.disk_mismatches) = (disk_passes, disk_mismatches);
            status.to_string()
        };
        match console.poll(now) {
            Some(console_input::Command::Poweroff) => power::poweroff(),
            Some(console_input::Command::Status) => println!("{}", status_line()),
            None => {}
        }
        let mut busy = false;
        // No need to wake for the console: its interrupt ends the sleep.
        let mut wake = now + MAX_SLEEP_NS;
        if let Some(n) = net.as_mut() {
            let (b, request) = n.poll(&status_line);
            busy |= b;
            // A busy guest takes no interrupts: look for an announce request now and then.
            if busy {
                n.maybe_check_announce(now);
            }
            if request == netstack::Request::Poweroff {
                power::poweroff();
            }
            if let Some(t) = n.next_deadline_ns() {
                wake = wake.min(t);
            }
        }
        busy |= job.step(now);
        if let Some(t) = job.next_due_ns(now) {
            wake = wake.min(t);
        }
        if let Some(d) = disk.as_mut() {
            busy |= d.step(now);
            wake = wake.min(d.next_due_ns());
        }
        if let Some(t) = poweroff_at {
            wake = wake.min(t);
        }
        if busy || wake <= clock::now_ns() {
            continue;
        }
        // Sleep: ask the NIC for an interrupt on the next frame (unless one is already here),
        // then halt until it comes or the next deadline.
        let armed = net.as_mut().is_none_or(|n| n.device.arm_interrupts());
        if armed {
            gate::halt(clock::tsc_at(wake));
        }
        if let Some(n) = net.as_mut() {
            let woken = boot::take_irq(apic::PIN_VECTOR_BASE + n.irq);
            let reasons = n.device.disarm_interrupts(woken);
            if reasons & virtio_net::INT_CONFIG != 0 {
                n.announce_if_asked(clock::now_ns());
            }
        }
    }
}

/// The first virtio-net device on the command line, with its interrupt routed.
fn bring_up_network(params: &Params) -> Option<netstack::NetStack> {
    for dev in params.devices() {
        match virtio_net::VirtioNet::init(dev.base) {
            Ok(nic) => {
                apic::route_pin(dev.irq);
                let mut stack = netstack::NetStack::new(nic, params.ipv4, params.ipv4.is_some());
                stack.irq = dev.irq as u8;
                stack.announce();
                return Some(stack);
            }
            // Disks are not NICs: not an error.
            Err(virtio_net::InitError::NotNet) => {}
            Err(e) => println!("GUEST-ERROR virtio-mmio device at {:#x}: {e}", dev.base),
        }
    }
    None
}
