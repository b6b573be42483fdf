"""``vmm snapshot SOCKET FILE``: save a guest served by ``vmm run --control``."""

from __future__ import annotations

import sys

from ..inspector.control import RemoteTarget


def main(args) -> int:
    with RemoteTarget(args.socket) as target:
        info = target.save(args.file)
    print(f"vmm: saved {args.file}: {info['segments']} segments, {info['stored_bytes'] >> 10} KiB of RAM, "
          f"vCPU parked {info['pause_ms']:.2f} ms", file=sys.stderr)
    return 0
