//! Validation of and accessors over the host's `BootInfo`.

use crate::abi::{BootInfo, MemoryDescriptor, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use crate::cmdline::Cmdline;
use core::mem::size_of;

/// Why a `BootInfo` was rejected.
#[derive(Debug)]
pub enum BootInfoError {
    BadMagic(u64),
    BadVersion(u32),
    BadSize(u32),
    BadDescriptorSize(u32),
    MemoryMapOutsideRam { phys: u64, count: u32 },
    CmdlineOutsideRam { phys: u64, len: u32 },
    CmdlineNotUtf8,
}

/// Largest command line accepted (ABI: one 4 KiB page).
const CMDLINE_MAX: u32 = 4096;

/// Checks the fields everything else relies on.
pub fn validate(bi: &BootInfo) -> Result<(), BootInfoError> {
    if bi.magic != BOOT_INFO_MAGIC {
        return Err(BootInfoError::BadMagic(bi.magic));
    }
    if bi.version != BOOT_INFO_VERSION {
        return Err(BootInfoError::BadVersion(bi.version));
    }
    if bi.size as usize != size_of::<BootInfo>() {
        return Err(BootInfoError::BadSize(bi.size));
    }
    if (bi.memmap_desc_size as usize) < size_of::<MemoryDescriptor>() || bi.memmap_desc_size % 8 != 0 {
        return Err(BootInfoError::BadDescriptorSize(bi.memmap_desc_size));
    }
    let map_bytes = bi.memmap_count as u64 * bi.memmap_desc_size as u64;
    if bi.memmap_phys.checked_add(map_bytes).map_or(true, |end| end > bi.ram_size) {
        return Err(BootInfoError::MemoryMapOutsideRam { phys: bi.memmap_phys, count: bi.memmap_count });
    }
    if bi.cmdline_len > CMDLINE_MAX || bi.cmdline_phys + bi.cmdline_len as u64 > bi.ram_size {
        return Err(BootInfoError::CmdlineOutsideRam { phys: bi.cmdline_phys, len: bi.cmdline_len });
    }
    Ok(())
}

/// Direct-map virtual address of a physical address.
pub fn phys_to_virt(bi: &BootInfo, phys: u64) -> u64 {
    bi.phys_offset + phys
}

/// The memory map, in the host's order (sorted, non-overlapping).
pub fn memory_map(bi: &'static BootInfo) -> impl Iterator<Item = &'static MemoryDescriptor> + Clone {
    let base = phys_to_virt(bi, bi.memmap_phys);
    let stride = bi.memmap_desc_size as u64;
    // SAFETY: `validate` checked the table lies inside RAM, which is direct
    // mapped, and that the stride covers a whole, 8-aligned descriptor.
    (0..bi.memmap_count as u64).map(move |i| unsafe { &*((base + i * stride) as *const MemoryDescriptor) })
}

/// The command line (UTF-8 checked; trailing NULs dropped).
pub fn cmdline(bi: &'static BootInfo) -> Result<Cmdline, BootInfoError> {
    if bi.cmdline_len == 0 {
        return Ok(Cmdline::EMPTY);
    }
    let ptr = phys_to_virt(bi, bi.cmdline_phys) as *const u8;
    // SAFETY: `validate` checked the range lies inside direct-mapped RAM.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, bi.cmdline_len as usize) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).map(Cmdline::new).map_err(|_| BootInfoError::CmdlineNotUtf8)
}
