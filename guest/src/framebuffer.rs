//! The framebuffer the host describes in BootInfo (BGRX 8:8:8:8).
//!
//! At boot the kernel draws its memory map as colour bands across the top of
//! the screen, one band per descriptor type, each as wide as its share of RAM
//! (at least a few pixels so small regions stay visible), so a host
//! screenshot shows the framebuffer really works. Rows are filled with
//! `rep stosd`: one emulated instruction per run of pixels on PVM hosts.

use crate::abi::{memtype, BootInfo};
use crate::boot;

/// Height of the memory-map strip, in pixels.
const STRIP_HEIGHT: u32 = 24;
/// Narrowest band drawn for a non-empty descriptor type.
const MIN_BAND: u32 = 6;

fn colour(typ: u32) -> u32 {
    match typ {
        memtype::CONVENTIONAL => 0x0028_A03C,
        memtype::LOADER_CODE => 0x003C_6EE6,
        memtype::LOADER_DATA => 0x0096_785A,
        memtype::ACPI_RECLAIM => 0x00E6_B428,
        memtype::ACPI_NVS => 0x00E6_5A28,
        memtype::FRAMEBUFFER => 0x0028_C8DC,
        _ => 0x005A_5A5A, // reserved and anything else
    }
}

/// Fills `count` pixels from `ptr` with `value`.
///
/// # Safety
/// `[ptr, ptr + 4 * count)` must be framebuffer memory.
unsafe fn fill(ptr: *mut u32, count: usize, value: u32) {
    core::arch::asm!(
        "rep stosd",
        inout("rdi") ptr => _,
        inout("rcx") count => _,
        in("eax") value,
        options(nostack, preserves_flags)
    );
}

/// Draws the memory-map strip (no-op when the host gave no framebuffer).
/// Only on request (`fb=1`): every pixel is an emulated store on PVM hosts.
pub fn draw_memory_map(bi: &'static BootInfo) {
    if bi.fb_phys == 0 || bi.fb_width < 64 || bi.fb_height < STRIP_HEIGHT || bi.fb_stride < bi.fb_width * 4 {
        return;
    }
    if bi.fb_phys + bi.fb_stride as u64 * bi.fb_height as u64 > bi.ram_size {
        return;
    }
    let width = bi.fb_width;
    let ram = bi.ram_size.max(1);
    // Band edges in pixels: each descriptor's share of RAM, widened to MIN_BAND.
    let mut widths = [(0u32, 0u32); 64]; // (width, colour)
    let mut n = 0;
    for d in boot::memory_map(bi).take(widths.len()) {
        let w = ((d.number_of_pages * 4096 * width as u64) / ram) as u32;
        widths[n] = (w.max(MIN_BAND), colour(d.typ));
        n += 1;
    }
    // The minimum widths may overshoot (or rounding undershoot): the widest
    // band absorbs the difference, so every band stays visible.
    let total: u32 = widths[..n].iter().map(|w| w.0).sum();
    if let Some(widest) = widths[..n].iter_mut().max_by_key(|w| w.0) {
        widest.0 = (widest.0 + width).saturating_sub(total).max(1);
    }
    let mut bands = [(0u32, 0u32, 0u32); 64]; // (x0, x1, colour)
    let mut x = 0u32;
    for i in 0..n {
        let x1 = (x + widths[i].0).min(width);
        bands[i] = (x, x1, widths[i].1);
        x = x1;
    }
    let base = boot::phys_to_virt(bi, bi.fb_phys);
    for row in 0..STRIP_HEIGHT {
        let line = (base + row as u64 * bi.fb_stride as u64) as *mut u32;
        for &(x0, x1, c) in &bands[..n] {
            // Leave a one-pixel dark gap between bands.
            let end = if x1 < width { x1 - 1 } else { x1 };
            if end > x0 {
                // SAFETY: inside row `row` of the framebuffer, checked above.
                unsafe { fill(line.add(x0 as usize), (end - x0) as usize, c) };
            }
        }
    }
}
