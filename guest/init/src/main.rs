// SPDX-License-Identifier: Apache-2.0
//! The Linux guest's `/init`: sets up the system, starts the workload named on the kernel
//! command line and the control service, prints the ready line, and powers off when asked.
//!
//! Run as PID 1 it is the guest's init. Run as any other PID it is in *test mode*, so that it can
//! be tested on a normal Linux host: the command line is `argv[1]`, nothing is mounted or
//! configured, and powering off is `exit(0)`.
//!
//! PID 1 must never exit (Linux panics if it does) and this profile aborts on panic, so nothing
//! the outside controls may panic here: errors are logged on the console and the service that
//! hit them carries on or stops alone.

#[macro_use]
mod console;
mod burn;
mod compute;
mod control;
mod cpucheck;
mod cpus;
mod dirty;
mod echo;
mod net;
mod records;
mod status;
mod system;

use std::thread;
use std::time::Duration;

use guest_common::{Params, READY_PREFIX, Workload};

/// How this process runs; decided once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in a guest.
    Init,
    /// Any other PID: a test on the host.
    Test,
}

fn main() {
    let mode = if std::process::id() == 1 { Mode::Init } else { Mode::Test };
    let cmdline = match mode {
        Mode::Init => {
            system::setup();
            std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
                say!("init: cannot read /proc/cmdline, using defaults: {e}");
                String::new()
            })
        }
        Mode::Test => std::env::args().nth(1).unwrap_or_default(),
    };
    let params = Params::parse(&cmdline);
    // Read the CPU set while this thread's affinity is still the whole set.
    cpus::all();

    if let Err(e) = start(params, mode).and_then(|()| cpucheck::start(&cmdline)) {
        fatal(mode, &e);
    }
    say!(
        "{READY_PREFIX} uptime_ms={} workload={} cpus={} kernel=linux",
        system::uptime_ms(),
        params.workload.name(),
        cpus::all().len()
    );

    if let Some(ms) = params.poweroff_after_ms {
        thread::sleep(Duration::from_millis(ms));
        system::poweroff(mode);
    }
    idle_forever();
}

/// Starts the control service, the console reader and the workload; once it returns `Ok` the
/// workload is listening or running.
fn start(params: Params, mode: Mode) -> Result<(), String> {
    status::start()?;
    control::start(params, mode)?;
    spawn("console", move || control::serve_console(params, mode))?;
    // The TCP and UDP services run whenever the guest has an address, so a client can watch
    // its flows survive a migration whatever the workload.
    if params.workload == Workload::Echo || params.ipv4.is_some() {
        echo::start()?;
    }
    match params.workload {
        Workload::Echo | Workload::Idle => Ok(()),
        Workload::Dirty => dirty::start(params.dirty_mib, params.dirty_rate_mib_s),
        Workload::Compute => compute::start(params.work_units),
        Workload::Burn => burn::start(params.duty_pct),
        Workload::Disk => records::start(mode, params.disk_rate_mib_s, params.disk_passes),
        Workload::DiskBench => Err("the diskbench workload runs only in vmm-guest".into()),
    }
}

/// Spawns a named thread, reporting failure (which `thread::spawn` would panic on).
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}

/// The guest cannot do what it was asked to. A test run exits with an error; PID 1 cannot exit,
/// so it stays up without a ready line and whoever waits for one times out with this message
/// on the console.
fn fatal(mode: Mode, msg: &str) -> ! {
    say!("init: fatal: {msg}");
    if mode == Mode::Test {
        std::process::exit(1);
    }
    idle_forever()
}

/// The last resort of PID 1: anything but returning.
pub fn idle_forever() -> ! {
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
