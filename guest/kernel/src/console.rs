// SPDX-License-Identifier: Apache-2.0
//! Console output on COM1, formatted in a stack buffer and written with one gate call per chunk.

use core::fmt::{self, Write};

use crate::gate;

const COM1: u16 = 0x3f8;

/// Formats into a fixed buffer; writes it out when full and when dropped.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }

    fn flush(&mut self) {
        gate::outs(COM1, &self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

pub fn print(args: fmt::Arguments) {
    let mut c = Console::new();
    let _ = c.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
