//! Page-table memory for the mapper's unit tests: a static buffer of
//! 4 KiB tables under made-up physical addresses, so `paging::*_in` runs on
//! a hierarchy of its own, never reachable from CR3 and invisible to the
//! frame allocator and to the host's inspector.

use crate::memory::paging::TableMemory;
use crate::memory::PAGE_SIZE;
use crate::sync::{SpinLock, SpinLockGuard};

/// Tables in the buffer: a full 4-level chain is 4, the tests use up to 8.
pub const TABLES: usize = 12;
/// Physical address of table 0. Nonzero and far from RAM, so a zero entry
/// never names a buffer table and a stray RAM address is caught, not used.
pub const BASE: u64 = 0x0000_0040_0000_0000;

#[repr(C, align(4096))]
pub struct Pages([[u64; 512]; TABLES]);

static PAGES: SpinLock<Pages> = SpinLock::new("ktest tables", Pages([[0; 512]; TABLES]));

/// The buffer, its allocation state and what the walks did to it.
pub struct BufferTables {
    pages: SpinLockGuard<'static, Pages>,
    /// Bit i: table i is handed out (by `alloc_table` or `foreign_table`).
    used: u64,
    /// Bit i: table i was built "by someone else" (like the host's boot
    /// tables): `owns_table` says no, so it is never freed.
    foreign: u64,
    /// Tables `alloc_table` may still hand out (for exhaustion tests).
    pub budget: usize,
    /// Reads or writes of an address that is not a handed-out table (a
    /// freed one included: use after free reads 0 and is counted here).
    pub stray: u64,
    /// Frees of a table that was not ours or not in use.
    pub bad_frees: u64,
    pub flushes: u64,
    pub frees: u64,
    /// The PML4 (foreign: the root is never freed by the walks anyway).
    pub root: u64,
}

impl BufferTables {
    /// Takes the buffer (panics if a test already holds it) and builds an
    /// empty PML4; `budget` tables are then left for `alloc_table`.
    pub fn new(budget: usize) -> BufferTables {
        let mut b = BufferTables {
            pages: PAGES.lock(),
            used: 0,
            foreign: 0,
            budget,
            stray: 0,
            bad_frees: 0,
            flushes: 0,
            frees: 0,
            root: 0,
        };
        b.root = b.foreign_table();
        b
    }

    /// A zeroed table that `owns_table` refuses (outside the budget).
    pub fn foreign_table(&mut self) -> u64 {
        self.budget += 1;
        let t = self.alloc_table().expect("ktest tables: buffer exhausted");
        self.foreign |= 1 << Self::slot(t).unwrap_or(0);
        t
    }

    /// Tables handed out and not freed (the root and foreign ones included).
    pub fn in_use(&self) -> u32 {
        self.used.count_ones()
    }

    /// The buffer slot of `table`, if it is one of the buffer's addresses.
    fn slot(table: u64) -> Option<usize> {
        let off = table.wrapping_sub(BASE);
        if off % PAGE_SIZE != 0 || off / PAGE_SIZE >= TABLES as u64 {
            return None;
        }
        Some((off / PAGE_SIZE) as usize)
    }

    /// The slot of a handed-out table, or None (counted as stray).
    fn live_slot(&mut self, table: u64) -> Option<usize> {
        match Self::slot(table) {
            Some(i) if self.used & (1 << i) != 0 => Some(i),
            _ => {
                self.stray += 1;
                None
            }
        }
    }
}

impl TableMemory for BufferTables {
    fn read(&mut self, table: u64, idx: usize) -> u64 {
        match self.live_slot(table) {
            Some(i) => self.pages.0[i][idx],
            None => 0,
        }
    }

    fn write(&mut self, table: u64, idx: usize, entry: u64) {
        if let Some(i) = self.live_slot(table) {
            self.pages.0[i][idx] = entry;
        }
    }

    fn alloc_table(&mut self) -> Option<u64> {
        if self.budget == 0 {
            return None;
        }
        let i = (0..TABLES).find(|&i| self.used & (1 << i) == 0)?;
        self.budget -= 1;
        self.used |= 1 << i;
        self.pages.0[i].fill(0);
        Some(BASE + i as u64 * PAGE_SIZE)
    }

    fn owns_table(&mut self, table: u64) -> bool {
        matches!(Self::slot(table), Some(i) if self.used & !self.foreign & (1 << i) != 0)
    }

    fn free_table(&mut self, table: u64) {
        if !self.owns_table(table) {
            self.bad_frees += 1;
            return;
        }
        let i = Self::slot(table).unwrap_or(0);
        self.used &= !(1 << i);
        self.budget += 1;
        self.frees += 1;
    }

    fn flush(&mut self, _virt: u64) {
        self.flushes += 1;
    }
}
