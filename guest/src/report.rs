//! Report records sent to the host over port 0x500 (docs/ABI.md).
//!
//! A record is a `ReportHeader` followed by `key=value\n` lines, built in a
//! static buffer inside the image; the host is given its physical address.
//! Two buffers exist: `Slot::Normal` for ordinary reports and
//! `Slot::Emergency` for panic and fault paths, which may interrupt a report
//! being built.

use crate::abi::{port, ReportHeader, ReportKind, REPORT_MAGIC};
use crate::arch::x86_64::outl;
use crate::image;
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const NORMAL_CAP: usize = 16 * 1024;
const EMERGENCY_CAP: usize = 4 * 1024;

#[repr(C, align(16))]
struct Record<const N: usize> {
    header: ReportHeader,
    payload: [u8; N],
}

struct Buffer<const N: usize> {
    busy: AtomicBool,
    record: UnsafeCell<Record<N>>,
}

// SAFETY: access to `record` is serialised by `busy`.
unsafe impl<const N: usize> Sync for Buffer<N> {}

impl<const N: usize> Buffer<N> {
    const fn new() -> Self {
        Buffer {
            busy: AtomicBool::new(false),
            record: UnsafeCell::new(Record {
                header: ReportHeader { magic: 0, kind: 0, len: 0, reserved: 0 },
                payload: [0; N],
            }),
        }
    }
}

static NORMAL: Buffer<NORMAL_CAP> = Buffer::new();
static EMERGENCY: Buffer<EMERGENCY_CAP> = Buffer::new();

/// A report under construction. Dropping it without `send` discards it.
pub struct Report {
    header: *mut ReportHeader,
    payload: *mut u8,
    cap: usize,
    len: usize,
    truncated: bool,
    busy: &'static AtomicBool,
}

impl Report {
    /// Starts a report in the normal buffer, or in the emergency buffer if
    /// the normal one is in use (a fault while a report was being built).
    /// Returns `None` only if both are taken.
    pub fn new(kind: ReportKind) -> Option<Report> {
        Self::take(&NORMAL, kind).or_else(|| Self::take(&EMERGENCY, kind))
    }

    /// Starts a report in the emergency buffer (panic and fault paths).
    pub fn emergency(kind: ReportKind) -> Option<Report> {
        Self::take(&EMERGENCY, kind).or_else(|| Self::take(&NORMAL, kind))
    }

    fn take<const N: usize>(buf: &'static Buffer<N>, kind: ReportKind) -> Option<Report> {
        if buf.busy.swap(true, Ordering::Acquire) {
            return None;
        }
        let rec = buf.record.get();
        // SAFETY: `busy` gives us exclusive access to the record until drop.
        unsafe {
            (*rec).header = ReportHeader { magic: REPORT_MAGIC, kind: kind as u32, len: 0, reserved: 0 };
            Some(Report {
                header: core::ptr::addr_of_mut!((*rec).header),
                payload: core::ptr::addr_of_mut!((*rec).payload) as *mut u8,
                cap: N,
                len: 0,
                truncated: false,
                busy: &buf.busy,
            })
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.cap - self.len);
        if n < bytes.len() {
            self.truncated = true;
        }
        // SAFETY: `len + n <= cap`, and the buffer is ours (see `take`).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.payload.add(self.len), n) };
        self.len += n;
    }

    /// Appends `key=value\n`; newlines inside the value become spaces.
    pub fn kv(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.kv_fmt(key, format_args!("{}", value))
    }

    /// Appends `key=0x...\n`.
    pub fn kv_hex(&mut self, key: &str, value: u64) -> &mut Self {
        // Hand-rolled: core::fmt costs thousands of (emulated) instructions.
        let mut buf = [0u8; 18];
        let mut i = buf.len();
        let mut v = value;
        loop {
            i -= 1;
            buf[i] = b"0123456789abcdef"[(v & 0xF) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        buf[i - 1] = b'x';
        buf[i - 2] = b'0';
        self.push(key.as_bytes());
        self.push(b"=");
        self.push(&buf[i - 2..]);
        self.push(b"\n");
        self
    }

    pub fn kv_fmt(&mut self, key: &str, value: fmt::Arguments) -> &mut Self {
        self.push(key.as_bytes());
        self.push(b"=");
        let _ = ValueWriter(self).write_fmt(value);
        self.push(b"\n");
        self
    }

    /// Hands the record to the host (one OUT exit) and frees the buffer.
    pub fn send(self) {
        // SAFETY: the header is ours (see `take`).
        unsafe { (*self.header).len = self.len as u32 };
        let phys = image::virt_to_phys(self.header as u64);
        outl(port::REPORT, phys as u32);
        // `drop` releases the buffer.
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

/// Writes a value, replacing line breaks so one value stays one line.
struct ValueWriter<'a>(&'a mut Report);

impl Write for ValueWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' || b == b'\r' {
                self.0.push(&bytes[start..i]);
                self.0.push(b" ");
                start = i + 1;
            }
        }
        self.0.push(&bytes[start..]);
        Ok(())
    }
}

/// Sends a report with no payload-building beyond a closure.
pub fn send(kind: ReportKind, fill: impl FnOnce(&mut Report)) {
    if let Some(mut r) = Report::new(kind) {
        fill(&mut r);
        r.send();
    }
}
