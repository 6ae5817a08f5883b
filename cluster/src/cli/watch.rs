// SPDX-License-Identifier: Apache-2.0
//! `vmm cluster status --watch`: the status read and drawn again every few seconds until
//! SIGINT (Ctrl-C) or SIGTERM. On a terminal each frame replaces the last (cursor home, screen
//! cleared); anywhere else (a pipe, a file) the frames follow one another, each after a line
//! with its time, so that a log of them reads in order. A first read that fails ends the watch
//! with the error, as any command; a later one (etcd gone for a while) is shown in its frame and
//! the watch goes on.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use super::commands::cancel_on_signals;
use super::status::{render, status_report};
use crate::error::ClusterError;
use crate::store::Store;
use crate::view::ClusterView;

/// Moves the cursor home and clears the screen and its scroll-back, so a frame does not pile
/// up on the last in the terminal's history.
const CLEAR: &str = "\x1b[H\x1b[2J\x1b[3J";

/// The line before each frame that is not drawn on a terminal; [`frame`] puts the time after.
pub const STAMP_PREFIX: &str = "===== vmm cluster status at ";

/// One frame: `text` (the rendered status) as it is shown at time `at`, every `every`.
pub fn frame(text: &str, at: SystemTime, every: Duration, terminal: bool) -> String {
    let when = httpdate::fmt_http_date(at);
    if terminal {
        format!("{CLEAR}vmm cluster status, {when}, every {} s (Ctrl-C to stop)\n\n{text}", every.as_secs_f64())
    } else {
        format!("{STAMP_PREFIX}{when} =====\n{text}\n")
    }
}

/// Redraws the status of the cluster in `store` every `every` until a signal.
pub async fn run<S: Store>(store: &S, every: Duration) -> Result<(), ClusterError> {
    let terminal = std::io::stdout().is_terminal();
    let mut cancel = cancel_on_signals("stopping");
    let mut first = true;
    loop {
        let text = tokio::select! {
            _ = cancel.wait_for(|c| *c) => break,
            view = ClusterView::load(store) => match view {
                Ok(v) => render(&status_report(&v)),
                Err(e) if first => return Err(e.into()),
                Err(e) => format!("cannot read the cluster now: {e}\n(retrying every {} s)\n", every.as_secs_f64()),
            },
        };
        let mut out = std::io::stdout().lock();
        let written =
            out.write_all(frame(&text, SystemTime::now(), every, terminal).as_bytes()).and_then(|()| out.flush());
        match written {
            Ok(()) => {}
            // Whoever read the frames went away (`| head`): nothing left to do.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(ClusterError::io("writing the status")(e)),
        }
        drop(out);
        first = false;
        tokio::select! {
            _ = cancel.wait_for(|c| *c) => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_replace_each_other_on_a_terminal_and_follow_each_other_elsewhere() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_556_000);
        let every = Duration::from_millis(1500);
        let text = "HOSTS\nno hosts\n";
        let tty = frame(text, at, every, true);
        assert!(tty.starts_with(CLEAR), "{tty:?}");
        assert!(tty.contains("Sun, 06 Dec 2026 11:20:00 GMT") && tty.contains("every 1.5 s"), "{tty:?}");
        assert!(tty.ends_with(text), "{tty:?}");

        let piped = frame(text, at, every, false);
        assert!(!piped.contains('\x1b'), "escape codes outside a terminal: {piped:?}");
        assert_eq!(piped, "===== vmm cluster status at Sun, 06 Dec 2026 11:20:00 GMT =====\nHOSTS\nno hosts\n\n");
        // Two frames in a row read as two stamped tables.
        let two = format!("{piped}{}", frame(text, at + every, every, false));
        assert_eq!(two.matches(STAMP_PREFIX).count(), 2);
        assert_eq!(two.lines().filter(|l| *l == "HOSTS").count(), 2);
    }
}
