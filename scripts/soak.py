#!/usr/bin/env python3
"""Soak: boot the default guest N times in one process and watch for leaks.

Reports open file descriptors, memory mappings (/proc/self/maps lines) and
RSS after a warm-up, then every --every boots, and the growth at the end.

    python3 scripts/soak.py [--boots 1000] [--memory 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm.backend import detect_backend  # noqa: E402
from vmm.elf import load_kernel_file  # noqa: E402
from vmm.guest_build import build_guest  # noqa: E402
from vmm.vm import Vm, VmConfig  # noqa: E402


def sample() -> dict:
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"fds": fds, "maps": maps, "rss": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=1000)
    ap.add_argument("--memory", type=int, default=64, help="guest RAM in MiB")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    backend = detect_backend()
    print(backend.banner)
    image = load_kernel_file(build_guest(quiet=True))
    config = VmConfig(memory=args.memory << 20, timeout=30)
    for _ in range(10):  # warm-up: imports, caches, allocator arenas
        with Vm(image, config) as vm:
            vm.run()
    base = sample()
    samples = [{"boot": 0, **base}]
    failures = 0
    t0 = time.perf_counter()
    for i in range(1, args.boots + 1):
        with Vm(image, config) as vm:
            if vm.run().exit_code != 0:
                failures += 1
        if i % args.every == 0 or i == args.boots:
            s = {"boot": i, **sample()}
            samples.append(s)
            print(f"boot {i:5d}: fds {s['fds']:4d}  maps {s['maps']:5d}  rss {s['rss'] / 2**20:8.1f} MiB  "
                  f"({(time.perf_counter() - t0) / i * 1e3:.1f} ms/boot)", flush=True)
    end = samples[-1]
    growth = {k: end[k] - base[k] for k in ("fds", "maps", "rss")}
    print(f"growth over {args.boots} boots: fds {growth['fds']:+d}, maps {growth['maps']:+d}, "
          f"rss {growth['rss'] / 2**20:+.1f} MiB; {failures} failed boots")
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": backend.to_json(), "samples": samples, "growth": growth,
                                               "failures": failures}, indent=2))
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
