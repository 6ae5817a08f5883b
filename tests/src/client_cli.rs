// SPDX-License-Identifier: Apache-2.0
//! What the client processes (`vmm-echo-client`, `vmm-udp-client`) share: their arguments
//! (`IP:PORT INTERVAL_MS`) and running until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// `IP:PORT INTERVAL_MS`, the interval at least 1 ms.
pub fn parse_target(args: &[String]) -> Result<(SocketAddr, Duration), String> {
    let [addr, ms] = args else { return Err("expected two arguments".into()) };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("bad address {addr:?}: {e}"))?;
    let ms: u64 = ms.parse().map_err(|e| format!("bad interval {ms:?}: {e}"))?;
    if ms == 0 {
        return Err("the interval must be at least 1 ms".into());
    }
    Ok((addr, Duration::from_millis(ms)))
}

/// Makes SIGTERM and SIGINT set the flag [`wait_for_stop`] waits on.
pub fn stop_on_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Returns once SIGTERM or SIGINT came (see [`stop_on_signals`]).
pub fn wait_for_stop() {
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = |v: &[&str]| parse_target(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&["10.0.0.2:7000", "10"]).unwrap(), ("10.0.0.2:7000".parse().unwrap(), Duration::from_millis(10)));
        assert!(a(&["10.0.0.2:7000"]).is_err());
        assert!(a(&["10.0.0.2", "10"]).is_err());
        assert!(a(&["10.0.0.2:7000", "0"]).is_err());
    }
}
