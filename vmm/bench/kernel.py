"""Which guest kernel the benchmarks boot.

``--kernel PATH`` wins. Otherwise the guest in ``guest/`` is built (cached by
a hash of its sources). If the sources do not build right now (someone is in
the middle of a change), the last kernel that did build is used and the
report says so, instead of measuring nothing.

The chosen ELF is copied to a private temp file (``pin``) before anything
boots: the shared build output may be rebuilt by someone else while the
benchmark runs, and every section, fresh processes included, must boot the
same kernel.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ..guest_build import GuestBuildError, build_guest, default_kernel_path


@dataclass(frozen=True)
class KernelChoice:
    path: Path
    note: str = ""  # why this kernel (empty: the current sources)
    source: Path | None = None  # where it was copied from (after pin)
    sha256: str = ""


def resolve_kernel(path: str | None) -> KernelChoice:
    if path is not None:
        return KernelChoice(Path(path), "given with --kernel")
    try:
        return KernelChoice(build_guest(quiet=True))
    except GuestBuildError as exc:
        stale = default_kernel_path()
        if stale.exists():
            first = str(exc).splitlines()[0]
            return KernelChoice(stale, f"guest sources do not build ({first[:80]}); using the last built kernel")
        raise


def pin(choice: KernelChoice) -> KernelChoice:
    """A private copy of the kernel for this run (removed at exit), with its SHA-256."""
    data = choice.path.read_bytes()
    d = Path(tempfile.mkdtemp(prefix="vmm-bench-kernel-"))
    atexit.register(shutil.rmtree, d, True)
    copy = d / choice.path.name
    copy.write_bytes(data)
    return replace(choice, path=copy, source=choice.path, sha256=hashlib.sha256(data).hexdigest())
