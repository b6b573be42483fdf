//! Thin wrappers over the x86-64 instructions the kernel uses.

pub mod x86_64;
