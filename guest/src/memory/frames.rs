//! Physical frame allocator: a bitmap over all of guest RAM.
//!
//! Two bitmaps, one bit per 4 KiB frame:
//! * `managed`: 1 if the frame is Conventional memory and so may be handed
//!   out (docs/ABI.md: only Conventional is ever used by the guest);
//! * `used`: 1 if the frame is allocated *or* not managed, so a search only
//!   has to look for zero bits. Bits past the last frame are 1.
//!
//! The bitmaps live in frames carved out of the first Conventional range
//! large enough, which then count as not managed. A free of a frame that is
//! not managed ("never allocatable") or not allocated (double free) is an
//! error, not a silent corruption.

use super::{align_up, phys_to_virt, zero_frames, PAGE_SHIFT, PAGE_SIZE};
use crate::abi::{memtype, MemoryDescriptor};
use crate::sync::SpinLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No free frame (or no free run of the requested size and alignment).
    OutOfFrames,
    /// Freed a frame that was never allocatable (not Conventional, or beyond RAM).
    NotManaged(u64),
    /// Freed a frame that is not currently allocated.
    DoubleFree(u64),
    /// Address not 4 KiB aligned, or alignment not a power of two.
    BadArgument(u64),
    /// The memory map leaves no room for the bitmaps.
    NoRoomForBitmap,
}

const BITS: u64 = 64;

pub struct FrameAllocator {
    used: &'static mut [u64],
    managed: &'static mut [u64],
    /// Frames covered (RAM size / 4 KiB).
    frames: u64,
    free: u64,
    managed_count: u64,
    /// Word index where the next single-frame search starts (next fit).
    hint: usize,
    bitmap_phys: u64,
    bitmap_frames: u64,
}

/// Sets bits `[start, end)` of `map` to `value` with whole-word stores in the middle.
fn fill_bits(map: &mut [u64], start: u64, end: u64, value: bool) {
    let mut i = start;
    while i < end {
        let (w, b) = ((i / BITS) as usize, i % BITS);
        let n = (BITS - b).min(end - i);
        let mask = if n == BITS { !0 } else { ((1u64 << n) - 1) << b };
        if value {
            map[w] |= mask;
        } else {
            map[w] &= !mask;
        }
        i += n;
    }
}

/// Sets (or clears) bits `[start, end)` like [`fill_bits`], but stores the
/// whole words in the middle with one `rep stosq`. Boot-time use over all of
/// RAM: each CPL0 instruction is emulated on PVM hosts, a string store is one.
fn fill_bits_fast(map: &mut [u64], start: u64, end: u64, value: bool) {
    if start >= end {
        return;
    }
    let first_full = align_up(start, BITS);
    let last_full = end / BITS * BITS;
    if first_full >= last_full {
        fill_bits(map, start, end, value);
        return;
    }
    fill_bits(map, start, first_full, value);
    let words = &mut map[(first_full / BITS) as usize..(last_full / BITS) as usize];
    // SAFETY: `words` is a valid, exclusively borrowed slice of u64.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rdi") words.as_mut_ptr() => _,
            inout("rcx") words.len() => _,
            in("rax") if value { !0u64 } else { 0 },
            options(nostack, preserves_flags)
        );
    }
    fill_bits(map, last_full, end, value);
}

/// Clears bits `[start, end)` and returns how many were set before (for
/// small ranges: one word at a time).
fn clear_bits_counting(map: &mut [u64], start: u64, end: u64) -> u64 {
    let mut cleared = 0;
    let mut i = start;
    while i < end {
        let (w, b) = ((i / BITS) as usize, i % BITS);
        let n = (BITS - b).min(end - i);
        let mask = if n == BITS { !0 } else { ((1u64 << n) - 1) << b };
        cleared += (map[w] & mask).count_ones() as u64;
        map[w] &= !mask;
        i += n;
    }
    cleared
}

fn test_bit(map: &[u64], i: u64) -> bool {
    map[(i / BITS) as usize] & (1 << (i % BITS)) != 0
}

/// First clear bit in `[start, end)`, if any.
fn find_clear(map: &[u64], start: u64, end: u64) -> Option<u64> {
    let mut i = start;
    while i < end {
        let (w, b) = ((i / BITS) as usize, i % BITS);
        let n = (BITS - b).min(end - i);
        let mask = if n == BITS { !0 } else { ((1u64 << n) - 1) << b };
        let hit = !map[w] & mask;
        if hit != 0 {
            return Some(w as u64 * BITS + hit.trailing_zeros() as u64);
        }
        i += n;
    }
    None
}

/// First set bit in `[start, end)`, if any.
fn find_set(map: &[u64], start: u64, end: u64) -> Option<u64> {
    let mut i = start;
    while i < end {
        let (w, b) = ((i / BITS) as usize, i % BITS);
        let n = (BITS - b).min(end - i);
        let mask = if n == BITS { !0 } else { ((1u64 << n) - 1) << b };
        let hit = map[w] & mask;
        if hit != 0 {
            return Some(w as u64 * BITS + hit.trailing_zeros() as u64);
        }
        i += n;
    }
    None
}

impl FrameAllocator {
    /// Builds the allocator from the host's memory map. `reserved` ranges
    /// (physical, exclusive end) are never handed out even if the map calls
    /// them Conventional (defence against a bad map overlapping the kernel).
    pub fn new<'a>(
        map: impl Iterator<Item = &'a MemoryDescriptor> + Clone,
        ram_size: u64,
        reserved: &[(u64, u64)],
    ) -> Result<FrameAllocator, FrameError> {
        let frames = ram_size >> PAGE_SHIFT;
        let words = align_up(frames, BITS) / BITS;
        let bitmap_bytes = words * 8 * 2;
        let bitmap_frames = align_up(bitmap_bytes, PAGE_SIZE) / PAGE_SIZE;

        let overlaps_reserved = |s: u64, e: u64| reserved.iter().any(|&(rs, re)| s < re && rs < e);
        let bitmap_phys = map
            .clone()
            .filter(|d| d.typ == memtype::CONVENTIONAL && d.physical_start != 0)
            .map(|d| (d.physical_start, d.physical_start + d.number_of_pages * PAGE_SIZE))
            .find(|&(s, e)| e - s >= bitmap_frames * PAGE_SIZE && !overlaps_reserved(s, s + bitmap_frames * PAGE_SIZE))
            .map(|(s, _)| s)
            .ok_or(FrameError::NoRoomForBitmap)?;

        // SAFETY: the frames are Conventional RAM (direct mapped) that nothing
        // else uses; from now on they are excluded from `managed`.
        let (used, managed) = unsafe {
            zero_frames(bitmap_phys, bitmap_frames);
            let base = phys_to_virt(bitmap_phys) as *mut u64;
            (
                core::slice::from_raw_parts_mut(base, words as usize),
                core::slice::from_raw_parts_mut(base.add(words as usize), words as usize),
            )
        };
        let mut fa = FrameAllocator {
            used,
            managed,
            frames,
            free: 0,
            managed_count: 0,
            hint: 0,
            bitmap_phys,
            bitmap_frames,
        };
        // `managed` starts all clear (zeroed frames), `used` all set
        // (including the bits past the last frame). Conventional ranges are
        // disjoint (the host validates the map), so their lengths add up.
        fill_bits_fast(fa.used, 0, words * BITS, true);
        for d in map.filter(|d| d.typ == memtype::CONVENTIONAL) {
            let start = d.physical_start >> PAGE_SHIFT;
            let end = (start + d.number_of_pages).min(frames);
            if start < end {
                fill_bits_fast(fa.managed, start, end, true);
                fill_bits_fast(fa.used, start, end, false);
                fa.managed_count += end - start;
            }
        }
        // Frame 0 (null), the bitmaps themselves and the reserved ranges are
        // never handed out: take them out of `managed` (counting what really
        // was managed, since these ranges may overlap) and mark them used.
        let bm = bitmap_phys >> PAGE_SHIFT;
        let fixed = [(0, PAGE_SIZE), (bitmap_phys, (bm + bitmap_frames) << PAGE_SHIFT)];
        for &(s, e) in fixed.iter().chain(reserved) {
            let (s, e) = ((s >> PAGE_SHIFT).min(frames), (align_up(e, PAGE_SIZE) >> PAGE_SHIFT).min(frames));
            if s < e {
                fa.managed_count -= clear_bits_counting(fa.managed, s, e);
                fill_bits(fa.used, s, e, true);
            }
        }
        fa.free = fa.managed_count;
        Ok(fa)
    }

    /// Allocates one frame; returns its physical address.
    pub fn alloc(&mut self) -> Result<u64, FrameError> {
        if self.free == 0 {
            return Err(FrameError::OutOfFrames);
        }
        let words = self.used.len();
        for k in 0..words {
            let w = (self.hint + k) % words;
            let word = self.used[w];
            if word != !0 {
                let bit = (!word).trailing_zeros() as u64;
                self.used[w] = word | (1 << bit);
                self.free -= 1;
                self.hint = w;
                return Ok((w as u64 * BITS + bit) << PAGE_SHIFT);
            }
        }
        Err(FrameError::OutOfFrames)
    }

    /// Allocates `count` physically contiguous frames whose first address is
    /// a multiple of `align` bytes (a power of two, at least 4 KiB).
    pub fn alloc_contiguous(&mut self, count: u64, align: u64) -> Result<u64, FrameError> {
        if count == 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(FrameError::BadArgument(align));
        }
        if count == 1 && align == PAGE_SIZE {
            return self.alloc();
        }
        if count > self.free {
            return Err(FrameError::OutOfFrames);
        }
        let step = align >> PAGE_SHIFT;
        let mut start = 0u64;
        while start + count <= self.frames {
            match find_set(self.used, start, start + count) {
                None => {
                    fill_bits(self.used, start, start + count, true);
                    self.free -= count;
                    return Ok(start << PAGE_SHIFT);
                }
                // Skip the whole used run after `busy` a word at a time.
                Some(busy) => match find_clear(self.used, busy + 1, self.frames) {
                    Some(free) => start = align_up(free, step),
                    None => break,
                },
            }
        }
        Err(FrameError::OutOfFrames)
    }

    /// Frees one frame.
    pub fn free(&mut self, phys: u64) -> Result<(), FrameError> {
        self.free_contiguous(phys, 1)
    }

    /// Frees `count` frames from `phys`. Checks every frame before changing
    /// any, so an error leaves the allocator untouched.
    pub fn free_contiguous(&mut self, phys: u64, count: u64) -> Result<(), FrameError> {
        if phys % PAGE_SIZE != 0 {
            return Err(FrameError::BadArgument(phys));
        }
        let start = phys >> PAGE_SHIFT;
        if start.checked_add(count).map_or(true, |end| end > self.frames) {
            return Err(FrameError::NotManaged(phys));
        }
        for f in start..start + count {
            if !test_bit(self.managed, f) {
                return Err(FrameError::NotManaged(f << PAGE_SHIFT));
            }
            if !test_bit(self.used, f) {
                return Err(FrameError::DoubleFree(f << PAGE_SHIFT));
            }
        }
        fill_bits(self.used, start, start + count, false);
        self.free += count;
        if ((start / BITS) as usize) < self.hint {
            self.hint = (start / BITS) as usize;
        }
        Ok(())
    }

    pub fn free_count(&self) -> u64 {
        self.free
    }

    /// Moves the bitmap views from the direct map at `old` to an alias of
    /// it at `new` (the CPL3 benchmark mode: KVM-PVM does not let CPL3 use
    /// the direct map's range).
    pub fn rebase(&mut self, old: u64, new: u64) {
        let (n, u, m) = (self.used.len(), self.used.as_mut_ptr() as u64, self.managed.as_mut_ptr() as u64);
        // SAFETY: the caller maps `new + phys` to the same frames as `old + phys`.
        unsafe {
            self.used = core::slice::from_raw_parts_mut((u - old + new) as *mut u64, n);
            self.managed = core::slice::from_raw_parts_mut((m - old + new) as *mut u64, n);
        }
    }

    pub fn managed_count(&self) -> u64 {
        self.managed_count
    }

    /// True if the frame is managed and currently allocated.
    pub fn is_allocated(&self, phys: u64) -> bool {
        let f = phys >> PAGE_SHIFT;
        f < self.frames && test_bit(self.managed, f) && test_bit(self.used, f)
    }

    pub fn is_managed(&self, phys: u64) -> bool {
        let f = phys >> PAGE_SHIFT;
        f < self.frames && test_bit(self.managed, f)
    }

    /// (physical address, frames) of the bitmaps, for INSPECT reports.
    pub fn bitmap(&self) -> (u64, u64) {
        (self.bitmap_phys, self.bitmap_frames)
    }

    /// Frames covered by the bitmaps (one bit each).
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

/// The kernel's frame allocator (None until `init`).
pub static FRAMES: SpinLock<Option<FrameAllocator>> = SpinLock::new("frames", None);

pub fn init(allocator: FrameAllocator) {
    *FRAMES.lock() = Some(allocator);
    with(|_| ());
}

/// Runs `f` on the global allocator; panics if `init` has not run.
pub fn with<R>(f: impl FnOnce(&mut FrameAllocator) -> R) -> R {
    let s = crate::inspect::begin();
    let r = with_locked(f);
    crate::inspect::end(s);
    r
}

/// # Panics
/// If `init` has not run. Callers hold an inspect critical section.
fn with_locked<R>(f: impl FnOnce(&mut FrameAllocator) -> R) -> R {
    let mut g = FRAMES.lock();
    let fa = g.as_mut().expect("frame allocator not initialised");
    let r = f(fa);
    let (free, bitmap_phys, bits) = (fa.free, fa.bitmap_phys, fa.frames);
    crate::inspect::update_in_critical(|b| {
        b.frames_free = free;
        b.bitmap_phys = bitmap_phys;
        b.bitmap_bits = bits;
    });
    r
}

pub fn alloc_frame() -> Result<u64, FrameError> {
    with(|fa| fa.alloc())
}

/// Allocates one frame and zeroes it.
pub fn alloc_zeroed_frame() -> Result<u64, FrameError> {
    let phys = alloc_frame()?;
    // SAFETY: freshly allocated, so ours.
    unsafe { zero_frames(phys, 1) };
    Ok(phys)
}

pub fn free_frame(phys: u64) -> Result<(), FrameError> {
    with(|fa| fa.free(phys))
}

pub fn free_count() -> u64 {
    with(|fa| fa.free_count())
}
