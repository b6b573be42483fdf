"""The run filters of ``vmm pt`` and ``vmm inspect`` from their options."""

from __future__ import annotations

from ..inspector.snapshot import RunFilter


def run_filter(args) -> RunFilter:
    lo, hi = args.range if args.range else (None, None)
    return RunFilter(
        writable=args.writable, executable=args.executable, user=args.user, kernel_half=args.kernel_half,
        page_size=args.page_size, start=lo, end=hi, label=args.label,
    )
