//! In-guest tests, chosen by `tests=` on the command line.
//!
//! `tests=all`, `tests=frames,heap` (groups), `tests=heap::coalesce` (one
//! test) or any mix; `tests=list` sends a TEST_LIST report. Each test
//! yields a TEST_RESULT report and a TAP-style serial line (`ok N - name`,
//! `not ok N - name: msg`, `ok N - name # SKIP msg`); the run ends with a
//! SUMMARY report and `SUMMARY: N tests, M failures`.
//!
//! Every CPL0 instruction costs ~270 ns on KVM-PVM hosts: keep loop counts
//! in the hundreds, not millions.

mod demand;
mod frames;
mod heap;
mod inspect;
mod interrupts;
mod mapper;
mod paging;
mod security;
mod tables;
mod task;

use crate::abi::ReportKind;
use crate::println;
use crate::report::{self, Report};
use core::fmt::{self, Write};

/// A failure or skip message, formatted without the heap (the heap may be
/// what is under test).
pub struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    pub fn new(args: fmt::Arguments) -> Msg {
        let mut m = Msg { buf: [0; 200], len: 0 };
        let _ = m.write_fmt(args);
        m
    }
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf-8>")
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Truncate on a char boundary.
        let mut n = s.len().min(self.buf.len() - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub enum TestError {
    Fail(Msg),
    Skip(Msg),
}

pub type TestResult = Result<(), TestError>;

pub struct Test {
    pub name: &'static str,
    pub func: fn() -> TestResult,
}

/// Fails the test with a message (and the line) unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr) => {
        if !$cond {
            return Err($crate::ktest::TestError::Fail($crate::ktest::Msg::new(format_args!(
                "line {}: check failed: {}", line!(), stringify!($cond)
            ))));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::ktest::TestError::Fail($crate::ktest::Msg::new(format_args!(
                "line {}: {}", line!(), format_args!($($arg)+)
            ))));
        }
    };
}

/// Fails unless `a == b`, showing both values.
#[macro_export]
macro_rules! check_eq {
    ($a:expr, $b:expr) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err($crate::ktest::TestError::Fail($crate::ktest::Msg::new(format_args!(
                "line {}: {} == {}: {:?} != {:?}", line!(), stringify!($a), stringify!($b), a, b
            ))));
        }
    }};
}

/// Unwraps a Result, failing the test with the error's Debug form.
#[macro_export]
macro_rules! check_ok {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                return Err($crate::ktest::TestError::Fail($crate::ktest::Msg::new(format_args!(
                    "line {}: {} failed: {:?}", line!(), stringify!($e), err
                ))))
            }
        }
    };
}

/// Fails the test unconditionally.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)+) => {
        return Err($crate::ktest::TestError::Fail($crate::ktest::Msg::new(format_args!(
            "line {}: {}", line!(), format_args!($($arg)+)
        ))))
    };
}

#[macro_export]
macro_rules! skip {
    ($($arg:tt)+) => {
        return Err($crate::ktest::TestError::Skip($crate::ktest::Msg::new(format_args!($($arg)+))))
    };
}

/// Every test, in run order ("group::name").
pub static TESTS: &[Test] = &[
    Test { name: "frames::alloc_free_single", func: frames::alloc_free_single },
    Test { name: "frames::only_conventional", func: frames::only_conventional },
    Test { name: "frames::double_free_detected", func: frames::double_free_detected },
    Test { name: "frames::never_allocated_detected", func: frames::never_allocated_detected },
    Test { name: "frames::contiguous_aligned", func: frames::contiguous_aligned },
    Test { name: "frames::exhaustion", func: frames::exhaustion },
    Test { name: "interrupts::probe_unmapped_read", func: interrupts::probe_unmapped_read },
    Test { name: "interrupts::probe_readonly_write", func: interrupts::probe_readonly_write },
    Test { name: "interrupts::probe_non_canonical", func: interrupts::probe_non_canonical },
    Test { name: "interrupts::ist_configured", func: interrupts::ist_configured },
    Test { name: "paging::translate_kernel", func: paging::translate_kernel },
    Test { name: "paging::map_unmap_4k", func: paging::map_unmap_4k },
    Test { name: "paging::map_2m", func: paging::map_2m },
    Test { name: "paging::map_1g", func: paging::map_1g },
    Test { name: "paging::errors", func: paging::errors },
    Test { name: "paging::frees_empty_tables", func: paging::frees_empty_tables },
    Test { name: "paging::permissions", func: paging::permissions },
    Test { name: "paging::no_execute", func: paging::no_execute },
    Test { name: "mapper::map_4k", func: mapper::map_4k },
    Test { name: "mapper::map_2m", func: mapper::map_2m },
    Test { name: "mapper::map_1g", func: mapper::map_1g },
    Test { name: "mapper::child_counts", func: mapper::child_counts },
    Test { name: "mapper::frees_empty_tables", func: mapper::frees_empty_tables },
    Test { name: "mapper::errors", func: mapper::errors },
    Test { name: "mapper::user_bits", func: mapper::user_bits },
    Test { name: "heap::box_and_vec", func: heap::box_and_vec },
    Test { name: "heap::coalesce", func: heap::coalesce },
    Test { name: "heap::alignment", func: heap::alignment },
    Test { name: "heap::large_from_frames", func: heap::large_from_frames },
    Test { name: "heap::grows", func: heap::grows },
    Test { name: "heap::exhaustion_returns_null", func: heap::exhaustion_returns_null },
    Test { name: "heap::random_mixed", func: heap::random_mixed },
    Test { name: "heap::fast_path_reuses", func: heap::fast_path_reuses },
    Test { name: "heap::random_tlsf", func: heap::random_tlsf },
    Test { name: "heap::random_list", func: heap::random_list },
    Test { name: "heap::double_free_detected", func: heap::double_free_detected },
    Test { name: "heap::overflow_into_tag_detected", func: heap::overflow_into_tag_detected },
    Test { name: "heap::top_block_tag_checked", func: heap::top_block_tag_checked },
    Test { name: "heap::tags_consistent", func: heap::tags_consistent },
    Test { name: "inspect::header", func: inspect::header },
    Test { name: "demand::first_touch_maps_zeroed_page", func: demand::first_touch_maps_zeroed_page },
    Test { name: "demand::outside_region_still_faults", func: demand::outside_region_still_faults },
    Test { name: "security::wx_clean", func: security::wx_clean },
    Test { name: "security::detects_violations", func: security::detects_violations },
    Test { name: "task::switch_and_own_stacks", func: task::switch_and_own_stacks },
    Test { name: "task::guard_pages_unmapped", func: task::guard_pages_unmapped },
    Test { name: "task::random_layout", func: task::random_layout },
    Test { name: "inspect::tracks_allocators", func: inspect::tracks_allocators },
];

fn group(name: &str) -> &str {
    name.split("::").next().unwrap_or(name)
}

/// True if `name` is selected by the comma-separated `selection`.
pub fn selected(selection: &str, name: &str) -> bool {
    selection.split(',').any(|w| w == "all" || w == name || w == group(name))
}

/// Sends TEST_LIST (`names` comma separated) and prints the names.
pub fn send_list() {
    if let Some(mut r) = Report::new(ReportKind::TestList) {
        r.kv_fmt("names", format_args!("{}", Names));
        r.kv("count", TESTS.len());
        r.send();
    }
    println!("tests: {}", Names);
}

struct Names;
impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, t) in TESTS.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(t.name)?;
        }
        Ok(())
    }
}

/// Runs the selected tests; returns (tests run, failures).
pub fn run(selection: &str) -> (u32, u32) {
    let (mut n, mut failures) = (0u32, 0u32);
    for t in TESTS.iter().filter(|t| selected(selection, t.name)) {
        n += 1;
        let result = (t.func)();
        let (status, msg) = match &result {
            Ok(()) => {
                println!("ok {} - {}", n, t.name);
                ("pass", "")
            }
            Err(TestError::Skip(m)) => {
                println!("ok {} - {} # SKIP {}", n, t.name, m.as_str());
                ("skip", m.as_str())
            }
            Err(TestError::Fail(m)) => {
                failures += 1;
                println!("not ok {} - {}: {}", n, t.name, m.as_str());
                ("fail", m.as_str())
            }
        };
        report::send(ReportKind::TestResult, |r| {
            r.kv("name", t.name).kv("status", status).kv("msg", msg).kv("n", n);
        });
    }
    (n, failures)
}
