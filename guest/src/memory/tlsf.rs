//! Two-level segregated fit (TLSF) with boundary tags: the kernel heap's
//! default backing allocator (`allocator=tlsf`), still a linked-list design.
//!
//! Memory is tiled by blocks. Each block starts with an 8-byte *tag* (its
//! header); the payload follows at a 16-byte boundary, so block addresses
//! are 8 mod 16 and block sizes are multiples of 16 (tag included):
//!
//! ```text
//!   tag (u64):  bits 0 FREE, 1 PREV_FREE (the block below is free),
//!               2 CACHED (held by the heap's size-class caches),
//!               4..47 size in bytes (tag included), 48..63 check
//!   free block: tag | next_free u64 | prev_free u64 | ... | size u64 (footer)
//! ```
//!
//! `check` is a 16-bit hash of the block's address and size
//! ([`tag_check`]); an overflow out of one block's payload lands on the next
//! block's tag and breaks it, a double free finds FREE or CACHED set, a
//! pointer into a merged block finds a poisoned (zero) tag. Such frees are
//! refused and returned as a [`Finding`]: the heap leaks the block instead
//! of corrupting itself. The flags are outside the check so that setting
//! PREV_FREE or CACHED is one OR.
//!
//! Free blocks sit on one of `FL_COUNT x SL_COUNT` doubly linked lists,
//! indexed by (first level = log2 of the size, second level = the next
//! `SL_LOG2` bits); sizes under 256 B have one list per 16 B. Two bitmaps
//! say which lists are non-empty, so finding a list that surely fits is two
//! bit scans (`BSF`: no SSE, no loop), and the free/prev links plus the
//! footer (the size, in the last 8 bytes of a free block, read through the
//! PREV_FREE bit) make insert, remove and coalescing with both neighbours
//! constant time. Allocation first looks at the first `EXACT_PROBES`
//! members of the request's own list (good fit without rounding up), then
//! takes the head of the next larger non-empty list (every block there
//! fits). Alignments above 16 search for `size + align + MIN_BLOCK` and split
//! the misaligned front off as a free block.
//!
//! The region ends with a sentinel tag (size 0, not free). Growing turns the
//! old sentinel into the tag of a new free block and writes a new one.
//!
//! The fields up to `heads` are read by the host (docs/ABI.md, "Heap
//! index"); their offsets are pinned below.

use core::mem::{offset_of, size_of};
use core::ptr::null_mut;

/// Payload alignment and size granularity.
pub const GRAIN: usize = 16;
/// Tag bytes before each payload.
pub const TAG: usize = 8;
/// Smallest block: tag, two links, footer.
pub const MIN_BLOCK: usize = 32;
const SL_LOG2: u32 = 4;
pub const SL_COUNT: usize = 1 << SL_LOG2;
/// Sizes below `SMALL` (256) have linear lists, one per 16 bytes.
const FL_SHIFT: u32 = SL_LOG2 + 4;
const SMALL: usize = 1 << FL_SHIFT;
/// First-level lists: block sizes below 2^(FL_SHIFT + FL_COUNT - 1) = 128 MiB.
pub const FL_COUNT: usize = 20;
/// Members of the request's own list looked at before the lists above.
const EXACT_PROBES: usize = 16;

pub const FREE: u64 = 1;
pub const PREV_FREE: u64 = 2;
pub const CACHED: u64 = 4;
const FLAGS: u64 = 0xF;
pub const SIZE_MASK: u64 = 0x0000_FFFF_FFFF_FFF0;
pub const CHECK_SHIFT: u32 = 48;

/// A heap inconsistency found while allocating or freeing (the operation
/// was refused; the kernel keeps running).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FindingKind {
    /// The block is already free (or, with the caches, already cached).
    DoubleFree = 1,
    /// The freed pointer has no valid tag: a wild pointer, a second free of
    /// a block since merged, or an overflow from the block below.
    BadTag = 2,
    /// The tag after the freed block is broken: the block's payload
    /// overflowed into it.
    Overflow = 3,
    /// PREV_FREE is set but the footer does not lead to a free block of
    /// that size.
    BadFooter = 4,
    /// A free list's links disagree (cross-linked or corrupt list).
    CrossLinked = 5,
    /// The pointer is not inside the heap, or misaligned.
    NotHeap = 6,
    /// The layout handed to `dealloc` is larger than the block.
    SizeMismatch = 7,
}

impl FindingKind {
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::DoubleFree => "double_free",
            FindingKind::BadTag => "bad_tag",
            FindingKind::Overflow => "overflow",
            FindingKind::BadFooter => "bad_footer",
            FindingKind::CrossLinked => "cross_linked",
            FindingKind::NotHeap => "not_heap",
            FindingKind::SizeMismatch => "size_mismatch",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// Address of the offending tag (or pointer).
    pub addr: u64,
}

/// 16-bit check of a tag: a multiplicative hash of address and size (the
/// host computes the same, vmm/inspector/heap.py).
#[inline(always)]
pub fn tag_check(addr: u64, size: u64) -> u64 {
    (addr ^ size.rotate_left(23)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> CHECK_SHIFT
}

#[inline(always)]
pub fn make_tag(addr: u64, size: u64, flags: u64) -> u64 {
    size | flags | (tag_check(addr, size) << CHECK_SHIFT)
}

#[inline(always)]
fn tag_ok(addr: u64, tag: u64) -> bool {
    tag >> CHECK_SHIFT == tag_check(addr, tag & SIZE_MASK)
}

/// # Safety
/// `a` must be 8-aligned, mapped and readable.
#[inline(always)]
unsafe fn rd(a: u64) -> u64 {
    *(a as *const u64)
}

/// # Safety
/// `a` must be 8-aligned, mapped, writable, and owned by the allocator
/// (a tag, link or footer of one of its blocks).
#[inline(always)]
unsafe fn wr(a: u64, v: u64) {
    *(a as *mut u64) = v
}

#[inline(always)]
fn msb(x: usize) -> u32 {
    63 - (x as u64).leading_zeros()
}

/// List indices of a free block of `size` bytes.
#[inline(always)]
fn mapping(size: usize) -> (usize, usize) {
    if size < SMALL {
        (0, size / GRAIN)
    } else {
        let fl = msb(size);
        ((fl - FL_SHIFT + 1) as usize, (size >> (fl - SL_LOG2)) ^ SL_COUNT)
    }
}

/// List indices from which every block is at least `size` bytes.
#[inline(always)]
fn mapping_search(size: usize) -> (usize, usize) {
    if size < SMALL {
        mapping(size)
    } else {
        mapping(size + (1 << (msb(size) - SL_LOG2)) - 1)
    }
}

/// Block size for a payload of `size` bytes.
#[inline(always)]
pub fn block_size(size: usize) -> usize {
    ((size.max(1) + TAG + GRAIN - 1) & !(GRAIN - 1)).max(MIN_BLOCK)
}

#[repr(C)]
pub struct Tlsf {
    /// Tag address of the lowest block (0 while empty).
    pub first: u64,
    /// Tag address of the end sentinel.
    pub sentinel: u64,
    /// Bit f: some list of first level f is non-empty.
    pub fl_bitmap: u32,
    pub sl_count: u32,
    pub fl_count: u32,
    pub min_block: u32,
    /// Bit s of `sl_bitmap[f]`: list (f, s) is non-empty.
    pub sl_bitmap: [u32; FL_COUNT],
    /// Tag address of each list's first block (0 if empty).
    pub heads: [[u64; SL_COUNT]; FL_COUNT],
    /// The free block that ends at the sentinel (0 if none): on no list,
    /// used only when no list has a fitting block, so the heap's end stays
    /// whole and growth is the last resort.
    pub top: u64,
    free_bytes: u64,
    /// The tag `set_top` wrote on the top block (when `top` is not 0). The
    /// heap's tag must still equal it, one compare instead of recomputing
    /// the check hash, and the top's size is taken from here: an alloc+free
    /// pair on the top then does not wait, through memory, for the previous
    /// operation's tag (only a predicted branch reads it).
    top_tag: u64,
}

pub const PUBLISHED_SIZE: usize = offset_of!(Tlsf, free_bytes);
const _: () = assert!(offset_of!(Tlsf, sentinel) == 8);
const _: () = assert!(offset_of!(Tlsf, fl_bitmap) == 16);
const _: () = assert!(offset_of!(Tlsf, sl_count) == 20);
const _: () = assert!(offset_of!(Tlsf, fl_count) == 24);
const _: () = assert!(offset_of!(Tlsf, min_block) == 28);
const _: () = assert!(offset_of!(Tlsf, sl_bitmap) == 32);
const _: () = assert!(offset_of!(Tlsf, heads) == 112);
const _: () = assert!(offset_of!(Tlsf, top) == 112 + 8 * SL_COUNT * FL_COUNT);
const _: () = assert!(PUBLISHED_SIZE == 120 + 8 * SL_COUNT * FL_COUNT);
const _: () = assert!(size_of::<u64>() == TAG);

// SAFETY: the addresses point into memory the owner of the Tlsf handed it.
unsafe impl Send for Tlsf {}

impl Tlsf {
    pub const fn new() -> Tlsf {
        Tlsf {
            first: 0,
            sentinel: 0,
            fl_bitmap: 0,
            sl_count: SL_COUNT as u32,
            fl_count: FL_COUNT as u32,
            min_block: MIN_BLOCK as u32,
            sl_bitmap: [0; FL_COUNT],
            heads: [[0; SL_COUNT]; FL_COUNT],
            top: 0,
            free_bytes: 0,
            top_tag: 0,
        }
    }

    pub fn free_bytes(&self) -> usize {
        self.free_bytes as usize
    }

    /// # Safety
    /// `b` must be a free block of `size` bytes in the region, on no list yet.
    /// The region as for `alloc`.
    #[inline(always)]
    unsafe fn insert(&mut self, b: u64, size: usize) {
        let (fl, sl) = mapping(size);
        let head = self.heads[fl][sl];
        wr(b + 8, head);
        wr(b + 16, 0);
        if head != 0 {
            wr(head + 16, b);
        }
        self.heads[fl][sl] = b;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl] |= 1 << sl;
    }

    /// True if the list links around free block `b` agree with each other.
    ///
    /// # Safety
    /// `b` must lie in the region (its links are read). The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn links_ok(&self, b: u64, size: usize) -> bool {
        let (next, prev) = (rd(b + 8), rd(b + 16));
        (if prev == 0 {
            let (fl, sl) = mapping(size);
            fl < FL_COUNT && self.heads[fl][sl] == b
        } else {
            self.in_range(prev) && rd(prev + 8) == b
        }) && (next == 0 || (self.in_range(next) && rd(next + 16) == b))
    }

    /// `b` could be a block's tag address: in `[first, sentinel)` and 8 mod
    /// 16 like `first` (one unsigned compare covers both bounds).
    #[inline(always)]
    fn in_range(&self, b: u64) -> bool {
        let off = b.wrapping_sub(self.first);
        off < self.sentinel.wrapping_sub(self.first) && off % GRAIN as u64 == 0
    }

    /// # Safety
    /// `b` must be a free block of `size` bytes on its list, links checked
    /// (`links_ok`). The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn remove(&mut self, b: u64, size: usize) {
        let (next, prev) = (rd(b + 8), rd(b + 16));
        if next != 0 {
            wr(next + 16, prev);
        }
        if prev != 0 {
            wr(prev + 8, next);
        } else {
            let (fl, sl) = mapping(size);
            self.heads[fl][sl] = next;
            if next == 0 {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
    }

    /// A non-empty list at or above (fl, sl).
    #[inline(always)]
    fn find(&self, fl: usize, sl: usize) -> Option<(usize, usize)> {
        if fl >= FL_COUNT {
            return None;
        }
        let mut fl = fl;
        let mut sl_map = self.sl_bitmap[fl] & (!0u32 << sl);
        if sl_map == 0 {
            let fl_map = self.fl_bitmap & (!0u32).checked_shl(fl as u32 + 1).unwrap_or(0);
            if fl_map == 0 {
                return None;
            }
            fl = fl_map.trailing_zeros() as usize;
            sl_map = self.sl_bitmap[fl];
        }
        Some((fl, sl_map.trailing_zeros() as usize))
    }

    /// Writes the top block's tag and footer (it is on no list).
    ///
    /// # Safety
    /// `[b, b + size)` must be free memory of the region ending at the sentinel,
    /// on no list. The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn set_top(&mut self, b: u64, size: usize) {
        let tag = make_tag(b, size as u64, FREE);
        wr(b, tag);
        wr(b + size as u64 - 8, size as u64);
        self.top = b;
        self.top_tag = tag;
    }

    /// Writes a free block's tag and footer and links it.
    ///
    /// # Safety
    /// `[b, b + size)` must be free memory of the region, on no list, not
    /// touching the sentinel. The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn make_free(&mut self, b: u64, size: usize) {
        wr(b, make_tag(b, size as u64, FREE));
        wr(b + size as u64 - 8, size as u64);
        self.insert(b, size);
    }

    /// Unlinks `h`, the head of list (fl, sl), whose `next` is `next`.
    ///
    /// # Safety
    /// `h` must be the head of list (fl, sl) and `next` the block to make the
    /// new head (or 0). The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn remove_head(&mut self, fl: usize, sl: usize, h: u64, next: u64) {
        let _ = h;
        self.heads[fl][sl] = next;
        if next != 0 {
            wr(next + 16, 0);
        } else {
            self.sl_bitmap[fl] &= !(1 << sl);
            if self.sl_bitmap[fl] == 0 {
                self.fl_bitmap &= !(1 << fl);
            }
        }
    }

    /// The head of list (fl, sl) if its tag and links are sound: (head,
    /// size, next).
    ///
    /// # Safety
    /// List (fl, sl) must be non-empty (its head is read). The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn sound_head(&self, fl: usize, sl: usize) -> Result<(u64, usize, u64), u64> {
        let h = self.heads[fl][sl];
        let t = rd(h);
        let next = rd(h + 8);
        if tag_ok(h, t) && t & FREE != 0 && rd(h + 16) == 0 && (next == 0 || (self.in_range(next) && rd(next + 16) == h)) {
            Ok((h, (t & SIZE_MASK) as usize, next))
        } else {
            Err(h)
        }
    }

    /// True if some list at or above the one of `min` is non-empty: only
    /// then can a list serve a request of `min` bytes (the own list may
    /// still hold only smaller blocks; `pop_fit` sorts that out). Two bitmap
    /// reads, no list is touched.
    #[inline(always)]
    fn lists_may_fit(&self, min: usize) -> bool {
        let (fl, sl) = mapping(min);
        // Bits at or above `sl` of this level, or any level above it.
        fl < FL_COUNT && ((self.sl_bitmap[fl] >> sl) | (self.fl_bitmap >> fl >> 1)) != 0
    }

    /// Takes a free block at least `min` bytes long off its list, or the top
    /// block, or None. A list whose head has a broken tag or links is
    /// dropped (its blocks leak) and reported through `found`.
    ///
    /// Out of line: `alloc` comes here only when `lists_may_fit`; with empty
    /// lists it takes the top block itself.
    ///
    /// # Safety
    /// The region as for `alloc`; corrupt tags and links are detected, not
    /// relied on.
    #[inline(never)]
    unsafe fn pop_fit(&mut self, min: usize, found: &mut Option<Finding>) -> Option<(u64, usize, bool)> {
        // Good fit without rounding up: the request's own list may hold a
        // block that fits; look at its first few members (a constant
        // bound), then at the lists above, whose every block fits.
        let (fl, sl) = mapping(min);
        if fl < FL_COUNT && self.heads[fl][sl] != 0 {
            // Of the fitting ones, the lowest address: like address-ordered
            // first fit, it keeps the heap's upper part whole.
            let mut b = self.heads[fl][sl];
            let mut best: u64 = 0;
            let mut best_size = 0;
            for _ in 0..EXACT_PROBES {
                if !self.in_range(b) {
                    break;
                }
                let t = rd(b);
                let size = (t & SIZE_MASK) as usize;
                if !tag_ok(b, t) || t & FREE == 0 {
                    break;
                }
                if size >= min && (best == 0 || b < best) {
                    best = b;
                    best_size = size;
                }
                b = rd(b + 8);
                if b == 0 {
                    break;
                }
            }
            if best != 0 && self.links_ok(best, best_size) {
                self.remove(best, best_size);
                return Some((best, best_size, false));
            }
        }
        let mut start = mapping_search(min);
        while let Some((fl, sl)) = self.find(start.0, start.1) {
            match self.sound_head(fl, sl) {
                Ok((h, size, next)) => {
                    // Every member fits: the lowest address of the first few.
                    let (mut best, mut best_size, mut b) = (h, size, next);
                    for _ in 1..EXACT_PROBES {
                        if b == 0 || !self.in_range(b) {
                            break;
                        }
                        let t = rd(b);
                        if !tag_ok(b, t) || t & FREE == 0 {
                            break;
                        }
                        if b < best {
                            best = b;
                            best_size = (t & SIZE_MASK) as usize;
                        }
                        b = rd(b + 8);
                    }
                    if best == h {
                        self.remove_head(fl, sl, h, next);
                        return Some((h, size, false));
                    }
                    if self.links_ok(best, best_size) {
                        self.remove(best, best_size);
                        return Some((best, best_size, false));
                    }
                    self.remove_head(fl, sl, h, next);
                    return Some((h, size, false));
                }
                Err(h) => {
                    // Corrupt head: detach the whole list and look further.
                    *found = Some(Finding { kind: FindingKind::CrossLinked, addr: h });
                    self.remove_head(fl, sl, h, 0);
                    start = (fl, sl);
                }
            }
        }
        // Last resort before growing: the top block.
        self.take_top(min, found)
    }

    /// The top block if it is sound and at least `min` bytes long (it stays
    /// the top: `carve` makes its remainder the new top).
    ///
    /// # Safety
    /// The region as for `alloc`; a broken top tag is detected (reported
    /// through `found`, the top dropped), not relied on.
    #[inline(always)]
    unsafe fn take_top(&mut self, min: usize, found: &mut Option<Finding>) -> Option<(u64, usize, bool)> {
        let top = self.top;
        if top == 0 {
            return None;
        }
        let tag = self.top_tag;
        let size = (tag & SIZE_MASK) as usize;
        // One compare checks the hash, FREE, the size and that PREV_FREE and
        // CACHED are clear (the block below the top is in use).
        if rd(top) != tag || top + size as u64 != self.sentinel {
            *found = Some(Finding { kind: FindingKind::BadTag, addr: top });
            self.top = 0;
            return None;
        }
        if size < min {
            return None;
        }
        Some((top, size, true))
    }

    /// A block of at least `min` bytes: from the lists when a bitmap says one
    /// may serve, else straight from the top block (the common case of a
    /// heap whose holes are all too small: no list is looked at).
    ///
    /// # Safety
    /// As for `pop_fit`.
    #[inline(always)]
    unsafe fn fit(&mut self, min: usize, found: &mut Option<Finding>) -> Option<(u64, usize, bool)> {
        if self.lists_may_fit(min) {
            self.pop_fit(min, found)
        } else {
            self.take_top(min, found)
        }
    }

    /// Allocates `size` payload bytes aligned to `align` (power of two, at
    /// most 4096 in the kernel heap). Null if no block fits.
    ///
    /// # Safety
    /// The region handed over by `extend` must still be mapped, writable
    /// and used by nothing but this allocator.
    #[inline(always)]
    pub unsafe fn alloc(&mut self, size: usize, align: usize, found: &mut Option<Finding>) -> *mut u8 {
        let need = block_size(size);
        // Inline, the common case: no list can serve, and the top block is
        // sound and large enough to split. Everything else out of line.
        let top = self.top;
        let tsize = (self.top_tag & SIZE_MASK) as usize;
        if align <= GRAIN
            && !self.lists_may_fit(need)
            && top != 0
            && rd(top) == self.top_tag
            && top + tsize as u64 == self.sentinel
            && tsize >= need + MIN_BLOCK
        {
            // The top's PREV_FREE is clear (its whole tag was compared).
            wr(top, make_tag(top, need as u64, 0));
            self.set_top(top + need as u64, tsize - need);
            self.free_bytes -= need as u64;
            return (top + TAG as u64) as *mut u8;
        }
        self.alloc_general(need, align, found)
    }

    /// `alloc` for everything but a split of the top block with empty
    /// lists: a list block, alignment above 16, the top used whole, or a
    /// broken top tag (a finding).
    ///
    /// # Safety
    /// As for `alloc`; `need` is `block_size` of the request.
    #[inline(never)]
    unsafe fn alloc_general(&mut self, need: usize, align: usize, found: &mut Option<Finding>) -> *mut u8 {
        if align <= GRAIN {
            let Some((b, bsize, top)) = self.fit(need, found) else { return null_mut() };
            // The top's PREV_FREE is clear (`take_top` checked its whole tag).
            let prev_free = if top { 0 } else { rd(b) & PREV_FREE };
            self.carve(b, bsize, need, prev_free, top);
            return (b + TAG as u64) as *mut u8;
        }
        let Some((b, bsize, top)) = self.fit(need + align + MIN_BLOCK, found) else { return null_mut() };
        let a = align as u64;
        let mut payload = (b + TAG as u64 + a - 1) & !(a - 1);
        if payload - TAG as u64 - b != 0 && ((payload - TAG as u64 - b) as usize) < MIN_BLOCK {
            payload += a;
        }
        let nb = payload - TAG as u64;
        let gap = (nb - b) as usize;
        if gap > 0 {
            // The front becomes a free block of its own (its lower
            // neighbour is in use: free blocks never touch).
            self.make_free(b, gap);
            self.carve(nb, bsize - gap, need, PREV_FREE, top);
        } else {
            let prev_free = if top { 0 } else { rd(b) & PREV_FREE };
            self.carve(b, bsize, need, prev_free, top);
        }
        payload as *mut u8
    }

    /// Marks `need` bytes at `b` (a block of `bsize` bytes just taken off
    /// its list, or the top block) in use and frees the remainder if it is
    /// a block (as the new top if `b` was the top; no top if `b` was the top
    /// and is used whole).
    ///
    /// # Safety
    /// `[b, b + bsize)` must be a block just taken off its list (or the top
    /// block, `top`) with `need <= bsize`. The region as
    /// for `alloc`.
    #[inline(always)]
    unsafe fn carve(&mut self, b: u64, bsize: usize, need: usize, prev_free: u64, top: bool) {
        let rem = bsize - need;
        if rem >= MIN_BLOCK {
            wr(b, make_tag(b, need as u64, prev_free));
            let r = b + need as u64;
            if top {
                self.set_top(r, rem);
            } else {
                self.make_free(r, rem);
            }
            // The block after `r` already has PREV_FREE (b was free).
            self.free_bytes -= need as u64;
        } else {
            if top {
                self.top = 0;
            }
            wr(b, make_tag(b, bsize as u64, prev_free));
            let n = b + bsize as u64;
            wr(n, rd(n) & !PREV_FREE);
            self.free_bytes -= bsize as u64;
        }
    }

    /// Checks the tag of the block whose payload is `ptr`; returns (tag
    /// address, tag).
    ///
    /// # Safety
    /// `ptr` is checked to lie in the region before its tag is read; the
    /// region must be as for `alloc`.
    #[inline(always)]
    pub unsafe fn tag_of(&self, ptr: *mut u8) -> Result<(u64, u64), Finding> {
        let b = (ptr as u64).wrapping_sub(TAG as u64);
        if !self.in_range(b) {
            return Err(Finding { kind: FindingKind::NotHeap, addr: ptr as u64 });
        }
        let t = rd(b);
        let size = t & SIZE_MASK;
        if !tag_ok(b, t) || size < MIN_BLOCK as u64 || b + size > self.sentinel {
            return Err(Finding { kind: FindingKind::BadTag, addr: b });
        }
        if t & (FREE | CACHED) != 0 {
            return Err(Finding { kind: FindingKind::DoubleFree, addr: b });
        }
        Ok((b, t))
    }

    /// Usable payload bytes of an allocated block (its tag checked).
    ///
    /// # Safety
    /// As for `tag_of`.
    pub unsafe fn usable(&self, ptr: *mut u8) -> Result<usize, Finding> {
        self.tag_of(ptr).map(|(_, t)| (t & SIZE_MASK) as usize - TAG)
    }

    /// Sets or clears CACHED on an allocated block (the heap's size-class
    /// caches hold it).
    ///
    /// # Safety
    /// `ptr` must be the payload of an allocated block of a live TLSF region
    /// (its tag, 8 bytes below, is written unchecked).
    #[inline(always)]
    pub unsafe fn set_cached(ptr: *mut u8, on: bool) {
        let b = ptr as u64 - TAG as u64;
        wr(b, if on { rd(b) | CACHED } else { rd(b) & !CACHED });
    }

    /// CACHED or FREE set on the block of `ptr` (tag not validated).
    ///
    /// # Safety
    /// The 8 bytes below `ptr` must be mapped and readable (they are read as
    /// a tag, unchecked).
    #[inline(always)]
    pub unsafe fn cached_or_free(ptr: *mut u8) -> bool {
        rd(ptr as u64 - TAG as u64) & (CACHED | FREE) != 0
    }

    /// Frees the block whose payload is `ptr`, merging it with free
    /// neighbours. `min_size` (the layout's size) must fit in the block.
    /// Every tag, footer and link involved is checked before anything is
    /// written: on a finding nothing changes (the block leaks).
    ///
    /// # Safety
    /// `ptr` must have come from `alloc` on this allocator and not be used by
    /// the caller afterwards; the region as for `alloc`. Bad tags, footers
    /// and links are detected and refused, not relied on.
    #[inline(always)]
    pub unsafe fn free(&mut self, ptr: *mut u8, min_size: usize) -> Result<usize, Finding> {
        // Inline, the common case: the block's tag is intact (no flag set,
        // the block below in use) and the block above is the top with the
        // tag `set_top` wrote. Everything else, findings included, out of
        // line.
        let b = (ptr as u64).wrapping_sub(TAG as u64);
        if self.in_range(b) {
            let t = rd(b);
            let size = (t & SIZE_MASK) as usize;
            let n = b + size as u64;
            let tsize = (self.top_tag & SIZE_MASK) as usize;
            if n == self.top
                && size >= MIN_BLOCK
                && t == make_tag(b, size as u64, 0)
                && size - TAG >= min_size
                && rd(n) == self.top_tag
                && n + tsize as u64 == self.sentinel
            {
                wr(n, 0); // poison: a later free of that block finds no tag
                self.set_top(b, size + tsize);
                self.free_bytes += size as u64;
                return Ok(size);
            }
        }
        self.free_general(ptr, min_size)
    }

    /// `free` with every check spelled out and a finding for each, and the
    /// merges with list neighbours.
    ///
    /// # Safety
    /// As for `free`.
    #[inline(never)]
    unsafe fn free_general(&mut self, ptr: *mut u8, min_size: usize) -> Result<usize, Finding> {
        let (b, t) = self.tag_of(ptr)?;
        let size = (t & SIZE_MASK) as usize;
        if size - TAG < min_size {
            return Err(Finding { kind: FindingKind::SizeMismatch, addr: b });
        }
        let n = b + size as u64;
        let nt = rd(n);
        if n == self.top && t & PREV_FREE == 0 {
            // The common merge: the block above is the top and the one below
            // is in use. The top's tag must be the one `set_top` wrote (an
            // overflow from `b` breaks it); the merged block ends at the
            // sentinel as the top did, and the sentinel keeps PREV_FREE.
            let tt = self.top_tag;
            let tsize = (tt & SIZE_MASK) as usize;
            if nt != tt || n + tsize as u64 != self.sentinel {
                return Err(Finding { kind: FindingKind::Overflow, addr: n });
            }
            wr(n, 0); // poison: a later free of that block finds no tag
            self.set_top(b, size + tsize);
            self.free_bytes += size as u64;
            return Ok(size);
        }
        let nsize = (nt & SIZE_MASK) as usize;
        if !tag_ok(n, nt) || nt & PREV_FREE != 0 || (n != self.sentinel && (nsize < MIN_BLOCK || n + nsize as u64 > self.sentinel)) {
            return Err(Finding { kind: FindingKind::Overflow, addr: n });
        }
        let next_free = nt & FREE != 0;
        if t & PREV_FREE != 0 || next_free {
            return self.free_list_neighbours(b, size, t, n, nsize, next_free);
        }
        // Neither neighbour is free: nothing to unlink, nothing to merge.
        if n == self.sentinel {
            self.set_top(b, size);
        } else {
            self.make_free(b, size);
        }
        wr(n, nt | PREV_FREE);
        self.free_bytes += size as u64;
        Ok(size)
    }

    /// `free` of a block with a free neighbour on a list (the block below,
    /// or the one above when it is not the top): their links are checked
    /// before anything is written, then they are unlinked and merged.
    ///
    /// # Safety
    /// As for `free`; `b` (tag `t`, `size` bytes) and its upper neighbour `n`
    /// (`nsize` bytes, FREE = `next_free`) have sound tags.
    #[inline(never)]
    unsafe fn free_list_neighbours(&mut self, b: u64, size: usize, t: u64, n: u64, nsize: usize, next_free: bool) -> Result<usize, Finding> {
        let next_top = next_free && n == self.top;
        if next_free && !next_top && !self.links_ok(n, nsize) {
            return Err(Finding { kind: FindingKind::CrossLinked, addr: n });
        }
        let mut prev = None;
        if t & PREV_FREE != 0 {
            let psize = rd(b - 8) as usize;
            let p = b.wrapping_sub(psize as u64);
            let ok = psize >= MIN_BLOCK && psize % GRAIN == 0 && psize as u64 <= b - self.first && {
                let pt = rd(p);
                tag_ok(p, pt) && pt & FREE != 0 && (pt & SIZE_MASK) as usize == psize
            };
            if !ok {
                return Err(Finding { kind: FindingKind::BadFooter, addr: b - 8 });
            }
            if !self.links_ok(p, psize) {
                return Err(Finding { kind: FindingKind::CrossLinked, addr: p });
            }
            prev = Some((p, psize));
        }
        // All checked: merge.
        let (mut start, mut total) = (b, size);
        if next_free {
            if next_top {
                self.top = 0;
            } else {
                self.remove(n, nsize);
            }
            wr(n, 0); // poison: a later free of that block finds no tag
            total += nsize;
        }
        if let Some((p, psize)) = prev {
            self.remove(p, psize);
            wr(b, 0);
            start = p;
            total += psize;
        }
        self.release(start, total);
        self.free_bytes += size as u64;
        Ok(size)
    }

    /// Makes `[start, start + total)`, merged and unlinked, one free block:
    /// the top if it ends at the sentinel, else on its list; the block above
    /// gets PREV_FREE.
    ///
    /// # Safety
    /// `[start, start + total)` must be free memory of the region on no list,
    /// its neighbours in use (or the sentinel above). The region as for
    /// `alloc`.
    #[inline(always)]
    unsafe fn release(&mut self, start: u64, total: usize) {
        let after = start + total as u64;
        if after == self.sentinel {
            self.set_top(start, total);
        } else {
            self.make_free(start, total);
        }
        wr(after, rd(after) | PREV_FREE);
    }

    /// Hands `[start, end)` to the allocator: the first call makes the
    /// region (start and end 16-aligned), later calls extend it at its end
    /// (`start` = the previous `end`).
    ///
    /// # Safety
    /// `[start, end)` must be 16-aligned memory the caller owns, mapped and
    /// writable, used by nothing else from now on; after the first call,
    /// `start` must be the previous `end`.
    pub unsafe fn extend(&mut self, start: u64, end: u64) {
        if self.first == 0 {
            // [start, start+8) stays unused so payloads are 16-aligned.
            let b = start + TAG as u64;
            let s = end - TAG as u64;
            self.first = b;
            self.sentinel = s;
            wr(s, make_tag(s, 0, 0));
            if s - b >= MIN_BLOCK as u64 {
                self.set_top(b, (s - b) as usize);
                wr(s, rd(s) | PREV_FREE);
                self.free_bytes += s - b;
            }
            return;
        }
        debug_assert_eq!(start, self.sentinel + TAG as u64);
        let b = self.sentinel;
        let st = rd(b);
        let s = end - TAG as u64;
        self.sentinel = s;
        wr(s, make_tag(s, 0, 0));
        let grown = (s - b) as usize;
        self.free_bytes += grown as u64;
        let (mut start, mut total) = (b, grown);
        // The free block before the old sentinel is the top: it grows.
        if st & PREV_FREE != 0 && self.top != 0 {
            start = self.top;
            total += (b - self.top) as usize;
        }
        self.set_top(start, total);
        wr(s, rd(s) | PREV_FREE);
    }

    /// (free blocks, largest free block) from the lists (at most `max`
    /// blocks are counted).
    pub fn list_stats(&self, max: usize) -> (usize, usize) {
        let (mut n, mut largest) = (0, 0);
        if self.top != 0 {
            // SAFETY: the top block lies in our region.
            largest = unsafe { (rd(self.top) & SIZE_MASK) as usize };
            n = 1;
        }
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let mut b = self.heads[fl][sl];
                while b != 0 && n < max {
                    // SAFETY: list members are free blocks in our region.
                    unsafe {
                        largest = largest.max((rd(b) & SIZE_MASK) as usize);
                        b = rd(b + 8);
                    }
                    n += 1;
                }
            }
        }
        (n, largest)
    }

    /// Walks the blocks in address order and checks every tag, footer and
    /// flag: (blocks, free blocks) or the first inconsistency.
    pub fn check(&self) -> Result<(usize, usize), Finding> {
        if self.first == 0 {
            return Ok((0, 0));
        }
        let (mut blocks, mut free) = (0, 0);
        let mut b = self.first;
        let mut prev_free = false;
        // SAFETY: tags are validated before their sizes are followed.
        unsafe {
            while b < self.sentinel {
                let t = rd(b);
                let size = t & SIZE_MASK;
                if !tag_ok(b, t) || size < MIN_BLOCK as u64 || b + size > self.sentinel {
                    return Err(Finding { kind: FindingKind::BadTag, addr: b });
                }
                if (t & PREV_FREE != 0) != prev_free || (prev_free && t & FREE != 0) {
                    return Err(Finding { kind: FindingKind::BadFooter, addr: b });
                }
                let is_free = t & FREE != 0;
                if is_free {
                    if rd(b + size - 8) != size {
                        return Err(Finding { kind: FindingKind::BadFooter, addr: b + size - 8 });
                    }
                    let at_end = b + size == self.sentinel;
                    if at_end != (b == self.top) {
                        return Err(Finding { kind: FindingKind::BadTag, addr: b });
                    }
                    if b != self.top && !self.links_ok(b, size as usize) {
                        return Err(Finding { kind: FindingKind::CrossLinked, addr: b });
                    }
                    free += 1;
                }
                prev_free = is_free;
                blocks += 1;
                b += size;
            }
            let t = rd(b);
            if b != self.sentinel || !tag_ok(b, t) || t & SIZE_MASK != 0 || (t & PREV_FREE != 0) != prev_free {
                return Err(Finding { kind: FindingKind::BadTag, addr: b });
            }
        }
        let _ = FLAGS;
        Ok((blocks, free))
    }
}
