// SPDX-License-Identifier: Apache-2.0
//! The CPUs init runs its per-CPU workloads on: the ones its affinity allows (every online CPU
//! when it is PID 1 in a guest; the test's share of the host in test mode), read once at start,
//! and pinning a thread to one of them.

use std::io;
use std::sync::OnceLock;

static CPUS: OnceLock<Vec<usize>> = OnceLock::new();

/// The CPUs to use, in ascending order; never empty (a failed query gives CPU 0 alone).
pub fn all() -> &'static [usize] {
    CPUS.get_or_init(|| match allowed() {
        Ok(cpus) if !cpus.is_empty() => cpus,
        Ok(_) => vec![0],
        Err(e) => {
            say!("init: cannot read the CPU affinity, using one CPU: {e}");
            vec![0]
        }
    })
}

fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set and its size are valid; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET only reads the set, for indices below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> io::Result<()> {
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set; `cpu` comes from `all()`, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the set and its size are valid; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Spawns one thread per CPU, pinned to it, each running `f(i)` for its position `i` among the
/// CPUs (0..n).
pub fn spawn_per_cpu(name: &str, f: impl Fn(usize) + Clone + Send + 'static) -> Result<(), String> {
    for i in 0..all().len() {
        let f = f.clone();
        spawn_on(i, name, move || f(i))?;
    }
    Ok(())
}

/// Spawns a thread named `name<i>` pinned to the `i`th CPU, running `f`. A thread that cannot
/// be pinned says so and runs unpinned.
pub fn spawn_on(i: usize, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    let cpu = all()[i % all().len()];
    let label = format!("{name}{i}");
    crate::spawn(&label.clone(), move || {
        if let Err(e) = pin(cpu) {
            say!("{label}: cannot pin to CPU {cpu}: {e}");
        }
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_is_a_cpu_and_pinning_works() {
        let cpus = all();
        assert!(!cpus.is_empty());
        std::thread::spawn(|| pin(all()[0])).join().unwrap().unwrap();
    }
}
