// SPDX-License-Identifier: Apache-2.0
//! Time from kvmclock: KVM keeps a `pvclock_vcpu_time_info` per vCPU in guest memory that turns
//! that vCPU's TSC into nanoseconds since boot; each CPU reads its own. It is the clock Linux guests use under KVM, and it keeps time
//! across live migration (the VMM restores the clock and KVM refreshes this structure).

use core::ptr::read_volatile;

#[derive(Clone, Copy)]
struct Snapshot {
    tsc_timestamp: u64,
    system_time: u64,
    mul: u32,
    shift: i8,
}

fn snapshot() -> Snapshot {
    let p = crate::percpu::current().pvclock();
    loop {
        // SAFETY: this CPU's kvmclock page, 8 u32; KVM writes it, so every read is volatile, and
        // the version protocol (odd while KVM updates, changed after) gives a consistent copy.
        unsafe {
            let v1 = read_volatile(p);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            let s = Snapshot {
                tsc_timestamp: u64::from(read_volatile(p.add(2))) | u64::from(read_volatile(p.add(3))) << 32,
                system_time: u64::from(read_volatile(p.add(4))) | u64::from(read_volatile(p.add(5))) << 32,
                mul: read_volatile(p.add(6)),
                shift: (read_volatile(p.add(7)) & 0xff) as u8 as i8,
            };
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            let v2 = read_volatile(p);
            if v1 == v2 && v1 & 1 == 0 {
                return s;
            }
        }
    }
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear, so it works at CPL 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Nanoseconds since the guest booted (kvmclock's system time).
pub fn now_ns() -> u64 {
    let s = snapshot();
    if s.mul == 0 {
        // kvmclock not running (the VMM's KVM lacks it): a clock that never moves would hang
        // every timeout, so fall back to an assumed 1 GHz TSC.
        return rdtsc();
    }
    let mut delta = rdtsc().wrapping_sub(s.tsc_timestamp);
    if s.shift < 0 {
        delta >>= -s.shift;
    } else {
        delta <<= s.shift;
    }
    s.system_time.wrapping_add(((u128::from(delta) * u128::from(s.mul)) >> 32) as u64)
}

/// The TSC value at which kvmclock will read `ns`, for the LAPIC TSC-deadline timer.
pub fn tsc_at(ns: u64) -> u64 {
    let s = snapshot();
    if s.mul == 0 {
        return ns;
    }
    let delta_ns = ns.saturating_sub(s.system_time);
    let mut delta = ((u128::from(delta_ns) << 32) / u128::from(s.mul)).min(u128::from(u64::MAX >> 8)) as u64;
    if s.shift < 0 {
        delta <<= -s.shift;
    } else {
        delta >>= s.shift;
    }
    s.tsc_timestamp.wrapping_add(delta)
}
