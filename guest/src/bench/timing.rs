//! Sample collection and percentiles. Usable at CPL0 and CPL3 (no
//! privileged instruction; the sample buffer is a static, which the CPL3
//! mode makes user-accessible with the rest of the image).

use crate::arch::x86_64::rdtsc_fenced;
use core::cell::UnsafeCell;

pub const MAX_SAMPLES: usize = 512;

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub n: u64,
    pub p50: u64,
    pub p99: u64,
    pub min: u64,
    pub max: u64,
    pub overhead: u64,
}

struct Buf(UnsafeCell<[u64; MAX_SAMPLES]>);
// SAFETY: one CPU, benchmarks never nest.
unsafe impl Sync for Buf {}
static SAMPLES: Buf = Buf(UnsafeCell::new([0; MAX_SAMPLES]));

fn samples() -> &'static mut [u64; MAX_SAMPLES] {
    // SAFETY: see `Buf`.
    unsafe { &mut *SAMPLES.0.get() }
}

/// Times `op(i)` for i in 0..n; `pre(i)` / `post(i)` run untimed around it.
#[inline(never)]
pub fn measure_with(n: usize, overhead: u64, mut pre: impl FnMut(usize), mut op: impl FnMut(usize), mut post: impl FnMut(usize)) -> Stats {
    let n = n.min(MAX_SAMPLES);
    let s = samples();
    for (i, slot) in s.iter_mut().enumerate().take(n) {
        pre(i);
        let t0 = rdtsc_fenced();
        op(i);
        let t1 = rdtsc_fenced();
        post(i);
        *slot = (t1 - t0).saturating_sub(overhead);
    }
    summarize(&mut s[..n], overhead)
}

pub fn measure(n: usize, overhead: u64, op: impl FnMut(usize)) -> Stats {
    measure_with(n, overhead, |_| {}, op, |_| {})
}

/// Median cost of an empty timed region at the current privilege level.
pub fn calibrate(n: usize) -> u64 {
    measure(n, 0, |i| {
        core::hint::black_box(i);
    })
    .p50
}

pub fn summarize(s: &mut [u64], overhead: u64) -> Stats {
    let n = s.len();
    if n == 0 {
        return Stats { overhead, ..Stats::default() };
    }
    s.sort_unstable();
    Stats {
        n: n as u64,
        p50: s[n / 2],
        p99: s[((n * 99) / 100).min(n - 1)],
        min: s[0],
        max: s[n - 1],
        overhead,
    }
}
