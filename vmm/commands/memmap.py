"""``vmm memmap``: the memory map the guest would be given, or was given (--snapshot).

``--json`` for a built kernel reads the map from the kernel's cached boot
plan and loads neither rich nor numpy: the table's renderer and the snapshot
reader are imported only when asked for (listed in tests/test_architecture.py).
"""

from __future__ import annotations

import json

from mm.memmap import MemoryMap

from ..boot import memory_map_bytes
from .common import kernel_image, memory_size


def main(args) -> int:
    if args.snapshot:
        from ..snapshot.offline import memmap_of_snapshot

        size, memmap = memmap_of_snapshot(args.snapshot)
    else:
        size = memory_size(args)
        # From the kernel's cached boot plan when it has one: no mapper, no numpy.
        memmap = MemoryMap.parse(memory_map_bytes(kernel_image(args, quiet=True), size), ram_size=size)
    if args.json:
        print(json.dumps({"ram_size": size, "descriptors": memmap.to_json(), "usable_frames": memmap.usable_frames()}, indent=2))
    else:
        from ..render import console, memmap_table

        console().print(memmap_table(memmap))
    return 0
