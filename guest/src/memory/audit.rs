//! Self-check of the kernel's own page tables: W^X and no user access.
//!
//! Walks every present entry reachable from a root and computes each leaf's
//! effective permissions the way the MMU does (SDM Vol. 3, 4.6): writable =
//! AND of R/W over all levels, user = AND of U/S, executable = no NX at any
//! level (NX only counts with EFER.NXE). A leaf that is both writable and
//! executable, or any user-accessible leaf (the kernel has no user pages
//! outside a CPL3 benchmark run), is a violation. CR0.WP (supervisor writes
//! honour R/W) and EFER.NXE must be set for the check to mean anything.
//!
//! Pure memory reads (no privileged instruction) once `root` is known.

use super::phys_to_virt;

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000F_FFFF_FFFF_F000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Leaves visited (any size).
    pub leaves: u64,
    /// Leaves writable and executable.
    pub wx: u64,
    /// Leaves reachable from CPL3.
    pub user: u64,
    /// Virtual address of the first W+X leaf (0 if none).
    pub first_wx: u64,
    /// Virtual address of the first user leaf (0 if none).
    pub first_user: u64,
    /// Table entries with U/S set at any level (non-leaf included).
    pub user_entries: u64,
}

impl Audit {
    pub fn clean(&self) -> bool {
        self.wx == 0 && self.user == 0
    }
}

fn sign_extend(v: u64) -> u64 {
    ((v as i64) << 16 >> 16) as u64
}

/// Index of the first non-zero entry in `t[from..512]`, or 512.
///
/// `repe scasq` skips a run of empty entries in one instruction: page tables
/// are mostly empty, and on PVM hosts every CPL0 instruction is emulated, so
/// this makes the boot-time self-check several times cheaper.
fn next_nonzero(t: *const u64, from: u64) -> u64 {
    if from >= 512 {
        return 512;
    }
    let left: u64;
    // SAFETY: scans at most the rest of one 4 KiB table that the caller may read.
    unsafe {
        core::arch::asm!(
            "repe scasq",
            inout("rdi") t.add(from as usize) => _,
            inout("rcx") 512 - from => left,
            in("rax") 0u64,
            options(nostack, readonly)
        );
    }
    // rcx counts down once per entry compared; when the scan stops on a
    // non-zero entry, that entry is the last one compared.
    let stopped_at = 512 - left - 1;
    // SAFETY: index < 512 within the same table.
    if unsafe { t.add(stopped_at as usize).read_volatile() } != 0 {
        stopped_at
    } else {
        512
    }
}

fn walk(table: u64, level: u32, base: u64, w: bool, u: bool, x: bool, a: &mut Audit) {
    let t = phys_to_virt(table & ADDR) as *const u64;
    let mut i = next_nonzero(t, 0);
    while i < 512 {
        // SAFETY: a page-table frame reached from the root, direct mapped.
        let e = unsafe { t.add(i as usize).read_volatile() };
        let here = i;
        i = next_nonzero(t, i + 1);
        let i = here;
        if e & P == 0 {
            continue;
        }
        if e & US != 0 {
            a.user_entries += 1;
        }
        let virt = sign_extend(base | (i << (12 + 9 * (level - 1))));
        let (w2, u2, x2) = (w && e & RW != 0, u && e & US != 0, x && e & NX == 0);
        if level == 1 || (level <= 3 && e & PS != 0) {
            a.leaves += 1;
            if w2 && x2 {
                if a.wx == 0 {
                    a.first_wx = virt;
                }
                a.wx += 1;
            }
            if u2 {
                if a.user == 0 {
                    a.first_user = virt;
                }
                a.user += 1;
            }
        } else {
            walk(e, level - 1, virt & 0x0000_FFFF_FFFF_FFFF, w2, u2, x2, a);
        }
    }
}

/// Audits the hierarchy at `root` (physical address of a PML4).
pub fn audit(root: u64) -> Audit {
    let mut a = Audit::default();
    walk(root, 4, 0, true, true, true, &mut a);
    a
}

/// CR0.WP and EFER.NXE (CPL0 only).
pub fn control_bits() -> (bool, bool) {
    use crate::arch::x86_64 as cpu;
    let wp = cpu::read_cr0() & cpu::CR0_WP != 0;
    // SAFETY: EFER exists on every x86-64 CPU.
    let nxe = unsafe { cpu::rdmsr(cpu::MSR_EFER) } & cpu::EFER_NXE != 0;
    (wp, nxe)
}

/// The boot-time verdict: tables clean and both control bits set.
pub fn self_check() -> (bool, Audit, bool, bool) {
    let a = audit(crate::arch::x86_64::read_cr3());
    let (wp, nxe) = control_bits();
    (a.clean() && wp && nxe, a, wp, nxe)
}
