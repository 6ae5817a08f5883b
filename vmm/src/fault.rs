// SPDX-License-Identifier: Apache-2.0
//! Fault points for testing failures at exact moments of a migration.
//!
//! With `VMM_FAULT_STOP_AT=NAME` in its environment, the VMM stops itself (`SIGSTOP`) when it
//! reaches the point `NAME`, as if the scheduler had frozen it there. A test then does the
//! damage it studies (kills this or the other VMM, cuts the link) and, if this one should go
//! on, sends it `SIGCONT`. Nothing else changes: the stopped VMM is the real one, its sockets
//! and its guest are real, and without the variable a point costs one comparison. The points:
//!
//! | name | where |
//! |---|---|
//! | `destination:start` | the destination read `Start`, before it answers (set-up) |
//! | `source:paused` | the source paused the guest and sent `Paused` (stop-and-copy) |
//! | `source:complete` | the source sent `Complete`, before it reads the answer |
//! | `destination:complete` | the destination read `Complete`, before it restores the guest |

use std::sync::OnceLock;

/// The environment variable that names the point to stop at.
pub const ENV: &str = "VMM_FAULT_STOP_AT";

fn target() -> Option<&'static str> {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    TARGET.get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty())).as_deref()
}

/// Stops this process if `VMM_FAULT_STOP_AT` names `name`.
pub fn point(name: &str) {
    if target() == Some(name) {
        // On stderr whatever the log level: the test waits for it.
        eprintln!("vmm: fault point {name}: stopping (SIGSTOP)");
        // SAFETY: raise has no memory effects; SIGSTOP stops the whole process until SIGCONT.
        unsafe { libc::raise(libc::SIGSTOP) };
        eprintln!("vmm: fault point {name}: continued");
    }
}
