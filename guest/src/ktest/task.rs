//! Tasks, their stacks and the randomized layout.

use super::TestResult;
use crate::inspect::{self, STACK_IN_USE};
use crate::memory::layout::{STACKS_START, STACK_SLOT, STACK_SLOTS};
use crate::memory::paging::translate;
use crate::memory::stack::STACK_SIZE;
use crate::memory::PAGE_SIZE;
use crate::task;
use crate::{check, check_eq, check_ok};
use core::sync::atomic::{AtomicU64, Ordering};

const N: usize = 3;
const ROUNDS: u64 = 4;
static SEEN: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static BAD: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);

extern "sysv64" fn worker(i: u64) {
    let id = task::current_id();
    let rec = task::stack_of(id).expect("own stack record");
    let mut local = [i; 4];
    for round in 0..ROUNDS {
        let addr = core::hint::black_box(&mut local) as *mut _ as u64;
        if addr < rec.base || addr >= rec.top || local[0] != i || inspect::snapshot().current_task != id {
            BAD.fetch_add(1, Ordering::Relaxed);
        }
        SEEN[i as usize].store(addr, Ordering::Relaxed);
        STEPS.fetch_add(1, Ordering::Relaxed);
        local[1] = round;
        task::yield_now();
    }
}

pub fn switch_and_own_stacks() -> TestResult {
    BAD.store(0, Ordering::Relaxed);
    STEPS.store(0, Ordering::Relaxed);
    let before = task::count();
    let mut ids = [0u32; N];
    for (i, id) in ids.iter_mut().enumerate() {
        *id = check_ok!(task::spawn("worker", worker, i as u64));
    }
    check_eq!(task::count(), before + N);
    check_eq!(inspect::snapshot().stack_count as usize, before + N);
    let mut recs = [None; N];
    for (i, id) in ids.iter().enumerate() {
        recs[i] = task::stack_of(*id);
    }
    task::yield_now();
    // After one round every worker has run once and yielded back.
    check_eq!(STEPS.load(Ordering::Relaxed), N as u64);
    for id in ids {
        task::join(id);
    }
    check_eq!(STEPS.load(Ordering::Relaxed), N as u64 * ROUNDS);
    check_eq!(BAD.load(Ordering::Relaxed), 0);
    for i in 0..N {
        let r = recs[i].unwrap();
        let seen = SEEN[i].load(Ordering::Relaxed);
        check!(seen >= r.base && seen < r.top, "worker {} local at {:#x} not in {:#x}..{:#x}", i, seen, r.base, r.top);
        for j in 0..i {
            check!(recs[j].unwrap().base != r.base, "two tasks share a stack");
        }
        // Reaped: the stack is unmapped again.
        check!(translate(r.base).is_none(), "stack of finished task still mapped");
    }
    check_eq!(task::count(), before);
    check_eq!(inspect::snapshot().stack_count as usize, before);
    check_eq!(inspect::snapshot().current_task, 0);
    Ok(())
}

extern "sysv64" fn idle(_: u64) {}

pub fn guard_pages_unmapped() -> TestResult {
    let id = check_ok!(task::spawn("idle", idle, 0));
    for tid in [0, id] {
        let r = check_ok!(task::stack_of(tid).ok_or("no stack"));
        check_eq!(r.top - r.base, STACK_SIZE);
        check_eq!(r.guard_low, r.base - PAGE_SIZE);
        check_eq!(r.guard_high, r.top);
        check!(r.flags & STACK_IN_USE != 0);
        check!(r.guard_low >= STACKS_START && r.guard_high < STACKS_START + STACK_SLOTS * STACK_SLOT);
        check!(translate(r.guard_low).is_none(), "low guard {:#x} mapped", r.guard_low);
        check!(translate(r.guard_high).is_none(), "high guard {:#x} mapped", r.guard_high);
        check!(translate(r.base).is_some() && translate(r.top - 8).is_some());
        let t = translate(r.base).unwrap();
        check!(t.flags.contains(crate::memory::paging::PageFlags::NO_EXECUTE));
        check!(crate::interrupts::is_stack_guard(r.guard_low) && crate::interrupts::is_stack_guard(r.guard_high + 8));
        check!(!crate::interrupts::is_stack_guard(r.base));
        // Probing the guards faults (not present).
        let f = crate::interrupts::probe_read_u64(r.guard_high).err();
        check!(f.is_some_and(|f| f.vector == 14 && f.error & 1 == 0), "{:?}", f);
    }
    task::join(id);
    Ok(())
}

pub fn random_layout() -> TestResult {
    // Stack slots of consecutive spawns differ (8192 slots: a repeat of all
    // of 4 is vanishingly unlikely unless placement is not random).
    let mut slots = [0u64; 4];
    for s in slots.iter_mut() {
        let id = check_ok!(task::spawn("idle", idle, 0));
        *s = task::stack_of(id).unwrap().guard_low;
        task::join(id);
    }
    check!(slots.windows(2).any(|w| w[0] != w[1]), "stacks always at {:#x}", slots[0]);
    check!(slots.iter().any(|&g| g != STACKS_START), "stacks not randomized");
    let heap = crate::memory::heap::stats().start;
    check!(heap % (2 << 20) == 0 && heap >= crate::memory::layout::HEAP_REGION);
    Ok(())
}
