//! The inspect block stays current with the allocators.

use super::TestResult;
use crate::inspect::{self, INSPECT_MAGIC, INSPECT_SIZE, INSPECT_VERSION};
use crate::memory::{frames, heap};
use crate::{check, check_eq};
use alloc::boxed::Box;
use alloc::vec::Vec;

pub fn header() -> TestResult {
    let b = inspect::snapshot();
    check_eq!(b.magic, INSPECT_MAGIC);
    check_eq!(b.version, INSPECT_VERSION);
    check_eq!(b.size as usize, INSPECT_SIZE);
    check!(b.seq % 2 == 0 && b.seq > 0, "seq {}", b.seq);
    check_eq!(crate::image::virt_to_phys(inspect::virt()), inspect::phys());
    Ok(())
}

fn agrees() -> TestResult {
    let b = inspect::snapshot();
    let s = heap::stats_raw();
    check_eq!(b.heap_free_head, s.free_head);
    check_eq!(b.heap_start, s.start);
    check_eq!(b.heap_end, s.end);
    check_eq!(b.heap_free_bytes, s.free_bytes as u64);
    check_eq!(b.heap_large_bytes, s.large_bytes as u64);
    check_eq!(b.frames_free, frames::free_count());
    let (bitmap_phys, bits) = frames::with(|fa| (fa.bitmap().0, fa.frames()));
    check_eq!(b.bitmap_phys, bitmap_phys);
    check_eq!(b.bitmap_bits, bits);
    Ok(())
}

pub fn tracks_allocators() -> TestResult {
    agrees()?;
    let seq0 = inspect::snapshot().seq;
    let small: Vec<Box<[u64; 5]>> = (0..20).map(|i| Box::new([i; 5])).collect();
    let big = alloc::vec![0u8; 3 * 4096];
    agrees()?;
    check!(inspect::snapshot().seq > seq0);
    check!(inspect::snapshot().heap_large_bytes >= 3 * 4096);
    let f = check_ok_frame()?;
    agrees()?;
    frames::free_frame(f).ok();
    drop(small);
    drop(big);
    agrees()
}

fn check_ok_frame() -> Result<u64, super::TestError> {
    Ok(crate::check_ok!(frames::alloc_frame()))
}
