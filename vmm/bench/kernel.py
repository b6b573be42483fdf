"""Which guest kernel the benchmarks boot.

``--kernel PATH`` wins. Otherwise the guest in ``guest/`` is built (cached by
a hash of its sources). If the sources do not build right now (someone is in
the middle of a change), the last kernel that did build is used and the
report says so, instead of measuring nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KernelChoice:
    path: Path
    note: str = ""  # why this kernel (empty: the current sources)


def resolve_kernel(path: str | None) -> KernelChoice:
    if path is not None:
        return KernelChoice(Path(path), "given with --kernel")
    from ..guest_build import GuestBuildError, build_guest, default_kernel_path

    try:
        return KernelChoice(build_guest(quiet=True))
    except GuestBuildError as exc:
        stale = default_kernel_path()
        if stale.exists():
            first = str(exc).splitlines()[0]
            return KernelChoice(stale, f"guest sources do not build ({first[:80]}); using the last built kernel")
        raise
