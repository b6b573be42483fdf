//! First-fit, address-ordered free list with coalescing: the kernel heap's
//! original backing allocator, kept for comparison (`allocator=list`).
//!
//! Free blocks are kept sorted by address; each holds a `Node` in its first
//! 16 bytes (`{size, next}`, docs/ABI.md). Blocks carry no tags: the size
//! of an allocated block follows from its layout. Block sizes and addresses
//! are multiples of 16, so a split never leaves a fragment too small for a
//! node. Allocation and free walk the list: time linear in its length.
//! A free that overlaps a free block (a double free) is refused and
//! returned as a finding.

use super::tlsf::{Finding, FindingKind};
use core::ptr::null_mut;

pub const MIN_BLOCK: usize = 16;

#[repr(C)]
struct Node {
    size: usize,
    next: *mut Node,
}

pub struct FirstFit {
    /// Lowest-addressed free block.
    head: *mut Node,
    free_bytes: usize,
}

// SAFETY: the raw pointers point into memory the owner handed it.
unsafe impl Send for FirstFit {}

impl FirstFit {
    pub const fn new() -> FirstFit {
        FirstFit { head: null_mut(), free_bytes: 0 }
    }

    pub fn head(&self) -> u64 {
        self.head as u64
    }

    pub fn free_bytes(&self) -> usize {
        self.free_bytes
    }

    /// First fit: returns the block address or null.
    ///
    /// # Safety
    /// Every block on the list must be memory handed over by `free`/`extend`,
    /// still mapped, writable and touched by nothing else.
    pub unsafe fn alloc(&mut self, size: usize, align: usize) -> *mut u8 {
        let align = align.max(MIN_BLOCK);
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
    /// Overlap with a free block (a double free) is refused.
    ///
    /// # Safety
    /// `[ptr, ptr + size)` must be a block this list handed out with that size
    /// (or new memory for it), 16-aligned, mapped, writable and no longer used
    /// by the caller; the list's blocks must be as for `alloc`.
    pub unsafe fn free(&mut self, ptr: *mut u8, size: usize) -> Result<usize, Finding> {
        let addr = ptr as usize;
        let mut prev: *mut Node = null_mut();
        let mut cur = self.head;
        while !cur.is_null() && (cur as usize) < addr {
            prev = cur;
            cur = (*cur).next;
        }
        if (!cur.is_null() && addr + size > cur as usize) || (!prev.is_null() && prev as usize + (*prev).size > addr) {
            return Err(Finding { kind: FindingKind::DoubleFree, addr: addr as u64 });
        }
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
        Ok(size)
    }

    /// Hands `[start, end)` to the list (new memory at the heap's end).
    ///
    /// # Safety
    /// `[start, end)` must be 16-aligned memory the caller owns, mapped and
    /// writable, that nothing else uses from now on.
    pub unsafe fn extend(&mut self, start: u64, end: u64) {
        if end > start {
            let _ = self.free(start as *mut u8, (end - start) as usize);
        }
    }

    /// (free blocks, largest free block), at most `max` blocks counted.
    pub fn list_stats(&self, max: usize) -> (usize, usize) {
        let (mut blocks, mut largest) = (0, 0);
        let mut cur = self.head;
        while !cur.is_null() && blocks < max {
            // SAFETY: list nodes live in memory handed to the list.
            unsafe {
                blocks += 1;
                largest = largest.max((*cur).size);
                cur = (*cur).next;
            }
        }
        (blocks, largest)
    }
}
