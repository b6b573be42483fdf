//! The mapper's logic on a test buffer (ktest/tables.rs): map, unmap and
//! translate, child counts, table freeing and errors, without touching the
//! live tables. The live-CR3 behaviour (TLB, faults) is in ktest/paging.rs.

use super::tables::BufferTables;
use super::TestResult;
use crate::memory::paging::{
    count_present_in, map_page_in, recorded_child_count_in, set_user_range_in, table_at_in, translate_with, unmap_page_in,
    MapError, PageFlags, PageSize, TableMemory,
};
use crate::memory::{PAGE_SIZE, SIZE_1G, SIZE_2M};
use crate::{check, check_eq, check_ok};

const RW: PageFlags = PageFlags::from_bits_truncate(PageFlags::WRITABLE.bits() | PageFlags::NO_EXECUTE.bits());
/// PML4 slot 1, PDPT slot 2, PD slot 3, PT slot 4.
const V: u64 = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12);
const PHYS: u64 = 0x1234_5000;

/// Child count recorded for, and entries present in, the table at `level`
/// on the way to `virt` must agree.
fn counts_agree(m: &mut BufferTables, virt: u64, level: u32) -> Result<u64, &'static str> {
    let recorded = recorded_child_count_in(m, m.root, virt, level).ok_or("no table at that level")?;
    let table = table_at_in(m, m.root, virt, level).ok_or("walk stops early")?;
    if recorded as usize != count_present_in(m, table) {
        return Err("recorded child count differs from the present entries");
    }
    Ok(recorded)
}

/// No walk strayed outside the buffer's live tables, no bad free.
fn clean(m: &BufferTables) -> TestResult {
    check_eq!((m.stray, m.bad_frees), (0, 0));
    Ok(())
}

pub fn map_4k() -> TestResult {
    let mut m = BufferTables::new(8);
    let root = m.root;
    check_ok!(map_page_in(&mut m, root, V, PHYS, PageSize::Size4K, RW));
    // PDPT, PD and PT were created.
    check_eq!(m.in_use(), 4);
    check_eq!(m.flushes, 1);
    let t = check_ok!(translate_with(&mut m, root, V + 0x7f8).ok_or("not mapped"));
    check_eq!((t.phys, t.size), (PHYS + 0x7f8, PageSize::Size4K));
    check!(t.flags.contains(RW | PageFlags::PRESENT) && !t.flags.contains(PageFlags::HUGE), "{:?}", t.flags);
    // Intermediate entries are P|W without U: the leaf decides.
    let pml4e = m.read(root, 1);
    check_eq!(pml4e & 0x7, 0x3);
    check!(translate_with(&mut m, root, V + PAGE_SIZE).is_none());
    check!(translate_with(&mut m, root, V - PAGE_SIZE).is_none());
    check!(translate_with(&mut m, root, 0x0000_8000_0000_0000).is_none(), "non-canonical translated");
    // A second page in the same PT: no new table.
    check_ok!(map_page_in(&mut m, root, V + PAGE_SIZE, PHYS + 0x10_0000, PageSize::Size4K, PageFlags::empty()));
    check_eq!(m.in_use(), 4);
    let t2 = check_ok!(translate_with(&mut m, root, V + PAGE_SIZE).ok_or("second page"));
    check_eq!(t2.phys, PHYS + 0x10_0000);
    check!(!t2.flags.contains(PageFlags::WRITABLE));
    // The high half (PML4 slot 256 and up) works the same way.
    let high = 0xffff_8000_0000_0000 + V;
    check_ok!(map_page_in(&mut m, root, high, PHYS, PageSize::Size4K, RW));
    check_eq!(check_ok!(translate_with(&mut m, root, high).ok_or("high half")).phys, PHYS);
    check_eq!(m.in_use(), 7);
    clean(&m)
}

/// Maps a `size` leaf, checks it, its tables and its unmap.
fn huge(size: PageSize, tables: u32) -> TestResult {
    let mut m = BufferTables::new(8);
    let root = m.root;
    let v = V & !(size.bytes() - 1);
    let phys = 5 * SIZE_1G;
    check_ok!(map_page_in(&mut m, root, v, phys, size, RW));
    check_eq!(m.in_use(), 1 + tables);
    let t = check_ok!(translate_with(&mut m, root, v + 0x12_3458).ok_or("not mapped"));
    check_eq!((t.phys, t.size), (phys + 0x12_3458, size));
    check!(t.flags.contains(PageFlags::HUGE), "{:?}", t.flags);
    // A 4 KiB page under the huge leaf is refused, and the leaf stays.
    let level = if size == PageSize::Size2M { 2 } else { 3 };
    check_eq!(
        map_page_in(&mut m, root, v + PAGE_SIZE, PHYS, PageSize::Size4K, RW),
        Err(MapError::ParentEntryHugePage { virt: v + PAGE_SIZE, level })
    );
    check_eq!(
        unmap_page_in(&mut m, root, v + PAGE_SIZE),
        Err(MapError::NotPageStart { virt: v + PAGE_SIZE, size })
    );
    check_eq!(m.in_use(), 1 + tables);
    let u = check_ok!(unmap_page_in(&mut m, root, v));
    check_eq!((u.phys, u.size), (phys, size));
    check!(translate_with(&mut m, root, v).is_none());
    // Every table the leaf needed is gone; only the PML4 is left.
    check_eq!(m.in_use(), 1);
    check_eq!(m.frees, tables as u64);
    clean(&m)
}

pub fn map_2m() -> TestResult {
    huge(PageSize::Size2M, 2)
}

pub fn map_1g() -> TestResult {
    // Software only: whether the CPU takes 1 GiB leaves does not matter here.
    huge(PageSize::Size1G, 1)
}

/// Child counts in the AVL bits follow every map and unmap, past 7 (where
/// they spill from bits 9..11 into 52..58) up to a full table of 512, and
/// never disturb the address the entry holds.
pub fn child_counts() -> TestResult {
    let mut m = BufferTables::new(8);
    let root = m.root;
    let base = V & !(SIZE_2M - 1);
    for i in 0..512 {
        check_ok!(map_page_in(&mut m, root, base + i * PAGE_SIZE, PHYS + i * PAGE_SIZE, PageSize::Size4K, RW));
        if i == 0 || i == 7 || i == 8 || i == 200 {
            check_eq!(counts_agree(&mut m, base, 1), Ok(i + 1));
            check_eq!(check_ok!(translate_with(&mut m, root, base).ok_or("first page")).phys, PHYS);
        }
    }
    check_eq!(counts_agree(&mut m, base, 1), Ok(512));
    // A second PT under the same PD.
    check_ok!(map_page_in(&mut m, root, base + SIZE_2M, PHYS, PageSize::Size4K, RW));
    check_eq!(counts_agree(&mut m, base, 2), Ok(2));
    check_eq!(counts_agree(&mut m, base, 3), Ok(1));
    let pd = check_ok!(table_at_in(&mut m, root, base, 2).ok_or("no PD"));
    let pt = check_ok!(table_at_in(&mut m, root, base, 1).ok_or("no PT"));
    check_eq!(m.read(pd, ((base >> 21) & 0x1ff) as usize) & 0x000F_FFFF_FFFF_F000, pt);
    for i in (0..512).rev() {
        check_ok!(unmap_page_in(&mut m, root, base + i * PAGE_SIZE));
        if i == 300 || i == 8 || i == 7 || i == 1 {
            check_eq!(counts_agree(&mut m, base, 1), Ok(i));
        }
    }
    // The full PT emptied and went; its PD lost a child.
    check_eq!(counts_agree(&mut m, base, 2), Ok(1));
    check_eq!(recorded_child_count_in(&mut m, root, base, 1), None);
    check_eq!(m.frees, 1);
    check_eq!(m.in_use(), 4);
    clean(&m)
}

/// Tables go the moment they empty, bottom up, each with a flush; tables
/// someone else built (the host's boot tables) stay.
pub fn frees_empty_tables() -> TestResult {
    let mut m = BufferTables::new(8);
    let root = m.root;
    let far = V + (3 << 39); // another PML4 slot: a second PDPT/PD/PT chain
    check_ok!(map_page_in(&mut m, root, V, PHYS, PageSize::Size4K, RW));
    check_ok!(map_page_in(&mut m, root, far, PHYS, PageSize::Size4K, RW));
    check_eq!(m.in_use(), 7);
    // A sibling keeps its PT (and everything above) alive.
    check_ok!(map_page_in(&mut m, root, V + PAGE_SIZE, PHYS, PageSize::Size4K, RW));
    check_ok!(unmap_page_in(&mut m, root, V + PAGE_SIZE));
    check_eq!((m.in_use(), m.frees), (7, 0));
    check_eq!(counts_agree(&mut m, V, 1), Ok(1));
    check_eq!(count_present_in(&mut m, root), 2);
    let flushes = m.flushes;
    check_ok!(unmap_page_in(&mut m, root, far));
    // One flush for the leaf, one per freed table (PT, PD, PDPT).
    check_eq!((m.in_use(), m.frees, m.flushes - flushes), (4, 3, 4));
    check_eq!(count_present_in(&mut m, root), 1);
    check_eq!(unmap_page_in(&mut m, root, far), Err(MapError::NotMapped { virt: far }));

    // A PDPT built by someone else, linked into the PML4.
    let foreign = m.foreign_table();
    let slot = 7u64;
    m.write(root, slot as usize, foreign | PageFlags::PRESENT.bits() | PageFlags::WRITABLE.bits());
    let under = (slot << 39) | V;
    check_ok!(map_page_in(&mut m, root, under, PHYS, PageSize::Size4K, RW));
    check_eq!(m.in_use(), 7);
    check_ok!(unmap_page_in(&mut m, root, under));
    // PD and PT went; the foreign PDPT and the PML4 entry stay.
    check_eq!((m.in_use(), m.frees), (5, 5));
    check_eq!(m.read(root, slot as usize) & 0x000F_FFFF_FFFF_F000, foreign);
    check_eq!(check_ok!(table_at_in(&mut m, root, under, 3).ok_or("foreign PDPT unlinked")), foreign);
    check_eq!(count_present_in(&mut m, foreign), 0);
    check_ok!(unmap_page_in(&mut m, root, V));
    check_eq!(m.in_use(), 2);
    check_eq!(count_present_in(&mut m, root), 1);
    clean(&m)
}

pub fn errors() -> TestResult {
    let mut m = BufferTables::new(2);
    let root = m.root;
    check_eq!(map_page_in(&mut m, root, V + 8, PHYS, PageSize::Size4K, RW), Err(MapError::Unaligned { virt: V + 8, phys: PHYS }));
    check_eq!(map_page_in(&mut m, root, V, PHYS + 1, PageSize::Size4K, RW), Err(MapError::Unaligned { virt: V, phys: PHYS + 1 }));
    check_eq!(map_page_in(&mut m, root, V, PHYS, PageSize::Size2M, RW), Err(MapError::Unaligned { virt: V, phys: PHYS }));
    let wide = 1u64 << 52; // above the 52-bit physical address field
    check_eq!(map_page_in(&mut m, root, V, wide, PageSize::Size4K, RW), Err(MapError::Unaligned { virt: V, phys: wide }));
    let nc = 0x0000_8000_0000_0000;
    check_eq!(map_page_in(&mut m, root, nc, PHYS, PageSize::Size4K, RW), Err(MapError::NonCanonical { virt: nc }));
    check_eq!(unmap_page_in(&mut m, root, nc), Err(MapError::NonCanonical { virt: nc }));
    check_eq!(unmap_page_in(&mut m, root, V), Err(MapError::NotMapped { virt: V }));
    check_eq!(m.in_use(), 1);
    // Two tables left, a 4 KiB page needs three: refused at the PT.
    check_eq!(map_page_in(&mut m, root, V, PHYS, PageSize::Size4K, RW), Err(MapError::FrameAllocationFailed));
    check!(translate_with(&mut m, root, V).is_none());
    // The PDPT and PD made on the way stay linked and counted; with one more
    // table the map completes, and its unmap frees all three.
    check_eq!(m.in_use(), 3);
    check_eq!(counts_agree(&mut m, V, 2), Ok(0));
    m.budget = 1;
    check_ok!(map_page_in(&mut m, root, V, PHYS, PageSize::Size4K, RW));
    match map_page_in(&mut m, root, V, PHYS + PAGE_SIZE, PageSize::Size4K, RW) {
        Err(MapError::AlreadyMapped { virt, entry }) => {
            check_eq!(virt, V);
            check_eq!(entry & 0x000F_FFFF_FFFF_F000, PHYS);
        }
        other => crate::fail!("double map gave {:?}", other),
    }
    check_eq!(check_ok!(translate_with(&mut m, root, V).ok_or("lost")).phys, PHYS);
    check_ok!(unmap_page_in(&mut m, root, V));
    check_eq!(unmap_page_in(&mut m, root, V), Err(MapError::NotMapped { virt: V }));
    check_eq!(m.in_use(), 1);
    clean(&m)
}

/// USER on a leaf opens every table entry above it; `set_user_range_in`
/// sets and clears U/S on leaves and the entries above them.
pub fn user_bits() -> TestResult {
    let mut m = BufferTables::new(8);
    let root = m.root;
    let user = PageFlags::USER.bits();
    check_ok!(map_page_in(&mut m, root, V, PHYS, PageSize::Size4K, RW));
    check_eq!(m.read(root, 1) & user, 0);
    check_ok!(map_page_in(&mut m, root, V + PAGE_SIZE, PHYS, PageSize::Size4K, RW | PageFlags::USER));
    check!(m.read(root, 1) & user != 0, "PML4 entry not opened to CPL3");
    check!(!check_ok!(translate_with(&mut m, root, V).ok_or("first")).flags.contains(PageFlags::USER));
    check_eq!(set_user_range_in(&mut m, root, V, V + 2 * PAGE_SIZE, false), 2);
    check_eq!(m.read(root, 1) & user, 0);
    check!(!check_ok!(translate_with(&mut m, root, V + PAGE_SIZE).ok_or("second")).flags.contains(PageFlags::USER));
    check_eq!(set_user_range_in(&mut m, root, V, V + PAGE_SIZE, true), 1);
    check!(check_ok!(translate_with(&mut m, root, V).ok_or("first")).flags.contains(PageFlags::USER));
    check!(!check_ok!(translate_with(&mut m, root, V + PAGE_SIZE).ok_or("second")).flags.contains(PageFlags::USER));
    // Counts are untouched by the U/S changes.
    check_eq!(counts_agree(&mut m, V, 1), Ok(2));
    clean(&m)
}
