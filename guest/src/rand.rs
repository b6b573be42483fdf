//! Kernel randomness for address-space layout (stack and heap placement).
//!
//! RDRAND when CPUID.01H:ECX.RDRAND says it exists (KVM-PVM hides it from
//! KVM_GET_SUPPORTED_CPUID but the instruction works: the CPUID instruction
//! in the guest is the authority); otherwise a SplitMix64 stream seeded from
//! `BootInfo::rng_seed` (host entropy) mixed with the TSC. The command-line
//! word `rng=seed` forces the fallback (tests). INFO reports `rdrand=0|1`
//! (CPUID) and `entropy=rdrand|seed` (what is actually used).

use crate::arch::x86_64 as cpu;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static USE_RDRAND: AtomicBool = AtomicBool::new(false);
static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Rdrand,
    Seed,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Rdrand => "rdrand",
            Source::Seed => "seed",
        }
    }
}

/// Chooses the source. `force_seed` skips RDRAND even if present.
pub fn init(seed: u64, force_seed: bool) -> Source {
    STATE.store(seed ^ cpu::rdtsc().rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let rdrand = !force_seed && cpu::has_rdrand() && (0..10).any(|_| cpu::rdrand64().is_some());
    USE_RDRAND.store(rdrand, Ordering::Relaxed);
    source()
}

pub fn source() -> Source {
    if USE_RDRAND.load(Ordering::Relaxed) {
        Source::Rdrand
    } else {
        Source::Seed
    }
}

fn splitmix() -> u64 {
    let s = STATE.load(Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
    STATE.store(s, Ordering::Relaxed);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random u64 (RDRAND, retried; the seeded stream if it keeps failing).
pub fn u64() -> u64 {
    if USE_RDRAND.load(Ordering::Relaxed) {
        for _ in 0..10 {
            if let Some(v) = cpu::rdrand64() {
                return v;
            }
        }
    }
    splitmix()
}

/// Uniform-enough value in `0..n` (n > 0; modulo bias is irrelevant here).
pub fn below(n: u64) -> u64 {
    u64() % n
}
