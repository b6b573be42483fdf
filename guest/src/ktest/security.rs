//! W^X and no-user-page self-check.

use super::TestResult;
use crate::memory::audit::{self, audit};
use crate::memory::layout::SCRATCH_START;
use crate::memory::paging::{map_page, unmap_page, PageFlags, PageSize};
use crate::memory::frames;
use crate::arch::x86_64::read_cr3;
use crate::{check, check_eq, check_ok};

pub fn wx_clean() -> TestResult {
    let (ok, a, wp, nxe) = audit::self_check();
    check!(wp, "CR0.WP clear");
    check!(nxe, "EFER.NXE clear");
    check!(a.leaves > 100, "only {} leaves", a.leaves);
    check_eq!(a.wx, 0);
    check_eq!(a.user, 0);
    check!(ok);
    Ok(())
}

/// The audit does find a W+X page and a user page when there is one.
pub fn detects_violations() -> TestResult {
    let va = SCRATCH_START + 0x7000_0000;
    let f = check_ok!(frames::alloc_frame());
    check_ok!(map_page(va, f, PageSize::Size4K, PageFlags::WRITABLE));
    let a = audit(read_cr3());
    check_ok!(unmap_page(va));
    check_eq!(a.wx, 1);
    check_eq!(a.first_wx, va);
    check_ok!(map_page(va, f, PageSize::Size4K, PageFlags::USER | PageFlags::NO_EXECUTE));
    let b = audit(read_cr3());
    check_ok!(unmap_page(va));
    check_ok!(frames::free_frame(f));
    check_eq!(b.user, 1);
    check_eq!(b.first_user, va);
    check!(audit(read_cr3()).clean());
    Ok(())
}
