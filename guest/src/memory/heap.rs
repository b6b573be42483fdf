//! Kernel heap: a first-fit free list with coalescing, behind a spinlock,
//! registered as the `#[global_allocator]`.
//!
//! * Requests under 4 KiB (and alignment up to 4 KiB) come from the heap
//!   range `start..start+HEAP_MAX` (start random in `layout::HEAP_REGION`), mapped 4 KiB page by page as the
//!   heap grows (`HEAP_GROW_STEP` at least).
//! * Requests of 4 KiB or more take whole contiguous frames from the frame
//!   allocator and are used through the direct map (no page-table work);
//!   freeing returns the frames.
//! * Out of frames or past `HEAP_MAX`, allocation returns null.
//!
//! Free blocks are kept sorted by address; each holds a `Node` in its first
//! 16 bytes. Block sizes and addresses are multiples of 16, so a split never
//! leaves a fragment too small for a node.
//!
//! Small sizes are rounded to a size class (16, 32, ... 2048 bytes; 16-byte
//! multiples above), so a block's size follows from its layout alone. With
//! `Mode::Fast` (the default; `allocator=list|fast` on the command line) a
//! per-class cache of freed blocks (a LIFO stack, at most `CACHE_CAP` per
//! class) sits in front of the list: an allocation with alignment <= 16 pops
//! from its class, a free pushes, both O(1); misses and overflow go to the
//! list, which stays the backing allocator. `set_mode(List)` and `stats()`
//! flush the caches back into the list.

use super::layout::{HEAP_GROW_STEP, HEAP_INITIAL, HEAP_MAX, HEAP_RANDOM_SPAN, HEAP_REGION};
use super::SIZE_2M;
use super::paging::{self, MapError, PageFlags, PageSize};
use super::{align_up, frames, phys_to_virt, PAGE_SIZE};
use crate::sync::SpinLock;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, null_mut};

const MIN_BLOCK: usize = 16;
/// Size classes of the fast path: 16 << i bytes.
const CLASSES: usize = 8;
const MAX_CLASS: usize = MIN_BLOCK << (CLASSES - 1);
/// Blocks a class cache holds before frees go back to the list.
const CACHE_CAP: u32 = 256;

/// Which allocator serves small requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// First-fit address-ordered free list only.
    List,
    /// Size-class caches in front of the list.
    Fast,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::List => "list",
            Mode::Fast => "fast",
        }
    }
}

/// A cached block: the first word links to the next one.
#[repr(C)]
struct Cached {
    next: *mut Cached,
}
/// Requests at least this large bypass the free list (whole frames).
pub const LARGE_THRESHOLD: usize = PAGE_SIZE as usize;

#[repr(C)]
struct Node {
    size: usize,
    next: *mut Node,
}

pub struct Heap {
    /// Lowest-addressed free block.
    head: *mut Node,
    start: u64,
    /// End of the mapped part of the heap range.
    end: u64,
    max_end: u64,
    free_bytes: usize,
    large_bytes: usize,
    allocs: u64,
    frees: u64,
    mode: Mode,
    cache: [*mut Cached; CLASSES],
    cache_len: [u32; CLASSES],
    cached_bytes: usize,
}

// SAFETY: the raw pointers point into the heap range, owned by the Heap.
unsafe impl Send for Heap {}

/// Counters for tests and INSPECT reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    pub start: u64,
    pub end: u64,
    pub free_bytes: usize,
    pub free_blocks: usize,
    pub largest_free: usize,
    pub large_bytes: usize,
    pub free_head: u64,
    pub allocs: u64,
    pub frees: u64,
}

impl Heap {
    pub const fn empty() -> Heap {
        Heap {
            head: null_mut(),
            start: 0,
            end: 0,
            max_end: 0,
            free_bytes: 0,
            large_bytes: 0,
            allocs: 0,
            frees: 0,
            mode: Mode::Fast,
            cache: [null_mut(); CLASSES],
            cache_len: [0; CLASSES],
            cached_bytes: 0,
        }
    }

    /// Size class index of a rounded small size, if it has one.
    #[inline]
    fn class_of(size: usize) -> Option<usize> {
        if size <= MAX_CLASS {
            Some((size.max(MIN_BLOCK) / MIN_BLOCK).trailing_zeros() as usize)
        } else {
            None
        }
    }

    /// Returns every cached block to the list.
    fn flush(&mut self) {
        for c in 0..CLASSES {
            let size = MIN_BLOCK << c;
            while !self.cache[c].is_null() {
                let b = self.cache[c];
                // SAFETY: cached blocks are free heap blocks of this class.
                unsafe {
                    self.cache[c] = (*b).next;
                    self.insert_free(b as *mut u8, size);
                }
            }
            self.cache_len[c] = 0;
        }
        self.cached_bytes = 0;
    }

    /// Maps `bytes` (page multiple) more at the end of the heap and frees it
    /// into the list. On failure the pages mapped so far stay in the heap.
    ///
    /// Callers hold an inspect critical section around the grow *and* the
    /// publish that follows: pages are mapped one by one and `heap_end` is
    /// published at the end, so between the two a host would otherwise see
    /// mapped heap pages past the published end with `seq` even.
    fn grow(&mut self, bytes: u64) -> Result<(), MapError> {
        debug_assert!(crate::inspect::in_critical(), "heap: grow outside an inspect critical section");
        let bytes = align_up(bytes, PAGE_SIZE);
        if self.end + bytes > self.max_end {
            return Err(MapError::FrameAllocationFailed);
        }
        let old_end = self.end;
        let flags = PageFlags::WRITABLE | PageFlags::NO_EXECUTE;
        let mut result = Ok(());
        while self.end < old_end + bytes {
            let frame = match frames::alloc_frame() {
                Ok(f) => f,
                Err(_) => {
                    result = Err(MapError::FrameAllocationFailed);
                    break;
                }
            };
            if let Err(e) = paging::map_page(self.end, frame, PageSize::Size4K, flags) {
                let _ = frames::free_frame(frame);
                result = Err(e);
                break;
            }
            self.end += PAGE_SIZE;
        }
        if self.end > old_end {
            // SAFETY: freshly mapped, unused heap memory.
            unsafe { self.insert_free(old_end as *mut u8, (self.end - old_end) as usize) };
        }
        result
    }

    fn in_heap(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.start + HEAP_MAX
    }

    /// Size and alignment a small request really takes from the list:
    /// the size class (power of two from 16 to 2048), else a 16 multiple.
    #[inline]
    fn small_shape(layout: Layout) -> (usize, usize) {
        let align = layout.align().max(MIN_BLOCK);
        let size = layout.size().max(1);
        let size = if size <= MAX_CLASS { size.next_power_of_two().max(MIN_BLOCK) } else { (size + MIN_BLOCK - 1) & !(MIN_BLOCK - 1) };
        (size, align)
    }

    fn is_large(layout: Layout) -> bool {
        layout.size() >= LARGE_THRESHOLD || layout.align() > LARGE_THRESHOLD
    }

    /// First fit: returns the block address or null.
    unsafe fn take(&mut self, size: usize, align: usize) -> *mut u8 {
        let mut prev: *mut Node = null_mut();
        let mut cur = self.head;
        while !cur.is_null() {
            let addr = cur as usize;
            let bsize = (*cur).size;
            let next = (*cur).next;
            let aligned = (addr + align - 1) & !(align - 1);
            // `aligned - addr` is a multiple of 16: 0 or room for a node.
            if aligned + size <= addr + bsize {
                let front = aligned - addr;
                let back = addr + bsize - (aligned + size);
                // Unlink `cur`, then put back the fragments in order.
                let mut link = next;
                if back > 0 {
                    let b = (aligned + size) as *mut Node;
                    b.write(Node { size: back, next: link });
                    link = b;
                }
                if front > 0 {
                    (*cur).size = front;
                    (*cur).next = link;
                    link = cur;
                }
                if prev.is_null() {
                    self.head = link;
                } else {
                    (*prev).next = link;
                }
                self.free_bytes -= size;
                return aligned as *mut u8;
            }
            prev = cur;
            cur = next;
        }
        null_mut()
    }

    /// Inserts `[ptr, ptr+size)` in address order, merging with neighbours.
    unsafe fn insert_free(&mut self, ptr: *mut u8, size: usize) {
        let addr = ptr as usize;
        let mut prev: *mut Node = null_mut();
        let mut cur = self.head;
        while !cur.is_null() && (cur as usize) < addr {
            prev = cur;
            cur = (*cur).next;
        }
        debug_assert!(cur.is_null() || addr + size <= cur as usize, "heap: freed block overlaps a free block");
        let node = ptr as *mut Node;
        node.write(Node { size, next: cur });
        // Merge with the following block.
        if !cur.is_null() && addr + size == cur as usize {
            (*node).size += (*cur).size;
            (*node).next = (*cur).next;
        }
        // Merge with the preceding block, or link after it.
        if !prev.is_null() && prev as usize + (*prev).size == addr {
            (*prev).size += (*node).size;
            (*prev).next = (*node).next;
        } else if prev.is_null() {
            self.head = node;
        } else {
            (*prev).next = node;
        }
        self.free_bytes += size;
    }

    /// The fast path's allocation: a pop from the size-class cache (Fast
    /// mode, alignment <= 16, cache not empty).
    #[inline(always)]
    unsafe fn fast_alloc(&mut self, layout: Layout) -> Option<*mut u8> {
        if self.mode != Mode::Fast || layout.align() > MIN_BLOCK || layout.size() > MAX_CLASS {
            return None;
        }
        let size = layout.size().max(1).next_power_of_two().max(MIN_BLOCK);
        let c = (size / MIN_BLOCK).trailing_zeros() as usize;
        let b = self.cache[c];
        if b.is_null() {
            return None;
        }
        self.cache[c] = (*b).next;
        self.cache_len[c] -= 1;
        self.cached_bytes -= size;
        self.allocs += 1;
        Some(b as *mut u8)
    }

    /// The fast path's free: a push onto the size-class cache (Fast mode,
    /// small, cache not full). True if it took the block.
    #[inline(always)]
    unsafe fn fast_free(&mut self, ptr: *mut u8, layout: Layout) -> bool {
        if self.mode != Mode::Fast || layout.size() > MAX_CLASS || layout.align() > LARGE_THRESHOLD {
            return false;
        }
        let size = layout.size().max(1).next_power_of_two().max(MIN_BLOCK);
        let c = (size / MIN_BLOCK).trailing_zeros() as usize;
        if self.cache_len[c] >= CACHE_CAP {
            return false;
        }
        let b = ptr as *mut Cached;
        (*b).next = self.cache[c];
        self.cache[c] = b;
        self.cache_len[c] += 1;
        self.cached_bytes += size;
        self.frees += 1;
        true
    }

    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        if Self::is_large(layout) {
            let pages = align_up(layout.size() as u64, PAGE_SIZE) / PAGE_SIZE;
            let align = (layout.align() as u64).max(PAGE_SIZE);
            return match frames::with(|fa| fa.alloc_contiguous(pages, align)) {
                Ok(phys) => {
                    self.large_bytes += (pages * PAGE_SIZE) as usize;
                    self.allocs += 1;
                    phys_to_virt(phys) as *mut u8
                }
                Err(_) => null_mut(),
            };
        }
        if let Some(p) = self.fast_alloc(layout) {
            return p;
        }
        let (size, align) = Self::small_shape(layout);
        let mut p = self.take(size, align);
        if p.is_null() {
            // Grow by a step, or (near the limit) by just what is needed.
            // Even a failed grow may have mapped some pages, so retry anyway.
            let want = (size + align) as u64;
            if self.grow(want.max(HEAP_GROW_STEP)).is_err() {
                let _ = self.grow(want);
            }
            p = self.take(size, align);
        }
        if !p.is_null() {
            self.allocs += 1;
        }
        p
    }

    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        self.frees += 1;
        if Self::is_large(layout) {
            debug_assert!(!self.in_heap(ptr as u64));
            let pages = align_up(layout.size() as u64, PAGE_SIZE) / PAGE_SIZE;
            let phys = ptr as u64 - super::phys_offset();
            frames::with(|fa| fa.free_contiguous(phys, pages)).expect("heap: freeing large allocation");
            self.large_bytes -= (pages * PAGE_SIZE) as usize;
            return;
        }
        assert!(self.in_heap(ptr as u64), "heap: dealloc of {:p}, not a heap address", ptr);
        if self.fast_free(ptr, layout) {
            self.frees -= 1;
            return;
        }
        let (size, _) = Self::small_shape(layout);
        self.insert_free(ptr, size);
    }

    /// Publishes what the fast path changes (counters, cached bytes).
    #[inline(always)]
    fn publish_counts(&self) {
        crate::inspect::update(|b| {
            b.heap_allocs = self.allocs;
            b.heap_frees = self.frees;
            b.heap_cached_bytes = self.cached_bytes as u64;
        });
    }

    /// Copies the allocator's state into the inspect block.
    #[inline]
    fn publish(&self) {
        crate::inspect::update(|b| {
            b.heap_free_head = self.head as u64;
            b.heap_start = self.start;
            b.heap_end = self.end;
            b.heap_free_bytes = self.free_bytes as u64;
            b.heap_large_bytes = self.large_bytes as u64;
            b.heap_allocs = self.allocs;
            b.heap_frees = self.frees;
            b.heap_cached_bytes = self.cached_bytes as u64;
        });
    }

    pub fn stats(&self) -> HeapStats {
        let (mut blocks, mut largest) = (0, 0);
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: list nodes live in mapped heap memory.
            unsafe {
                blocks += 1;
                largest = largest.max((*cur).size);
                cur = (*cur).next;
            }
        }
        HeapStats {
            start: self.start,
            end: self.end,
            free_bytes: self.free_bytes,
            free_blocks: blocks,
            largest_free: largest,
            large_bytes: self.large_bytes,
            free_head: self.head as u64,
            allocs: self.allocs,
            frees: self.frees,
        }
    }
}

pub static HEAP: SpinLock<Heap> = SpinLock::new("heap", Heap::empty());

/// Places the heap at a random 2 MiB multiple in its region and maps the
/// initial part. Needs the frame allocator and `rand`.
pub fn init() -> Result<(), MapError> {
    let start = HEAP_REGION + crate::rand::below((HEAP_RANDOM_SPAN - HEAP_MAX) / SIZE_2M) * SIZE_2M;
    let mut h = HEAP.lock();
    crate::inspect::critical(|| {
        h.start = start;
        h.end = start;
        h.max_end = start + HEAP_MAX;
        let r = h.grow(HEAP_INITIAL);
        h.publish();
        r
    })
}

/// Stats of the backing list after flushing the fast path's caches (so
/// they compare equal before and after balanced alloc/free pairs).
pub fn stats() -> HeapStats {
    let mut h = HEAP.lock();
    crate::inspect::critical(|| {
        h.flush();
        h.publish();
    });
    h.stats()
}

/// Stats without flushing the caches (cached blocks count as allocated).
pub fn stats_raw() -> HeapStats {
    HEAP.lock().stats()
}

pub fn mode() -> Mode {
    HEAP.lock().mode
}

/// Switches the small-allocation path; leaving Fast flushes the caches.
pub fn set_mode(mode: Mode) {
    let mut h = HEAP.lock();
    crate::inspect::critical(|| {
        if mode == Mode::List {
            h.flush();
        }
        h.mode = mode;
        h.publish();
    })
}

/// Bytes in the fast path's caches.
pub fn cached_bytes() -> usize {
    HEAP.lock().cached_bytes
}

/// Makes sure a free block of at least `bytes` exists without further
/// growth (the CPL3 benchmarks cannot map pages).
///
/// One critical section over the whole growth and the publish of the new
/// `heap_end` (see `grow`).
pub fn reserve(bytes: u64) -> Result<(), MapError> {
    let mut h = HEAP.lock();
    crate::inspect::critical(|| {
        let r = if h.stats().largest_free as u64 >= bytes { Ok(()) } else { h.grow(bytes + PAGE_SIZE) };
        h.publish();
        r
    })
}

/// Lowers the heap's growth limit (tests of exhaustion); returns the old
/// limit. The limit never drops below what is mapped.
pub fn set_limit(max_end: u64) -> u64 {
    let mut h = HEAP.lock();
    let old = h.max_end;
    h.max_end = max_end.max(h.end).min(h.start + HEAP_MAX);
    old
}

pub struct KernelAllocator;

unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut h = HEAP.lock();
        // Fast path: a pop from a size-class cache. The host never walks the
        // caches, so it needs no inspect bracket; its counters reach the
        // inspect block with the next slow-path publish.
        if let Some(p) = h.fast_alloc(layout) {
            return p;
        }
        // Slow path: one inspect critical section, so a host that parks the
        // vCPU inside it sees an odd `seq` and retries.
        crate::inspect::critical(|| {
            let p = h.alloc(layout);
            h.publish();
            p
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let mut h = HEAP.lock();
        if h.fast_free(ptr, layout) {
            return;
        }
        crate::inspect::critical(|| {
            h.dealloc(ptr, layout);
            h.publish();
        })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = self.alloc(layout);
        if !p.is_null() {
            if layout.size() % 8 == 0 && p as usize % 8 == 0 {
                super::zero_qwords(p as u64, layout.size() as u64);
            } else {
                ptr::write_bytes(p, 0, layout.size());
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: KernelAllocator = KernelAllocator;
