#!/usr/bin/env python3
"""Boot-path and exit-dispatch benchmark: a thin wrapper around ``vmm bench``.

Same as ``python3 vmm.py bench --only boot,exits``: every boot step from
process start to READY (beside a minimal C VMM's setup syscalls), and
port-I/O exits per second with Python's dispatch cost per exit (beside a C
KVM_RUN loop built with gcc in the same run). Medians with min and max over
N runs, always with the KVM backend and CPU model.

    python3 scripts/bench_boot.py [--runs 20] [--exits 20000] [--memory 128M] [--json PATH] [--quick]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VMM = Path(__file__).resolve().parent.parent / "vmm.py"


def _argv(argv: list[str]) -> list[str]:
    """bench_boot's options, as `vmm bench` options (a bare --memory number means MiB, as it always did)."""
    out = ["bench", "--only", "boot,exits"]
    it = iter(argv)
    for arg in it:
        if arg == "--memory":
            value = next(it, "")
            out += ["--memory", value + "M" if value.isdigit() else value]
        elif arg.startswith("--memory="):
            value = arg.split("=", 1)[1]
            out.append("--memory=" + (value + "M" if value.isdigit() else value))
        else:
            out.append(arg)
    if not any(a == "--runs" or a.startswith("--runs=") for a in argv) and "--quick" not in argv:
        out += ["--runs", "20"]
    return out


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    # Run the CLI as its own process (nothing imports vmm.cli): same output, same exit code.
    os.execv(sys.executable, [sys.executable, str(VMM), *_argv(sys.argv[1:])])
