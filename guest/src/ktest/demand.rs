//! Demand paging.

use super::TestResult;
use crate::inspect;
use crate::memory::layout::DEMAND_START;
use crate::memory::paging::{translate, PageFlags};
use crate::memory::{demand, frames, PAGE_SIZE};
use crate::{check, check_eq};

pub fn first_touch_maps_zeroed_page() -> TestResult {
    let va = DEMAND_START + 0x1234_5000;
    check!(translate(va).is_none());
    let faults = inspect::snapshot().demand_faults;
    let free = frames::free_count();
    // SAFETY: the demand region is ours; the #PF handler backs the page.
    let first = unsafe { core::ptr::read_volatile((va + 0x88) as *const u64) };
    check_eq!(first, 0);
    let t = translate(va);
    check!(t.is_some(), "not mapped after the fault");
    let t = t.unwrap();
    check!(t.flags.contains(PageFlags::WRITABLE | PageFlags::NO_EXECUTE));
    check!(!t.flags.contains(PageFlags::USER));
    check_eq!(inspect::snapshot().demand_faults, faults + 1);
    check!(frames::free_count() < free);
    // SAFETY: mapped now.
    unsafe {
        core::ptr::write_volatile((va + 8) as *mut u64, 0xfeed);
        check_eq!(core::ptr::read_volatile((va + 8) as *const u64), 0xfeed);
    }
    // No second fault for the same page.
    check_eq!(inspect::snapshot().demand_faults, faults + 1);
    // A write as the first touch works too, and the page is zero elsewhere.
    let vb = va + PAGE_SIZE;
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(vb as *mut u64, 7);
        check_eq!(core::ptr::read_volatile((vb + PAGE_SIZE - 8) as *const u64), 0);
    }
    check_eq!(inspect::snapshot().demand_faults, faults + 2);
    check_eq!(demand::release(va, 2 * PAGE_SIZE), 2);
    check!(translate(va).is_none() && translate(vb).is_none());
    check_eq!(frames::free_count(), free);
    // Touching again gives a fresh zeroed page.
    // SAFETY: as above.
    check_eq!(unsafe { core::ptr::read_volatile((va + 8) as *const u64) }, 0);
    check_eq!(demand::release(va, PAGE_SIZE), 1);
    Ok(())
}

pub fn outside_region_still_faults() -> TestResult {
    let f = crate::interrupts::probe_read_u64(DEMAND_START - PAGE_SIZE);
    check!(f.is_err(), "read below the demand region succeeded");
    Ok(())
}
