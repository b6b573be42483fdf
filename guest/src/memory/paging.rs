//! 4-level x86-64 paging over the direct map: map, unmap, translate.
//!
//! The walks are written once, generic over [`TableMemory`]: where tables
//! live and where new ones come from. [`DirectMap`] is the live kernel's
//! (tables through the direct map, frames from the frame allocator, INVLPG);
//! the public `map_page`/`unmap_page`/`translate` work on the active tables
//! (CR3) through it. The in-guest tests also run the same walks on a static
//! buffer (ktest/tables.rs), away from the live hierarchy.
//!
//! Intermediate tables created here carry a count of their present entries
//! in the parent entry's ignored bits (9-11 and 52-58, Intel SDM Vol. 3
//! 4.5: ignored in non-leaf entries), so `unmap_page` frees a table the
//! moment it empties without scanning 512 entries (each scan would cost
//! ~1500 emulated instructions on KVM-PVM). Tables built by the host (boot
//! pool, LoaderData) are not managed by the frame allocator and are never
//! freed.

use super::frames::{self, FrameError};
use super::{phys_to_virt, SIZE_1G, SIZE_2M, PAGE_SIZE};
use crate::arch::x86_64::{invlpg, read_cr3};
use core::fmt;
use core::ops::BitOr;

/// Page-table entry flags (Intel SDM Vol. 3, 4.5, tables 4-15 to 4-19).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PageFlags(u64);

impl PageFlags {
    /// Bit 0: the entry maps something.
    pub const PRESENT: PageFlags = PageFlags(1 << 0);
    /// Bit 1: writes allowed (with CR0.WP, also at CPL0).
    pub const WRITABLE: PageFlags = PageFlags(1 << 1);
    /// Bit 2: CPL3 may access.
    pub const USER: PageFlags = PageFlags(1 << 2);
    /// Bit 3: write-through caching.
    pub const WRITE_THROUGH: PageFlags = PageFlags(1 << 3);
    /// Bit 4: caching disabled.
    pub const NO_CACHE: PageFlags = PageFlags(1 << 4);
    /// Bit 5: set by the CPU on access.
    pub const ACCESSED: PageFlags = PageFlags(1 << 5);
    /// Bit 6: set by the CPU on write (leaf entries).
    pub const DIRTY: PageFlags = PageFlags(1 << 6);
    /// Bit 7: in a PDPTE/PDE, maps a 1 GiB/2 MiB page instead of a table.
    pub const HUGE: PageFlags = PageFlags(1 << 7);
    /// Bit 8: survives CR3 reloads (with CR4.PGE).
    pub const GLOBAL: PageFlags = PageFlags(1 << 8);
    /// Bit 63: instruction fetches fault (EFER.NXE is set by the host).
    pub const NO_EXECUTE: PageFlags = PageFlags(1 << 63);

    pub const fn empty() -> PageFlags {
        PageFlags(0)
    }
    pub const fn bits(self) -> u64 {
        self.0
    }
    pub const fn from_bits_truncate(bits: u64) -> PageFlags {
        PageFlags(bits & FLAG_MASK)
    }
    pub const fn contains(self, other: PageFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for PageFlags {
    type Output = PageFlags;
    fn bitor(self, rhs: PageFlags) -> PageFlags {
        PageFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for PageFlags {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        const NAMES: [(PageFlags, &str); 10] = [
            (PageFlags::PRESENT, "P"),
            (PageFlags::WRITABLE, "W"),
            (PageFlags::USER, "U"),
            (PageFlags::WRITE_THROUGH, "PWT"),
            (PageFlags::NO_CACHE, "PCD"),
            (PageFlags::ACCESSED, "A"),
            (PageFlags::DIRTY, "D"),
            (PageFlags::HUGE, "PS"),
            (PageFlags::GLOBAL, "G"),
            (PageFlags::NO_EXECUTE, "NX"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

const FLAG_MASK: u64 = 0x1FF | (1 << 63);
/// Bits 12..51: the physical address of a 4 KiB-aligned frame or table.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const ENTRIES: usize = 512;

/// Page sizes, each a leaf at a different level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => SIZE_2M,
            PageSize::Size1G => SIZE_1G,
        }
    }

    /// Table level holding the leaf entry (1 = PT, 2 = PD, 3 = PDPT).
    const fn leaf_level(self) -> u32 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    const fn from_level(level: u32) -> PageSize {
        match level {
            1 => PageSize::Size4K,
            2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No frame for a new page table.
    FrameAllocationFailed,
    /// The leaf entry is already present (it holds `entry`).
    AlreadyMapped { virt: u64, entry: u64 },
    /// A huge page at `level` already covers the address.
    ParentEntryHugePage { virt: u64, level: u32 },
    /// Nothing is mapped at the address.
    NotMapped { virt: u64 },
    /// `virt` or `phys` not aligned to the page size.
    Unaligned { virt: u64, phys: u64 },
    /// `virt` is not canonical (bits 63..47 not all equal).
    NonCanonical { virt: u64 },
    /// Unmap of an address that is inside, not at the start of, a `size` page.
    NotPageStart { virt: u64, size: PageSize },
}

impl From<FrameError> for MapError {
    fn from(_: FrameError) -> MapError {
        MapError::FrameAllocationFailed
    }
}

/// Result of a successful walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Physical address the virtual address maps to (offset included).
    pub phys: u64,
    pub size: PageSize,
    /// Flags of the leaf entry.
    pub flags: PageFlags,
}

pub const fn is_canonical(virt: u64) -> bool {
    ((virt as i64) << 16 >> 16) as u64 == virt
}

/// Index of `virt` in the table at `level` (4 = PML4 .. 1 = PT).
#[inline]
const fn index(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * (level - 1))) & 0x1FF) as usize
}

/// Page-table memory and the supply of table frames: everything the walks
/// below need from the machine. Tables are named by physical address (what
/// entries hold); entries are read and written one at a time, never through
/// long-lived references, because the CPU sets A/D bits in live tables
/// behind the compiler's back.
pub trait TableMemory {
    /// Entry `idx` (< 512) of the table at physical `table` (4 KiB aligned).
    fn read(&mut self, table: u64, idx: usize) -> u64;
    /// Writes entry `idx` of the table at `table`.
    fn write(&mut self, table: u64, idx: usize, entry: u64);
    /// A zeroed frame for a new table, or None when none is left.
    fn alloc_table(&mut self) -> Option<u64>;
    /// True if `table` came from `alloc_table` and may be freed once empty
    /// (tables built by someone else, like the host's boot tables, stay).
    fn owns_table(&mut self, table: u64) -> bool;
    /// Returns an emptied table that `owns_table` accepted.
    fn free_table(&mut self, table: u64);
    /// Drops cached translations (and paging-structure caches) for `virt`.
    fn flush(&mut self, virt: u64);
}

/// The live kernel's table memory: tables through the direct map, new
/// tables from the frame allocator (zeroed), INVLPG on the running CPU.
/// Reads touch only the direct map, so walks that only read (translate)
/// also work at CPL3.
pub struct DirectMap {
    /// The direct-map base, read once: a local the compiler keeps in a
    /// register across the entry writes (the global is an atomic it must
    /// reload after every store), which keeps map/unmap at their
    /// instruction count from before the trait.
    offset: u64,
}

impl DirectMap {
    #[inline(always)]
    pub fn new() -> DirectMap {
        DirectMap { offset: phys_to_virt(0) }
    }

    #[inline(always)]
    fn entry_ptr(&self, table: u64, idx: usize) -> *mut u64 {
        debug_assert!(idx < ENTRIES);
        (self.offset + (table & ADDR_MASK) + idx as u64 * 8) as *mut u64
    }
}

impl TableMemory for DirectMap {
    #[inline(always)]
    fn read(&mut self, table: u64, idx: usize) -> u64 {
        // SAFETY: `table` is a page table of a hierarchy the kernel walks
        // (reached from CR3 or handed in as a root), direct mapped; idx < 512
        // keeps the read inside it.
        unsafe { *self.entry_ptr(table, idx) }
    }

    #[inline(always)]
    fn write(&mut self, table: u64, idx: usize, entry: u64) {
        // SAFETY: as for `read`; one CPU with interrupts off, so no
        // concurrent writer other than the CPU's own A/D updates.
        unsafe { *self.entry_ptr(table, idx) = entry }
    }

    #[inline(always)]
    fn alloc_table(&mut self) -> Option<u64> {
        frames::alloc_zeroed_frame().ok()
    }

    #[inline(always)]
    fn owns_table(&mut self, table: u64) -> bool {
        frames::with(|fa| fa.is_allocated(table))
    }

    #[inline(always)]
    fn free_table(&mut self, table: u64) {
        frames::free_frame(table).expect("freeing an emptied page table");
    }

    #[inline(always)]
    fn flush(&mut self, virt: u64) {
        invlpg(virt);
    }
}

/// True if `e`, found at `level`, is a leaf (a 4 KiB PTE or a PS entry).
#[inline(always)]
const fn is_leaf(e: u64, level: u32) -> bool {
    level == 1 || (level <= 3 && e & PageFlags::HUGE.0 != 0)
}

// Child-count bits in a non-leaf entry: low 3 bits in 9..11, high 7 in 52..58.
const COUNT_LO_SHIFT: u32 = 9;
const COUNT_HI_SHIFT: u32 = 52;
const COUNT_MASK: u64 = (0x7 << COUNT_LO_SHIFT) | (0x7F << COUNT_HI_SHIFT);

const fn child_count(entry: u64) -> u64 {
    ((entry >> COUNT_LO_SHIFT) & 0x7) | (((entry >> COUNT_HI_SHIFT) & 0x7F) << 3)
}

const fn with_child_count(entry: u64, count: u64) -> u64 {
    (entry & !COUNT_MASK) | ((count & 0x7) << COUNT_LO_SHIFT) | ((count >> 3) << COUNT_HI_SHIFT)
}

fn root() -> u64 {
    read_cr3() & ADDR_MASK
}

/// Walks the active tables.
pub fn translate(virt: u64) -> Option<Translation> {
    translate_in(root(), virt)
}

/// Walks the hierarchy at `root` (CR3 value; flag bits ignored). Memory
/// reads only: usable at CPL3 when the tables' direct map is.
pub fn translate_in(root: u64, virt: u64) -> Option<Translation> {
    translate_with(&mut DirectMap::new(), root, virt)
}

/// Walks the hierarchy at `root` in `mem`.
pub fn translate_with<M: TableMemory>(mem: &mut M, root: u64, virt: u64) -> Option<Translation> {
    if !is_canonical(virt) {
        return None;
    }
    let mut t = root & ADDR_MASK;
    let mut level = 4;
    loop {
        let e = mem.read(t, index(virt, level));
        if e & PageFlags::PRESENT.0 == 0 {
            return None;
        }
        if is_leaf(e, level) {
            let size = PageSize::from_level(level);
            let base = e & ADDR_MASK & !(size.bytes() - 1);
            return Some(Translation {
                phys: base + (virt & (size.bytes() - 1)),
                size,
                flags: PageFlags::from_bits_truncate(e),
            });
        }
        t = e & ADDR_MASK;
        level -= 1;
    }
}

/// A leaf entry mapping `phys` with a page of `size` and `flags` (PRESENT
/// implied, HUGE added for 2 MiB/1 GiB); checks alignment and the address
/// width. Pure computation.
#[inline]
pub fn make_entry(phys: u64, size: PageSize, flags: PageFlags) -> Result<u64, MapError> {
    if phys & (size.bytes() - 1) != 0 || phys & !ADDR_MASK != 0 {
        return Err(MapError::Unaligned { virt: 0, phys });
    }
    let huge = if size == PageSize::Size4K { 0 } else { PageFlags::HUGE.0 };
    Ok(phys | (flags.0 & FLAG_MASK & !PageFlags::HUGE.0) | PageFlags::PRESENT.0 | huge)
}

/// Sets (`on`) or clears U/S on every present leaf in `[start, end)` and on
/// every table entry above those leaves; returns the leaves changed. The
/// caller flushes the TLB (CR3 reload). Used by the CPL3 benchmark mode.
pub fn set_user_range(start: u64, end: u64, on: bool) -> u64 {
    // Table entries change: one inspect critical section for the whole range.
    crate::inspect::critical(|| set_user_range_in(&mut DirectMap::new(), root(), start, end, on))
}

/// `set_user_range` on the hierarchy at `root` in `mem` (no flush).
pub fn set_user_range_in<M: TableMemory>(mem: &mut M, root: u64, start: u64, end: u64, on: bool) -> u64 {
    let mut count = 0;
    let mut va = start & !(PAGE_SIZE - 1);
    let bit = PageFlags::USER.0;
    while va < end {
        let mut t = root & ADDR_MASK;
        let mut level = 4;
        // (table, index) of the entry read at each level on the way down.
        let mut path = [(0u64, 0usize); 5];
        let step = loop {
            let i = index(va, level);
            let e = mem.read(t, i);
            let size = 1u64 << (12 + 9 * (level - 1));
            if e & PageFlags::PRESENT.0 == 0 {
                break size - (va & (size - 1));
            }
            path[level as usize] = (t, i);
            if is_leaf(e, level) {
                for &(pt, pi) in &path[level as usize..] {
                    let q = mem.read(pt, pi);
                    // Only the U/S bit changes.
                    mem.write(pt, pi, if on { q | bit } else { q & !bit });
                }
                count += 1;
                break size - (va & (size - 1));
            }
            t = e & ADDR_MASK;
            level -= 1;
        };
        match va.checked_add(step) {
            Some(n) => va = n,
            None => break,
        }
    }
    count
}

/// Maps `virt` to `phys` with a page of `size` and leaf `flags` (PRESENT is
/// implied; HUGE is added for 2 MiB/1 GiB). Missing tables are allocated;
/// their entries are P|W (plus U if `flags` has USER) so the leaf alone
/// decides permissions.
pub fn map_page(virt: u64, phys: u64, size: PageSize, flags: PageFlags) -> Result<(), MapError> {
    // One inspect critical section: tables and frame bitmap change together.
    let s = crate::inspect::begin();
    let r = map_page_in(&mut DirectMap::new(), root(), virt, phys, size, flags);
    crate::inspect::end(s);
    r
}

/// `map_page` on the hierarchy at `root` in `mem`.
pub fn map_page_in<M: TableMemory>(
    mem: &mut M,
    root: u64,
    virt: u64,
    phys: u64,
    size: PageSize,
    flags: PageFlags,
) -> Result<(), MapError> {
    if !is_canonical(virt) {
        return Err(MapError::NonCanonical { virt });
    }
    let mask = size.bytes() - 1;
    if virt & mask != 0 || phys & mask != 0 || phys & !ADDR_MASK != 0 {
        return Err(MapError::Unaligned { virt, phys });
    }
    let user = flags.contains(PageFlags::USER);
    let table_flags = PageFlags::PRESENT.0 | PageFlags::WRITABLE.0 | if user { PageFlags::USER.0 } else { 0 };
    let leaf = size.leaf_level();

    // First pass: make sure every table on the path exists. A new table's
    // count starts at 0 and is bumped once its child entry is filled.
    let mut path = [0u64; 5]; // path[level] = phys of the table at `level`
    path[4] = root & ADDR_MASK;
    let mut level = 4;
    while level > leaf {
        let (t, i) = (path[level as usize], index(virt, level));
        let e = mem.read(t, i);
        if e & PageFlags::PRESENT.0 == 0 {
            let new = mem.alloc_table().ok_or(MapError::FrameAllocationFailed)?;
            mem.write(t, i, new | table_flags);
            bump_count(mem, &path, level + 1, virt, 1);
            path[level as usize - 1] = new;
        } else if e & PageFlags::HUGE.0 != 0 {
            return Err(MapError::ParentEntryHugePage { virt, level });
        } else {
            if user && e & PageFlags::USER.0 == 0 {
                mem.write(t, i, e | PageFlags::USER.0);
            }
            path[level as usize - 1] = e & ADDR_MASK;
        }
        level -= 1;
    }

    let (t, i) = (path[leaf as usize], index(virt, leaf));
    let e = mem.read(t, i);
    if e & PageFlags::PRESENT.0 != 0 {
        return Err(MapError::AlreadyMapped { virt, entry: e });
    }
    let huge = if leaf > 1 { PageFlags::HUGE.0 } else { 0 };
    mem.write(t, i, phys | flags.0 | PageFlags::PRESENT.0 | huge);
    bump_count(mem, &path, leaf + 1, virt, 1);
    mem.flush(virt);
    Ok(())
}

/// Adjusts the child count of the table at `level - 1`, stored in its parent
/// entry at `level` (no-op for the PML4, which has no parent entry, and for
/// host-built tables, whose counts are never used).
#[inline(always)]
fn bump_count<M: TableMemory>(mem: &mut M, path: &[u64; 5], level: u32, virt: u64, delta: i64) {
    if level > 4 {
        return;
    }
    let (t, i) = (path[level as usize], index(virt, level));
    let e = mem.read(t, i);
    let c = (child_count(e) as i64 + delta) as u64;
    mem.write(t, i, with_child_count(e, c));
}

/// Unmaps the page that starts at `virt` (any size), frees every table that
/// becomes empty (if this allocator created it), and returns what was mapped.
pub fn unmap_page(virt: u64) -> Result<Translation, MapError> {
    let s = crate::inspect::begin();
    let r = unmap_page_in(&mut DirectMap::new(), root(), virt);
    crate::inspect::end(s);
    r
}

/// `unmap_page` on the hierarchy at `root` in `mem`.
pub fn unmap_page_in<M: TableMemory>(mem: &mut M, root: u64, virt: u64) -> Result<Translation, MapError> {
    if !is_canonical(virt) {
        return Err(MapError::NonCanonical { virt });
    }
    let mut path = [0u64; 5];
    path[4] = root & ADDR_MASK;
    let mut level = 4;
    let e = loop {
        let e = mem.read(path[level as usize], index(virt, level));
        if e & PageFlags::PRESENT.0 == 0 {
            return Err(MapError::NotMapped { virt });
        }
        if is_leaf(e, level) {
            break e;
        }
        path[level as usize - 1] = e & ADDR_MASK;
        level -= 1;
    };
    let size = PageSize::from_level(level);
    if virt & (size.bytes() - 1) != 0 {
        return Err(MapError::NotPageStart { virt, size });
    }
    mem.write(path[level as usize], index(virt, level), 0);
    mem.flush(virt);

    // Walk back up: the table at `level` lost an entry; free it if it is now
    // empty and ours, then its parent lost one, and so on. The PML4 stays.
    while level < 4 {
        let (pt, pi) = (path[level as usize + 1], index(virt, level + 1));
        let pe = mem.read(pt, pi);
        let table_phys = pe & ADDR_MASK;
        if !mem.owns_table(table_phys) {
            break;
        }
        let count = child_count(pe).saturating_sub(1);
        if count > 0 {
            mem.write(pt, pi, with_child_count(pe, count));
            break;
        }
        mem.write(pt, pi, 0);
        // The paging-structure caches may hold the freed table: INVLPG drops
        // those entries too (SDM Vol. 3, 4.10.4.1).
        mem.flush(virt);
        mem.free_table(table_phys);
        level += 1;
    }
    Ok(Translation { phys: e & ADDR_MASK & !(size.bytes() - 1), size, flags: PageFlags::from_bits_truncate(e) })
}

/// Present entries in the table that maps `virt` at `level`, as recorded in
/// its parent entry (only meaningful for tables this module created). For
/// tests.
pub fn recorded_child_count(virt: u64, level: u32) -> Option<u64> {
    recorded_child_count_in(&mut DirectMap::new(), root(), virt, level)
}

/// `recorded_child_count` on the hierarchy at `root` in `mem`.
pub fn recorded_child_count_in<M: TableMemory>(mem: &mut M, root: u64, virt: u64, level: u32) -> Option<u64> {
    let mut t = root & ADDR_MASK;
    let mut l = 4;
    while l > level {
        let e = mem.read(t, index(virt, l));
        if e & PageFlags::PRESENT.0 == 0 || (l <= 3 && e & PageFlags::HUGE.0 != 0) {
            return None;
        }
        if l == level + 1 {
            return Some(child_count(e));
        }
        t = e & ADDR_MASK;
        l -= 1;
    }
    None
}

/// The physical address of the table that maps `virt` at `level` (4 =
/// the PML4 itself), if the walk gets there. For tests.
pub fn table_at_in<M: TableMemory>(mem: &mut M, root: u64, virt: u64, level: u32) -> Option<u64> {
    let mut t = root & ADDR_MASK;
    let mut l = 4;
    while l > level {
        let e = mem.read(t, index(virt, l));
        if e & PageFlags::PRESENT.0 == 0 || is_leaf(e, l) {
            return None;
        }
        t = e & ADDR_MASK;
        l -= 1;
    }
    Some(t)
}

/// The entries a walk of `virt` reads, PML4 first (0 past a leaf or a
/// non-present entry). For fault reports.
pub fn walk_entries(virt: u64) -> [u64; 4] {
    let mut mem = DirectMap::new();
    let mut out = [0u64; 4];
    let mut t = root();
    for (k, level) in (1..=4u32).rev().enumerate() {
        let e = mem.read(t, index(virt, level));
        out[k] = e;
        if e & PageFlags::PRESENT.0 == 0 || is_leaf(e, level) {
            break;
        }
        t = e & ADDR_MASK;
    }
    out
}

/// Number of present entries at `table_phys`, by scanning (tests only).
pub fn count_present(table_phys: u64) -> usize {
    count_present_in(&mut DirectMap::new(), table_phys)
}

/// `count_present` on a table in `mem`.
pub fn count_present_in<M: TableMemory>(mem: &mut M, table_phys: u64) -> usize {
    (0..ENTRIES).filter(|&i| mem.read(table_phys, i) & PageFlags::PRESENT.0 != 0).count()
}
