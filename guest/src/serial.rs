//! COM1 console output and the `print!`/`println!` macros.
//!
//! Every byte is one OUT exit to the host (about 11.5 us on KVM-PVM), so keep
//! console output short on hot paths.

use crate::abi::{port, LSR_THR_EMPTY};
use crate::arch::x86_64::{inb, outb};
use core::fmt;

/// The console. Stateless: the kernel runs on one CPU with interrupts off,
/// and bytes from nested writers (a fault inside a print) may interleave but
/// are never lost.
pub struct Serial;

/// Transmit FIFO depth of a 16550A.
const FIFO_SIZE: usize = 16;

impl Serial {
    pub fn write_byte(b: u8) {
        while inb(port::COM1_LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(port::COM1_THR, b);
    }

    /// Writes `bytes` a FIFO-load at a time: once LSR says the transmitter
    /// is empty, a 16550 takes 16 bytes without further polling. That saves
    /// an IN exit per byte (half the console's cost on a VMM).
    pub fn write_bytes(bytes: &[u8]) {
        for chunk in bytes.chunks(FIFO_SIZE) {
            while inb(port::COM1_LSR) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            for &b in chunk {
                outb(port::COM1_THR, b);
            }
        }
    }

    /// Enables the 16550's FIFOs (FCR: enable, clear both, 14-byte trigger).
    pub fn init() {
        outb(port::COM1_THR + 2, 0xC7);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Serial::write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
