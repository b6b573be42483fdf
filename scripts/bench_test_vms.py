#!/usr/bin/env python3
"""Test VMs per second as pytest runs them: N trivial `vmm_boot` tests
(``vmm_boot("")``: READY, SUMMARY, exit 0) under ``pytest -n WORKERS``, with
snapshots on (the plugin's zygote: each worker boots once, then resets one
VM in place per test) and off (``--vmm-cold``). Reported, never asserted.

Two rates: the whole pytest run over N tests (pytest's and xdist's start-up,
collection and the zygotes' boots included), and the rate once running:
the N extra tests of a run of 2N, N / (wall(2N) - wall(N)), which is what a
large suite sees.

    python3 scripts/bench_test_vms.py [--tests 400] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tests: int, workers: int, cold: bool) -> float:
    """Wall seconds of one pytest run of ``tests`` trivial tests."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_trivial.py").write_text(
            "import pytest\n\n"
            f"@pytest.mark.parametrize('i', range({tests}))\n"
            "def test_trivial(vmm_boot, i):\n"
            "    assert vmm_boot('').exit_code == 0\n"
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "vmm.pytest_plugin", "-p", "no:cacheprovider",
               "-n", str(workers), tmp] + (["--vmm-cold"] if cold else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"pytest failed:\n{proc.stdout[-2000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from vmm.backend import detect_backend

    print(detect_backend().banner)
    n = args.tests
    warm, warm2 = run(n, args.workers, cold=False), run(2 * n, args.workers, cold=False)
    cold_n = max(20, n // 10)
    cold, cold2 = run(cold_n, args.workers, cold=True), run(2 * cold_n, args.workers, cold=True)
    steady, steady_cold = n / max(warm2 - warm, 1e-9), cold_n / max(cold2 - cold, 1e-9)
    print(f"trivial vmm_boot tests, pytest -n {args.workers}:")
    print(f"  snapshots on (zygote, reset in place): {n / warm:7.1f} test VMs/s over {n} tests, start-up included "
          f"({warm:.2f} s); once running: {steady:7.1f} test VMs/s ({n} more tests took {warm2 - warm:.2f} s)")
    print(f"  --vmm-cold (cold boots):               {cold_n / cold:7.1f} test VMs/s over {cold_n} tests; "
          f"once running: {steady_cold:7.1f} test VMs/s   ratio x{steady / steady_cold:.1f} once running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
