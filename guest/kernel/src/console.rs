// SPDX-License-Identifier: Apache-2.0
//! Console output on COM1, formatted in a stack buffer and written with one gate call per chunk.
//! A lock keeps the lines of different CPUs apart (the VMM's UART takes `rep outsb` byte by
//! byte, so two CPUs writing at once would mix their bytes).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

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

/// 0 when free, else 1 + the index of the CPU printing.
static OWNER: AtomicUsize = AtomicUsize::new(0);
/// How long a CPU waits for the lock before it prints anyway: far longer than any line takes,
/// so only a CPU that died holding the lock is ever overridden.
const LOCK_SPINS: u64 = 1 << 28;

/// Holds the console lock while alive.
struct Lock {
    owned: bool,
}

impl Lock {
    fn take() -> Self {
        let me = crate::percpu::current().index() + 1;
        for _ in 0..LOCK_SPINS {
            match OWNER.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Lock { owned: true },
                // This CPU already prints: a fault or panic in the middle of a line.
                Err(owner) if owner == me => return Lock { owned: false },
                Err(_) => core::hint::spin_loop(),
            }
        }
        Lock { owned: false }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if self.owned {
            OWNER.store(0, Ordering::Release);
        }
    }
}

pub fn print(args: fmt::Arguments) {
    let _lock = Lock::take();
    let mut c = Console::new();
    let _ = c.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
