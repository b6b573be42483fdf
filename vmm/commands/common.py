"""What several commands share: the kernel and RAM size from the options."""

from __future__ import annotations

from pathlib import Path

from .. import startup
from ..elf import KernelImage, load_kernel_file
from ..guest_build import build_guest, built_kernel_sha256
from ..kernel_cache import load_cached_kernel
from ..layout import DEFAULT_RAM, check_ram_size


def kernel_image(args, quiet: bool) -> KernelImage:
    """The kernel of --kernel, or the built guest, with its cache (vmm.kernel_cache)
    if it is the built guest: a --kernel naming that file (what scripts and
    tests pass) starts as light as no --kernel; another kernel gets no cache
    file written beside it."""
    if args.kernel is not None:
        startup.mark("t_built")
        digest = built_kernel_sha256(Path(args.kernel))  # None unless the build stamp knows this file
        image = load_kernel_file(args.kernel) if digest is None else load_cached_kernel(args.kernel, digest)
    else:
        path = build_guest(quiet=quiet)
        startup.mark("t_built")
        image = load_cached_kernel(path, built_kernel_sha256(path))
    startup.mark("t_kernel")
    return image


def memory_size(args) -> int:
    """``--memory`` (default 128 MiB), checked."""
    size = DEFAULT_RAM if args.memory is None else args.memory
    check_ram_size(size)
    return size


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
