//! Kernel heap: size-class caches in front of a linked-list backing
//! allocator, behind a spinlock, registered as the `#[global_allocator]`.
//!
//! * Requests under 4 KiB (and alignment up to 4 KiB) come from the heap
//!   range `start..start+HEAP_MAX` (start random in `layout::HEAP_REGION`),
//!   mapped 4 KiB page by page as the heap grows (`HEAP_GROW_STEP` at least).
//! * Requests of 4 KiB or more take whole contiguous frames from the frame
//!   allocator and are used through the direct map (no page-table work);
//!   freeing returns the frames.
//! * Out of frames or past `HEAP_MAX`, allocation returns null.
//!
//! The backing allocator is chosen at boot (`allocator=tlsf|list`):
//! `tlsf` (default, `tlsf.rs`): two-level segregated free lists with
//! boundary tags, constant time whatever the number of free blocks;
//! `list` (`firstfit.rs`): the original first-fit address-ordered list,
//! linear time, kept for comparison.
//!
//! Small sizes are rounded to a size class (16, 32, ... 2048 bytes; 16-byte
//! multiples above), so a block's class follows from its layout alone. With
//! `Mode::Fast` (the default) a per-class cache of freed blocks (a LIFO
//! stack, at most `CACHE_CAP` per class) sits in front of the backing
//! allocator: an allocation with alignment <= 16 pops from its class, a free
//! pushes, both O(1); misses and overflow go to the backing allocator.
//! `set_mode(Backing)` and `stats()` flush the caches back.
//!
//! Inconsistencies (double free, an overflow into the next block's tag, a
//! corrupt footer or list) refuse the operation instead of crashing: the
//! block leaks, the finding is counted in the heap index (docs/ABI.md,
//! "Heap index") and, at CPL0, sent to the host as an INFO report
//! `event=heap_finding`.

use super::firstfit::FirstFit;
use super::layout::{HEAP_GROW_STEP, HEAP_INITIAL, HEAP_MAX, HEAP_RANDOM_SPAN, HEAP_REGION};
use super::paging::{self, MapError, PageFlags, PageSize};
pub use super::tlsf::{Finding, FindingKind};
use super::tlsf::{self, Tlsf};
use super::SIZE_2M;
use super::{align_up, frames, phys_to_virt, PAGE_SIZE};
use crate::sync::SpinLock;
use core::alloc::{GlobalAlloc, Layout};
use core::mem::offset_of;
use core::ptr::{self, null_mut};

const MIN_BLOCK: usize = 16;
/// Size classes of the fast path: 16 << i bytes.
const CLASSES: usize = 8;
const MAX_CLASS: usize = MIN_BLOCK << (CLASSES - 1);
/// Blocks a class cache holds before frees go back to the backing allocator.
const CACHE_CAP: u32 = 256;

/// The size class of a small request: the power of two from 16 up that
/// holds `size` bytes (`size.max(16).next_power_of_two()`, one bit scan:
/// `(size - 1) | 15` has its top bit one below the class's).
#[inline(always)]
fn class_size(size: usize) -> usize {
    MIN_BLOCK << class_index(size)
}

/// Index of `class_size(size)` in the caches: 0 for 16 bytes.
#[inline(always)]
fn class_index(size: usize) -> usize {
    let x = (size.max(1) - 1) | (MIN_BLOCK - 1);
    (usize::BITS - 1 - x.leading_zeros()) as usize - (MIN_BLOCK.trailing_zeros() as usize - 1)
}

/// Which backing allocator the heap runs on (fixed at boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Backing {
    /// Two-level segregated fit with boundary tags (`tlsf.rs`).
    Tlsf = 1,
    /// First-fit address-ordered list (`firstfit.rs`).
    List = 2,
}

impl Backing {
    pub fn name(self) -> &'static str {
        match self {
            Backing::Tlsf => "tlsf",
            Backing::List => "list",
        }
    }
}

/// Whether the size-class caches serve small requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The backing allocator only.
    Backing,
    /// Size-class caches in front of it.
    Fast,
}

/// A cached block: the first word links to the next one.
#[repr(C)]
struct Cached {
    next: *mut Cached,
}
/// Requests at least this large bypass the heap range (whole frames).
pub const LARGE_THRESHOLD: usize = PAGE_SIZE as usize;

/// `b"PYHEAPX1"` read as a little-endian u64.
pub const INDEX_MAGIC: u64 = 0x3158_5041_4548_5950;
pub const INDEX_VERSION: u32 = 1;

/// What the host reads to walk the heap (docs/ABI.md, "Heap index"); its
/// virtual address is the inspect block's `heap_index`.
#[repr(C)]
pub struct HeapIndex {
    pub magic: u64,
    pub version: u32,
    /// Bytes the host may read (up to the end of the TLSF lists).
    pub size: u32,
    /// `Backing` as u32.
    pub backing: u32,
    /// 1 while the size-class caches are on.
    pub caches: u32,
    /// Findings so far.
    pub findings: u64,
    /// `FindingKind` of the last finding (0 = none).
    pub last_kind: u32,
    pub reserved: u32,
    /// Address of the last finding's tag or pointer.
    pub last_addr: u64,
    /// The TLSF control block (lists unused with `Backing::List`).
    pub tlsf: Tlsf,
}

pub const INDEX_TLSF_OFFSET: usize = 48;
pub const INDEX_SIZE: usize = INDEX_TLSF_OFFSET + tlsf::PUBLISHED_SIZE;
const _: () = assert!(offset_of!(HeapIndex, version) == 8);
const _: () = assert!(offset_of!(HeapIndex, size) == 12);
const _: () = assert!(offset_of!(HeapIndex, backing) == 16);
const _: () = assert!(offset_of!(HeapIndex, caches) == 20);
const _: () = assert!(offset_of!(HeapIndex, findings) == 24);
const _: () = assert!(offset_of!(HeapIndex, last_kind) == 32);
const _: () = assert!(offset_of!(HeapIndex, last_addr) == 40);
const _: () = assert!(offset_of!(HeapIndex, tlsf) == INDEX_TLSF_OFFSET);
const _: () = assert!(INDEX_SIZE == 2728);

pub struct Heap {
    index: HeapIndex,
    list: FirstFit,
    backing: Backing,
    start: u64,
    /// End of the mapped part of the heap range.
    end: u64,
    max_end: u64,
    large_bytes: usize,
    allocs: u64,
    frees: u64,
    mode: Mode,
    cache: [*mut Cached; CLASSES],
    cache_len: [u32; CLASSES],
    cached_bytes: usize,
    /// A finding not yet reported to the host.
    unreported: Option<Finding>,
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
    /// First free-list node (list backing; 0 with TLSF).
    pub free_head: u64,
    pub allocs: u64,
    pub frees: u64,
    pub findings: u64,
}

impl Heap {
    pub const fn empty() -> Heap {
        Heap {
            index: HeapIndex {
                magic: INDEX_MAGIC,
                version: INDEX_VERSION,
                size: INDEX_SIZE as u32,
                backing: Backing::Tlsf as u32,
                caches: 1,
                findings: 0,
                last_kind: 0,
                reserved: 0,
                last_addr: 0,
                tlsf: Tlsf::new(),
            },
            list: FirstFit::new(),
            backing: Backing::Tlsf,
            start: 0,
            end: 0,
            max_end: 0,
            large_bytes: 0,
            allocs: 0,
            frees: 0,
            mode: Mode::Fast,
            cache: [null_mut(); CLASSES],
            cache_len: [0; CLASSES],
            cached_bytes: 0,
            unreported: None,
        }
    }

    fn record(&mut self, f: Finding) {
        self.index.findings += 1;
        self.index.last_kind = f.kind as u32;
        self.index.last_addr = f.addr;
        self.unreported = Some(f);
    }

    /// Returns every cached block to the backing allocator.
    fn flush(&mut self) {
        for c in 0..CLASSES {
            let size = MIN_BLOCK << c;
            while !self.cache[c].is_null() {
                let b = self.cache[c];
                // SAFETY: cached blocks are allocated heap blocks of this class.
                unsafe {
                    self.cache[c] = (*b).next;
                    if self.backing == Backing::Tlsf {
                        Tlsf::set_cached(b as *mut u8, false);
                    }
                    self.backing_free(b as *mut u8, size);
                }
            }
            self.cache_len[c] = 0;
        }
        self.cached_bytes = 0;
    }

    /// Maps `bytes` (page multiple) more at the end of the heap and hands
    /// it to the backing allocator. On failure the pages mapped so far stay
    /// in the heap.
    ///
    /// Callers hold an inspect critical section around the grow, which ends
    /// with a full publish: pages are mapped one by one and `heap_end` is
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
            // SAFETY: freshly mapped, unused heap memory at the end.
            unsafe {
                match self.backing {
                    Backing::Tlsf => self.index.tlsf.extend(old_end, self.end),
                    Backing::List => self.list.extend(old_end, self.end),
                }
            }
        }
        self.publish();
        result
    }

    #[inline(always)]
    fn in_heap(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.start) < HEAP_MAX
    }

    /// Size and alignment a small request really takes from the backing
    /// allocator: the size class (power of two from 16 to 2048), else a 16
    /// multiple.
    #[inline(always)]
    fn small_shape(layout: Layout) -> (usize, usize) {
        let align = layout.align().max(MIN_BLOCK);
        let size = layout.size();
        let size = if size <= MAX_CLASS { class_size(size) } else { (size + MIN_BLOCK - 1) & !(MIN_BLOCK - 1) };
        (size, align)
    }

    fn is_large(layout: Layout) -> bool {
        layout.size() >= LARGE_THRESHOLD || layout.align() > LARGE_THRESHOLD
    }

    /// # Safety
    /// The backing allocator's memory must be intact: heap pages mapped and
    /// used by nothing but the heap (true while `self` owns the kernel heap).
    #[inline(always)]
    unsafe fn backing_alloc(&mut self, size: usize, align: usize) -> *mut u8 {
        match self.backing {
            Backing::Tlsf => {
                let mut found = None;
                let p = self.index.tlsf.alloc(size, align, &mut found);
                if let Some(f) = found {
                    self.record(f);
                }
                p
            }
            Backing::List => self.list.alloc(size, align),
        }
    }

    /// # Safety
    /// `ptr` must come from `backing_alloc` with the same `size` and not be
    /// used by the caller afterwards; the backing memory as for `backing_alloc`.
    #[inline(always)]
    unsafe fn backing_free(&mut self, ptr: *mut u8, size: usize) {
        let r = match self.backing {
            Backing::Tlsf => self.index.tlsf.free(ptr, size),
            Backing::List => self.list.free(ptr, size),
        };
        if let Err(f) = r {
            self.record(f);
        }
    }

    fn backing_free_bytes(&self) -> usize {
        match self.backing {
            Backing::Tlsf => self.index.tlsf.free_bytes(),
            Backing::List => self.list.free_bytes(),
        }
    }

    /// The fast path's allocation: a pop from the size-class cache (Fast
    /// mode, alignment <= 16, cache not empty).
    ///
    /// # Safety
    /// The size-class caches must hold only blocks of this heap (their first
    /// 8 bytes are the cache link), as `fast_free` leaves them.
    #[inline(always)]
    unsafe fn fast_alloc(&mut self, layout: Layout) -> Option<*mut u8> {
        if self.mode != Mode::Fast || layout.align() > MIN_BLOCK || layout.size() > MAX_CLASS {
            return None;
        }
        let c = class_index(layout.size());
        let size = MIN_BLOCK << c;
        let b = self.cache[c];
        if b.is_null() {
            return None;
        }
        self.cache[c] = (*b).next;
        self.cache_len[c] -= 1;
        self.cached_bytes -= size;
        self.allocs += 1;
        if self.backing == Backing::Tlsf {
            Tlsf::set_cached(b as *mut u8, false);
        }
        Some(b as *mut u8)
    }

    /// The fast path's free: a push onto the size-class cache (Fast mode,
    /// small, cache not full). True if it took the block. With TLSF the
    /// block's tag gets CACHED, so a second free of it is a finding.
    ///
    /// # Safety
    /// `ptr` must be a live block this heap handed out for `layout`, no longer
    /// used by the caller (its first 8 bytes become the cache link).
    #[inline(always)]
    unsafe fn fast_free(&mut self, ptr: *mut u8, layout: Layout) -> bool {
        if self.mode != Mode::Fast || layout.size() > MAX_CLASS || layout.align() > LARGE_THRESHOLD {
            return false;
        }
        let c = class_index(layout.size());
        let size = MIN_BLOCK << c;
        if self.cache_len[c] >= CACHE_CAP {
            return false;
        }
        if self.backing == Backing::Tlsf {
            // A block already cached or free goes to the slow path, which
            // checks the whole tag and reports it.
            if (ptr as u64) <= self.start || (ptr as u64) >= self.end || Tlsf::cached_or_free(ptr) {
                return false;
            }
            Tlsf::set_cached(ptr, true);
        }
        let b = ptr as *mut Cached;
        (*b).next = self.cache[c];
        self.cache[c] = b;
        self.cache_len[c] += 1;
        self.cached_bytes += size;
        self.frees += 1;
        true
    }

    /// The slow path's allocation (after `fast_alloc` declined): whole
    /// frames for large requests, else the backing allocator, growing the
    /// heap if it has no fitting block.
    ///
    /// # Safety
    /// The heap's pages must be intact, as for `backing_alloc` (the state
    /// `GlobalAlloc` relies on); the caller holds an inspect critical section.
    #[inline(always)]
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        if Self::is_large(layout) {
            return self.alloc_large(layout);
        }
        let (size, align) = Self::small_shape(layout);
        let mut p = self.backing_alloc(size, align);
        if p.is_null() {
            p = self.grow_and_alloc(size, align);
        }
        if !p.is_null() {
            self.allocs += 1;
        }
        p
    }

    /// Whole contiguous frames, used through the direct map.
    #[inline(never)]
    fn alloc_large(&mut self, layout: Layout) -> *mut u8 {
        let pages = align_up(layout.size() as u64, PAGE_SIZE) / PAGE_SIZE;
        let align = (layout.align() as u64).max(PAGE_SIZE);
        match frames::with(|fa| fa.alloc_contiguous(pages, align)) {
            Ok(phys) => {
                self.large_bytes += (pages * PAGE_SIZE) as usize;
                self.allocs += 1;
                let large = self.large_bytes as u64;
                crate::inspect::update_in_critical(|b| b.heap_large_bytes = large);
                phys_to_virt(phys) as *mut u8
            }
            Err(_) => null_mut(),
        }
    }

    /// The backing allocator had no fitting block: grow by a step, or (near
    /// the limit) by just what is needed (room for tags and an aligned split
    /// included), and try again. Even a failed grow may have mapped some
    /// pages, so retry anyway.
    ///
    /// # Safety
    /// As for `backing_alloc`.
    #[inline(never)]
    unsafe fn grow_and_alloc(&mut self, size: usize, align: usize) -> *mut u8 {
        let want = (size + align + 2 * tlsf::MIN_BLOCK) as u64;
        if self.grow(want.max(HEAP_GROW_STEP)).is_err() {
            let _ = self.grow(want);
        }
        self.backing_alloc(size, align)
    }

    /// The slow path's free (after `fast_free` declined).
    ///
    /// # Safety
    /// `ptr` must come from `alloc` on this heap with the same `layout`, and
    /// the caller must not use it afterwards (the `GlobalAlloc::dealloc`
    /// contract). Detected violations are recorded as findings, not relied on.
    #[inline(always)]
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        if Self::is_large(layout) {
            self.dealloc_large(ptr, layout);
            return;
        }
        // TLSF checks the pointer against its own region (a NotHeap finding
        // too), so only the list needs the range check here.
        if self.backing == Backing::List && !self.in_heap(ptr as u64) {
            self.record(Finding { kind: FindingKind::NotHeap, addr: ptr as u64 });
            return;
        }
        self.frees += 1;
        let (size, _) = Self::small_shape(layout);
        self.backing_free(ptr, size);
    }

    #[inline(never)]
    fn dealloc_large(&mut self, ptr: *mut u8, layout: Layout) {
        self.frees += 1;
        if self.in_heap(ptr as u64) {
            self.record(Finding { kind: FindingKind::NotHeap, addr: ptr as u64 });
            return;
        }
        let pages = align_up(layout.size() as u64, PAGE_SIZE) / PAGE_SIZE;
        let phys = ptr as u64 - super::phys_offset();
        frames::with(|fa| fa.free_contiguous(phys, pages)).expect("heap: freeing large allocation");
        self.large_bytes -= (pages * PAGE_SIZE) as usize;
        let large = self.large_bytes as u64;
        crate::inspect::update_in_critical(|b| b.heap_large_bytes = large);
    }

    /// Copies the allocator's state into the inspect block. Callers hold
    /// an inspect critical section (every mutation does).
    fn publish(&self) {
        let index = &self.index as *const HeapIndex as u64;
        crate::inspect::update_in_critical(|b| {
            b.heap_start = self.start;
            b.heap_end = self.end;
            b.heap_index = index;
            b.heap_large_bytes = self.large_bytes as u64;
            b.heap_free_head = self.list.head();
        });
        self.publish_counts();
    }

    /// The part of `publish` a small allocation or free can change (start,
    /// end and the index address change only in `init` and `grow`, which
    /// publish everything; the large path publishes `heap_large_bytes`; the
    /// free-list head is the list's only, 0 with TLSF).
    /// Callers hold an inspect critical section.
    #[inline(always)]
    fn publish_counts(&self) {
        crate::inspect::update_in_critical(|b| {
            match self.backing {
                Backing::Tlsf => b.heap_free_bytes = self.index.tlsf.free_bytes() as u64,
                Backing::List => {
                    b.heap_free_head = self.list.head();
                    b.heap_free_bytes = self.list.free_bytes() as u64;
                }
            }
            b.heap_allocs = self.allocs;
            b.heap_frees = self.frees;
            b.heap_cached_bytes = self.cached_bytes as u64;
        });
    }

    pub fn stats(&self) -> HeapStats {
        let (blocks, largest) = match self.backing {
            Backing::Tlsf => self.index.tlsf.list_stats(usize::MAX),
            Backing::List => self.list.list_stats(usize::MAX),
        };
        HeapStats {
            start: self.start,
            end: self.end,
            free_bytes: self.backing_free_bytes(),
            free_blocks: blocks,
            largest_free: largest,
            large_bytes: self.large_bytes,
            free_head: self.list.head(),
            allocs: self.allocs,
            frees: self.frees,
            findings: self.index.findings,
        }
    }
}

/// A heap of its own over memory the caller provides (tests, the
/// fragmentation benchmark): the same backing allocators, no caches, no
/// large path, growth by handing more of `[base, limit)` over in
/// `step`-byte pieces. `end - base` is the high-water mark: the pages a
/// real heap would have mapped.
pub struct PrivateHeap {
    pub backing: Backing,
    tlsf: Tlsf,
    list: FirstFit,
    pub base: u64,
    pub end: u64,
    pub limit: u64,
    pub step: u64,
    pub findings: u64,
    pub last: Option<Finding>,
}

impl PrivateHeap {
    /// `base` and `limit` 16-aligned; `step` a 16 multiple.
    pub fn new(backing: Backing, base: u64, limit: u64, step: u64) -> PrivateHeap {
        PrivateHeap { backing, tlsf: Tlsf::new(), list: FirstFit::new(), base, end: base, limit, step, findings: 0, last: None }
    }

    fn note(&mut self, f: Finding) {
        self.findings += 1;
        self.last = Some(f);
    }

    /// # Safety
    /// `[base, limit)` must be memory the caller owns, unused elsewhere (as
    /// for `alloc`).
    unsafe fn take(&mut self, size: usize, align: usize) -> *mut u8 {
        match self.backing {
            Backing::Tlsf => {
                let mut found = None;
                let p = self.tlsf.alloc(size, align, &mut found);
                if let Some(f) = found {
                    self.note(f);
                }
                p
            }
            Backing::List => self.list.alloc(size, align),
        }
    }

    /// Sizes rounded to 16 bytes only: without caches there is no size
    /// class to round to, so this measures the backing allocator alone.
    #[inline]
    fn shape(layout: Layout) -> (usize, usize) {
        ((layout.size().max(1) + MIN_BLOCK - 1) & !(MIN_BLOCK - 1), layout.align().max(MIN_BLOCK))
    }

    /// # Safety
    /// `[base, limit)` must be memory the caller owns, unused elsewhere.
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let (size, align) = Self::shape(layout);
        loop {
            let p = self.take(size, align);
            if !p.is_null() || self.end >= self.limit {
                return p;
            }
            let new_end = (self.end + self.step).min(self.limit);
            match self.backing {
                Backing::Tlsf => self.tlsf.extend(self.end, new_end),
                Backing::List => self.list.extend(self.end, new_end),
            }
            self.end = new_end;
        }
    }

    /// # Safety
    /// `ptr` must come from this heap's `alloc` (a second free is reported).
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) -> Result<(), Finding> {
        let (size, _) = Self::shape(layout);
        let r = match self.backing {
            Backing::Tlsf => self.tlsf.free(ptr, size),
            Backing::List => self.list.free(ptr, size),
        };
        r.map(|_| ()).map_err(|f| {
            self.note(f);
            f
        })
    }

    pub fn free_bytes(&self) -> usize {
        match self.backing {
            Backing::Tlsf => self.tlsf.free_bytes(),
            Backing::List => self.list.free_bytes(),
        }
    }

    /// (free blocks, largest free block).
    pub fn list_stats(&self) -> (usize, usize) {
        match self.backing {
            Backing::Tlsf => self.tlsf.list_stats(usize::MAX),
            Backing::List => self.list.list_stats(usize::MAX),
        }
    }

    /// Full tag walk (TLSF): (blocks, free blocks) or the first finding.
    pub fn check(&self) -> Result<(usize, usize), Finding> {
        match self.backing {
            Backing::Tlsf => self.tlsf.check(),
            Backing::List => Ok((0, self.list.list_stats(usize::MAX).0)),
        }
    }
}

pub static HEAP: SpinLock<Heap> = SpinLock::new("heap", Heap::empty());

/// Places the heap at a random 2 MiB multiple in its region, picks the
/// backing allocator and maps the initial part. Needs the frame allocator
/// and `rand`.
pub fn init(backing: Backing) -> Result<(), MapError> {
    let start = HEAP_REGION + crate::rand::below((HEAP_RANDOM_SPAN - HEAP_MAX) / SIZE_2M) * SIZE_2M;
    let mut h = HEAP.lock();
    crate::inspect::critical(|| {
        h.start = start;
        h.end = start;
        h.max_end = start + HEAP_MAX;
        h.backing = backing;
        h.index.backing = backing as u32;
        let r = h.grow(HEAP_INITIAL);
        h.publish();
        r
    })
}

/// Stats of the backing allocator after flushing the fast path's caches
/// (so they compare equal before and after balanced alloc/free pairs).
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

pub fn backing() -> Backing {
    HEAP.lock().backing
}

/// Switches the small-allocation path; leaving Fast flushes the caches.
pub fn set_mode(mode: Mode) {
    let mut h = HEAP.lock();
    crate::inspect::critical(|| {
        if mode == Mode::Backing {
            h.flush();
        }
        h.mode = mode;
        h.index.caches = (mode == Mode::Fast) as u32;
        h.publish();
    })
}

/// Bytes in the fast path's caches.
pub fn cached_bytes() -> usize {
    HEAP.lock().cached_bytes
}

/// (findings so far, the last one).
pub fn findings() -> (u64, Option<Finding>) {
    let h = HEAP.lock();
    let last = match h.index.last_kind {
        0 => None,
        _ => Some(Finding { kind: kind_from(h.index.last_kind), addr: h.index.last_addr }),
    };
    (h.index.findings, last)
}

fn kind_from(k: u32) -> FindingKind {
    match k {
        1 => FindingKind::DoubleFree,
        2 => FindingKind::BadTag,
        3 => FindingKind::Overflow,
        4 => FindingKind::BadFooter,
        5 => FindingKind::CrossLinked,
        6 => FindingKind::NotHeap,
        _ => FindingKind::SizeMismatch,
    }
}

/// Full walk of the TLSF tags: (blocks, free blocks) or the first
/// inconsistency (list backing: Ok with the free-list length).
pub fn check() -> Result<(usize, usize), Finding> {
    let h = HEAP.lock();
    match h.backing {
        Backing::Tlsf => h.index.tlsf.check(),
        Backing::List => Ok((0, h.list.list_stats(usize::MAX).0)),
    }
}

/// Usable bytes of an allocated TLSF block (its tag checked).
pub fn usable(ptr: *mut u8) -> Result<usize, Finding> {
    let h = HEAP.lock();
    // SAFETY: `tag_of` range-checks the pointer before reading its tag.
    unsafe { h.index.tlsf.usable(ptr) }
}

/// Virtual address of the heap index (published as `heap_index`).
pub fn index_addr() -> u64 {
    &HEAP.lock().index as *const HeapIndex as u64
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

/// Sends a finding to the host (INFO `event=heap_finding`) and prints it;
/// only at CPL0 (port I/O faults at CPL3, where the CPL3 benchmarks run).
#[cold]
fn report_finding(f: Finding) {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    if cs & 3 != 0 {
        return;
    }
    crate::report::send(crate::abi::ReportKind::Info, |r| {
        r.kv("event", "heap_finding").kv("kind", f.kind.name()).kv_hex("addr", f.addr);
    });
    crate::println!("heap: finding {} at {:#x} (operation refused, block leaked)", f.kind.name(), f.addr);
}

/// The slow path of `KernelAllocator::alloc`: one inspect critical section
/// around the whole operation and its publish, so a host that parks the
/// vCPU inside it sees an odd `seq` and retries. Out of line, so the fast
/// path's function saves no registers for it.
///
/// # Safety
/// As for `Heap::alloc`; `h` is the locked kernel heap.
#[inline(never)]
unsafe fn slow_alloc(mut h: crate::sync::SpinLockGuard<'_, Heap>, layout: Layout) -> *mut u8 {
    let s = crate::inspect::begin();
    let p = h.alloc(layout);
    h.publish_counts();
    crate::inspect::end(s);
    if h.unreported.is_some() {
        report_unreported(h);
    }
    p
}

/// The slow path of `KernelAllocator::dealloc` (see `slow_alloc`).
///
/// # Safety
/// As for `Heap::dealloc`; `h` is the locked kernel heap.
#[inline(never)]
unsafe fn slow_dealloc(mut h: crate::sync::SpinLockGuard<'_, Heap>, ptr: *mut u8, layout: Layout) {
    let s = crate::inspect::begin();
    h.dealloc(ptr, layout);
    h.publish_counts();
    crate::inspect::end(s);
    if h.unreported.is_some() {
        report_unreported(h);
    }
}

/// Reports the finding the last operation recorded, after the heap lock is
/// released (the report path may allocate).
#[cold]
#[inline(never)]
fn report_unreported(mut h: crate::sync::SpinLockGuard<'_, Heap>) {
    let f = h.unreported.take();
    drop(h);
    if let Some(f) = f {
        report_finding(f);
    }
}

pub struct KernelAllocator;

unsafe impl GlobalAlloc for KernelAllocator {
    /// # Safety
    /// The `GlobalAlloc` contract: see `GlobalAlloc::alloc`.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut h = HEAP.lock();
        // Fast path: a pop from a size-class cache. The host never walks the
        // caches, so it needs no inspect bracket; its counters reach the
        // inspect block with the next slow-path publish.
        if let Some(p) = h.fast_alloc(layout) {
            return p;
        }
        slow_alloc(h, layout)
    }

    /// # Safety
    /// The `GlobalAlloc` contract: see `GlobalAlloc::dealloc`.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let mut h = HEAP.lock();
        if h.fast_free(ptr, layout) {
            return;
        }
        slow_dealloc(h, ptr, layout)
    }

    /// # Safety
    /// The `GlobalAlloc` contract: see `GlobalAlloc::alloc_zeroed`.
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
