// SPDX-License-Identifier: Apache-2.0
//! Lines on the console. PID 1's stdout is `/dev/console` (ttyS0); tests read the same lines from
//! a pipe.
//!
//! `println!` panics when the write fails, and a panic would kill PID 1, so every line goes
//! through [`say`], which drops it instead: there is nowhere else to report the failure.

use std::fmt;
use std::io::Write;

/// Prints one line on the console, formatted like `println!`.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::say(format_args!($($arg)*))
    };
}

/// Writes `args` and a newline in one piece and flushes it, so that lines from different
/// threads never interleave and a line is out before whatever follows it (a poweroff).
pub fn say(args: fmt::Arguments) {
    let mut line = args.to_string();
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}
