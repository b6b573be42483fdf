#!/usr/bin/env python3
"""KASLR: how many distinct slides does the kernel really get?

Boots the default guest N times, stopping each at its first INFO report (the
guest's own confirmation of the slide it runs at), and reports the number of
distinct slides, the range, and a uniformity check against the host's
possible values.

    python3 scripts/kaslr_distribution.py [--boots 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm.abi import ReportKind  # noqa: E402
from vmm.backend import detect_backend  # noqa: E402
from vmm.boot import slide_range  # noqa: E402
from vmm.devices import Stop  # noqa: E402
from vmm.elf import load_kernel_file  # noqa: E402
from vmm.guest_build import build_guest  # noqa: E402
from vmm.vm import Vm, VmConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=2000)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    backend = detect_backend()
    print(backend.banner)
    image = load_kernel_file(build_guest(quiet=True))
    possible = slide_range(image)
    seen: list[int] = []

    def at_info(report):
        if report.kind == ReportKind.INFO:
            seen.append(report.int("kaslr_slide", -1))
            return Stop(0, "info", "slide recorded")
        return None

    t0 = time.perf_counter()
    for i in range(args.boots):
        with Vm(image, VmConfig(memory=32 << 20, timeout=30), on_report=at_info) as vm:
            vm.run()
        if (i + 1) % 500 == 0:
            print(f"{i + 1} boots, {len(set(seen))} distinct slides", flush=True)
    counts = collections.Counter(seen)
    distinct = len(counts)
    expected_distinct = possible * (1 - (1 - 1 / possible) ** args.boots)
    # Chi-square over the possible slides (uniform hypothesis).
    exp = args.boots / possible
    chi2 = sum((counts.get(k * (2 << 20), 0) - exp) ** 2 / exp for k in range(possible))
    print(f"{args.boots} boots in {time.perf_counter() - t0:.1f} s: {distinct} distinct slides "
          f"(log2 {math.log2(max(distinct, 1)):.2f}; {possible} possible; {expected_distinct:.0f} expected if uniform)")
    print(f"slide range {min(seen):#x} .. {max(seen):#x}; chi-square {chi2:.0f} on {possible - 1} degrees of freedom")
    # The slide can take `possible` values; the boots show whether the guest
    # really gets them, uniformly. A chi-square within ~4 standard deviations
    # of its mean (dof) is consistent with a uniform choice.
    uniform = abs(chi2 - (possible - 1)) < 4 * math.sqrt(2 * (possible - 1))
    print(f"uniform over the {possible} possible slides: {'consistent' if uniform else 'NOT consistent'}")
    if distinct >= 512:
        print("requirement (at least 2^9 distinct slides): met, observed directly")
    elif possible >= 512 and uniform:
        print(f"requirement (at least 2^9 distinct slides): met by the {possible} possible values; "
              f"{args.boots} boots are too few to observe 512 of them directly (use --boots 1000+)")
    else:
        print("requirement (at least 2^9 distinct slides): NOT met")
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": backend.to_json(), "boots": args.boots, "distinct": distinct,
                                               "possible": possible, "chi2": chi2, "slides": seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
