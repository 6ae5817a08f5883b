// SPDX-License-Identifier: Apache-2.0
//! The workloads, on every CPU. The boot CPU decides the plan (the command line's parameters and
//! how many CPUs came online), then every CPU builds its own [`Job`] from it and runs it in
//! steps: the boot CPU between serving its devices, the others in [`run_ap`], halting in the
//! gate whenever their job has nothing due.
//!
//! - `dirty`: each CPU over its own region ([`dirty`]);
//! - `compute`: one job whose units all CPUs share ([`compute`]);
//! - `burn`: each CPU busy a set share of every 100 ms ([`burn`]);
//! - `echo` and `idle`: nothing to run (the boot CPU serves the network either way).
//!
//! [`Monitor`] turns the CPUs' counters into the status line.

pub mod burn;
pub mod compute;
pub mod dirty;

use alloc::string::String;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use guest_common::{Params, RateWindow, Status, Workload};

use crate::smp::{wait_until, wake_boot_cpu};
use crate::{apic, clock, gate, power, println};

/// What one CPU runs.
pub enum Job {
    None,
    Dirty(dirty::Dirty),
    Compute(compute::Compute),
    Burn(burn::Burn),
}

impl Job {
    /// CPU `cpu`'s job out of `cpus` under `params`.
    fn new(params: &Params, cpus: usize, cpu: usize) -> Result<Job, String> {
        Ok(match params.workload {
            Workload::Dirty => Job::Dirty(dirty::Dirty::new(params.dirty_mib, params.dirty_rate_mib_s, cpus, cpu)?),
            Workload::Compute => Job::Compute(compute::Compute),
            Workload::Burn => Job::Burn(burn::Burn::new(params.duty_pct, cpu)),
            // The disk workload runs on the boot CPU beside its devices (see main).
            Workload::Echo | Workload::Idle | Workload::Disk | Workload::DiskBench => Job::None,
        })
    }

    /// Does one bounded step of work (at most a millisecond or so) if one is due; returns
    /// whether it did.
    pub fn step(&mut self, now: u64) -> bool {
        match self {
            Job::None => false,
            Job::Dirty(d) => d.step(now),
            Job::Compute(c) => c.step(),
            Job::Burn(b) => b.step(),
        }
    }

    /// When the next step is due (`Some(0)`: now), `None` if nothing will be.
    pub fn next_due_ns(&self, now: u64) -> Option<u64> {
        match self {
            Job::None => None,
            Job::Dirty(d) => d.next_due_ns(),
            Job::Compute(c) => c.next_due_ns(),
            Job::Burn(b) => b.next_due_ns(now),
        }
    }
}

/// The parameters and the CPU count, written once by the boot CPU before [`PLAN_READY`].
struct Plan(UnsafeCell<Option<(Params, usize)>>);

// SAFETY: written once, by the boot CPU, before PLAN_READY (release) lets anyone read it.
unsafe impl Sync for Plan {}

static PLAN: Plan = Plan(UnsafeCell::new(None));
static PLAN_READY: AtomicBool = AtomicBool::new(false);
/// CPUs whose job is built.
static JOBS_READY: AtomicUsize = AtomicUsize::new(0);

/// Starts the workload on all `cpus` CPUs (the others wait in [`run_ap`] for this) and returns
/// the boot CPU's job once every CPU has built its own. A CPU that cannot build its job (no
/// memory for its region) reports it and panics the guest.
pub fn start(params: &Params, cpus: usize) -> Job {
    if params.workload == Workload::Compute {
        compute::begin(params.work_units);
    }
    // SAFETY: written once, by the boot CPU, before PLAN_READY lets anyone read it.
    unsafe { *PLAN.0.get() = Some((*params, cpus)) };
    PLAN_READY.store(true, Ordering::Release);
    apic::wake_others();
    let job = build(params, cpus, 0);
    wait_until(|| JOBS_READY.load(Ordering::Acquire) >= cpus, u64::MAX);
    job
}

/// `vmm.fault_cpu=N` on CPU N: an invalid instruction, which the exception path reports with
/// this CPU's number (`GUEST-PANIC cpu=N exception 6 ...`) before the guest stops.
pub fn fault_if_asked(params: &Params, cpu: usize) {
    if params.fault_cpu.is_some_and(|c| c as usize == cpu) {
        // SAFETY: `ud2` raises #UD, which never returns here (see crate::fatal).
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}

fn build(params: &Params, cpus: usize, cpu: usize) -> Job {
    match Job::new(params, cpus, cpu) {
        Ok(job) => {
            JOBS_READY.fetch_add(1, Ordering::Release);
            if cpu != 0 {
                wake_boot_cpu();
            }
            job
        }
        Err(e) => {
            println!("GUEST-ERROR cpu={cpu} {e}");
            power::panicked()
        }
    }
}

/// An application processor's life once it is online: wait for the plan, build its job, run it.
pub fn run_ap(cpu: usize) -> ! {
    wait_until(|| PLAN_READY.load(Ordering::Acquire), u64::MAX);
    // SAFETY: PLAN_READY (acquire) says the boot CPU wrote PLAN, which it never writes again.
    let Some((params, cpus)) = (unsafe { *PLAN.0.get() }) else { power::panicked() };
    let mut job = build(&params, cpus, cpu);
    fault_if_asked(&params, cpu);
    loop {
        let now = clock::now_ns();
        if job.step(now) {
            continue;
        }
        // Nothing due: sleep until the next step is (or for good; no interrupt comes here but
        // this CPU's timer).
        let wake = job.next_due_ns(now).map_or(0, |t| clock::tsc_at(t.max(1)));
        gate::halt(wake);
    }
}

/// The boot CPU's view of every CPU's work, for the status line.
pub struct Monitor {
    params: Params,
    cpus: usize,
    units_done: RateWindow,
    busy_ns: RateWindow,
}

impl Monitor {
    pub fn new(params: &Params, cpus: usize) -> Self {
        Monitor {
            params: *params,
            cpus,
            units_done: RateWindow::default(),
            busy_ns: RateWindow::with_interval(RateWindow::BUSY_SAMPLE_NS),
        }
    }

    /// Takes a reading of the counters whose rates `status` reports; call it often.
    pub fn sample(&mut self, now: u64) {
        self.units_done.sample(now, compute::done());
        self.busy_ns.sample(now, burn::busy_ns(self.cpus));
    }

    pub fn status(&self, now: u64) -> Status {
        let burning = self.params.workload == Workload::Burn;
        let busy_per_s = self.busy_ns.rate_per_s(now, burn::busy_ns(self.cpus));
        Status {
            workload: self.params.workload,
            cpus: self.cpus as u32,
            uptime_ms: now / 1_000_000,
            dirty_passes: dirty::passes(self.cpus),
            dirty_mismatches: dirty::mismatches(),
            // The boot CPU's disk workload, if any, fills these in (see main).
            disk_passes: 0,
            disk_mismatches: 0,
            job: compute::progress(now, &self.units_done),
            duty_pct: if burning { self.params.duty_pct } else { 0 },
            busy_pct: busy_pct(busy_per_s, self.cpus),
        }
    }
}

/// Nanoseconds busy per second of `cpus` CPUs as a percentage of their time, rounded.
fn busy_pct(busy_ns_per_s: u64, cpus: usize) -> u8 {
    let per_pct = cpus.max(1) as u64 * 10_000_000;
    ((busy_ns_per_s + per_pct / 2) / per_pct).min(100) as u8
}
